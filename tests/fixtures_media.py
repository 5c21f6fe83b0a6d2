"""Real loop devices, mounts and tmpfs for media tests, plus a fake sysfs tree describing a USB
stick (CI has no USB hardware).

What is real and what is simulated, exactly:
- real: the block device (a loop device, ``losetup -f --show`` over an image file in tmp), its
  ext4 filesystem (``mkfs.ext4``), blkid's answers (type, UUID, label), the mount and the kernel
  mount table, read-only mounts, free space, ENOSPC (a small tmpfs or image), lazy unmount and
  loop detach;
- simulated: only the sysfs attributes of a USB stick. ``fake_usb_stick`` writes, under a
  temporary ``sysfs_root``, ``block/<loopN>`` -> ``devices/pci0000:00/0000:00:14.0/usb1/1-1/
  1-1:1.0/host7/target7:0:0/7:0:0:0/block/<loopN>`` with ``removable`` = 1, ``size``, ``ro`` and
  ``dev`` copied from the real ``/sys/block/<loopN>``, a ``device`` link to the SCSI device
  holding ``vendor`` and ``model``, and the USB device ``1-1`` holding ``idVendor``,
  ``idProduct``, ``manufacturer``, ``product`` and ``serial``; ``subsystem`` links to
  ``bus/scsi`` and ``bus/usb``. The kernel name and major:minor are
  those of the real loop device, so blkid and the mount table describe the real filesystem.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Loop:
    image: Path
    device: str  # /dev/loopN

    @property
    def name(self) -> str:
        return Path(self.device).name


@dataclass
class MediaLab:
    """Creates loop devices, mounts and tmpfs, and undoes all of it in ``cleanup`` (also after a
    failed test, or after the test itself unmounted or detached something)."""

    base: Path
    loops: list[Loop] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def loop(
        self,
        size_mb: int = 16,
        *,
        label: str = "EVIDENCE",
        image: Path | None = None,
    ) -> Loop:
        """A loop device over a fresh ext4 image (or over ``image`` as it is)."""
        fresh = image is None
        if image is None:
            image = self.base / f"disk{len(self.loops)}.img"
            with open(image, "wb") as f:
                f.truncate(size_mb * 2**20)
        dev = sh("losetup", "-f", "--show", str(image)).stdout.strip()
        loop = Loop(image, dev)
        self.loops.append(loop)
        if fresh:
            # no blocks reserved for root (as on a stick): ENOSPC tests must hit the real limit
            sh("mkfs.ext4", "-q", "-F", "-m", "0", "-L", label, loop.device)
        return loop

    def mount(self, node: str, *, readonly: bool = False, where: Path | None = None) -> Path:
        mp = where or self.base / f"mnt{len(self.mounts)}"
        mp.mkdir(parents=True, exist_ok=True)
        sh("mount", "-o", "ro" if readonly else "rw", node, str(mp))
        self.mounts.append(mp)
        return mp

    def tmpfs(self, size: str = "2m") -> Path:
        mp = self.base / f"tmpfs{len(self.mounts)}"
        mp.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mp))
        self.mounts.append(mp)
        return mp

    def umount(self, mp: Path, *, lazy: bool = False) -> None:
        sh("umount", *(["-l"] if lazy else []), str(mp))

    def detach(self, loop: Loop) -> None:
        sh("losetup", "-d", loop.device)

    def cleanup(self) -> list[str]:
        """Undo everything; returns what could not be undone (the fixture fails on it)."""
        problems = []
        for mp in reversed(self.mounts):
            while os.path.ismount(mp):
                if sh("umount", str(mp), check=False).returncode != 0:
                    if sh("umount", "-l", str(mp), check=False).returncode != 0:
                        problems.append(f"cannot unmount {mp}")
                        break
        for loop in reversed(self.loops):
            listed = sh("losetup", "-j", str(loop.image), check=False).stdout
            for line in listed.splitlines():
                dev = line.split(":", 1)[0]
                if sh("losetup", "-d", dev, check=False).returncode != 0:
                    problems.append(f"cannot detach {dev}")
        return problems


@pytest.fixture
def media_lab(tmp_path: Path) -> Iterator[MediaLab]:
    lab = MediaLab(tmp_path)
    try:
        yield lab
    finally:
        problems = lab.cleanup()
        assert not problems, problems


# ---- fake sysfs ---------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _subsystem(sysfs_root: Path, device: Path, bus: str) -> None:
    target = sysfs_root / "bus" / bus
    target.mkdir(parents=True, exist_ok=True)
    (device / "subsystem").symlink_to(os.path.relpath(target, device))


def _copy_block_attrs(real: Path, fake: Path) -> None:
    for attr in ("size", "ro", "dev"):
        _write(fake / attr, (real / attr).read_text().strip())


def fake_usb_stick(
    sysfs_root: Path,
    loop: Loop,
    *,
    vendor: str = "SanDisk",
    model: str = "Cruzer Blade",
    serial: str = "4C530001231122115392",
    usb_port: str = "1-1",
    host: int = 7,
) -> Path:
    """Describe the real loop device ``loop`` as a USB stick under ``sysfs_root`` (see the module
    docstring for the exact layout). Returns the fake block directory."""
    real = Path("/sys/block") / loop.name
    usb = sysfs_root / "devices/pci0000:00/0000:00:14.0/usb1" / usb_port
    scsi = usb / f"{usb_port}:1.0/host{host}/target{host}:0:0/{host}:0:0:0"
    block = scsi / "block" / loop.name
    _write(usb / "idVendor", "0781")
    _write(usb / "idProduct", "5567")
    _write(usb / "manufacturer", vendor)
    _write(usb / "product", model)
    _write(usb / "serial", serial)
    # SCSI inquiry strings are space padded in real sysfs
    _write(scsi / "vendor", f"{vendor:<8}")
    _write(scsi / "model", f"{model:<16}")
    _subsystem(sysfs_root, scsi, "scsi")
    _subsystem(sysfs_root, usb, "usb")
    _copy_block_attrs(real, block)
    _write(block / "removable", "1")
    (block / "device").symlink_to(os.path.relpath(scsi, block))
    for part in sorted(real.iterdir()):
        if part.name.startswith(loop.name) and (part / "partition").is_file():
            _copy_block_attrs(part, block / part.name)
            _write(block / part.name / "partition", (part / "partition").read_text().strip())
    link = sysfs_root / "block" / loop.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(block, link.parent))
    return block


def fake_internal_disk(
    sysfs_root: Path,
    name: str = "sda",
    *,
    dev: str = "8:0",
    vendor: str = "ATA",
    model: str = "Samsung SSD 870",
    serial: str = "S6PNNS0T123456",
) -> Path:
    """A fixed SATA disk (removable = 0, no USB ancestor); its node need not exist."""
    scsi = sysfs_root / "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0"
    block = scsi / "block" / name
    _write(scsi / "vendor", vendor)
    _write(scsi / "model", model)
    _write(scsi / "serial", serial)
    _subsystem(sysfs_root, scsi, "scsi")
    _write(block / "size", str(2 * 10**9))
    _write(block / "ro", "0")
    _write(block / "dev", dev)
    _write(block / "removable", "0")
    (block / "device").symlink_to(os.path.relpath(scsi, block))
    link = sysfs_root / "block" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(block, link.parent))
    return block
