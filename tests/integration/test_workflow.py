"""The retrieval workflow end to end: real Unix users call the real daemon over its socket; the
daemon identifies them with SO_PEERCRED, applies the rules, exports with real ffmpeg, and every
step and refusal lands in the audit chain."""

from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.fixtures.clamav import eicar_bytes
from tests.fixtures.cli import run_cli
from tests.fixtures.media import MediaLab, fake_usb_stick
from tests.fixtures.site import LAYOUT, Site, daemon_answered, make_footage, poll
from tests.fixtures.users import unix_accounts

SH = ZoneInfo("Asia/Shanghai")
GROUP = "nvrg-test"
USERS = {
    "nvrg-alice": "operator",
    "nvrg-bob": "dept_manager",
    "nvrg-carol": "security_lead",
    "nvrg-tom": "technician",
    "nvrg-dan": "duty_manager",
    "nvrg-eve": None,  # a valid Unix user the config does not know
}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def unix_users() -> Iterator[dict[str, int]]:
    """Real accounts (the suite runs as root, as CI does), removed afterwards."""
    with unix_accounts(GROUP, USERS) as uids:
        yield uids


class Env:
    def __init__(self, site: Site, target: Path, uids: dict[str, int]):
        self.site, self.target, self.uids = site, target, uids
        self.proc: subprocess.Popen[bytes] | None = None

    def nvr(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), *args],
            capture_output=True,
            text=True,
            timeout=300,
            user=self.uids[user],
            group=grp.getgrnam(GROUP).gr_gid,
            extra_groups=[grp.getgrnam(GROUP).gr_gid],
        )

    def ok(self, user: str, *args: str) -> dict:
        r = self.nvr(user, "--json", *args)
        # status exits 1 while not ok (its document says why), as it does when no daemon answers
        not_ok = args == ("status",) and daemon_answered(r) and not json.loads(r.stdout)["ok"]
        assert r.returncode == int(not_ok), f"{user} {args}: exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def refused(self, user: str, *args: str, code: int = 3) -> str:
        r = self.nvr(user, *args)
        assert r.returncode == code, f"{user} {args}: exit {r.returncode} (want {code}): {r.stderr}"
        assert r.stderr.strip() and "Traceback" not in r.stderr
        return r.stderr

    def audit(self) -> list[dict]:
        r = run_cli(["--config", str(self.site.config), "--json", "audit", "show"])
        r.check_returncode()
        return json.loads(r.stdout)["entries"]


def write_config(site: Site, target: Path, hours: str, db: Path) -> None:
    site.config.write_text(f"""state_dir: {site.state}
timezone: Asia/Shanghai
socket: {site.socket}
socket_group: {GROUP}
settle: 2m
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  bank:
    profile: general
    roots: [{site.root}]
    layout: "{LAYOUT}"
cameras:
  lobby-1: {{level: 1, name: "营业厅"}}
  street-1: {{level: 2, name: "街道"}}
people:
  users:
    nvrg-alice: {{roles: [operator], level: 1}}
    nvrg-bob: {{roles: [dept_manager]}}
    nvrg-carol: {{roles: [security_lead]}}
    nvrg-tom: {{roles: [technician]}}
    nvrg-dan: {{roles: [duty_manager]}}
approval:
  steps: [dept_manager, security_lead]
  hours: "{hours}"
  emergency: {{roles: [security_lead], backfill_within: 24h}}
export:
  targets: [{target}]
  preset: ultrafast
media:
  scanner: clamscan
  database: {db}
  sysfs_root: {site.base / "sysfs"}
""")


@pytest.fixture
def env(site: Site, unix_users, tmp_path, clamav_db):
    # the unprivileged CLI must read its config and reach the socket directory
    for p in [site.base, *site.base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    target = tmp_path / "export-target"
    target.mkdir()
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    make_footage(site.root, "lobby-1", start, 3)
    make_footage(site.root, "street-1", start, 1)
    e = Env(site, target, unix_users)
    e.start = start
    e.db = clamav_db
    (site.base / "sysfs" / "block").mkdir(parents=True)
    write_config(site, target, hours_around_now(inside=True), clamav_db)
    os.chmod(site.config, 0o644)
    e.proc = subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
        stdout=open(site.base / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        poll(
            lambda: (
                site.socket.exists()
                and e.nvr("nvrg-alice", "--json", "request", "list").returncode == 0
            ),
            60,
            "the daemon",
        )
        yield e
    finally:  # never leave a daemon behind, even when the set-up failed
        e.proc.terminate()
        try:
            e.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            e.proc.kill()
            e.proc.wait()


def hours_around_now(inside: bool) -> str:
    """A site-local opening-hours window that contains now, or one that surely does not."""
    now = datetime.now(SH)
    if inside:
        a, b = now - timedelta(hours=1), now + timedelta(hours=1)
        if a.date() != now.date():
            a = now.replace(hour=0, minute=0)
        if b.date() != now.date():
            b = now.replace(hour=23, minute=59)
    else:
        a, b = now + timedelta(hours=2), now + timedelta(hours=3)
        if b.date() != a.date() or a.date() != now.date():
            a, b = now - timedelta(hours=3), now - timedelta(hours=2)
    return f"{a:%H:%M}-{b:%H:%M}"


def reload_with(e: Env, hours: str) -> None:
    old = e.ok("nvrg-alice", "status")["config_digest"]
    write_config(e.site, e.target, hours, e.db)
    e.proc.send_signal(signal.SIGHUP)
    poll(lambda: e.ok("nvrg-alice", "status")["config_digest"] != old, 20, "the reload")


def span(e: Env, a: int, b: int) -> list[str]:
    return [
        "--from",
        (e.start + timedelta(seconds=a)).isoformat(),
        "--to",
        (e.start + timedelta(seconds=b)).isoformat(),
    ]


def new_request(
    e: Env, user: str = "nvrg-alice", camera: str = "lobby-1", extra: tuple = ()
) -> int:
    r = e.ok(
        user,
        "request",
        "new",
        "--camera",
        camera,
        *span(e, 5, 25),
        "--reason",
        "robbery at counter 3 / 柜台抢劫",
        "--basis",
        "刑事诉讼法 art. 54",
        "--recipient",
        "City police, unit 2; Officer Wang; 010-5555",
        *extra,
    )
    return int(r["id"])


def test_request_to_verified_package(env: Env):
    e = env
    rid = new_request(e)
    st = e.ok("nvrg-alice", "status")
    assert [r["id"] for r in st["open_requests"]["pending"]] == [rid]
    show = e.ok("nvrg-alice", "request", "show", str(rid))
    assert show["id"] == rid and show["state"] == "pending" and show["approvals"] == []
    # the requested footage is held at once
    holds = e.ok("nvrg-carol", "hold", "list")["holds"]
    assert any(h["kind"] == "request" and h["camera"] == "lobby-1" for h in holds)

    e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))  # not approved yet
    e.ok("nvrg-bob", "request", "approve", str(rid), "--note", "ok")
    e.refused("nvrg-bob", "request", "approve", str(rid))  # the same person twice
    after = e.ok("nvrg-carol", "request", "approve", str(rid))
    assert after["state"] == "approved"
    assert [a["approver"] for a in after["approvals"]] == ["nvrg-bob", "nvrg-carol"]

    e.refused("nvrg-alice", "export", "run", str(rid), "--media", str(e.target))  # not a technician
    e.refused("nvrg-tom", "export", "run", str(rid), "--media", "/tmp")  # not an export target
    # the gate: nothing is written where no fresh clean scan says so
    assert "scan" in e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    scan = e.ok("nvrg-tom", "media", "scan", str(e.target))
    assert scan["result"] == "clean"
    assert e.ok("nvrg-tom", "status")["last_scans"][0]["result"] == "clean"
    (e.target / "dropped-later.txt").write_text("a file added after the scan")
    assert "scan" in e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    (e.target / "dropped-later.txt").unlink()
    (e.target / "eicar.com").write_bytes(eicar_bytes())
    r = e.nvr("nvrg-tom", "--json", "media", "scan", str(e.target))
    assert r.returncode == 3 and json.loads(r.stdout)["result"] == "infected"
    e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    (e.target / "eicar.com").unlink()
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"
    assert not any(e.target.iterdir())  # every refusal left the target untouched
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    pkg = Path(res["package"])
    assert pkg.is_absolute() and pkg.parent == e.target
    assert {
        "manifest.json",
        "manifest.sig",
        "signer.pub",
        "approval-record.html",
        "VERIFY.txt",
    } <= {p.name for p in pkg.iterdir()}
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert json.dumps(manifest, ensure_ascii=False).count("nvrg-carol") >= 1
    v = run_cli(["verify", str(pkg)])
    assert v.returncode == 0, v.stderr
    assert e.ok("nvrg-alice", "request", "show", str(rid))["state"] == "exported"
    e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))  # only once

    clip = next(p for p in pkg.iterdir() if p.suffix == ".mp4")
    with open(clip, "r+b") as fh:
        fh.seek(clip.stat().st_size // 2)
        fh.write(b"tampered")
    v = run_cli(["verify", str(pkg)])
    assert v.returncode == 4 and clip.name in (v.stdout + v.stderr)

    actions = [x["action"] for x in e.audit() if x["object"] == f"request:{rid}"]
    manifest_media = json.dumps(manifest, ensure_ascii=False)
    assert "clamscan" in manifest_media  # the scan record travels in the manifest
    for a in ("request.new", "request.approve", "export.begin", "export.done", "export.refused"):
        assert a in actions
    assert run_cli(["--config", str(e.site.config), "audit", "verify"]).returncode == 0


def test_refusals(env: Env):
    e = env
    rid = new_request(e)
    msg = e.refused("nvrg-alice", "request", "approve", str(rid))
    assert "nvrg-alice" in msg or "own" in msg
    # level 1 user, level 2 camera
    msg = e.refused(
        "nvrg-alice",
        "request",
        "new",
        "--camera",
        "street-1",
        *span(e, 0, 5),
        "--reason",
        "x",
        "--basis",
        "y",
        "--recipient",
        "a; b; c",
    )
    assert "street-1" in msg and "level" in msg
    # unknown camera, empty range, no footage, missing recipient fields
    for camera, (a, b), recipient in (
        ("nope", (0, 5), "a; b; c"),
        ("lobby-1", (5, 5), "a; b; c"),
        ("lobby-1", (-7200, -3600), "a; b; c"),
        ("lobby-1", (0, 5), "just a unit"),
    ):
        e.refused(
            "nvrg-alice", "request", "new", "--camera", camera, *span(e, a, b),
            "--reason", "x", "--basis", "y", "--recipient", recipient,
        )  # fmt: skip
    # deny needs a reason; a denial ends the request
    e.refused("nvrg-bob", "request", "deny", str(rid), "--reason", " ")
    assert (
        e.ok("nvrg-bob", "request", "deny", str(rid), "--reason", "no case number")["state"]
        == "denied"
    )
    # someone without a role is refused and audited
    e.refused("nvrg-eve", "request", "list")
    denied = [x for x in e.audit() if x["action"] == "access.denied"]
    assert any(x["actor"] == "nvrg-eve" for x in denied)
    # cancel: only the requester (or an admin)
    rid2 = new_request(e)
    e.refused("nvrg-bob", "request", "cancel", str(rid2))
    assert e.ok("nvrg-alice", "request", "cancel", str(rid2))["state"] == "cancelled"


def test_outside_hours_needs_a_duty_manager(env: Env):
    e = env
    rid = new_request(e)
    e.ok("nvrg-bob", "request", "approve", str(rid))
    e.ok("nvrg-carol", "request", "approve", str(rid))
    reload_with(e, hours_around_now(inside=False))
    msg = e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    assert "duty_manager" in msg
    assert not any(e.target.iterdir())  # nothing written
    e.ok("nvrg-dan", "request", "approve", str(rid), "--note", "night shift, case urgent")
    e.ok("nvrg-tom", "media", "scan", str(e.target))
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    assert Path(res["package"]).is_dir()


def test_emergency_exports_at_once_and_shows_its_backfill(env: Env):
    e = env
    # an operator may not invoke the emergency procedure
    e.refused(
        "nvrg-alice",
        "request",
        "new",
        "--camera",
        "lobby-1",
        *span(e, 0, 10),
        "--reason",
        "armed robbery",
        "--basis",
        "刑事诉讼法",
        "--recipient",
        "police; Wang; 110",
        "--emergency",
    )
    rid = new_request(e, user="nvrg-carol", extra=("--emergency",))
    e.ok("nvrg-tom", "media", "scan", str(e.target))
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    assert Path(res["package"]).is_dir()
    shown = e.ok("nvrg-carol", "request", "show", str(rid))
    assert shown["state"] == "exported" and shown["emergency"] is True
    assert shown["open_steps"]  # approvals still to be back-filed within 24 h
    e.ok("nvrg-bob", "request", "approve", str(rid))


def test_export_onto_an_enrolled_scanned_usb_stick(env: Env, media_lab: MediaLab):
    """A real loop device with ext4, described as a USB stick by a fake sysfs tree."""
    e = env
    stick = media_lab.loop(128, label="EVIDENCE")
    mp = media_lab.mount(stick.device)
    os.chmod(mp, 0o755)
    fake_usb_stick(e.site.base / "sysfs", stick, serial="NVRG0001")
    listed = e.ok("nvrg-tom", "media", "list")["media"]
    usb = [m for m in listed if m.get("serial") == "NVRG0001"]
    assert len(usb) == 1 and usb[0]["mountpoint"] == str(mp) and usb[0]["enrolled"] is None
    mid = usb[0]["id"]

    rid = new_request(e)
    e.ok("nvrg-bob", "request", "approve", str(rid))
    e.ok("nvrg-carol", "request", "approve", str(rid))
    assert "enrol" in e.refused("nvrg-tom", "export", "run", str(rid), "--media", mid)
    e.refused("nvrg-tom", "media", "enroll", mid, "--label", "stick 1")  # admins enrol
    r = e.site.run("--json", "media", "enroll", mid, "--label", "evidence stick 1")  # root: admin
    assert r.returncode == 0, r.stderr
    assert "scan" in e.refused("nvrg-tom", "export", "run", str(rid), "--media", mid)
    assert e.ok("nvrg-tom", "media", "scan", mid)["result"] == "clean"
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", mid)
    pkg = Path(res["package"])
    assert pkg.parent == mp and (pkg / "manifest.sig").is_file()
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert "NVRG0001" in json.dumps(manifest)  # the medium and its scan are in the manifest
    v = run_cli(["verify", str(pkg)])
    assert v.returncode == 0, v.stderr
    actions = {x["action"] for x in e.audit()}
    assert {"media.enroll", "media.scan", "export.refused", "export.done"} <= actions


def test_wipe_formats_an_unmounted_stick_when_configured(env: Env, media_lab: MediaLab):
    e = env
    stick = media_lab.loop(128, label="OLDSTUFF")
    fake_usb_stick(e.site.base / "sysfs", stick, serial="NVRG0002")
    mid = next(
        m["id"] for m in e.ok("nvrg-tom", "media", "list")["media"] if m.get("serial") == "NVRG0002"
    )
    # off unless the config says media.prepare: wipe
    assert "prepare" in e.site.run("media", "wipe", mid, "--confirm", mid).stderr
    cfg = e.site.config.read_text().replace(
        "  scanner: clamscan\n", "  scanner: clamscan\n  prepare: wipe\n"
    )
    old = e.ok("nvrg-alice", "status")["config_digest"]
    e.site.config.write_text(cfg)
    e.proc.send_signal(signal.SIGHUP)
    poll(lambda: e.ok("nvrg-alice", "status")["config_digest"] != old, 20, "the reload")
    e.refused("nvrg-tom", "media", "wipe", mid, "--confirm", mid)  # admins only
    r = e.site.run("media", "wipe", mid, "--confirm", "something-else")
    assert r.returncode == 2 and mid in r.stderr
    mp = media_lab.mount(stick.device)
    os.chmod(mp, 0o755)
    assert "mounted" in e.site.run("media", "wipe", mid, "--confirm", mid).stderr
    # an export went out on it; the medium comes back and is wiped: the copy is destroyed
    rid = new_request(e)
    e.ok("nvrg-bob", "request", "approve", str(rid))
    e.ok("nvrg-carol", "request", "approve", str(rid))
    assert e.site.run("media", "enroll", mid, "--label", "stick 2").returncode == 0
    assert e.ok("nvrg-tom", "media", "scan", mid)["result"] == "clean"
    e.ok("nvrg-tom", "export", "run", str(rid), "--media", mid)
    assert e.ok("nvrg-alice", "request", "show", str(rid))["destroyed"] is None
    media_lab.umount(mp)
    r = e.site.run("--json", "media", "wipe", mid, "--confirm", mid)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["copies_destroyed"] == [rid]
    gone = e.ok("nvrg-alice", "request", "show", str(rid))["destroyed"]
    assert gone["how"] == f"medium returned and wiped (media wipe of {mid})"
    probe = subprocess.run(
        ["blkid", "-p", "-o", "export", stick.device], capture_output=True, text=True
    ).stdout
    assert "TYPE=vfat" in probe
    wipes = [x for x in e.audit() if x["action"] == "media.wipe"]
    assert [w["details"]["phase"] for w in wipes] == ["begin", "done"]
