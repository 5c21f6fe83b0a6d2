"""Raw control-socket frames for tests that speak the wire protocol themselves (hostile or
malformed requests the CLI would never send)."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">I")


def frame(obj: Any) -> bytes:
    """One request frame: ``obj`` as JSON, or raw bytes as they are."""
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return HEADER.pack(len(body)) + body


def read_reply(s: socket.socket) -> dict[str, Any] | None:
    """One reply frame, or None when the daemon closed the connection without one."""
    buf = b""
    while len(buf) < 4:
        chunk = s.recv(4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    (n,) = HEADER.unpack(buf)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    reply: dict[str, Any] = json.loads(body)
    return reply


def raw_call(path: Path, obj: Any, timeout: float = 10.0) -> dict[str, Any] | None:
    """Send one frame on a fresh connection and read the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(frame(obj))
        return read_reply(s)
