"""Enrolled media and malware scan records, in the catalog's SQLite database.

An enrolment binds a name (the medium id) to the two identities a stick shows: its USB serial
and its filesystem UUID. A scan record binds a scan result to a target (a medium id, or a
directory from ``export.targets``), to the identity the target had when scanned, and to the
fingerprint of its file listing and to a digest of the files' contents; the gate (``gate.py``)
compares them with the present before anything is written, and the contents again before a
package is committed. Scan records are never edited: the latest one per target counts.
Who enrolled or removed what is also written to the audit log by the caller.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from nvr_guard.errors import InvalidInput
from nvr_guard.store.db import Database, write_transaction
from nvr_guard.store.schema import ensure_media_schema as ensure_schema

CLEAN = "clean"


class Medium(Protocol):
    """What an enrolment needs to know of a device (``media.detect.Medium`` has it); a protocol,
    so that storage does not import device detection (whose package imports this module)."""

    @property
    def id(self) -> str: ...
    @property
    def serial(self) -> str: ...
    @property
    def fs_uuid(self) -> str | None: ...
    @property
    def vendor(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def description(self) -> str: ...


@dataclass(frozen=True)
class Enrolment:
    id: str
    serial: str
    fs_uuid: str
    label: str
    vendor: str
    model: str
    enrolled_by: str
    enrolled_at: float
    removed_by: str | None = None
    removed_at: float | None = None

    @property
    def active(self) -> bool:
        """Not removed."""
        return self.removed_at is None

    def as_dict(self) -> dict[str, Any]:
        """The enrolment as plain data (``--json``)."""
        return asdict(self)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ScanRecord:
    """One finished scan. ``result`` is ``clean`` only when every file was scanned and nothing
    was found; the scanner reports anything else (``infected``, ``error``, ``too-large``,
    ``encrypted``, ...) and the gate treats every value but ``clean`` as not clean."""

    target_path: str
    started: float
    finished: float
    engine: str
    engine_version: str
    signature_version: str
    signature_date: str
    files: int
    bytes: int
    duration: float
    result: str
    listing_fingerprint: str
    device_identity: str
    media_id: str | None = None
    infected: Sequence[dict[str, str]] = field(default_factory=tuple)  # {path, signature}
    errors: Sequence[str] = field(default_factory=tuple)
    id: int | None = None
    content_digest: str = ""  # SHA-256 over every file's bytes as scanned (clamav.py)

    @property
    def clean(self) -> bool:
        """Only ``clean`` lets a write through."""
        return self.result == CLEAN

    def as_dict(self) -> dict[str, Any]:
        """For the manifest and ``--json``: times both as epoch and as ISO 8601 UTC."""
        d = asdict(self)
        d["infected"] = [dict(x) for x in self.infected]
        d["errors"] = list(self.errors)
        d["started_iso"] = _iso(self.started)
        d["finished_iso"] = _iso(self.finished)
        return d


_MEDIA_COLS = (
    "id, serial, fs_uuid, label, vendor, model, enrolled_by, enrolled_at, removed_by, removed_at"
)
_SCAN_COLS = (
    "id, media_id, target_path, started, finished, engine, engine_version, signature_version, "
    "signature_date, files, bytes, duration, result, infected_json, errors_json, "
    "listing_fingerprint, device_identity, content_digest"
)


def _enrolment(row: tuple[Any, ...]) -> Enrolment:
    return Enrolment(*row)


def _scan(row: tuple[Any, ...]) -> ScanRecord:
    sid, media_id, target, started, finished, engine, ev, sv, sd, files = row[:10]
    nbytes, dur, result = row[10:13]
    infected_json, errors_json, fp, ident, content = row[13:]
    return ScanRecord(
        id=int(sid),
        media_id=media_id,
        target_path=target,
        started=float(started),
        finished=float(finished),
        engine=engine,
        engine_version=ev,
        signature_version=sv,
        signature_date=sd,
        files=int(files),
        bytes=int(nbytes),
        duration=float(dur),
        result=result,
        infected=tuple(json.loads(infected_json)),
        errors=tuple(json.loads(errors_json)),
        listing_fingerprint=fp,
        device_identity=ident,
        content_digest=content,
    )


class MediaStore:
    """Enrolments and scan records on one connection (normally the catalog's, under its lock)."""

    def __init__(
        self, conn: sqlite3.Connection, lock: threading.RLock | threading.Lock | None = None
    ) -> None:
        self.conn = conn
        self.lock = lock or threading.RLock()
        with self.lock:
            ensure_schema(conn)

    def _txn(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self.conn, self.lock)

    # ---- enrolment ------------------------------------------------------------------------------
    def enroll(self, medium: Medium, label: str, by: str, now: float) -> Enrolment:
        """Record ``medium`` (its serial and filesystem UUID) as allowed for exports. A medium
        without a filesystem cannot be enrolled: the UUID is half of what is checked later."""
        label = label.strip()
        if not label:
            raise InvalidInput("an enrolment needs a label (--label), e.g. the number on the stick")
        if not medium.fs_uuid:
            raise InvalidInput(
                f"medium {medium.id} ({medium.description}) has no filesystem with a UUID; "
                "format it (e.g. mkfs.exfat) and list it again"
            )
        with self._txn() as c:
            row = c.execute(
                f"SELECT {_MEDIA_COLS} FROM media WHERE id = ?", (medium.id,)
            ).fetchone()
            if row is not None and _enrolment(row).active:
                raise InvalidInput(
                    f"medium {medium.id} is already enrolled as '{row[3]}'; "
                    f"remove it first to enrol it again"
                )
            # a removed medium enrolled again gets a fresh row: the audit log keeps the history
            c.execute(
                "INSERT OR REPLACE INTO media (id, serial, fs_uuid, label, vendor, model, "
                "enrolled_by, enrolled_at, removed_by, removed_at) "
                "VALUES (?,?,?,?,?,?,?,?,NULL,NULL)",
                (
                    medium.id,
                    medium.serial,
                    medium.fs_uuid,
                    label,
                    medium.vendor,
                    medium.model,
                    by,
                    now,
                ),
            )
        return self.get(medium.id)

    def remove(self, media_id: str, by: str, now: float) -> Enrolment:
        """End an enrolment (the row stays, with who removed it and when)."""
        with self._txn() as c:
            row = c.execute(f"SELECT {_MEDIA_COLS} FROM media WHERE id = ?", (media_id,)).fetchone()
            if row is None or not _enrolment(row).active:
                raise InvalidInput(f"medium {media_id} is not enrolled; see `nvr-guard media list`")
            c.execute(
                "UPDATE media SET removed_by = ?, removed_at = ? WHERE id = ?", (by, now, media_id)
            )
        return self.get(media_id)

    def get(self, media_id: str) -> Enrolment:
        """The enrolment row (active or removed); InvalidInput when there never was one."""
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_MEDIA_COLS} FROM media WHERE id = ?", (media_id,)
            ).fetchone()
        if row is None:
            raise InvalidInput(f"medium {media_id} was never enrolled; see `nvr-guard media list`")
        return _enrolment(row)

    def all(self, *, include_removed: bool = False) -> list[Enrolment]:
        """The active enrolments (and the removed ones), oldest first."""
        with self.lock:
            rows = self.conn.execute(f"SELECT {_MEDIA_COLS} FROM media ORDER BY enrolled_at, id")
            out = [_enrolment(r) for r in rows]
        return out if include_removed else [e for e in out if e.active]

    def match(self, medium: Medium) -> Enrolment | None:
        """The active enrolment this medium claims: by id, else one with the same serial or the
        same filesystem UUID (so a reformatted stick or a clone is refused by name, not just
        reported as unknown)."""
        active = self.all()
        by_id = [e for e in active if e.id == medium.id]
        if by_id:
            return by_id[0]
        for e in active:
            if medium.serial and e.serial == medium.serial:
                return e
        for e in active:
            if medium.fs_uuid and e.fs_uuid == medium.fs_uuid:
                return e
        return None

    # ---- scans ----------------------------------------------------------------------------------
    def record_scan(self, scan: ScanRecord) -> int:
        """Append a scan record; returns its id."""
        with self._txn() as c:
            cur = c.execute(
                "INSERT INTO scans (media_id, target_path, started, finished, engine, "
                "engine_version, signature_version, signature_date, files, bytes, duration, "
                "result, infected_json, errors_json, listing_fingerprint, device_identity, "
                "content_digest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    scan.media_id,
                    scan.target_path,
                    scan.started,
                    scan.finished,
                    scan.engine,
                    scan.engine_version,
                    scan.signature_version,
                    scan.signature_date,
                    scan.files,
                    scan.bytes,
                    scan.duration,
                    scan.result,
                    json.dumps([dict(x) for x in scan.infected], ensure_ascii=False),
                    json.dumps(list(scan.errors), ensure_ascii=False),
                    scan.listing_fingerprint,
                    scan.device_identity,
                    scan.content_digest,
                ),
            )
            return int(cur.lastrowid or 0)

    def recent_scans(self, limit: int = 5) -> list[ScanRecord]:
        """The newest scans of any target, newest first (for `status`)."""
        with self.lock:
            rows = self.conn.execute(
                f"SELECT {_SCAN_COLS} FROM scans ORDER BY id DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [_scan(r) for r in rows]

    def latest_scan(self, target_key: str) -> ScanRecord | None:
        """The newest scan of a medium (``target_key`` = its id) or of a directory target
        (``target_key`` = its path, for scans recorded without a medium id)."""
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_SCAN_COLS} FROM scans WHERE media_id = ? "
                "OR (media_id IS NULL AND target_path = ?) ORDER BY id DESC LIMIT 1",
                (target_key, target_key),
            ).fetchone()
        return _scan(row) if row else None

    def scan(self, scan_id: int) -> ScanRecord:
        """One scan record; InvalidInput when there is none of that id."""
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_SCAN_COLS} FROM scans WHERE id = ?", (scan_id,)
            ).fetchone()
        if row is None:
            raise InvalidInput(f"no scan {scan_id}")
        return _scan(row)


def scan_counts_by_result(db: Database) -> dict[str, int]:
    """Scan records per result ({} when the table was never created)."""
    out: dict[str, int] = {}
    with db.lock:
        if db.table_exists("scans"):
            for result, n in db.conn.execute("SELECT result, count(*) FROM scans GROUP BY result"):
                out[str(result)] = int(n)
    return out
