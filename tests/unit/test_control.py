"""The control socket as a real server on a temporary Unix socket, with real clients."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from nvr_guard.daemon import control
from nvr_guard.daemon.control import ControlServer
from nvr_guard.errors import (
    DaemonUnavailable,
    GuardTripped,
    InvalidInput,
    NvrGuardError,
    PolicyRefused,
    RuntimeFailure,
    VerifyFailed,
)
from nvr_guard.identity import Caller
from nvr_guard.wire import ControlClient, call

NOBODY = 65534


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short path: sun_path holds at most 107 bytes, pytest's tmp_path may be longer.
    path = Path(tempfile.mkdtemp(prefix="nvrg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


ServerFactory = Callable[..., ControlServer]


@pytest.fixture
def make_server(sock_dir: Path) -> Iterator[ServerFactory]:
    servers: list[ControlServer] = []

    def make(**kwargs: Any) -> ControlServer:
        kwargs.setdefault("group", None)
        path = kwargs.pop("path", sock_dir / "control.sock")
        server = ControlServer(path, **kwargs)
        server.register("echo", lambda caller, args: {"args": args})
        server.register(
            "whoami",
            lambda caller, args: {
                "pid": caller.pid,
                "uid": caller.uid,
                "gid": caller.gid,
                "user": caller.user,
                "groups": caller.groups,
            },
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def frame(obj: object) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def read_reply(sock: socket.socket) -> dict[str, Any] | None:
    """One reply frame, or None on EOF."""
    sock.settimeout(5)
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a reply"
        body += chunk
    reply: dict[str, Any] = json.loads(body)
    return reply


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def assert_eof(sock: socket.socket) -> None:
    sock.settimeout(5)
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass  # also a close


# ---------------------------------------------------------------------------------------------


def test_round_trip(make_server: ServerFactory) -> None:
    server = make_server()
    args = {"camera": ["toll-03", "gate-01"], "note": "证据 export", "n": 3}
    assert call(server.path, "echo", args) == {"args": args}
    pong = call(server.path, "ping")
    assert pong["pong"] is True
    assert pong["pid"] == os.getpid()
    assert pong["user"] == pwd.getpwuid(os.getuid()).pw_name


def test_socket_path_close_to_the_limit(make_server: ServerFactory, sock_dir: Path) -> None:
    # The temporary bind name must fit wherever the final name fits.
    name = "s" * (control._SUN_PATH_MAX - len(os.fsencode(sock_dir)) - 1)
    server = make_server(path=sock_dir / name)
    assert len(os.fsencode(server.path)) == control._SUN_PATH_MAX
    assert call(server.path, "echo", {"a": 1}) == {"args": {"a": 1}}
    assert sorted(os.listdir(sock_dir)) == [name]


def test_socket_path_over_the_limit_is_a_clear_error(sock_dir: Path) -> None:
    path = sock_dir / ("s" * 120)
    with pytest.raises(RuntimeFailure, match="shorter 'socket' path"):
        ControlServer(path, None).start()


def test_several_requests_on_one_connection(make_server: ServerFactory) -> None:
    server = make_server()
    with ControlClient(server.path) as client:
        for i in range(5):
            assert client.call("echo", {"i": i}) == {"args": {"i": i}}


def test_handler_sees_the_callers_kernel_identity(make_server: ServerFactory) -> None:
    server = make_server()
    who = call(server.path, "whoami")
    me = pwd.getpwuid(os.getuid()).pw_name
    assert who["uid"] == os.getuid()
    assert who["gid"] == os.getgid()
    assert who["pid"] == os.getpid()
    assert who["user"] == me
    assert grp.getgrgid(os.getgid()).gr_name in who["groups"]


def test_fallback_handler_gets_unregistered_commands(make_server: ServerFactory) -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    def handler(caller: Caller, cmd: str, args: dict[str, Any]) -> str:
        seen.append((caller.name, cmd, args))
        return "handled"

    server = make_server(handler=handler)
    assert call(server.path, "status", {"verbose": True}) == "handled"
    assert seen == [(pwd.getpwuid(os.getuid()).pw_name, "status", {"verbose": True})]


def test_unknown_command_is_invalid_input(make_server: ServerFactory) -> None:
    server = make_server()
    with pytest.raises(InvalidInput) as info:
        call(server.path, "frobnicate")
    assert info.value.exit_code == 2
    assert "unknown command 'frobnicate'" in str(info.value)
    assert "echo" in str(info.value)  # tells what exists


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("camera gate-09 is not configured"), 2),
        (PolicyRefused("alice may not approve her own request 12"), 3),
        (GuardTripped("sweep 17 stopped: 31% of gate-03; run `nvr-guard retention confirm 17`"), 3),
        (VerifyFailed("audit entry 204: hash mismatch"), 4),
        (RuntimeFailure("disk /srv/recordings not mounted"), 1),
    ],
)
def test_handler_errors_reach_the_client_with_class_code_and_message(
    make_server: ServerFactory, error: NvrGuardError, code: int
) -> None:
    def fail(caller: Caller, args: Any) -> None:
        raise error

    server = make_server()
    server.register("fail", fail)
    with pytest.raises(NvrGuardError) as info:
        call(server.path, "fail")
    assert type(info.value) is type(error)
    assert info.value.exit_code == code
    assert str(info.value) == str(error)


def test_unexpected_exception_is_internal_error_and_server_goes_on(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(caller: Caller, args: Any) -> None:
        raise ZeroDivisionError("bug")

    server = make_server()
    server.register("broken", broken)
    with pytest.raises(RuntimeFailure) as info:
        call(server.path, "broken")
    assert info.value.exit_code == 1
    assert "internal error" in str(info.value)
    assert "ZeroDivisionError" in caplog.text  # traceback logged for the admin
    assert call(server.path, "echo", {"after": 1}) == {"args": {"after": 1}}


def test_unserialisable_result_is_internal_error(make_server: ServerFactory) -> None:
    server = make_server()
    server.register("odd", lambda caller, args: object())
    with pytest.raises(RuntimeFailure, match="internal error"):
        call(server.path, "odd")


def test_results_with_domain_types_are_encoded(make_server: ServerFactory) -> None:
    server = make_server()
    server.register(
        "paths", lambda caller, args: {"raw": b"/srv/rec/\xff.mp4", "p": Path("/srv"), "s": {2, 1}}
    )
    result = call(server.path, "paths")
    assert os.fsencode(result["raw"]) == b"/srv/rec/\xff.mp4"  # non-UTF-8 name survives
    assert result["p"] == "/srv"
    assert result["s"] == [1, 2]


class HoldArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    camera: str
    reason: str


def test_args_are_validated_by_the_commands_model(make_server: ServerFactory) -> None:
    server = make_server()
    server.register("hold.add", lambda caller, args: {"camera": args.camera}, HoldArgs)
    assert call(server.path, "hold.add", {"camera": "c1", "reason": "case 7"}) == {"camera": "c1"}
    with pytest.raises(InvalidInput) as info:
        call(server.path, "hold.add", {"camera": "c1", "reasn": "typo"})
    assert "args.reason" in str(info.value)
    assert "args.reasn" in str(info.value)


@pytest.mark.parametrize(
    ("roles", "allowed"),
    [(set(), False), ({"operator"}, False), ({"admin"}, True), ({"auditor", "admin"}, True)],
)
def test_command_roles(make_server: ServerFactory, roles: set[str], allowed: bool) -> None:
    server = make_server(roles_of=lambda caller: roles)
    server.register("retention.confirm", lambda caller, args: "confirmed", roles={"admin"})
    if allowed:
        assert call(server.path, "retention.confirm") == "confirmed"
    else:
        with pytest.raises(PolicyRefused, match="needs one of the roles admin"):
            call(server.path, "retention.confirm")


def test_role_protected_command_fails_closed_without_resolver(make_server: ServerFactory) -> None:
    server = make_server()
    server.register("retention.confirm", lambda caller, args: "confirmed", roles={"admin"})
    with pytest.raises(PolicyRefused):
        call(server.path, "retention.confirm")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "malformed request"),
        (b'{"v": 1}', "cmd"),
        (b'{"v": 1, "cmd": "echo", "args": [1]}', "args"),
        (b'{"v": 1, "cmd": "echo", "extra": 1}', "extra"),
        (b'{"v": 2, "cmd": "echo"}', "protocol version 2"),
        (b'{"v": 1, "cmd": "Echo; rm"}', "cmd"),
    ],
)
def test_malformed_requests_get_code_2_and_the_connection_survives(
    make_server: ServerFactory, body: bytes, fragment: str
) -> None:
    server = make_server()
    with raw_connect(server.path) as sock:
        sock.sendall(frame(body))
        reply = read_reply(sock)
        assert reply is not None
        assert reply["ok"] is False
        assert reply["error"]["code"] == 2
        assert fragment in reply["error"]["message"]
        # Framing was intact, so the same connection still works.
        sock.sendall(frame({"v": 1, "cmd": "echo", "args": {"x": 1}}))
        assert read_reply(sock) == {"ok": True, "result": {"args": {"x": 1}}}


def test_oversized_request_is_refused_and_closed_server_keeps_serving(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    with raw_connect(server.path) as sock:
        sock.sendall(struct.pack(">I", 10 * 1024 * 1024) + b"{")
        reply = read_reply(sock)
        assert reply is not None
        assert reply["error"]["code"] == 2
        assert "10485760 bytes exceeds the limit of 65536" in reply["error"]["message"]
        assert_eof(sock)
    assert call(server.path, "echo", {"ok": 1}) == {"args": {"ok": 1}}


def test_request_at_the_limit_is_accepted(make_server: ServerFactory) -> None:
    server = make_server()
    base = len(json.dumps({"v": 1, "cmd": "echo", "args": {"pad": ""}}).encode())
    pad = "x" * (control.MAX_REQUEST - base)
    body = json.dumps({"v": 1, "cmd": "echo", "args": {"pad": pad}}).encode()
    assert len(body) == control.MAX_REQUEST
    with raw_connect(server.path) as sock:
        sock.sendall(frame(body))
        reply = read_reply(sock)
    assert reply is not None and reply["ok"] is True


def test_client_refuses_to_send_an_oversized_request(make_server: ServerFactory) -> None:
    server = make_server()
    with pytest.raises(InvalidInput, match="at most 65536"):
        call(server.path, "echo", {"pad": "x" * control.MAX_REQUEST})


def test_slow_client_is_dropped_after_the_deadline_while_others_are_served(
    make_server: ServerFactory,
) -> None:
    deadline = 1.5
    server = make_server(read_timeout=deadline)
    with raw_connect(server.path) as slow:
        slow.sendall(b"\x00")  # one byte of the length header, then nothing
        started = time.monotonic()
        # Served meanwhile: the stalled client holds its own thread only.
        assert call(server.path, "echo", {"meanwhile": True}) == {"args": {"meanwhile": True}}
        assert time.monotonic() - started < deadline
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)  # the slow client is still waiting: not dropped early
        reply = read_reply(slow)
        elapsed = time.monotonic() - started
        assert reply is not None
        assert reply["error"]["code"] == 2
        assert "not received within 1.5 s" in reply["error"]["message"]
        assert_eof(slow)
    assert deadline - 0.1 <= elapsed < deadline + 3.0


def test_idle_connection_is_closed_silently(make_server: ServerFactory) -> None:
    server = make_server(read_timeout=0.3)
    with raw_connect(server.path) as idle:
        assert read_reply(idle) is None  # no error reply: it never started a request


def test_fifty_concurrent_clients_are_all_answered(make_server: ServerFactory) -> None:
    n = 50
    # Every handler waits until all 50 are inside it: proves they are served at the same time,
    # not one after another.
    barrier = threading.Barrier(n, timeout=10)

    def gather(caller: Caller, args: Any) -> Any:
        barrier.wait()
        return args["i"]

    server = make_server()
    server.register("gather", gather)
    results: dict[int, Any] = {}
    failures: list[BaseException] = []

    def client(i: int) -> None:
        try:
            results[i] = call(server.path, "gather", {"i": i}, timeout=15)
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert failures == []
    assert results == {i: i for i in range(n)}


def test_connections_over_the_cap_get_busy(make_server: ServerFactory) -> None:
    server = make_server(max_connections=2)
    holders = [raw_connect(server.path), raw_connect(server.path)]
    try:
        # The two holders occupy both slots once accepted; poll until the server says busy.
        deadline = time.monotonic() + 5
        while True:
            try:
                call(server.path, "ping", timeout=2)
            except DaemonUnavailable as exc:
                assert "busy" in str(exc)
                break
            assert time.monotonic() < deadline, "server never reported busy"
    finally:
        for h in holders:
            h.close()
    deadline = time.monotonic() + 5
    while True:  # slots come back once the holders are gone
        try:
            assert call(server.path, "ping")["pid"] == os.getpid()
            break
        except DaemonUnavailable:
            assert time.monotonic() < deadline


def test_stop_unlinks_the_socket_and_returns_quickly(make_server: ServerFactory) -> None:
    server = make_server()
    assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
    with raw_connect(server.path) as idle:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        assert not server.path.exists()
        assert_eof(idle)
    with pytest.raises(DaemonUnavailable, match="not running"):
        call(server.path, "ping")


def test_socket_mode_and_group(make_server: ServerFactory) -> None:
    server = make_server(group="nogroup")
    st = os.lstat(server.path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("nogroup").gr_gid


def test_missing_group_still_starts_with_mode_0660(make_server: ServerFactory) -> None:
    server = make_server(group="no-such-group-nvrg")
    assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o660
    assert call(server.path, "ping")["protocol"] == 1


def test_stale_socket_is_replaced(make_server: ServerFactory, sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
    leftover.close()
    server = make_server(path=path)
    assert call(path, "ping")["pid"] == os.getpid()
    assert server.path == path


def test_live_socket_is_not_stolen(make_server: ServerFactory, sock_dir: Path) -> None:
    first = make_server()
    second = ControlServer(first.path, None)
    with pytest.raises(RuntimeFailure, match="already listening"):
        second.start()
    assert call(first.path, "ping")["pid"] == os.getpid()


def test_non_socket_at_the_path_is_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    path.write_text("precious")
    with pytest.raises(RuntimeFailure, match="not a socket"):
        ControlServer(path, None).start()
    assert path.read_text() == "precious"


def test_stop_leaves_a_socket_that_is_not_ours(make_server: ServerFactory) -> None:
    server = make_server()
    os.unlink(server.path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(server.path))
    try:
        server.stop()
        assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
    finally:
        other.close()


@pytest.mark.parametrize(
    ("setup", "exc", "fragment"),
    [
        ("missing", DaemonUnavailable, "not running"),
        ("refused", DaemonUnavailable, "not answering"),
    ],
)
def test_client_errors_without_a_daemon(
    sock_dir: Path, setup: str, exc: type[Exception], fragment: str
) -> None:
    path = sock_dir / "control.sock"
    if setup == "refused":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
    with pytest.raises(exc, match=fragment):
        call(path, "status")


def test_client_times_out_on_a_daemon_that_never_answers(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="did not answer 'status' within 0.3 s"):
            call(path, "status", timeout=0.3)
        assert time.monotonic() - started < 3


def _call_as(uid: int, gid: int, path: Path, cmd: str) -> dict[str, Any]:
    """Run ``call`` in a forked child that dropped to uid/gid; return its outcome."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                out: dict[str, Any] = {"result": call(path, cmd, timeout=5)}
            except NvrGuardError as exc:
                out = {"error": type(exc).__name__, "message": str(exc)}
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def test_another_uid_is_seen_as_itself(make_server: ServerFactory, sock_dir: Path) -> None:
    assert os.geteuid() == 0, "this test needs root to switch to the nobody user"
    os.chmod(sock_dir, 0o755)
    server = make_server(group="nogroup")
    out = _call_as(NOBODY, NOBODY, server.path, "whoami")
    who = out["result"]
    assert who["uid"] == NOBODY
    assert who["gid"] == NOBODY
    assert who["user"] == pwd.getpwuid(NOBODY).pw_name
    assert who["pid"] != os.getpid()


def test_a_user_outside_the_socket_group_is_refused(
    make_server: ServerFactory, sock_dir: Path
) -> None:
    assert os.geteuid() == 0, "this test needs root to switch to the nobody user"
    os.chmod(sock_dir, 0o755)
    server = make_server(group=None)  # socket stays root:root 0660
    out = _call_as(NOBODY, NOBODY, server.path, "whoami")
    assert out["error"] == "PolicyRefused"
    assert "socket group" in out["message"]


# ---- descriptors passed with a reply (SCM_RIGHTS) --------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_reply_carries_descriptors_to_call_with_fds(
    make_server: ServerFactory, sock_dir: Path
) -> None:
    clip = sock_dir / "clip.bin"
    clip.write_bytes(b"footage")
    server = make_server()
    server.register(
        "open", lambda caller, args: control.WithFds({"size": 7}, [os.open(clip, os.O_RDONLY)])
    )
    with ControlClient(server.path) as c:
        c.call("echo")  # the server's side of this connection is open from here on
        before = _open_fds()
        result, fds = c.call_with_fds("open")
        assert result == {"size": 7} and len(fds) == 1
        assert os.pread(fds[0], 100, 0) == b"footage"
        assert os.get_inheritable(fds[0]) is False  # close-on-exec
        os.close(fds[0])
        # the server closed its own copy after sending: nothing is left open in this process
        assert _open_fds() == before
        # call() closes what a reply carries
        assert c.call("open") == {"size": 7}
        assert _open_fds() == before
        # and a reply without descriptors gives none
        assert c.call_with_fds("echo", {"a": 1}) == ({"args": {"a": 1}}, [])


def test_descriptors_of_a_result_that_cannot_be_sent_are_closed(
    make_server: ServerFactory,
) -> None:
    r, w = os.pipe()
    os.close(w)
    server = make_server()
    server.register("bad", lambda caller, args: control.WithFds({"x": object()}, [r]))
    with ControlClient(server.path) as c:
        with pytest.raises(RuntimeFailure):
            c.call_with_fds("bad")
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the server


def test_too_many_descriptors_are_refused() -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(control.MAX_FDS + 1)]
    with pytest.raises(ValueError):
        control.WithFds({}, fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
