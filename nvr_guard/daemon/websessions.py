"""Web console sessions and the login lockout, kept by the daemon (in memory).

The daemon, not the web process, is the authority on who is logged in: a session is opened only
when the password-checking helper (``web.auth_user``) reports a successful PAM check, and the
gateway (``web.gateway_user``) can act only through a session it was handed. A compromised web
process therefore acts for nobody who does not log in while it is compromised.

* Tokens are 256-bit random (``secrets``); the table is keyed by their SHA-256 digest, so a
  lookup takes no time that depends on how much of a guess was right, and the digest (never the
  token) is what logs and audit entries name.
* A session ends after ``idle`` seconds without a request and ``limit`` seconds after it opened,
  however busy; at logout; and when the daemon restarts (people log in again).
* Failed logins are counted per user name and per client address. ``max_failures`` within the
  ``lockout`` window locks that name (from every address) and that address (for every name)
  until ``lockout`` has passed since the last failure. A locked name or address is refused
  before PAM runs, so a lockout is not a password oracle. A success clears the name's count and
  the address's.

The table is bounded: at most ``MAX_SESSIONS`` open sessions (the oldest idle one goes first)
and ``MAX_TRACKED`` names/addresses with failures (the oldest count is forgotten first).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_SESSIONS = 10_000
MAX_TRACKED = 50_000


@dataclass
class Session:
    """One logged-in person."""

    user: str
    client: str
    opened: float
    last: float
    csrf: str
    sid: str  # the token's SHA-256, hex: the session's name inside the daemon


@dataclass
class _Failures:
    count: int
    last: float


class WebSessions:
    """Open sessions and failure counts; thread-safe; ``clock`` is monotonic seconds."""

    def __init__(
        self,
        *,
        idle: float,
        limit: float,
        max_failures: int,
        lockout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.limit = limit
        self.max_failures = max_failures
        self.lockout = lockout
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # digest -> session
        self._users: OrderedDict[str, _Failures] = OrderedDict()
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        # (user, client) -> [when its refusal was last recorded, refusals since not recorded]
        self._refusals: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def configure(self, *, idle: float, limit: float, max_failures: int, lockout: float) -> None:
        """New limits after a reload (open sessions are judged by them from now on)."""
        with self._lock:
            self.idle, self.limit = idle, limit
            self.max_failures, self.lockout = max_failures, lockout

    # -- sessions ------------------------------------------------------------------------------

    def open(self, user: str, client: str) -> tuple[str, Session]:
        """A new session for ``user``: (its token, the session)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        digest = hashlib.sha256(token.encode()).hexdigest()
        s = Session(user, client, now, now, secrets.token_urlsafe(32), digest)
        with self._lock:
            self._sessions[digest] = s
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return token, s

    def resolve(self, token: str, touch: bool = True) -> Session | None:
        """The live session of ``token`` (its idle timer restarted when ``touch``), or None."""
        return self.get(hashlib.sha256(token.encode()).hexdigest(), touch)

    def get(self, digest: str, touch: bool = False) -> Session | None:
        """The live session named ``digest`` (see :meth:`resolve`), or None."""
        now = self.clock()
        with self._lock:
            s = self._sessions.get(digest)
            if s is None:
                return None
            if now - s.last > self.idle or now - s.opened > self.limit:
                del self._sessions[digest]
                return None
            if touch:
                s.last = now
                self._sessions.move_to_end(digest)
            return s

    def expires_in(self, s: Session) -> float:
        """Seconds until ``s`` ends if left idle from now."""
        now = self.clock()
        return max(0.0, min(s.last + self.idle, s.opened + self.limit) - now)

    def close(self, token: str) -> Session | None:
        """End the session of ``token``; the session it was, if any."""
        return self.close_digest(hashlib.sha256(token.encode()).hexdigest())

    def close_digest(self, digest: str) -> Session | None:
        """End the session named ``digest``; the session it was, if any."""
        with self._lock:
            return self._sessions.pop(digest, None)

    def close_user(self, user: str) -> int:
        """End every session of ``user`` (an account removed, a role revoked); how many."""
        with self._lock:
            gone = [d for d, s in self._sessions.items() if s.user == user]
            for d in gone:
                del self._sessions[d]
        return len(gone)

    def count(self) -> int:
        """Open sessions (expired ones still in the table are not counted)."""
        now = self.clock()
        with self._lock:
            return sum(
                1
                for s in self._sessions.values()
                if now - s.last <= self.idle and now - s.opened <= self.limit
            )

    # -- lockout -------------------------------------------------------------------------------

    def _locked_for(self, table: OrderedDict[str, _Failures], key: str, now: float) -> float:
        f = table.get(key)
        if f is None:
            return 0.0
        if now - f.last >= self.lockout:
            del table[key]  # the window has passed: the count starts again
            return 0.0
        if f.count >= self.max_failures:
            return f.last + self.lockout - now
        return 0.0

    def locked(self, user: str, client: str) -> tuple[str, float] | None:
        """(``"user"`` or ``"client"``, seconds left) when a login must be refused unchecked."""
        now = self.clock()
        with self._lock:
            left = self._locked_for(self._users, user, now)
            if left > 0:
                return "user", left
            left = self._locked_for(self._clients, client, now)
            if left > 0:
                return "client", left
        return None

    def failed(self, user: str, client: str) -> bool:
        """Count a failed login; True when it locks the name or the address."""
        now = self.clock()
        with self._lock:
            locked = False
            for table, key in ((self._users, user), (self._clients, client)):
                self._locked_for(table, key, now)  # drop a stale count first
                f = table.get(key)
                if f is None:
                    f = table[key] = _Failures(0, now)
                f.count += 1
                f.last = now
                table.move_to_end(key)
                locked = locked or f.count >= self.max_failures
                while len(table) > MAX_TRACKED:
                    table.popitem(last=False)
        return locked

    def refusal_to_record(self, user: str, client: str, every: float = 60.0) -> int | None:
        """A login refused unchecked (locked): the number of such refusals of this name from
        this address to record now (this one and those not recorded since), or None while one
        was recorded less than ``every`` seconds ago (this one is counted for the next). A
        client hammering a locked login cannot flood the audit log."""
        now = self.clock()
        key = (user, client)
        with self._lock:
            entry = self._refusals.get(key)
            if entry is not None and now - entry[0] < every:
                entry[1] += 1
                return None
            count = 1 + (int(entry[1]) if entry is not None else 0)
            self._refusals[key] = [now, 0.0]
            self._refusals.move_to_end(key)
            while len(self._refusals) > MAX_TRACKED:
                self._refusals.popitem(last=False)
            return count

    def succeeded(self, user: str, client: str) -> None:
        """A login worked: the name's and the address's counts start again."""
        with self._lock:
            self._users.pop(user, None)
            self._clients.pop(client, None)
