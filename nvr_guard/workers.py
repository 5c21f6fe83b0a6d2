"""The worker processes of the scanner and the purge, and the process-wide helpers of bulk work
(the garbage collector, the C library).

forkserver, not fork: the daemon has threads (scheduler, watcher, control socket) by the time it
needs workers, and a forked copy of a process with threads may inherit a held lock. The server
imports the worker code once; each worker is then a cheap fork of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

log = logging.getLogger(__name__)

PRELOAD = ["nvr_guard.retention.scan", "nvr_guard.retention.policy", "nvr_guard.retention.purge"]


def _in_forkserver() -> bool:
    """Whether this import runs inside multiprocessing's forkserver as it starts (the worker
    modules are preloaded there, before it sets up its signals)."""
    import sys
    import types

    server = sys.modules.get("multiprocessing.forkserver")
    code = getattr(getattr(server, "main", None), "__code__", None)
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


if _in_forkserver():
    # Ctrl-C belongs to the command: the server hands its SIGINT disposition as it found it to
    # every worker it forks, so ignoring it here covers a worker from its first instruction (a
    # worker's own initializer comes too late for a Ctrl-C the moment it starts)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_context() -> BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def worker_start(owner: int, nice: int = 0) -> None:
    """The initializer of every worker process (scan and purge): ``nice`` more than the owner
    (background work yields to what people wait for), Ctrl-C left to the owner (it reaches the
    whole process group; the owner ends its workers itself, see :func:`end_children`), and gone
    with the owner (:func:`die_with`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    die_with(owner)


def die_with(owner: int) -> None:
    """A worker process must not go on once the process it works for is gone (kill -9): a
    purge's worker would go on deleting while the next start writes ``recovered`` receipts, a
    scan's would go on walking for nobody. (The pool's own clean-up does not help: the workers'
    parent is the forkserver, which stays alive as long as its workers do.) A thread waits on a
    pidfd of the owner and ends this process the moment it exits."""
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)  # gone already
    except OSError:
        fd = -1  # no pidfd (kernel < 5.3): look every 20 ms

    def watch() -> None:
        if fd >= 0:
            select.select([fd], [], [])
        else:
            while True:
                time.sleep(0.02)
                try:
                    os.kill(owner, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
        os._exit(1)

    threading.Thread(target=watch, name="nvr-guard-owner-watch", daemon=True).start()


def end_children(timeout: float = 5.0, tracker: bool = True) -> list[int]:
    """Before this process exits: end every process it started that is still there — worker
    processes (a Ctrl-C or an error left them mid-task; they are the forkserver's children,
    not ours), an ffmpeg — then multiprocessing's two helpers (the forkserver, and the resource
    tracker, which ignores SIGTERM: each ends when the pipe it watches is closed), and wait
    until they are gone, so that no process of a command outlives it. Returns the pids of the
    processes other than the helpers that had to be ended.

    ``tracker=False``: the resource tracker is left to :func:`stop_resource_tracker`, called
    after multiprocessing's own exit handler has released what it tracks (stopped before, it
    reports the pool's semaphores as leaked, and their release fails noisily)."""
    import psutil

    helpers = _helpers()
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    others = [p for p in procs if p.pid not in helpers.values()]
    for p in others:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(others, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    for name in ("forkserver", "resource_tracker"):  # the forkserver holds the tracker's pipe
        if name in helpers and (tracker or name != "resource_tracker"):
            _stop_helper(name, helpers[name], timeout)
    if others:
        log.debug("ended %d leftover process(es): %s", len(others), [p.pid for p in others])
    return [p.pid for p in others]


def stop_resource_tracker(timeout: float = 5.0) -> None:
    """Stop multiprocessing's resource tracker if this process started one (see
    :func:`end_children`)."""
    import sys

    if "multiprocessing.resource_tracker" not in sys.modules:
        return
    pid = _helpers().get("resource_tracker")
    if pid is not None:
        _stop_helper("resource_tracker", pid, timeout)


def _helper_objects() -> dict[str, Any]:
    from multiprocessing import forkserver, resource_tracker

    return {
        "forkserver": getattr(forkserver, "_forkserver", None),
        "resource_tracker": getattr(resource_tracker, "_resource_tracker", None),
    }


def _helpers() -> dict[str, int]:
    """The pids of multiprocessing's forkserver and resource tracker, where they run."""
    found = {}
    attrs = {"forkserver": "_forkserver_pid", "resource_tracker": "_pid"}
    for name, obj in _helper_objects().items():
        pid = getattr(obj, attrs[name], None)
        if isinstance(pid, int):
            found[name] = pid
    return found


def _stop_helper(name: str, pid: int, timeout: float) -> None:
    """Ask a multiprocessing helper to stop (its ``_stop``: close its pipe, reap it), on a
    thread so that a helper that does not end cannot hold this process: killed after
    ``timeout``."""
    stop = getattr(_helper_objects()[name], "_stop", None)
    if stop is not None:
        t = threading.Thread(target=_quietly, args=(stop,), daemon=True)
        t.start()
        t.join(timeout)
        if not t.is_alive():
            return
    log.debug("%s %d did not stop: killed", name, pid)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _quietly(fn: Any) -> None:
    try:
        fn()
    except (OSError, AttributeError) as exc:  # gone already
        log.debug("helper stop: %s", exc)


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the body builds large lists of small objects.

    A purge or reconcile allocates hundreds of thousands of tuples; every 700 allocations the
    collector would walk the young objects and, now and then, all of them — measured, that was
    three quarters of the time of preparing a 144,000-file purge. Reference counting still
    frees everything that is not in a cycle; the collector runs again afterwards. Nests and
    may be used from several threads at once (the collector is one per process)."""
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


_libc: ctypes.CDLL | None = None


def libc_function(name: str) -> Any:
    """A function of the C library by name (``syncfs``, ``malloc_trim``), or None where this
    libc does not have it or cannot be loaded."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return getattr(_libc, name, None)
    except OSError:
        return None
