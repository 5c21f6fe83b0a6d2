"""The web console's login, end to end with real things: Unix accounts with real passwords, PAM
service nvr-guard (config/pam.d/nvr-guard, pam_unix reading /etc/shadow as a non-root helper in
group shadow), a daemon process, the password helper (``nvr-guard web-auth --listen``) as its own
account, and the gateway's calls on behalf of a session from the gateway's own uid.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.web.authclient import AuthHelperUnavailable, login
from tests.fixtures.cli import run_cli
from tests.fixtures.site import make_footage, poll
from tests.fixtures.users import unix_accounts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PAM_FILE = Path("/etc/pam.d/nvr-guard")
GROUP = "wa17-test"
AUTH, GATEWAY, OTHER = "wa17auth", "wa17gw", "wa17mal"
# people: name -> (role or None, password)
PEOPLE: dict[str, tuple[str | None, str]] = {
    "wa17ann": ("operator", "ann-Pa55 wörd!"),
    "wa17bob": ("operator", "bob-Pa55word-7"),
    "wa17cat": ("operator", "cat-Pa55word-8"),
    "wa17dan": ("operator", "dan-Pa55word-9"),
    "wa17eve": (None, "eve-Pa55word-0"),
}
ACCOUNTS = [AUTH, GATEWAY, OTHER, *PEOPLE]

# the gateway's side of the control socket, run as another uid: the reply, or the error's class
# and exit code (the CLI's contract), as JSON; exits with the error's code
GATEWAY_CALL = r"""
import json, sys
from nvr_guard.wire import ControlClient
from nvr_guard.errors import NvrGuardError
path, cmd, args, behalf = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
try:
    with ControlClient(path, 20) as c:
        result = c.call(cmd, args, on_behalf=behalf)
except NvrGuardError as e:
    print(json.dumps({"error": type(e).__name__, "code": e.exit_code, "message": str(e)}))
    sys.exit(e.exit_code)
print(json.dumps({"result": result}))
"""


def config_text(base: Path, idle: str = "15min") -> str:
    people = "\n".join(
        f"    {n}: {{roles: [{role}], level: 1}}" for n, (role, _) in PEOPLE.items() if role
    )
    return f"""state_dir: {base / "state"}
timezone: Asia/Shanghai
socket: {base / "run" / "c.sock"}
socket_group: {GROUP}
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  bank:
    profile: general
    roots: [{base / "rec"}]
    layout: "{{camera}}/%Y-%m-%d/%H/%M.%S.mp4"
cameras:
  lobby-1: {{level: 1}}
people:
  users:
    root: {{roles: [admin]}}
    {OTHER}: {{roles: [operator], level: 1}}
{people}
web:
  listen: "127.0.0.1:8080"
  gateway_user: {GATEWAY}
  auth_user: {AUTH}
  max_failures: 3
  lockout: 15min
  idle_timeout: {idle}
"""


@dataclass
class Env:
    base: Path
    config: Path
    socket: Path
    helper_socket: Path
    helper_log: Path
    daemon: subprocess.Popen[bytes]
    uids: dict[str, int]
    gid: int
    start: datetime  # the footage's

    def as_user(self, name: str, *groups: int) -> dict[str, Any]:
        return {"user": self.uids[name], "group": self.gid, "extra_groups": [self.gid, *groups]}

    def gateway(
        self, cmd: str, args: dict[str, Any] | None = None, behalf: Any = None, user: str = GATEWAY
    ) -> tuple[int, dict[str, Any]]:
        """``cmd`` through the control socket as ``user`` (the gateway unless said), on behalf of
        ``behalf`` ({session, client}) when given: (exit code, the JSON it printed)."""
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                GATEWAY_CALL,
                str(self.socket),
                cmd,
                json.dumps(args or {}),
                json.dumps(behalf),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            **self.as_user(user),
        )
        assert "Traceback" not in r.stderr, r.stderr
        return r.returncode, json.loads(r.stdout)

    def login(self, user: str, password: str, client: str) -> dict[str, Any]:
        return login(self.helper_socket, user, password, client, timeout=60)

    def audit(self) -> list[dict[str, Any]]:
        r = run_cli(["--config", str(self.config), "--json", "audit", "show"])
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout)["entries"])

    def digest(self) -> str:
        r = run_cli(["--config", str(self.config), "--json", "status"])
        return str(json.loads(r.stdout)["config_digest"])


def entries(env: Env, action: str, obj: str | None = None) -> list[dict[str, Any]]:
    return [e for e in env.audit() if e["action"] == action and obj in (None, e["object"])]


@pytest.fixture(scope="module")
def pam_service() -> Iterator[None]:
    """The shipped PAM file as /etc/pam.d/nvr-guard (removed afterwards if put there here)."""
    put = not PAM_FILE.exists()
    if put:
        shutil.copyfile(REPO / "config" / "pam.d" / "nvr-guard", PAM_FILE)
        os.chmod(PAM_FILE, 0o644)
    try:
        yield
    finally:
        if put:
            PAM_FILE.unlink()


def start_helper(config: Path, sock: Path, log: Path, uids: dict[str, int], gid: int) -> Any:
    shadow = grp.getgrnam("shadow").gr_gid
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nvr_guard",
            "--config",
            str(config),
            "web-auth",
            "--listen",
            str(sock),
            "--group",
            GROUP,
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        user=uids[AUTH],
        group=gid,
        extra_groups=[gid, shadow],
    )

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"helper exited {proc.returncode}: {log.read_text()[-2000:]}")
        return sock.exists()

    poll(up, 60, "the password helper's socket")
    return proc


@pytest.fixture(scope="module")
def env(pam_service: None) -> Iterator[Env]:
    # not under pytest's basetemp: another pytest session starting on this host makes
    # /tmp/pytest-of-root private again (0700), which locks the test accounts out mid-run
    base = Path(tempfile.mkdtemp(prefix="wa17-"))
    os.chmod(base, 0o755)
    with contextlib.ExitStack() as cleanup, unix_accounts(GROUP, ACCOUNTS) as uids:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        pw = "".join(f"{n}:{p}\n" for n, (_, p) in PEOPLE.items())
        subprocess.run(["chpasswd"], input=pw.encode(), check=True)
        gid = grp.getgrnam(GROUP).gr_gid
        (base / "rec").mkdir()
        start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
        make_footage(base / "rec", "lobby-1", start, 2)
        config = base / "config.yaml"
        config.write_text(config_text(base))
        os.chmod(config, 0o644)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(config), "daemon"],
            stdout=open(base / "daemon.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        helper_dir = base / "auth"
        helper_dir.mkdir()
        os.chown(helper_dir, uids[AUTH], gid)
        helper: subprocess.Popen[bytes] | None = None
        e = Env(
            base,
            config,
            base / "run" / "c.sock",
            helper_dir / "auth.sock",
            base / "helper.log",
            daemon,
            uids,
            gid,
            start,
        )
        try:

            def daemon_up() -> bool:
                if daemon.poll() is not None:
                    log = (base / "daemon.log").read_text(errors="replace")
                    raise AssertionError(f"daemon exited {daemon.returncode}: {log[-3000:]}")
                return e.socket.exists() and e.gateway("status")[0] in (0, 1)

            poll(daemon_up, 120, "the daemon")
            helper = start_helper(config, e.helper_socket, e.helper_log, uids, gid)
            yield e
        finally:
            for proc in (helper, daemon):
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            # no password ever reached a log line
            logs = e.helper_log.read_text(errors="replace") + (base / "daemon.log").read_text(
                errors="replace"
            )
            for _, (_, password) in PEOPLE.items():
                assert password not in logs


def behalf(reply: dict[str, Any], client: str) -> dict[str, str]:
    return {"session": reply["session"], "client": client}


# ---- logging in ---------------------------------------------------------------------------------


def test_the_helper_socket_is_for_its_group_only(env: Env) -> None:
    st = env.helper_socket.stat()
    assert st.st_mode & 0o777 == 0o660
    assert st.st_gid == env.gid


def test_the_right_password_opens_a_session_the_gateway_acts_through(env: Env) -> None:
    client = "10.17.0.1"
    reply = env.login("wa17ann", PEOPLE["wa17ann"][1], client)
    assert reply["ok"] is True, reply
    assert reply["user"] == "wa17ann"
    assert len(reply["session"]) >= 40 and len(reply["csrf"]) >= 40
    assert 0 < reply["expires_in"] <= 15 * 60
    logins = [x for x in entries(env, "web.login") if x["actor"] == "wa17ann"]
    assert logins and logins[-1]["details"]["client"] == client
    assert reply["session"] not in json.dumps(env.audit())  # the token is never on record

    code, out = env.gateway("web.session", behalf=behalf(reply, client))
    assert code == 0, out
    assert out["result"]["user"] == "wa17ann"
    assert out["result"]["roles"] == ["operator"]
    assert out["result"]["csrf"] == reply["csrf"]

    # an action taken through the session is the person's, on record as via web from the client
    code, out = env.gateway(
        "request.new",
        {
            "cameras": "lobby-1",
            "from": (env.start + timedelta(seconds=1)).isoformat(),
            "to": (env.start + timedelta(seconds=19)).isoformat(),
            "reason": "theft at the counter",
            "basis": "case 17",
            "recipient": {"unit": "City police", "person": "Officer Wang", "contact": "010-5555"},
        },
        behalf(reply, client),
    )
    assert code == 0, out
    rid = out["result"]["id"]
    created = entries(env, "request.new", f"request:{rid}")
    assert created, [x["action"] for x in env.audit()][-10:]
    assert created[0]["actor"] == "wa17ann"
    assert created[0]["details"]["via"] == "web"
    assert created[0]["details"]["client"] == client
    code, out = env.gateway("request.list", {}, behalf(reply, client))
    assert code == 0, out
    listed = out["result"]["requests"] if isinstance(out["result"], dict) else out["result"]
    assert rid in [r["id"] for r in listed]

    # the same session from a uid that is not the gateway: refused
    code, out = env.gateway("web.session", behalf=behalf(reply, client), user=OTHER)
    assert code == 3 and out["error"] == "PolicyRefused", out
    assert "gateway" in out["message"]
    code, out = env.gateway("request.list", {}, behalf(reply, client), user="wa17ann")
    assert code == 3, out

    # logged out: the token opens nothing any more
    code, out = env.gateway("web.logout", behalf=behalf(reply, client))
    assert code == 0, out
    code, out = env.gateway("web.session", behalf=behalf(reply, client))
    assert (code, out["error"]) == (3, "SessionEnded"), out
    code, out = env.gateway("request.list", {}, behalf(reply, client))
    assert (code, out["error"]) == (3, "SessionEnded"), out


def test_a_made_up_token_is_no_session(env: Env) -> None:
    fake = {"session": "A" * 43, "client": "10.17.0.9"}
    code, out = env.gateway("web.session", behalf=fake)
    assert (code, out["error"]) == (3, "SessionEnded"), out
    code, out = env.gateway("request.list", {}, fake)
    assert (code, out["error"]) == (3, "SessionEnded"), out


def test_a_wrong_password_is_refused_and_on_record(env: Env) -> None:
    client = "10.17.1.1"
    reply = env.login("wa17ann", "not-the-password", client)
    assert reply == {"ok": False, "locked": False, "message": "wrong user name or password"}
    failed = [x for x in entries(env, "auth.failed", "wa17ann") if x["details"]["client"] == client]
    assert len(failed) == 1
    assert failed[0]["actor"] == "web-login"
    assert failed[0]["details"]["via"] == "web"
    assert failed[0]["details"]["reason"].startswith("auth:")
    assert "not-the-password" not in json.dumps(env.audit())
    # a name nobody has answers exactly the same (no hint which names exist)
    assert env.login("wa17nobody", "not-the-password", "10.17.1.2") == reply


def test_failures_lock_the_name_from_every_address_and_pam_is_not_asked(env: Env) -> None:
    a, b = "10.17.2.1", "10.17.2.2"
    replies = [env.login("wa17bob", f"guess-{i}", a) for i in range(3)]
    assert [r.get("locked") for r in replies] == [False, False, True], replies
    assert all(r["ok"] is False for r in replies)
    failed = entries(env, "auth.failed", "wa17bob")
    assert len(failed) == 3 and failed[-1]["details"]["locked"] is True

    # the right password, from another address: refused unchecked
    right = env.login("wa17bob", PEOPLE["wa17bob"][1], b)
    assert right["ok"] is False and right["locked"] is True, right
    assert right["retry_after"] > 0
    wrong = env.login("wa17bob", "guess-again", b)
    assert wrong.keys() == right.keys() and wrong["message"] == right["message"]  # no oracle
    locked = entries(env, "auth.locked", "wa17bob")
    # refusals of one locked name from one address: one entry a minute, with their count
    assert [x["details"]["client"] for x in locked] == [b]
    assert locked[0]["details"]["refused"] == 1
    assert locked[0]["actor"] == "web-login" and locked[0]["details"]["locked"] == "user"
    # PAM did not run: no verdict reached the daemon (no new failure, no login)
    assert len(entries(env, "auth.failed", "wa17bob")) == 3
    assert not [x for x in entries(env, "web.login") if x["actor"] == "wa17bob"]

    # the address that guessed is locked for every name
    other = env.login("wa17dan", PEOPLE["wa17dan"][1], a)
    assert other["ok"] is False and other["locked"] is True, other
    assert entries(env, "auth.locked", "wa17dan")[-1]["details"]["locked"] == "client"


def test_a_person_without_a_role_gets_no_session(env: Env) -> None:
    client = "10.17.3.1"
    reply = env.login("wa17eve", PEOPLE["wa17eve"][1], client)
    assert reply["ok"] is False and "session" not in reply, reply
    # answered like a wrong password: the login does not confirm the host's other passwords
    assert reply["message"] == env.login("wa17eve", "not-the-password", client)["message"]
    denied = entries(env, "access.denied", "wa17eve")
    assert denied and denied[-1]["actor"] == "web-login"
    assert denied[-1]["details"]["client"] == client
    assert not [x for x in entries(env, "web.login") if x["actor"] == "wa17eve"]


# ---- the helper under bad input -----------------------------------------------------------------


def exchange(path: Path, data: bytes, shut: bool = True) -> dict[str, Any]:
    """Send raw bytes to the helper, read its one reply frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    (n,) = struct.unpack(">I", buf[:4])
    assert len(buf) == 4 + n, buf
    reply: dict[str, Any] = json.loads(buf[4:])
    return reply


def frame(obj: Any) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def test_malformed_requests_get_one_error_reply_and_the_helper_serves_on(env: Env) -> None:
    secret = "Secret-In-A-Bad-Frame"
    bad = {
        "oversized": struct.pack(">I", 5000) + b"{" * 5000,
        "not json": frame(b"{user: nope"),
        "not an object": frame(["wa17ann", secret, "10.0.0.1"]),
        "missing client": frame({"user": "wa17ann", "password": secret}),
        "extra key": frame({"user": "wa17ann", "password": secret, "client": "10.1.1.1", "x": 1}),
        "bad client": frame({"user": "wa17ann", "password": secret, "client": "evil.example"}),
        "bad user": frame({"user": "ann;rm -rf", "password": secret, "client": "10.1.1.1"}),
        "empty password": frame({"user": "wa17ann", "password": "", "client": "10.1.1.1"}),
        "password type": frame({"user": "wa17ann", "password": 12345, "client": "10.1.1.1"}),
        "truncated": struct.pack(">I", 100)
        + b'{"user": "wa17ann", "password": "'
        + secret.encode(),
        "NUL": frame({"user": "wa17ann", "password": "a\x00b", "client": "10.1.1.1"}),
    }
    before = len(env.audit())
    for what, data in bad.items():
        reply = exchange(env.helper_socket, data)
        assert reply["ok"] is False and reply["invalid"] is True, (what, reply)
        assert reply["message"] and "Traceback" not in reply["message"], what
        assert secret not in json.dumps(reply), what
    # nothing reached the daemon
    assert [x["action"] for x in env.audit()[before:]] == []
    assert secret not in env.helper_log.read_text(errors="replace")
    # and the helper still serves
    ok = env.login("wa17cat", PEOPLE["wa17cat"][1], "10.17.4.1")
    assert ok["ok"] is True, ok


def test_the_helper_answers_unavailable_without_a_daemon(env: Env) -> None:
    config = env.base / "nodaemon.yaml"
    config.write_text(
        config_text(env.base).replace(str(env.socket), str(env.base / "run" / "none.sock"))
    )
    os.chmod(config, 0o644)
    sock = env.base / "auth" / "nodaemon.sock"
    log = env.base / "nodaemon.log"
    proc = start_helper(config, sock, log, env.uids, env.gid)
    try:
        reply = login(sock, "wa17ann", PEOPLE["wa17ann"][1], "10.17.5.1", timeout=60)
        assert reply["ok"] is False and reply["unavailable"] is True, reply
        assert "session" not in reply
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert not sock.exists()  # the helper removes its socket when it stops
    with pytest.raises(AuthHelperUnavailable, match="cannot reach the password helper"):
        login(sock, "wa17ann", "x", "10.17.5.1")


# ---- who may speak for whom ---------------------------------------------------------------


def test_only_the_auth_user_reports_logins(env: Env) -> None:
    for who in (GATEWAY, OTHER):
        code, out = env.gateway("auth.begin", {"user": "wa17ann", "client": "10.17.6.1"}, user=who)
        assert (code, out["error"]) == (3, "PolicyRefused"), (who, out)
        code, out = env.gateway(
            "auth.finish", {"user": "wa17ann", "client": "10.17.6.1", "ok": True}, user=who
        )
        assert (code, out["error"]) == (3, "PolicyRefused"), (who, out)
    assert not [x for x in entries(env, "web.login") if x["details"].get("client") == "10.17.6.1"]
    denied = [x for x in entries(env, "access.denied", "auth.finish")]
    assert {x["details"]["uid"] for x in denied} >= {env.uids[GATEWAY], env.uids[OTHER]}


def test_an_idle_session_ends(env: Env) -> None:
    old = env.digest()
    env.config.write_text(config_text(env.base, idle="3s"))
    env.daemon.send_signal(signal.SIGHUP)
    poll(lambda: env.digest() != old, 30, "the reload")
    try:
        client = "10.17.7.1"
        reply = env.login("wa17dan", PEOPLE["wa17dan"][1], client)
        assert reply["ok"] is True, reply
        assert reply["expires_in"] <= 3
        code, out = env.gateway("web.session", behalf=behalf(reply, client))
        assert code == 0, out  # used within the idle time: alive
        last_use = time.monotonic()
        poll(lambda: time.monotonic() > last_use + 4, 30, "the idle time to pass")
        code, out = env.gateway("web.session", behalf=behalf(reply, client))
        assert (code, out["error"]) == (3, "SessionEnded"), out
    finally:
        old = env.digest()
        env.config.write_text(config_text(env.base))
        env.daemon.send_signal(signal.SIGHUP)
        poll(lambda: env.digest() != old, 30, "the reload back")


# ---- socket activation: the connection on standard input ----------------------------------------


def activated(env: Env, request: bytes, stderr_too: bool = False) -> tuple[int, bytes, str]:
    """``nvr-guard web-auth`` as nvr-guard-auth@.service runs it (Accept=yes: the connection is
    stdin and stdout; ``stderr_too``: a unit that forgot StandardError=journal): its exit code,
    everything the peer received, and its stderr."""
    peer, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    shadow = grp.getgrnam("shadow").gr_gid
    with peer:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(env.config), "web-auth"],
            stdin=conn,
            stdout=conn,
            stderr=conn if stderr_too else subprocess.PIPE,
            **env.as_user(AUTH, shadow),
        )
        conn.close()
        peer.sendall(request)
        peer.shutdown(socket.SHUT_WR)
        got = b""
        peer.settimeout(60)
        while chunk := peer.recv(65536):
            got += chunk
        _, err = proc.communicate(timeout=60)
    return proc.returncode, got, (err or b"").decode(errors="replace")


def test_socket_activated_the_helper_serves_the_connection_on_stdin(env: Env) -> None:
    password = PEOPLE["wa17cat"][1]
    code, got, err = activated(
        env, frame({"user": "wa17cat", "password": password, "client": "10.17.8.1"})
    )
    assert code == 0, err
    (n,) = struct.unpack(">I", got[:4])
    assert len(got) == 4 + n
    reply = json.loads(got[4:])
    assert reply["ok"] is True and reply["user"] == "wa17cat", reply
    assert "session opened" in err and password not in err

    code, got, err = activated(env, frame(b"not json"))
    assert code == 2
    assert json.loads(got[4:])["invalid"] is True

    # stderr on the connection too: the peer still gets exactly one frame, no log line
    code, got, _ = activated(
        env, frame({"user": "wa17cat", "password": "wrong-one", "client": "10.17.8.2"}), True
    )
    assert code == 0
    (n,) = struct.unpack(">I", got[:4])
    assert len(got) == 4 + n, got
    assert json.loads(got[4:])["ok"] is False


# ---- the shipped units ---------------------------------------------------------------------------


def test_the_helper_units_verify_and_keep_the_connection_free_of_log_lines(tmp_path: Path) -> None:
    from tests.integration.test_systemd import MAX_EXPOSURE, entry_point, exposure

    units = {}
    for name in ("nvr-guard-auth.socket", "nvr-guard-auth@.service"):
        text = (REPO / "systemd" / name).read_text()
        units[name] = text
        # verify insists that ExecStart's binary exists: the real entry point, as the venv drop-in
        (tmp_path / name).write_text(text.replace("=/usr/bin/nvr-guard ", f"={entry_point()} "))
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in units)],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stderr) == (0, "")
    service = units["nvr-guard-auth@.service"]
    for line in (
        "StandardInput=socket",
        "StandardError=journal",  # never the connection
        "User=nvr-guard-auth",
        "SupplementaryGroups=shadow nvr-guard",
        "RuntimeMaxSec=60",
    ):
        assert f"\n{line}\n" in service, line
    for line in ("Accept=yes", "SocketMode=0660", "SocketGroup=nvr-guard-web"):
        assert f"\n{line}\n" in units["nvr-guard-auth.socket"], line
    assert exposure(tmp_path / "nvr-guard-auth@.service") <= MAX_EXPOSURE
