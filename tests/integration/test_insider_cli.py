"""Insiders with a role against a real daemon: a sweep runs at the real time and only for admins;
root acts on the state directly only while no daemon holds it; a refused reload is not success.

Real Unix users call the real daemon over its socket (SO_PEERCRED tells it who calls)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.engine import StateLock
from tests.fixtures.site import LAYOUT, Site, poll, write_segment
from tests.fixtures.users import unix_accounts

pytestmark = pytest.mark.integration

GROUP = "nvrg-insider"
OPERATOR = "nvrg-ins-op"  # role operator
ADMIN = "nvrg-ins-adm"  # role admin, not root
UNIX_USERS = (OPERATOR, ADMIN)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    """Real accounts (the suite runs as root, as CI does), removed afterwards."""
    with unix_accounts(GROUP, UNIX_USERS) as uids:
        yield uids


def write_config(site: Site, keep: str = "15d", min_keep: str = "10d") -> None:
    site.config.write_text(f"""state_dir: {site.state}
timezone: Asia/Shanghai
socket: {site.socket}
socket_group: {GROUP}
settle: 2m
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  toll:
    keep: {keep}
    min_keep: {min_keep}
    roots: [{site.root}]
    layout: "{LAYOUT}"
people:
  users:
    root: {{roles: [admin]}}
    {OPERATOR}: {{roles: [operator], level: 2}}
    {ADMIN}: {{roles: [admin]}}
""")
    os.chmod(site.config, 0o644)


class Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.logfile = site.base / f"daemon-{len(list(site.base.glob('daemon-*.log')))}.log"
        self.log = open(self.logfile, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> Daemon:
        poll(self.ready, 60, "the daemon to answer on its socket")
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.logtext()}")
        return self.site.daemon_answers()

    def logtext(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        rc = self.proc.wait()
        self.log.close()
        return rc


@pytest.fixture
def env(site: Site, users: dict[str, int], now: datetime) -> Iterator[Env]:
    # the unprivileged CLI must read its config and reach the socket directory
    for p in [site.base, *site.base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    write_config(site)
    e = Env(site, users, now)
    try:
        yield e
    finally:  # never leave a daemon behind, even when the test failed
        for d in e.daemons:
            d.stop()


class Env:
    def __init__(self, site: Site, uids: dict[str, int], now: datetime) -> None:
        self.site, self.uids, self.now = site, uids, now
        self.daemons: list[Daemon] = []
        # due by keep (20 days old), and inside the floor (5 days old)
        self.due = [
            write_segment(site.root, "cam1", now - timedelta(days=20, minutes=i)) for i in range(3)
        ]
        self.young = [
            write_segment(site.root, "cam1", now - timedelta(days=5, minutes=i)) for i in range(3)
        ]

    def start(self) -> Daemon:
        d = Daemon(self.site)
        self.daemons.append(d)
        return d

    def nvr(self, user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        if user is None:  # root: in this process
            return self.site.run(*args, timeout=120)
        gid = grp.getgrnam(GROUP).gr_gid
        return subprocess.run(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            user=self.uids[user],
            group=gid,
            extra_groups=[gid],
        )

    def audit(self) -> list[dict[str, Any]]:
        r = self.nvr(None, "--json", "audit", "show")
        assert r.returncode == 0, r.stderr
        entries: list[dict[str, Any]] = json.loads(r.stdout)["entries"]
        return entries

    def on_disk(self) -> set[Path]:
        return {p for p in self.due + self.young if p.exists()}


def denied(e: Env, actor: str, obj: str) -> list[dict[str, Any]]:
    return [
        x
        for x in e.audit()
        if x["action"] == "access.denied" and x["actor"] == actor and x["object"] == obj
    ]


# ---- item 1: nobody sweeps with a fake clock through the daemon ---------------------------------
def test_retention_run_now_through_the_daemon_is_refused_for_every_role(env: Env) -> None:
    # the daemon's own first sweep at start deletes what is due at the real time: wait for it
    d = env.start().wait_ready()
    poll(lambda: not any(p.exists() for p in env.due), 30, "the first real sweep")
    before = env.on_disk()
    assert before == set(env.young)
    # a month ahead: the young footage would be past keep and past its floor
    ahead = (env.now + timedelta(days=30)).isoformat()
    back = "2020-01-01T00:00:00+08:00"
    for user, name in ((OPERATOR, OPERATOR), (ADMIN, ADMIN), (None, "root")):
        for when in (ahead, back):
            r = env.nvr(user, "retention", "run", "--now", when)
            assert r.returncode == 3, f"{name} --now {when}: exit {r.returncode}: {r.stderr}"
            assert "real time" in r.stderr and "Traceback" not in r.stderr
            assert env.on_disk() == before, f"{name} --now {when} deleted footage"
        hits = denied(env, name, "retention.run")
        assert {h["details"]["now"] for h in hits} >= {ahead, back}, hits
    # nothing deleted, and no sweep was recorded at a fake time: a real sweep still runs cleanly
    # (a sweep recorded at 2020 or a month ahead would trip the clock guard now)
    r = env.nvr(ADMIN, "--json", "retention", "run")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["deleted"] == 0 and not res.get("trips"), res
    assert env.on_disk() == before
    assert d.proc.poll() is None


def test_retention_run_needs_the_admin_role(env: Env) -> None:
    env.start().wait_ready()
    poll(lambda: not any(p.exists() for p in env.due), 30, "the first real sweep")
    r = env.nvr(OPERATOR, "retention", "run")
    assert r.returncode == 3, r.stderr
    assert "admin" in r.stderr and "Traceback" not in r.stderr
    hits = denied(env, OPERATOR, "run a retention sweep")
    assert hits and hits[-1]["details"]["needs"] == ["admin"], hits
    # an admin who is not root may sweep (at the real time)
    r = env.nvr(ADMIN, "--json", "retention", "run")
    assert r.returncode == 0, r.stderr
    assert env.on_disk() == set(env.young)


# ---- issue 12 item 12: root acts locally only when no daemon holds the state --------------------
def test_root_does_not_act_locally_beside_an_unreachable_daemon(env: Env) -> None:
    d = env.start().wait_ready()
    poll(lambda: not any(p.exists() for p in env.due), 30, "the first real sweep")
    # the daemon is alive but cannot be reached (as when it is busy or slow to answer)
    hidden = env.site.socket.with_name("hidden.sock")
    env.site.socket.rename(hidden)
    try:
        ahead = (env.now + timedelta(days=30)).isoformat()
        for args in (
            ("retention", "run", "--now", ahead),
            ("retention", "run"),
            ("hold", "list"),
        ):
            r = env.nvr(None, *args)
            assert r.returncode == 1, f"{args}: exit {r.returncode}: {r.stderr}"
            assert "holds" in r.stderr and "nothing was done locally" in r.stderr, r.stderr
        assert env.on_disk() == set(env.young)
        # a preview works on a scratch copy: it needs neither the daemon nor the lock
        r = env.nvr(None, "--json", "retention", "plan", "--now", ahead)
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout)
        assert plan["deleted"] == 0
        # due a month ahead (the clock guard holds them back: the last sweep was now)
        assert {i["path"] for i in plan["items"] if i["action"] in ("delete", "blocked")} == {
            str(p) for p in env.young
        }, plan["items"]
        assert env.on_disk() == set(env.young)
    finally:
        hidden.rename(env.site.socket)
    assert d.ready()
    # once the daemon is gone, root may act locally, --now included
    assert d.stop() == 0
    r = env.nvr(None, "--json", "retention", "run", "--now", ahead)
    assert r.returncode in (0, 3), r.stderr  # 3: the clock guard sees the month's jump
    assert json.loads(r.stdout)["sweep"] is not None


def test_a_second_daemon_on_the_same_state_refuses_to_start(env: Env) -> None:
    first = env.start().wait_ready()
    second = env.start()
    assert second.proc.wait(timeout=60) == 1, second.logtext()
    assert "holds" in second.logtext() and str(first.proc.pid) in second.logtext()
    # the first one still serves, on its own socket
    assert first.ready()
    assert env.site.socket.exists()


def test_a_starting_daemon_waits_for_a_local_command(env: Env) -> None:
    local = StateLock(env.site.state)
    assert local.try_shared()  # as a local root command does while it acts
    try:
        d = env.start()
        poll(lambda: "waiting for local" in d.logtext(), 30, "the daemon to wait for the lock")
        assert not env.site.socket.exists()
        assert d.proc.poll() is None
    finally:
        local.close()
    d.wait_ready()


# ---- item 15: `nvr-guard reload` reports a refused reload ---------------------------------------
def status(e: Env) -> dict[str, Any]:
    r = e.nvr(None, "--json", "status")
    st: dict[str, Any] = json.loads(r.stdout)
    assert "error" not in st, r.stderr
    assert r.returncode == (0 if st["ok"] else 1), r.stderr  # like systemctl is-active
    return st


def test_reload_refused_is_exit_2_and_an_attention_state_until_a_good_one(env: Env) -> None:
    env.start().wait_ready()
    good = env.site.config.read_text()
    env.site.config.write_text(good.replace("keep: 15d", "keep: 15 days"))
    r = env.nvr(ADMIN, "reload")
    assert r.returncode == 2, r.stderr
    assert f"{env.site.config}:" in r.stderr and "15 days" in r.stderr, r.stderr
    st = status(env)
    assert st["ok"] is False
    kinds = [a["kind"] for a in st["attention"]]
    assert kinds == ["reload_refused"], st["attention"]
    # the old config is still in force
    assert st["sites"]["toll"]["rule"] == "keep=15d min_keep=10d"
    r = env.nvr(None, "--json", "reload")
    assert r.returncode == 2
    assert json.loads(r.stdout)["applied"] is False
    # an operator may not reload (exit 3, audited)
    env.site.config.write_text(good.replace("keep: 15d", "keep: 16d"))
    r = env.nvr(OPERATOR, "reload")
    assert r.returncode == 3, r.stderr
    assert denied(env, OPERATOR, "reload the config")
    assert status(env)["ok"] is False
    # a good config: applied, exit 0, attention cleared
    r = env.nvr(ADMIN, "--json", "reload")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["applied"] is True
    st = status(env)
    assert st["ok"] is True and st["attention"] == []
    assert st["sites"]["toll"]["rule"] == "keep=16d min_keep=10d"
    actions = [x["action"] for x in env.audit()]
    assert "config.reload_failed" in actions and "attention.cleared" in actions


@pytest.mark.parametrize(
    "breakage",
    ["syntax", "unreadable"],
)
def test_reload_of_a_file_the_cli_cannot_parse_still_reaches_the_daemon(
    env: Env, breakage: str
) -> None:
    """A YAML syntax error (or a file the admin's shell cannot read) must not make the CLI look
    for the default socket and report "daemon not running": the daemon is asked, refuses, and
    the refusal is exit 2 with FILE:LINE, an attention state and an audit entry."""
    env.start().wait_ready()
    good = env.site.config.read_text()
    if breakage == "syntax":
        env.site.config.write_text(good + "sites: [unclosed\n")
        r = env.nvr(ADMIN, "reload")
        assert r.returncode == 2, r.stderr
        assert f"{env.site.config}:" in r.stderr and "syntax" in r.stderr, r.stderr
        st = status(env)
        assert [a["kind"] for a in st["attention"]] == ["reload_refused"], st["attention"]
    else:
        env.site.config.write_text(good + "sites: [unclosed\n")
        os.chmod(env.site.config, 0o600)  # root's file; the admin user cannot read it
        r = env.nvr(ADMIN, "reload")
        assert r.returncode == 2, r.stderr  # not "daemon not running" (exit 1)
        assert f"{env.site.config}:" in r.stderr, r.stderr
        r = env.nvr(ADMIN, "status")  # nor for status: the file names the socket
        assert r.returncode == 2 and "not running" not in r.stderr, r.stderr
        assert "cannot read" in r.stderr
        os.chmod(env.site.config, 0o644)
    env.site.config.write_text(good)
    if breakage == "syntax":  # the daemon read the broken file itself: its refusal is on record
        assert "config.reload_failed" in [x["action"] for x in env.audit()]
    assert env.nvr(ADMIN, "reload").returncode == 0
    assert status(env)["attention"] == []


def test_sighup_raises_and_clears_the_reload_attention(env: Env) -> None:
    d = env.start().wait_ready()
    good = env.site.config.read_text()
    env.site.config.write_text(good + "unknown_key: 1\n")
    d.proc.send_signal(signal.SIGHUP)
    poll(lambda: not status(env)["ok"], 30, "the refused reload to show")
    assert [a["kind"] for a in status(env)["attention"]] == ["reload_refused"]
    env.site.config.write_text(good)
    d.proc.send_signal(signal.SIGHUP)
    poll(lambda: status(env)["ok"], 30, "the good reload to clear the attention state")


def test_reload_without_a_daemon_exits_1(env: Env) -> None:
    r = env.nvr(None, "reload")
    assert r.returncode == 1 and "not running" in r.stderr, r.stderr


def test_a_reload_reschedules_the_full_rescan(env: Env) -> None:
    """rescan_every changed by a reload takes effect (only the sweep was rescheduled before: the
    full walks behind `unmatched` and `clock_skew` kept the old interval until a restart)."""
    d = env.start().wait_ready()

    def walks() -> int:
        return d.logtext().count("reconcile: ") - d.logtext().count("incremental reconcile: ")

    poll(lambda: walks() >= 1, 30, "the start-up walk")
    before = walks()
    good = env.site.config.read_text()
    env.site.config.write_text(good.replace("sweep_every: 1h", "sweep_every: 1h\nrescan_every: 2s"))
    assert env.nvr(ADMIN, "reload").returncode == 0
    poll(lambda: walks() >= before + 2, 60, "two full walks at the new interval")


# ---- a role granted through a group ends with the group membership ------------------------------
GROUP_ADMINS = "nvrg-ins-adms"
GROUP_ADMIN = "nvrg-ins-grp"  # admin only through GROUP_ADMINS


def test_a_revoked_group_role_stops_working_at_once(env: Env) -> None:
    """The daemon caches a peer's names for a few seconds (admission at connect under a flood);
    the role of each command is judged on the groups the user has at that moment."""
    subprocess.run(["groupadd", GROUP_ADMINS], check=True)
    try:
        subprocess.run(
            [
                "useradd",
                "-M",
                "-N",
                "-g",
                GROUP,
                "-G",
                GROUP_ADMINS,
                "-s",
                "/usr/sbin/nologin",
                GROUP_ADMIN,
            ],
            check=True,
        )
        env.uids[GROUP_ADMIN] = pwd.getpwnam(GROUP_ADMIN).pw_uid
        text = env.site.config.read_text()
        env.site.config.write_text(text + f"  groups:\n    {GROUP_ADMINS}: {{roles: [admin]}}\n")
        env.start().wait_ready()
        span = (
            "--from",
            (env.now - timedelta(days=8)).isoformat(),
            "--to",
            (env.now - timedelta(days=7)).isoformat(),
        )
        first = env.nvr(GROUP_ADMIN, "hold", "add", "--camera", "cam1", *span, "--reason", "r1")
        assert first.returncode == 0, first.stderr  # the group's role works (and is cached)
        subprocess.run(
            ["gpasswd", "-d", GROUP_ADMIN, GROUP_ADMINS], check=True, capture_output=True
        )
        second = env.nvr(GROUP_ADMIN, "hold", "add", "--camera", "cam1", *span, "--reason", "r2")
        assert second.returncode == 3, (second.returncode, second.stdout, second.stderr)
        assert "no role" in second.stderr
        reasons = [x["details"].get("reason") for x in env.audit() if x["action"] == "hold.add"]
        assert reasons == ["r1"]
        assert denied(env, GROUP_ADMIN, "hold.add")
    finally:
        subprocess.run(["userdel", GROUP_ADMIN], check=False, capture_output=True)
        subprocess.run(["groupdel", GROUP_ADMINS], check=False, capture_output=True)


def test_a_request_its_caller_gave_up_on_is_not_carried_out_later(env: Env) -> None:
    """A stopped daemon reads the waiting request when it continues: the caller was told the
    daemon did not answer, and a retry must not act twice."""
    from nvr_guard.errors import DaemonUnavailable
    from nvr_guard.wire import ControlClient

    d = env.start().wait_ready()
    args = {
        "camera": "cam1",
        "from": (env.now - timedelta(days=8)).isoformat(),
        "to": (env.now - timedelta(days=7)).isoformat(),
        "reason": "given up",
    }
    d.proc.send_signal(signal.SIGSTOP)
    try:
        client = ControlClient(env.site.socket, timeout=1.0)
        with pytest.raises(DaemonUnavailable, match="did not answer"):
            client.call("hold.add", args)  # the client closes its end on the timeout
    finally:
        d.proc.send_signal(signal.SIGCONT)
    d.wait_ready()
    poll(lambda: "left before its request could be served" in d.logtext(), 20, "the log line")
    holds = json.loads(env.nvr(None, "--json", "hold", "list").stdout)
    assert not [h for h in holds["holds"] if h.get("reason") == "given up"], holds
    # the same request from a caller who waits is served
    with ControlClient(env.site.socket, timeout=30.0) as client:
        client.call("hold.add", args)
    holds = json.loads(env.nvr(None, "--json", "hold", "list").stdout)
    assert [h for h in holds["holds"] if h.get("reason") == "given up"]
    # a caller that only shut down its sending side after the request still waits: served
    import socket
    import struct

    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(30)
        raw.connect(str(env.site.socket))
        body = json.dumps({"v": 1, "cmd": "status", "args": {}}).encode()
        raw.sendall(struct.pack(">I", len(body)) + body)
        raw.shutdown(socket.SHUT_WR)
        (n,) = struct.unpack(">I", raw.recv(4, socket.MSG_WAITALL))
        reply = json.loads(raw.recv(n, socket.MSG_WAITALL))
    assert "result" in reply and reply.get("error") is None, reply
