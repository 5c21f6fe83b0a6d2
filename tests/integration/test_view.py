"""Viewing without copying (调阅) and still previews: real Unix users call the real daemon over
its control socket; the daemon transcodes real footage with ffmpeg and hands the requester an
open read-only descriptor of the watermarked clip (SCM_RIGHTS), never a path."""

from __future__ import annotations

import base64
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.site import Site, make_footage, poll
from tests.fixtures.users import unix_accounts
from tests.integration.test_workflow import hours_around_now

GROUP = "nvrv-test"
# user -> (roles, level)
PEOPLE: dict[str, tuple[list[str], int]] = {
    "nvrv-alice": (["operator"], 1),
    "nvrv-olga": (["operator"], 2),
    "nvrv-bob": (["dept_manager"], 2),
    "nvrv-ben": (["dept_manager"], 1),
    "nvrv-carol": (["security_lead"], 2),
    "nvrv-tom": (["technician"], 2),
    "nvrv-aud": (["auditor"], 2),
}

pytestmark = pytest.mark.integration

# Runs as the given user: one control call, its result, what the descriptors it received are,
# and how many descriptors the process holds after the call beyond those it held before.
CLIENT = r"""
import fcntl, json, os, sys
from nvr_guard.wire import ControlClient

sock, cmd, args, mode, out = sys.argv[1:6]
args = json.loads(args)

def count():
    return len(os.listdir("/proc/self/fd"))

doc = {}
try:
    with ControlClient(sock, timeout=60) as c:
        before = count()
        if mode == "call":
            doc["result"] = c.call(cmd, args)
        else:
            res, fds = c.call_with_fds(cmd, args)
            doc["result"], doc["fds"] = res, len(fds)
            for fd in fds:
                doc["readonly"] = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                doc["cloexec"] = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                try:
                    os.write(fd, b"x")
                    doc["writable"] = True
                except OSError:
                    doc["writable"] = False
                with open(out, "wb") as f:
                    pos = 0
                    while chunk := os.pread(fd, 1 << 20, pos):
                        f.write(chunk)
                        pos += len(chunk)
                if mode == "fds":
                    os.close(fd)
        doc["leaked"] = count() - before
except Exception as e:
    doc["error"], doc["message"] = type(e).__name__, str(e)
    doc["code"] = getattr(e, "exit_code", None)
print(json.dumps(doc))
"""


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    """Real accounts (the suite runs as root), removed afterwards."""
    with unix_accounts(GROUP, PEOPLE) as uids:
        yield uids


class Env:
    def __init__(self, site: Site, uids: dict[str, int], out: Path) -> None:
        self.site, self.uids, self.out = site, uids, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.start = datetime.now(UTC)

    def as_user(self, user: str) -> dict[str, Any]:
        gid = grp.getgrnam(GROUP).gr_gid
        return {"user": self.uids[user], "group": gid, "extra_groups": [gid]}

    def nvr(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), *args],
            capture_output=True,
            text=True,
            timeout=300,
            **self.as_user(user),
        )

    def ok(self, user: str, *args: str) -> Any:
        r = self.nvr(user, "--json", *args)
        assert r.returncode == 0, f"{user} {args}: exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def control(
        self, user: str, cmd: str, args: dict[str, Any], mode: str = "fds", out: str = "clip.mp4"
    ) -> dict[str, Any]:
        """One control call as ``user`` through the real socket (see CLIENT)."""
        r = subprocess.run(
            [sys.executable, "-c", CLIENT, str(self.site.socket), cmd, json.dumps(args), mode,
             str(self.out / out)],
            capture_output=True,
            text=True,
            timeout=300,
            **self.as_user(user),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def refused(self, user: str, cmd: str, rid: int) -> str:
        doc = self.control(user, cmd, {"id": rid})
        assert doc.get("code") == 3, doc
        assert "fds" not in doc
        return str(doc["message"])

    def new(self, user: str = "nvrv-alice", camera: str = "lobby-1", fmt: str = "view") -> int:
        res = self.ok(
            user,
            "request", "new", "--camera", camera,
            "--from", (self.start + timedelta(seconds=1)).isoformat(),
            "--to", (self.start + timedelta(seconds=19)).isoformat(),
            "--reason", "a customer's complaint at counter 2",
            "--basis", "internal rule 7",
            "--recipient", "Branch office; Ms Li; 010-5555",
            "--format", fmt,
        )  # fmt: skip
        return int(res["id"])

    def approve(self, rid: int, *who: str) -> None:
        for user in who:
            self.ok(user, "request", "approve", str(rid))

    def audit(self, action: str, rid: int | None = None) -> list[dict[str, Any]]:
        r = self.site.run("--json", "audit", "show")
        r.check_returncode()
        return [
            e
            for e in json.loads(r.stdout)["entries"]
            if e["action"] == action and (rid is None or e["object"] == f"request:{rid}")
        ]

    def ready(self, user: str, rid: int) -> dict[str, Any]:
        first = self.control(user, "view.prepare", {"id": rid}, mode="call")
        assert first.get("result", {}).get("state") in ("preparing", "ready"), first

        def done() -> dict[str, Any] | None:
            doc = self.control(user, "view.prepare", {"id": rid}, mode="call")
            assert "result" in doc, doc
            state = doc["result"]["state"]
            assert state != "failed", doc
            return doc if state == "ready" else None

        result: dict[str, Any] = poll(done, 120, "the viewing clip", max_delay=0.5)
        return result

    def views(self) -> list[str]:
        return sorted(os.listdir(self.site.state / "views"))


def write_config(e: Env, hours: str, valid_for: str, previews: bool) -> None:
    people = "\n".join(
        f"    {n}: {{roles: [{', '.join(r)}], level: {lv}}}" for n, (r, lv) in PEOPLE.items()
    )
    e.site.config.write_text(f"""state_dir: {e.site.state}
timezone: Asia/Shanghai
socket: {e.site.socket}
socket_group: {GROUP}
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  bank:
    profile: general
    roots: [{e.site.root}]
    layout: "{{camera}}/%Y-%m-%d/%H/%M.%S.mp4"
cameras:
  lobby-1: {{level: 1}}
  street-1: {{level: 2}}
people:
  users:
{people}
approval:
  steps: [dept_manager, security_lead]
  hours: "{hours}"
  valid_for: {valid_for}
web:
  listen: "127.0.0.1:8443"
  previews: {"true" if previews else "false"}
""")
    os.chmod(e.site.config, 0o644)


EnvFactory = Callable[..., Env]


@pytest.fixture
def make_env(users: dict[str, int]) -> Iterator[EnvFactory]:
    """A daemon on its own site. The site lives outside pytest's base directory: other users
    must reach its config and socket, and a pytest session starting meanwhile (on a shared
    machine) makes that directory 0700 again."""
    envs: list[Env] = []
    base = Path(tempfile.mkdtemp(prefix="nvrv-", dir="/tmp"))
    os.chmod(base, 0o755)

    def make(valid_for: str = "30d", previews: bool = True) -> Env:
        site = Site(base, base / "rec", base / "config.yaml", base / "state", base / "run/c.sock")
        site.root.mkdir()
        out = base / "out"
        out.mkdir()
        os.chmod(out, 0o777)
        e = Env(site, users, out)
        e.start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
        make_footage(site.root, "lobby-1", e.start, 2)
        make_footage(site.root, "street-1", e.start, 2, size="640x360")
        write_config(e, hours_around_now(inside=True), valid_for, previews)
        e.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
            stdout=open(site.base / "daemon.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        envs.append(e)

        def up() -> bool:
            assert e.proc is not None
            if e.proc.poll() is not None:
                log = (site.base / "daemon.log").read_text(errors="replace")
                raise AssertionError(f"daemon exited {e.proc.returncode}: {log[-3000:]}")
            return site.socket.exists() and e.nvr("nvrv-aud", "status").returncode in (0, 1)

        poll(up, 120, "the daemon")
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
        shutil.rmtree(base, ignore_errors=True)


def ffprobe(path: Path) -> dict[str, Any]:
    cp = subprocess.run(
        ["ffprobe", "-v", "error", "-of", "json", "-show_format", "-show_streams", str(path)],
        capture_output=True,
        check=True,
    )
    doc: dict[str, Any] = json.loads(cp.stdout)
    return doc


def gray_frame(path: Path, at: float | None, size: tuple[int, int]) -> bytes:
    """One frame at ``at`` seconds (an image: None) as 8-bit grey pixels of ``size``."""
    w, h = size
    seek = [] if at is None else ["-ss", f"{at:.3f}"]
    pixels = subprocess.run(
        ["ffmpeg", "-v", "error", *seek, "-i", str(path), "-frames:v", "1",
         "-vf", f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert len(pixels) == w * h, f"{path}: {len(pixels)} bytes of a {w}x{h} frame"
    return pixels


def region_diff(a: bytes, b: bytes, width: int, rows: range, cols: range) -> float:
    total = sum(abs(a[y * width + x] - b[y * width + x]) for y in rows for x in cols)
    return total / (len(rows) * len(cols))


# ---- the requester watches, nobody else ------------------------------------------------
def test_the_requester_watches_a_watermarked_clip_through_a_descriptor(make_env: EnvFactory):
    e = make_env()
    rid = e.new()
    show = e.ok("nvrv-alice", "request", "show", str(rid))
    assert show["format"] == "view"
    human = e.nvr("nvrv-alice", "request", "show", str(rid)).stdout
    assert "viewing request" in human
    form = e.nvr("nvrv-alice", "export", "form", str(rid))
    assert form.returncode == 0 and "VIEWING REQUEST" in form.stdout, form.stderr

    # not approved yet: refused and on record
    assert "not approved" in e.refused("nvrv-alice", "view.prepare", rid)
    e.approve(rid, "nvrv-bob", "nvrv-carol")

    # nobody but the requester, whoever may see the request
    for other in ("nvrv-olga", "nvrv-carol", "nvrv-aud", "nvrv-tom"):
        e.refused(other, "view.prepare", rid)
        e.refused(other, "view.open", rid)
    denied = [x for x in e.audit("access.denied", rid) if x["actor"] != "nvrv-alice"]
    assert {x["actor"] for x in denied} == {"nvrv-olga", "nvrv-carol", "nvrv-aud", "nvrv-tom"}

    e.ready("nvrv-alice", rid)
    again = e.control("nvrv-alice", "view.prepare", {"id": rid}, mode="call")
    assert again["result"]["state"] == "ready"
    views = e.site.state / "views"
    assert os.stat(views).st_mode & 0o777 == 0o700
    [name] = e.views()
    assert os.stat(views / name).st_mode & 0o777 == 0o600
    assert "nvrv" not in name  # no viewer's name in a path

    doc = e.control("nvrv-alice", "view.open", {"id": rid})
    assert doc["fds"] == 1 and doc["leaked"] == 0, doc
    assert doc["readonly"] and doc["cloexec"] and not doc["writable"]
    res = doc["result"]
    assert res["state"] == "ready" and res["content_type"] == "video/mp4"
    got = e.out / "clip.mp4"
    assert res["size"] == got.stat().st_size > 0
    assert res["request"]["id"] == rid
    assert res["expires"] > time.time() + 29 * 86400

    probe = ffprobe(got)
    assert "mp4" in probe["format"]["format_name"]
    [video] = [s for s in probe["streams"] if s["codec_type"] == "video"]
    assert video["codec_name"] == "h264" and video["width"] <= 1280
    assert not [s for s in probe["streams"] if s["codec_type"] == "audio"]
    assert abs(float(probe["format"]["duration"]) - 18.0) < 0.2
    data = got.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: plays while it arrives

    # the watermark: the clip's frame at 2 s (recorded start + 3 s) against the source's frame
    # at the same recorded time (3 s into its first segment)
    source = sorted((e.site.root / "lobby-1").rglob("*.mp4"))[0]
    w, h = video["width"], video["height"]
    mine, theirs = gray_frame(got, 2.0, (w, h)), gray_frame(source, 3.0, (w, h))
    top = region_diff(mine, theirs, w, range(2, 14), range(8, w // 2))
    middle = region_diff(
        mine, theirs, w, range(h // 2 - 20, h // 2 + 20), range(w // 4, w * 3 // 4)
    )
    assert top > 20 > middle * 2, (top, middle)

    [start] = e.audit("view.start", rid)
    assert start["actor"] == "nvrv-alice"
    assert start["details"]["cameras"] == ["lobby-1"]
    assert set(start["details"]["range"]) == {"from", "to"}


def test_call_without_descriptors_closes_what_a_reply_carries(make_env: EnvFactory):
    e = make_env()
    rid = e.new()
    e.approve(rid, "nvrv-bob", "nvrv-carol")
    e.ready("nvrv-alice", rid)
    plain = e.control("nvrv-alice", "view.open", {"id": rid}, mode="call")
    assert plain["result"]["state"] == "ready" and plain["leaked"] == 0, plain
    # the count sees a descriptor that is kept open: the test above can fail
    kept = e.control("nvrv-alice", "view.open", {"id": rid}, mode="keep")
    assert kept["fds"] == 1 and kept["leaked"] == 1, kept
    assert len(e.audit("view.start", rid)) == 2


def test_only_a_view_request_is_watched_and_a_view_request_is_never_exported(
    make_env: EnvFactory,
):
    e = make_env()
    mp4 = e.new(fmt="mp4")
    e.approve(mp4, "nvrv-bob", "nvrv-carol")
    assert "not a viewing request" in e.refused("nvrv-alice", "view.prepare", mp4)
    assert "not a viewing request" in e.refused("nvrv-alice", "view.open", mp4)

    rid = e.new()
    e.approve(rid, "nvrv-bob", "nvrv-carol")
    r = e.nvr("nvrv-tom", "export", "run", str(rid), "--media", str(e.out))
    # a viewing request is no technician's business: not even shown to one
    assert r.returncode == 3 and f"may not see request {rid}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not list(e.out.iterdir())
    assert [x for x in e.audit("access.denied", rid) if x["actor"] == "nvrv-tom"]
    # and were it shown, the export check itself refuses it (tests/unit/test_access.py)
    assert e.ok("nvrv-aud", "request", "show", str(rid))["state"] == "approved"


def test_clips_go_when_the_validity_ends_and_when_the_request_is_cancelled(
    make_env: EnvFactory,
):
    e = make_env(valid_for="25s")
    rid = e.new()
    other = e.new()
    e.approve(rid, "nvrv-bob", "nvrv-carol")
    e.approve(other, "nvrv-bob", "nvrv-carol")
    approved_at = time.time()
    e.ready("nvrv-alice", rid)
    assert e.control("nvrv-alice", "view.open", {"id": rid})["fds"] == 1
    e.ready("nvrv-alice", other)
    assert len(e.views()) == 2

    # cancelled: its clip goes at once, on record once
    e.ok("nvrv-alice", "request", "cancel", str(other))
    assert len(e.views()) == 1
    [gone] = e.audit("view.expired", other)
    assert "cancelled" in gone["details"]["reason"] and gone["details"]["viewer"] == "nvrv-alice"
    assert "cancelled" in e.refused("nvrv-alice", "view.open", other)

    # the validity ends: waiting on time itself, not on another process
    poll(lambda: time.time() > approved_at + 27, 40, "the end of the approval's validity")
    assert "expired" in e.refused("nvrv-alice", "view.open", rid)
    assert e.views() == []
    [ended] = e.audit("view.expired", rid)
    assert "validity ended" in ended["details"]["reason"]
    assert "expired" in e.refused("nvrv-alice", "view.prepare", rid)
    e.ok("nvrv-aud", "request", "list")  # the periodic check again: nothing recorded twice
    assert len(e.audit("view.expired", rid)) == 1
    assert len(e.audit("view.expired", other)) == 1


def test_the_periodic_request_check_deletes_an_ended_clip(make_env: EnvFactory):
    e = make_env(valid_for="20s")
    rid = e.new()
    e.approve(rid, "nvrv-bob", "nvrv-carol")
    approved_at = time.time()
    e.ready("nvrv-alice", rid)
    assert len(e.views()) == 1
    poll(lambda: time.time() > approved_at + 22, 40, "the end of the approval's validity")
    # `request list` runs the same check as the daemon's periodic job, without any view command
    e.ok("nvrv-aud", "request", "list")
    assert e.views() == []
    assert len(e.audit("view.expired", rid)) == 1


# ---- previews -----------------------------------------------------------------------------------
def test_previews_for_those_who_may_decide(make_env: EnvFactory):
    e = make_env()
    rid = e.new(fmt="mp4")
    # the requester, a technician and an auditor may not decide it
    for who in ("nvrv-alice", "nvrv-tom", "nvrv-aud"):
        e.refused(who, "preview.frames", rid)
    doc = e.control("nvrv-bob", "preview.frames", {"id": rid}, mode="call")
    frames = doc["result"]["frames"]
    assert [f["position"] for f in frames] == ["start", "middle", "end"]
    assert {f["camera"] for f in frames} == {"lobby-1"}
    shapes = []
    for i, f in enumerate(frames):
        jpeg = base64.b64decode(f["jpeg"])
        assert jpeg[:2] == b"\xff\xd8"
        path = e.out / f"frame{i}.jpg"
        path.write_bytes(jpeg)
        [stream] = ffprobe(path)["streams"]
        assert stream["codec_name"] == "mjpeg" and stream["width"] <= 640
        shapes.append(gray_frame(path, None, (stream["width"], stream["height"])))
    assert len(set(shapes)) == 3  # three different moments
    # watermarked: the first frame against the source at the same recorded time (1 s in)
    source = sorted((e.site.root / "lobby-1").rglob("*.mp4"))[0]
    w, h = 320, 240
    theirs = gray_frame(source, 1.0, (w, h))
    top = region_diff(shapes[0], theirs, w, range(2, 12), range(6, w // 2))
    middle = region_diff(shapes[0], theirs, w, range(h // 2 - 20, h // 2 + 20), range(80, 240))
    assert top > 20 > middle * 2, (top, middle)
    [shown] = e.audit("preview.show", rid)
    assert shown["actor"] == "nvrv-bob" and len(shown["details"]["frames"]) == 3

    # once bob has decided, his step is no longer open to him; carol's is
    e.approve(rid, "nvrv-bob")
    e.refused("nvrv-bob", "preview.frames", rid)
    assert len(e.control("nvrv-carol", "preview.frames", {"id": rid})["result"]["frames"]) == 3

    # a level-2 camera: a level-1 approver may not see it
    street = e.new("nvrv-olga", "street-1", fmt="mp4")
    # not even shown to him; the level is the reason on record
    assert f"may not see request {street}" in e.refused("nvrv-ben", "preview.frames", street)
    ben = [x for x in e.audit("access.denied") if x["actor"] == "nvrv-ben"]
    assert "level" in ben[-1]["details"]["reason"]
    wide = e.control("nvrv-bob", "preview.frames", {"id": street}, mode="call")["result"]
    assert len(wide["frames"]) == 3
    denied = {x["actor"] for x in e.audit("access.denied") if x["object"].startswith("request:")}
    assert {"nvrv-alice", "nvrv-tom", "nvrv-aud", "nvrv-ben"} <= denied


def test_previews_are_refused_while_switched_off(make_env: EnvFactory):
    e = make_env(previews=False)
    rid = e.new(fmt="mp4")
    assert "previews are off" in e.refused("nvrv-bob", "preview.frames", rid)
    assert e.audit("preview.show") == []
    assert any(x["actor"] == "nvrv-bob" for x in e.audit("access.denied", rid))


def test_a_clip_made_before_the_camera_got_privacy_zones_is_not_served(make_env: EnvFactory):
    e = make_env()
    rid = e.new()
    e.approve(rid, "nvrv-bob", "nvrv-carol")
    e.ready("nvrv-alice", rid)
    [before] = e.views()
    assert e.control("nvrv-alice", "view.open", {"id": rid})["result"]["state"] == "ready"
    # the admin gives the camera a privacy zone and reloads
    old = e.ok("nvrv-alice", "status")["config_digest"]
    text = e.site.config.read_text().replace(
        "  lobby-1: {level: 1}\n", "  lobby-1: {level: 1, privacy_zones: [[0, 0, 0.5, 1]]}\n"
    )
    e.site.config.write_text(text)
    assert e.proc is not None
    e.proc.send_signal(signal.SIGHUP)
    poll(lambda: e.ok("nvrv-alice", "status")["config_digest"] != old, 20, "the reload")
    # the unmasked clip is gone (on record) and is never handed out again
    got = e.control("nvrv-alice", "view.open", {"id": rid})
    assert got["result"]["state"] != "ready" and got["fds"] == 0
    assert before not in e.views()
    assert any(
        x["details"]["reason"] == "made with other privacy zones than those in force"
        for x in e.audit("view.expired", rid)
    )
    # prepared again, with the zone: its left half is filled in
    e.ready("nvrv-alice", rid)
    doc = e.control("nvrv-alice", "view.open", {"id": rid})
    got_clip = e.out / "clip.mp4"
    probe = ffprobe(got_clip)
    [video] = [s for s in probe["streams"] if s["codec_type"] == "video"]
    w, h = video["width"], video["height"]
    frame = gray_frame(got_clip, 2.0, (w, h))
    left = [frame[y * w + x] for y in range(h // 3, 2 * h // 3) for x in range(4, w // 2 - 4)]
    assert doc["result"]["state"] == "ready" and max(left) < 30
