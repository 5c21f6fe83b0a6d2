"""The media gate: the pure rule, then real loop devices (fake-sysfs USB stick, see
tests/fixtures/media.py), real clamscan scans with a local EICAR database, and real exports that
hit a full filesystem, a medium pulled in the middle, an I/O error, and a file dropped on the
stick during the write."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.errors import PolicyRefused, RuntimeFailure
from nvr_guard.export import load_or_create_key, run_export, verify_package
from nvr_guard.export.package import Destination
from nvr_guard.media.clamav import listing_fingerprint, scan_tree
from nvr_guard.media.detect import Medium, list_media
from nvr_guard.media.gate import (
    Decision,
    MediaDestination,
    ScannedDirectory,
    device_identity,
    directory_identity,
    gate_decision,
    resolve_scan_target,
    scan_record,
)
from nvr_guard.store.media import Enrolment, MediaStore, ScanRecord
from tests.fixtures.clamav import EICAR_FOUND_NAME, eicar_bytes
from tests.fixtures.media import Loop, MediaLab, fake_usb_stick, sh
from tests.integration.test_export import T0, job, make_footage, segs

MAX_AGE = 15 * 60.0
NOW = 1_800_000_000.0


# ---- the pure rule ------------------------------------------------------------------------------
MEDIUM = Medium(
    id="usb-AA11-1c2d3e4f",
    name="sdb",
    device="/dev/sdb",
    vendor="SanDisk",
    model="Cruzer",
    serial="AA11",
    size=2**30,
    removable=True,
    bus="usb",
    dev="8:16",
    fs_type="exfat",
    fs_uuid="1C2D-3E4F",
    fs_device="/dev/sdb",
    fs_dev="8:16",
    mountpoint="/media/stick",
)
ENROLLED = Enrolment(
    MEDIUM.id, "AA11", "1C2D-3E4F", "stick 3", "SanDisk", "Cruzer", "admin", NOW - 86400
)
SCAN = ScanRecord(
    target_path="/media/stick",
    started=NOW - 70,
    finished=NOW - 60,
    engine="clamscan",
    engine_version="ClamAV 1.4.3",
    signature_version="27500",
    signature_date="2026-11-22",
    files=12,
    bytes=34567,
    duration=10.0,
    result="clean",
    listing_fingerprint="fp1",
    device_identity=device_identity(MEDIUM),
    media_id=MEDIUM.id,
    content_digest="cd1",
)


def decide(**kw: Any) -> Decision:
    args: dict[str, Any] = dict(
        medium=MEDIUM,
        enrolment=ENROLLED,
        scan=SCAN,
        current_fingerprint="fp1",
        free_bytes=100 * 2**20,
        bytes_needed=10 * 2**20,
        now=NOW,
        require_enrolled=True,
        scan_max_age=MAX_AGE,
    )
    args.update(kw)
    return gate_decision(**args)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"enrolment": None}, "is not enrolled: an admin enrols it with `nvr-guard media enroll"),
        ({"enrolment": replace(ENROLLED, removed_at=NOW - 5)}, "is not enrolled"),
        ({"enrolment": replace(ENROLLED, fs_uuid="9999-0000")}, "filesystem UUID 9999-0000 ->"),
        ({"enrolment": replace(ENROLLED, serial="BB22")}, "serial 'BB22' -> 'AA11'"),
        ({"medium": replace(MEDIUM, mountpoint=None)}, "is not mounted: mount its filesystem"),
        ({"medium": replace(MEDIUM, readonly=True)}, "mounted read-only at /media/stick"),
        ({"scan": None}, "has not been scanned for malware: run `nvr-guard media scan usb-AA11"),
        (
            {
                "scan": replace(
                    SCAN, result="infected", infected=({"path": "a.exe", "signature": "X"},)
                )
            },
            "was not clean: infected (X in a.exe): do not use it",
        ),
        (
            {"scan": replace(SCAN, result="error", errors=("big.bin: too large to scan",))},
            "was not clean: error (big.bin: too large to scan): fix the cause",
        ),
        ({"scan": replace(SCAN, device_identity="serial=AA11;fs_uuid=OTHER")}, "another device"),
        ({"now": SCAN.finished + MAX_AGE + 1}, "is 15 min old"),
        ({"now": SCAN.finished - 120}, "in the future"),
        ({"current_fingerprint": "fp2"}, "were added, changed or removed since the scan"),
        ({"current_fingerprint": None}, "cannot be listed"),
        ({"free_bytes": 10 * 2**20 - 1}, "free; this export needs about 10 MiB"),
        ({"free_bytes": 10 * 2**20, "reserve": 1}, "this export needs about 10 MiB"),
        (
            {"mountpoints": ["/media/nvr-export"]},
            "is mounted at /media/stick, not at one of media.mountpoints (/media/nvr-export), "
            "the places the service may write: unmount it and mount it there "
            "(mount -o nosuid,nodev,noexec /dev/sdb /media/nvr-export)",
        ),
        ({"mountpoints": ["/media/stick-2", "/media/st"]}, "not at one of media.mountpoints"),
    ],
)
def test_gate_refuses_with_one_clear_line(change: dict[str, Any], reason: str) -> None:
    d = decide(**change)
    assert not d.allowed
    assert reason in d.reason
    assert "\n" not in d.reason


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"now": SCAN.finished + MAX_AGE},  # exactly at the limit
        {"free_bytes": 10 * 2**20},  # exactly enough
        {"enrolment": None, "require_enrolled": False},
        {"enrolment": replace(ENROLLED, serial="BB22"), "require_enrolled": False},
        {"mountpoints": ["/media/stick"]},
        {"mountpoints": ["/srv/other", "/media/"]},  # at or below one of them
    ],
)
def test_gate_allows(change: dict[str, Any]) -> None:
    d = decide(**change)
    assert d.allowed, d.reason
    assert "scanned clean" in d.reason


def test_directory_target_uses_the_same_rule() -> None:
    ident = "dir=/srv/out;dev=0:50;ino=2"
    scan = replace(SCAN, media_id=None, device_identity=ident)
    kw = dict(medium=None, enrolment=None, target="/srv/out", identity=ident)
    assert decide(scan=scan, **kw).allowed
    assert "export target /srv/out has not been scanned" in decide(scan=None, **kw).reason
    assert (
        "another device" in decide(scan=scan, **dict(kw, identity="dir=/srv/out;dev=0:51")).reason
    )


# ---- real media ---------------------------------------------------------------------------------
@dataclass
class Stick:
    lab: MediaLab
    loop: Loop
    sysfs: Path
    mount: Path | None
    store: MediaStore
    db: Path

    def medium(self) -> Medium:
        [m] = list_media(self.sysfs)
        return m

    def enroll(self) -> Enrolment:
        return self.store.enroll(self.medium(), "stick 3", "admin", NOW - 3600)

    def scan(self) -> ScanRecord:
        m = self.medium()
        assert m.mountpoint
        result = scan_tree(Path(m.mountpoint), scanner="clamscan", database=self.db)
        rec = scan_record(result, media_id=m.id, device_identity=device_identity(m))
        return self.store.scan(self.store.record_scan(rec))

    def dest(self, **kw: Any) -> MediaDestination:
        return MediaDestination(self.medium().id, self.store, sysfs_root=self.sysfs, **kw)


@pytest.fixture
def stick(media_lab: MediaLab, tmp_path: Path, clamav_db: Path) -> Stick:
    loop = media_lab.loop(16)
    mp = media_lab.mount(loop.device)
    (mp / "README.txt").write_text("evidence stick 3\n")
    sysfs = tmp_path / "sys"
    fake_usb_stick(sysfs, loop)
    store = MediaStore(sqlite3.connect(tmp_path / "catalog.db", isolation_level=None))
    return Stick(media_lab, loop, sysfs, mp, store, clamav_db)


def refused(dest_factory: Callable[[], Destination], needed: int = 2**20) -> str:
    with pytest.raises(PolicyRefused) as e:
        dest_factory().check_before_write(needed)
    return str(e.value)


def test_enrolled_freshly_scanned_medium_is_allowed(stick: Stick) -> None:
    stick.enroll()
    scan = stick.scan()
    assert scan.result == "clean" and scan.files == 1  # README.txt (lost+found is empty)
    with stick.dest(reserve=0) as d:
        d.check_before_write(2**20)
        assert d.decision is not None and d.decision.allowed
        desc = d.describe()
    assert desc["serial"] == "4C530001231122115392" and desc["fs_uuid"] == stick.medium().fs_uuid
    assert desc["scan"]["engine"] == "clamscan" and desc["scan"]["result"] == "clean"
    assert desc["scan"]["signature_version"] is not None and desc["scan"]["files"] == 1


def test_unenrolled_medium_is_refused(stick: Stick) -> None:
    stick.scan()
    msg = refused(stick.dest)
    assert "is not enrolled" in msg and stick.medium().id in msg
    # without require_enrolled the same medium passes
    stick.dest(require_enrolled=False, reserve=0).check_before_write(2**20)


def test_reformatted_medium_no_longer_matches_its_enrolment(stick: Stick) -> None:
    old = stick.enroll()
    assert stick.mount is not None
    stick.lab.umount(stick.mount)
    sh("mkfs.ext4", "-q", "-F", "-m", "0", stick.loop.device)
    sh("mount", stick.loop.device, str(stick.mount))
    new = stick.medium()
    assert new.id != old.id and new.serial == old.serial
    stick.scan()
    msg = refused(stick.dest)
    assert f"does not match enrolment {old.id} 'stick 3'" in msg and "filesystem UUID" in msg


def test_a_file_added_after_the_scan_makes_it_stale(stick: Stick) -> None:
    stick.enroll()
    stick.scan()
    stick.dest(reserve=0).check_before_write(2**20)
    assert stick.mount is not None
    (stick.mount / "dropped.exe").write_bytes(b"MZ")
    assert "were added, changed or removed since the scan" in refused(stick.dest)
    stick.scan()  # scanning again makes it usable again
    stick.dest(reserve=0).check_before_write(2**20)
    (stick.mount / "README.txt").write_text("changed\n")
    assert "changed or removed since the scan" in refused(stick.dest)


def test_an_old_scan_is_refused(stick: Stick) -> None:
    stick.enroll()
    scan = stick.scan()
    late = lambda: scan.finished + MAX_AGE + 5  # noqa: E731
    msg = refused(lambda: stick.dest(clock=late, scan_max_age=MAX_AGE))
    assert "15 min old" in msg and "right before the export" in msg


def test_an_infected_medium_is_refused(stick: Stick) -> None:
    assert stick.mount is not None
    (stick.mount / "invoice.pdf.exe").write_bytes(eicar_bytes())
    stick.enroll()
    scan = stick.scan()
    assert scan.result == "infected"
    msg = refused(stick.dest)
    assert f"infected ({EICAR_FOUND_NAME} in invoice.pdf.exe)" in msg
    assert "do not use it" in msg


def test_a_scan_error_is_refused(stick: Stick) -> None:
    assert stick.mount is not None
    # a symlink is never followed by the scanner, so the tree is not known to be clean
    (stick.mount / "link").symlink_to("/etc/passwd")
    stick.enroll()
    scan = stick.scan()
    assert scan.result == "error"
    msg = refused(stick.dest)
    assert "was not clean: error" in msg and "link" in msg


def test_a_read_only_or_unmounted_medium_is_refused(stick: Stick) -> None:
    stick.enroll()
    stick.scan()
    assert stick.mount is not None
    sh("mount", "-o", "remount,ro", str(stick.mount))
    with pytest.raises(PolicyRefused, match="mounted read-only"):
        stick.dest()
    stick.lab.umount(stick.mount)
    with pytest.raises(PolicyRefused, match="is not mounted: mount its filesystem"):
        stick.dest()


def test_a_medium_mounted_outside_media_mountpoints_is_refused_before_writing(
    stick: Stick, tmp_path: Path
) -> None:
    """Under the unit only media.mountpoints are writable: a stick mounted elsewhere is refused
    with the mount command to use, not left to fail later with a read-only file system."""
    stick.enroll()
    stick.scan()
    assert stick.mount is not None
    with pytest.raises(PolicyRefused, match=f"is mounted at {stick.mount}, not at one of"):
        stick.dest(mountpoints=[str(tmp_path / "usb")])
    stick.dest(mountpoints=[str(stick.mount.parent)], reserve=0).check_before_write(2**20)


def test_scan_target_resolution(stick: Stick, tmp_path: Path) -> None:
    m = stick.medium()
    t = resolve_scan_target(m.id, [], sysfs_root=stick.sysfs)
    assert (t.key, t.media_id, t.path, t.identity) == (
        m.id,
        m.id,
        stick.mount,
        device_identity(m),
    )
    out = tmp_path / "out"
    out.mkdir()
    d = resolve_scan_target(str(out), [out], sysfs_root=stick.sysfs)
    assert (d.key, d.media_id, d.identity) == (str(out), None, directory_identity(out))
    with pytest.raises(Exception, match="not listed in export.targets"):
        resolve_scan_target(str(tmp_path), [out], sysfs_root=stick.sysfs)


# ---- writing ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_footage(tmp_path_factory.mktemp("footage"), audio=False, count=2)


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return load_or_create_key(tmp_path / "state")[0]


def export(footage: list[Path], dest: Destination, key: Any, **kw: Any) -> Any:
    return run_export(
        [("lobby-1", segs(footage))],
        job(T0, T0 + 20, preset="ultrafast", **kw.pop("job", {})),
        dest,
        key,
        audit_head=(1, "h"),
        **kw,
    )


def estimate(footage: list[Path]) -> int:
    """What run_export asks the destination for, exporting all of ``footage``."""
    return int(sum(p.stat().st_size for p in footage) * 1.1) + 2**20


def leftovers(where: Path) -> list[str]:
    return sorted(n for n in os.listdir(where) if n.startswith((".NVRG-", "NVRG-")))


def fill(where: Path, leave: int) -> None:
    """Fill the filesystem at ``where`` until ``leave`` bytes are free."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    with open(where / "filler.bin", "wb") as f:
        f.write(b"\xa5" * max(0, free - leave - 64 * 1024))
        f.flush()
        os.fsync(f.fileno())


def scan_dir(store: MediaStore, where: Path, db: Path) -> None:
    result = scan_tree(where, scanner="clamscan", database=db)
    store.record_scan(scan_record(result, media_id=None, device_identity=directory_identity(where)))


@pytest.mark.slow
def test_export_onto_a_scanned_medium_carries_the_scan_record(
    stick: Stick, footage: list[Path], key: Any
) -> None:
    stick.enroll()
    scan = stick.scan()
    with stick.dest(reserve=0) as dest:
        pkg = export(footage, dest, key)
    assert pkg.path.parent == stick.mount
    assert verify_package(pkg.path).ok
    recorded = pkg.manifest["destination"]
    assert recorded["kind"] == "usb-media" and recorded["id"] == stick.medium().id
    assert recorded["label"] == "stick 3"
    assert recorded["scan"]["id"] == scan.id
    assert recorded["scan"]["result"] == "clean"
    assert recorded["scan"]["engine_version"] == scan.engine_version
    assert recorded["scan"]["signature_date"] == scan.signature_date
    assert leftovers(stick.mount or Path("/")) == [pkg.path.name]
    # the package itself changes the listing: the next export needs a new scan
    assert "changed or removed since the scan" in refused(stick.dest)


def test_a_full_tmpfs_target_is_refused_before_writing(
    media_lab: MediaLab, tmp_path: Path, footage: list[Path], key: Any, clamav_db: Path
) -> None:
    where = media_lab.tmpfs("2m")
    fill(where, 256 * 1024)
    store = MediaStore(sqlite3.connect(tmp_path / "c.db", isolation_level=None))
    scan_dir(store, where, clamav_db)
    with pytest.raises(PolicyRefused, match=r"export target .* free; this export needs about"):
        export(footage, ScannedDirectory(where, store, reserve=0), key)
    assert leftovers(where) == []


def test_a_full_medium_is_refused_before_writing(
    stick: Stick, footage: list[Path], key: Any
) -> None:
    assert stick.mount is not None
    fill(stick.mount, 256 * 1024)
    stick.enroll()
    stick.scan()
    with pytest.raises(PolicyRefused, match="free; this export needs about"):
        export(footage, stick.dest(reserve=0), key)
    assert leftovers(stick.mount) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tmpfs-target", "medium"])
def test_enospc_during_the_write_removes_the_partial_package(
    kind: str, stick: Stick, tmp_path: Path, footage: list[Path], key: Any
) -> None:
    # lossless encoding makes the clip far bigger than the estimate taken from the sources
    need = estimate(footage)
    dest: Destination
    if kind == "medium":
        assert stick.mount is not None
        where = stick.mount
        fill(where, need + 128 * 1024)
        stick.enroll()
        stick.scan()
        dest = stick.dest(reserve=0)
        name = f"medium {stick.medium().id}"
    else:
        where = stick.lab.tmpfs("8m")
        fill(where, need + 128 * 1024)
        scan_dir(stick.store, where, stick.db)
        dest = ScannedDirectory(where, stick.store, reserve=0)
        name = f"export target {where}"
    with pytest.raises(RuntimeFailure) as e:
        export(footage, dest, key, job={"crf": 0})
    assert str(e.value).startswith(f"{name} became full during the export")
    assert "partial package was removed" in str(e.value)
    assert leftovers(where) == []


@pytest.mark.slow
def test_medium_pulled_during_the_write_leaves_nothing_claimed(
    stick: Stick, footage: list[Path], key: Any, tmp_path: Path
) -> None:
    medium_id = stick.enroll().id
    stick.scan()
    assert stick.mount is not None
    mount = stick.mount
    pulled: list[float] = []

    def pull(frac: float) -> None:
        if not pulled and frac > 0.1:
            pulled.append(frac)
            stick.lab.umount(mount, lazy=True)
            stick.lab.detach(stick.loop)

    with stick.dest(reserve=0) as dest:
        with pytest.raises(RuntimeFailure) as e:
            export(footage, dest, key, progress=pull)
    assert pulled, "the export never reported progress"
    msg = str(e.value)
    assert msg.startswith(f"medium {medium_id} disappeared during the export (pulled out or ")
    assert "nothing was exported" in msg
    assert not os.path.ismount(mount) and leftovers(mount) == []
    # the filesystem is released once the destination lets go; then the loop device goes too
    assert sh("losetup", "-j", str(stick.loop.image)).stdout == ""
    # plug it in again: the partial package was removed from the medium itself
    again = stick.lab.loop(image=stick.loop.image)
    mp2 = stick.lab.mount(again.device)
    assert sorted(os.listdir(mp2)) == ["README.txt", "lost+found"]
    assert sh("fsck.ext4", "-n", again.device, check=False).returncode == 0


@pytest.mark.slow
def test_an_io_error_during_the_write_is_handled_like_a_pulled_medium(
    stick: Stick, footage: list[Path], key: Any
) -> None:
    stick.enroll()
    stick.scan()
    assert stick.mount is not None

    def eio(frac: float) -> None:
        if frac > 0.1:
            # no device-mapper here to make a real failing disk: the error is raised where a
            # write would report it, with the errno the kernel uses
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(stick.mount / "clip.mp4"))

    with pytest.raises(RuntimeFailure) as e:
        export(footage, stick.dest(reserve=0), key, progress=eio)
    assert str(e.value).startswith(f"I/O error writing to medium {stick.medium().id}")
    assert "nothing was exported" in str(e.value)
    assert leftovers(stick.mount) == []


@pytest.mark.slow
def test_a_file_dropped_on_the_medium_during_the_write_discards_the_package(
    stick: Stick, footage: list[Path], key: Any
) -> None:
    stick.enroll()
    stick.scan()
    assert stick.mount is not None
    mount = stick.mount

    def drop(frac: float) -> None:
        if frac > 0.1 and not (mount / "autorun.inf").exists():
            (mount / "autorun.inf").write_text("[autorun]\n")

    with pytest.raises(PolicyRefused, match="changed during the export"):
        export(footage, stick.dest(reserve=0), key, progress=drop)
    assert leftovers(mount) == []


def test_the_fingerprint_ignores_only_the_writers_temporary_directory(stick: Stick) -> None:
    assert stick.mount is not None
    before = listing_fingerprint(stick.mount)
    tmp = ".NVRG-42-20261123T000000Z.0a1b2c3d4e5f.tmp"
    (stick.mount / tmp).mkdir()
    (stick.mount / tmp / "clip.mp4").write_bytes(b"x")
    assert listing_fingerprint(stick.mount, tmp) == before
    assert listing_fingerprint(stick.mount) != before
    (stick.mount / "NVRG-42-20261123T000000Z").mkdir()
    (stick.mount / "NVRG-42-20261123T000000Z" / "clip.mp4").write_bytes(b"x")
    assert listing_fingerprint(stick.mount, tmp) != before
