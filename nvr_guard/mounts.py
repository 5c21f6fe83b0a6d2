"""Mount points and file system identity: what keeps the scanner and the purge on one root.

A directory bind-mounted under a recording root, or a disk mounted on a camera directory, is
another tree: its files belong to whatever owns that tree, not to the site whose root it sits
under. ``st_dev`` alone does not show every such boundary — a bind mount of a directory of the
*same* file system keeps ``st_dev`` — so the boundaries are read from the kernel's mount table
(``/proc/self/mountinfo``) and, at deletion time, from the mount id of each open directory
(``statx(STATX_MNT_ID)``, Linux 5.8+), which no path trick can change.

Which file system a root sits on (to notice an unmounted disk, or another disk mounted in its
place) is the file system id of ``statvfs``: derived from the UUID on ext4, XFS and btrfs, new for
every tmpfs mount, unlike ``st_dev`` which the kernel hands out again after an unmount. Which
directory a root is (:func:`dir_identity`) adds the directory's inode: ``mount --bind
/srv/school /srv/highway`` keeps the file system id of ``/srv/highway`` but not its inode.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from nvr_guard.workers import libc_function

__all__ = [
    "Mount",
    "dir_identity",
    "dir_identity_fd",
    "fs_identity",
    "fs_location",
    "mount_id",
    "mount_points_below",
    "mounts",
    "same_directory",
]

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID = 0x1000
_STX_MASK = struct.Struct("<I")
_STX_MNT_ID = struct.Struct("<Q")
_STX_MNT_ID_OFFSET = 0x90


@dataclass(frozen=True)
class Mount:
    mount_id: int
    device: str  # "major:minor" of the file system
    fs_root: bytes  # the directory of that file system mounted here ("/" unless a bind mount)
    mount_point: bytes  # where, in this process's view
    fstype: str
    source: str


def _unescape(field: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash as \040 \011 \012 \134
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mounts() -> list[Mount]:
    """The mount table of this process (empty when /proc is not there)."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, sep, right = line.partition(b" - ")
        f = left.split(b" ")
        r = right.split(b" ")
        if not sep or len(f) < 5 or len(r) < 2:
            continue
        out.append(
            Mount(
                int(f[0]),
                f[2].decode("ascii", "replace"),
                _unescape(f[3]),
                _unescape(f[4]),
                r[0].decode("utf-8", "replace"),
                _unescape(r[1]).decode("utf-8", "surrogateescape"),
            )
        )
    return out


def _real(path: bytes) -> bytes:
    return os.path.realpath(path)


def mount_points_below(root: bytes, table: list[Mount] | None = None) -> set[bytes]:
    """Mount points strictly below ``root``, spelled under ``root`` as configured (the mount
    table speaks of real paths; the root may be reached through a symlinked parent)."""
    real = _real(root).rstrip(b"/")
    prefix = real + b"/"
    out = set()
    for m in mounts() if table is None else table:
        if m.mount_point.startswith(prefix) and len(m.mount_point) > len(prefix):
            out.add(root + m.mount_point[len(real) :])
    return out


def fs_location(path: bytes | str, table: list[Mount] | None = None) -> tuple[str, bytes] | None:
    """(device, path within that file system) of a directory: the same for every alias of it,
    bind mounts included. None when the mount table cannot be read."""
    real = _real(os.fsencode(path))
    best: Mount | None = None
    for m in mounts() if table is None else table:
        mp = m.mount_point
        if (real == mp or real.startswith(mp.rstrip(b"/") + b"/")) and (
            best is None or len(mp) >= len(best.mount_point)
        ):
            best = m  # the last mount on the longest matching point is the one seen
    if best is None:
        return None
    rest = real[len(best.mount_point.rstrip(b"/")) :]
    inner = best.fs_root.rstrip(b"/") + rest
    return best.device, inner or b"/"


def fs_identity(path: bytes | str) -> str:
    """Which file system ``path`` is on, stable across reboots (see the module docstring)."""
    v = os.statvfs(path)
    if v.f_fsid:
        return f"fsid:{v.f_fsid:x}"
    return f"dev:{os.stat(path).st_dev:x}"  # file systems without an id (some network ones)


def dir_identity(path: bytes | str, st: os.stat_result | None = None) -> str:
    """Which directory ``path`` is: its file system (:func:`fs_identity`) and its own inode.
    A bind mount of another directory of the same file system over ``path`` keeps the file
    system id but not the inode. ``st_dev`` is left out on purpose: the file system id already
    names the file system, and ``st_dev`` of the same disk may change at a reboot."""
    if st is None:
        st = os.stat(path)
    return f"{fs_identity(path)} ino:{st.st_ino:x}"


def dir_identity_fd(fd: int) -> str:
    """:func:`dir_identity` of an open directory (what the purge holds: no path to re-resolve)."""
    v = os.fstatvfs(fd)
    st = os.fstat(fd)
    fs = f"fsid:{v.f_fsid:x}" if v.f_fsid else f"dev:{st.st_dev:x}"
    return f"{fs} ino:{st.st_ino:x}"


def same_directory(before: str, now: str) -> bool:
    """``now`` (a :func:`dir_identity`) is the directory recorded as ``before``. A record of an
    older version holds only the file system part: the same file system is accepted then (the
    caller completes the record)."""
    b_fs, _, b_ino = before.partition(" ino:")
    n_fs, _, n_ino = now.partition(" ino:")
    return b_fs == n_fs and (not b_ino or b_ino == n_ino)


_statx_fn: object = None
_statx_ok = True


def _statx() -> object:
    global _statx_fn, _statx_ok
    if _statx_fn is None and _statx_ok:
        fn = libc_function("statx")
        if fn is None:
            _statx_ok = False
            return None
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _statx_fn = fn
    return _statx_fn


def mount_id(fd: int) -> int | None:
    """The mount id of an open file or directory; None where the kernel or libc cannot tell
    (then only ``st_dev`` separates file systems)."""
    fn = _statx()
    if fn is None:
        return None
    buf = ctypes.create_string_buffer(256)  # per call: the purge may run in threads
    if fn(fd, b"", _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, _STATX_MNT_ID, buf) != 0:  # type: ignore[operator]
        return None
    if not _STX_MASK.unpack_from(buf, 0)[0] & _STATX_MNT_ID:
        return None
    return int(_STX_MNT_ID.unpack_from(buf, _STX_MNT_ID_OFFSET)[0])
