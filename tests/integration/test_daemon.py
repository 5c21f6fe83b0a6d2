"""The daemon as a real process: start, catch a segment, sweep, reload, identity, stop, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta

import pytest

from tests.fixtures.site import Site, build_tree, poll, write_segment


def segment_rows(site: Site) -> set[bytes]:
    con = sqlite3.connect(site.state / "catalog.db")
    try:
        return {bytes(r[0]) for r in con.execute("SELECT path FROM segments")}
    finally:
        con.close()


def test_daemon_lifecycle(site, daemon, now):
    old = write_segment(site.root, "cam1", now - timedelta(days=15, minutes=30))
    build_tree(site.root, ["cam1"], days=14, per_day=24, now=now)
    site.write_config(sweep_every="2s")
    d = daemon()
    # the first sweep deletes the expired segment (1 of ~337: below the guard)
    poll(lambda: not old.exists(), 30, "the expired segment to be purged")
    # a new segment closed while the daemon runs is catalogued (inotify hint)
    new = write_segment(site.root, "cam2", datetime.now(UTC))
    poll(lambda: os.fsencode(str(new)) in segment_rows(site), 10, "the new segment in the catalog")
    st = d.status()
    assert st["ok"] is True and st["sites"]["toll"]["segments"] >= 337

    # reload with a bad config: refused, old config kept, audited
    good = site.config.read_text()
    site.config.write_text(good.replace("keep: 15d", "keep: 15x"))
    d.proc.send_signal(signal.SIGHUP)
    poll(lambda: "reload refused" in d.logtext(), 10, "the refused reload in the log")
    assert d.status()["sites"]["toll"]["rule"].startswith("keep=15d")  # the old config stays
    # reload with a good config: the new rule is in force
    site.config.write_text(good.replace("keep: 15d", "keep: 20d"))
    d.proc.send_signal(signal.SIGHUP)
    poll(lambda: d.status()["sites"]["toll"]["rule"].startswith("keep=20d"), 10, "the new rule")
    assert d.stop() == 0
    actions = [e["action"] for e in site.json("audit", "show")["entries"]]
    for a in (
        "config.load",
        "daemon.start",
        "config.reload_failed",
        "config.reload",
        "purge.receipt",
        "daemon.stop",
    ):
        assert a in actions
    assert site.run("audit", "verify").returncode == 0


def test_daemon_refuses_bad_config(site):
    site.config.write_text(site.config.read_text() + "bogus: 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert f"{site.config}:" in r.stderr and "bogus" in r.stderr
    assert not site.socket.exists()


def test_identity_from_the_socket(site, daemon, now):
    write_segment(site.root, "cam1", now - timedelta(days=1))
    # let the unprivileged client read its config: open the temp dirs above it
    for p in [site.base, *site.base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    os.chmod(site.config, 0o644)
    d = daemon()
    os.chmod(site.socket, 0o666)  # let an unprivileged user reach the socket for this test
    r = site.run(
        "hold",
        "add",
        "--camera",
        "cam1",
        "--from",
        "2026-01-01T00:00",
        "--to",
        "2026-01-02T00:00",
        "--reason",
        "x",
        user=65534,
    )
    assert r.returncode == 3, r.stderr
    assert "nobody" in r.stderr and "admin" in r.stderr
    denied = [e for e in site.json("audit", "show")["entries"] if e["action"] == "access.denied"]
    assert denied and denied[-1]["actor"] == "nobody"
    d.stop()


@pytest.mark.slow
def test_kill_9_during_purge_then_restart_is_consistent(site, now):
    build_tree(site.root, [f"cam{i}" for i in range(4)], days=40, per_day=200, now=now)
    site.write_config(fraction=1.0, sweep_every="1h")
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "retention", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )

    # kill it as soon as the purge has started (its begin entry is in the audit log)
    def purging() -> bool:
        try:
            con = sqlite3.connect(site.state / "catalog.db", timeout=5)
            try:
                return bool(
                    con.execute(
                        "SELECT 1 FROM audit WHERE action='purge.receipt' OR action='purge.begin'"
                    ).fetchone()
                )
            finally:
                con.close()
        except sqlite3.Error:
            return False

    poll(lambda: purging() or proc.poll() is not None, 120, "the purge to start")
    proc.kill()
    proc.wait()
    # restart: reconcile, then the catalog matches the disk and the chain verifies
    assert site.run("retention", "plan").returncode == 0
    r = site.run("retention", "run")
    assert r.returncode == 0, r.stderr
    on_disk = {os.fsencode(str(p)) for p in site.root.rglob("*.mp4")}
    assert segment_rows(site) == on_disk
    assert site.run("audit", "verify").returncode == 0
