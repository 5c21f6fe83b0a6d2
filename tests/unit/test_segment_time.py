"""A segment's two times (issue 11): the path time and the mtime (its end).

- Past ``keep`` and past the floor only when both times are: a camera whose clock was reset names
  fresh files ``2000-01-01/…`` and they are not deleted; the disk-pressure pass too.
- A file timed by its mtime alone (no ``layout``) covers [previous end, mtime]: a hold, a request
  hold or an export hold over its middle holds it, and ``segments_of`` finds it.
- Path times and mtimes that disagree beyond ``guards.max_clock_skew`` are reported per camera
  (attention ``clock_skew``, status, metric), both ways (2000 and 2099), and cleared once gone.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nvr_guard.attention import CLOCK_SKEW
from nvr_guard.config import load_config
from nvr_guard.daemon.metrics import EngineCollector
from nvr_guard.engine import Engine
from nvr_guard.model import (
    Action,
    ClockReading,
    DiskState,
    GuardRules,
    Hold,
    Plan,
    Segment,
    SiteRules,
    SweepHistory,
    is_skewed,
)
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.policy import decide, expiry_both
from nvr_guard.store.catalog import Catalog
from nvr_guard.text import Duration
from tests.fixtures.site import Site, build_tree, write_segment

DAY = 86400.0
HOUR = 3600.0
SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=SH).timestamp()
Y2000 = datetime(2000, 1, 1, tzinfo=SH).timestamp()
Y2099 = datetime(2099, 1, 1, tzinfo=SH).timestamp()


def rules(
    keep: str = "20d", min_keep: str | None = "10d", min_free: float = 0.0, action: str = "alert"
) -> SiteRules:
    return SiteRules(
        site="gate",
        keep=Duration.parse(keep),
        min_keep=Duration.parse(min_keep) if min_keep else None,
        tz=SH,
        settle=120.0,
        min_free=min_free,
        disk_action=action,
    )


def seg(start: float, mtime: float, name: str, camera: str = "cam1", size: int = 1000) -> Segment:
    return Segment("gate", camera, f"/rec/gate/{camera}/{name}.mp4".encode(), start, mtime, size)


def plan(
    segs: list[Segment],
    r: SiteRules,
    holds: list[Hold] | None = None,
    disk: DiskState | None = None,
    now: float = NOW,
) -> Plan:
    return decide(
        segs,
        ClockReading(now, 1000.0, "boot"),
        {"gate": r},
        GuardRules(max_delete_fraction=1.0),
        holds or [],
        {(s.site, s.camera): 1_000_000 for s in segs},
        disk={"gate": disk} if disk else None,
        history=SweepHistory(site_rules={"gate": r.describe()}),
    )


def actions(p: Plan) -> dict[bytes, Action]:
    return {i.segment.path: i.action for i in p.items}


# ---- past keep and the floor by both times (pure policy) ----------------------------------------


@pytest.mark.parametrize(
    ("start", "mtime", "deleted"),
    [
        # a one-hour segment: its end counts, to the second
        (NOW - 20 * DAY - HOUR, NOW - 20 * DAY, True),
        (NOW - 20 * DAY - HOUR, NOW - 20 * DAY + 1, False),
        # the camera's clock was reset: named 2000-01-01, written ten minutes ago
        (Y2000, NOW - 600, False),
        # ... or named in the future, written 25 days ago
        (Y2099, NOW - 25 * DAY, False),
        # the clock was reset long enough ago: both times are past keep
        (Y2000, NOW - 21 * DAY, True),
    ],
    ids=["end-at-keep", "end-1s-short", "reset-2000", "future-2099", "reset-long-ago"],
)
def test_deleted_only_when_both_times_are_past_keep(
    start: float, mtime: float, deleted: bool
) -> None:
    s = seg(start, mtime, "x")
    r = rules()
    got = actions(plan([s], r)).get(s.path)
    assert (got is Action.DELETE) is deleted
    assert got in (None, Action.DELETE)  # never listed as held back: simply not due
    exp = expiry_both(start, mtime, r)
    assert exp is not None and (exp <= NOW) is deleted


def test_calendar_keep_takes_each_time_through_the_calendar() -> None:
    # 6mo on the last day of February: 30 Aug 23:00 expires 28 Feb 23:00, 31 Aug 01:00 expires
    # 28 Feb 01:00 — a later mtime can expire earlier; both must have expired
    r = rules(keep="6mo", min_keep=None)
    start = datetime(2026, 8, 30, 23, 0, tzinfo=SH).timestamp()
    mtime = datetime(2026, 8, 31, 1, 0, tzinfo=SH).timestamp()
    feb28_noon = datetime(2027, 2, 28, 12, 0, tzinfo=SH).timestamp()
    assert expiry_both(start, mtime, r) == datetime(2027, 2, 28, 23, 0, tzinfo=SH).timestamp()
    assert actions(plan([seg(start, mtime, "x")], r, now=feb28_noon)) == {}


def test_disk_pressure_respects_the_floor_by_both_times() -> None:
    r = rules(keep="1y", min_keep="10d", min_free=0.5)
    reset = seg(Y2000, NOW - 600, "reset")  # oldest by its name, ten minutes old by its mtime
    future = seg(Y2099, NOW - 30 * DAY, "future")  # 30 days old by mtime, under floor by name
    old = seg(NOW - 30 * DAY, NOW - 30 * DAY + 60, "old")
    # everything is wanted: 1,000,000 bytes to free
    p = plan([reset, future, old], r, disk=DiskState(total=2_000_000, free=0))
    got = {i.segment.path: i for i in p.items}
    assert got[old.path].action is Action.DELETE
    for s in (reset, future):
        assert got[s.path].action is Action.KEEP
        assert got[s.path].reason.startswith("floor: min_keep=10d until")
        assert "clock skew" in got[s.path].reason
    # the reset file is kept until ten days after its mtime, not after its name
    assert "2026-11-30T11:50:00+08:00" in got[reset.path].reason


def test_disk_pressure_takes_the_oldest_by_the_later_time() -> None:
    r = rules(keep="1y", min_keep=None, min_free=0.5)
    reset = seg(Y2000, NOW - 600 - 2 * HOUR, "reset", size=1000)
    old = seg(NOW - 30 * DAY, NOW - 30 * DAY + 60, "old", size=1000)
    # 1,000 bytes to free: one segment, and it is the one that is really old
    p = plan([reset, old], r, disk=DiskState(total=4000, free=1000))
    assert actions(p) == {old.path: Action.DELETE}


def test_a_future_named_file_is_held_by_a_hold_before_its_name() -> None:
    # recorded before its mtime at a time nobody knows: any hold before its name may be its
    r = rules(keep="1y", min_keep=None, min_free=0.5)
    future = seg(Y2099, NOW - 30 * DAY, "future")
    hold = Hold(1, "case 9", "alice", start=NOW - 31 * DAY, end=NOW - 30 * DAY - HOUR)
    p = plan([future], r, holds=[hold], disk=DiskState(total=2000, free=0))
    assert p.items[0].action is Action.KEEP and p.items[0].reason.startswith("held: hold 1")


@pytest.mark.parametrize(
    ("offset", "skewed"),
    [(-HOUR, False), (-HOUR - 1, True), (2 * HOUR, False), (2 * HOUR + 1, True), (0.0, False)],
    ids=["1h-early", "1h1s-early", "2h-late", "2h1s-late", "same"],
)
def test_skew_band_edges(offset: float, skewed: bool) -> None:
    """mtime within [start - t, start + 2t] is normal (t = max_clock_skew = 1 h)."""
    assert is_skewed(NOW, NOW + offset, HOUR) is skewed


# ---- files timed by their mtime alone: estimated starts and holds (real catalog) ---------------


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.db", expiry=ExpiryCalc)
    yield c  # type: ignore[misc]
    c.close()


def _hourly_mtime_files(cat: Catalog, r: SiteRules, ends: list[float]) -> list[Segment]:
    """One-hour files of a site without layout: catalogued with start == mtime (their end)."""
    segs = [seg(e, e, f"f{i}") for i, e in enumerate(ends)]
    cat.upsert_segments(segs, {"gate": r})
    return segs


T0 = NOW - 30 * DAY


def test_mtime_timed_files_get_the_previous_end_as_start(cat: Catalog) -> None:
    r = rules()
    _hourly_mtime_files(cat, r, [T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR])
    got = cat.due_segments(NOW, "gate", r)
    # the oldest has no predecessor: its end minus the longest segment seen on the camera
    assert [(s.start, s.mtime) for s in got] == [
        (T0, T0 + HOUR),
        (T0 + HOUR, T0 + 2 * HOUR),
        (T0 + 2 * HOUR, T0 + 3 * HOUR),
    ]
    # the previous end comes from the catalog when it is not in the list
    later = cat.segments_of("gate", "cam1", T0 + 2.5 * HOUR, T0 + 2.6 * HOUR)
    assert [(s.start, s.mtime) for s in later] == [(T0 + 2 * HOUR, T0 + 3 * HOUR)]


@pytest.mark.parametrize("kind", ["manual", "request", "export"])
def test_a_hold_over_the_middle_of_an_mtime_timed_file_holds_it(cat: Catalog, kind: str) -> None:
    r = rules()
    f0, f1, f2 = _hourly_mtime_files(cat, r, [T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR])
    # ten minutes in the middle of f2 (recorded T0+2h .. T0+3h); no file ends inside the range
    hs, he = T0 + 2 * HOUR + 1200, T0 + 2 * HOUR + 1800
    cat.add_hold(
        start=hs, end=he, reason="case 11", owner="alice", created=NOW, kind=kind, camera="cam1"
    )
    p = plan(cat.due_segments(NOW, "gate", r), r, holds=cat.active_holds(NOW))
    got = {i.segment.path: i for i in p.items}
    assert got[f2.path].action is Action.KEEP
    assert got[f2.path].reason.startswith(f"held: hold 1 ({kind}: case 11")
    assert got[f0.path].action is Action.DELETE and got[f1.path].action is Action.DELETE
    # the same footage for a request or an export of that range
    assert [s.path for s in cat.segments_of("gate", "cam1", hs, he)] == [f2.path]


def test_the_only_file_of_a_camera_may_hold_anything_before_its_end(cat: Catalog) -> None:
    r = rules()
    (only,) = _hourly_mtime_files(cat, r, [T0])
    hold = Hold(1, "case 12", "bob", start=T0 - 5 * DAY, end=T0 - 4 * DAY, camera="cam1")
    p = plan(cat.due_segments(NOW, "gate", r), r, holds=[hold])
    assert p.items[0].segment.path == only.path and p.items[0].action is Action.KEEP


# ---- expires_at: both times, and recomputed after the upgrade ---------------------------------


def test_stored_expiry_uses_both_times(cat: Catalog) -> None:
    r = rules()
    reset = seg(Y2000, NOW - 600, "reset")
    cat.upsert_segments([reset], {"gate": r})
    assert cat.due_segments(NOW, "gate", r) == []
    (exp,) = cat.conn.execute("SELECT expires_at FROM segments").fetchone()
    assert exp == NOW - 600 + 20 * DAY


def test_upgrade_recomputes_expiries_computed_from_the_path_time(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    r = rules()
    reset = seg(Y2000, NOW - 600, "reset")
    with Catalog(db, expiry=ExpiryCalc) as c:
        c.upsert_segments([reset], {"gate": r})
    # what a catalog of the previous version holds: expires_at from the path time alone
    conn = sqlite3.connect(db)
    conn.execute("UPDATE segments SET expires_at = start + ?", (20 * DAY,))
    from nvr_guard.store.schema import MIGRATIONS, SCHEMA_VERSION, _migration_8

    # the version before the migration that makes expiries be recomputed
    conn.execute(f"PRAGMA user_version = {MIGRATIONS.index(_migration_8)}")
    conn.commit()
    conn.close()
    with Catalog(db, expiry=ExpiryCalc) as c:
        assert c.schema_version == SCHEMA_VERSION
        assert c.due_segments(NOW, "gate", r) == []
        (exp,) = c.conn.execute("SELECT expires_at FROM segments").fetchone()
        assert exp == NOW - 600 + 20 * DAY


def test_clock_skew_query(cat: Catalog) -> None:
    r = rules()
    segs = [
        seg(NOW - DAY, NOW - DAY + 60, "ok", camera="cam1"),
        seg(Y2000, NOW - 600, "reset-a", camera="cam3"),
        seg(Y2000 + 300, NOW - 300, "reset-b", camera="cam3"),
        seg(Y2099, NOW - 20 * DAY, "future", camera="cam4"),
        seg(NOW - DAY, NOW - DAY, "mtime-timed", camera="cam5"),
        seg(NOW - DAY, NOW - DAY - HOUR, "edge", camera="cam6"),
    ]
    cat.upsert_segments(segs, {"gate": r})
    got = {(x.camera, x.count, os.path.basename(x.path)) for x in cat.clock_skew(HOUR)}
    # cam3: the one that disagrees most is the example
    assert got == {("cam3", 2, b"reset-a.mp4"), ("cam4", 1, b"future.mp4")}


# ---- the engine: the reproductions and the clock_skew attention -------------------------


def test_reset_camera_clock_does_not_lose_fresh_footage(site: Site, now: datetime) -> None:
    """Issue 11: cam3/2000-01-01/00/00.00.mp4 written ten minutes ago, under a 10-day floor."""
    site.write_config(keep="15d", min_keep="10d", fraction=1.0)
    build_tree(site.root, ["cam1"], days=3, per_day=24, now=now)
    reset = site.root / "cam3" / "2000-01-01" / "00" / "00.00.mp4"
    reset.parent.mkdir(parents=True)
    reset.write_bytes(b"\0" * 1000)
    t = (now - timedelta(minutes=10)).timestamp()
    os.utime(reset, (t, t))
    res = site.json("retention", "run")
    assert reset.exists()
    assert all(i["path"] != str(reset) or i["action"] != "delete" for i in res["items"])


def test_hold_over_the_middle_of_an_mtime_timed_file_via_the_cli(site: Site, now: datetime) -> None:
    """Issue 11: a site without layout; a hold over the middle of a one-hour file keeps it."""
    site.write_config(keep="15d", fraction=1.0, layout=None)
    end = now - timedelta(days=20)
    files = []
    for k in (3, 2, 1, 0):  # one-hour files ending 3, 2, 1 and 0 hours before `end`
        p = site.root / "cam1" / f"seg{3 - k}.mp4"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 100)
        t = (end - timedelta(hours=k)).timestamp()
        os.utime(p, (t, t))
        files.append(p)
    # ten minutes inside the last file (recorded end-1h .. end)
    t0 = (end - timedelta(minutes=40)).isoformat()
    t1 = (end - timedelta(minutes=30)).isoformat()
    r = site.run(
        "--json", "hold", "add", "--camera", "cam1", "--from", t0, "--to", t1, "--reason", "c11"
    )
    assert r.returncode == 0, r.stderr
    res = site.json("retention", "run")
    assert files[3].exists()
    assert not any(p.exists() for p in files[:3])
    item = next(i for i in res["items"] if i["path"] == str(files[3]))
    assert item["action"] == "keep" and "c11" in item["reason"]


def _metric(engine: Engine, kind: str) -> float:
    reg = CollectorRegistry()
    col = EngineCollector(engine)
    col.update()
    reg.register(col)
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            if s.name.endswith("_attention") and s.labels.get("kind") == kind:
                return float(s.value)
    raise AssertionError(f"no attention metric for {kind}")


def test_clock_skew_is_reported_per_camera_and_cleared(site: Site, now: datetime) -> None:
    site.write_config(keep="15d", min_keep="10d", fraction=1.0)
    build_tree(site.root, ["cam1"], days=2, per_day=24, now=now)
    reset = write_segment(site.root, "cam3", datetime(2000, 1, 1, tzinfo=SH))
    t = (now - timedelta(minutes=10)).timestamp()
    os.utime(reset, (t, t))
    future = write_segment(site.root, "cam4", datetime(2099, 1, 1, tzinfo=SH))
    t = (now - timedelta(days=20)).timestamp()
    os.utime(future, (t, t))
    wall = now.timestamp()
    engine = Engine(load_config(site.config), clock=lambda: ClockReading(wall, 1000.0, "b"))
    try:
        engine.reconcile(full=True)
        entries = {e.key: e for e in engine.attention.entries(CLOCK_SKEW)}
        assert set(entries) == {"cam3", "cam4"}
        assert entries["cam3"].details["example"] == str(reset)
        assert entries["cam3"].details["path_time"] == "2000-01-01T00:00:00+08:00"
        assert entries["cam4"].details["example"] == str(future)
        assert (
            str(reset) in entries["cam3"].message and "max_clock_skew=1h" in entries["cam3"].message
        )
        st = engine.status()
        assert st["ok"] is False
        assert {(a["kind"], a["camera"]) for a in st["attention"]} == {
            (CLOCK_SKEW, "cam3"),
            (CLOCK_SKEW, "cam4"),
        }
        assert _metric(engine, CLOCK_SKEW) == 2
        raised = [e for e in engine.audit.entries(action="attention.") if e.details.get("key")]
        assert {e.details["key"] for e in raised if e.action == "attention.raised"} == {
            "cam3",
            "cam4",
        }
        # neither is deleted by a sweep
        out = engine.sweep(actor="test")
        assert reset.exists() and future.exists()
        assert all(i.segment.path != os.fsencode(reset) for i in out.plan.deletions)
        # gone (or fixed): the next full reconcile clears the entries
        reset.unlink()
        future.unlink()
        engine.reconcile(full=True)
        assert engine.attention.entries(CLOCK_SKEW) == []
        assert _metric(engine, CLOCK_SKEW) == 0
    finally:
        engine.catalog.close()


@pytest.mark.parametrize(("max_skew", "reported"), [("1h", True), ("2d", False)])
def test_max_clock_skew_sets_what_is_reported(
    site: Site, now: datetime, max_skew: str, reported: bool
) -> None:
    text = site.config.read_text()
    assert "max_clock_jump: 1d}" in text
    site.config.write_text(
        text.replace("max_clock_jump: 1d}", f"max_clock_jump: 1d, max_clock_skew: {max_skew}}}")
    )
    late = write_segment(site.root, "cam2", now - timedelta(days=2))  # mtime 1 day after name
    t = (now - timedelta(days=1)).timestamp()
    os.utime(late, (t, t))
    cfg = load_config(site.config)
    assert cfg.guard_rules().max_clock_skew == Duration.parse(max_skew).seconds
    engine = Engine(cfg, clock=lambda: ClockReading(now.timestamp(), 1000.0, "b"))
    try:
        engine.reconcile(full=True)
        assert [e.key for e in engine.attention.entries(CLOCK_SKEW)] == (
            ["cam2"] if reported else []
        )
    finally:
        engine.catalog.close()
