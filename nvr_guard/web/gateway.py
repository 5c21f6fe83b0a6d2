"""The web console's way to the daemon: control-socket calls on behalf of logged-in people.

Each call is one short connection (as the CLI makes them). At most ``parallel`` calls are in
flight at once, below the daemon's share for the console's account (a third of its
connections: 21 of 64), so the console's own connections never crowd each other out; a page
waits for a slot rather than failing. Enough of them that the pages the daemon answers at once
(what it has kept) are not held up behind a few that wait for a sweep to finish.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvr_guard.wire import ControlClient


class Gateway:
    """Calls into the daemon for the console (``session``: the person's token)."""

    def __init__(self, socket: Path | str, *, timeout: float = 30.0, parallel: int = 16) -> None:
        self.socket = Path(socket)
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(parallel)

    def call(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        session: str | None = None,
        client: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``cmd``: as the gateway itself, or for the person of ``session``."""
        behalf = None if session is None else {"session": session, "client": client or "-"}
        with self._slots, ControlClient(self.socket, timeout or self.timeout) as c:
            return c.call(cmd, args, on_behalf=behalf)

    def call_with_fds(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        session: str,
        client: str,
        timeout: float | None = None,
    ) -> tuple[Any, list[int]]:
        """Like :meth:`call`, for a command that hands over open files (a clip to watch)."""
        behalf = {"session": session, "client": client}
        with self._slots, ControlClient(self.socket, timeout or self.timeout) as c:
            fn = getattr(c, "call_with_fds", None)
            if fn is None:  # pragma: no cover - the daemon side ships with the console
                raise RuntimeError("this nvr-guard has no file-passing control calls")
            result: tuple[Any, list[int]] = fn(cmd, args, on_behalf=behalf)
            return result
