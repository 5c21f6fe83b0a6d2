"""Per-camera retention and ``retention: none`` on real trees: real files, real small file
systems (tmpfs) for disk pressure, the real CLI, the engine's own reload, a real ffmpeg export.

- a camera with a longer ``keep`` keeps its footage while its siblings' goes;
- a camera rule below a site's floor is refused at its line (exit 2) and nothing is deleted;
- a reload that changes a camera's keep recomputes the stored expiries and trips the
  mass-deletion guard as a change of the site's keep does;
- disk pressure never goes below a camera's own floor;
- a ``retention: none`` site keeps everything, past any age and through disk pressure, and its
  footage is still exported.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvr_guard.config import load_config
from nvr_guard.daemon.metrics import Exporter
from nvr_guard.engine import Engine
from nvr_guard.export import verify_package
from nvr_guard.identity import Caller
from nvr_guard.model import UNMANAGED_REASON, ClockReading
from tests.fixtures.cli import run_cli
from tests.fixtures.site import LAYOUT, make_footage, write_segment

pytestmark = pytest.mark.integration

SEG = 100 * 1024  # a whole number of pages: tmpfs frees exactly this much per file
DAY = 86400.0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    points: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )
        points.append(path)
        return path

    try:
        yield mount
    finally:
        for p in reversed(points):
            if subprocess.run(["umount", str(p)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(p)], check=False)


def write_config(
    base: Path,
    sites: str,
    cameras: str = "",
    extra: str = "",
    fraction: float = 1.0,
    min_free: str = "1%",
) -> Path:
    text = f"""state_dir: {base / "state"}
timezone: Asia/Shanghai
socket: {base / "run" / "c.sock"}
socket_group: root
settle: 2m
guards: {{max_delete_fraction: {fraction}, max_clock_jump: 1d}}
disk: {{min_free: {min_free}, action: alert}}
sites:
{sites}cameras:
{cameras or "  {}"}
{extra}"""
    if "people:" not in extra:
        text += "people:\n  users: {root: {roles: [admin]}}\n"
    path = base / "config.yaml"
    path.write_text(text)
    return path


def site_yaml(name: str, root: Path, rule: str) -> str:
    return f"""  {name}:
{rule}
    roots: [{root}]
    layout: "{LAYOUT}"
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(config), *args], timeout=120)


def cli_json(config: Path, *args: str) -> Any:
    r = cli(config, "--json", *args)
    assert r.stdout.strip(), f"{args}: exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


def aged(root: Path, camera: str, now: datetime, *days: float, size: int = 1000) -> list[Path]:
    return [write_segment(root, camera, now - timedelta(days=d), size=size) for d in days]


def need_bytes(path: Path, fraction: float) -> int:
    u = psutil.disk_usage(str(path))
    return max(0, int(u.total * fraction) - u.free)


# ---- a camera's own keep ----------------------------------------------------------------------


def test_a_camera_with_a_longer_keep_keeps_its_footage_while_its_siblings_go(tmp_path, now):
    root = tmp_path / "rec"
    root.mkdir()
    front = aged(root, "front", now, 100, 60, 30, 1)
    side = aged(root, "side", now, 100, 60, 30, 1)
    config = write_config(
        tmp_path,
        site_yaml("gate", root, "    keep: 15d\n    min_keep: 1d"),
        "  front: {keep: 90d, level: 1}\n",
    )

    plan = cli_json(config, "retention", "plan")
    reasons = {
        Path(i["path"]).relative_to(root).parts[0] + "/" + i["action"]: i["reason"]
        for i in plan["items"]
    }
    assert reasons["front/delete"].startswith("expired: camera keep=90d, recorded ")
    assert reasons["side/delete"].startswith("expired: keep=15d, recorded ")

    res = cli_json(config, "retention", "run")
    assert res["deleted"] == 4
    assert [p.exists() for p in front] == [False, True, True, True]
    assert [p.exists() for p in side] == [False, False, False, True]
    # the receipts name the camera's rule too
    by_cam = {(i["camera"], i["reason"].split(", recorded")[0]) for i in res["items"]}
    assert by_cam == {("front", "expired: camera keep=90d"), ("side", "expired: keep=15d")}
    # the oldest footage left is the front camera's (60 days, within its 90): not overdue
    engine = Engine(load_config(config))
    try:
        gate = engine.status()["sites"]["gate"]
    finally:
        engine.catalog.close()
    assert "cameras.front.keep=90d" in gate["rule"]
    assert gate["oldest_past_rule"] is False


def test_a_camera_keep_below_a_site_floor_is_refused_at_its_line(tmp_path, now):
    root = tmp_path / "rec"
    root.mkdir()
    old = aged(root, "front", now, 100, 20)
    config = write_config(
        tmp_path,
        site_yaml("gate", root, "    keep: 90d\n    min_keep: 30d"),
        "  front:\n    level: 1\n    keep: 7d\n",
    )
    line = config.read_text().splitlines().index("    keep: 7d") + 1
    r = cli(config, "config", "check")
    assert r.returncode == 2
    msg = " ".join(r.stderr.split())  # (long lines may wrap on the console)
    assert (
        f"{config}:{line}: cameras.front.keep: 7d is shorter than the floor of site gate "
        f"(min_keep 30d)"
    ) in msg
    # a sweep under it refuses to start too, and nothing is deleted
    r = cli(config, "retention", "run")
    assert r.returncode == 2 and f"{config}:{line}:" in " ".join(r.stderr.split())
    assert all(p.exists() for p in old)


# ---- reload --------------------------------------------------------------------------------------


def _expiries(state: Path, camera: str) -> list[tuple[float, float]]:
    db = sqlite3.connect(state / "catalog.db")
    try:
        return db.execute(
            "SELECT max(start, mtime), expires_at FROM segments WHERE camera = ? ORDER BY start",
            (camera,),
        ).fetchall()
    finally:
        db.close()


@pytest.mark.parametrize(
    ("before", "after", "cause", "side_keep"),
    [
        (
            ("    keep: 90d", "  front: {keep: 90d}\n"),
            ("    keep: 90d", "  front: {keep: 7d}\n"),
            "config change: cameras.front.keep 90d -> 7d",
            90,  # the other camera follows the site's rule, which stayed
        ),
        (
            ("    keep: 90d", ""),
            ("    keep: 7d", ""),
            "config change: keep 90d -> 7d",
            7,
        ),
    ],
    ids=["camera-keep", "site-keep"],
)
def test_a_reload_that_shortens_a_keep_recomputes_expiry_and_trips_the_guard(
    tmp_path, now, before, after, cause, side_keep
):
    root = tmp_path / "rec"
    root.mkdir()
    front = aged(root, "front", now, *[8 + i for i in range(10)], 1)
    side = aged(root, "side", now, 1)
    config = write_config(tmp_path, site_yaml("gate", root, before[0]), before[1], fraction=0.2)
    engine = Engine(load_config(config))
    try:
        engine.reconcile(full=True)
        first = engine.sweep(actor="root")
        assert first.deleted == 0 and not first.plan.trips
        assert all(e == t + 90 * DAY for t, e in _expiries(tmp_path / "state", "front"))

        config = write_config(tmp_path, site_yaml("gate", root, after[0]), after[1], fraction=0.2)
        details = engine.apply_config(load_config(config), "root")
        assert list(details["changed_sites"]) == ["gate"]
        week = [e == t + 7 * DAY for t, e in _expiries(tmp_path / "state", "front")]
        assert all(week)
        assert [e - t for t, e in _expiries(tmp_path / "state", "side")] == [side_keep * DAY]

        out = engine.sweep(actor="root")
        (trip,) = out.plan.trips
        assert (trip.kind, trip.camera, trip.count) == ("mass-deletion", "front", 10)
        assert f"Likely cause: {cause}." in out.messages[0]
        assert out.deleted == 0 and all(p.exists() for p in front + side)
    finally:
        engine.catalog.close()


# ---- disk pressure ------------------------------------------------------------------------------


def test_disk_pressure_never_goes_below_a_cameras_floor(tmp_path, tmpfs, now):
    vol = tmpfs(tmp_path / "v", "4m")
    root = vol / "rec"
    root.mkdir()
    # the protected camera's footage is the oldest on the volume: first in line for space
    front = aged(root, "front", now, *[20 - i * 0.5 for i in range(14)], size=SEG)
    side = aged(root, "side", now, *[10 - i * 0.5 for i in range(14)], size=SEG)
    config = write_config(
        tmp_path,
        site_yaml("gate", root, "    keep: 1y\n    min_keep: 1d"),
        "  front: {min_keep: 30d}\n",
        min_free="50%",
    )
    need = need_bytes(vol, 0.5)
    count = math.ceil(need / SEG)
    assert 2 <= count <= 12

    res = cli_json(config, "retention", "run")

    assert all(p.exists() for p in front), "footage under its camera's floor was deleted"
    assert [p for p in side if not p.exists()] == side[:count]
    assert need_bytes(vol, 0.5) == 0
    kept = [i["reason"] for i in res["items"] if i["camera"] == "front"]
    assert kept and all(
        r.startswith("floor: camera min_keep=30d until ") and "wanted by disk pressure" in r
        for r in kept
    )


# ---- retention: none ---------------------------------------------------------------------------


def test_a_retention_none_site_keeps_everything_past_any_age_and_through_disk_pressure(
    tmp_path, tmpfs, now
):
    vol = tmpfs(tmp_path / "v", "4m")
    (gate_root := vol / "gate").mkdir()
    (hik_root := vol / "hik").mkdir()
    # the recorder-managed site's footage is years old and the oldest on the shared volume
    hik = aged(hik_root, "ch01", now, *[2000 - i * 50 for i in range(16)], size=SEG)
    gate = aged(gate_root, "ch01", now, *[10 - i * 0.5 for i in range(14)], size=SEG)
    config = write_config(
        tmp_path,
        site_yaml("gate", gate_root, "    keep: 1y\n    min_keep: 1d")
        + site_yaml("hik", hik_root, "    retention: none"),
        "  ch01: {keep: 30d}\n",  # a camera rule of the same id: not for the hik site
        min_free="50%",
    )
    need = need_bytes(vol, 0.5)
    count = math.ceil(need / SEG)
    assert 2 <= count <= 12

    plan = cli_json(config, "retention", "plan")
    assert plan["unmanaged"] == [
        {"site": "hik", "segments": 16, "bytes": 16 * SEG, "reason": UNMANAGED_REASON}
    ]
    assert all(i["site"] == "gate" for i in plan["items"])
    human = cli(config, "retention", "plan")
    assert f"site hik: 16 segment(s) (1.6 MiB) kept: {UNMANAGED_REASON}" in " ".join(
        human.stdout.split()
    )

    res = cli_json(config, "retention", "run")
    assert all(p.exists() for p in hik), "footage of a retention: none site was deleted"
    assert [p for p in gate if not p.exists()] == gate[:count]
    assert {i["site"] for i in res["items"]} == {"gate"}
    assert not res["trips"]

    engine = Engine(load_config(config))  # status as the daemon answers it
    try:
        hik_status = engine.status()["sites"]["hik"]
    finally:
        engine.catalog.close()
    assert hik_status["rule"] == "retention=none" and hik_status["segments"] == 16
    # years old, yet not overdue: no rule of nvr-guard's applies there
    assert hik_status["oldest_past_rule"] is False and hik_status["oldest_expires"] is None


def test_footage_of_a_retention_none_site_is_exported(tmp_path, now, clamav_db):
    root = tmp_path / "rec"
    target = tmp_path / "export-target"
    target.mkdir()
    start = (now - timedelta(days=400)).replace(second=0)
    make_footage(root, "lobby-1", start, 2)
    config = write_config(
        tmp_path,
        site_yaml("hik", root, "    retention: none"),
        "  lobby-1: {level: 1}\n",
        extra=f"""people:
  users:
    alice: {{roles: [operator], level: 1}}
    bob: {{roles: [dept_manager]}}
    carol: {{roles: [security_lead]}}
    tom: {{roles: [technician]}}
approval:
  steps: [dept_manager, security_lead]
  hours: "00:00-23:59"
export:
  targets: [{target}]
  preset: ultrafast
media:
  scanner: clamscan
  database: {clamav_db}
  sysfs_root: {tmp_path / "sysfs"}
""",
    )
    (tmp_path / "sysfs" / "block").mkdir(parents=True)
    engine = Engine(load_config(config))
    alice, bob, carol, tom = (
        Caller(60000 + i, n) for i, n in enumerate(["alice", "bob", "carol", "tom"])
    )
    try:
        engine.reconcile(full=True)
        assert engine.sweep(actor="root").deleted == 0
        req = engine.workflow.new(
            alice,
            {
                "cameras": "lobby-1",
                "from": (start + timedelta(seconds=2)).isoformat(),
                "to": (start + timedelta(seconds=15)).isoformat(),
                "reason": "an incident at the counter",
                "basis": "police request 17",
                "recipient": {"unit": "City police", "person": "Officer Wang", "contact": "010"},
            },
        )
        rid = int(req["id"])
        engine.workflow.approve(bob, rid, "ok")
        engine.workflow.approve(carol, rid, "ok")
        assert engine.media.scan(tom, str(target))["result"] == "clean"
        res = engine.workflow.export(tom, rid, str(target))
    finally:
        engine.catalog.close()
    pkg = Path(res["package"])
    assert pkg.parent == target
    assert verify_package(pkg).ok
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert "lobby-1" in json.dumps(manifest)
    assert len(list(root.rglob("*.mp4"))) == 2  # the sources stay


def test_metrics_measure_overdue_and_lateness_under_the_cameras_rule(tmp_path, now):
    root = tmp_path / "rec"
    root.mkdir()
    aged(root, "front", now, 100, 60)
    aged(root, "side", now, 20, 1)
    prom = tmp_path / "nvr-guard.prom"
    config = write_config(
        tmp_path,
        site_yaml("gate", root, "    keep: 15d"),
        "  front: {keep: 90d}\n",
        extra=f"metrics: {{textfile: {prom}}}\n",
    )
    t = now.timestamp()
    engine = Engine(load_config(config), clock=lambda: ClockReading(t, 1000.0, "boot"))
    try:
        engine.reconcile()
        out = engine.sweep()
        assert out.deleted == 2  # front's 100 days (keep 90d), side's 20 days (keep 15d)
        exporter = Exporter.from_config(engine)
        assert exporter is not None
        exporter.update()
    finally:
        engine.catalog.close()
    m = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(prom.read_text())
        for s in fam.samples
    }
    # the oldest footage left is front's, 60 days old under its 90: nothing is overdue
    assert m[("nvrguard_oldest_segment_overdue_seconds", (("site", "gate"),))] == 0
    # each deleted the moment of the sweep, late by its own rule: 10 days and 5 days (a segment
    # closes a minute after it starts)
    late = sorted([(100 - 90) * DAY - 60, (20 - 15) * DAY - 60])
    assert m[("nvrguard_deletion_lateness_seconds_sum", ())] == pytest.approx(sum(late))
    assert m[("nvrguard_last_sweep_lateness_max_seconds", ())] == pytest.approx(late[-1])
