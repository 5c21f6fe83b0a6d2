"""Exported copies end when their purpose ends: packages on export targets are destroyed
``export.target_keep`` after export (with a receipt) unless a hold names the request; an admin
ends one early; a medium wiped on its return destroys the copies on it; nothing but the package
is ever touched. The real Workflow, catalog and audit chain on an injected clock; the package
builder is a stand-in that writes real files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.identity import Caller
from nvr_guard.model import ClockReading
from tests.fixtures.media import MediaLab
from tests.fixtures.site import write_segment

SH = ZoneInfo("Asia/Shanghai")
DAY = 86400.0
MONDAY_9 = datetime(2026, 11, 23, 9, 0, tzinfo=SH).timestamp()
RECORDED = datetime(2026, 11, 23, 7, 0, tzinfo=SH).timestamp()

ALICE, BOB, CAROL, TOM, ADM = (
    Caller(10_001, "alice", ()),
    Caller(10_002, "bob", ()),
    Caller(10_003, "carol", ()),
    Caller(10_004, "tom", ()),
    Caller(10_005, "adm", ()),
)


class Dest:
    def __init__(self, path: Path, desc: Mapping[str, Any]) -> None:
        self.path, self.desc = path, desc

    def __enter__(self) -> Dest:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def check_before_write(self, bytes_needed: int) -> None:
        pass

    def describe(self) -> Mapping[str, Any]:
        return self.desc


def exporter(clips: Any, job: Any, dest: Any, key: Any, **kw: Any) -> Any:
    name = f"NVRG-{job.request['id']}-20261123T010000Z"
    tmp = dest.path / f".{name}.tmp"
    tmp.mkdir()
    try:
        (tmp / "clip.mp4").write_bytes(b"x" * 1000)
        (tmp / "manifest.json").write_text("{}")
        dest.before_commit(tmp)
        os.rename(tmp, dest.path / name)
    except BaseException:  # as the real builder: a failed export leaves nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SimpleNamespace(
        path=dest.path / name,
        sha256s={},
        manifest={"destination": dict(dest.describe())},
    )


class Lab:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="nvrg-copies-"))
        for i in range(3):
            write_segment(self.base / "rec", "cam-1", datetime.fromtimestamp(RECORDED + i * 60, SH))
        self.target = self.base / "target"
        self.target.mkdir()
        cfg = self.base / "config.yaml"
        cfg.write_text(f"""state_dir: {self.base / "state"}
timezone: Asia/Shanghai
socket: {self.base / "c.sock"}
sites:
  bank:
    profile: general
    roots: [{self.base / "rec"}]
    layout: "{{camera}}/%Y-%m-%d/%H/%M.%S.mp4"
cameras:
  cam-1: {{level: 1}}
people:
  users:
    alice: {{roles: [operator]}}
    bob: {{roles: [dept_manager]}}
    carol: {{roles: [security_lead]}}
    tom: {{roles: [technician]}}
    adm: {{roles: [admin], level: 2}}
approval:
  steps: [dept_manager, security_lead]
  hours: "00:00-23:59"
export:
  targets: [{self.target}]
  target_keep: 30d
""")
        self.now = MONDAY_9
        self.engine = Engine(
            load_config(str(cfg)), clock=lambda: ClockReading(self.now, self.now, "test")
        )
        self.engine.reconcile(full=True)
        self.wf = self.engine.workflow
        self.wf.exporter = exporter
        self.desc: Mapping[str, Any] = {"kind": "directory", "path": str(self.target)}
        self.wf.open_destination = lambda target, tz: Dest(Path(target), self.desc)

    def approved(self, fmt: str = "mp4", *more: Caller) -> int:
        """A request of cam-1 filed by alice and approved by bob, carol (and ``more``)."""
        r = self.wf.new(
            ALICE,
            {
                "cameras": "cam-1",
                "from": datetime.fromtimestamp(RECORDED, SH).isoformat(),
                "to": datetime.fromtimestamp(RECORDED + 120, SH).isoformat(),
                "reason": "theft at the counter",
                "basis": "police notice 17",
                "recipient": {"unit": "City police", "person": "Wang", "contact": "010"},
                "format": fmt,
            },
        )
        rid = int(r["id"])
        for who in (BOB, CAROL, *more):
            self.wf.approve(who, rid, "")
        return rid

    def exported(self) -> tuple[int, Path]:
        rid = self.approved()
        res = self.wf.export(TOM, rid, str(self.target))
        return rid, Path(res["package"])

    def audit(self, action: str) -> list[Any]:
        return list(self.engine.audit.entries(action=action))

    def close(self) -> None:
        self.engine.catalog.conn.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def test_a_package_on_a_target_is_destroyed_when_target_keep_ends_with_a_receipt(lab: Lab):
    rid, pkg = lab.exported()
    st = lab.engine.status()["export_copies"]
    assert st["on_targets"] == 1 and st["due_now"] == 0 and st["items"][0]["request"] == rid
    lab.now += 29 * DAY
    assert lab.wf.copies.destroy_due() == [] and pkg.is_dir()
    lab.now += 1 * DAY + 60
    assert lab.engine.status()["export_copies"]["due_now"] == 1
    assert lab.wf.copies.destroy_due() == [rid]
    assert not pkg.exists() and lab.target.is_dir() and os.listdir(lab.target) == []
    [receipt] = lab.audit("export.destroyed")
    assert receipt.object == f"request:{rid}"
    d = receipt.details
    assert d["files"] == 2 and d["bytes"] == 1002 and d["names"] == ["clip.mp4", "manifest.json"]
    assert len(d["digest"]) == 64 and d["missing"] is False and d["by"] == "nvr-guard"
    shown = lab.wf.show(ALICE, rid)
    assert "target_keep" in shown["destroyed"]["how"]
    assert lab.engine.status()["export_copies"]["on_targets"] == 0
    assert lab.wf.copies.destroy_due() == []  # once


def test_a_hold_naming_the_request_keeps_its_package_until_released(lab: Lab):
    rid, pkg = lab.exported()
    [hold] = lab.engine.hold_request(CAROL, rid, "complaint pending")
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == [] and pkg.is_dir()
    st = lab.engine.status()["export_copies"]
    assert st["held"] == 1 and st["items"][0]["held_by"] == [hold.id]
    with pytest.raises(PolicyRefused, match="kept by hold"):
        lab.wf.copies.destroy(ADM, rid, "no longer needed")
    lab.engine.hold_release(CAROL, hold.id, "complaint closed")
    assert lab.wf.copies.destroy_due() == [rid] and not pkg.exists()


def test_an_admin_ends_a_package_early_and_no_one_else_can(lab: Lab):
    rid, pkg = lab.exported()
    before = len(lab.audit("access.denied"))
    for who in (TOM, CAROL, ALICE):
        with pytest.raises(PolicyRefused, match="admin role"):
            lab.wf.copies.destroy(who, rid, "tidy")
    assert len(lab.audit("access.denied")) == before + 3 and pkg.is_dir()
    with pytest.raises(InvalidInput, match="--reason"):
        lab.wf.copies.destroy(ADM, rid, "  ")
    got = lab.wf.copies.destroy(ADM, rid, "the court returned the case")
    assert got["files"] == 2 and not pkg.exists()
    [receipt] = lab.audit("export.destroyed")
    assert receipt.actor == "adm" and receipt.details["reason"] == "the court returned the case"
    with pytest.raises(InvalidInput, match="already destroyed"):
        lab.wf.copies.destroy(ADM, rid, "again")


def test_a_wiped_medium_destroys_the_copies_exported_onto_it(lab: Lab):
    lab.desc = {"kind": "usb-media", "id": "usb-0781-5583-4C53", "label": "stick 3"}
    rid, pkg = lab.exported()
    assert lab.engine.status()["export_copies"]["on_media"] == 1
    with pytest.raises(InvalidInput, match="media wipe"):
        lab.wf.copies.destroy(ADM, rid, "x")
    lab.now += 60 * DAY
    assert lab.wf.copies.destroy_due() == [] and pkg.is_dir()  # out of reach: not deleted
    assert lab.wf.copies.wiped(ADM, "usb-other") == []
    assert lab.wf.copies.wiped(ADM, "usb-0781-5583-4C53") == [rid]
    shown = lab.wf.show(ALICE, rid)
    assert shown["destroyed"]["how"] == (
        "medium returned and wiped (media wipe of usb-0781-5583-4C53)"
    )
    assert lab.engine.status()["export_copies"]["on_media"] == 0


def test_nothing_but_the_package_is_touched(lab: Lab):
    rid, pkg = lab.exported()
    # someone replaced the package with a link to footage elsewhere: not followed, reported
    elsewhere = lab.base / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evidence.mp4").write_bytes(b"keep me")
    shutil.rmtree(pkg)
    pkg.symlink_to(elsewhere)
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == []
    assert (elsewhere / "evidence.mp4").read_bytes() == b"keep me" and pkg.is_symlink()
    [failed] = lab.audit("export.destroy_failed")
    assert "not a directory of this process" in failed.details["error"]
    assert lab.wf.copies.destroy_due() == []  # reported once, not every minute
    assert len(lab.audit("export.destroy_failed")) == 1


def test_a_package_with_something_else_inside_is_left_whole(lab: Lab):
    rid, pkg = lab.exported()
    (pkg / "added").mkdir()
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == []
    assert sorted(os.listdir(pkg)) == ["added", "clip.mp4", "manifest.json"]


def test_a_package_removed_by_hand_is_recorded_as_found_missing(lab: Lab):
    rid, pkg = lab.exported()
    shutil.rmtree(pkg)
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == [rid]
    [receipt] = lab.audit("export.destroyed")
    assert receipt.details["missing"] is True
    assert "removed outside nvr-guard" in lab.wf.show(ALICE, rid)["destroyed"]["how"]
    assert json.dumps(receipt.details)


def test_packages_exported_before_copies_were_recorded_are_adopted(lab: Lab):
    rid, pkg = lab.exported()
    lab.wf.store.update(rid, copy=None)  # as an older version left it
    assert lab.wf.copies.due(lab.now) == []
    assert lab.wf.copies.adopt() == [rid]
    assert lab.wf.copies.adopt() == []  # once
    [entry] = lab.audit("export.copies_adopted")
    assert entry.details["requests"] == [rid]
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == [rid] and not pkg.exists()


def test_a_reload_that_shortens_target_keep_applies_to_packages_already_out(lab: Lab):
    rid, pkg = lab.exported()
    lab.now += 8 * DAY
    assert lab.wf.copies.destroy_due() == []
    cfg = Path(lab.engine.config.source_path)
    cfg.write_text(cfg.read_text().replace("target_keep: 30d", "target_keep: 7d"))
    lab.engine.apply_config(load_config(str(cfg)), "test")
    assert lab.wf.copies.destroy_due() == [rid] and not pkg.exists()


def test_a_package_on_a_target_that_is_not_mounted_is_not_taken_for_destroyed(lab: Lab):
    import subprocess

    # the export target is a disk (here a bind mount of a directory) mounted at the target
    disk = lab.base / "disk"
    disk.mkdir()
    subprocess.run(["mount", "--bind", str(disk), str(lab.target)], check=True)
    try:
        rid, pkg = lab.exported()
        subprocess.run(["umount", str(lab.target)], check=True)  # away for maintenance
        assert not pkg.exists()
        lab.now += 31 * DAY
        assert lab.wf.copies.destroy_due() == []
        assert lab.wf.show(ALICE, rid)["destroyed"] is None
        st = lab.engine.status()
        assert any(a["kind"] == "export_copy" for a in st["attention"]) and not st["ok"]
        assert lab.wf.copies.destroy_due() == []  # reported once, tried every minute
        assert len(lab.audit("export.destroy_failed")) == 1
        subprocess.run(["mount", "--bind", str(disk), str(lab.target)], check=True)  # back
        assert lab.wf.copies.destroy_due() == [rid] and not pkg.exists()
        assert not any(a["kind"] == "export_copy" for a in lab.engine.status()["attention"])
        [receipt] = lab.audit("export.destroyed")
        assert receipt.details["missing"] is False and receipt.details["files"] == 2
    finally:
        subprocess.run(["umount", str(lab.target)], check=False, capture_output=True)


def test_another_disk_mounted_at_the_target_is_not_taken_for_the_one_written_to(
    lab: Lab, media_lab: MediaLab
):
    a = media_lab.loop(label="A")
    media_lab.mount(a.device, where=lab.target)
    rid, pkg = lab.exported()
    media_lab.umount(lab.target)
    media_lab.detach(a)
    # another disk, likely in the same slot: same device number, same root inode
    b = media_lab.loop(label="B")
    media_lab.mount(b.device, where=lab.target)
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == []
    assert lab.wf.show(ALICE, rid)["destroyed"] is None
    assert any(a["kind"] == "export_copy" for a in lab.engine.status()["attention"])
    media_lab.umount(lab.target)
    media_lab.detach(b)
    back = media_lab.loop(image=a.image)  # the disk it went to is back
    media_lab.mount(back.device, where=lab.target)
    assert lab.wf.copies.destroy_due() == [rid] and not pkg.exists()
    assert not any(a["kind"] == "export_copy" for a in lab.engine.status()["attention"])


def test_the_same_disk_back_on_another_device_is_recognised(lab: Lab, media_lab: MediaLab):
    a = media_lab.loop(label="A")
    media_lab.mount(a.device, where=lab.target)
    rid, pkg = lab.exported()
    media_lab.umount(lab.target)
    media_lab.detach(a)
    media_lab.loop(label="SPARE")  # takes the old loop number: the disk comes back as another
    again = media_lab.loop(image=a.image)
    assert again.device != a.device
    media_lab.mount(again.device, where=lab.target)
    shutil.rmtree(pkg)  # someone removed the package by hand meanwhile
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == [rid]
    [receipt] = lab.audit("export.destroyed")
    assert receipt.details["missing"] is True


def test_an_admin_records_a_package_whose_target_is_gone_for_good(lab: Lab, media_lab: MediaLab):
    a = media_lab.loop(label="A")
    media_lab.mount(a.device, where=lab.target)
    rid, pkg = lab.exported()
    media_lab.umount(lab.target)  # the disk was lost
    lab.now += 31 * DAY
    assert lab.wf.copies.destroy_due() == []
    assert any(a["kind"] == "export_copy" for a in lab.engine.status()["attention"])
    got = lab.wf.copies.destroy(ADM, rid, "the disk was stolen; reported to the police")
    assert got["missing"] is True
    shown = lab.wf.show(ALICE, rid)["destroyed"]
    assert shown["how"] == "not found on its export target; recorded as destroyed by an admin"
    assert shown["reason"] == "the disk was stolen; reported to the police"
    assert not any(a["kind"] == "export_copy" for a in lab.engine.status()["attention"])
