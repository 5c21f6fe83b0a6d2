"""Roots shared by several sites (issue 16): ``sites.<name>.cameras`` splits one recorder's tree
(Frigate-shaped: ``2024-05-01/14/front/03.20.mp4``, UTC) between sites; each camera's footage
follows its own site's rule, overlapping claims are refused at their line, a camera no site
claims is never deleted and stays reported until claimed, and a reload that moves a camera
re-assigns its rows at once, the mass-deletion guard and holds still in force."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nvr_guard import attention as att
from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from tests.fixtures.site import Site, poll

DAY = timedelta(days=1)
FRIGATE = "%Y-%m-%d/%H/{camera}/%M.%S.mp4"


def frigate_segment(root: Path, camera: str, t: datetime) -> Path:
    u = t.astimezone(UTC)
    p = root / u.strftime("%Y-%m-%d/%H") / camera / u.strftime("%M.%S.mp4")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\0" * 1000)
    ts = t.timestamp() + 10  # a 10-second segment, closed when it ended
    os.utime(p, (ts, ts))
    return p


def site_block(name: str, root: Path, keep: str, cameras: str | None, layout: str = FRIGATE) -> str:
    out = f'  {name}:\n    keep: {keep}\n    roots: [{root}]\n    layout: "{layout}"\n'
    out += "    layout_timezone: UTC\n"
    if cameras is not None:
        out += f"    cameras: {cameras}\n"
    return out


def write_shared(
    site: Site,
    north: str | None = "[front, 'gate*']",
    south: str | None = "[back]",
    fraction: float = 1.0,
    north_keep: str = "30d",
    south_keep: str = "7d",
    south_layout: str = FRIGATE,
    sweep_every: str = "5m",
) -> str:
    text = f"""state_dir: {site.state}
timezone: Asia/Shanghai
socket: {site.socket}
socket_group: root
settle: 2m
sweep_every: {sweep_every}
guards: {{max_delete_fraction: {fraction}, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
{site_block("north", site.root, north_keep, north)}{
        site_block("south", site.root, south_keep, south, south_layout)
    }people:
  users: {{root: {{roles: [admin]}}}}
"""
    site.config.write_text(text)
    return text


def rows(site: Site) -> dict[str, set[str]]:
    """camera -> the sites its catalogued rows belong to."""
    con = sqlite3.connect(site.state / "catalog.db")
    try:
        out: dict[str, set[str]] = {}
        for cam, s in con.execute("SELECT DISTINCT camera, site FROM segments"):
            out.setdefault(cam, set()).add(s)
        return out
    finally:
        con.close()


def line_of(text: str, needle: str) -> int:
    (n,) = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return n


def test_each_camera_of_a_shared_root_follows_its_own_sites_keep(site: Site, now: datetime) -> None:
    write_shared(site)  # north keeps 30 days (front, gate*), south 7 days (back)
    ages = (2, 10, 40)
    segs = {
        (cam, age): frigate_segment(site.root, cam, now - age * DAY + timedelta(minutes=i))
        for i, cam in enumerate(("front", "gate-2", "back"))
        for age in ages
    }
    r = site.run("config", "check")
    assert r.returncode == 0, r.stderr
    res = site.json("retention", "run")
    gone = {k for k, p in segs.items() if not p.exists()}
    assert gone == {("front", 40), ("gate-2", 40), ("back", 10), ("back", 40)}
    by_path = {i["path"]: i for i in res["items"]}
    assert "keep=7d" in by_path[str(segs[("back", 10)])]["reason"]
    assert "keep=30d" in by_path[str(segs[("front", 40)])]["reason"]
    # one walk of the root, each camera's rows its own site's
    assert rows(site) == {"front": {"north"}, "gate-2": {"north"}, "back": {"south"}}
    engine = Engine(load_config(site.config))
    try:
        engine.reconcile(full=True)
        assert engine.status()["ok"] is True, engine.attention.as_json()
    finally:
        engine.catalog.close()


@pytest.mark.parametrize(
    ("north", "south", "needle", "fragment"),
    [
        ("[front]", "[front]", "cameras: [front]\n", "sites.south.cameras[0]: 'front' claims the"),
        ("['gate*']", "[gate-2]", "[gate-2]", "'gate-2' claims the same cameras as sites.north"),
        ("['ga*']", "['gate*']", "['gate*']", "'gate*' may match the same cameras as"),
        ("['*']", "[back]", "[back]", "'back' claims the same cameras as sites.north.cameras[0]"),
        (None, "[back]", "roots:", "needs cameras: in each of them (missing in sites.north)"),
        ("[front]", "[back]", "roots:", "layout differs"),
        ("[front, 'x/y']", "[back]", "x/y", "'x/y' contains '/'"),
        ("[]", "[back]", "cameras: []", "empty list"),
    ],
)
def test_overlapping_or_unsound_sharing_is_refused_at_its_line(
    site: Site, north: str | None, south: str, needle: str, fragment: str
) -> None:
    layout = "{camera}/%Y-%m-%d/%H/%M.%S.mp4" if "layout" in fragment else FRIGATE
    text = write_shared(site, north=north, south=south, south_layout=layout)
    # the later of the two lines carrying the needle (the south site's)
    line = max(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln + "\n")
    r = site.run("config", "check")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert any(
        ln.startswith(f"{site.config}:{line}: ") and fragment in ln for ln in r.stderr.splitlines()
    ), (line, r.stderr)
    assert not (site.state / "catalog.db").exists()  # refused before anything was touched


def test_disjoint_globs_may_share_a_root(site: Site) -> None:
    write_shared(site, north="['front*', gate-1]", south="['back*', side]")
    r = site.run("config", "check")
    assert r.returncode == 0, r.stderr


def test_unclaimed_camera_is_never_deleted_and_reported_until_claimed(
    site: Site, now: datetime
) -> None:
    write_shared(site, north="[front]", south="[back]")
    side = [frigate_segment(site.root, "side", now - (40 + i) * DAY) for i in range(3)]
    front = frigate_segment(site.root, "front", now - 40 * DAY)
    res = site.json("retention", "run")
    assert not front.exists()
    assert all(p.exists() for p in side)
    assert all("/side/" not in i["path"] for i in res["items"])
    assert "side" not in rows(site)
    plan = site.run("retention", "plan")
    assert plan.returncode == 0, plan.stderr
    assert "attention (camera_unclaimed)" in plan.stderr and "camera side" in plan.stderr
    south = site.run("retention", "plan", "--site", "south")  # a sharing site sees it too
    assert "attention (camera_unclaimed)" in south.stderr, south.stderr
    assert site.json("retention", "plan")["unmatched"] == []  # not a layout mismatch

    engine = Engine(load_config(site.config))
    try:
        engine.reconcile(full=True)
        st = engine.status()
        assert st["ok"] is False
        (a,) = st["attention"]
        assert (a["kind"], a["camera"], a["count"]) == (att.CAMERA_UNCLAIMED, "side", 3)
        assert a["sites"] == ["north", "south"] and a["root"] == str(site.root)
        assert str(site.root) in a["message"] and "cameras:" in a["message"]
        # claimed by a reload: the next walk finds nothing unclaimed and clears the entry
        write_shared(site, north="[front]", south="[back, 'si*']")
        engine.apply_config(load_config(site.config), "root")
        engine.reconcile(full=True)
        assert engine.status()["ok"] is True, engine.attention.as_json()
        cleared = [e.object for e in engine.audit.entries(action="attention.cleared")]
        assert cleared == ["attention:camera_unclaimed:north"], cleared
    finally:
        engine.catalog.close()
    # south's 7 days apply to it now
    res = site.json("retention", "run")
    assert not any(p.exists() for p in side)
    done = {i["path"]: (i["site"], i["action"]) for i in res["items"]}
    assert [done[str(p)] for p in side] == [("south", "delete")] * 3


def test_a_camera_only_a_site_with_cameras_leaves_on_its_own_root(
    site: Site, now: datetime
) -> None:
    # one site, not shared, that lists cameras: the others in its root are unclaimed, kept
    site.config.write_text(
        write_shared(site).split("  south:")[0].replace("[front, 'gate*']", "[front]")
        + "people:\n  users: {root: {roles: [admin]}}\n"
    )
    other = frigate_segment(site.root, "lobby", now - 60 * DAY)
    mine = frigate_segment(site.root, "front", now - 60 * DAY)
    site.json("retention", "run")
    assert other.exists() and not mine.exists()
    engine = Engine(load_config(site.config))
    try:
        engine.reconcile(full=True)
        (a,) = engine.attention.entries()
        assert a.kind == att.CAMERA_UNCLAIMED and a.site == "north"
        assert "site north lists cameras:" in a.message and "lobby" in a.message
    finally:
        engine.catalog.close()


def test_reload_moving_a_camera_reassigns_its_rows_under_the_guard_and_holds(
    site: Site, now: datetime
) -> None:
    # side is north's (30 days) at first; ten of its twelve segments are 10 days old
    write_shared(site, north="[front, side]", south="[back]", fraction=0.2)
    old = [
        frigate_segment(site.root, "side", now - 10 * DAY + i * timedelta(minutes=5))
        for i in range(10)
    ]
    young = [
        frigate_segment(site.root, "side", now - DAY + i * timedelta(minutes=5)) for i in range(2)
    ]
    t0 = (now - 10 * DAY - timedelta(minutes=1)).isoformat()
    t1 = (now - 10 * DAY + timedelta(minutes=2)).isoformat()
    r = site.run(
        "--json", "hold", "add", "--camera", "side", "--site", "north",
        "--from", t0, "--to", t1, "--reason", "case 9",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert rows(site)["side"] == {"north"}
    engine = Engine(load_config(site.config))
    try:
        engine.reconcile(full=True)
        write_shared(site, north="[front]", south="[back, side]", fraction=0.2)
        engine.apply_config(load_config(site.config), "root")
        # at once, before any walk: the rows are south's and judged by south's 7 days
        assert rows(site)["side"] == {"south"}
        out = engine.sweep(actor="root")
        # ten of twelve due (one of them held): past the mass-deletion guard, nothing deleted
        assert out.plan.trips and out.plan.trips[0].kind == "mass-deletion"
        assert out.plan.trips[0].site == "south"
        assert all(p.exists() for p in old + young)
        write_shared(site, north="[front]", south="[back, side]", fraction=1.0)
        engine.apply_config(load_config(site.config), "root")
        engine.sweep(actor="root")
        assert old[0].exists()  # held: the hold placed on north's camera still covers it
        assert not any(p.exists() for p in old[1:])
        assert all(p.exists() for p in young)
    finally:
        engine.catalog.close()
    assert site.run("audit", "verify").returncode == 0


def test_the_daemon_reports_an_unclaimed_camera_until_a_reload_claims_it(
    site: Site, now: datetime
) -> None:
    import subprocess
    import sys

    text = write_shared(site, north="[front]", south="[back]", sweep_every="2s")
    lost = [
        frigate_segment(site.root, "porch", now - 40 * DAY + i * timedelta(hours=1))
        for i in range(4)
    ]
    due = frigate_segment(site.root, "back", now - 40 * DAY)
    frigate_segment(site.root, "back", now - DAY)
    log = open(site.base / "daemon.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        poll(site.daemon_answers, 60, "the daemon to answer")
        poll(lambda: not due.exists(), 30, "south's expired segment to be purged")
        r = site.run("--json", "status")
        assert r.returncode == 1, r.stdout
        st = json.loads(r.stdout)
        kinds = [(a["kind"], a.get("camera")) for a in st["attention"]]
        assert kinds == [(att.CAMERA_UNCLAIMED, "porch")]
        assert all(p.exists() for p in lost)  # sweeps ran: the unclaimed camera stays
        site.config.write_text(text.replace("cameras: [back]", "cameras: [back, porch]"))
        proc.send_signal(signal.SIGHUP)
        poll(lambda: not any(p.exists() for p in lost), 60, "porch's footage, claimed, purged")
        poll(lambda: site.run("status").returncode == 0, 30, "status ok once porch is claimed")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_the_purge_refuses_a_camera_its_site_does_not_claim(site: Site, now: datetime) -> None:
    write_shared(site, north="[front]", south="[back]")
    seg = frigate_segment(site.root, "back", now - 40 * DAY)
    engine = Engine(load_config(site.config))
    try:
        engine.reconcile(full=True)
        # a row not re-assigned yet (as if written before a reload moved the camera): north's
        con = sqlite3.connect(site.state / "catalog.db")
        with con:
            con.execute("UPDATE segments SET site = 'north' WHERE camera = 'back'")
        con.close()
        engine.sweep(actor="root")
        assert seg.exists()
    finally:
        engine.catalog.close()


def test_layout_test_names_the_site_that_claims_the_camera(site: Site) -> None:
    write_shared(site)
    paths = [
        site.root / "2026-11-20/06/back/05.00.mp4",
        site.root / "2026-11-20/06/gate-7/05.00.mp4",
        site.root / "2026-11-20/06/attic/05.00.mp4",
    ]
    r = site.run("--json", "layout", "test", *map(str, paths))
    assert r.returncode == 2, r.stderr  # one path is not a segment of any site
    back, gate, attic = json.loads(r.stdout)["paths"]
    assert (back["site"], back["camera"], back["ok"]) == ("south", "back", True)
    assert (gate["site"], gate["camera"], gate["ok"]) == ("north", "gate-7", True)
    assert attic["ok"] is False and "claimed by no site" in attic["reason"]


def test_a_camera_rule_is_held_to_the_floors_of_the_sites_that_can_have_it(site: Site) -> None:
    text = write_shared(site, north="[front]", south="[back]")
    text = text.replace("keep: 30d\n", "keep: 30d\n    min_keep: 30d\n", 1)
    # back can only be south's: north's 30-day floor does not bind its own 3 days
    site.config.write_text(text.replace("people:", "cameras:\n  back: {keep: 3d}\npeople:"))
    r = site.run("config", "check")
    assert r.returncode == 0, r.stderr
    site.config.write_text(text.replace("people:", "cameras:\n  front: {keep: 3d}\npeople:"))
    r = site.run("config", "check")
    assert r.returncode == 2 and "shorter than the floor of site north" in r.stderr, r.stderr


def test_a_camera_keep_of_its_own_applies_in_a_shared_root(site: Site, now: datetime) -> None:
    text = write_shared(site, north="[front, side]", south="[back]")
    site.config.write_text(text.replace("people:", "cameras:\n  side: {keep: 10d}\npeople:"))
    front = frigate_segment(site.root, "front", now - 15 * DAY)
    side = frigate_segment(site.root, "side", now - 15 * DAY + timedelta(minutes=1))
    back = frigate_segment(site.root, "back", now - 5 * DAY)
    site.json("retention", "run")
    assert front.exists() and back.exists() and not side.exists()


def test_sites_sharing_a_root_with_the_frigate_preset(site: Site, now: datetime) -> None:
    base = write_shared(site)
    head, _, _ = base.partition("sites:\n")
    people = base[base.index("people:") :]

    def config(south_extra: str) -> str:
        return (
            f"{head}sites:\n"
            f"  north: {{keep: 30d, roots: [{site.root}], layout: frigate, cameras: [front]}}\n"
            f"  south: {{keep: 7d, roots: [{site.root}], layout: frigate, cameras: [back],"
            f" timezone: Europe/Berlin{south_extra}}}\n{people}"
        )

    site.config.write_text(config(""))
    r = site.run("config", "check")  # both read the path in UTC (the preset's zone)
    assert r.returncode == 0, r.stderr
    back = frigate_segment(site.root, "back", now - 10 * DAY)
    front = frigate_segment(site.root, "front", now - 10 * DAY + timedelta(minutes=1))
    site.json("retention", "run")
    assert front.exists() and not back.exists()
    site.config.write_text(config(", layout_timezone: Asia/Tokyo"))
    r = site.run("config", "check")
    assert r.returncode == 2 and "layout_timezone differs" in r.stderr, r.stderr
