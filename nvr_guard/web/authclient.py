"""The web process's side of the password helper (``nvr-guard web-auth``, see
:mod:`nvr_guard.web.authhelper` for the wire format and the replies)."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

from nvr_guard.errors import DaemonUnavailable

_HEADER = struct.Struct(">I")
MAX_REPLY = 64 * 1024


class AuthHelperUnavailable(DaemonUnavailable):
    """The password helper could not be reached or gave no readable answer (exit 1)."""


def _recv_exact(sock: socket.socket, n: int, deadline: float, where: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AuthHelperUnavailable(f"the password helper on {where} did not answer in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise AuthHelperUnavailable(
                f"the password helper on {where} did not answer in time"
            ) from None
        if not chunk:
            raise AuthHelperUnavailable(f"the password helper on {where} closed without an answer")
        buf += chunk
    return bytes(buf)


def login(
    socket_path: str | Path, user: str, password: str, client: str, timeout: float = 30
) -> dict[str, Any]:
    """One login through the helper at ``socket_path``: its reply (``ok`` and the rest).

    Raises AuthHelperUnavailable when the helper cannot be reached or its answer is unreadable;
    every verdict (wrong password, locked, no role, daemon down) is a reply, not an exception."""
    where = str(socket_path)
    body = json.dumps(
        {"user": user, "password": password, "client": client}, separators=(",", ":")
    ).encode()
    deadline = time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:
        raise AuthHelperUnavailable(f"cannot make a socket: {e}") from None
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(where)
            sock.sendall(_HEADER.pack(len(body)) + body)
        except TimeoutError:
            raise AuthHelperUnavailable(f"the password helper on {where} did not accept") from None
        except OSError as e:
            raise AuthHelperUnavailable(
                f"cannot reach the password helper on {where}: {e.strerror or e}"
                " (is nvr-guard-auth.socket running?)"
            ) from None
        try:
            (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline, where))
            if length > MAX_REPLY:
                raise AuthHelperUnavailable(
                    f"the password helper on {where} sent a reply of {length} bytes"
                )
            reply = json.loads(_recv_exact(sock, length, deadline, where))
        except OSError as e:
            raise AuthHelperUnavailable(
                f"the connection to the password helper on {where} failed: {e.strerror or e}"
            ) from None
        except ValueError:
            raise AuthHelperUnavailable(
                f"the password helper on {where} sent an unreadable reply"
            ) from None
    finally:
        sock.close()
        del body
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise AuthHelperUnavailable(f"the password helper on {where} sent an unreadable reply")
    return reply
