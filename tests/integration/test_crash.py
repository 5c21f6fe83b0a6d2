"""Crash safety: kill -9 at random points during a cold reconcile, a purge, concurrent
audit appends and an export; after each kill a restart must leave

- the catalog's segment rows equal to the segment files on disk,
- `audit verify` passing,
- every audit entry a client was told about (a `hold add` that returned 0) still in the log,
- every file the policy did not allow to delete still on disk,
- no export temporary or package on the target of an interrupted export, the request not exported.

Kill moments come from random delays (seeded per test, the seed is in the failure message) or from
polling for progress (a `purge.begin` row, an ffmpeg child of the daemon); nothing sleeps to
synchronise.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from tests.fixtures.site import LAYOUT, Site, build_tree, make_footage, poll, write_segment

pytestmark = pytest.mark.slow

KEEP_DAYS = 15


# ---- helpers ------------------------------------------------------------------------------------
def seeded(name: str) -> random.Random:
    seed = int(os.environ.get("NVRG_CRASH_SEED", str(int(time.time()))))
    print(f"{name}: NVRG_CRASH_SEED={seed}")
    return random.Random(seed)


def launch(site: Site, *args: str) -> subprocess.Popen[bytes]:
    # a session of its own: kill -9 reaches the process and any worker it started (reconcile pool)
    return subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(site.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill9(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the process group started by ``launch``; True when it was still running."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
    return alive


def query(site: Site, sql: str, args: tuple = ()) -> list[tuple]:
    try:
        con = sqlite3.connect(f"file:{site.state / 'catalog.db'}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []  # not created yet
    finally:
        con.close()


def catalog_rows(site: Site) -> set[bytes]:
    return {bytes(r[0]) for r in query(site, "SELECT path FROM segments")}


def disk_files(site: Site) -> set[bytes]:
    return {os.fsencode(str(p)) for p in site.root.rglob("*.mp4") if p.is_file()}


def restart_and_check(site: Site, protected: set[Path], what: str) -> None:
    """The restart (a local `retention run`), then the invariants."""
    r = site.run("retention", "run")
    assert r.returncode == 0, f"{what}: restart failed: {r.stderr}"
    rows, files = catalog_rows(site), disk_files(site)
    assert rows == files, (
        f"{what}: catalog and disk differ: {len(rows - files)} rows without a file, "
        f"{len(files - rows)} files without a row"
    )
    v = site.run("audit", "verify")
    assert v.returncode == 0, f"{what}: audit verify: {v.stdout} {v.stderr}"
    gone = [p for p in protected if not p.exists()]
    assert not gone, f"{what}: {len(gone)} files deleted that were not due, e.g. {gone[:3]}"


def receipts_cover_deletions(site: Site) -> None:
    """Every purge.begin whose batch deleted something has its receipt (written on restart when
    the process died between the unlinks and the receipt)."""
    rows = query(site, "SELECT seq, action, details FROM audit WHERE action LIKE 'purge.%'")
    begins = {seq for seq, a, _ in rows if a == "purge.begin"}
    receipted = {json.loads(d).get("begin") for _, a, d in rows if a == "purge.receipt"}
    assert receipted <= begins


def young_tree(site: Site, now: datetime, cameras: list[str], days: int, per_day: int) -> set[Path]:
    """Footage younger than the rule (minus a day of margin): no run may delete any of it."""
    return set(build_tree(site.root, cameras, days=days, per_day=per_day, now=now))


def due_segments(site: Site, now: datetime, cameras: list[str], count: int, age_days: int) -> None:
    for cam in cameras:
        t0 = now - timedelta(days=age_days)
        for i in range(count):
            write_segment(site.root, cam, t0 + timedelta(seconds=7 * i))


# ---- (a) cold reconcile -------------------------------------------------------------------------
def test_kill_during_cold_reconcile(site: Site, now: datetime):
    rng = seeded("reconcile")
    site.write_config(fraction=1.0, sweep_every="1h")
    protected = young_tree(site, now, [f"cam{i}" for i in range(6)], days=KEEP_DAYS - 1, per_day=96)
    due_segments(site, now, ["cam0", "cam1"], 40, KEEP_DAYS + 3)
    # calibrate: how long a cold `retention run` of this tree takes here
    t0 = time.monotonic()
    r = site.run("retention", "run")
    full = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert catalog_rows(site) == disk_files(site)
    killed = 0
    for i in range(14):
        what = f"reconcile iteration {i}"
        if i % 2 == 0:
            # truly cold: no catalog at all (the bulk load into an empty table)
            for p in site.state.glob("catalog.db*"):
                p.unlink()
            (site.state / "audit.head").unlink(missing_ok=True)
            proc = launch(site, "retention", "run")
        else:
            # a daemon starting on a known catalog while the tree changed under it
            due_segments(site, now, [f"new{i}"], 30, 2)
            protected |= set((site.root / f"new{i}").rglob("*.mp4"))
            proc = launch(site, "daemon")
        delay = rng.uniform(0.05, full * 1.1)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
        killed += kill9(proc)
        restart_and_check(site, protected, what)
    assert killed >= 7, f"only {killed} of 14 runs were still running when killed"


# ---- (b) purge ----------------------------------------------------------------------------------
def test_kill_during_purge(site: Site, now: datetime):
    rng = seeded("purge")
    site.write_config(fraction=1.0, sweep_every="1h")
    protected = young_tree(site, now, ["cam0", "cam1"], days=KEEP_DAYS - 2, per_day=24)
    cams = [f"cam{i}" for i in range(4)]
    assert site.run("retention", "run").returncode == 0
    killed_in_purge = 0
    rounds = 0
    # at least 16 rounds; more (at most 40) until 4 kills landed inside a purge: how often one
    # lands depends on how long the process lives on after its purge (printing, the machine)
    for i in range(40):
        if i >= 16 and killed_in_purge >= 4:
            break
        rounds += 1
        what = f"purge iteration {i}"
        due_segments(site, now, cams, 300, KEEP_DAYS + 2 + i)
        last = max((r[0] for r in query(site, "SELECT max(seq) FROM audit")), default=0) or 0
        proc = launch(site, "retention", "run")
        if i % 2 == 0:
            # kill once the purge has begun (its first begin entry is committed), a little later
            def begun(last: int = last) -> bool:
                return bool(
                    query(
                        site,
                        "SELECT 1 FROM audit WHERE seq > ? AND action = 'purge.begin'",
                        (last,),
                    )
                )

            # looks 2 ms apart: a purge lasts a fraction of a second, and the default backoff
            # (up to 0.2 s between looks) let most of them finish before the kill
            poll(
                lambda p=proc: begun() or p.poll() is not None,
                60,
                f"{what}: the purge to begin",
                max_delay=0.002,
            )
            extra = rng.uniform(0, 0.03)  # a purge of 1,200 files takes a fraction of a second
            if extra:
                try:
                    proc.wait(timeout=extra)
                except subprocess.TimeoutExpired:
                    pass
        else:
            try:
                proc.wait(timeout=rng.uniform(0.1, 1.5))
            except subprocess.TimeoutExpired:
                pass
        mid = bool(
            query(site, "SELECT 1 FROM audit WHERE seq > ? AND action = 'purge.begin'", (last,))
        )
        if kill9(proc) and mid:
            killed_in_purge += 1
        restart_and_check(site, protected, what)
        receipts_cover_deletions(site)
        # the restart finished the job: nothing due is left
        assert not [p for p in site.root.rglob("*.mp4") if p not in protected], what
    assert killed_in_purge >= 4, f"only {killed_in_purge} kills landed inside a purge"
    # every batch that deleted files has its receipt, also those cut short by the kill
    rows = query(site, "SELECT seq, action, details FROM audit WHERE action LIKE 'purge.%'")
    receipts = {json.loads(d)["begin"]: json.loads(d) for _, a, d in rows if a == "purge.receipt"}
    assert sum(r["count"] for r in receipts.values()) == rounds * len(cams) * 300


# ---- (c) concurrent audit appends ---------------------------------------------------------------
def test_kill_during_concurrent_hold_appends(site: Site, now: datetime):
    rng = seeded("holds")
    site.write_config(fraction=1.0, sweep_every="1h")
    protected = young_tree(site, now, ["cam0", "cam1"], days=3, per_day=24)
    assert site.run("retention", "run").returncode == 0
    acked_adds: dict[int, str] = {}  # hold id -> reason
    acked_releases: set[int] = set()
    # at least 12 rounds; on a loaded machine more, until enough commands were acknowledged
    # before their kill for the checks below to mean something
    for i in range(40):
        if i >= 12 and len(acked_adds) >= 6 and acked_releases:
            break
        what = f"hold iteration {i}"
        procs: list[tuple[str, int | str, subprocess.Popen[bytes]]] = []
        for k in range(6):
            reason = f"case {i}-{k}"
            procs.append(
                (
                    "add",
                    reason,
                    launch(
                        site,
                        "--json",
                        "hold",
                        "add",
                        "--camera",
                        f"cam{k % 2}",
                        "--from",
                        (now - timedelta(days=2, hours=k)).isoformat(),
                        "--to",
                        (now - timedelta(days=1, hours=k)).isoformat(),
                        "--reason",
                        reason,
                    ),
                )
            )
        releasable = sorted(set(acked_adds) - acked_releases)
        for hid in rng.sample(releasable, min(3, len(releasable))):
            procs.append(
                (
                    "release",
                    hid,
                    launch(site, "--json", "hold", "release", str(hid), "--reason", f"done {i}"),
                )
            )
        # the commands queue for the state lock (about 0.5 s each, seconds for nine on a loaded
        # machine): every fourth round lets them all finish, so that releases are acknowledged
        # too (a release comes last and was otherwise killed in round after round under load)
        patience = 30.0 if i % 4 == 3 else rng.uniform(0.3, 3.0)
        deadline = time.monotonic() + patience
        for kind, key, proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()) * rng.uniform(0.5, 1.0))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                kill9(proc)
                continue
            out, err = proc.communicate()
            if proc.returncode != 0:
                continue
            shown = json.loads(out)
            if kind == "add":
                acked_adds[int(shown["id"])] = str(key)
            else:
                acked_releases.add(int(key))
        restart_and_check(site, protected, what)
        entries = query(site, "SELECT action, object, details FROM audit")
        adds = {o: json.loads(d) for a, o, d in entries if a == "hold.add"}
        releases = {o for a, o, _ in entries if a == "hold.release"}
        for hid, reason in acked_adds.items():
            assert adds.get(f"hold:{hid}", {}).get("reason") == reason, f"{what}: add {hid} lost"
        for hid in acked_releases:
            assert f"hold:{hid}" in releases, f"{what}: release {hid} lost"
        # the hold table and the log agree: no hold placed or released off the record
        held = {r[0]: r[1] for r in query(site, "SELECT id, released FROM holds")}
        assert set(acked_adds) <= set(held), what
        assert {f"hold:{h}" for h in held} == set(adds), what
        assert {f"hold:{h}" for h, rel in held.items() if rel is not None} == releases, what
        assert all(held[h] is not None for h in acked_releases), what
    assert len(acked_adds) >= 6 and acked_releases, (len(acked_adds), acked_releases)


# ---- (d) export ---------------------------------------------------------------------------------
def export_config(site: Site, target: Path, db: Path) -> str:
    return f"""state_dir: {site.state}
timezone: Asia/Shanghai
socket: {site.socket}
socket_group: root
settle: 2m
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  bank:
    profile: general
    roots: [{site.root}]
    layout: "{LAYOUT}"
cameras:
  lobby-1: {{level: 1, name: "lobby"}}
people:
  users:
    nobody: {{roles: [operator], level: 1}}
    root: {{roles: [admin, security_lead, technician]}}
approval:
  steps: [security_lead]
  hours: "00:00-23:59"
  approver_may_export: true   # root approves and exports: one admin on this test host
export:
  targets: [{target}]
  preset: veryslow
media:
  scanner: clamscan
  database: {db}
  sysfs_root: {site.base / "sysfs"}
"""


class Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.proc = launch(site, "daemon")
        poll(self.ready, 60, "the daemon to answer")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return self.site.daemon_answers()

    def ffmpeg_running(self) -> bool:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for k in kids:
            try:
                if k.name() == "ffmpeg":
                    return True
            except psutil.NoSuchProcess:  # a short-lived child (ffprobe) ended as it was listed
                continue
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=15)


def test_kill_during_export(site: Site, now: datetime, clamav_db: Path):
    rng = seeded("export")
    for p in [site.base, *site.base.parents]:  # `nobody` reads the config, reaches the socket
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    target = site.base / "export-target"
    target.mkdir()
    (site.base / "sysfs" / "block").mkdir(parents=True)
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    make_footage(site.root, "lobby-1", start, 3, size="640x480")
    protected = set(site.root.rglob("*.mp4"))
    site.config.write_text(export_config(site, target, clamav_db))
    os.chmod(site.config, 0o644)
    d = Daemon(site)
    daemons = [d]
    try:
        os.chmod(site.socket, 0o666)
        r = site.run(
            "--json",
            "request",
            "new",
            "--camera",
            "lobby-1",
            "--from",
            (start + timedelta(seconds=2)).isoformat(),
            "--to",
            (start + timedelta(seconds=28)).isoformat(),
            "--reason",
            "robbery",
            "--basis",
            "art. 54",
            "--recipient",
            "City police; Officer Wang; 110",
            user=65534,
        )
        assert r.returncode == 0, r.stderr
        rid = int(json.loads(r.stdout)["id"])
        r = site.run("--json", "request", "approve", str(rid))
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "approved", r.stderr
        assert site.json("media", "scan", str(target))["result"] == "clean"
        interrupted = 0
        for i in range(8):
            what = f"export iteration {i}"
            exp = launch(site, "--json", "export", "run", str(rid), "--media", str(target))
            poll(
                lambda d=d, exp=exp: d.ffmpeg_running() or exp.poll() is not None,
                60,
                "ffmpeg to start",
            )
            try:
                exp.wait(timeout=rng.uniform(0, 0.8))
            except subprocess.TimeoutExpired:
                pass
            assert exp.poll() is None, f"{what}: the export finished before the kill"
            interrupted += kill9(d.proc)
            exp.communicate(timeout=30)
            assert exp.returncode != 0, what
            d = Daemon(site)
            daemons.append(d)
            os.chmod(site.socket, 0o666)
            left = sorted(p.name for p in target.iterdir())
            assert left == [], f"{what}: the target holds {left}"
            shown = site.json("request", "show", str(rid))
            assert shown["state"] == "approved" and not shown.get("package"), what
            assert site.run("audit", "verify").returncode == 0, what
            assert catalog_rows(site) == disk_files(site), what
            assert all(p.exists() for p in protected), what
        assert interrupted == 8
    finally:
        for dd in daemons:
            if dd.proc.poll() is None:
                kill9(dd.proc)
