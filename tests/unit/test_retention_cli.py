"""The retention guarantees through the real command line on real trees (no daemon: root acts
locally)."""

from __future__ import annotations

import os
from datetime import timedelta

from tests.fixtures.site import build_tree, write_segment


def test_plan_deletes_nothing_and_names_reasons(site, now):
    old = write_segment(site.root, "cam1", now - timedelta(days=20))
    build_tree(site.root, ["cam1"], days=10, per_day=24, now=now)
    res = site.json("retention", "plan")
    assert res["sweep"] is None and res["deleted"] == 0
    items = {i["path"]: i for i in res["items"]}
    assert items[str(old)]["action"] == "delete"
    assert "keep=15d" in items[str(old)]["reason"]
    assert old.exists()


def test_run_deletes_expired_and_writes_receipt(site, now):
    old = [write_segment(site.root, "cam1", now - timedelta(days=16, hours=h)) for h in range(3)]
    young = build_tree(site.root, ["cam1"], days=14, per_day=24, now=now)
    res = site.json("retention", "run")
    assert res["deleted"] == 3
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in young)
    audit = site.json("audit", "show")["entries"]
    receipts = [e for e in audit if e["action"] == "purge.receipt"]
    assert receipts and receipts[0]["details"]["count"] == 3
    assert site.run("audit", "verify").returncode == 0


def test_symlink_and_foreign_files_are_never_deleted(site, now, tmp_path):
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"evidence")
    old_ts = (now - timedelta(days=100)).timestamp()
    os.utime(outside, (old_ts, old_ts))
    day_dir = site.root / "cam1" / (now - timedelta(days=100)).strftime("%Y-%m-%d") / "10"
    day_dir.mkdir(parents=True)
    link = day_dir / "00.00.mp4"
    link.symlink_to(outside)
    txt = write_segment(site.root, "cam1", now - timedelta(days=100)).with_suffix(".txt")
    txt.write_bytes(b"x")
    os.utime(txt, (old_ts, old_ts))
    build_tree(site.root, ["cam1"], days=10, per_day=24, now=now)
    site.write_config(fraction=1.0)
    res = site.json("retention", "run")
    assert outside.read_bytes() == b"evidence"
    assert link.is_symlink()
    assert txt.exists()
    assert all(i["path"] not in (str(link), str(txt)) for i in res["items"])


def test_settling_file_is_kept(site, now):
    # recorded long ago according to its path, but still being written (mtime now): never due
    # by age (both times must be past keep), and disk pressure, which takes anything past its
    # floor, finds it still recording
    p = write_segment(site.root, "cam1", now - timedelta(days=30))
    os.utime(p, None)
    build_tree(site.root, ["cam1"], days=10, per_day=24, now=now)
    site.write_config(min_free="99%")
    res = site.json("retention", "run")
    assert p.exists()
    item = next(i for i in res["items"] if i["path"] == str(p))
    assert item["action"] == "keep" and "settling" in item["reason"]


def test_held_footage_survives_until_released(site, now):
    held = write_segment(site.root, "cam1", now - timedelta(days=20))
    build_tree(site.root, ["cam1"], days=10, per_day=24, now=now)
    t0 = (now - timedelta(days=21)).isoformat()
    t1 = (now - timedelta(days=19)).isoformat()
    r = site.run(
        "--json", "hold", "add", "--camera", "cam1", "--from", t0, "--to", t1, "--reason", "case 17"
    )
    assert r.returncode == 0, r.stderr
    hold_id = __import__("json").loads(r.stdout)["id"]
    res = site.json("retention", "run")
    assert held.exists()
    item = next(i for i in res["items"] if i["path"] == str(held))
    assert item["action"] == "keep" and "case 17" in item["reason"]
    assert site.run("hold", "release", str(hold_id), "--reason", "case closed").returncode == 0
    site.json("retention", "run")
    assert not held.exists()
    actions = [e["action"] for e in site.json("audit", "show")["entries"]]
    assert "hold.add" in actions and "hold.release" in actions


def test_floor_protects_under_disk_pressure(site, now):
    # min_free 99%: the volume is always "full"; only footage past the 30-day floor may go
    past_floor = [write_segment(site.root, "cam1", now - timedelta(days=31 + d)) for d in range(2)]
    under_floor = build_tree(site.root, ["cam1"], days=29, per_day=4, now=now)
    site.write_config(keep="1y", min_keep="30d", min_free="99%", fraction=1.0)
    res = site.json("retention", "run")
    assert not any(p.exists() for p in past_floor)
    assert all(p.exists() for p in under_floor)
    assert any("floor" in a or "min_keep" in a for a in res["alerts"])


def test_overwrite_oldest_crosses_the_floor_when_configured(site, now):
    under_floor = build_tree(site.root, ["cam1"], days=5, per_day=4, now=now)
    site.write_config(
        keep="1y", min_keep="30d", min_free="99%", action="overwrite-oldest", fraction=1.0
    )
    res = site.json("retention", "run")
    assert res["deleted"] > 0
    oldest = min(under_floor)  # paths sort by date
    assert not oldest.exists()
    assert any("overwrite-oldest" in i["reason"] for i in res["items"] if i["action"] == "delete")


def test_mass_deletion_guard_stops_then_confirm_releases(site, now):
    old = build_tree(site.root, ["cam1"], days=30, per_day=4, now=now - timedelta(days=16))
    build_tree(site.root, ["cam1"], days=10, per_day=4, now=now)
    r = site.run("--json", "retention", "run")
    assert r.returncode == 3
    res = __import__("json").loads(r.stdout)
    assert res["deleted"] == 0 and all(p.exists() for p in old)
    msg = res["trips"][0]["message"]
    assert "first sweep" in msg and f"nvr-guard retention confirm {res['sweep']}" in msg
    c = site.json("retention", "confirm", str(res["sweep"]))
    assert c["deleted"] == len(old)
    assert not any(p.exists() for p in old)
    actions = [e["action"] for e in site.json("audit", "show")["entries"]]
    assert "sweep.blocked" in actions and "sweep.confirm" in actions


def test_config_change_is_named_by_the_guard(site, now):
    build_tree(site.root, ["cam1"], days=20, per_day=4, now=now)
    site.write_config(keep="30d")
    assert site.run("retention", "run").returncode == 0
    site.write_config(keep="5d")
    r = site.run("--json", "retention", "run")
    assert r.returncode == 3
    msg = __import__("json").loads(r.stdout)["trips"][0]["message"]
    assert "30d" in msg and "5d" in msg


def test_clock_jump_stops_deletion(site, now):
    build_tree(site.root, ["cam1"], days=10, per_day=24, now=now)
    assert site.run("retention", "run").returncode == 0
    jumped = (now + timedelta(days=3)).isoformat()
    r = site.run("--json", "retention", "run", "--now", jumped)
    assert r.returncode == 3
    res = __import__("json").loads(r.stdout)
    assert res["deleted"] == 0
    assert any(t["kind"] == "clock-jump" for t in res["trips"])


def test_bad_input_exits_2_and_changes_nothing(site, now):
    p = write_segment(site.root, "cam1", now - timedelta(days=20))
    r = site.run("retention", "run", "--now", "the day before")
    assert r.returncode == 2 and "ISO 8601" in r.stderr and "Traceback" not in r.stderr
    assert p.exists()
    r = site.run(
        "hold",
        "add",
        "--camera",
        "nope",
        "--from",
        "2026-01-01",
        "--to",
        "2026-01-02",
        "--reason",
        "x",
    )
    assert r.returncode == 2 and "unknown camera" in r.stderr


def test_status_without_daemon_exits_1(site):
    r = site.run("status")
    assert r.returncode == 1 and r.stderr.strip()


def test_hostile_camera_names_reach_the_terminal_escaped(site, now):
    # whoever writes to the recording tree names the cameras: an escape sequence or a
    # right-to-left override must stay inert in the plan's summary, list and guard lines
    hostile = "[red]x\x1b[5m\u202e"
    build_tree(site.root, [hostile], days=30, per_day=4, now=now - timedelta(days=16))
    for args in (("retention", "plan", "--list"), ("retention", "run")):
        r = site.run(*args)
        text = r.stdout + r.stderr
        assert "\x1b" not in text and "\u202e" not in text, (args, text)
        assert "\\x1b[5m" in text, (args, text)
