"""`make demo` end to end, the way a newcomer meets it: the demo process itself
(``python -m nvr_guard.demo``, what the Makefile runs) on a fresh directory, Ctrl-C in the middle
of its export walk-through, then a second run that must work on what the first one left, and
whose package must exist and verify against the recorder's key.

It creates the demo's real Unix users (``nvrdemo-*``); the fixture removes them with
``--remove-users`` (what ``make clean`` runs) and checks that none is left.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.demo import (
    CLIP_CAMERA,
    EXPORT_GROUP,
    MANAGER,
    MARK,
    PEOPLE,
    REQUESTER,
    SECURITY,
    SOCKET_GROUP,
    TECHNICIAN,
)

pytestmark = pytest.mark.integration

DEADLINE = 300  # s for one demo run on a busy 2-core machine (about 15 s when idle)


def demo_accounts_present() -> list[str]:
    out = []
    for name in PEOPLE:
        try:
            pwd.getpwnam(name)
            out.append(name)
        except KeyError:
            pass
    for g in (SOCKET_GROUP, EXPORT_GROUP):
        try:
            grp.getgrnam(g)
            out.append(g)
        except KeyError:
            pass
    return out


@pytest.fixture
def demo_accounts() -> Iterator[None]:
    foreign = [
        n for n in PEOPLE if n in demo_accounts_present() and pwd.getpwnam(n).pw_gecos != MARK
    ]
    assert not foreign, f"accounts with the demo's names that it did not make: {foreign}"
    try:
        yield
    finally:
        r = subprocess.run(
            [sys.executable, "-m", "nvr_guard.demo", "--remove-users"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert demo_accounts_present() == []


def start_demo(base: Path, *args: str) -> subprocess.Popen[str]:
    """The demo as `make demo` starts it, leading its own process group as a shell job does."""
    return subprocess.Popen(
        [sys.executable, "-m", "nvr_guard.demo", *args],
        env={**os.environ, "NVR_GUARD_DEMO_DIR": str(base)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def no_daemon_on(base: Path) -> bool:
    """True when nothing holds the state lock the daemon keeps for its whole life."""
    with open(base / "state" / "state.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def nvr(base: Path, *args: str) -> Any:
    """Root's CLI on the demo's config (no daemon: root acts locally), JSON out."""
    r = subprocess.run(
        [sys.executable, "-m", "nvr_guard", "--config", str(base / "config.yaml"), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"{args}: exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


def test_make_demo_walks_an_export_survives_ctrl_c_and_runs_again(
    tmp_path: Path, demo_accounts: None
) -> None:
    # the demo users' CLI must reach the demo directory, as it does in a clone of the repo
    for p in [tmp_path, *tmp_path.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    base = tmp_path / "demo"

    # 1. Ctrl-C (SIGINT to the job's process group, as a terminal sends it) between the approvals
    p = start_demo(base)
    killer = threading.Timer(DEADLINE, p.kill)
    killer.start()
    seen = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            seen.append(line)
            if line.startswith(f"{MANAGER}$ nvr-guard request approve"):
                os.killpg(p.pid, signal.SIGINT)
                break
        rest = p.communicate(timeout=60)[0]
    finally:
        killer.cancel()
    out = "".join(seen) + rest
    assert p.returncode == 130, out[-3000:]
    assert "daemon stopped (exit 0)" in rest and "audit chain intact" in rest, rest
    assert "Traceback" not in out
    assert no_daemon_on(base)
    assert not list((base / "export").iterdir())  # interrupted before the export

    # 2. an account as an older run may leave it: the technician without the export group
    subprocess.run(["usermod", "-G", "", TECHNICIAN], check=True)

    # 3. the whole demo, non-interactively
    p = start_demo(base, "--once")
    try:
        out = p.communicate(timeout=DEADLINE)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 0, out[-5000:]
    assert "Traceback" not in out
    # each step's command line and outcome is printed
    for who, cmd in (
        (REQUESTER, "--json request new --camera " + CLIP_CAMERA),
        (MANAGER, "request approve 1"),
        (SECURITY, "request approve 1"),
        (TECHNICIAN, f"media scan {base / 'export'}"),
        (TECHNICIAN, f"--json export run 1 --media {base / 'export'}"),
        (TECHNICIAN, "--json key show"),
    ):
        assert f"{who}$ nvr-guard {cmd}" in out, (who, cmd)
    assert "package OK" in out and "the pinned recorder key" in out
    m = re.search(r"^package: (/\S+)$", out, re.M)
    assert m, out[-3000:]
    pkg = Path(m.group(1))
    # started over: the package of this run is the only one, for request 1
    assert list((base / "export").iterdir()) == [pkg]
    assert re.fullmatch(r"NVRG-1-\d{8}T\d{6}Z", pkg.name), pkg.name
    assert no_daemon_on(base)

    # the package verifies against the recorder's key, as its recipient checks it
    fingerprint = nvr(base, "key", "show")["fingerprint"]
    v = nvr(base, "verify", str(pkg), "--fingerprint", fingerprint)
    assert v["ok"] is True and v["signer_confirmed"] is True, v
    # its clip is real footage: the requested 4 s of the recorded clip
    [clip] = [f for f in pkg.iterdir() if f.suffix == ".mp4"]
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", clip],
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(float(probe.stdout) - 4.0) < 0.5, probe.stdout
    # and every step was done by its own person, as the audit log records it
    by = {
        (e["actor"], e["action"]) for e in nvr(base, "audit", "show", "--request", "1")["entries"]
    }
    assert {
        (REQUESTER, "request.new"),
        (MANAGER, "request.approve"),
        (SECURITY, "request.approve"),
        (TECHNICIAN, "export.done"),
    } <= by, by
    assert nvr(base, "audit", "verify")["ok"] is True
    # the demo users stay for the next run (the fixture removes them, as `make clean` does)
    assert pwd.getpwnam(TECHNICIAN).pw_gecos == MARK
    assert EXPORT_GROUP in {g.gr_name for g in grp.getgrall() if TECHNICIAN in g.gr_mem}


def test_a_demo_named_group_others_belong_to_is_neither_taken_over_nor_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nvr_guard.demo as demo

    sock, export, other = "nvrdt-sock", "nvrdt-exp", "nvrdt-other"
    monkeypatch.setattr(demo, "SOCKET_GROUP", sock)
    monkeypatch.setattr(demo, "EXPORT_GROUP", export)
    monkeypatch.setattr(demo, "PEOPLE", {"nvrdt-alice": ("operator", False)})
    subprocess.run(["groupadd", export], check=True)
    try:
        subprocess.run(
            ["useradd", "-M", "-N", "-G", export, "-s", "/usr/sbin/nologin", other], check=True
        )
        assert demo.foreign_accounts() == [export]  # the walk-through is left out
        left = demo.remove_people()
        assert grp.getgrnam(export).gr_mem == [other]  # not removed
        assert left and export in left[0]
        subprocess.run(["userdel", other], check=True)
        assert demo.foreign_accounts() == []  # nobody else in it: the demo's own again
    finally:
        subprocess.run(["userdel", other], capture_output=True)
        subprocess.run(["groupdel", export], capture_output=True)
