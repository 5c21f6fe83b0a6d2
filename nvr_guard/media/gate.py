"""The media gate: footage is written only onto storage that was just scanned and found clean.

``gate_decision`` is the rule, a pure function of what is known (the medium as detected now, its
enrolment, its latest scan record, the current listing fingerprint, free space, the time).
``MediaDestination`` (an enrolled USB medium) and ``ScannedDirectory`` (a directory from
``export.targets``) gather those facts and implement the export engine's ``Destination``
protocol, plus the engine's two optional hooks:

- ``before_commit(tmp)``: just before the package's temporary directory is renamed into place,
  the destination checks that the medium is still the mounted filesystem it checked at the
  start, and that nothing else on it changed: the listing, and what every file holds, read
  again and compared with the digest the scan took (so a file dropped on the stick during the
  export, or one rewritten since the scan with its old size and mtime, is not handed out next
  to the package as if scanned). Only ``tmp`` itself, the directory this export made, is
  exempt, by its exact name;
- ``abort(tmp, error)``: after a failure, removes the temporary directory through a directory
  descriptor held on the medium since the check. A lazily unmounted filesystem stays reachable
  through that descriptor, so the partial package is removed from the medium itself, not just
  from the now empty mount point; and it turns the failure into one clear message (medium full,
  medium gone, I/O error).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Any

from nvr_guard.errors import InvalidInput, NvrGuardError, PolicyRefused, RuntimeFailure
from nvr_guard.media.detect import DEV, MOUNTINFO, SYSFS, Medium, find_medium
from nvr_guard.store.media import Enrolment, MediaStore, ScanRecord
from nvr_guard.text import fmt_age as _age
from nvr_guard.text import fmt_mib as _mib

DEFAULT_RESERVE = 64 * 1024 * 1024
DEFAULT_SCAN_MAX_AGE = 15 * 60.0
# a scan "finished" this far in the future means the clock was moved: refuse, scan again
CLOCK_SLACK = 60.0

# (directory, name of the one top-level entry to leave out or None) -> digest; see clamav.py
Fingerprint = Callable[[Path, str | None], str]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def _when(ts: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def device_identity(medium: Medium) -> str:
    """What a scan of a medium is bound to: the USB serial and the filesystem UUID (both can be
    forged by a hostile device; they stop mix-ups, not attackers — the listing fingerprint and
    the freshness limit are what tie a scan to the bytes)."""
    return f"serial={medium.serial};fs_uuid={medium.fs_uuid or ''}"


def directory_identity(path: Path) -> str:
    """What a scan of a directory target is bound to: the path and the filesystem and inode it
    resolves to, so a different filesystem mounted over the same path needs its own scan."""
    st = os.stat(path)
    return f"dir={path};dev={os.major(st.st_dev)}:{os.minor(st.st_dev)};ino={st.st_ino}"


def _at_or_below(path: str, where: str) -> bool:
    p, w = os.path.normpath(path), os.path.normpath(where)
    return p == w or p.startswith(w.rstrip("/") + "/")


def gate_decision(
    medium: Medium | None,
    enrolment: Enrolment | None,
    scan: ScanRecord | None,
    current_fingerprint: str | None,
    free_bytes: int,
    bytes_needed: int,
    now: float,
    require_enrolled: bool,
    scan_max_age: float,
    *,
    reserve: int = 0,
    target: str | None = None,
    identity: str | None = None,
    tz: tzinfo = UTC,
    mountpoints: Sequence[str] = (),
) -> Decision:
    """May an export of ``bytes_needed`` be written now? The first failed check is the reason.

    ``medium`` is None for a directory target: then ``target`` names it, ``identity`` is its
    ``directory_identity`` and enrolment does not apply. ``current_fingerprint`` None means the
    listing could not be taken. ``mountpoints`` (``media.mountpoints``), when given, are the
    only places a medium may be mounted to be written: the unit makes only those writable.
    The reasons are one line each, naming the target and what to do.
    """
    if medium is not None:
        name = f"medium {medium.id} ({medium.description})"
        key = medium.id
        identity = device_identity(medium)
        if require_enrolled:
            if enrolment is None or not enrolment.active:
                return Decision(
                    False,
                    f"{name} is not enrolled: an admin enrols it with "
                    f"`nvr-guard media enroll {medium.id} --label LABEL`, or use an enrolled one",
                )
            changed = []
            if enrolment.serial != medium.serial:
                changed.append(f"serial {enrolment.serial!r} -> {medium.serial!r}")
            if enrolment.fs_uuid != (medium.fs_uuid or ""):
                changed.append(f"filesystem UUID {enrolment.fs_uuid} -> {medium.fs_uuid}")
            if changed:
                return Decision(
                    False,
                    f"{name} does not match enrolment {enrolment.id} '{enrolment.label}' "
                    f"({'; '.join(changed)}: reformatted, or another device): an admin removes "
                    f"and enrols it again after checking it",
                )
        if not medium.mountpoint:
            return Decision(
                False,
                f"{name} is not mounted: mount its filesystem ({medium.fs_device or medium.device})"
                " read-write and run the export again",
            )
        if mountpoints and not any(_at_or_below(medium.mountpoint, where) for where in mountpoints):
            return Decision(
                False,
                f"{name} is mounted at {medium.mountpoint}, not at one of media.mountpoints "
                f"({', '.join(mountpoints)}), the places the service may write: unmount it and "
                f"mount it there (mount -o nosuid,nodev,noexec "
                f"{medium.fs_device or medium.device} {mountpoints[0]})",
            )
        if medium.readonly:
            return Decision(
                False,
                f"{name} is mounted read-only at {medium.mountpoint}"
                + (" (the device itself is write-protected)" if medium.device_readonly else "")
                + ": check its write-protect switch, remount it read-write, scan it again",
            )
        scan_cmd = f"`nvr-guard media scan {medium.id}`"
    else:
        key = target or "?"
        name = f"export target {key}"
        scan_cmd = f"`nvr-guard media scan {key}`"

    if scan is None:
        return Decision(False, f"{name} has not been scanned for malware: run {scan_cmd} first")
    scanned_at = _when(scan.finished, tz)
    if identity is not None and scan.device_identity != identity:
        return Decision(
            False,
            f"the last scan of {name} ({scanned_at}) was of another device or filesystem "
            f"({scan.device_identity}, now {identity}): run {scan_cmd}",
        )
    if not scan.clean:
        found = ", ".join(f"{i.get('signature')} in {i.get('path')}" for i in scan.infected[:3])
        errs = "; ".join(scan.errors[:2])
        detail = found or errs or "no details recorded"
        more = len(scan.infected) + len(scan.errors) - (3 if found else 2)
        if more > 0:
            detail += f" and {more} more"
        if scan.result == "infected":
            todo = "do not use it; hand it to IT security and take another medium"
        else:
            todo = f"fix the cause and run {scan_cmd} again, or take another medium"
        return Decision(
            False,
            f"the last scan of {name} ({scanned_at}) was not clean: "
            f"{scan.result} ({detail}): {todo}",
        )
    if not scan.content_digest:
        return Decision(
            False,
            f"the last scan of {name} ({scanned_at}) did not record what the files hold (it was "
            f"made by an older nvr-guard): run {scan_cmd} again",
        )
    age = now - scan.finished
    if age < -CLOCK_SLACK:
        return Decision(
            False,
            f"the last scan of {name} is dated {scanned_at}, in the future: the clock was "
            f"changed; run {scan_cmd} again",
        )
    if age > scan_max_age:
        return Decision(
            False,
            f"the last scan of {name} is {_age(age)} old ({scanned_at}; at most "
            f"{_age(scan_max_age)} allowed): run {scan_cmd} right before the export",
        )
    if current_fingerprint is None:
        return Decision(False, f"the files on {name} cannot be listed: check it and scan again")
    if current_fingerprint != scan.listing_fingerprint:
        return Decision(
            False,
            f"files on {name} were added, changed or removed since the scan at {scanned_at}: "
            f"run {scan_cmd} again",
        )
    if free_bytes < bytes_needed + reserve:
        return Decision(
            False,
            f"{name} has {_mib(free_bytes)} free; this export needs about "
            f"{_mib(bytes_needed + reserve)}: free some space or use a bigger medium",
        )
    return Decision(
        True,
        f"{name}: scanned clean at {scanned_at} ({scan.engine} {scan.engine_version}, "
        f"signatures {scan.signature_version or '?'}), {_mib(free_bytes)} free",
    )


def _default_fingerprint(path: Path, exclude_name: str | None) -> str:
    from nvr_guard.media.clamav import listing_fingerprint

    return listing_fingerprint(path, exclude_name)


def _default_content(path: Path, exclude_name: str | None) -> str:
    from nvr_guard.media.clamav import content_digest

    return content_digest(path, exclude_name)


def scan_record(
    result: Any, *, media_id: str | None, device_identity: str, target_path: str | None = None
) -> ScanRecord:
    """A store record from a ``clamav.ScanResult`` (duck-typed: any object with its fields)."""
    return ScanRecord(
        media_id=media_id,
        target_path=target_path or str(result.target),
        started=float(result.started),
        finished=float(result.finished),
        engine=str(result.engine),
        engine_version=str(result.engine_version),
        signature_version=str(result.signature_version or ""),
        signature_date=str(result.signature_date or ""),
        files=int(result.files),
        bytes=int(result.bytes),
        duration=float(result.duration),
        result=str(result.result),
        infected=tuple({"path": p, "signature": s} for p, s in result.infected),
        errors=tuple(result.errors),
        listing_fingerprint=str(result.listing_fingerprint),
        device_identity=device_identity,
        content_digest=str(getattr(result, "content_digest", "") or ""),
    )


@dataclass(frozen=True)
class ScanTarget:
    """What `media scan X` scans: ``key`` is what scans are filed under (the medium id, or the
    directory path), ``path`` what to hand to the scanner, ``identity`` what the scan binds to."""

    key: str
    media_id: str | None
    path: Path
    identity: str
    medium: Medium | None = None


def resolve_scan_target(
    spec: str,
    targets: Sequence[Path],
    *,
    sysfs_root: Path = SYSFS,
    dev_root: Path = DEV,
    mountinfo: Path = MOUNTINFO,
) -> ScanTarget:
    """A medium id, or a directory listed in ``export.targets``; InvalidInput/PolicyRefused else.
    Only configured directories can be scanned as targets: scanning some other directory would
    not make it an allowed destination anyway."""
    if spec.startswith("/"):
        p = Path(spec)
        allowed = {Path(t) for t in targets}
        if p not in allowed:
            raise InvalidInput(
                f"{spec} is not listed in export.targets ({', '.join(map(str, allowed)) or 'none'})"
            )
        if not p.is_dir():
            raise InvalidInput(f"export target {spec} is not a directory")
        return ScanTarget(str(p), None, p, directory_identity(p))
    m = find_medium(spec, sysfs_root, dev_root=dev_root, mountinfo=mountinfo)
    if not m.mountpoint:
        raise PolicyRefused(
            f"medium {m.id} ({m.description}) is not mounted: mount "
            f"{m.fs_device or m.device} and scan again"
        )
    return ScanTarget(m.id, m.id, Path(m.mountpoint), device_identity(m), m)


# ---- destinations -------------------------------------------------------------------------------
def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _Guarded:
    """Shared by both destinations: the directory descriptor held from the check to the end of
    the write, the commit check and the clean-up after a failure."""

    path: Path
    name: str

    def __init__(
        self,
        store: MediaStore,
        *,
        scan_max_age: float,
        reserve: int,
        clock: Callable[[], float],
        fingerprint: Fingerprint | None,
        tz: tzinfo,
        content: Fingerprint | None = None,
    ) -> None:
        self.store = store
        self.scan_max_age = scan_max_age
        self.reserve = reserve
        self.clock = clock
        self.fingerprint = fingerprint or _default_fingerprint
        self.content = content or _default_content
        self.tz = tz
        self.scan: ScanRecord | None = None
        self.decision: Decision | None = None
        self._fd: int | None = None
        self._dev: int | None = None
        self._finalizer: weakref.finalize[[int], _Guarded] | None = None

    # the descriptor -----------------------------------------------------------------------------
    def _hold(self) -> None:
        self.close()
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd, self._dev = fd, os.fstat(fd).st_dev
        self._finalizer = weakref.finalize(self, _close_fd, fd)

    def close(self) -> None:
        """Let go of the medium (a lazily unmounted one is only released after this)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._fd = None

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _still_there(self) -> bool:
        """Is ``path`` still the filesystem we checked (not unmounted, not replaced)?"""
        try:
            return self._dev is not None and os.stat(self.path).st_dev == self._dev
        except OSError:
            return False

    def _free(self) -> int:
        st = os.statvfs(self._fd if self._fd is not None else self.path)
        return st.f_bavail * st.f_frsize

    def _refuse(self, reason: str) -> None:
        self.close()
        raise PolicyRefused(reason)

    # the optional hooks of the export engine ------------------------------------------------------
    def before_commit(self, tmp: Path) -> None:
        if not self._still_there() or os.lstat(tmp).st_dev != self._dev:
            raise RuntimeFailure(
                f"{self.name} was unmounted or replaced during the export; "
                "the package was not written"
            )
        if self.scan is not None:
            # only the directory this export made is left out, by its exact name
            try:
                now_fp = self.fingerprint(self.path, tmp.name)
            except OSError:
                now_fp = None
            if now_fp != self.scan.listing_fingerprint:
                raise PolicyRefused(
                    f"files on {self.name} changed during the export (something else wrote to "
                    "it): the package was discarded; scan it again and export again"
                )
            try:
                now_content = self.content(self.path, tmp.name)
            except OSError:
                now_content = None
            if not self.scan.content_digest or now_content != self.scan.content_digest:
                raise PolicyRefused(
                    f"what the files on {self.name} hold is not what was scanned at "
                    f"{_when(self.scan.finished, self.tz)} (a file was rewritten, keeping its "
                    "name, size and time): the package was discarded; scan it again and "
                    "export again"
                )

    def abort(self, tmp: Path, error: BaseException) -> NvrGuardError | None:
        """Remove what is left of ``tmp`` on the medium, then say clearly what happened."""
        left = ""
        gone = not self._still_there()
        fd = self._fd
        if fd is not None:
            try:
                os.lstat(tmp.name, dir_fd=fd)
                exists = True
            except OSError:
                exists = False
            if exists:
                try:
                    shutil.rmtree(tmp.name, dir_fd=fd)
                    os.fsync(fd)
                except OSError as e:
                    left = (
                        f"; a partial {tmp.name} may be left on it ({e.strerror}): delete it "
                        "before using the medium again"
                    )
        self.close()
        if gone:
            return RuntimeFailure(
                f"{self.name} disappeared during the export (pulled out or unmounted): nothing "
                f"was exported{left}. Plug it in, scan it and run the export again"
            )
        if _errno(error) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
            return RuntimeFailure(
                f"{self.name} became full during the export: the partial package was removed"
                f"{left}. Free some space or use a bigger medium, scan it, export again"
            )
        if _is_io(error) and not isinstance(error, PolicyRefused):
            return RuntimeFailure(
                f"I/O error writing to {self.name} ({error}): the medium may be failing or was "
                f"pulled out; nothing was exported{left}. Use another medium"
            )
        return None

    # common part of check_before_write ----------------------------------------------------------
    def _fingerprint_now(self) -> str | None:
        try:
            return self.fingerprint(self.path, None)
        except OSError:
            return None


def _errno(error: BaseException) -> int | None:
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


_IO_ERRNOS = {errno.EIO, errno.ENODEV, errno.ENXIO, errno.ENOSPC, errno.EROFS, errno.ESHUTDOWN}


def _is_io(error: BaseException) -> bool:
    return _errno(error) in _IO_ERRNOS or os.strerror(errno.EIO) in str(error)


class MediaDestination(_Guarded):
    """An enrolled, mounted, freshly scanned USB medium. The medium is detected again at every
    check (``find_medium``), so what is checked is what is attached now, not what was attached
    when the command started. Use as a context manager, or call ``close()`` after the export."""

    def __init__(
        self,
        media_id: str,
        store: MediaStore,
        *,
        sysfs_root: Path = SYSFS,
        require_enrolled: bool = True,
        scan_max_age: float = DEFAULT_SCAN_MAX_AGE,
        reserve: int = DEFAULT_RESERVE,
        clock: Callable[[], float] = time.time,
        fingerprint: Fingerprint | None = None,
        tz: tzinfo = UTC,
        dev_root: Path = DEV,
        mountinfo: Path = MOUNTINFO,
        mountpoints: Sequence[str] = (),
    ) -> None:
        super().__init__(
            store,
            scan_max_age=scan_max_age,
            reserve=reserve,
            clock=clock,
            fingerprint=fingerprint,
            tz=tz,
        )
        self.media_id = media_id
        self.require_enrolled = require_enrolled
        self.mountpoints = tuple(mountpoints)
        self._where = (sysfs_root, dev_root, mountinfo)
        self.medium = self._detect()
        self.name = f"medium {media_id}"
        self.enrolment = store.match(self.medium)
        outside = self.medium.mountpoint is not None and not any(
            _at_or_below(self.medium.mountpoint, w) for w in self.mountpoints or ["/"]
        )
        if not self.medium.mountpoint or self.medium.readonly or outside:
            # the engine needs a (writable) path before it checks: say now why there is none
            d = self._decide(None, 0, 0)
            raise PolicyRefused(d.reason)
        self.path = Path(self.medium.mountpoint)

    def _detect(self) -> Medium:
        sysfs_root, dev_root, mountinfo = self._where
        return find_medium(self.media_id, sysfs_root, dev_root=dev_root, mountinfo=mountinfo)

    def _decide(self, fp: str | None, free: int, needed: int) -> Decision:
        return gate_decision(
            self.medium,
            self.enrolment,
            self.scan,
            fp,
            free,
            needed,
            self.clock(),
            self.require_enrolled,
            self.scan_max_age,
            reserve=self.reserve,
            tz=self.tz,
            mountpoints=self.mountpoints,
        )

    def check_before_write(self, bytes_needed: int) -> None:
        self.medium = self._detect()
        self.enrolment = self.store.match(self.medium)
        self.scan = self.store.latest_scan(self.medium.id)
        if self.medium.mountpoint and Path(self.medium.mountpoint) != self.path:
            self._refuse(
                f"{self.name} moved from {self.path} to {self.medium.mountpoint} since the export "
                "started: run the export again"
            )
        fp: str | None = None
        free = 0
        if self.medium.mountpoint and not self.medium.readonly:
            self._hold()
            if self._fd is not None and self.medium.fs_dev:
                major, minor = (int(x) for x in self.medium.fs_dev.split(":"))
                if self._dev != os.makedev(major, minor):
                    # the mount table changed between detection and opening the mount point
                    self._refuse(f"{self.name} is no longer mounted at {self.path}: mount it again")
            fp = self._fingerprint_now()
            free = self._free()
        d = self._decide(fp, free, bytes_needed)
        self.decision = d
        if not d.allowed:
            self._refuse(d.reason)

    def describe(self) -> Mapping[str, Any]:
        m = self.medium
        return {
            "kind": "usb-media",
            "id": m.id,
            "label": self.enrolment.label if self.enrolment else None,
            "vendor": m.vendor,
            "model": m.model,
            "serial": m.serial,
            "bus": m.bus,
            "size": m.size,
            "fs_type": m.fs_type,
            "fs_uuid": m.fs_uuid,
            "fs_label": m.label,
            "device": m.fs_device or m.device,
            "mountpoint": m.mountpoint,
            "free_bytes": self._free() if self._fd is not None else None,
            "enrolled": self.enrolment.as_dict() if self.enrolment else None,
            "scan": self.scan.as_dict() if self.scan else None,
        }


class ScannedDirectory(_Guarded):
    """A directory from ``export.targets``, under the same rule: scanned clean, recently, and
    unchanged since (``media scan <dir>`` files the scan under the directory's path)."""

    def __init__(
        self,
        path: Path,
        store: MediaStore,
        *,
        scan_max_age: float = DEFAULT_SCAN_MAX_AGE,
        reserve: int = DEFAULT_RESERVE,
        clock: Callable[[], float] = time.time,
        fingerprint: Fingerprint | None = None,
        tz: tzinfo = UTC,
    ) -> None:
        super().__init__(
            store,
            scan_max_age=scan_max_age,
            reserve=reserve,
            clock=clock,
            fingerprint=fingerprint,
            tz=tz,
        )
        self.path = Path(path)
        self.name = f"export target {self.path}"

    def check_before_write(self, bytes_needed: int) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._refuse(f"{self.name} is not available ({e.strerror}): check it is mounted")
        if not stat.S_ISDIR(st.st_mode):
            self._refuse(f"{self.name} is not a directory")
        # effective ids: access() with the real ids drops capabilities, and the unit's daemon
        # writes into root's directories with CAP_DAC_OVERRIDE (a read-only mount: EROFS).
        if not os.access(self.path, os.W_OK | os.X_OK, effective_ids=True):
            self._refuse(f"{self.name} is not writable by this process")
        self._hold()
        self.scan = self.store.latest_scan(str(self.path))
        d = gate_decision(
            None,
            None,
            self.scan,
            self._fingerprint_now(),
            self._free(),
            bytes_needed,
            self.clock(),
            False,
            self.scan_max_age,
            reserve=self.reserve,
            target=str(self.path),
            identity=directory_identity(self.path),
            tz=self.tz,
        )
        self.decision = d
        if not d.allowed:
            self._refuse(d.reason)

    def describe(self) -> Mapping[str, Any]:
        return {
            "kind": "directory",
            "path": str(self.path),
            "free_bytes": self._free() if self._fd is not None else None,
            "scan": self.scan.as_dict() if self.scan else None,
        }
