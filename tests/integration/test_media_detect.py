"""Detection of removable media and enrolment: a fake sysfs USB stick over a real loop device
with a real ext4 filesystem (blkid and the mount table are real), see tests/fixtures/media.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from nvr_guard.errors import InvalidInput
from nvr_guard.media.detect import find_medium, list_media, medium_id, read_mounts
from nvr_guard.store.media import MediaStore
from tests.fixtures.media import MediaLab, fake_internal_disk, fake_usb_stick, sh

SERIAL = "4C530001231122115392"


def fs_uuid(node: str) -> str:
    return sh("blkid", "-p", "-s", "UUID", "-o", "value", node).stdout.strip()


def test_fake_usb_stick_is_detected_with_vendor_serial_uuid_and_mount(
    media_lab: MediaLab, tmp_path: Path
) -> None:
    loop = media_lab.loop(label="CASE-17")
    mp = media_lab.mount(loop.device)
    sysfs = tmp_path / "sys"
    fake_usb_stick(sysfs, loop, vendor="SanDisk", model="Cruzer Blade", serial=SERIAL)

    [m] = list_media(sysfs)
    uuid = fs_uuid(loop.device)
    assert (m.vendor, m.model, m.serial) == ("SanDisk", "Cruzer Blade", SERIAL)
    assert (m.bus, m.removable, m.name, m.device) == ("usb", True, loop.name, loop.device)
    assert (m.fs_type, m.fs_uuid, m.label) == ("ext4", uuid, "CASE-17")
    assert m.mountpoint == str(mp) and m.readonly is False
    assert m.size == 16 * 2**20
    assert m.id == f"usb-{SERIAL}-{uuid.replace('-', '')[:8]}"
    assert find_medium(m.id, sysfs).mountpoint == str(mp)


def test_read_only_mount_and_unmounted_state_are_reported(
    media_lab: MediaLab, tmp_path: Path
) -> None:
    loop = media_lab.loop()
    sysfs = tmp_path / "sys"
    fake_usb_stick(sysfs, loop)
    [m] = list_media(sysfs)
    assert m.mountpoint is None and m.readonly is False
    mp = media_lab.mount(loop.device, readonly=True)
    [m] = list_media(sysfs)
    assert m.mountpoint == str(mp) and m.readonly is True


def test_non_removable_disks_are_listed_only_with_include_all(
    media_lab: MediaLab, tmp_path: Path
) -> None:
    loop = media_lab.loop()
    sysfs = tmp_path / "sys"
    fake_usb_stick(sysfs, loop)
    fake_internal_disk(sysfs, "sda")
    assert [m.name for m in list_media(sysfs)] == [loop.name]
    every = {m.name: m for m in list_media(sysfs, include_all=True)}
    assert set(every) == {loop.name, "sda"}
    assert (every["sda"].bus, every["sda"].removable, every["sda"].serial) == (
        "scsi",
        False,
        "S6PNNS0T123456",
    )
    with pytest.raises(InvalidInput, match="not attached"):
        find_medium(every["sda"].id, sysfs)


def test_real_sysfs_lists_only_removable_or_usb_devices() -> None:
    # whatever this host has (loop devices are neither removable nor on USB)
    for m in list_media():
        assert m.removable or m.bus == "usb", m


def test_partitions_are_read_from_the_block_directory(media_lab: MediaLab, tmp_path: Path) -> None:
    loop = media_lab.loop()
    sysfs = tmp_path / "sys"
    block = fake_usb_stick(sysfs, loop)
    # the loop driver here does not scan partitions, so this partition exists in sysfs only
    part = block / f"{loop.name}p1"
    part.mkdir()
    for attr, value in {"partition": "1", "size": "2048", "dev": "259:99", "ro": "0"}.items():
        (part / attr).write_text(value + "\n")
    [m] = list_media(sysfs)
    [p] = m.partitions
    assert (p.name, p.number, p.size, p.dev, p.fs_type) == (
        f"{loop.name}p1",
        1,
        2**20,
        "259:99",
        None,
    )
    assert m.fs_type == "ext4"  # the whole device carries the filesystem


@pytest.mark.parametrize(
    ("bus", "serial", "uuid", "expect"),
    [
        ("usb", "AA11", "1c2d3e4f-aaaa-bbbb-cccc-dddddddddddd", "usb-AA11-1c2d3e4f"),
        ("usb", "AA 11/..", "ABCD-1234", "usb-AA_11_..-abcd1234"),
        ("usb", "", "ABCD-1234", "usb-noserial-abcd1234"),
        ("usb", "AA11", None, "usb-AA11-nofs"),
        ("usb", "X" * 40, "0011", "usb-" + "X" * 32 + "-0011"),
    ],
)
def test_medium_id(bus: str, serial: str, uuid: str | None, expect: str) -> None:
    assert medium_id(bus, serial, uuid) == expect


def test_mountinfo_escapes_and_bind_mounts(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 1 7:3 /sub /mnt/bind rw - ext4 /dev/loop3 rw\n"
        "31 1 7:3 / /media/my\\040stick ro,nosuid - ext4 /dev/loop3 rw\n"
    )
    mounts = read_mounts(info)
    assert [(m.mountpoint, m.readonly, m.root) for m in mounts] == [
        ("/mnt/bind", False, "/sub"),
        ("/media/my stick", True, "/"),
    ]


def test_enrolment_and_removal(media_lab: MediaLab, tmp_path: Path) -> None:
    loop = media_lab.loop()
    media_lab.mount(loop.device)
    sysfs = tmp_path / "sys"
    fake_usb_stick(sysfs, loop)
    [m] = list_media(sysfs)
    store = MediaStore(sqlite3.connect(tmp_path / "catalog.db", isolation_level=None))

    e = store.enroll(m, "stick 3", "admin", 1000.0)
    assert (e.id, e.serial, e.fs_uuid, e.label, e.enrolled_by, e.active) == (
        m.id,
        SERIAL,
        m.fs_uuid,
        "stick 3",
        "admin",
        True,
    )
    assert [x.id for x in store.all()] == [m.id] and store.match(m) == e
    with pytest.raises(InvalidInput, match="already enrolled"):
        store.enroll(m, "again", "admin", 1001.0)

    r = store.remove(m.id, "admin2", 2000.0)
    assert (r.active, r.removed_by, r.removed_at) == (False, "admin2", 2000.0)
    assert store.all() == [] and store.match(m) is None
    assert [x.id for x in store.all(include_removed=True)] == [m.id]
    with pytest.raises(InvalidInput, match="not enrolled"):
        store.remove(m.id, "admin2", 2001.0)

    again = store.enroll(m, "stick 3b", "admin", 3000.0)
    assert (again.active, again.label, again.enrolled_at) == (True, "stick 3b", 3000.0)


def test_enrolment_needs_a_label_and_a_filesystem(media_lab: MediaLab, tmp_path: Path) -> None:
    loop = media_lab.loop()
    sysfs = tmp_path / "sys"
    fake_usb_stick(sysfs, loop)
    [m] = list_media(sysfs)
    store = MediaStore(sqlite3.connect(":memory:", isolation_level=None))
    with pytest.raises(InvalidInput, match="label"):
        store.enroll(m, " ", "admin", 1.0)
    sh("wipefs", "-a", "-q", loop.device)
    [blank] = list_media(sysfs)
    assert blank.fs_uuid is None and blank.id.endswith("-nofs")
    with pytest.raises(InvalidInput, match="no filesystem"):
        store.enroll(blank, "blank", "admin", 1.0)
