"""The control socket's wire format, and its client: what the CLI, the web console and the
password helper need to talk to the daemon, without the server (``nvr_guard.daemon.control``) and
the validation models it loads. A ``status`` from the shell imports this module only.

The format itself is described in ``nvr_guard.daemon.control``: 4-byte big-endian length frames
of UTF-8 JSON, one reply per request.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import datetime as _dt
import enum
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any

from nvr_guard import errors
from nvr_guard.errors import (
    DaemonUnavailable,
    InvalidInput,
    NvrGuardError,
    PolicyRefused,
    RuntimeFailure,
    VerifyFailed,
)

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
#: Replies carry listings (audit entries, plans with every item); the client still caps them so a
#: confused peer cannot make the CLI allocate without bound.
MAX_REPLY = 64 * 1024 * 1024
#: at most this many descriptors travel with one reply (a client takes no more)
MAX_FDS = 4
HEADER = struct.Struct(">I")


class Oversized(Exception):
    def __init__(self, length: int):
        super().__init__(length)
        self.length = length


class Timeout(Exception):
    def __init__(self, partial: bool):
        super().__init__(partial)
        self.partial = partial


class Closed(Exception):
    def __init__(self, partial: bool):
        super().__init__(partial)
        self.partial = partial


def recv_exact(
    sock: socket.socket, n: int, deadline: float, got_before: bool, fds: list[int] | None = None
) -> bytes:
    """``n`` bytes; with ``fds``, descriptors that come with them are appended to it (at most
    MAX_FDS in all: a reply with more, or cut short, is refused after closing what arrived)."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(got_before or bool(buf))
        sock.settimeout(remaining)
        try:
            if fds is None:
                chunk = sock.recv(min(n - len(buf), 1 << 20))
            else:
                chunk = _recv_with_fds(sock, min(n - len(buf), 1 << 20), fds)
        except TimeoutError:
            raise Timeout(got_before or bool(buf)) from None
        if not chunk:
            raise Closed(got_before or bool(buf))
        buf += chunk
    return bytes(buf)


_FD = array.array("i").itemsize


def _recv_with_fds(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    # recvmsg itself, not socket.recv_fds: that one drops its flags argument, and descriptors
    # must arrive close-on-exec (an ffmpeg started meanwhile must not inherit them)
    room = max(MAX_FDS - len(fds), 1)
    data, ancdata, flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE(room * _FD), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % _FD])
            fds.extend(got)
    if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
        # more descriptors than any reply carries: the kernel closed what did not fit
        raise TooManyFds()
    return data


class TooManyFds(Exception):
    pass


def read_frame(
    sock: socket.socket, deadline: float, limit: int, fds: list[int] | None = None
) -> bytes:
    header = recv_exact(sock, HEADER.size, deadline, got_before=False, fds=fds)
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise Oversized(length)
    return recv_exact(sock, length, deadline, got_before=True, fds=fds)


def json_default(value: Any, more: Callable[[Any], Any] | None = None) -> Any:
    """Encode the types handlers naturally return, so they need not convert by hand; ``more``
    is tried first (the server adds its own types)."""
    if more is not None:
        done, encoded = more(value)
        if done:
            return encoded
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, bytes):
        # Segment paths are bytes and may not be UTF-8; surrogateescape keeps them lossless
        # through json (encoded as \\udcXX escapes), os.fsencode() on the client restores them.
        return os.fsdecode(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode(obj: Mapping[str, Any], default: Callable[[Any], Any] = json_default) -> bytes:
    """One frame: the length, then the JSON."""
    body = json.dumps(obj, default=default, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def _reply_parts(reply: Any) -> tuple[bool, Any, tuple[int, str, str | None] | None]:
    """(ok, result, (code, message, type) of the error) of a reply; ValueError when it is not
    one. Unknown fields are ignored: a newer daemon may add some, an older CLI must still work."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ValueError("not a reply object with a boolean 'ok'")
    body = reply.get("error")
    if body is None:
        return reply["ok"], reply.get("result"), None
    if not isinstance(body, dict):
        raise ValueError("'error' is not an object")
    code, message, kind = body.get("code"), body.get("message"), body.get("type")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        raise ValueError("'error' lacks an integer 'code' and a 'message'")
    if kind is not None and not isinstance(kind, str):
        raise ValueError("'error.type' is not a string")
    return reply["ok"], reply.get("result"), (code, message, kind)


_BY_CODE: dict[int, type[NvrGuardError]] = {
    1: RuntimeFailure,
    2: InvalidInput,
    3: PolicyRefused,
    4: VerifyFailed,
}


def error_from_reply(code: int, message: str, type_name: str | None = None) -> NvrGuardError:
    """The exception the daemon raised, rebuilt on the client side.

    The class is taken from ``type`` when it names an error class of this package with the same
    exit code (so GuardTripped stays GuardTripped); else from the exit code alone.
    """
    cls: type[NvrGuardError] = _BY_CODE.get(code, RuntimeFailure)
    named = getattr(errors, type_name or "", None)
    if (
        isinstance(named, type)
        and issubclass(named, NvrGuardError)
        and named is not errors.ConfigError  # different constructor; InvalidInput carries it
        and named.exit_code == code
    ):
        cls = named
    err = cls(message)
    if err.exit_code != code:
        # An exit code outside the contract table: keep it, the CLI exits with what the daemon
        # decided.
        err.exit_code = code
    return err


class ControlClient:
    """One connection to the daemon; several calls may share it. Use as a context manager."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        """Connect to the daemon, waiting behind a full backlog until the timeout."""
        # A full listen backlog (someone floods the socket) makes connect() fail with EAGAIN at
        # once on a Unix socket: retry with a short backoff until the timeout, like a queue.
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            # A blocking connect with a send timeout: when the listen backlog is full the kernel
            # queues this caller and wakes it the moment there is room, instead of failing with
            # EAGAIN (what a Python socket timeout, i.e. a non-blocking fd, gets) and losing
            # every race for the freed place to a flooder that retries in a tight loop.
            left = max(0.001, deadline - time.monotonic())
            sec = int(left)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", sec, int((left - sec) * 1_000_000)),
            )
            try:
                sock.connect(os.fsencode(self.path))
                sock.settimeout(self.timeout)
            except BlockingIOError:
                sock.close()
                if time.monotonic() + delay >= deadline:
                    raise DaemonUnavailable(
                        f"the daemon's socket {self.path} stayed busy for {self.timeout:g} s "
                        f"(is someone flooding it?); try again"
                    ) from None
                time.sleep(delay)  # backoff between connection attempts, not synchronisation
                delay = min(delay * 2, 0.2)
                continue
            except FileNotFoundError:
                sock.close()
                raise DaemonUnavailable(
                    f"the daemon is not running (no control socket at {self.path}); "
                    f"start it with `systemctl start nvr-guard`"
                ) from None
            except ConnectionRefusedError:
                sock.close()
                raise DaemonUnavailable(
                    f"the daemon is not answering on {self.path} (stale socket); "
                    f"check `systemctl status nvr-guard`"
                ) from None
            except PermissionError:
                sock.close()
                raise PolicyRefused(
                    f"permission denied on {self.path}: ask an administrator to add you to the "
                    f"socket group (config: socket_group)"
                ) from None
            except TimeoutError:
                sock.close()
                raise DaemonUnavailable(
                    f"the daemon did not accept a connection on {self.path} within "
                    f"{self.timeout:g} s"
                ) from None
            except OSError as exc:
                sock.close()
                raise DaemonUnavailable(f"cannot reach the daemon on {self.path}: {exc}") from None
            break
        self._sock = sock

    def close(self) -> None:
        """Close the connection (the daemon ends its side)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        on_behalf: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one command and return its result; a refusal is raised as its error class.

        ``on_behalf`` ({session, client}): a gateway acting for the person of that session.
        Descriptors a reply carries are closed: a caller that wants them uses
        :meth:`call_with_fds`."""
        fds: list[int] = []
        try:
            return self._call(cmd, args, on_behalf, fds)
        finally:
            close_all(fds)

    def call_with_fds(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        on_behalf: Mapping[str, str] | None = None,
    ) -> tuple[Any, list[int]]:
        """As :meth:`call`, and the open descriptors the reply carried (at most MAX_FDS, close
        on exec): the caller owns and closes them. On any error none are left open."""
        fds: list[int] = []
        try:
            result = self._call(cmd, args, on_behalf, fds)
        except BaseException:
            close_all(fds)
            raise
        return result, fds

    def _call(
        self,
        cmd: str,
        args: Mapping[str, Any] | None,
        on_behalf: Mapping[str, str] | None,
        fds: list[int],
    ) -> Any:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request: dict[str, Any] = {"v": PROTOCOL_VERSION, "cmd": cmd, "args": dict(args or {})}
        if on_behalf is not None:
            request["on_behalf"] = dict(on_behalf)
        data = encode(request)
        if len(data) - HEADER.size > MAX_REQUEST:
            raise InvalidInput(
                f"request {cmd!r} is {len(data) - HEADER.size} bytes; the daemon accepts at "
                f"most {MAX_REQUEST}"
            )
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
            frame = read_frame(self._sock, deadline, MAX_REPLY, fds)
        except TooManyFds:
            self.close()
            raise RuntimeFailure(
                f"the reply to {cmd!r} carried more than {MAX_FDS} file descriptors"
            ) from None
        except (Timeout, TimeoutError):  # the frame's deadline, or the socket's own
            self.close()
            raise DaemonUnavailable(
                f"the daemon did not answer {cmd!r} within {self.timeout:g} s"
            ) from None
        except (Closed, ConnectionResetError, BrokenPipeError):
            self.close()
            raise DaemonUnavailable(
                f"the daemon closed the connection during {cmd!r} (restarting or stopping?)"
            ) from None
        except Oversized as exc:
            self.close()
            raise RuntimeFailure(f"reply of {exc.length} bytes to {cmd!r} is too large") from None
        except OSError as exc:
            self.close()
            raise DaemonUnavailable(f"control connection failed during {cmd!r}: {exc}") from None
        try:
            # json.loads, not pydantic's parser: it keeps lone surrogates (\udcXX escapes of
            # non-UTF-8 path bytes) that pydantic's JSON parser rejects.
            reply = json.loads(frame)
            ok, result, error = _reply_parts(reply)
        except ValueError as exc:
            self.close()
            raise RuntimeFailure(f"unreadable reply from the daemon to {cmd!r}: {exc}") from None
        if ok:
            return result
        if error is None:
            raise RuntimeFailure(f"the daemon refused {cmd!r} without saying why")
        raise error_from_reply(*error)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def call(
    path: Path | str, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """One request on a fresh connection; returns the result or raises the daemon's error."""
    with ControlClient(path, timeout) as client:
        return client.call(cmd, args)
