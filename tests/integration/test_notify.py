"""Notifications end to end: a real daemon (its audit log makes the events), the web service's
Notifier (as the gateway account), a local SMTP server (aiosmtpd) and a local webhook receiver.

Real Unix users file and decide requests over the socket (SO_PEERCRED tells the daemon who
calls); one dept manager holds the role through a Unix group in people.groups."""

from __future__ import annotations

import email
import email.policy
import grp
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from nvr_guard.web.notify import Notifier, verify
from nvr_guard.wire import ControlClient
from tests.fixtures.site import LAYOUT, Site, poll, write_segment
from tests.fixtures.users import unix_accounts

pytestmark = pytest.mark.integration

GROUP = "nvrg-notify"
MGRS = "nvrg-nt-mgrs"  # a Unix group people.groups makes dept managers
ALICE = "nvrg-nt-alice"  # operator, the requester
BOB = "nvrg-nt-bob"  # dept_manager, own e-mail address
BEA = "nvrg-nt-bea"  # dept_manager through MGRS, address from the relay's domain
DORA = "nvrg-nt-dora"  # dept_manager at level 1: the camera is level 2
CAROL = "nvrg-nt-carol"  # security_lead
USERS = (ALICE, BOB, BEA, DORA, CAROL)
DOMAIN = "corp.example"
URL = "https://nvr.example/console/"
SECRET = b"webhook-secret\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    with unix_accounts(GROUP, USERS) as uids:
        made = False
        try:
            grp.getgrnam(MGRS)
        except KeyError:
            subprocess.run(["groupadd", MGRS], check=True)
            made = True
        subprocess.run(["gpasswd", "-a", BEA, MGRS], check=True, capture_output=True)
        try:
            yield uids
        finally:
            if made:
                subprocess.run(["groupdel", MGRS], check=False)


# ---- the SMTP relay and the webhook receiver ----------------------------------------------------


class Mailbox:
    """aiosmtpd handler: keeps every message; refuses every recipient while ``refuse`` is set."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.refused = 0
        self.refuse = False
        self.lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, opts: Any):
        if self.refuse:
            with self.lock:
                self.refused += 1
            return "550 5.7.1 relaying refused"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self.lock:
            self.messages.append(msg)
        return "250 Message accepted"

    def got(self) -> list[tuple[str, str, str]]:
        """(to, subject, body) of every message so far."""
        with self.lock:
            msgs = list(self.messages)
        out = []
        for m in msgs:
            body = m.get_body(("plain",))
            assert body is not None
            out.append((str(m["To"]), str(m["Subject"]), str(body.get_content())))
        return out


class Hooks:
    """A webhook receiver: records (headers, body, status answered); answers from ``script``
    first (e.g. 500 once), then 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.script: list[int] = []
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers["Content-Length"])
                body = self.rfile.read(n)
                with hooks.lock:
                    status = hooks.script.pop(0) if hooks.script else 200
                    hooks.posts.append((dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self) -> list[dict[str, Any]]:
        """The bodies answered 200, each checked against its signature."""
        with self.lock:
            posts = list(self.posts)
        out = []
        for headers, body, status in posts:
            ts = headers["X-Nvr-Guard-Timestamp"]
            assert verify(SECRET, ts, body, headers["X-Nvr-Guard-Signature"]), headers
            doc = json.loads(body)
            assert headers["X-Nvr-Guard-Event"] == doc["kind"]
            if status == 200:
                out.append(doc)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the daemon ---------------------------------------------------------------------------------


class Env:
    def __init__(
        self, site: Site, uids: dict[str, int], mailbox: Mailbox, smtp_port: int, hooks: Hooks
    ) -> None:
        self.site, self.uids = site, uids
        self.mailbox, self.hooks = mailbox, hooks
        self.smtp_port, self.hook_port = smtp_port, hooks.port
        self.proc: subprocess.Popen[bytes] | None = None
        self.prom = site.base / "nvr-guard.prom"
        self.notifiers: list[Notifier] = []

    def write_config(self, retry_for: str = "1h") -> None:
        secret = self.site.base / "webhook.secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        self.site.config.write_text(f"""state_dir: {self.site.state}
timezone: Asia/Shanghai
socket: {self.site.socket}
socket_group: {GROUP}
settle: 2m
sweep_every: 2s
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 0%, action: alert}}
sites:
  toll:
    keep: 15d
    roots: [{self.site.root}]
    layout: "{LAYOUT}"
cameras:
  cam1: {{level: 2}}
people:
  users:
    root: {{roles: [admin]}}
    {ALICE}: {{roles: [operator], level: 2}}
    {BOB}: {{roles: [dept_manager], level: 2, email: bob@example.org}}
    {BEA}: {{level: 2}}
    {DORA}: {{roles: [dept_manager], level: 1}}
    {CAROL}: {{roles: [security_lead], level: 2}}
  groups:
    {MGRS}: {{roles: [dept_manager]}}
approval:
  steps: [dept_manager, security_lead]
  valid_for: 8s
web:
  listen: 127.0.0.1:8443
  gateway_user: root
  url: {URL}
notify:
  smtp: {{host: 127.0.0.1, port: {self.smtp_port}, from: nvr@example.org, starttls: false,
          domain: {DOMAIN}}}
  webhook: {{url: "http://127.0.0.1:{self.hook_port}/hook", secret_file: {secret}}}
  retry_for: {retry_for}
metrics:
  textfile: {self.prom}
""")
        os.chmod(self.site.config, 0o644)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), "daemon"],
            stdout=open(self.site.base / "daemon.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        poll(lambda: self.site.daemon_answers(), 60, "the daemon")

    def stop(self) -> None:
        for n in self.notifiers:
            n.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def notifier(self) -> Notifier:
        from nvr_guard.config import load_config

        n = Notifier(
            load_config(self.site.config),
            lambda: ControlClient(self.site.socket, timeout=20),
            poll_interval=0.2,
            backoff=0.2,
            backoff_cap=1.0,
            timeout=5,
        )
        self.notifiers.append(n)
        n.start()
        return n

    def nvr(self, user: str, *args: str) -> dict[str, Any]:
        gid = grp.getgrnam(GROUP).gr_gid
        r = subprocess.run(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), "--json", *args],
            capture_output=True,
            text=True,
            timeout=120,
            user=self.uids[user],
            group=gid,
            extra_groups=[gid],
        )
        assert r.returncode == 0, f"{user} {args}: exit {r.returncode}: {r.stderr}"
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def new_request(self) -> int:
        start = datetime.now(UTC) - timedelta(hours=2)
        return int(
            self.nvr(
                ALICE, "request", "new", "--camera", "cam1",
                "--from", start.isoformat(), "--to", (start + timedelta(minutes=5)).isoformat(),
                "--reason", "robbery at gate 2", "--basis", "case 17",
                "--recipient", "City police; Officer Wang; 010-5555",
            )["id"]
        )  # fmt: skip

    def audit(self, action: str) -> list[dict[str, Any]]:
        r = self.site.run("--json", "audit", "show")
        assert r.returncode == 0, r.stderr
        return [e for e in json.loads(r.stdout)["entries"] if e["action"] == action]

    def status(self) -> dict[str, Any]:
        r = self.site.run("--json", "status")
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def metric(self, name: str, channel: str) -> float | None:
        if not self.prom.exists():
            return None
        for line in self.prom.read_text().splitlines():
            if line.startswith(f'{name}{{channel="{channel}"}} '):
                return float(line.split()[-1])
        return None


@pytest.fixture
def env(site: Site, users: dict[str, int]) -> Iterator[Env]:
    for p in [site.base, *site.base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    now = datetime.now(UTC).replace(microsecond=0)
    for i in range(20):
        write_segment(
            site.root, "cam1", now - timedelta(hours=2, minutes=10) + timedelta(minutes=i)
        )
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    hooks = Hooks()
    e = Env(site, users, mailbox, smtp.port, hooks)
    e.write_config()
    try:
        e.start()
        yield e
    finally:
        e.stop()
        smtp.stop()
        hooks.close()


def mails_to(e: Env, to: str) -> list[tuple[str, str]]:
    mb: Mailbox = e.mailbox
    return [(s, b) for t, s, b in mb.got() if t == to]


# ---- tests --------------------------------------------------------------------------------------


def test_the_right_people_hear_of_each_step_once(env: Env) -> None:
    mb: Mailbox = env.mailbox
    hooks: Hooks = env.hooks
    hooks.script = [500]  # the first POST fails; its retry is delivered
    alice, bob, bea, carol = (
        f"{ALICE}@{DOMAIN}",
        "bob@example.org",
        f"{BEA}@{DOMAIN}",
        f"{CAROL}@{DOMAIN}",
    )
    n = env.notifier()
    r1 = env.new_request()
    # filed: the dept managers who hold the camera's level (bob by people.users, bea through a
    # Unix group); not dora (level 1), not the requester, not the security lead yet
    poll(lambda: len(mb.got()) >= 2, 30, "the mails for the filed request")
    link = f"{URL}requests/{r1}"
    for to in (bob, bea):
        [(subject, body)] = mails_to(env, to)
        assert f"#{r1}" in subject and "待您审批" in subject and "awaits" in subject
        assert link in body and "dept_manager" in body
        assert "robbery" not in body and "Wang" not in body  # no reason, no contact
    env.nvr(BOB, "request", "approve", str(r1))
    poll(lambda: mails_to(env, carol), 30, "the security lead's mail")
    env.nvr(CAROL, "request", "approve", str(r1))
    poll(lambda: mails_to(env, alice), 30, "the requester's approval mail")
    [(subject, body)] = mails_to(env, alice)
    assert "已批准" in subject and "approved" in subject and link in body

    r2 = env.new_request()
    env.nvr(BOB, "request", "deny", str(r2), "--reason", "no case number")
    poll(lambda: len(mails_to(env, alice)) >= 2, 30, "the denial mail")
    assert "驳回" in mails_to(env, alice)[1][0] and "no case number" in mails_to(env, alice)[1][1]

    # request 1's approval was valid for 8 s: once the daemon settles it, the requester hears
    poll(
        lambda: env.nvr(ALICE, "request", "show", str(r1))["state"] == "expired",
        60,
        "request 1 to expire",
        max_delay=1.0,
    )
    poll(lambda: len(mails_to(env, alice)) >= 3, 30, "the expiry mail")
    assert "已过期" in mails_to(env, alice)[2][0]

    # the webhook: one signed POST per event, each delivered once, the first after a 500
    want = [
        ("waiting", r1),
        ("waiting", r1),
        ("approved", r1),
        ("waiting", r2),
        ("denied", r2),
        ("expired", r1),
    ]
    poll(lambda: len(hooks.delivered()) >= len(want), 30, "the webhook posts")
    got = hooks.delivered()
    assert [(d["kind"], d["request"]) for d in got] == want
    assert len({d["seq"] for d in got}) == len(got)
    assert [s for _, _, s in hooks.posts].count(500) == 1
    assert got[0]["url"] == link and "email" not in json.dumps(got[0])
    assert sorted(got[0]["recipients"]) == sorted([BOB, BEA])
    assert got[1]["recipients"] == [CAROL] and got[1]["step"] == "security_lead"
    # every mail went to exactly the people named, once
    assert sorted(t for t, _, _ in mb.got()) == sorted(
        [bob, bea, carol, alice, bob, bea, alice, alice]
    )
    poll(lambda: n.status()["pending"] == 0 and n.status()["cursor"], 10, "the cursor acked")
    st = n.status()
    assert st["sent"] == 8 + 6 and st["failed"] == 0, st

    # the web service restarts: nothing is delivered again; what happened meanwhile is not lost
    n.stop()
    sent_before, posts_before = len(mb.got()), len(hooks.delivered())
    r3 = env.new_request()
    n2 = env.notifier()
    poll(lambda: len(mb.got()) >= sent_before + 2, 30, "the mails of the request filed meanwhile")
    poll(lambda: len(hooks.delivered()) >= posts_before + 1, 30, "its webhook post")
    poll(lambda: n2.status()["pending"] == 0, 10, "the new notifier to be idle")
    assert len(mb.got()) == sent_before + 2
    assert [(d["kind"], d["request"]) for d in hooks.delivered()[posts_before:]] == [
        ("waiting", r3)
    ]
    assert n2.status()["sent"] == 3
    # the counters
    poll(lambda: env.metric("nvrguard_notifications_sent_total", "mail") == 10, 30, "metrics")
    assert env.metric("nvrguard_notifications_sent_total", "webhook") == 7
    assert env.metric("nvrguard_notifications_failed_total", "mail") == 0


def test_a_refusing_relay_is_retried_then_given_up_and_shown(env: Env) -> None:
    mb: Mailbox = env.mailbox
    hooks: Hooks = env.hooks
    env.stop()
    env.write_config(retry_for="3s")
    env.start()
    mb.refuse = True
    n = env.notifier()
    rid = env.new_request()
    # two mails (bob, bea), each retried with back-off, then given up after 3 s
    poll(lambda: n.status()["failed"] == 2, 30, "the mails to be given up")
    assert mb.refused >= 4, mb.refused  # each retried at least once
    assert mb.got() == []
    # the webhook still went: a failing channel does not hold up another
    assert [(d["kind"], d["request"]) for d in hooks.delivered()] == [("waiting", rid)]
    failed = env.audit("notify.failed")
    assert sorted(f["details"]["channel"] for f in failed) == [f"mail:{BEA}", f"mail:{BOB}"]
    assert {f["object"] for f in failed} == {f"request:{rid}"}
    assert "550" in failed[0]["details"]["error"]
    st = env.status()
    assert not st["ok"]
    [att] = [a for a in st["attention"] if a["kind"] == "notify_failed"]
    assert "mail" in att["message"] and "notify.smtp" in att["message"]
    poll(lambda: env.metric("nvrguard_notifications_failed_total", "mail") == 2, 30, "metrics")
    assert n.status()["last_error"] and "550" in n.status()["last_error"]

    # a restarted web service does not report them again (the daemon recorded them once)
    n.stop()
    n2 = env.notifier()
    poll(lambda: n2.status()["last_poll"] is not None, 10, "a poll")
    # the relay works again: the next mail is delivered and the attention entry clears
    mb.refuse = False
    env.nvr(BOB, "request", "approve", str(rid))
    poll(lambda: mails_to(env, f"{CAROL}@{DOMAIN}"), 30, "the next mail")
    poll(
        lambda: not [a for a in env.status().get("attention", []) if a["kind"] == "notify_failed"],
        10,
        "the attention entry to clear",
    )
    assert len(env.audit("notify.failed")) == 2  # audited once each
    assert [x["details"]["key"] for x in env.audit("attention.cleared")] == ["mail"]


def test_a_webhook_that_redirects_is_not_followed(site: Site) -> None:
    """A redirect is a failed delivery: the signed body is not sent to another address."""
    from nvr_guard.config import load_config

    got: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # where a followed redirect would land
            got.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        site.config.write_text(
            site.config.read_text()
            + f'notify: {{webhook: {{url: "http://127.0.0.1:{server.server_address[1]}/hook"}}}}\n'
        )
        n = Notifier(load_config(site.config), lambda: ControlClient(site.socket))
        doc = {"seq": 1, "kind": "waiting", "request": 1, "path": "/requests/1", "recipients": []}
        with pytest.raises(RuntimeError, match="HTTP 302"):
            n._post(doc)
        assert got == ["/hook"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_webhook_that_trickles_its_answer_is_cut_off_at_the_deadline(site: Site) -> None:
    """A receiver sending its status line a byte at a time never trips a per-read timeout; the
    delivery as a whole has a deadline, so it fails (and is retried) instead of holding every
    other notification up."""
    import socket as socketlib

    from nvr_guard.config import load_config

    listener = socketlib.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for ch in b"HTTP/1.1 200 OK\r\n":
                if stop.wait(0.5):
                    return
                try:
                    conn.sendall(bytes([ch]))
                except OSError:
                    return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        site.config.write_text(
            site.config.read_text()
            + f'notify: {{webhook: {{url: "http://127.0.0.1:{listener.getsockname()[1]}/h"}}}}\n'
        )
        n = Notifier(load_config(site.config), lambda: ControlClient(site.socket), timeout=2)
        doc = {"seq": 1, "kind": "waiting", "request": 1, "path": "/requests/1", "recipients": []}
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            n._post(doc)
        assert time.monotonic() - started < 6  # the status line alone would take 8.5 s
    finally:
        stop.set()
        listener.close()
        t.join(5)
