"""The control socket between the ``nvr-guard`` CLI and the daemon.

Wire format (version 1), on an AF_UNIX stream socket:

* every message is a *frame*: a 4-byte big-endian unsigned length, then that many bytes of UTF-8
  JSON holding one object;
* the client sends a request ``{"v": 1, "cmd": "status", "args": {...}}`` and reads exactly one
  reply frame; it may send further requests on the same connection (replies come in order), or
  close it — the CLI makes one call per connection;
* a reply is ``{"ok": true, "result": ...}`` or
  ``{"ok": false, "error": {"code": 3, "type": "PolicyRefused", "message": "..."}}`` where
  ``code`` is the exit code the CLI should end with and ``type`` the error class name.

Limits, so one misbehaving client cannot hurt the daemon or the other callers:

* a request frame may be at most 64 KiB; a larger announced length gets an error reply and the
  connection is closed without reading the body (a reply may be larger: ``audit show`` can be);
* a request must arrive completely within ``read_timeout`` seconds (default 5) of the server
  starting to wait for it, else the connection is dropped (with an error reply when part of a
  request had arrived) — a stalled client holds a thread for at most that long;
* at most ``max_connections`` connections (default 64) are served at once; the next one gets a
  "busy" reply at once and is closed;
* identity is checked when a connection is accepted, before it takes a slot: a caller the
  ``admit`` hook refuses (a socket-group member with no role) gets one refusal reply and is
  closed at once, so idle connections of role-less users cannot crowd out the people who act;
* one uid holds at most ``max_per_uid`` connections (default 8; root is exempt), so a role
  holder flooding the socket leaves the other slots to everyone else.

Every refusal (a refused connection, a malformed frame, an unknown command, a policy refusal, bad
arguments) goes to the ``on_refusal`` hook — the daemon writes it to the audit log. A flood
cannot flood the log: per uid, at most ``refusal_burst`` refusals are recorded in each
``refusal_window`` seconds; the rest are counted and the count is recorded as one entry when the
window ends (``suppressed``), so guessing ids or hammering the socket always leaves a trace.

Who is calling comes from the kernel (SO_PEERCRED: pid, uid, gid at connect time), never from
the request: a user cannot claim to be someone else. The socket's mode (0660, group
``socket_group``) is only the first fence; each command names the roles it needs and the daemon
maps the caller's user and Unix groups to roles (the config's ``people``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import grp
import json
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nvr_guard.errors import (
    InvalidInput,
    NvrGuardError,
    PolicyRefused,
    RuntimeFailure,
)
from nvr_guard.identity import Caller
from nvr_guard.wire import (
    MAX_FDS,
    MAX_REQUEST,
    PROTOCOL_VERSION,
    Closed,
    Oversized,
    Timeout,
    encode,
    json_default,
    read_frame,
)

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_PER_UID = 8
DEFAULT_REFUSAL_BURST = 20
DEFAULT_REFUSAL_WINDOW = 60.0

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

# ----------------------------------------------------------------------------------------------
# Messages


class OnBehalf(BaseModel):
    """A gateway's request to act for a person: the session the password check opened for
    them, and the address they connect from (recorded, not trusted for anything)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session: str = Field(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    client: str = Field(min_length=1, max_length=64, pattern=r"^[0-9A-Fa-f.:\[\]a-z%_-]+$")


class Request(BaseModel):
    """One request frame. ``extra="forbid"``: a typo in a field name is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1]
    cmd: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")
    args: dict[str, Any] = Field(default_factory=dict)
    on_behalf: OnBehalf | None = None


class UnknownCommand(InvalidInput):
    """The daemon has no such command (exit 2)."""


class WithFds:
    """A command's result together with open file descriptors for the caller: the reply frame
    carries them (SCM_RIGHTS) and the server closes its own copies once it is sent, or when it
    cannot be sent. What the caller receives is an open file, never a path: a viewing clip is
    read through it without anyone being able to open the file by name."""

    __slots__ = ("result", "fds")

    def __init__(self, result: Any, fds: Iterable[int]) -> None:
        self.result = result
        self.fds = list(fds)
        if len(self.fds) > MAX_FDS:
            self.close()
            raise ValueError(f"at most {MAX_FDS} descriptors per reply")

    def close(self) -> None:
        """Close the descriptors (the server's copies)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


# ----------------------------------------------------------------------------------------------
# Framing: the server's encoding (the frames themselves are nvr_guard.wire's)


def _server_types(value: Any) -> tuple[bool, Any]:
    if isinstance(value, WithFds):
        return True, value.result
    if isinstance(value, BaseModel):
        return True, value.model_dump(mode="json")
    return False, None


def _json_default(value: Any) -> Any:
    """Encode the types handlers naturally return, so they need not convert by hand."""
    return json_default(value, _server_types)


def _encode(obj: Mapping[str, Any]) -> bytes:
    return encode(obj, _json_default)


def _error_reply(code: int, message: str, type_name: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "type": type_name, "message": message}}


def _describe_validation(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "(request)"
        parts.append(f"{prefix}{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Server

Handler = Callable[[Caller, str, dict[str, Any]], Any]
CommandFunc = Callable[[Caller, Any], Any]
RoleResolver = Callable[[Caller], Iterable[str]]
#: admit(caller) -> None to serve the connection, or the refusal message (exit 3)
Admission = Callable[[Caller], "str | None"]
# the person a gateway acts for: (peer, on_behalf) -> that person, or PolicyRefused
Behalf = Callable[[Caller, OnBehalf], Caller]
#: on_refusal(caller, details) where details has cmd, code, message (and suppressed counts)
RefusalHook = Callable[[Caller, dict[str, Any]], None]


class RefusalLimiter:
    """Per-uid rate limit for recording refusals: ``burst`` per ``window`` seconds are passed
    on; the rest are counted and passed on as one summary when that uid's window ends."""

    def __init__(
        self,
        hook: RefusalHook,
        burst: int = DEFAULT_REFUSAL_BURST,
        window: float = DEFAULT_REFUSAL_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hook, self.burst, self.window, self.clock = hook, burst, window, clock
        self._lock = threading.Lock()
        # uid -> [window start, recorded in window, suppressed in window, last caller]
        self._state: dict[int, list[Any]] = {}

    def note(self, caller: Caller, details: dict[str, Any]) -> None:
        """Count one refusal of ``caller``: recorded singly within the burst, else summarised."""
        now = self.clock()
        summary: tuple[Caller, int] | None = None
        with self._lock:
            st = self._state.get(caller.uid)
            if st is not None and now - st[0] >= self.window:
                if st[2]:
                    summary = (st[3], st[2])
                st = None
            if st is None:
                st = self._state[caller.uid] = [now, 0, 0, caller]
            st[3] = caller
            record = st[1] < self.burst
            if record:
                st[1] += 1
            else:
                st[2] += 1
        if summary is not None:
            self._emit_summary(*summary)
        if record:
            self._call(caller, details)

    def flush(self, force: bool = False) -> None:
        """Record the suppressed counts of every window that has ended (all when ``force``)."""
        now = self.clock()
        due: list[tuple[Caller, int]] = []
        with self._lock:
            for uid, st in list(self._state.items()):
                if force or now - st[0] >= self.window:
                    if st[2]:
                        due.append((st[3], st[2]))
                    del self._state[uid]
        for caller, count in due:
            self._emit_summary(caller, count)

    def _emit_summary(self, caller: Caller, count: int) -> None:
        self._call(
            caller,
            {
                "cmd": None,
                "code": None,
                "message": f"{count} further refusals of uid {caller.uid} not recorded singly "
                f"(more than {self.burst} in {self.window:g} s)",
                "suppressed": count,
            },
        )

    def _call(self, caller: Caller, details: dict[str, Any]) -> None:
        try:
            self.hook(caller, details)
        except Exception:  # recording must never take the socket down
            log.exception("control: recording a refusal of %s failed", caller.describe())


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    name: str
    func: CommandFunc
    args_model: type[BaseModel] | None
    roles: frozenset[str] | None  # None: anyone who can reach the socket


class ControlServer:
    """Serves the control socket in threads. ``start()`` binds and returns; ``stop()`` undoes it.

    Commands come from the table filled by :meth:`register`; a request for a name that is not in
    the table goes to ``handler`` when one was given, else is refused with exit code 2. The server
    itself serves only ``ping`` this way; the daemon hands every other command to its ``handler``,
    which dispatches from the one command table (``nvr_guard.daemon.commands``).
    """

    def __init__(
        self,
        path: Path,
        group: str | None,
        handler: Handler | None = None,
        *,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        write_timeout: float = DEFAULT_READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_request: int = MAX_REQUEST,
        roles_of: RoleResolver | None = None,
        admit: Admission | None = None,
        max_per_uid: int = DEFAULT_MAX_PER_UID,
        on_refusal: RefusalHook | None = None,
        refusal_burst: int = DEFAULT_REFUSAL_BURST,
        refusal_window: float = DEFAULT_REFUSAL_WINDOW,
        behalf: Behalf | None = None,
        exempt: Callable[[Caller], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.behalf = behalf
        # peers besides root held to a third of max_connections instead of max_per_uid: the web
        # console's accounts, which serve many people each
        self.exempt = exempt
        self.group = group
        self.handler = handler
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.max_request = max_request
        self.roles_of = roles_of
        self.admit = admit
        self.max_per_uid = max_per_uid
        self.refusals = (
            RefusalLimiter(on_refusal, refusal_burst, refusal_window) if on_refusal else None
        )
        self._per_uid: dict[int, int] = {}
        self._lingering: dict[socket.socket, float] = {}  # refused, half-closed -> deadline
        # admitted, no request yet -> (caller, deadline); served by a thread once readable
        self._waiting: dict[socket.socket, tuple[Caller, float]] = {}
        self._linger_sel: selectors.BaseSelector | None = None
        self._commands: dict[str, Command] = {}
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.register("ping", self._ping, None, None)

    # -- command table ---------------------------------------------------------------------

    def register(
        self,
        name: str,
        func: CommandFunc,
        args_model: type[BaseModel] | None = None,
        roles: set[str] | frozenset[str] | None = None,
    ) -> None:
        """Add a command. ``func(caller, args)`` gets an ``args_model`` instance (or the raw dict
        when no model is given) and returns a JSON-serialisable result. ``roles``: the caller
        needs at least one of them (None: no role needed)."""
        if name in self._commands and name != "ping":
            raise ValueError(f"control command {name!r} registered twice")
        self._commands[name] = Command(
            name, func, args_model, None if roles is None else frozenset(roles)
        )

    @property
    def commands(self) -> list[str]:
        """The names of the commands the server answers itself."""
        return sorted(self._commands)

    @staticmethod
    def _ping(caller: Caller, args: Any) -> dict[str, Any]:
        from nvr_guard import __version__

        return {
            "pong": True,
            "user": caller.user,
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (owner and group as configured) and start accepting connections."""
        if self._listener is not None:
            raise RuntimeError("control server already started")
        self._stopping.clear()
        self._listener = self._bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(
            target=self._accept_loop, name="control-accept", daemon=True
        )
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def stop(self, timeout: float = 0.9) -> None:
        """Close the listener, drop open connections, unlink the socket. Returns within
        ``timeout`` seconds even if a handler is still busy (its reply is then lost)."""
        if self._listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            # shutdown() wakes a thread blocked in recv(); close() alone would not.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._unlink_if_ours()
        if self.refusals is not None:
            self.refusals.flush(force=True)
        log.info("control socket %s closed", self.path)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- binding ---------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        self._clear_stale()
        # Bind under a temporary name, set mode and group, then rename into place: the socket
        # is never reachable with the default (umask-derived) permissions, and no process-wide
        # umask juggling is needed in a threaded daemon.
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise RuntimeFailure(
                f"control socket path {self.path} is longer than the {_SUN_PATH_MAX} bytes a "
                f"Unix socket address can hold; choose a shorter 'socket' path"
            )
        # A short temporary name, so that it fits wherever the final path fits.
        tmp = self.path.with_name(f".{os.getpid()}~")
        if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
            tmp = self.path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(tmp).st_mode):
                os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(os.fsencode(tmp))
            os.chmod(tmp, 0o660)
            self._apply_group(tmp)
            if tmp != self.path:
                os.rename(tmp, self.path)
            # a short queue: a caller waits behind at most this many connections (each one is
            # cheap to turn away, but a flood keeps the queue full); a client finding it full
            # waits in the kernel for room (see ControlClient.connect)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if tmp != self.path:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise RuntimeFailure(f"cannot listen on control socket {self.path}: {exc}") from exc
        st = os.lstat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        return sock

    def _apply_group(self, where: Path) -> None:
        if not self.group:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.warning(
                "socket_group %r does not exist; control socket %s stays group %s — create "
                "the group (systemd-sysusers) so its members can use the CLI",
                self.group,
                self.path,
                os.getgid(),
            )
            return
        if os.lstat(where).st_gid == gid:
            # Under the shipped unit (Group=nvr-guard) the socket already has the group, and
            # chown is outside the daemon's system-call filter (@privileged): do not call it.
            return
        try:
            os.chown(where, -1, gid)
        except OSError as exc:
            log.warning(
                "cannot give control socket %s to group %s: %s (the daemon's user must be a "
                "member of it)",
                self.path,
                self.group,
                exc.strerror,
            )

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeFailure(
                f"{self.path} exists and is not a socket; refusing to replace it — "
                f"check the 'socket' setting"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fsencode(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a leftover of a crashed daemon
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise RuntimeFailure(
                    f"control socket {self.path} exists and cannot be probed: {exc}"
                ) from exc
        else:
            raise RuntimeFailure(
                f"another process is already listening on {self.path} "
                f"(is nvr-guard already running? `systemctl status nvr-guard`)"
            )
        finally:
            probe.close()
        log.info("removing stale control socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _unlink_if_ours(self) -> None:
        # Only remove the socket we created: a second daemon started meanwhile (by mistake) may
        # have replaced it, and deleting its socket would make it unreachable.
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if self._identity == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -- serving ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            self._linger_sel = sel
            try:
                while not self._stopping.is_set():
                    ready = sel.select(timeout=self._linger_timeout())
                    if self.refusals is not None:
                        self.refusals.flush()
                    for key, _ in ready:
                        if self._stopping.is_set():
                            break
                        if key.fileobj is listener:
                            self._accept_one(listener)
                        elif key.fileobj in self._waiting:
                            self._ready_to_read(key.fileobj)
                        elif key.fileobj is not self._wake_r:
                            self._drain_lingering(key.fileobj)  # type: ignore[arg-type]
                    self._expire_lingering()
                    self._expire_waiting()
            finally:
                for conn in list(self._lingering):
                    conn.close()
                self._lingering.clear()
                for conn, (caller, _) in list(self._waiting.items()):
                    self._release(conn, caller)
                self._waiting.clear()
                self._linger_sel = None

    def _accept_one(self, listener: socket.socket) -> None:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if self._stopping.is_set():
                return
            # EMFILE and friends: log, back off briefly, keep serving.
            log.error("control socket accept failed: %s", exc)
            self._stopping.wait(0.1)
            return
        self._dispatch(conn)

    # A refused connection is answered at once, then kept half-closed for up to LINGER seconds
    # while whatever the client sent is read and discarded: closing a Unix socket with unread
    # data resets it, and the client would lose the refusal it was sent. The accept thread does
    # this with non-blocking reads, so refusals never make it wait.
    LINGER = 1.0
    MAX_LINGERING = 256

    def _refuse_connection(
        self, conn: socket.socket, caller: Caller | None, code: int, message: str, kind: str
    ) -> None:
        if caller is not None:
            # "(connect)": not admitted (no role); "(busy)": no place for it now
            label = "(connect)" if kind == "PolicyRefused" else "(busy)"
            self._note_refusal(caller, label, code, message)
        conn.setblocking(False)
        try:
            conn.send(_encode(_error_reply(code, message, kind)))  # small: fits the buffer
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        sel = self._linger_sel
        if sel is None:
            conn.close()
            return
        while len(self._lingering) >= self.MAX_LINGERING:
            oldest = next(iter(self._lingering))
            self._close_lingering(oldest)
        self._lingering[conn] = time.monotonic() + self.LINGER
        sel.register(conn, selectors.EVENT_READ)

    def _drain_lingering(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_lingering(conn)

    def _close_lingering(self, conn: socket.socket) -> None:
        self._lingering.pop(conn, None)
        if self._linger_sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._linger_sel.unregister(conn)
        conn.close()

    def _expire_lingering(self) -> None:
        now = time.monotonic()
        for conn, deadline in list(self._lingering.items()):
            if deadline <= now:
                self._close_lingering(conn)

    def _linger_timeout(self) -> float:
        deadlines = list(self._lingering.values()) + [d for _, d in self._waiting.values()]
        if not deadlines:
            return 5.0
        return max(0.0, min(deadlines) - time.monotonic()) + 0.01

    def _note_refusal(self, caller: Caller, cmd: str | None, code: int, message: str) -> None:
        if self.refusals is not None:
            self.refusals.note(caller, {"cmd": cmd, "code": code, "message": message[:500]})

    def _dispatch(self, conn: socket.socket) -> None:
        # Who it is comes first, before the connection may take a slot.
        try:
            caller = Caller.of_socket(conn)
        except OSError as exc:
            log.warning("control connection without peer credentials dropped: %s", exc)
            conn.close()
            return
        if self.admit is not None:
            try:
                why = self.admit(caller)
            except Exception:
                log.exception("control: admission check for %s failed", caller.describe())
                why = "internal error while checking who is calling; see the daemon log"
            if why is not None:
                # the audit log has the (rate-limited) record; a flood must not flood the journal
                log.debug("control: %s refused at connect: %s", caller.describe(), why)
                self._refuse_connection(conn, caller, 3, why, "PolicyRefused")
                return
        with self._lock:
            held = self._per_uid.get(caller.uid, 0)
            # the console's accounts serve many people: a third of all slots each, not the
            # per-uid limit; never all of them (calls they gave up on may still be waiting in
            # the daemon, and the CLI's users must still get in)
            limit = (
                max(self.max_per_uid, self.max_connections // 3)
                if self.exempt is not None and self.exempt(caller)
                else self.max_per_uid
            )
            over = caller.uid != 0 and held >= limit
            if not over:
                self._per_uid[caller.uid] = held + 1
        if over:
            self._refuse_connection(
                conn,
                caller,
                1,
                f"daemon busy: uid {caller.uid} already has {held} control "
                f"connections open; close some and try again",
                "DaemonUnavailable",
            )
            return
        if not self._slots.acquire(blocking=False):
            self._uid_done(caller)
            # Refuse at once rather than queue: the CLI tells the user to retry, the daemon's
            # memory and thread count stay bounded.
            self._refuse_connection(
                conn,
                caller,
                1,
                f"daemon busy: {self.max_connections} control connections open; try again",
                "DaemonUnavailable",
            )
            return
        with self._lock:
            self._conns.add(conn)
        sel = self._linger_sel
        if sel is None:  # not in the accept loop (tests may call this directly)
            self._start_serving(conn, caller)
            return
        # No thread until the client has sent something: a connect-and-close flood is then
        # dealt with here for the cost of a poll, and an idle connection holds no thread.
        self._waiting[conn] = (caller, time.monotonic() + self.read_timeout)
        sel.register(conn, selectors.EVENT_READ)

    def _start_serving(self, conn: socket.socket, caller: Caller) -> None:
        thread = threading.Thread(
            target=self._serve_connection, args=(conn, caller), name="control-conn", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:
            self._release(conn, caller)
            raise

    def _ready_to_read(self, conn: socket.socket) -> None:
        caller, _ = self._waiting.pop(conn)
        if self._linger_sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._linger_sel.unregister(conn)
        try:
            first = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            first = b"?"  # spurious wake-up: let the serving thread wait for it
        except OSError:
            first = b""
        if not first:  # closed without a request
            self._release(conn, caller)
            return
        self._start_serving(conn, caller)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for conn, (caller, deadline) in list(self._waiting.items()):
            if deadline <= now:  # connected, sent nothing within read_timeout: dropped
                del self._waiting[conn]
                if self._linger_sel is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._linger_sel.unregister(conn)
                self._release(conn, caller)

    def _uid_done(self, caller: Caller) -> None:
        with self._lock:
            left = self._per_uid.get(caller.uid, 1) - 1
            if left > 0:
                self._per_uid[caller.uid] = left
            else:
                self._per_uid.pop(caller.uid, None)

    def _release(self, conn: socket.socket, caller: Caller) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.close()
        self._uid_done(caller)
        self._slots.release()

    def _serve_connection(self, conn: socket.socket, caller: Caller) -> None:
        _PEER.set(conn)  # this connection's own thread: caller_hung_up() asks about it
        try:
            while not self._stopping.is_set():
                deadline = time.monotonic() + self.read_timeout
                try:
                    frame = read_frame(conn, deadline, self.max_request)
                except Closed:
                    return
                except Timeout as exc:
                    if exc.partial:
                        self._note_refusal(
                            caller, None, 2, f"request not received within {self.read_timeout:g} s"
                        )
                        log.warning(
                            "control: %s did not send a complete request within %.1f s; dropped",
                            caller.describe(),
                            self.read_timeout,
                        )
                        self._send(
                            conn,
                            _error_reply(
                                2,
                                f"request not received within {self.read_timeout:g} s",
                                "InvalidInput",
                            ),
                        )
                    return
                except Oversized as exc:
                    self._note_refusal(
                        caller, None, 2, f"request of {exc.length} bytes exceeds the limit"
                    )
                    log.warning(
                        "control: %s announced a %d-byte request (limit %d); dropped",
                        caller.describe(),
                        exc.length,
                        self.max_request,
                    )
                    self._send(
                        conn,
                        _error_reply(
                            2,
                            f"request of {exc.length} bytes exceeds the limit of "
                            f"{self.max_request} bytes",
                            "InvalidInput",
                        ),
                    )
                    return
                except OSError:
                    return
                if _hung_up(conn):
                    # The caller gave up waiting (its timeout: this daemon was stopped or busy)
                    # and was told nothing happened; carrying the command out now would make a
                    # retry act twice (a second hold, a second approval).
                    log.warning(
                        "control: %s left before its request could be served; not carried out",
                        caller.describe(),
                    )
                    return
                reply, fds = self._handle_frame(caller, frame)
                if not self._send(conn, reply, fds):
                    return
        finally:
            self._release(conn, caller)

    def _send(
        self, conn: socket.socket, reply: Mapping[str, Any], fds: WithFds | None = None
    ) -> bool:
        """Send one reply frame; ``fds`` travel with its first bytes and are closed here
        whatever happens (sent: the caller has its own copies)."""
        try:
            try:
                data = _encode(reply)
            except (TypeError, ValueError) as exc:
                log.error("control: reply not serialisable: %s", exc)
                data = _encode(
                    _error_reply(1, "internal error: reply not serialisable", "Internal")
                )
                if fds is not None:
                    fds.close()
                    fds = None
            conn.settimeout(self.write_timeout)
            try:
                if fds is not None and fds.fds:
                    sent = socket.send_fds(conn, [data], fds.fds)
                    conn.sendall(data[sent:])
                else:
                    conn.sendall(data)
            except OSError:
                return False
            return True
        finally:
            if fds is not None:
                fds.close()

    def _handle_frame(self, caller: Caller, frame: bytes) -> tuple[dict[str, Any], WithFds | None]:
        raw: Any = None
        fds: WithFds | None = None
        try:
            raw = json.loads(frame)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            reply = _error_reply(2, f"malformed request: not JSON ({exc})", "InvalidInput")
        except RecursionError:  # e.g. 30,000 nested brackets: fits the size limit, not the stack
            reply = _error_reply(2, "malformed request: nested too deeply", "InvalidInput")
        else:
            reply, caller = self._answer(caller, raw)
            if isinstance(reply.get("result"), WithFds):
                fds = reply["result"]  # encoded as its result; its descriptors go beside it
        if not reply.get("ok"):
            cmd = raw.get("cmd") if isinstance(raw, dict) else None
            err = reply.get("error") or {}
            self._note_refusal(
                caller,
                cmd[:64] if isinstance(cmd, str) else None,
                int(err.get("code", 1)),
                str(err.get("message", "")),
            )
        return reply, fds

    def _answer(self, caller: Caller, raw: Any) -> tuple[dict[str, Any], Caller]:
        """The reply to one request frame, already decoded from JSON, and who it was for: the
        peer, or the person a gateway acted for (whose refusals are on record as theirs)."""
        if isinstance(raw, dict) and raw.get("v") not in (None, PROTOCOL_VERSION):
            return _error_reply(
                2,
                f"protocol version {raw.get('v')!r} not supported (daemon speaks "
                f"{PROTOCOL_VERSION}); use the nvr-guard CLI of the same version",
                "InvalidInput",
            ), caller
        try:
            request = Request.model_validate(raw)
        except ValidationError as exc:
            return _error_reply(
                2, "malformed request: " + _describe_validation(exc, ""), "InvalidInput"
            ), caller
        started = time.monotonic()
        try:
            if request.on_behalf is not None:
                if self.behalf is None:
                    raise PolicyRefused("this server does not act on behalf of anyone")
                caller = self.behalf(caller, request.on_behalf)
            result = self._run(caller, request)
        except NvrGuardError as exc:
            log.info(
                "control: %s %s -> refused (%d): %s",
                caller.describe(),
                request.cmd,
                exc.exit_code,
                exc,
            )
            return _error_reply(exc.exit_code, str(exc), type(exc).__name__), caller
        except Exception:
            # A bug in one command must not take the daemon (or other callers) down.
            log.exception("control: command %s from %s failed", request.cmd, caller.describe())
            return _error_reply(
                1,
                f"internal error in command {request.cmd!r}; see the daemon log "
                f"(journalctl -u nvr-guard)",
                "RuntimeFailure",
            ), caller
        log.debug(
            "control: %s %s -> ok (%.1f ms)",
            caller.describe(),
            request.cmd,
            (time.monotonic() - started) * 1000,
        )
        reply = {"ok": True, "result": result}
        try:
            # Serialise here, inside the error handling: a handler returning something JSON
            # cannot carry is a bug of that handler, reported like any other.
            json.dumps(reply, default=_json_default)
        except (TypeError, ValueError):
            log.exception("control: result of %s is not JSON serialisable", request.cmd)
            if isinstance(result, WithFds):
                result.close()
            return _error_reply(
                1, f"internal error in command {request.cmd!r}: bad result", "RuntimeFailure"
            ), caller
        return reply, caller

    def _run(self, caller: Caller, request: Request) -> Any:
        command = self._commands.get(request.cmd)
        if command is None:
            if self.handler is not None:
                return self.handler(caller, request.cmd, request.args)
            raise UnknownCommand(
                f"unknown command {request.cmd!r}; the daemon knows: {', '.join(self.commands)}"
            )
        if command.roles is not None:
            have = set(self.roles_of(caller)) if self.roles_of is not None else set()
            if not have & command.roles:
                raise PolicyRefused(
                    f"{caller.name} may not run {request.cmd!r}: it needs one of the roles "
                    f"{', '.join(sorted(command.roles))} (config: people)"
                )
        args: Any = request.args
        if command.args_model is not None:
            try:
                args = command.args_model.model_validate(request.args)
            except ValidationError as exc:
                raise InvalidInput(
                    f"{request.cmd}: " + _describe_validation(exc, "args.")
                ) from None
        return command.func(caller, args)


# ----------------------------------------------------------------------------------------------
# Client

# The connection a command handler answers (set in its thread): caller_hung_up() looks at it.
_PEER: contextvars.ContextVar[socket.socket | None] = contextvars.ContextVar(
    "nvr_guard_control_peer", default=None
)


def caller_hung_up() -> bool:
    """In a command handler: whether its caller has closed the connection and will read no
    reply (Ctrl-C, a dropped SSH session). False outside a served connection."""
    conn = _PEER.get()
    if conn is None:
        return False
    try:
        return _hung_up(conn)
    except (OSError, ValueError):  # closed under us: gone as well
        return True


def _hung_up(conn: socket.socket) -> bool:
    """Whether the peer has closed its socket (it will read no reply). A peer that only shut
    down its sending side after the request (socat does on end of input) still waits for the
    reply: on a Unix socket that is POLLRDHUP alone, a full close is POLLHUP."""
    poller = select.poll()
    poller.register(conn, select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))
