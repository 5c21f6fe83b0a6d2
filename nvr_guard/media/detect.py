"""Which removable media are attached: sysfs for the hardware, blkid for the filesystem, the
mount table for where (and whether) it is mounted.

Sources, and why each:
- ``<sysfs_root>/block/*``: removable flag, size, read-only flag, major:minor; ``device/vendor``
  and ``device/model`` (the SCSI/USB-storage inquiry strings); the USB serial from the USB device
  above it (the first ancestor of the ``device`` link holding ``idVendor``), else a
  ``device/serial`` file. ``sysfs_root`` is a parameter so tests can describe a USB stick in a
  fake tree (no USB hardware in CI); it maps to the config key ``media.sysfs_root``.
- ``blkid -p -o export /dev/<name>``: filesystem type, UUID and label, probed from the device
  itself (``-p`` bypasses blkid's cache, which is stale right after a stick is reformatted: a
  stale UUID would bind a scan to the wrong filesystem).
- ``/proc/self/mountinfo``: matched by major:minor, not by device path, so a mount made through
  ``/dev/disk/by-uuid/...`` or a renamed node is still found.

Everything a device reports about itself (vendor, model, serial) can be forged by a malicious
USB device; the filesystem UUID can be set by anyone who formats the stick. The medium id is a
convenient, stable name, not an authentication: the malware scan is what makes writing safe.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nvr_guard.errors import InvalidInput

SYSFS = Path("/sys")
DEV = Path("/dev")
MOUNTINFO = Path("/proc/self/mountinfo")
SECTOR = 512  # sysfs ``size`` is always in 512-byte units, whatever the device's sector size


@dataclass(frozen=True)
class Mount:
    dev: str  # "major:minor"
    mountpoint: str
    readonly: bool
    fstype: str
    root: str  # the mounted subtree of the filesystem ("/" unless a bind mount of a subdir)


@dataclass
class Partition:
    name: str  # kernel name, e.g. "sdb1"
    device: str  # device node, e.g. "/dev/sdb1"
    number: int
    size: int  # bytes
    dev: str  # "major:minor"
    fs_type: str | None = None
    fs_uuid: str | None = None
    label: str | None = None
    mountpoint: str | None = None
    readonly: bool = False


@dataclass
class Medium:
    """A removable block device as seen now. ``id`` is ``<bus>-<serial>-<fsuuid8>``: the same
    stick with the same filesystem keeps its id across replugging (the kernel name does not);
    reformatting it gives a new id, which is wanted, because a scan and an enrolment describe
    one filesystem. The filesystem fields describe the filesystem a package would be written to:
    the whole device's when it has one (a "superfloppy"), else the mounted partition's, else the
    first partition with a filesystem."""

    id: str
    name: str  # kernel name, e.g. "sdb"
    device: str  # "/dev/sdb"
    vendor: str
    model: str
    serial: str
    size: int  # bytes
    removable: bool
    bus: str  # "usb", or the subsystem of the device ("scsi", "nvme", "virtual", ...)
    dev: str  # "major:minor" of the whole device
    partitions: list[Partition] = field(default_factory=list)
    fs_type: str | None = None
    fs_uuid: str | None = None
    label: str | None = None
    fs_device: str | None = None  # the node holding the filesystem (whole device or partition)
    fs_dev: str | None = None  # its "major:minor"
    mountpoint: str | None = None
    readonly: bool = False  # mounted read-only, or the device itself is read-only
    device_readonly: bool = False  # the device's own ``ro`` flag (write-protect switch)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def description(self) -> str:
        """'SanDisk Cruzer Blade, serial 4C53...' for messages."""
        what = " ".join(x for x in (self.vendor, self.model) if x) or self.name
        return f"{what}, serial {self.serial or '(none)'}"


# ---- small readers ------------------------------------------------------------------------------
def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _int(path: Path, default: int = 0) -> int:
    text = _read(path)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


_SLUG = re.compile(r"[^A-Za-z0-9_.]+")


def medium_id(bus: str, serial: str, fs_uuid: str | None) -> str:
    """``usb-4C530001231122115392-1c2d3e4f``: the serial (unsafe characters replaced, at most 32
    kept), then the first 8 hex digits of the filesystem UUID (``nofs`` without a filesystem)."""
    s = _SLUG.sub("_", serial).strip("_")[:32] or "noserial"
    u = re.sub(r"[^0-9a-z]", "", (fs_uuid or "").lower())[:8] or "nofs"
    return f"{_SLUG.sub('_', bus) or 'dev'}-{s}-{u}"


def _unescape_mount(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def read_mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    mounts: list[Mount] = []
    try:
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return mounts
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 6:
            continue
        tail = right.split()
        superopts = tail[2].split(",") if len(tail) > 2 else []
        mounts.append(
            Mount(
                dev=fields[2],
                mountpoint=_unescape_mount(fields[4]),
                readonly="ro" in fields[5].split(",") or "ro" in superopts,
                fstype=tail[0] if tail else "",
                root=_unescape_mount(fields[3]),
            )
        )
    return mounts


def _mount_of(dev: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount of the whole filesystem (root "/") wins over bind mounts of a subdirectory."""
    found = [m for m in mounts if m.dev == dev]
    whole = [m for m in found if m.root == "/"]
    chosen = whole or found
    return chosen[0] if chosen else None


def _blkid_unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def probe_filesystem(node: str) -> dict[str, str]:
    """TYPE, UUID, LABEL (those present) of the filesystem on ``node``; {} when there is none,
    the node is missing or blkid cannot read it (a device we cannot read is one we cannot trust
    to write, so it simply has no filesystem as far as the gate is concerned)."""
    try:
        cp = subprocess.run(
            ["blkid", "-p", "-o", "export", node],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if cp.returncode != 0:
        return {}
    out: dict[str, str] = {}
    for line in cp.stdout.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out[key] = _blkid_unescape(value)
    return out


# ---- sysfs --------------------------------------------------------------------------------------
def _usb_ancestor(devdir: Path, root: Path) -> Path | None:
    """The USB device a block device hangs under: the first ancestor with ``idVendor``."""
    here = devdir
    root = root.resolve()
    while here != here.parent and here != root and root in here.parents:
        if (here / "idVendor").is_file():
            return here
        here = here.parent
    return None


def _bus(devdir: Path | None, usb: Path | None, blockdir: Path) -> str:
    if usb is not None:
        return "usb"
    if devdir is not None:
        sub = devdir / "subsystem"
        if sub.is_symlink() or sub.exists():
            return sub.resolve().name
    if "virtual" in blockdir.parts:
        return "virtual"
    return "unknown"


def _partitions(blockdir: Path, name: str) -> list[tuple[str, Path]]:
    parts = []
    try:
        entries = sorted(blockdir.iterdir())
    except OSError:
        return []
    for p in entries:
        if p.name.startswith(name) and (p / "partition").is_file():
            parts.append((p.name, p))
    return parts


def _read_medium(name: str, root: Path, dev_root: Path, mounts: list[Mount]) -> Medium:
    link = root / "block" / name
    blockdir = link.resolve()
    devlink = link / "device"
    devdir = devlink.resolve() if devlink.exists() else None
    usb = _usb_ancestor(devdir, root) if devdir is not None else None
    serial = ""
    if usb is not None:
        serial = _read(usb / "serial") or ""
    if not serial and devdir is not None:
        serial = _read(devdir / "serial") or ""
    vendor = (_read(devdir / "vendor") if devdir else None) or ""
    model = (_read(devdir / "model") if devdir else None) or ""
    if usb is not None:
        # the USB descriptor strings are often more telling than the SCSI inquiry ("Generic")
        vendor = vendor or _read(usb / "manufacturer") or ""
        model = model or _read(usb / "product") or ""
    bus = _bus(devdir, usb, blockdir)
    device_ro = _int(link / "ro") == 1
    medium = Medium(
        id="",
        name=name,
        device=str(dev_root / name),
        vendor=vendor,
        model=model,
        serial=serial,
        size=_int(link / "size") * SECTOR,
        removable=_int(link / "removable") == 1,
        bus=bus,
        dev=_read(link / "dev") or "",
        device_readonly=device_ro,
    )
    for pname, pdir in _partitions(link, name):
        fs = probe_filesystem(str(dev_root / pname))
        pdev = _read(pdir / "dev") or ""
        m = _mount_of(pdev, mounts) if pdev else None
        medium.partitions.append(
            Partition(
                name=pname,
                device=str(dev_root / pname),
                number=_int(pdir / "partition"),
                size=_int(pdir / "size") * SECTOR,
                dev=pdev,
                fs_type=fs.get("TYPE"),
                fs_uuid=fs.get("UUID"),
                label=fs.get("LABEL"),
                mountpoint=m.mountpoint if m else None,
                readonly=device_ro or _int(pdir / "ro") == 1 or (m.readonly if m else False),
            )
        )
    whole = probe_filesystem(medium.device)
    if whole.get("TYPE"):
        m = _mount_of(medium.dev, mounts) if medium.dev else None
        medium.fs_type, medium.fs_uuid = whole.get("TYPE"), whole.get("UUID")
        medium.label, medium.fs_device, medium.fs_dev = (
            whole.get("LABEL"),
            medium.device,
            medium.dev,
        )
        medium.mountpoint = m.mountpoint if m else None
        medium.readonly = device_ro or (m.readonly if m else False)
    else:
        with_fs = [p for p in medium.partitions if p.fs_type]
        chosen = next((p for p in with_fs if p.mountpoint), with_fs[0] if with_fs else None)
        if chosen is not None:
            medium.fs_type, medium.fs_uuid, medium.label = (
                chosen.fs_type,
                chosen.fs_uuid,
                chosen.label,
            )
            medium.fs_device, medium.fs_dev = chosen.device, chosen.dev
            medium.mountpoint, medium.readonly = chosen.mountpoint, chosen.readonly
        else:
            medium.readonly = device_ro
    medium.id = medium_id(bus, serial, medium.fs_uuid)
    return medium


def list_media(
    sysfs_root: Path = SYSFS,
    *,
    include_all: bool = False,
    dev_root: Path = DEV,
    mountinfo: Path = MOUNTINFO,
) -> list[Medium]:
    """Block devices under ``sysfs_root/block``: only removable or USB ones unless
    ``include_all`` (internal disks are never export media; listing them is for diagnosis)."""
    block = Path(sysfs_root) / "block"
    try:
        names = sorted(p.name for p in block.iterdir())
    except OSError:
        return []
    mounts = read_mounts(mountinfo)
    out = []
    for name in names:
        link = block / name
        if not include_all and _int(link / "removable") != 1:
            # cheap pre-check before blkid: a non-removable device is still wanted if on USB
            devlink = link / "device"
            if not devlink.exists() or _usb_ancestor(devlink.resolve(), Path(sysfs_root)) is None:
                continue
        if _int(link / "size") == 0 and not include_all:
            continue  # an empty card reader slot or a loop device without a backing file
        out.append(_read_medium(name, Path(sysfs_root), Path(dev_root), mounts))
    return out


def find_medium(
    media_id: str,
    sysfs_root: Path = SYSFS,
    *,
    include_all: bool = False,
    dev_root: Path = DEV,
    mountinfo: Path = MOUNTINFO,
) -> Medium:
    """The attached medium with this id; InvalidInput naming what is attached when absent."""
    media = list_media(sysfs_root, include_all=include_all, dev_root=dev_root, mountinfo=mountinfo)
    for m in media:
        if m.id == media_id:
            return m
    seen = ", ".join(m.id for m in media) or "none"
    raise InvalidInput(
        f"medium {media_id} is not attached (attached: {seen}); plug it in and check "
        "`nvr-guard media list`"
    )
