"""Attention states: things the admin must see because the product is not doing its whole job.

"Nothing is skipped silently": files the layout does not match, a root that vanished or
emptied, an unreadable directory, a camera whose clock disagrees with the file times, a refused
reload. Each source reports the complete set of its current entries for one ``(kind, scope)``
through :meth:`Attention.replace` (a scanner pass knows every unmatched root of a site at once) or
raises/clears single entries. While any entry stands, ``status`` says ``ok: false`` and lists them
under ``attention`` (``{kind, site, message}``), the metrics carry a count per kind, and the audit
log records when each entry was first raised and when it was cleared (not on every pass).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nvr_guard.attention")

# kinds (stable names: scripts match them)
UNMATCHED = "unmatched"  # segment-extension files the site's layout does not match
CLOCK_SKEW = "clock_skew"  # path time and mtime disagree by more than guards.max_clock_skew
ROOT_MISSING = "root_missing"  # a configured root does not exist (or is not a directory)
ROOT_EMPTIED = "root_emptied"  # a root with catalogued footage is now empty
ROOT_DEVICE = "root_device_changed"  # a root now sits on another file system than before
UNREADABLE = "unreadable"  # a directory or file the scanner could not read
RELOAD_REFUSED = "reload_refused"  # the last reload was refused; the old config stays in force
MOUNT_SKIPPED = "mount_skipped"  # a mount point under a root was not entered (cross_mounts false)
SIGNING_KEY = "signing_key"  # the export signing key cannot be loaded or created
AUDIT_HEAD = "audit_head"  # the audit log does not reach the recorded head: appends refused
CAMERA_UNCLAIMED = "camera_unclaimed"  # a camera in a root split by cameras: no site claims it
# the recorder's own database (Frigate's) could not be told about deleted files: rows are left
RECORDER_INDEX = "recorder_index"
# a notification (mail or webhook) was given up after notify.retry_for; cleared when that
# channel next delivers one
NOTIFY_FAILED = "notify_failed"
# an exported package due for destruction could not be destroyed (its target is not there as it
# was, the package was changed); cleared when it is destroyed
EXPORT_COPY = "export_copy"


@dataclass(frozen=True)
class Entry:
    kind: str
    site: str | None
    key: str  # identifies the entry within (kind, site): a root, a camera, a directory
    message: str
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "site": self.site, "message": self.message}
        out.update({k: v for k, v in self.details.items() if k not in out})
        return out


AuditFn = Callable[[str, str, dict[str, Any]], object]  # (action, object, details)


class Attention:
    """Thread-safe registry of the attention entries that stand now."""

    def __init__(self, audit: AuditFn | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str | None, str], Entry] = {}
        self._audit = audit

    # ---- reporting ---------------------------------------------------------------------------
    def raise_(
        self,
        kind: str,
        site: str | None,
        key: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        entry = Entry(kind, site, key, message, dict(details or {}))
        with self._lock:
            old = self._entries.get((kind, site, key))
            self._entries[(kind, site, key)] = entry
        if old is None:
            log.warning("attention (%s%s): %s", kind, f", site {site}" if site else "", message)
            self._record("attention.raised", entry)

    def clear(self, kind: str, site: str | None = None, key: str | None = None) -> None:
        """Clear one entry, or every entry of ``kind`` (for ``site`` when given)."""
        with self._lock:
            gone = [
                k
                for k in self._entries
                if k[0] == kind and (site is None or k[1] == site) and (key is None or k[2] == key)
            ]
            entries = [self._entries.pop(k) for k in gone]
        for e in entries:
            log.info("attention cleared (%s): %s", e.kind, e.message)
            self._record("attention.cleared", e)

    def replace(
        self,
        kind: str,
        site: str | None,
        entries: Iterable[tuple[str, str, dict[str, Any] | None]],
        keys_in_scope: Callable[[str], bool] | None = None,
    ) -> None:
        """Make ``[(key, message, details), ...]`` the complete set of ``kind`` entries for
        ``site``; entries not named are cleared. ``keys_in_scope`` limits which existing keys this
        report speaks for (a rescan of one root must not clear another root's entries)."""
        new = {key: (msg, det) for key, msg, det in entries}
        with self._lock:
            stale = [
                k
                for k in self._entries
                if k[0] == kind
                and k[1] == site
                and k[2] not in new
                and (keys_in_scope is None or keys_in_scope(k[2]))
            ]
        for k in stale:
            self.clear(kind, site, k[2])
        for key, (msg, det) in new.items():
            self.raise_(kind, site, key, msg, det)

    def forget_sites(self, keep: Iterable[str]) -> None:
        """Drop entries of sites no longer configured (a reload removed them)."""
        keep_set = set(keep)
        with self._lock:
            gone = [k for k in self._entries if k[1] is not None and k[1] not in keep_set]
            entries = [self._entries.pop(k) for k in gone]
        for e in entries:
            self._record("attention.cleared", e)

    # ---- reading -----------------------------------------------------------------------------
    def entries(self, kind: str | None = None) -> list[Entry]:
        with self._lock:
            out = [e for e in self._entries.values() if kind is None or e.kind == kind]
        return sorted(out, key=lambda e: (e.kind, e.site or "", e.key))

    def as_json(self) -> list[dict[str, Any]]:
        return [e.as_json() for e in self.entries()]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries():
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._entries)

    # ---- internals ---------------------------------------------------------------------------
    def _record(self, action: str, entry: Entry) -> None:
        if self._audit is None:
            return
        try:
            self._audit(
                action,
                f"attention:{entry.kind}" + (f":{entry.site}" if entry.site else ""),
                {"key": entry.key, "message": entry.message, **entry.details},
            )
        except Exception as exc:  # the registry itself must never fail its reporter
            if getattr(exc, "exit_code", None) == 4:  # the audit log refuses appends: said once
                log.error("attention entry %s not audited: %s", entry.kind, exc)
            else:
                log.exception("recording attention entry %s", entry.kind)
