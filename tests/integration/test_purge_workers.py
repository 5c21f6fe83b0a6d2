"""The purge's worker processes die with the process that purges (kill -9 of a real process
holding a worker pool; the rest of the purge's tests are in tests/unit/test_purge.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

_ORPHAN_SCRIPT = """
import signal, sys
from concurrent.futures import ProcessPoolExecutor
from nvr_guard.retention import purge
from nvr_guard.workers import worker_context
if __name__ == "__main__":
    if sys.argv[1] == "watch":
        pool, warm = purge._pool(2, True)  # as a large purge makes it
        assert isinstance(pool, ProcessPoolExecutor)
    else:
        pool = ProcessPoolExecutor(2, mp_context=worker_context())
    for f in [pool.submit(purge._unlink_group, [], 0.0) for _ in range(4)]:
        f.result()
    print("ready", flush=True)
    signal.pause()  # until the test kills this process
"""


@pytest.mark.parametrize("watch", [True, False])
def test_worker_processes_die_with_the_purging_process(tmp_path: Path, watch: bool) -> None:
    # kill -9 of a purge must stop its deletions: workers left running would unlink files
    # while the next start writes the recovered receipts
    import subprocess
    import sys

    import psutil

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "watch" if watch else "plain"],
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    kids: list[psutil.Process] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        kids = psutil.Process(proc.pid).children(recursive=True)
        workers = [k for k in kids if k.ppid() != proc.pid]  # children of the forkserver
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        # waits for the workers to exit, up to the deadline (the control case waits it out)
        _, alive = psutil.wait_procs(workers, timeout=10 if watch else 3)
        if watch:
            assert alive == []
        else:
            # the control: without the watch, workers outlive the killed process
            assert alive
    finally:
        proc.kill()
        proc.wait()
        for k in kids:  # the forkserver, its resource tracker, workers of the control case
            if k.is_running():
                k.kill()


def test_worker_processes_run_below_the_daemons_priority() -> None:
    # deleting old footage is background work: the commands people wait for come first
    import os

    from nvr_guard.retention import purge

    pool, warm = purge._pool(2, True)
    try:
        assert warm is not None
        warm.result(timeout=60)
        mine = os.nice(0)
        theirs = {pool.submit(os.nice, 0).result(timeout=60) for _ in range(4)}
        assert theirs == {min(19, mine + purge.WORKER_NICE)}
    finally:
        pool.shutdown()
