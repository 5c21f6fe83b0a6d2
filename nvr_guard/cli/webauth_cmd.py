"""`nvr-guard web-auth`: the web console's password check (see nvr_guard.web.authhelper).

By default it serves the one connection on standard input (systemd ``Accept=yes`` with
``StandardInput=socket``: nvr-guard-auth.socket starts one instance per login). ``--listen PATH``
serves a Unix socket in the foreground instead, one forked process per connection, for hosts
without socket activation and for tests.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import select
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import click

from nvr_guard.cli.base import Ctx, pass_ctx, socket_path
from nvr_guard.errors import InvalidInput, RuntimeFailure
from nvr_guard.logs import InertFormatter

# one login never takes longer: a PAM module stuck on an unreachable directory ends with it
CONNECTION_BUDGET = 60
MAX_CHILDREN = 32

log = logging.getLogger("nvr_guard.web.authhelper")


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _setup_logging() -> None:
    # stderr must never be the connection (a unit without StandardError=journal would send
    # the log lines to the web process): then the lines go nowhere rather than to the peer
    if _same_file(0, 2):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter("web-auth: %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


@click.command("web-auth")
@click.option(
    "--listen",
    "listen",
    metavar="PATH",
    default=None,
    help="serve a Unix socket at PATH in the foreground (else: the connection on stdin)",
)
@click.option(
    "--group",
    "group",
    default=None,
    help="the socket's group with --listen (default: web.gateway_user's primary group)",
)
@pass_ctx
def web_auth(c: Ctx, listen: str | None, group: str | None) -> None:
    """Check one web console login with PAM (service nvr-guard) and report it to the daemon."""
    from nvr_guard.web.authhelper import serve

    _setup_logging()
    control = socket_path(c)
    if listen is None:
        if group is not None:
            raise InvalidInput("--group goes with --listen")
        try:
            conn = socket.socket(fileno=os.dup(0))
        except OSError:
            raise InvalidInput(
                "standard input is not a socket: run from nvr-guard-auth.socket (Accept=yes) "
                "or with --listen PATH"
            ) from None
        if conn.family != socket.AF_UNIX or conn.type != socket.SOCK_STREAM:
            conn.close()
            raise InvalidInput("standard input is not a Unix stream socket")
        signal.alarm(CONNECTION_BUDGET)
        sys.exit(serve(conn, control))
    sys.exit(_listen(c, Path(listen), group, control))


def _socket_group(c: Ctx, group: str | None) -> int:
    if group is not None:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise InvalidInput(f"--group {group}: no such group") from None
    web = c.config.web
    if web is None:
        raise InvalidInput(
            f"{c.config_path} has no web: section; add one (gateway_user names the web "
            "console's account, whose group may connect) or pass --group"
        )
    try:
        return pwd.getpwnam(web.gateway_user).pw_gid
    except KeyError:
        raise InvalidInput(
            f"web.gateway_user {web.gateway_user!r} does not exist on this host; create it "
            "or pass --group"
        ) from None


def _bind(path: Path, gid: int) -> socket.socket:
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidInput(f"{path} exists and is not a socket; not replacing it")
        path.unlink()  # a socket left by an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # nobody connects before the mode and group below are set
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise RuntimeFailure(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    try:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    except OSError as e:
        sock.close()
        path.unlink(missing_ok=True)
        raise RuntimeFailure(
            f"cannot give {path} group {gid} and mode 0660: {e.strerror or e} (the helper's "
            "account must be a member of that group)"
        ) from None
    sock.listen(64)
    return sock


def _listen(c: Ctx, path: Path, group: str | None, control: Path) -> int:
    from nvr_guard.web.authhelper import serve

    listener = _bind(path, _socket_group(c, group))
    stop = [False]

    def on_term(signum: int, frame: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    children: set[int] = set()
    log.info("listening on %s (control socket %s)", path, control)
    try:
        while not stop[0]:
            for pid in list(children):
                with contextlib.suppress(ChildProcessError):
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if done == 0:
                        continue
                children.discard(pid)
            try:
                ready, _, _ = select.select([listener], [], [], 0.5)
            except InterruptedError:
                continue
            if not ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if len(children) >= MAX_CHILDREN:
                from nvr_guard.web.authhelper import encode_frame

                with contextlib.suppress(OSError):
                    conn.settimeout(1)
                    conn.sendall(encode_frame({"ok": False, "message": "busy; try again"}))
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:  # the child: this one connection, then out
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    listener.close()
                    signal.alarm(CONNECTION_BUDGET)
                    code = serve(conn, control)
                finally:
                    os._exit(code)
            conn.close()
            children.add(pid)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0
