"""Evidence is never deleted early (issue 11): disk pressure per file system, holds that name
their site and roots and survive config changes, confirmations that release only what they
showed. Real small file systems (tmpfs with size=), real CLI runs and a real daemon."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from nvr_guard.identity import Caller
from nvr_guard.model import (
    Action,
    ClockReading,
    GuardRules,
    Hold,
    Segment,
    SiteRules,
    Volume,
)
from nvr_guard.retention import policy
from tests.fixtures.cli import run_cli
from tests.fixtures.site import LAYOUT, build_tree, daemon_answered, poll, write_segment

SEG = 100 * 1024  # a whole number of pages: tmpfs frees exactly this much per file
DAY = 86400.0


# ---- helpers ----------------------------------------------------------------------------------


class Mounts:
    """tmpfs mounts made by a test, unmounted (innermost first) at teardown."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            check=True,
        )
        self.points.append(path)
        return path

    def umount(self, path: Path) -> None:
        subprocess.run(["umount", str(path)], check=True)
        self.points.remove(path)

    def cleanup(self) -> None:
        for p in reversed(self.points):
            if subprocess.run(["umount", str(p)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(p)], check=False)
        self.points.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


def write_config(
    base: Path,
    sites: dict[str, list[Path]],
    keep: str = "1y",
    min_keep: str = "1d",
    min_free: str = "50%",
    fraction: float = 1.0,
    name: str = "config.yaml",
    cross_mounts: bool = False,
) -> Path:
    text = f"""state_dir: {base / "state"}
timezone: Asia/Shanghai
socket: {base / "run" / "c.sock"}
socket_group: root
settle: 2m
sweep_every: 5m
guards: {{max_delete_fraction: {fraction}, max_clock_jump: 1d}}
disk: {{min_free: {min_free}, action: alert}}
sites:
"""
    for site, roots in sites.items():
        text += f"""  {site}:
    keep: {keep}
    min_keep: {min_keep}
    roots: [{", ".join(str(r) for r in roots)}]
    layout: "{LAYOUT}"
    cross_mounts: {"true" if cross_mounts else "false"}
"""
    text += "people:\n  users: {root: {roles: [admin]}}\n"
    path = base / name
    path.write_text(text)
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(config), *args], timeout=120)


def cli_json(config: Path, *args: str) -> Any:
    r = cli(config, "--json", *args)
    assert r.stdout.strip(), f"{args}: exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


def footage(root: Path, camera: str, starts: list[datetime]) -> list[Path]:
    return [write_segment(root, camera, t, size=SEG) for t in starts]


def days_ago(now: datetime, *days: float) -> list[datetime]:
    return [now - timedelta(days=d) for d in days]


def need_bytes(path: Path, fraction: float) -> int:
    u = psutil.disk_usage(str(path))
    return max(0, int(u.total * fraction) - u.free)


# ---- item 3: disk pressure is per file system ---------------------------------------------------


def test_pressure_on_one_volume_deletes_only_there(tmp_path, mounts, now):
    """A site with roots on two file systems: the full one frees its own space; the healthy
    one's footage (older, so first in line on the old per-site reading) stays."""
    healthy = mounts.tmpfs(tmp_path / "x", "8m") / "rec"
    full = mounts.tmpfs(tmp_path / "y", "4m") / "rec"
    healthy.mkdir()
    full.mkdir()
    on_healthy = footage(healthy, "ch01", days_ago(now, *[10 - i * 0.25 for i in range(10)]))
    on_full = footage(full, "ch02", days_ago(now, *[4 - i * 0.08 for i in range(30)]))
    config = write_config(tmp_path, {"gate": [healthy, full]})
    need = need_bytes(full, 0.5)
    assert need > 0 and need_bytes(healthy, 0.5) == 0

    res = cli_json(config, "retention", "run")

    assert all(p.exists() for p in on_healthy), "footage on the healthy volume was deleted"
    gone = [p for p in on_full if not p.exists()]
    # the oldest on the full volume, just enough of them
    assert gone == on_full[: math.ceil(need / SEG)]
    assert need_bytes(full, 0.5) == 0
    reasons = [i["reason"] for i in res["items"] if i["action"] == "delete"]
    assert reasons and all(
        r.startswith("disk pressure: free ") and f" on {full.parent}," in r for r in reasons
    )


def test_sites_sharing_a_volume_share_one_shortfall(tmp_path, mounts, now):
    vol = mounts.tmpfs(tmp_path / "v", "4m")
    (a := vol / "a").mkdir()
    (b := vol / "b").mkdir()
    # interleaved in time: the oldest footage of the volume alternates between the sites
    seg_a = footage(a, "ch01", days_ago(now, *[10 - i * 0.5 for i in range(15)]))
    seg_b = footage(b, "ch01", days_ago(now, *[9.75 - i * 0.5 for i in range(15)]))
    config = write_config(tmp_path, {"a": [a], "b": [b]})
    need = need_bytes(vol, 0.5)
    count = math.ceil(need / SEG)
    assert 2 <= count <= 12

    res = cli_json(config, "retention", "run")

    by_age = sorted(
        seg_a + seg_b,
        key=lambda p: (seg_a.index(p) * 2) if p in seg_a else (seg_b.index(p) * 2 + 1),
    )
    gone = [p for p in by_age if not p.exists()]
    # each site freeing the whole shortfall would delete about twice as much
    assert gone == by_age[:count]
    assert res["bytes"] == count * SEG
    reasons = {i["reason"].split(", oldest")[0] for i in res["items"] if i["action"] == "delete"}
    assert len(reasons) == 1 and f" on {vol}" in reasons.pop()


def test_a_root_whose_mount_is_gone_is_not_the_parent_volumes_footage(tmp_path, mounts, now):
    """The root was a mount point; the mount is gone and the empty mount point sits on a full
    file system. That full file system is not the site's, and nothing of the site's healthy
    volume may go for it."""
    healthy = mounts.tmpfs(tmp_path / "x", "8m") / "rec"
    healthy.mkdir()
    parent = mounts.tmpfs(tmp_path / "p", "4m")
    gone_root = mounts.tmpfs(parent / "m2", "4m")
    on_healthy = footage(healthy, "ch01", days_ago(now, *[10 - i * 0.25 for i in range(10)]))
    footage(gone_root, "ch02", days_ago(now, 3, 2.5))
    config = write_config(tmp_path, {"gate": [healthy, gone_root]})
    first = cli_json(config, "retention", "run")  # records each root's file system
    assert first["deleted"] == 0
    recorded_dev = os.stat(gone_root).st_dev

    mounts.umount(gone_root)
    assert os.stat(gone_root).st_dev == os.stat(parent).st_dev != recorded_dev
    (parent / "filler.bin").write_bytes(b"\1" * (3 * 2**20))  # the parent is now 75% full
    assert need_bytes(parent, 0.5) > 0

    res = cli_json(config, "retention", "run")
    assert res["deleted"] == 0
    assert all(p.exists() for p in on_healthy)

    engine = Engine(load_config(config))
    try:
        assert engine.excluded_roots() == {os.fsencode(str(gone_root))}
        assert [v.members for v in engine.disk_volumes()] == [
            (("gate", os.fsencode(str(healthy))),)
        ]
        engine.reconcile(full=True)
        att = [a for a in engine.attention.as_json() if a["kind"] == "root_device_changed"]
        assert len(att) == 1 and str(gone_root) in att[0]["message"]

        # a new disk mounted there: another file system than the footage was catalogued on, so
        # still out of service until an admin confirms it; then it counts, on its new one
        mounts.tmpfs(gone_root, "4m")
        engine.reconcile(full=True)
        assert engine.excluded_roots() == {os.fsencode(str(gone_root))}
        assert [a["kind"] for a in engine.attention.as_json()] == ["root_device_changed"]
        engine.confirm_root(Caller(0, "root"), "gate", str(gone_root))
        engine.reconcile(full=True)
        assert engine.excluded_roots() == set()
        assert engine.attention.as_json() == []
        assert {v.name for v in engine.disk_volumes()} == {str(healthy.parent), str(gone_root)}
    finally:
        engine.catalog.close()


def test_excluded_roots_can_be_passed_in(tmp_path, mounts, now):
    """The root health check of the scanner may name roots itself; those count on no volume."""
    vol = mounts.tmpfs(tmp_path / "v", "4m")
    (a := vol / "a").mkdir()
    segs = footage(a, "ch01", days_ago(now, *[10 - i * 0.25 for i in range(30)]))
    config = write_config(tmp_path, {"a": [a]})
    engine = Engine(load_config(config))
    try:
        engine.reconcile(full=True)
        assert engine.excluded_roots() == set()
        assert engine.plan(excluded={os.fsencode(str(a))}).items == []
        assert engine.plan().deletions  # by default the volume is short
    finally:
        engine.catalog.close()
    assert all(p.exists() for p in segs)


def test_policy_volume_membership_is_by_root() -> None:
    """Pure: the shortfall of a volume is freed from its own footage only."""
    tz = load_tz()
    r = SiteRules(site="gate", keep=None, min_keep=None, tz=tz, settle=60.0, min_free=0.5)
    now = ClockReading(100 * DAY, 1000.0, "b")
    segs = [
        Segment("gate", "c1", b"/x/rec/c1/old", 1 * DAY, 1 * DAY + 60, 1000),
        Segment("gate", "c2", b"/y/rec/c2/newer", 2 * DAY, 2 * DAY + 60, 1000),
        Segment("gate", "c2", b"/y/rec/c2/newest", 3 * DAY, 3 * DAY + 60, 1000),
    ]
    vols = [
        Volume("/x", 10_000, 9_000, (("gate", b"/x/rec"),)),
        Volume("/y", 10_000, 4_500, (("gate", b"/y/rec"),)),
    ]
    plan = policy.decide(segs, now, {"gate": r}, GuardRules(1.0), [], {}, volumes=vols)
    assert [i.segment.path for i in plan.deletions] == [b"/y/rec/c2/newer"]
    assert "on /y" in plan.deletions[0].reason


def test_pressure_with_cross_mounts_frees_only_the_short_volume(tmp_path, mounts, now):
    """cross_mounts: a mostly empty file system mounted below a root on a nearly full one. Its
    (older) footage is another volume's: the root's shortfall is freed from the root's own
    footage, and nothing on the sub-mount goes, however often the sweep runs."""
    root = mounts.tmpfs(tmp_path / "p1", "4m")
    sub = mounts.tmpfs(root / "c3", "8m")
    on_root = footage(root, "c1", days_ago(now, *[20 - i * 0.5 for i in range(30)]))
    # camera c3's directory is the sub-mount
    on_sub = footage(root, "c3", days_ago(now, *[100 - i for i in range(10)]))
    assert all(os.stat(p).st_dev == os.stat(sub).st_dev for p in on_sub)
    config = write_config(tmp_path, {"p1": [root]}, cross_mounts=True)
    need = need_bytes(root, 0.5)
    assert need > 0 and need_bytes(sub, 0.5) == 0

    res = cli_json(config, "retention", "run")

    assert all(p.exists() for p in on_sub), "footage on the volume with space was deleted"
    gone = [p for p in on_root if not p.exists()]
    assert gone == on_root[: math.ceil(need / SEG)]
    assert need_bytes(root, 0.5) == 0
    reasons = [i["reason"] for i in res["items"] if i["action"] == "delete"]
    assert reasons and all(f" on {root}," in r for r in reasons)
    again = cli_json(config, "retention", "run")
    assert again["deleted"] == 0 and all(p.exists() for p in on_sub)

    # the engine names the sub-mount as a member of its own volume
    engine = Engine(load_config(config))
    try:
        vols = {v.name: v.members for v in engine.disk_volumes()}
        assert vols == {
            str(root): (("p1", os.fsencode(str(root))),),
            str(sub): (("p1", os.fsencode(str(sub))),),
        }
    finally:
        engine.catalog.close()


def test_policy_segment_belongs_to_the_deepest_member() -> None:
    """Pure: a member below another member's root (a file system mounted inside a root) owns
    the footage under it; the outer root's volume does not count it, nested either way."""
    tz = load_tz()
    r = SiteRules(site="p", keep=None, min_keep=None, tz=tz, settle=60.0, min_free=0.5)
    now = ClockReading(100 * DAY, 1000.0, "b")
    segs = [
        Segment("p", "c3", b"/r/c3/a", 1 * DAY, 1 * DAY + 60, 1000),  # sub-mount, oldest
        Segment("p", "c3", b"/r/c3/x/b", 1.5 * DAY, 1.5 * DAY + 60, 1000),  # back on /r's fs
        Segment("p", "c1", b"/r/c1/c", 2 * DAY, 2 * DAY + 60, 1000),
        Segment("p", "c1", b"/r/c1/d", 3 * DAY, 3 * DAY + 60, 1000),
    ]
    short = Volume("/r", 10_000, 3_500, (("p", b"/r"), ("p", b"/r/c3/x")))
    roomy = Volume("/r/c3", 10_000, 9_000, (("p", b"/r/c3"),))
    for vols in ([short, roomy], [roomy, short]):
        plan = policy.decide(segs, now, {"p": r}, GuardRules(1.0), [], {}, volumes=vols)
        assert [i.segment.path for i in plan.deletions] == [b"/r/c1/c", b"/r/c3/x/b"]
    # the sub-mount short instead: only its own footage
    short2 = Volume("/r/c3", 10_000, 4_500, (("p", b"/r/c3"),))
    roomy2 = Volume("/r", 10_000, 9_000, (("p", b"/r"), ("p", b"/r/c3/x")))
    plan = policy.decide(segs, now, {"p": r}, GuardRules(1.0), [], {}, volumes=[roomy2, short2])
    assert [i.segment.path for i in plan.deletions] == [b"/r/c3/a"]


def load_tz() -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo("Asia/Shanghai")


# ---- item 5: a camera id shared by two sites --------------------------------------------------


def test_ambiguous_camera_is_refused_and_site_chooses(tmp_path, now):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    t_old = now - timedelta(days=20)
    in_a = write_segment(a, "ch01", t_old)
    in_b = write_segment(b, "ch01", t_old)
    build_tree(a, ["ch01"], days=14, per_day=4, now=now)
    build_tree(b, ["ch01"], days=14, per_day=4, now=now)
    config = write_config(tmp_path, {"a": [a], "b": [b]}, keep="15d", min_keep="1d", min_free="0%")
    t0 = (t_old - timedelta(minutes=5)).isoformat()
    t1 = (t_old + timedelta(minutes=5)).isoformat()
    hold = ["hold", "add", "--from", t0, "--to", t1, "--reason", "case 5"]

    r = cli(config, *hold, "--camera", "ch01")
    assert r.returncode == 2, r.stderr
    assert "camera 'ch01' is at sites a, b" in r.stderr and "--site" in r.stderr
    assert cli_json(config, "hold", "list")["holds"] == []

    r = cli(config, *hold, "--camera", "ch01", "--site", "nowhere")
    assert r.returncode == 2 and "unknown site 'nowhere'" in r.stderr
    r = cli(config, *hold, "--camera", "b/ch01", "--site", "a")
    assert r.returncode == 2 and "disagree" in r.stderr

    placed = cli_json(config, *hold, "--camera", "ch01", "--site", "b")
    assert placed["site"] == "b" and placed["camera"] == "ch01"
    assert placed["roots"] == [str(b)]
    again = cli_json(config, *hold, "--camera", "b/ch01")
    assert again["site"] == "b"

    cli_json(config, "retention", "run")
    assert in_b.exists(), "the held footage of site b was deleted"
    assert not in_a.exists(), "site a's footage was never held"


# ---- item 6: holds across config changes ------------------------------------------------------


def _renamed(config: Path, old: str, new: str) -> None:
    config.write_text(config.read_text().replace(f"  {old}:\n", f"  {new}:\n"))


def test_a_hold_survives_renaming_its_site(tmp_path, now):
    root = tmp_path / "rec"
    root.mkdir()
    t_old = now - timedelta(days=20)
    held = write_segment(root, "ch01", t_old)
    other = write_segment(root, "ch01", t_old - timedelta(hours=2))
    build_tree(root, ["ch01"], days=14, per_day=4, now=now)
    config = write_config(tmp_path, {"gate": [root]}, keep="15d", min_free="0%")
    t0 = (t_old - timedelta(minutes=5)).isoformat()
    t1 = (t_old + timedelta(minutes=5)).isoformat()
    h = cli_json(
        config, "hold", "add", "--camera", "ch01", "--from", t0, "--to", t1, "--reason", "case 6"
    )

    _renamed(config, "gate", "north")
    assert cli(config, "config", "check").returncode == 0  # the root is still there: fine
    res = cli_json(config, "retention", "run")

    assert held.exists(), "the held file was deleted after its site was renamed"
    assert not other.exists()
    item = next(i for i in res["items"] if i["path"] == str(held))
    assert item["site"] == "north" and f"held: hold {h['id']}" in item["reason"]
    assert [x["id"] for x in cli_json(config, "hold", "list")["holds"]] == [h["id"]]


def test_config_check_refuses_a_config_that_orphans_a_hold(tmp_path, now):
    root, elsewhere = tmp_path / "rec", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    write_segment(root, "ch01", now - timedelta(days=1))
    config = write_config(tmp_path, {"gate": [root]}, min_free="0%")
    h = cli_json(
        config,
        "hold",
        "add",
        "--camera",
        "ch01",
        "--from",
        (now - timedelta(days=2)).isoformat(),
        "--to",
        now.isoformat(),
        "--reason",
        "case 6b",
    )
    new = write_config(tmp_path, {"north": [elsewhere]}, min_free="0%", name="new.yaml")
    r = cli(config, "config", "check", str(new))
    assert r.returncode == 2
    sites_line = new.read_text().splitlines().index("sites:") + 1
    assert f"{new}:{sites_line}: sites: hold {h['id']} (manual: case 6b)" in r.stderr
    assert "site gate" in r.stderr and str(root) in r.stderr
    # released, the hold no longer stands in the way
    assert cli(config, "hold", "release", str(h["id"]), "--reason", "closed").returncode == 0
    assert cli(config, "config", "check", str(new)).returncode == 0


def test_request_holds_get_their_roots_and_survive_a_rename(tmp_path, now):
    root = tmp_path / "rec"
    root.mkdir()
    t_old = now - timedelta(days=20)
    held = write_segment(root, "ch01", t_old)
    build_tree(root, ["ch01"], days=14, per_day=4, now=now)
    config = write_config(tmp_path, {"gate": [root]}, keep="15d", min_free="0%")
    engine = Engine(load_config(config))
    try:
        engine.reconcile(full=True)
        # as the workflow places a request's holds: without roots
        h = engine.catalog.add_hold(
            kind="request",
            site="gate",
            camera="ch01",
            start=t_old.timestamp() - 300,
            end=t_old.timestamp() + 300,
            reason="request 1: case",
            owner="root",
            created=now.timestamp(),
            request_id=1,
        )
        assert h.roots == ()
        _renamed(config, "gate", "north")
        engine.apply_config(load_config(config), "test")
        assert engine.catalog.get_hold(h.id).roots == (os.fsencode(str(root)),)
        engine.reconcile(full=True)
        out = engine.sweep(actor="test")
        item = next(i for i in out.plan.items if i.segment.path == os.fsencode(str(held)))
        assert item.segment.site == "north" and item.action is Action.KEEP
        assert item.reason.startswith(f"held: hold {h.id} (request")
    finally:
        engine.catalog.close()
    assert held.exists()


def test_hold_of_a_gone_site_protects_by_root_in_the_policy() -> None:
    tz = load_tz()
    r = SiteRules(site="north", keep=None, min_keep=None, tz=tz, settle=60.0, min_free=0.5)
    now = ClockReading(100 * DAY, 1000.0, "b")
    seg = Segment("north", "ch01", b"/srv/rec/ch01/a.mp4", 1 * DAY, 1 * DAY + 60, 1000)
    elsewhere = replace(seg, path=b"/srv/other/ch01/a.mp4")
    hold = Hold(
        1, "case", "root", 0.5 * DAY, 1.5 * DAY, camera="ch01", site="gate", roots=(b"/srv/rec",)
    )
    vol = Volume("/srv", 10_000, 0, (("north", None),))
    plan = policy.decide(
        [seg, elsewhere], now, {"north": r}, GuardRules(1.0), [hold], {}, volumes=[vol]
    )
    act = {i.segment.path: i for i in plan.items}
    assert act[seg.path].action is Action.KEEP and "held: hold 1" in act[seg.path].reason
    assert act[elsewhere.path].action is Action.DELETE


def test_daemon_refuses_a_reload_that_orphans_a_hold(tmp_path, now):
    root, elsewhere = tmp_path / "rec", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    write_segment(root, "ch01", now - timedelta(days=1))
    config = write_config(tmp_path, {"gate": [root]}, min_free="0%")
    log = open(tmp_path / "daemon.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(config), "daemon"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        poll(lambda: daemon_answered(cli(config, "--json", "status")), 60, "the daemon")
        h = cli_json(
            config,
            "hold",
            "add",
            "--camera",
            "ch01",
            "--from",
            (now - timedelta(days=2)).isoformat(),
            "--to",
            now.isoformat(),
            "--reason",
            "case 6c",
        )
        digest = cli_json(config, "status")["config_digest"]
        good = config.read_text()
        config.write_text(good.replace("gate:", "north:").replace(str(root), str(elsewhere)))
        proc.send_signal(signal.SIGHUP)

        def refused() -> Any:
            entries = cli_json(config, "audit", "show")["entries"]
            return [e for e in entries if e["action"] == "config.reload_failed"]

        (entry,) = poll(refused, 20, "the refused reload in the audit log")
        assert any(f"hold {h['id']}" in line for line in entry["details"]["errors"])
        assert any(line.startswith(f"{config}:") for line in entry["details"]["errors"])
        st = cli_json(config, "status")
        assert st["config_digest"] == digest and list(st["sites"]) == ["gate"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()


# ---- item 7: a confirmation releases exactly what it showed -----------------------------------


class Clock:
    def __init__(self, wall: float) -> None:
        self.now = ClockReading(wall, 10_000.0, "boot-a")

    def __call__(self) -> ClockReading:
        return self.now

    def advance(self, wall: float, boot: float) -> None:
        self.now = replace(self.now, wall=self.now.wall + wall, boottime=self.now.boottime + boot)


def _guarded_engine(tmp_path: Path, now: datetime, fraction: float) -> tuple[Engine, Clock, Path]:
    root = tmp_path / "rec"
    root.mkdir()
    build_tree(root, ["ch01"], days=40, per_day=4, now=now)
    config = write_config(tmp_path, {"gate": [root]}, keep="1y", min_free="0%", fraction=fraction)
    clock = Clock(now.timestamp())
    engine = Engine(load_config(config), clock=clock)
    engine.reconcile(full=True)
    assert engine.sweep(actor="test").plan.items == []  # a done sweep: the clock guard's base
    # the rule shortens: 25 of 40 days are due at once, over the guard
    config.write_text(config.read_text().replace("keep: 1y", "keep: 15d"))
    engine.apply_config(load_config(config), "test")
    clock.advance(60, 60)
    return engine, clock, root


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*.mp4")}


def test_confirm_does_not_accept_a_clock_jump_it_never_showed(tmp_path, now):
    engine, clock, root = _guarded_engine(tmp_path, now, fraction=0.2)
    try:
        blocked = engine.sweep(actor="test")
        assert [t.kind for t in blocked.plan.trips] == ["mass-deletion"]
        shown = {i.segment.path for i in blocked.plan.blocked}
        before = _files(root)
        clock.advance(3 * DAY, 120)  # the wall clock jumps three days after the blocked sweep

        out = engine.confirm(blocked.sweep, Caller.local())

        assert out.deleted == 0 and _files(root) == before
        assert "clock-jump" in [t.kind for t in out.plan.trips]
        assert all(i.action is Action.BLOCKED for i in out.plan.items)
        assert engine.catalog.get_sweep(blocked.sweep).state == "blocked"
        assert engine.catalog.get_sweep(out.sweep).state == "blocked"

        # the new sweep shows the jump; confirming it releases what it showed
        again = engine.confirm(out.sweep, Caller.local())
        assert again.plan.trips == []
        assert again.deleted == len(out.plan.blocked) > len(shown)
        assert engine.catalog.get_sweep(out.sweep).state == "confirmed"
    finally:
        engine.catalog.close()


def test_confirming_a_clock_trip_does_not_accept_a_further_smaller_jump(tmp_path, now):
    """The clock guard showed a 2-day jump; 20 more hours of jump happen before the admin
    confirms (less than max_clock_jump, which a plain sweep would let through): that is not
    the jump the admin saw, so the confirmation blocks again (it used to allow shown + 1 d)."""
    root = tmp_path / "rec"
    root.mkdir()
    build_tree(root, ["ch01"], days=40, per_day=4, now=now)
    config = write_config(tmp_path, {"gate": [root]}, keep="15d", min_free="0%", fraction=1.0)
    clock = Clock(now.timestamp())
    engine = Engine(load_config(config), clock=clock)
    try:
        engine.reconcile(full=True)
        first = engine.sweep(actor="test")  # no history yet: deletes what is due, a base
        assert first.plan.trips == []
        clock.advance(2 * DAY, 60)  # the wall clock jumps two days
        blocked = engine.sweep(actor="test")
        assert [t.kind for t in blocked.plan.trips] == ["clock-jump"]
        before = _files(root)
        clock.advance(20 * 3600, 60)  # and 20 hours more before the confirmation
        out = engine.confirm(blocked.sweep, Caller.local())
        assert out.deleted == 0 and _files(root) == before
        assert "clock-jump" in [t.kind for t in out.plan.trips]
        # the new blocked sweep shows the whole jump; confirming that one releases it
        again = engine.confirm(out.sweep, Caller.local())
        assert again.plan.trips == [] and again.deleted > 0
    finally:
        engine.catalog.close()


def test_confirm_blocks_again_when_it_would_delete_more(tmp_path, now):
    engine, clock, root = _guarded_engine(tmp_path, now, fraction=0.05)
    try:
        blocked = engine.sweep(actor="test")
        before = _files(root)
        # three real days pass (both clocks): 12 more segments are due, 7.5% of the camera
        clock.advance(3 * DAY, 3 * DAY)
        out = engine.confirm(blocked.sweep, Caller.local())
        assert out.deleted == 0 and _files(root) == before
        assert [t.kind for t in out.plan.trips] == ["mass-deletion"]
        assert out.plan.trips[0].count == 12
        withheld = [i for i in out.plan.items if i.reason.startswith("withheld:")]
        assert len(withheld) == len(blocked.plan.blocked)
    finally:
        engine.catalog.close()


def test_confirm_with_nothing_changed_deletes_exactly_what_it_showed(tmp_path, now):
    engine, clock, root = _guarded_engine(tmp_path, now, fraction=0.2)
    try:
        blocked = engine.sweep(actor="test")
        shown = {Path(os.fsdecode(i.segment.path)) for i in blocked.plan.blocked}
        before = _files(root)
        clock.advance(30, 30)
        out = engine.confirm(blocked.sweep, Caller.local())
        assert out.plan.trips == []
        assert before - _files(root) == shown
        assert engine.catalog.get_sweep(blocked.sweep).state == "confirmed"
    finally:
        engine.catalog.close()


def test_cli_confirm_exits_3_when_blocked_again(tmp_path, now):
    root = tmp_path / "rec"
    root.mkdir()
    build_tree(root, ["ch01"], days=30, per_day=4, now=now - timedelta(days=16))
    build_tree(root, ["ch01"], days=10, per_day=4, now=now)
    config = write_config(tmp_path, {"gate": [root]}, keep="15d", min_free="0%", fraction=0.2)
    r = cli(config, "--json", "retention", "run")
    assert r.returncode == 3
    sweep = json.loads(r.stdout)["sweep"]
    before = _files(root)
    # an applied sweep three days ago by the wall clock but moments ago by the boot clock: to
    # the clock guard, the wall clock has jumped three days since (the blocked sweep never saw it)
    db = sqlite3.connect(tmp_path / "state" / "catalog.db")
    with db:
        db.execute(
            "INSERT INTO sweeps (started, finished, state, actor, wall, boottime, boot_id) "
            "SELECT wall - 3 * 86400, wall - 3 * 86400, 'done', 'test', wall - 3 * 86400, "
            "boottime, boot_id FROM sweeps WHERE id = ?",
            (sweep,),
        )
    db.close()

    r = cli(config, "--json", "retention", "confirm", str(sweep))

    assert r.returncode == 3, r.stderr
    res = json.loads(r.stdout)
    assert res["deleted"] == 0 and _files(root) == before
    assert "clock-jump" in [t["kind"] for t in res["trips"]]
    assert f"retention confirm {res['sweep']}" in res["trips"][0]["message"]
