"""No process of a command outlives it (issue 19): root's local `retention plan` (a walk in
worker processes), `retention run` (the walk, then a purge in worker processes), whether they
end normally, by Ctrl-C in the middle of the walk or of the purge, or by SIGTERM. Each command
runs under a small watcher that is its "child subreaper" (prctl): a process the command
leaves behind — alive, or ended after its parent — is handed to the watcher instead of init,
which is how it is caught however quickly it would have ended as an orphan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from tests.fixtures.site import Site, make_config, poll

CAMERAS, DAYS, PER_DAY = 8, 12, 720  # 69,120 files: enough for the walk's and purge's processes


def fast_tree(root: Path, now: datetime) -> int:
    """Empty segments every 2 minutes, their mtimes a minute after their starts (UTC paths)."""
    n = 0
    start = (now - timedelta(days=DAYS)).replace(minute=0, second=0, microsecond=0)
    for cam in range(CAMERAS):
        t = start
        while t < now - timedelta(minutes=30):
            d = root / f"cam{cam}" / t.strftime("%Y-%m-%d/%H")
            d.mkdir(parents=True, exist_ok=True)
            p = d / t.strftime("%M.%S.mp4")
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
            ts = t.timestamp() + 60
            os.utime(p, (ts, ts))
            n += 1
            t += timedelta(days=1) / PER_DAY
    return n


@pytest.fixture
def big(site: Site) -> Site:
    fast_tree(site.root, datetime.now(UTC))
    text = make_config(site, keep="8d", fraction=0.5, layout="{camera}/%Y-%m-%d/%H/%M.%S.mp4")
    site.config.write_text(text.replace("timezone: Asia/Shanghai", "timezone: UTC"))
    return site


_WATCHER = """
import ctypes, json, os, subprocess, sys, time
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl failed")
# the command leads a process group of its own, as a shell's foreground job does
cmd = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, process_group=0)
print(cmd.pid, flush=True)
err = cmd.stderr.read()
cmd.wait()
orphans = []
# whatever is our child now was left by the command (reparented to us); give a process that
# is about to be handed over a moment, then take them all
deadline = time.monotonic() + 1.0
while time.monotonic() < deadline:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        time.sleep(0.05)  # nothing handed over (yet): look again until the deadline
        continue
    if pid == 0:
        time.sleep(0.05)
        continue
    orphans.append(pid)
json.dump({"rc": cmd.returncode, "err": err.decode(errors="replace"), "orphans": orphans},
          sys.stderr)
"""


class Command:
    """A command run under the watcher."""

    def __init__(self, site: Site, *args: str) -> None:
        self.watcher = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHER,
                sys.executable,
                "-m",
                "nvr_guard",
                "--config",
                str(site.config),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.watcher.stdout is not None
        self.pid = int(self.watcher.stdout.readline())

    def poll(self) -> int | None:
        return None if psutil.pid_exists(self.pid) and not _zombie(self.pid) else 0

    def finish(self) -> tuple[int, str, list[int]]:
        _, err = self.watcher.communicate(timeout=600)
        doc = json.loads(err.decode().splitlines()[-1] if err else "{}")
        return int(doc["rc"]), str(doc["err"]), list(doc["orphans"])


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def workers_of(proc: Command) -> list[psutil.Process]:
    """The command's worker processes: descendants that are not its own children (the
    forkserver's)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    return [k for k in kids if k.ppid() != proc.pid]


@pytest.mark.parametrize("args", [("retention", "plan", "--rescan"), ("retention", "run")])
def test_a_command_that_ends_leaves_no_process(big: Site, args: tuple[str, ...]) -> None:
    files = len(list(big.root.rglob("*.mp4")))
    proc = Command(big, *args)
    poll(lambda: workers_of(proc) or proc.poll() is not None, 120, "worker processes")
    assert workers_of(proc), "the walk ran without worker processes: the tree is too small"
    rc, err, left = proc.finish()
    assert rc == 0, err
    assert left == []
    if args[1] == "run":  # it did its sweep: four of twelve days deleted
        assert files * 0.6 < len(list(big.root.rglob("*.mp4"))) < files * 0.75
        assert big.json("audit", "verify")["ok"] is True


def purging(proc: Command) -> bool:
    """The purge's workers are at work (they run at a lower priority than the walk's)."""
    return any(w.nice() > os.nice(0) for w in workers_of(proc))


@pytest.mark.parametrize(
    ("args", "when", "sig"),
    [
        (("retention", "plan", "--rescan"), "walk", signal.SIGINT),
        (("retention", "run"), "walk", signal.SIGINT),
        (("retention", "run"), "purge", signal.SIGINT),
        (("retention", "plan", "--rescan"), "walk", signal.SIGTERM),
    ],
)
def test_ctrl_c_or_sigterm_mid_work_leaves_no_process(
    big: Site, args: tuple[str, ...], when: str, sig: signal.Signals
) -> None:
    proc = Command(big, *args)
    at_work = (lambda: purging(proc)) if when == "purge" else (lambda: bool(workers_of(proc)))
    poll(lambda: at_work() or proc.poll() is not None, 180, f"the {when} in worker processes")
    assert proc.poll() is None, "the command ended before it could be interrupted"
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        os.kill(proc.pid, sig)  # systemd, timeout(1), kill: the command's process alone
    rc, err, left = proc.finish()
    assert rc == 128 + sig, err
    # nothing but the command's own words: no traceback, no leaked or failed clean-up
    for noise in ("Traceback", "Exception ignored", "leaked", "resource_tracker"):
        assert noise not in err, err
    assert left == []
    # what was interrupted is whole again at the next run: it sweeps, and the chain verifies (a
    # purge cut short gets its receipts as `recovered`)
    again = Command(big, "retention", "run")
    rc, err, left = again.finish()
    assert rc == 0 and left == [], err
    assert big.json("audit", "verify")["ok"] is True
