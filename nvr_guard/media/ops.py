"""The media gate's operations for the daemon: list, enrol, remove, scan, wipe, and the export
destination. Every enrolment, removal, scan and refusal goes into the audit chain.

An export leaves the recorder only on a medium an admin enrolled and that was scanned clean
(or on a scanned target directory): this module is where those commands meet the roles, the
media store and the audit chain. It receives the narrow context, not the engine, so the workflow
can use its destination gate without either importing the other's owner."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any

from nvr_guard.config import Media
from nvr_guard.context import Context
from nvr_guard.errors import InvalidInput, PolicyRefused, RuntimeFailure
from nvr_guard.identity import Caller
from nvr_guard.media import clamav
from nvr_guard.media.detect import find_medium, list_media
from nvr_guard.media.gate import (
    MediaDestination,
    ScannedDirectory,
    resolve_scan_target,
    scan_record,
)
from nvr_guard.store.media import MediaStore
from nvr_guard.store.requests import sealed_digests

log = logging.getLogger("nvr_guard.media")

ENROL_ROLES = frozenset({"admin"})
SCAN_ROLES = frozenset({"admin", "technician", "security_lead"})
LIST_ROLES = frozenset(
    {"admin", "technician", "security_lead", "operator", "dept_manager", "duty_manager", "auditor"}
)


class MediaOps:
    """The media commands on the instance's context: roles checked, state changes audited."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        with ctx.catalog.lock:
            self.store = MediaStore(ctx.catalog.conn, ctx.catalog.lock)
        self.progress: dict[str, tuple[int, int]] = {}  # media scans under way: (done, total)

    @property
    def cfg(self) -> Media:
        """The ``media:`` section of the config in force."""
        return self.ctx.config.media

    @property
    def sysfs(self) -> Path:
        """Where the block devices are read from (``media.sysfs_root``)."""
        return Path(self.cfg.sysfs_root)

    def now(self) -> float:
        """The instance clock's wall time."""
        return self.ctx.clock().wall

    def _targets(self) -> list[Path]:
        return [Path(t) for t in self.ctx.config.export.targets]

    # ---- read ------------------------------------------------------------------------------------
    def list(self, caller: Caller) -> dict[str, Any]:
        """The media plugged in and the export target directories, with enrolment and last scan."""
        self.ctx.require(caller, LIST_ROLES, "list media")
        out = []
        for m in list_media(self.sysfs):
            d = m.as_dict()
            enr = self.store.match(m)
            d["enrolled"] = enr.as_dict() if enr is not None and enr.active else None
            last = self.store.latest_scan(m.id)
            d["last_scan"] = last.as_dict() if last is not None else None
            out.append(d)
        for t in self._targets():
            last = self.store.latest_scan(str(t))
            out.append(
                {
                    "id": str(t),
                    "kind": "directory",
                    "mountpoint": str(t),
                    "enrolled": None,
                    "last_scan": last.as_dict() if last else None,
                }
            )
        return {"media": out}

    # ---- enrolment -------------------------------------------------------------------------------
    def enroll(self, caller: Caller, media_id: str, label: str) -> dict[str, Any]:
        """Enrol a plugged-in medium under ``label`` (admin); audited."""
        self.ctx.require(caller, ENROL_ROLES, f"enrol medium {media_id}")
        label = label.strip()
        if not label or not label.isprintable() or len(label) > 100:
            raise InvalidInput("--label must be printable text of at most 100 characters")
        m = find_medium(media_id, self.sysfs)
        node = m.fs_device or m.device
        if not m.fs_uuid and not Path(node).exists():
            # under the unit's PrivateDevices=yes the daemon cannot probe the filesystem
            raise RuntimeFailure(
                f"the service cannot read {node}, so it cannot tell the filesystem on medium "
                f"{m.id}: list where export media are mounted in media.mountpoints and run "
                "`make install-service` again (its drop-in lets the unit read removable disks)"
            )
        with self.ctx.recording():
            e = self.store.enroll(m, label, caller.user, self.now())
            self.ctx.audit.append(
                caller.user,
                "media.enroll",
                f"media:{m.id}",
                {
                    "label": label,
                    "serial": m.serial,
                    "fs_uuid": m.fs_uuid,
                    "vendor": m.vendor,
                    "model": m.model,
                },
            )
        return e.as_dict()

    def remove(self, caller: Caller, media_id: str, reason: str) -> dict[str, Any]:
        """End a medium's enrolment, with a reason (admin); audited."""
        self.ctx.require(caller, ENROL_ROLES, f"remove medium {media_id}")
        if not reason.strip():
            raise InvalidInput("--reason is required to remove an enrolment")
        with self.ctx.recording():
            e = self.store.remove(media_id, caller.user, self.now())
            self.ctx.audit.append(
                caller.user, "media.remove", f"media:{media_id}", {"reason": reason.strip()}
            )
        return e.as_dict()

    # ---- scanning --------------------------------------------------------------------------------
    def scan(self, caller: Caller, spec: str) -> dict[str, Any]:
        """Scan a medium or export target for malware with ClamAV; the result is recorded and
        audited, and an export accepts only a destination with a recent clean scan."""
        self.ctx.require(caller, SCAN_ROLES, f"scan {spec}")
        target = resolve_scan_target(spec, self._targets(), sysfs_root=self.sysfs)

        def progress(done: int, total: int) -> None:
            self.progress[spec] = (done, total)

        self.progress[spec] = (0, 0)
        try:
            result = clamav.scan_tree(
                target.path,
                scanner=self.cfg.scanner,
                database=Path(self.cfg.database) if self.cfg.database else None,
                clamd_socket=Path(self.cfg.clamd_socket) if self.cfg.clamd_socket else None,
                clamd_config=Path(self.cfg.clamd_config) if self.cfg.clamd_config else None,
                progress=progress,
                sealed=sealed_digests(self.ctx.catalog),
            )
        finally:
            self.progress.pop(spec, None)
        rec = scan_record(
            result,
            media_id=target.media_id,
            device_identity=target.identity,
            target_path=target.key,
        )
        with self.ctx.recording():
            sid = self.store.record_scan(rec)
            self.ctx.audit.append(
                caller.user,
                "media.scan",
                f"media:{target.key}",
                {
                    "scan": sid,
                    "result": result.result,
                    "engine": result.engine,
                    "engine_version": result.engine_version,
                    "signature_version": result.signature_version,
                    "files": result.files,
                    "bytes": result.bytes,
                    "content_digest": result.content_digest,
                    "infected": [list(i) for i in result.infected],
                    "errors": list(result.errors[:20]),
                },
            )
        out = result.as_json()
        out["scan"] = sid
        out["target"] = target.key
        return out

    # ---- destination -----------------------------------------------------------------------------
    def destination(self, spec: str, tz: tzinfo) -> MediaDestination | ScannedDirectory:
        """The gate in front of an export: a scanned directory from ``export.targets`` or an
        enrolled, scanned medium. The caller closes it (it holds the mount open)."""
        max_age = float(self.cfg.scan_max_age.seconds)
        if spec.startswith("/"):
            want = Path(spec)
            if want not in set(self._targets()):
                raise PolicyRefused(
                    f"{spec} is not an approved export destination: list it in export.targets, "
                    "or give the id of an enrolled medium (`nvr-guard media list`)"
                )
            return ScannedDirectory(
                want,
                self.store,
                scan_max_age=max_age,
                reserve=self.cfg.reserve,
                clock=self.now,
                tz=tz,
            )
        return MediaDestination(
            spec,
            self.store,
            sysfs_root=self.sysfs,
            require_enrolled=self.cfg.require_enrolled,
            scan_max_age=max_age,
            reserve=self.cfg.reserve,
            clock=self.now,
            tz=tz,
            mountpoints=[str(p) for p in self.cfg.mountpoints],
        )

    # ---- wiping ----------------------------------------------------------------------------------
    def wipe(
        self, caller: Caller, media_id: str, confirm: str, run: Callable[..., Any] = subprocess.run
    ) -> dict[str, Any]:
        """Format a medium instead of scanning its old contents (``media.prepare: wipe``)."""
        self.ctx.require(caller, ENROL_ROLES, f"wipe medium {media_id}")
        if self.cfg.prepare != "wipe":
            raise PolicyRefused("wiping media is off: set media.prepare: wipe in the config")
        m = find_medium(media_id, self.sysfs)
        if confirm != m.id:
            raise InvalidInput(f"to wipe, confirm with the medium's id: --confirm {m.id}")
        if m.mountpoint:
            raise PolicyRefused(f"medium {m.id} is mounted on {m.mountpoint}: unmount it first")
        device = m.fs_device or m.device
        mkfs = shutil.which("mkfs.vfat") or shutil.which("mkfs.exfat")
        if mkfs is None:
            raise RuntimeFailure("neither mkfs.vfat (dosfstools) nor mkfs.exfat is installed")
        with self.ctx.recording():
            self.ctx.audit.append(
                caller.user,
                "media.wipe",
                f"media:{m.id}",
                {"device": device, "tool": mkfs, "phase": "begin"},
            )
        r = run(
            [mkfs, "-n" if mkfs.endswith("vfat") else "-L", "NVRG", device],
            capture_output=True,
            text=True,
            timeout=600,
        )
        ok = r.returncode == 0
        with self.ctx.recording():
            self.ctx.audit.append(
                caller.user,
                "media.wipe",
                f"media:{m.id}",
                {
                    "device": device,
                    "phase": "done" if ok else "failed",
                    "output": (r.stderr or r.stdout)[-500:],
                },
            )
        if not ok:
            raise RuntimeFailure(f"{mkfs} {device} failed: {(r.stderr or r.stdout).strip()[-300:]}")
        # a new filesystem UUID: the medium gets a new id and must be enrolled again
        return {
            "id": m.id,  # the medium as it was (its new file system gives it a new id)
            "device": device,
            "formatted": True,
            "tool": Path(mkfs).name,
            "note": "mount it, then `nvr-guard media enroll` and `media scan` it",
        }
