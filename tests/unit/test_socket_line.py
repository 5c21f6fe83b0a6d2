"""The CLI reads the daemon's socket from the config file's top-level ``socket`` key without
validating the rest of the file (issue 19: a quick `status`), and it is always the socket the
daemon reads from the same file — also for files where a look at the lines alone would be
fooled (a ``#`` inside the path, a byte-order mark, a continued plain scalar, a ``socket:`` line
inside a multi-line quoted value)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from nvr_guard.cli.base import Ctx, socket_path

DEFAULT = Path("/run/nvr-guard/control.sock")

CASES = [
    "socket: /run/x/c.sock\nstate_dir: /var/lib/x\n",
    "state_dir: /s\nsocket: /tmp/a/b.sock   # the daemon's\n",
    "state_dir: /s\n",  # no socket: the default
    "web:\n  auth_socket: /run/a.sock\nstate_dir: /s\n",  # another key's socket
    'socket: "/quoted/c.sock"\n',
    "socket: '/single/c.sock'\n",
    '"socket": /quoted-key/c.sock\n',
    "{socket: /flow/c.sock}\n",
    "base: &b /anchored.sock\nsocket: *b\n",
    "socket: /first.sock\nsocket: /second.sock\n",
    "x:\n  socket: /nested.sock\n",
    "socket: /a/../b.sock\n",
    "socket: /with space.sock\n",
    "socket: /crlf.sock\r\nstate_dir: /s\r\n",
    "socket: relative.sock\n",
    "--- \nsocket: /doc.sock\n",
    "socket:\n  /folded.sock\n",
    "socket: /run/x/control.sock#2\n",  # no comment: '#' is part of the plain scalar
    "\ufeffsocket: /bom.sock\n",
    "socket: /run/a\n  /b\nstate_dir: /s\n",  # a plain scalar continued: '/run/a /b'
    'export:\n  watermark: "first\nsocket: /evil.sock\n  last"\n',
    "export:\n  watermark: 'first\nsocket: /evil3.sock\n  last'\n",
    "# socket: /commented.sock\nstate_dir: /s\n",
]


def by_parser(text: str) -> Path | None:
    """The socket the YAML parser reads, as the CLI would use it (None: no answer)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    sock = doc.get("socket") if isinstance(doc, dict) else None
    if sock is None:
        return DEFAULT
    return Path(sock) if isinstance(sock, str) and sock.startswith("/") else None


@pytest.mark.parametrize("text", CASES)
def test_the_socket_the_cli_uses_is_the_parsers(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(text.encode())
    want = by_parser(text)
    got = socket_path(Ctx(str(cfg), False, 0))
    if want is not None:
        assert got == Path(os.path.normpath(str(want)))
    else:
        assert got == DEFAULT  # what the CLI falls back to when the file names none usable
