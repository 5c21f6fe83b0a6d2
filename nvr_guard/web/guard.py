"""The console's HTTP connections, held to deadlines: a client that connects and then says
nothing (or trickles a header a byte at a time) must not hold one of the server's connections
for ever, or a few hundred of them keep everyone else out.

uvicorn's h11 protocol times out only an idle connection *after* a response; this subclass adds:

* a header deadline: the request line and headers must have arrived within
  ``HEADER_TIMEOUT`` seconds of the connection opening (or of the previous response ending,
  on a kept-alive connection);
* a body deadline: a request body must have arrived within ``BODY_TIMEOUT`` of its headers
  (a form is a few kilobytes); the response itself (a clip being watched) has no deadline;
* a cap per client address (``per_client``; 0 = none), so one host cannot take the whole
  connection limit. Off for a console on loopback, where every connection comes through the
  reverse proxy on the same host: the proxy limits its clients itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
PER_CLIENT = 64


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with header and body deadlines and a per-address connection cap."""

    per_client: ClassVar[int] = PER_CLIENT
    header_timeout: ClassVar[float] = HEADER_TIMEOUT
    body_timeout: ClassVar[float] = BODY_TIMEOUT
    _open: ClassVar[dict[str, int]] = {}  # client address -> connections open (one event loop)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._counted: str | None = None

    # -- the deadline --------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # still waiting for the request (IDLE: its headers; SEND_BODY: its body): cut off
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            log.info("closing a connection from %s: request not received in time", self._who())
            self.transport.close()

    def _who(self) -> str:
        return str(self.client[0]) if self.client else "-"

    # -- the protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        who = self._who()
        if self.per_client:
            held = self._open.get(who, 0)
            if held >= self.per_client:
                log.warning("refusing a connection from %s: %d already open", who, held)
                transport.close()
                return
            self._open[who] = held + 1
            self._counted = who
        self._arm(self.header_timeout)

    def handle_events(self) -> None:
        before = self.conn.their_state
        super().handle_events()
        after = self.conn.their_state
        if after is h11.SEND_BODY and before is not h11.SEND_BODY:
            self._arm(self.body_timeout)  # headers in: the body has its own deadline
        elif after is h11.DONE:
            self._disarm()  # the whole request is in; answering it has no deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout)  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted is not None:
            left = self._open.get(self._counted, 1) - 1
            if left > 0:
                self._open[self._counted] = left
            else:
                self._open.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)
