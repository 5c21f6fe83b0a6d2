"""Soak (issue 6 item 7): 24 hours of recording and retention on an accelerated clock.

An ``Engine`` runs in-process with an injected clock. A writer closes one 1-minute segment per
camera every simulated minute (layout path = recorded start, mtime = start + 60 s) and hands the
path to the engine as the file watcher would (``engine.hint``); every ``sweep_every`` the engine
sweeps. The archive it starts from is just below expiry, so deletions begin in the first minutes and
go on all day, without a first sweep big enough to trip the mass-deletion guard.

The simulated day starts at the real current time, so from the third simulated hour on every file
deleted has an mtime in the *real* future: had the purge compared mtimes with the real clock rather
than the engine's, they would all count as "still recording" and nothing would be deleted. A
segment is due when both its times are past keep: its end (the mtime) decides. One segment is
also uploaded late (named three hours before it is closed): it stays until its mtime is past keep
too, then goes within a sweep interval.

Figures (wall time, RSS samples, lateness) are printed and attached to the test report
(``record_property``); the README quotes them.
"""

from __future__ import annotations

import gc
import os
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvr_guard.config import load_config
from nvr_guard.daemon.metrics import Exporter
from nvr_guard.engine import Engine
from nvr_guard.model import ClockReading
from tests.fixtures.site import LAYOUT

SH = ZoneInfo("Asia/Shanghai")
CAMERAS = [f"cam{i:02d}" for i in range(1, 9)]
# cameras do not close their segments in step: each closes its own a few seconds before the minute
# (so expiries fall anywhere within a sweep interval, not only on minute boundaries)
OFFSET = {c: float(i * 37 % 60) for i, c in enumerate(CAMERAS)}
KEEP = 3 * 3600.0
SWEEP = 300.0  # sweep_every
SETTLE = 120.0
DAY = 86400.0
WARMUP = 2 * 3600.0
WALL_LIMIT = 300.0  # the bound for the whole simulated day
SEGMENT_BYTES = 256


class SimClock:
    """The engine's clock: wall and boot time advance together (no jump for the clock guard)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.t = t0

    def __call__(self) -> ClockReading:
        return ClockReading(self.t, 5000.0 + (self.t - self.t0), "soak-boot")


def segment_path(root: Path, camera: str, start: float) -> Path:
    return root / camera / datetime.fromtimestamp(start, SH).strftime("%Y-%m-%d/%H/%M.%S.mp4")


def write(root: Path, camera: str, start: float, mtime: float) -> Path:
    p = segment_path(root, camera, start)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as fh:
        fh.write(b"\0" * SEGMENT_BYTES)
    os.utime(p, (mtime, mtime))
    return p


def rss_now() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


@pytest.mark.slow
def test_24_hours_of_recording_and_retention(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    wall0 = time.monotonic()
    cpu0 = time.process_time()
    root = tmp_path / "rec"
    root.mkdir()
    prom = tmp_path / "nvr-guard.prom"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""state_dir: {tmp_path / "state"}
timezone: Asia/Shanghai
socket: {tmp_path / "c.sock"}
settle: 2m
sweep_every: 5m
guards: {{max_delete_fraction: 0.2, max_clock_jump: 1d}}
disk: {{min_free: 0%, action: alert}}
sites:
  toll:
    keep: 3h
    roots: [{root}]
    layout: "{LAYOUT}"
metrics: {{textfile: {prom}}}
"""
    )
    t0 = float(int(time.time()) // 60 * 60)
    clock = SimClock(t0)
    engine = Engine(load_config(config), clock=clock)
    exporter = Exporter.from_config(engine)
    assert exporter is not None

    # the archive: the last 3 hours of every camera, the oldest segment expiring 60 s after t0
    live: dict[str, deque[tuple[float, Path]]] = {c: deque() for c in CAMERAS}
    for cam in CAMERAS:
        start = t0 - KEEP + 60 - OFFSET[cam]
        while start < t0 - 60 - OFFSET[cam]:
            live[cam].append((start, write(root, cam, start, start + 60)))
            start += 60
    engine.reconcile(full=True)
    assert engine.catalog.count() == sum(len(q) for q in live.values())

    lateness: list[float] = []
    ahead_of_real_clock = 0  # deleted files whose mtime was later than the real clock
    rss: list[tuple[float, int]] = []
    counts: list[int] = []
    trips = 0
    late_path: Path | None = None
    late_key = b""
    late_expiry = 0.0
    late_kept_because = ""  # what the sweep right after the late upload said about it
    late_deleted_after: float | None = None  # seconds after its expiry

    minute = 0
    while minute * 60 <= DAY:
        t = t0 + minute * 60
        clock.t = t
        # the writer: each camera closes the segment that started a minute ago
        for cam in CAMERAS:
            start = t - 60 - OFFSET[cam]
            p = write(root, cam, start, start + 60)
            live[cam].append((start, p))
            engine.hint(os.fsencode(str(p)))
        if minute == 5 * 60 - 1:
            # a segment uploaded late: due by its name (recorded 3 h ago) but closed just now,
            # one minute before a sweep: that sweep must leave it, and every one until its mtime
            # is keep old too (same camera as regular footage: alone, it would be 100% of a
            # camera's footage and stop the sweep at the mass-deletion guard)
            late_expiry = t + KEEP
            late_path = write(root, CAMERAS[0], t - KEEP + 30, t)
            late_key = os.fsencode(str(late_path))
            engine.hint(late_key)
        if minute % (SWEEP // 60) == 0:
            out = engine.sweep(now=clock())
            trips += len(out.plan.trips)
            if late_path is not None and not late_kept_because:
                said = [i.reason for i in out.plan.items if i.segment.path == late_key]
                said += [r for seg, r in out.skipped if seg.path == late_key]
                late_kept_because = "; ".join(said) or "nothing"
                assert late_path.exists(), "deleted while still settling"
            elif late_path is not None and late_deleted_after is None and not late_path.exists():
                late_deleted_after = t - late_expiry
            real = time.time()
            for q in live.values():
                # files are kept in start order; everything due (end = start + 1 min, and
                # end + keep <= t) must be gone, nothing younger may be
                while q and q[0][0] + 60 + KEEP <= t:
                    start, p = q.popleft()
                    expired = t - start - 60 - KEEP
                    assert not p.exists(), f"{p} expired {expired:.0f} s ago, not deleted"
                    lateness.append(expired)
                    if start + 60 > real:
                        ahead_of_real_clock += 1
                for _start, p in q:
                    assert p.exists(), f"{p} deleted before its expiry"
            counts.append(engine.catalog.count())
            if minute % 60 == 0 and t - t0 >= WARMUP:
                rss.append(((t - t0) / 3600, rss_now()))
            if minute % 60 == 0:
                exporter.update()
        minute += 1

    wall = time.monotonic() - wall0
    expected_live = sum(len(q) for q in live.values())
    verify = engine.audit.verify()
    rss_min = min(v for _, v in rss)
    rss_max = max(v for _, v in rss)
    spread = (rss_max - rss_min) / rss_min
    figures = {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "sim_hours": DAY / 3600,
        "cameras": len(CAMERAS),
        "segments_written": len(CAMERAS) * (int(DAY // 60) + 1),
        "segments_deleted": len(lateness),
        "sweeps": len(counts),
        "lateness_max_s": max(lateness),
        "lateness_mean_s": round(sum(lateness) / len(lateness), 1),
        "catalog_final": engine.catalog.count(),
        "catalog_range_after_warmup": [min(counts[24:]), max(counts[24:])],
        "rss_min_mib": round(rss_min / 2**20, 1),
        "rss_max_mib": round(rss_max / 2**20, 1),
        "rss_spread_pct": round(100 * spread, 2),
        "audit_entries": verify.count,
        "late_segment_kept_because": late_kept_because,
        "late_segment_deleted_after_expiry_s": late_deleted_after,
        "deleted_with_mtime_ahead_of_real_clock": ahead_of_real_clock,
    }
    for k, v in figures.items():
        record_property(k, v)
    print("\nsoak figures:", figures)

    assert wall <= WALL_LIMIT, f"the simulated day took {wall:.0f} s of wall time"
    # deletion lateness: every deleted segment within one sweep interval of its expiry
    assert lateness and max(lateness) <= SWEEP and min(lateness) >= 0
    # deletions happened all day, not only at the start
    assert len(lateness) >= len(CAMERAS) * (DAY / 60) * 0.95
    # the purge judged "still recording" by the engine clock: files written in the real future
    # were deleted on time
    assert ahead_of_real_clock > len(lateness) // 2
    # the late upload: not even a candidate right after it was closed (its mtime is fresh),
    # closed at T = minute 299, expiry T + keep, deleted by the sweep at minute 480: 60 s later
    assert late_kept_because == "nothing", late_kept_because
    assert late_deleted_after == 60, late_deleted_after
    # steady state right after a sweep: the segments that ended in (t - keep, t], i.e.
    # keep / 1 min per camera (+ the late upload while it waits for its mtime)
    steady = len(CAMERAS) * (KEEP / 60)
    assert engine.catalog.count() == expected_live == steady
    assert steady <= min(counts[24:]) and max(counts[24:]) <= steady + 1
    assert trips == 0
    assert verify.ok, verify.problem
    # memory: flat after warm-up
    assert spread <= 0.10, f"RSS after warm-up moved by {100 * spread:.1f}%: {rss}"
    # the metrics saw the same day
    st = engine.stats
    assert st.deleted == len(lateness) + 1  # + the late upload
    assert st.trips == {}
    m = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(prom.read_text())
        for s in fam.samples
    }
    assert m[("nvrguard_deletions_total", ())] == st.deleted
    assert m[("nvrguard_deletion_lateness_seconds_count", ())] == st.deleted
    # all deletions within 300 s, the late upload's too
    assert m[("nvrguard_deletion_lateness_seconds_bucket", (("le", "300"),))] == st.deleted
    assert m[("nvrguard_segments", (("site", "toll"),))] == steady
    assert m[("nvrguard_audit_chain_ok", ())] == 1
    assert m[("nvrguard_last_sweep_timestamp_seconds", ())] == t0 + DAY
