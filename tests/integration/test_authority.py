"""Footage never leaves without standing authority: the request -> approval -> export workflow
tried as an insider would, with real Unix users against a real daemon and real ffmpeg.

Each test is the regression test of one way footage got out (issue 12): an emergency export long
after its window, an export that ignored a deny landing while ffmpeg ran, two exports of one
request, approvers and technicians without the cameras' level, an approver exporting what they
approved, requests readable by anyone with a role, a back-filled violation reopened by a reload,
one after-hours approval covering every later night.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fixtures.site import Site, daemon_answered, make_footage, poll
from tests.fixtures.users import unix_accounts
from tests.integration.test_workflow import hours_around_now

# Own names: other test modules create and remove their own nvrg-* users while this one runs.
GROUP = "nvra-test"

pytestmark = pytest.mark.integration

# user -> (roles, level)
PEOPLE: dict[str, tuple[list[str], int]] = {
    "nvra-alice": (["operator"], 1),
    "nvra-olga": (["operator"], 2),
    "nvra-bob": (["dept_manager"], 1),
    "nvra-bea": (["dept_manager"], 2),
    "nvra-carol": (["security_lead"], 2),
    "nvra-sid": (["security_lead"], 2),
    "nvra-dan": (["duty_manager"], 1),
    "nvra-tom": (["technician"], 1),
    "nvra-tia": (["technician"], 2),
    "nvra-tess": (["technician", "dept_manager"], 2),
    "nvra-aud": (["auditor"], 2),
}


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    """Real accounts (the suite runs as root, as CI does), removed afterwards."""
    with unix_accounts(GROUP, PEOPLE) as uids:
        yield uids


class Env:
    def __init__(self, site: Site, targets: list[Path], uids: dict[str, int], db: Path) -> None:
        self.site, self.targets, self.uids, self.db = site, targets, uids, db
        self.proc: subprocess.Popen[bytes] | None = None
        self.start = datetime.now(UTC)
        self.hours = ""
        self.preset = "ultrafast"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), *args]

    def as_user(self, user: str) -> dict[str, Any]:
        gid = grp.getgrnam(GROUP).gr_gid
        return {"user": self.uids[user], "group": gid, "extra_groups": [gid]}

    def nvr(self, user: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, **self.as_user(user)
        )

    def ok(self, user: str, *args: str) -> Any:
        r = self.nvr(user, "--json", *args)
        # status exits 1 while not ok (its document says why), as it does when no daemon answers
        not_ok = args == ("status",) and daemon_answered(r) and not json.loads(r.stdout)["ok"]
        assert r.returncode == int(not_ok), f"{user} {args}: exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def refused(self, user: str, *args: str, timeout: float = 300) -> str:
        r = self.nvr(user, *args, timeout=timeout)
        assert r.returncode == 3, f"{user} {args}: exit {r.returncode} (want 3): {r.stderr}"
        assert r.stderr.strip() and "Traceback" not in r.stderr
        return r.stderr

    def audit(self) -> list[dict[str, Any]]:
        r = self.site.run("--json", "audit", "show")
        r.check_returncode()
        return list(json.loads(r.stdout)["entries"])

    def write_config(self, hours: str, approval: str = "", preset: str = "ultrafast") -> None:
        emergency = "\n  emergency: {roles: [security_lead], backfill_within: 24h}"
        users = "\n".join(
            f"    {n}: {{roles: [{', '.join(r)}], level: {lv}}}" for n, (r, lv) in PEOPLE.items()
        )
        self.site.config.write_text(f"""state_dir: {self.site.state}
timezone: Asia/Shanghai
socket: {self.site.socket}
socket_group: {GROUP}
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  bank:
    profile: general
    roots: [{self.site.root}]
    layout: "{{camera}}/%Y-%m-%d/%H/%M.%S.mp4"
cameras:
  lobby-1: {{level: 1}}
  street-1: {{level: 2}}
people:
  users:
{users}
approval:
  steps: [dept_manager, security_lead]
  hours: "{hours}"
{approval if "emergency:" in approval else approval + emergency}
export:
  targets: [{", ".join(str(t) for t in self.targets)}]
  preset: {preset}
media:
  scanner: clamscan
  database: {self.db}
  sysfs_root: {self.site.base / "sysfs"}
""")
        os.chmod(self.site.config, 0o644)

    def reload(self, hours: str, approval: str = "") -> None:
        old = self.ok("nvra-aud", "status")["config_digest"]
        self.write_config(hours, approval, self.preset)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        poll(lambda: self.ok("nvra-aud", "status")["config_digest"] != old, 20, "the reload")

    def new(self, user: str, camera: str = "lobby-1", *extra: str) -> int:
        res = self.ok(
            user,
            "request",
            "new",
            "--camera",
            camera,
            "--from",
            (self.start + timedelta(seconds=1)).isoformat(),
            "--to",
            (self.start + timedelta(seconds=19)).isoformat(),
            "--reason",
            "robbery at counter 3",
            "--basis",
            "刑事诉讼法 art. 54",
            "--recipient",
            "City police; Officer Wang; 010-5555",
            *extra,
        )
        return int(res["id"])

    def export_cmd(self, user: str, rid: int, target: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv("--json", "export", "run", str(rid), "--media", str(target)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **self.as_user(user),
        )

    def encoder(self) -> psutil.Process:
        """The daemon's running export encode (the ffmpeg reporting -progress)."""
        assert self.proc is not None
        daemon = psutil.Process(self.proc.pid)

        def find() -> psutil.Process | None:
            for p in daemon.children(recursive=True):
                try:
                    if p.name() == "ffmpeg" and "-progress" in p.cmdline():
                        return p
                except psutil.NoSuchProcess:
                    continue
            return None

        found: psutil.Process = poll(find, 120, "the export's ffmpeg")
        return found

    def packages(self, target: Path) -> list[Path]:
        return sorted(target.iterdir())


EnvFactory = Callable[..., Env]


@pytest.fixture
def make_env(
    site: Site, users: dict[str, int], tmp_path: Path, clamav_db: Path
) -> Iterator[EnvFactory]:
    envs: list[Env] = []

    def make(
        approval: str = "",
        hours: str | None = None,
        size: str = "320x240",
        preset: str = "ultrafast",
    ) -> Env:
        for p in [site.base, *site.base.parents]:
            if str(p).startswith(tempfile.gettempdir() + "/"):
                os.chmod(p, 0o755)
        targets = [tmp_path / "t1", tmp_path / "t2"]
        for t in targets:
            t.mkdir()
        e = Env(site, targets, users, clamav_db)
        e.start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
        make_footage(site.root, "lobby-1", e.start, 2, size=size)
        make_footage(site.root, "street-1", e.start, 2)
        (site.base / "sysfs" / "block").mkdir(parents=True)
        e.preset = preset
        e.hours = hours or hours_around_now(inside=True)
        e.write_config(e.hours, approval, preset)
        e.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
            stdout=open(site.base / "daemon.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        envs.append(e)
        last: list[str] = []

        def up() -> bool:
            assert e.proc is not None
            if e.proc.poll() is not None:
                log = (site.base / "daemon.log").read_text(errors="replace")
                raise AssertionError(f"daemon exited {e.proc.returncode}: {log[-3000:]}")
            if not site.socket.exists():
                return False
            r = e.nvr("nvra-aud", "status")
            last[:] = [f"exit {r.returncode}: {r.stderr.strip()[-500:]}"]
            return r.returncode in (0, 1)

        try:
            poll(up, 120, "the daemon")
        except AssertionError as exc:
            log = (site.base / "daemon.log").read_text(errors="replace")
            raise AssertionError(f"{exc}; last status {last}; daemon log: {log[-3000:]}") from None
        return e

    try:
        yield make
    finally:
        for e in envs:
            if e.proc is not None:
                e.proc.terminate()
                try:
                    e.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    e.proc.kill()
                    e.proc.wait()


def approved(e: Env, rid: int, *approvers: str) -> None:
    for who in approvers:
        e.ok(who, "request", "approve", str(rid))
    assert e.ok("nvra-aud", "request", "show", str(rid))["state"] == "approved"


def actions(e: Env, rid: int) -> list[str]:
    return [x["action"] for x in e.audit() if x["object"] == f"request:{rid}"]


# ---- 1. the emergency "at once" path closes with its back-fill window ---------------------------
def test_emergency_export_without_approvals_only_within_the_backfill_window(make_env: EnvFactory):
    e = make_env(approval="  emergency: {roles: [security_lead], backfill_within: 3s}")
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    rid = e.new("nvra-carol", "lobby-1", "--emergency")
    filed = time.time()
    # the window is 3 s: wait for it to pass (waiting on time itself, not on another process)
    poll(lambda: time.time() > filed + 4, 10, "the end of the back-fill window")
    msg = e.refused("nvra-tom", "export", "run", str(rid), "--media", str(e.targets[0]))
    assert "emergency window closed" in msg and "not approved" in msg
    assert e.packages(e.targets[0]) == []
    # with its full approvals it is a request like any other
    approved(e, rid, "nvra-bob", "nvra-sid")
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    assert Path(
        e.ok("nvra-tom", "export", "run", str(rid), "--media", str(e.targets[0]))["package"]
    ).is_dir()


# ---- 2. a deny during the export aborts it ------------------------------------------------------
def test_a_deny_that_lands_while_ffmpeg_runs_aborts_the_export(make_env: EnvFactory):
    e = make_env(size="640x480", preset="medium")
    rid = e.new("nvra-alice")
    approved(e, rid, "nvra-bob", "nvra-carol")
    target = e.targets[0]
    e.ok("nvra-tom", "media", "scan", str(target))
    export = e.export_cmd("nvra-tom", rid, target)
    ffmpeg = e.encoder()
    ffmpeg.suspend()  # a slow encode, made certain: the deny lands while it runs
    try:
        e.ok("nvra-bob", "request", "deny", str(rid), "--reason", "case withdrawn by police")
        try:
            out, err = export.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            ffmpeg.resume()  # the old code waits for ffmpeg, then exports anyway
            out, err = export.communicate(timeout=120)
    finally:
        if ffmpeg.is_running():
            ffmpeg.resume()
    assert export.returncode == 3, (export.returncode, out, err)
    assert "aborted" in err and "denied" in err
    assert not ffmpeg.is_running()
    assert e.packages(target) == []  # not even a hidden temporary is left
    shown = e.ok("nvra-aud", "request", "show", str(rid))
    assert shown["state"] == "denied" and shown["package"] is None
    acts = actions(e, rid)
    assert "export.aborted" in acts and "export.done" not in acts
    assert e.site.run("audit", "verify").returncode == 0


def test_a_reload_that_takes_authority_away_while_ffmpeg_runs_aborts_the_export(
    make_env: EnvFactory,
):
    """The export hours change by a reload while ffmpeg runs: the export is now after hours and
    needs a duty manager's approval it does not have, so it is aborted at commit (real daemon,
    real ffmpeg, SIGHUP); the request stays approved for a later export."""
    e = make_env(size="640x480", preset="medium")
    rid = e.new("nvra-alice")
    approved(e, rid, "nvra-bob", "nvra-carol")
    target = e.targets[0]
    e.ok("nvra-tom", "media", "scan", str(target))
    export = e.export_cmd("nvra-tom", rid, target)
    ffmpeg = e.encoder()
    ffmpeg.suspend()
    try:
        e.reload(hours_around_now(inside=False))
        out, err = export.communicate(timeout=60)  # stopped while ffmpeg was still suspended
    finally:
        if ffmpeg.is_running():
            ffmpeg.resume()
    assert not ffmpeg.is_running()
    assert export.returncode == 3, (export.returncode, out, err)
    assert "aborted" in err
    assert e.packages(target) == []
    shown = e.ok("nvra-aud", "request", "show", str(rid))
    assert shown["state"] == "approved" and shown["package"] is None
    acts = actions(e, rid)
    assert "export.aborted" in acts and "export.done" not in acts
    assert e.site.run("audit", "verify").returncode == 0


# ---- 3. one export per request, claimed before ffmpeg starts ----------------------------------
def test_two_exports_of_one_request_at_once_only_the_first_runs(make_env: EnvFactory):
    e = make_env(size="640x480", preset="medium")
    rid = e.new("nvra-alice")
    approved(e, rid, "nvra-bob", "nvra-carol")
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    e.ok("nvra-tia", "media", "scan", str(e.targets[1]))
    first = e.export_cmd("nvra-tom", rid, e.targets[0])
    ffmpeg = e.encoder()
    ffmpeg.suspend()
    try:
        # the old code queued the second export behind the first and then ran it too
        msg = e.refused(
            "nvra-tia", "export", "run", str(rid), "--media", str(e.targets[1]), timeout=60
        )
        assert "being exported by nvra-tom" in msg and "one export per request" in msg
    finally:
        ffmpeg.resume()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert Path(json.loads(out)["package"]).parent == e.targets[0]
    assert len(e.packages(e.targets[0])) == 1 and e.packages(e.targets[1]) == []
    assert actions(e, rid).count("export.done") == 1
    denied = [x for x in e.audit() if x["action"] == "access.denied" and x["actor"] == "nvra-tia"]
    assert denied and "being exported" in denied[-1]["details"]["reason"]


# ---- 4. levels for everyone who approves or exports ---------------------------------------------
def test_approvers_and_technicians_need_the_level_of_every_camera(make_env: EnvFactory):
    e = make_env()
    rid = e.new("nvra-olga", "lobby-1,street-1")
    msg = e.refused("nvra-bob", "request", "approve", str(rid))  # level 1, street-1 is level 2
    # told what an id that does not exist tells; the reason is on record
    assert f"may not see request {rid}" in msg and "street-1" not in msg
    bob = [x for x in e.audit() if x["action"] == "access.denied" and x["actor"] == "nvra-bob"]
    assert "street-1" in bob[-1]["details"]["reason"] and "level 2" in bob[-1]["details"]["reason"]
    approved(e, rid, "nvra-bea", "nvra-carol")
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    msg = e.refused("nvra-tom", "export", "run", str(rid), "--media", str(e.targets[0]))
    assert "nvra-tom" in msg and "street-1" not in msg  # not shown to him at all
    tom = [x for x in e.audit() if x["action"] == "access.denied" and x["actor"] == "nvra-tom"]
    assert "street-1" in tom[-1]["details"]["reason"]
    assert e.packages(e.targets[0]) == []
    approvers = [a["approver"] for a in e.ok("nvra-aud", "request", "show", str(rid))["approvals"]]
    assert approvers == ["nvra-bea", "nvra-carol"]


# ---- 5. separation of duties --------------------------------------------------------------------
def test_an_approver_may_not_export_what_they_approved(make_env: EnvFactory):
    e = make_env()
    rid = e.new("nvra-alice")
    e.ok("nvra-tess", "request", "approve", str(rid))  # as dept_manager
    approved(e, rid, "nvra-carol")
    e.ok("nvra-tess", "media", "scan", str(e.targets[0]))
    msg = e.refused("nvra-tess", "export", "run", str(rid), "--media", str(e.targets[0]))
    assert "separation of duties" in msg and "approver_may_export" in msg
    assert e.packages(e.targets[0]) == []
    # a site that allows it says so in its config
    e.reload(hours_around_now(inside=True), "  approver_may_export: true")
    e.ok("nvra-tess", "media", "scan", str(e.targets[0]))
    res = e.ok("nvra-tess", "export", "run", str(rid), "--media", str(e.targets[0]))
    assert Path(res["package"]).is_dir()


# ---- 6. who reads a request ---------------------------------------------------------------------
def test_requests_are_shown_only_to_the_people_concerned(make_env: EnvFactory):
    e = make_env()
    rid = e.new("nvra-alice")
    other = e.new("nvra-olga", "street-1")
    msg = e.refused("nvra-olga", "request", "show", str(rid))
    assert f"may not see request {rid}" in msg
    assert "010-5555" not in msg
    e.refused("nvra-olga", "export", "form", str(rid))
    # an id that does not exist looks the same: ids cannot be probed
    assert "may not see request 999" in e.refused("nvra-olga", "request", "show", "999")
    assert [r["id"] for r in e.ok("nvra-olga", "request", "list")["requests"]] == [other]
    assert {r["id"] for r in e.ok("nvra-alice", "request", "list")["requests"]} == {rid}
    # level 1 approvers and technicians do not see a level 2 request
    assert {r["id"] for r in e.ok("nvra-bob", "request", "list")["requests"]} == {rid}
    assert {r["id"] for r in e.ok("nvra-tom", "request", "list")["requests"]} == {rid}
    e.refused("nvra-tom", "request", "show", str(other))
    # the auditor reads everything and does nothing
    assert {r["id"] for r in e.ok("nvra-aud", "request", "list")["requests"]} == {rid, other}
    assert e.ok("nvra-aud", "request", "show", str(rid))["recipient"]["contact"] == "010-5555"
    e.refused("nvra-aud", "request", "approve", str(rid))
    r = e.nvr("nvra-aud", "request", "new", "--camera", "lobby-1",
              "--from", (e.start + timedelta(seconds=1)).isoformat(),
              "--to", (e.start + timedelta(seconds=9)).isoformat(),
              "--reason", "x", "--basis", "y", "--recipient", "a; b; c")  # fmt: skip
    assert r.returncode == 3 and "may not file" in r.stderr
    assert e.ok("nvra-aud", "status")["requests"]
    denied = [(x["actor"], x["object"]) for x in e.audit() if x["action"] == "access.denied"]
    assert ("nvra-olga", f"request:{rid}") in denied
    assert ("nvra-olga", "request:999") in denied
    assert ("nvra-tom", f"request:{other}") in denied


# ---- 7. judged by the rules in force when it was decided ----------------------------------------
def test_a_backfilled_emergency_stays_closed_after_the_hours_change(make_env: EnvFactory):
    e = make_env(approval="  emergency: {roles: [security_lead], backfill_within: 20s}")
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    rid = e.new("nvra-carol", "lobby-1", "--emergency")
    filed = time.time()
    e.ok("nvra-tom", "export", "run", str(rid), "--media", str(e.targets[0]))  # in hours
    e.ok("nvra-bob", "request", "approve", str(rid))
    e.ok("nvra-sid", "request", "approve", str(rid))
    shown = e.ok("nvra-aud", "request", "show", str(rid))
    assert shown["open_steps"] == []
    poll(lambda: time.time() > filed + 21, 30, "the end of the back-fill window")
    assert e.ok("nvra-aud", "status")["violations"] == []
    # new hours that put the export outside them: the old code asked for a duty manager now
    e.reload(
        hours_around_now(inside=False),
        "  emergency: {roles: [security_lead], backfill_within: 20s}",
    )
    st = e.ok("nvra-aud", "status")
    assert st["violations"] == [] and st["open_requests"]["overdue"] == []
    shown = e.ok("nvra-aud", "request", "show", str(rid))
    assert shown["violation"] is None and shown["open_steps"] == []
    assert "request.violation" not in actions(e, rid)
    # the rules it was judged by are in its record: the export's hours, not today's
    assert shown["judged_by"]["hours"] == e.hours


# ---- 8. an after-hours approval covers exports for after_hours_valid -------------------------
def test_an_after_hours_approval_does_not_cover_later_nights(make_env: EnvFactory):
    e = make_env(approval="  after_hours_valid: 3s", hours=hours_around_now(inside=False))
    rid = e.new("nvra-alice")
    approved(e, rid, "nvra-bob", "nvra-carol")
    e.ok("nvra-dan", "request", "approve", str(rid), "--note", "night shift")
    given = time.time()
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    poll(lambda: time.time() > given + 4, 10, "the after-hours approval to lapse")
    msg = e.refused("nvra-tom", "export", "run", str(rid), "--media", str(e.targets[0]))
    assert "duty_manager" in msg and "nvra-dan" in msg and "covered exports for 3 s" in msg
    assert e.packages(e.targets[0]) == []


# ---- 9. separation of duties in the other order: export first, then approve ------------------
def test_the_exporter_of_an_emergency_request_may_not_back_fill_its_approval(
    make_env: EnvFactory,
):
    e = make_env()
    e.ok("nvra-tess", "media", "scan", str(e.targets[0]))
    rid = e.new("nvra-carol", "lobby-1", "--emergency")
    e.ok("nvra-tess", "export", "run", str(rid), "--media", str(e.targets[0]))  # at once
    # the old code let her fill the dept_manager step of what she had taken off the box
    msg = e.refused("nvra-tess", "request", "approve", str(rid))
    assert "nvra-tess exported request" in msg and "separation of duties" in msg
    e.refused("nvra-tess", "request", "approve", str(rid), "--as", "dept_manager")
    shown = e.ok("nvra-aud", "request", "show", str(rid))
    assert shown["approvals"] == [] and shown["open_steps"] == ["dept_manager", "security_lead"]
    # other people back-fill it
    e.ok("nvra-bob", "request", "approve", str(rid))
    e.ok("nvra-sid", "request", "approve", str(rid))
    shown = e.ok("nvra-aud", "request", "show", str(rid))
    assert [a["approver"] for a in shown["approvals"]] == ["nvra-bob", "nvra-sid"]
    assert shown["open_steps"] == []
    denied = [x for x in e.audit() if x["action"] == "access.denied"]
    assert any(x["actor"] == "nvra-tess" and x["object"] == f"request:{rid}" for x in denied)


# ---- 10. holds and status name a request only to those who may see it -------------------------
def test_hold_list_and_status_show_request_details_only_to_its_viewers(make_env: EnvFactory):
    e = make_env()
    rid = e.new("nvra-alice")  # lobby-1, level 1
    other = e.new("nvra-olga", "street-1")  # level 2
    manual = e.site.run(
        "--json", "hold", "add", "--camera", "lobby-1", "--reason", "insurance claim 7",
        "--from", e.start.isoformat(), "--to", (e.start + timedelta(minutes=1)).isoformat(),
    )  # fmt: skip
    assert manual.returncode == 0, manual.stderr

    def holds(user: str, *args: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        res = e.ok(user, *args)
        return res["holds"], res.get("holds_not_shown")

    def of(hs: list[dict[str, Any]], r: int) -> list[dict[str, Any]]:
        return [h for h in hs if h["reason"].startswith(f"request {r}:")]

    for cmd in (("hold", "list"), ("status",)):
        # another operator: the old code showed alice's reason, name, camera and range
        shown, hidden = holds("nvra-olga", *cmd)
        assert of(shown, rid) == [] and "nvra-alice" not in json.dumps(shown)
        assert len(of(shown, other)) == 1  # her own
        assert hidden == [{"site": "bank", "requests": 1}]
        assert [h["reason"] for h in shown if h["kind"] == "manual"] == ["insurance claim 7"]
        # the requester and a level-1 approver see alice's, not the level-2 one
        for user in ("nvra-alice", "nvra-bob", "nvra-tom"):
            shown, hidden = holds(user, *cmd)
            assert len(of(shown, rid)) == 1 and of(shown, other) == []
            assert hidden == [{"site": "bank", "requests": 1}]
        # the auditor sees both
        shown, hidden = holds("nvra-aud", *cmd)
        assert len(of(shown, rid)) == 1 and len(of(shown, other)) == 1 and hidden == []
    st = e.ok("nvra-olga", "status")
    assert [p["id"] for p in st["open_requests"]["pending"]] == [other]
    assert st["requests"] == {"pending": 2}  # counted, not named
    text = e.nvr("nvra-olga", "hold", "list")
    assert text.returncode == 0 and "nvra-alice" not in text.stdout
    # alice's hold is not shown, olga's own is (both requests give the reason "robbery ...")
    assert f"request {rid}:" not in text.stdout and f"request {other}: robbery" in text.stdout
    assert "1 request(s) not shown to you" in text.stdout


# ---- 11. export.progress answers only to those who may see the request -----------------------
def test_export_progress_is_refused_like_request_show(make_env: EnvFactory):
    e = make_env()
    rid = e.new("nvra-alice")
    approved(e, rid, "nvra-bob", "nvra-carol")
    e.ok("nvra-tom", "media", "scan", str(e.targets[0]))
    e.ok("nvra-tom", "export", "run", str(rid), "--media", str(e.targets[0]))
    sock = str(e.site.socket)
    script = (
        "import json, sys\n"
        "from nvr_guard.wire import call\n"
        "from nvr_guard.errors import NvrGuardError\n"
        "out = {}\n"
        "for i in map(int, sys.argv[2:]):\n"
        "    try:\n"
        "        out[i] = ['ok', call(sys.argv[1], 'export.progress', {'id': i})['progress']]\n"
        "    except NvrGuardError as x:\n"
        "        out[i] = [x.exit_code, str(x)]\n"
        "print(json.dumps(out))\n"
    )

    def probe(user: str, *ids: int) -> dict[str, Any]:
        r = subprocess.run(
            [sys.executable, "-c", script, sock, *map(str, ids)],
            capture_output=True, text=True, timeout=60, **e.as_user(user),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    # another operator probing ids: the old code answered 1.0 for the exported one, null for others
    got = probe("nvra-olga", rid, 999)
    for i in (rid, 999):
        code, msg = got[str(i)]
        assert code == 3 and f"may not see request {i}" in msg, got
    # the people concerned get the answer
    assert probe("nvra-tom", rid)[str(rid)] == ["ok", 1.0]
    assert probe("nvra-aud", rid, 999)[str(rid)] == ["ok", 1.0]
    denied = [(x["actor"], x["object"]) for x in e.audit() if x["action"] == "access.denied"]
    assert ("nvra-olga", f"request:{rid}") in denied and ("nvra-olga", "request:999") in denied


# ---- 12. the audit log through the daemon, to auditors ----------------------------------------
def test_auditors_read_the_audit_log_through_the_daemon_and_nobody_else(make_env: EnvFactory):
    e = make_env()
    rid = e.new("nvra-alice")
    os.chmod(e.site.state, 0o700)  # as installed
    # the old code read the file directly: PermissionError, "internal error", exit 1
    for user in ("nvra-aud", "nvra-carol"):
        shown = e.ok(user, "audit", "show", "--request", str(rid))["entries"]
        assert [x["action"] for x in shown] == ["request.new"]
        assert shown[0]["details"]["recipient"]["contact"] == "010-5555"
        r = e.nvr(user, "audit", "verify")
        assert r.returncode == 0 and "audit chain intact" in r.stdout, r.stderr
    assert e.ok("nvra-aud", "audit", "verify")["ok"] is True
    # anyone else is refused, and the attempt is on record
    for user in ("nvra-alice", "nvra-tom"):
        for cmd in (("audit", "show"), ("audit", "verify")):
            msg = e.refused(user, *cmd)
            assert "audit log" in msg and "010-5555" not in msg
    denied = [(x["actor"], x["object"]) for x in e.audit() if x["action"] == "access.denied"]
    assert ("nvra-alice", "read the audit log") in denied
    assert ("nvra-tom", "verify the audit log") in denied
    # a file the user may not read is one line naming it and who may, never an internal error
    r = e.nvr("nvra-aud", "audit", "reanchor", "--accept-head", "1", "--reason", "x")
    assert r.returncode == 3, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert "\n" not in line and "internal error" not in line and "Traceback" not in line
    assert str(e.site.state) in line and "only root" in line
    # without a daemon only root reads the file
    assert e.proc is not None
    e.proc.terminate()
    e.proc.wait(timeout=30)
    r = e.nvr("nvra-aud", "audit", "show")
    assert r.returncode == 1 and "internal error" not in r.stderr, r.stderr
    assert "only root reads the audit log" in r.stderr and "catalog.db" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert any(x["object"] == f"request:{rid}" for x in e.audit())  # root, locally
    r = e.site.run("audit", "verify")
    assert r.returncode == 0 and "intact" in r.stdout, r.stderr


def test_the_daemon_creates_the_catalog_readable_by_its_owner_only(make_env: EnvFactory):
    e = make_env()
    e.new("nvra-alice")  # something in it worth reading: a reason, a recipient's contact
    # the old code left them 0644: readable by anyone who can enter state_dir
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        mode = (e.site.state / name).stat().st_mode & 0o777
        assert mode == 0o600, (name, oct(mode))
