"""Who may act on the state right now: the daemon, or a root command acting locally.

A flock rather than a pid file: the kernel drops it with its holder (kill -9 included), so a stale
file can never keep the daemon from starting, nor let a local command act beside a live daemon.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from nvr_guard.errors import RuntimeFailure

STATE_LOCK = "state.lock"


class StateLock:
    """A flock on ``state_dir/state.lock``: who may act on the state right now.

    The daemon holds it exclusively for its whole life; a root command acting locally (no daemon
    answered) holds it shared while it acts. So a local command acts only when no daemon holds the
    state at all, never because the daemon was busy or slow to answer, and a daemon never starts
    under a local command (or a second daemon) that is changing the state. The kernel drops the
    lock with its holder, kill -9 included. ``retention plan`` works on a scratch copy and needs
    no lock.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_LOCK
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            flags = os.O_CREAT | os.O_CLOEXEC
            try:
                self._fd = os.open(self.path, os.O_RDWR | flags, 0o644)
            except PermissionError:  # made by another user: a flock needs no write access
                self._fd = os.open(self.path, os.O_RDONLY | flags)
        return self._fd

    def _try(self, how: int) -> bool:
        try:
            fcntl.flock(self._open(), how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def try_shared(self) -> bool:
        """For a local command: False when a daemon holds the state."""
        return self._try(fcntl.LOCK_SH)

    def holder(self) -> str:
        """What the daemon wrote into the lock file (its pid), for messages."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "another process"

    def acquire_for_daemon(self, wait: float, waiting: Callable[[], None]) -> None:
        """Hold the state exclusively. Refuses at once when another daemon holds it; waits up to
        ``wait`` seconds for local commands (shared holders) to finish, calling ``waiting`` once
        when it has to wait."""
        if not self.try_shared():  # an exclusive holder: another daemon
            self.close()
            raise RuntimeFailure(
                f"another nvr-guard daemon ({self.holder()}) holds {self.state_dir}; "
                "one daemon per state_dir (check `systemctl status nvr-guard`)"
            )
        deadline = time.monotonic() + wait
        told = False
        while not self._try(fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeFailure(
                    f"{self.state_dir} is still in use by a local nvr-guard command or another "
                    f"daemon after {wait:g} s; not starting (see `fuser -v {self.path}`)"
                )
            if not told:
                waiting()
                told = True
            time.sleep(0.1)
        try:
            fd = self._open()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # opened read-only: the pid only makes messages nicer
            pass

    def close(self) -> None:
        """Drop the lock (and its file descriptor)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
