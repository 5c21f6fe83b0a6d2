"""Copies of exported footage and their end (数据销毁): destroyed when their purpose ends.

Where each export's copy went is recorded with the request (``copy``: an ``export.targets``
directory, or a USB medium). A package on a target directory is deleted ``export.target_keep``
after its export (default 30 days) unless a manual hold names the request (``hold add --request
ID``), with a receipt in the audit log (``export.destroyed``: the package, its files and bytes,
a digest of the file list) like any purge; an admin ends one early with ``export destroy REQUEST
--reason R``. A copy on a medium leaves the recorder's reach: it is known destroyed when the
medium comes back and is wiped (``media wipe``), which is recorded against every request
exported onto it ("medium returned and wiped"). ``request show`` -> ``destroyed`` says whether a
copy is known destroyed; ``status`` -> ``export_copies`` lists those due.

The deletion touches nothing but the package: the target directory is opened without following
links, the package must be a directory of this process named ``NVRG-...`` directly inside it,
and only its regular files are removed, through the directory's descriptor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from nvr_guard.attention import EXPORT_COPY
from nvr_guard.errors import InvalidInput, PolicyRefused, RuntimeFailure
from nvr_guard.identity import Caller
from nvr_guard.text import fmt_duration
from nvr_guard.times import iso
from nvr_guard.workflow.export_job import RequestAccess

log = logging.getLogger(__name__)

DESTROY_ROLES = frozenset({"admin"})
STATUS_ITEMS = 50


class Copies:
    """The exported copies of one workflow: due dates, destruction, media wiped."""

    def __init__(self, wf: RequestAccess) -> None:
        self.wf = wf
        self.ctx = wf.ctx
        self._failed: dict[int, str] = {}  # destructions that failed: why (reported once)

    def record(self, rid: int, destination: dict[str, Any], package: Path, at: float) -> None:
        """Note where request ``rid``'s export went (under the engine lock, in the export's
        commit). ``destination`` is the manifest's description of it."""
        kind = str(destination.get("kind") or "directory")
        copy: dict[str, Any] = {"kind": kind, "package": str(package), "exported": at}
        if kind == "usb-media":
            copy["media_id"] = destination.get("id")
            copy["label"] = destination.get("label")
        else:
            copy["target"] = str(package.parent)
            copy["target_id"] = _identity(package.parent)
        self.wf.store.update(rid, copy=copy)

    def adopt(self) -> list[int]:
        """Give the packages exported before copies were recorded (no ``copy``) onto a directory
        of ``export.targets`` their record, so they too end at ``target_keep`` (daemon start).
        Packages on media are left: where they went is not known."""
        targets = {os.path.normpath(t) for t in self.wf.config.export.targets}
        adopted = []
        with self.ctx.recording():
            for r, extra in self.wf.store.select(states=("exported", "closed")):
                package = extra.get("package")
                if extra.get("copy") or extra.get("destroyed") or not package:
                    continue
                if os.path.normpath(os.path.dirname(package)) not in targets:
                    continue
                if not os.path.isdir(package):
                    continue  # not there now (a target away): taken in when it is back
                at = float(r.exported_at or r.created)
                target = os.path.dirname(package)
                self.wf.store.update(
                    r.id,
                    copy={"kind": "directory", "package": package, "exported": at,
                          "target": target, "target_id": _identity(Path(target)),
                          "adopted": True},
                )  # fmt: skip
                adopted.append(r.id)
            if adopted:
                self.ctx.audit.append(
                    "nvr-guard",
                    "export.copies_adopted",
                    "export",
                    {"requests": adopted, "why": "exported before copies were recorded"},
                )
        return adopted

    # ---- what is due -----------------------------------------------------------------------
    def due(
        self, now: float, copies: list[tuple[int, dict[str, Any]]] | None = None
    ) -> list[dict[str, Any]]:
        """Every copy on a target directory not known destroyed (of ``copies``, the store's
        when not given), with its due time and the holds that keep it, soonest first."""
        out: list[dict[str, Any]] = []
        holds = self.ctx.catalog.holds_naming_any(now)
        keep = float(self.wf.config.export.target_keep.seconds)
        for rid, copy in self.wf.store.copies() if copies is None else copies:
            if copy.get("kind") == "usb-media":
                continue
            out.append(
                {
                    "request": rid,
                    "package": copy.get("package"),
                    # from the export, by the keep in force now (a reload may change it)
                    "due": float(copy.get("exported") or 0.0) + keep,
                    "held_by": holds.get(rid, []),
                }
            )
        out.sort(key=lambda c: float(c["due"]))
        return out

    def status_part(self, now: float) -> dict[str, Any]:
        """``status`` -> ``export_copies``: the packages on target directories, those due for
        destruction first, and how many copies are out on media (engine lock held)."""
        rows = self.wf.store.copies()
        copies = self.due(now, rows)
        on_media = sum(1 for _, c in rows if c.get("kind") == "usb-media")
        tz = self.wf.config.tz
        return {
            "on_targets": len(copies),
            "due_now": sum(1 for c in copies if c["due"] <= now and not c["held_by"]),
            "held": sum(1 for c in copies if c["held_by"]),
            "on_media": on_media,
            "keep": fmt_duration(self.wf.config.export.target_keep),
            "items": [{**c, "due": iso(c["due"], tz)} for c in copies[:STATUS_ITEMS]],
            "items_not_shown": max(0, len(copies) - STATUS_ITEMS),
        }

    # ---- destruction -----------------------------------------------------------------------
    def destroy_due(self) -> list[int]:
        """Delete every package on a target directory past ``export.target_keep`` that no hold
        names (the daemon's periodic job). Returns the requests whose copy was destroyed."""
        done = []
        with self.ctx.recording():
            now = self.wf.now()
            keep = fmt_duration(self.wf.config.export.target_keep)
            for c in self.due(now):
                rid = c["request"]
                if c["due"] > now or c["held_by"]:
                    continue
                try:
                    self._destroy(
                        rid,
                        "nvr-guard",
                        f"deleted from its export target after export.target_keep ({keep})",
                        None,
                    )
                except RuntimeFailure as e:
                    # tried again every minute (a target may come back); said once per reason
                    if self._failed.get(rid) != str(e):
                        self._failed[rid] = str(e)
                        log.error("cannot destroy the package of request %s: %s", rid, e)
                        self.ctx.audit.append(
                            "nvr-guard",
                            "export.destroy_failed",
                            f"request:{rid}",
                            {"package": c["package"], "error": str(e)},
                        )
                        self.ctx.attention.raise_(
                            EXPORT_COPY,
                            None,
                            f"request:{rid}",
                            f"the package of request {rid} is due for destruction but was not "
                            f"destroyed: {e}",
                        )
                    continue
                done.append(rid)
        return done

    def destroy(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        """``export destroy REQUEST --reason R``: an admin ends a package's keeping early."""
        reason = reason.strip()
        with self.ctx.recording():
            actor = self.wf.actor(caller)
            if not (actor.roles & DESTROY_ROLES):
                self.ctx.audit.append(
                    caller.user,
                    "access.denied",
                    f"request:{rid}",
                    {"uid": caller.uid, "reason": "export destroy needs the admin role"},
                )
                raise PolicyRefused(
                    f"{caller.user} may not destroy export packages; it needs the admin role"
                )
            if not reason or any(not ch.isprintable() for ch in reason):
                raise InvalidInput("--reason is required and must be printable text")
            self.wf.store.get(rid)  # InvalidInput for an unknown id
            extra = self.wf.store.extra(rid)
            copy, destroyed = extra.get("copy"), extra.get("destroyed")
            if destroyed:
                raise InvalidInput(
                    f"the copy of request {rid} is already destroyed ({destroyed.get('how')})"
                )
            if not copy:
                raise InvalidInput(f"request {rid} has no exported copy to destroy")
            if copy.get("kind") == "usb-media":
                raise InvalidInput(
                    f"the copy of request {rid} went out on medium {copy.get('media_id')}: it is "
                    "destroyed by wiping the medium when it comes back (`nvr-guard media wipe`)"
                )
            held = self.ctx.catalog.holds_naming(rid, self.wf.now())
            if held:
                raise PolicyRefused(
                    f"the package of request {rid} is kept by hold(s) "
                    f"{', '.join(map(str, held))}; release them first (`nvr-guard hold release`)"
                )
            return self._destroy(rid, caller.user, "destroyed early by an admin", reason)

    def wiped(self, caller: Caller, media_id: str) -> list[int]:
        """A medium was wiped: the copies exported onto it are known destroyed ("medium
        returned and wiped"), recorded against each request."""
        out = []
        with self.ctx.recording():
            now = self.wf.now()
            for rid, copy in self.wf.store.copies():
                if copy.get("kind") != "usb-media" or copy.get("media_id") != media_id:
                    continue
                info = {
                    "time": iso(now, self.wf.config.tz),
                    "by": caller.user,
                    "how": f"medium returned and wiped (media wipe of {media_id})",
                    "package": copy.get("package"),
                }
                self.wf.store.update(rid, destroyed=info)
                self.ctx.audit.append(caller.user, "export.destroyed", f"request:{rid}", info)
                out.append(rid)
        return out

    def _destroy(self, rid: int, by: str, how: str, reason: str | None) -> dict[str, Any]:
        """Delete the package of ``rid`` from its target; receipt and record (engine lock)."""
        copy = self.wf.store.extra(rid).get("copy") or {}
        package = Path(str(copy.get("package")))
        files, missing = remove_package(package)
        if missing and reason is None:
            # the minute job: only a target as written shows the package gone; an admin's
            # `export destroy` records it as they say (with their reason, on record)
            _target_as_written(copy, package)
        now = self.wf.now()
        info: dict[str, Any] = {
            "time": iso(now, self.wf.config.tz),
            "by": by,
            "how": how
            if not missing
            else (
                "not found on its export target: removed outside nvr-guard before its due time"
                if reason is None
                else "not found on its export target; recorded as destroyed by an admin"
            ),
            "package": str(package),
        }
        if reason:
            info["reason"] = reason
        receipt = {
            **info,
            "files": len(files),
            "bytes": sum(size for _, size in files),
            # like a purge receipt: a digest of what was deleted
            "digest": hashlib.sha256(
                json.dumps(sorted(files), ensure_ascii=False).encode()
            ).hexdigest(),
            "names": [name for name, _ in files],
            "missing": missing,
        }
        self.wf.store.update(rid, destroyed=info)
        self.ctx.audit.append(by, "export.destroyed", f"request:{rid}", receipt)
        if self._failed.pop(rid, None) is not None:
            self.ctx.attention.clear(EXPORT_COPY, None, f"request:{rid}")
        log.info("request %s: package %s destroyed (%s)", rid, package, info["how"])
        return {"id": rid, **receipt}


def _identity(path: Path) -> list[int] | None:
    """(file system id, inode) of a directory, to tell it later from an empty mount point or
    another disk mounted there. The file system id (statfs ``f_fsid``) of ext4, XFS and btrfs
    comes from the file system's UUID, so the same disk is recognised on another device
    (``sdb`` then ``sdc``, another loop number), where ``st_dev`` would differ; a different disk
    has another one, even in the same slot with the same root inode."""
    try:
        st = os.stat(path)
        fs = os.statvfs(path)
    except OSError:
        return None
    return [fs.f_fsid, st.st_ino]


def _target_as_written(copy: dict[str, Any], package: Path) -> None:
    """A package not found: fine only if its target is the directory it was written to (a
    target on a disk or share that is not mounted now shows an empty mount point, and its
    package is away, not gone). RuntimeFailure otherwise: tried again later."""
    target = Path(str(copy.get("target") or package.parent))
    now = _identity(target)
    was = copy.get("target_id")
    if now is None:
        raise RuntimeFailure(
            f"its export target {target} is not there (unmounted?); it is destroyed when the "
            "target is back, or, if it is gone for good, recorded by an admin: nvr-guard "
            "export destroy REQUEST --reason R"
        )
    if was is not None and list(was) != now:
        raise RuntimeFailure(
            f"{package} is not found, and {target} is not the directory it was written to (a "
            "file system not mounted there now?); it is destroyed when the target is back, or, "
            "if it was removed, recorded by an admin: nvr-guard export destroy REQUEST --reason R"
        )


def remove_package(package: Path) -> tuple[list[tuple[str, int]], bool]:
    """Delete a package directory (``NVRG-...``) and its regular files, through descriptors.
    Returns ((name, size) of each file removed, whether the package was already gone);
    RuntimeFailure when it is not a package of this process (left untouched)."""
    if not package.name.startswith("NVRG-"):
        raise RuntimeFailure(f"{package} is not an export package (NVRG-...); left as it is")
    try:
        return _remove_package(package)
    except OSError as e:
        raise RuntimeFailure(f"removing {package} failed: {e.strerror or e}") from None


def _remove_package(package: Path) -> tuple[list[tuple[str, int]], bool]:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dfd = os.open(package.parent, flags)
    except FileNotFoundError:
        return [], True
    except OSError as e:
        raise RuntimeFailure(f"cannot open {package.parent}: {e.strerror}") from None
    try:
        try:
            st = os.lstat(package.name, dir_fd=dfd)
        except FileNotFoundError:
            return [], True
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise RuntimeFailure(
                f"{package} is not a directory of this process (a link, or someone else's); "
                "left as it is"
            )
        pfd = os.open(package.name, flags, dir_fd=dfd)
        try:
            files = []
            for name in sorted(os.listdir(pfd)):
                fst = os.lstat(name, dir_fd=pfd)
                if not stat.S_ISREG(fst.st_mode):
                    raise RuntimeFailure(
                        f"{package / name} is not a regular file: the package was changed "
                        "after its export; nothing was deleted, look at it"
                    )
                files.append((name, fst.st_size))
            for name, _ in files:
                os.unlink(name, dir_fd=pfd)
            os.fsync(pfd)
        finally:
            os.close(pfd)
        os.rmdir(package.name, dir_fd=dfd)
        os.fsync(dfd)
        return files, False
    finally:
        os.close(dfd)
