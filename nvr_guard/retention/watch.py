"""inotify events as hints to the scanner (:class:`Watcher`), on top of watchdog.

Kept apart from the scanner because it is the one part of retention that runs on threads of a
third-party library and needs its quirks patched (an emitter that reports queue overflows, an fd
wrapper that reports the watch limit, a warning filter): the scanner's walk and its rules stay
readable without them, and a hint is only ever a hint — a lost event costs latency, never
correctness, because the rescans still run.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import warnings
from collections.abc import Callable, Sequence

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyFullEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyFD

from nvr_guard.retention.scan import Scanner, SiteScan

log = logging.getLogger(__name__)

__all__ = ["Watcher", "max_user_watches"]

# watchdog re-adds the watch of a directory it already watches when a tree is created with
# ``mkdir -p`` (once for the parent's recursive walk, once for the child's own event) and warns;
# the watch is the same, nothing is lost, and the daemon's log must not fill with it
warnings.filterwarnings(
    "ignore", message=r"Callback with id .* already exists for watch", category=RuntimeWarning
)


def max_user_watches() -> int | None:
    """The kernel's per-user inotify watch limit (``fs.inotify.max_user_watches``)."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


class Watcher:
    """inotify events as hints: a closed file, a rename, a new directory -> ``scanner.hint``.

    Only IN_CLOSE_WRITE, moves and directory creation are subscribed: a recorder closes a
    segment when it is complete, or writes it elsewhere and renames it in. Deletions are not
    subscribed, so nvr-guard's own purges cause no events; the rescans catch deletions by others.

    When events are lost — the kernel's event queue overflowed, or the per-user watch limit is
    exhausted so some directories go unwatched — a warning is logged and ``on_overflow()`` is
    called: the daemon then relies on (more frequent) rescans.

    On a config reload that changes roots, stop this watcher and start a new one with the new
    scanner; when only rules change, assigning ``watcher.scanner = new_scanner`` is enough.
    """

    def __init__(
        self,
        scanner: Scanner,
        sites: Sequence[SiteScan],
        on_overflow: Callable[[], None],
    ) -> None:
        self.scanner = scanner
        self.sites = list(sites)
        self.on_overflow = on_overflow
        self.overflows = 0  # times events were lost (queue overflow or watch limit)
        self._q: queue.Queue[bytes | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._observer: _HintObserver | None = None
        self.processed = 0  # hints handled (for tests and status)

    # called from watchdog's threads
    def lost_events(self, why: str) -> None:
        """Events were lost (``watch-limit``, ``queue-overflow``): warn, rely on the rescans."""
        self.overflows += 1
        limit = max_user_watches()
        if why == "watch-limit":
            log.warning(
                "inotify watch limit reached (fs.inotify.max_user_watches = %s): some "
                "directories are not watched; new segments there are found by the rescans. "
                "Raise the limit with sysctl fs.inotify.max_user_watches=...",
                limit,
            )
        else:
            log.warning(
                "inotify event queue overflowed: events were lost; falling back to a rescan"
            )
        try:
            self.on_overflow()
        except Exception:
            log.exception("overflow callback failed")

    def put(self, path: bytes) -> None:
        """Queue one path for the hint worker."""
        self._q.put(path)

    def start(self) -> bool:
        """Start watching; False when inotify is unavailable (rescans only, after a warning)."""
        self._worker = threading.Thread(target=self._work, name="nvr-guard-hints", daemon=True)
        self._worker.start()
        limit = max_user_watches()
        ndirs = sum(len(self.scanner.catalog.dirs_of(s.site)) for s in self.sites)
        if limit is not None and ndirs >= limit:
            self.lost_events("watch-limit")
        try:
            obs = _HintObserver(self)
            handler = _HintHandler(self)
            for s in self.sites:
                for r in s.roots:
                    obs.schedule(handler, _root_dir(r), recursive=True, event_filter=_EVENTS)
            obs.start()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
                self.lost_events("watch-limit")
            else:
                log.warning("cannot watch the recording roots (%s); relying on rescans", exc)
                try:
                    self.on_overflow()
                except Exception:
                    log.exception("overflow callback failed")
            return False
        self._observer = obs
        return True

    def stop(self) -> None:
        """Stop watching and let the hint worker finish."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        if self._worker is not None:
            self._q.put(None)
            self._worker.join(timeout=10)
            self._worker = None

    def _work(self) -> None:
        while True:
            item = self._q.get()
            batch = [item]
            # a burst (a directory moved in) arrives as many events: drain, dedupe, keep order
            while True:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            seen: set[bytes] = set()
            for p in batch:
                if p is None:
                    return
                if p in seen:
                    continue
                seen.add(p)
                try:
                    self.scanner.hint(p)
                except Exception:
                    log.exception("hint for %r failed; the next rescan will catch up", p)
                self.processed += 1


def _root_dir(root: bytes) -> str:
    """A root as watchdog schedules it: text, without trailing slashes."""
    return os.fsdecode(root).rstrip("/") or "/"


_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileMovedEvent,
    DirMovedEvent,
    DirCreatedEvent,
]


class _HintHandler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        # the event filter already limits what arrives; checked again in case a watchdog
        # version ignores it
        if isinstance(event, FileClosedEvent) or (
            isinstance(event, DirCreatedEvent) and event.is_directory
        ):
            self.watcher.put(os.fsencode(event.src_path))
        elif isinstance(event, (FileMovedEvent, DirMovedEvent)):
            # the full emitter reports moves in from / out of the tree with an empty side
            if event.src_path:
                self.watcher.put(os.fsencode(event.src_path))
            if event.dest_path:
                self.watcher.put(os.fsencode(event.dest_path))


class _FdGuard:
    """Wraps watchdog's inotify fd: reports ENOSPC (watch limit) when adding a watch.

    watchdog logs and skips a subdirectory it cannot watch; we need to know, because footage
    in that directory would then only be found by the rescans.
    """

    def __init__(self, fd: InotifyFD, watcher: Watcher) -> None:
        self._fd = fd
        self._watcher = watcher
        self._reported = False

    def add_callback(self, *args: object, **kwargs: object) -> object:
        try:
            return self._fd.add_callback(*args, **kwargs)  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not self._reported:
                self._reported = True  # once per emitter: the log would drown otherwise
                self._watcher.lost_events("watch-limit")
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._fd, name)


class _Emitter(InotifyFullEmitter):
    """The full emitter (moves in from outside the tree arrive as moves with an empty source)
    whose watch group tells the watcher about queue overflows."""

    watcher: Watcher  # set on the subclass built per observer

    def on_thread_start(self) -> None:
        path = os.fsencode(self.watch.path)
        watcher = self.watcher
        fd = _FdGuard(self._inotify_fd, watcher)

        class Group(InotifyWatchGroup):
            def on_queue_overflow(self) -> None:
                super().on_queue_overflow()
                watcher.lost_events("queue-overflow")

        self._inotify = Group(
            fd,  # type: ignore[arg-type]
            path,
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=False,
        )


class _HintObserver(BaseObserver):
    """An inotify observer with :class:`_Emitter` (watchdog's own, plus overflow reporting)."""

    def __init__(self, watcher: Watcher) -> None:
        self.inotify_fd = InotifyFD()
        self.inotify_fd.start()
        emitter = type("_BoundEmitter", (_Emitter,), {"watcher": watcher})
        super().__init__(emitter, inotify_fd=self.inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.inotify_fd.stop()
        self.inotify_fd.join()
