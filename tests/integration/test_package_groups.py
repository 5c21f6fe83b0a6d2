"""Who may read a package is decided by the export group alone: not by an access list the export
target hands down, nor by the group of a setgid target when the config names no group."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from nvr_guard.export.writer import DIR_MODE, FILE_MODE, PackageDir

pytestmark = pytest.mark.integration

OUTSIDER = 54321  # a uid outside every group: the access list names it


def default_acl_for(path: Path, uid: int) -> None:
    """A default POSIX ACL giving ``uid`` r-x to everything created below ``path``."""
    user_obj, user, group_obj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
    undefined = 0xFFFFFFFF
    entries = [
        (user_obj, 7, undefined),
        (user, 5, uid),
        (group_obj, 5, undefined),
        (mask, 5, undefined),
        (other, 5, undefined),
    ]
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_default", blob)


def write_package(target: Path, group: int | None) -> Path:
    d = PackageDir(target, "NVRG-1-x", group=group)
    try:
        d.create("manifest.json", b"{}")
        d.seal({"manifest.json"})
        d.commit("NVRG-1-x")
    finally:
        d.close()
    return target / "NVRG-1-x"


def acls(path: Path) -> list[str]:
    return [a for a in os.listxattr(path) if a.startswith("system.posix_acl")]


def test_a_default_acl_on_the_target_does_not_reach_the_package(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    default_acl_for(target, OUTSIDER)
    probe = target / "probe"
    probe.write_bytes(b"")
    assert acls(probe), "the file system must support ACLs for this test to mean anything"
    probe.unlink()
    pkg = write_package(target, group=os.getegid())
    for p in (pkg, pkg / "manifest.json"):
        assert acls(p) == [], p
    assert stat.S_IMODE(os.lstat(pkg).st_mode) == DIR_MODE
    assert stat.S_IMODE(os.lstat(pkg / "manifest.json").st_mode) == FILE_MODE


def test_without_an_export_group_a_setgid_target_does_not_hand_down_its_group(
    tmp_path: Path,
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    other_gid = 100 if os.getegid() != 100 else 101
    os.chown(target, 0, other_gid)
    os.chmod(target, 0o2755)
    pkg = write_package(target, group=None)
    for p in (pkg, pkg / "manifest.json"):
        assert os.lstat(p).st_gid == os.getegid(), p  # the daemon's own, not the target's
