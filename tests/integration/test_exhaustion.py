"""Resource exhaustion: a full ``state_dir`` (SQLite gets ENOSPC), a full recording
volume (the disk-pressure rule), and the inotify watch limit (rescans take over). Real tmpfs
mounts and a real daemon; the suite runs as root."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from tests.fixtures.site import Site, build_tree, poll, write_segment

pytestmark = pytest.mark.slow


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[object]:
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            check=True,
        )
        mounted.append(where)
        return where

    yield mount
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], check=False)


def fill(where: Path) -> Path:
    """Write a filler file until the file system says ENOSPC."""
    filler = where / "filler"
    chunk = b"\xa5" * 65536
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\xa5" * 512)
        except OSError:
            pass
    assert os.statvfs(where).f_bavail == 0
    return filler


class Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.log = site.base / "daemon.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        poll(self.ready, 60, "the daemon to answer")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.logtext()}")
        return self.site.daemon_answers()

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict:
        r = self.site.run("--json", "status")
        assert r.stdout.strip(), r.stderr
        return json.loads(r.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0, self.logtext()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def rows(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def truncate_wal(db: Path) -> None:
    """Checkpoint and truncate the WAL, so the next write must grow a file (and meet ENOSPC)."""
    con = sqlite3.connect(db, timeout=10)
    try:
        busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        assert busy == 0
    finally:
        con.close()


# ---- state_dir full ---------------------------------------------------------------------------
def test_state_dir_full_stops_deletion_and_recovers(site: Site, now: datetime, tmpfs, daemons):
    state = tmpfs(site.base / "statefs", "64m")
    site.state = state
    site.write_config(fraction=1.0, sweep_every="2s", settle="3s")
    protected = set(build_tree(site.root, ["cam1"], days=10, per_day=24, now=now))
    d = Daemon(site)
    daemons.append(d)
    db = state / "catalog.db"
    # due footage: named 20 days ago, its mtime reaching keep=15d three seconds from now (both
    # times must be past keep): catalogued now, deletable in a moment
    due = [
        write_segment(site.root, f"cam{c}", now - timedelta(days=20, minutes=i))
        for c in (2, 3)
        for i in range(150)
    ]
    fresh = datetime.now().timestamp() - 15 * 86400 + 3
    for p in due:
        os.utime(p, (fresh, fresh))
    poll(
        lambda: (
            rows(db, "SELECT count(*) FROM segments WHERE camera IN ('cam2','cam3')")[0][0]
            == len(due)
        ),
        30,
        "the due footage in the catalog",
    )
    truncate_wal(db)
    filler = fill(state)
    # the settle time passes and sweeps keep running: each must fail before its first unlink
    poll(
        lambda: "full" in (d.status().get("daemon", {}).get("last_error") or ""),
        60,
        "the sweep to fail on the full state_dir",
    )
    st = d.status()
    assert st["ok"] is False and str(state) in st["daemon"]["last_error"], st["daemon"]
    # a few more sweep intervals: still nothing deleted, the daemon still up and saying so
    deadline = datetime.now().timestamp() + 6
    poll(lambda: datetime.now().timestamp() > deadline, 10, "three more sweep intervals")
    assert d.proc.poll() is None
    assert all(p.exists() for p in due), "a file was deleted while its purge.begin could not commit"
    assert d.status()["ok"] is False  # the 10 s incremental rescan succeeding does not hide it
    errors = [ln for ln in d.logtext().splitlines() if ln.startswith("<3>") and "full" in ln]
    assert errors and str(state) in errors[0]
    # space returns: the next sweep deletes, the status clears, the chain verifies
    filler.unlink()
    poll(lambda: not any(p.exists() for p in due), 30, "the due footage to be purged")
    poll(lambda: d.status()["ok"] is True, 30, "the status to clear")
    d.stop()
    assert site.run("audit", "verify").returncode == 0
    assert all(p.exists() for p in protected)
    entries = site.json("audit", "show")["entries"]
    receipts = [e for e in entries if e["action"] == "purge.receipt"]
    assert sum(e["details"]["count"] for e in receipts) == len(due)
    cat = {bytes(r[0]) for r in rows(db, "SELECT path FROM segments")}
    assert cat == {os.fsencode(str(p)) for p in site.root.rglob("*.mp4")}


def test_state_dir_full_between_unlink_and_receipt(site: Site, now: datetime, tmpfs):
    """The files are gone but the receipt cannot be written: the sweep fails, and the next
    sweep once space returns writes the receipt for exactly the files that were deleted."""
    state = tmpfs(site.base / "statefs", "64m")
    site.state = state
    site.write_config(fraction=1.0, sweep_every="1h")
    protected = set(build_tree(site.root, ["cam1"], days=10, per_day=24, now=now))
    due = [write_segment(site.root, "cam2", now - timedelta(days=20, minutes=i)) for i in range(80)]
    engine = Engine(load_config(str(site.config)))
    engine.reconcile(full=True)
    db = state / "catalog.db"
    truncate_wal(db)
    filled: list[Path] = []
    forget = engine.sweeper._forget

    def full_disk_then_forget(segs):  # the unlinks are done: the state_dir fills up now
        filled.append(fill(state))
        forget(segs)

    engine.sweeper._forget = full_disk_then_forget  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        engine.sweep()
    assert filled and not any(p.exists() for p in due)
    begin = [
        e for e in engine.audit.entries(action="purge.begin") if e.details.get("camera") == "cam2"
    ]
    assert len(begin) == 1
    assert not list(engine.audit.entries(action="purge.receipt"))
    engine.catalog.close()

    filled[0].unlink()
    r = site.run("--json", "retention", "run")  # the next sweep (a restart): receipt first
    assert r.returncode == 0, r.stderr
    receipts = site.json("audit", "show")["entries"]
    got = [e for e in receipts if e["action"] == "purge.receipt"]
    assert len(got) == 1
    rec = got[0]["details"]
    assert rec["begin"] == begin[0].seq and rec["recovered"] is True and rec["count"] == len(due)
    assert rec["bytes"] == sum(1000 for _ in due)
    assert site.run("audit", "verify").returncode == 0
    assert all(p.exists() for p in protected)
    cat = {bytes(r[0]) for r in rows(db, "SELECT path FROM segments")}
    assert cat == {os.fsencode(str(p)) for p in site.root.rglob("*.mp4")}
    sweeps = rows(db, "SELECT state, finished IS NOT NULL FROM sweeps ORDER BY id")
    assert ("applying", 0) not in sweeps


# ---- recording volume full --------------------------------------------------------------------
def test_recording_volume_full_applies_disk_pressure(site: Site, now: datetime, tmpfs, daemons):
    root = tmpfs(site.base / "recfs", "10m")
    site.root = root
    site.write_config(keep="60d", min_keep="5d", min_free="40%", fraction=1.0, sweep_every="2s")
    size = 100 * 1024
    # 30 segments past the floor (6..35 days old), 50 under it: 8 MB of 10 MB, 20 % free
    old = [write_segment(root, "cam1", now - timedelta(days=6 + i), size=size) for i in range(30)]
    young = [
        write_segment(root, "cam1", now - timedelta(days=4, hours=-i), size=size) for i in range(50)
    ]
    d = Daemon(site)
    daemons.append(d)

    def free() -> float:
        st = os.statvfs(root)
        return st.f_bavail / st.f_blocks

    poll(lambda: free() >= 0.40, 30, "the disk-pressure rule to free space")
    # oldest first: what is left of the old footage is its youngest part
    kept = [p for p in old if p.exists()]
    assert kept and kept == old[: len(kept)], "deleted out of age order"
    assert all(p.exists() for p in young)
    # more young footage than the floor lets go: all the old goes, then an alert names the floor
    more = [
        write_segment(root, "cam2", now - timedelta(days=3, hours=-i), size=size) for i in range(28)
    ]
    poll(lambda: not any(p.exists() for p in old), 30, "everything past the floor to go")
    poll(lambda: "min_keep=5d" in d.logtext(), 30, "the alert naming the floor")
    assert all(p.exists() for p in young + more)
    alerts = [e for e in site.json("audit", "show")["entries"] if e["action"] == "disk.alert"]
    assert any("min_keep=5d" in e["details"]["message"] for e in alerts)
    d.stop()
    assert site.run("audit", "verify").returncode == 0


# ---- inotify watch limit ----------------------------------------------------------------------
@pytest.fixture
def watch_limit() -> Iterator[object]:
    knob = Path("/proc/sys/fs/inotify/max_user_watches")
    saved = knob.read_text()

    def lower(n: int) -> None:
        knob.write_text(str(n))

    def restore() -> None:
        knob.write_text(saved)

    lower.restore = restore  # type: ignore[attr-defined]
    yield lower
    restore()


def test_inotify_watch_limit_rescans_take_over(site: Site, now: datetime, watch_limit, daemons):
    # 6 cameras x 20 days x up to 24 hours: several hundred directories
    build_tree(site.root, [f"cam{i}" for i in range(6)], days=20, per_day=24, now=now)
    ndirs = sum(1 for p in site.root.rglob("*") if p.is_dir())
    site.write_config(keep="60d", sweep_every="1h")
    site.config.write_text(
        site.config.read_text().replace("sweep_every: 1h\n", "sweep_every: 1h\nrescan_every: 5s\n")
    )
    limit = 64
    assert ndirs > 4 * limit
    # the limit is per user and other root processes share it: lowered only while starting
    watch_limit(limit)
    try:
        d = Daemon(site)
        daemons.append(d)
        poll(lambda: "watch limit" in d.logtext(), 30, "the watch-limit warning")
    finally:
        watch_limit.restore()
    warning = [ln for ln in d.logtext().splitlines() if "watch limit" in ln]
    assert warning[0].startswith("<4>") and "rescan" in warning[0]
    assert d.proc.poll() is None
    # new segments, in a known directory and in a new one, are catalogued by the rescans
    t = datetime.now().astimezone()
    new = [
        write_segment(site.root, "cam0", t - timedelta(minutes=5)),
        write_segment(site.root, "cam-new", t - timedelta(minutes=5)),
    ]
    db = site.state / "catalog.db"
    poll(
        lambda: (
            {os.fsencode(str(p)) for p in new}
            <= {bytes(r[0]) for r in rows(db, "SELECT path FROM segments")}
        ),
        30,
        "the new segments in the catalog",
    )
    assert d.status()["sites"]["toll"]["segments"] == sum(1 for _ in site.root.rglob("*.mp4"))
    d.stop()
