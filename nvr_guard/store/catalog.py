"""The SQLite catalog: segments on disk, holds, sweeps (and, through audit.py, the audit log).

One database file, ``state_dir/catalog.db``, in WAL mode so the CLI can read while the daemon
writes. Every change that touches more than one row runs in one transaction, so a kill -9 at any
moment leaves either the state before or the state after it — never half a reconcile.

Why ``expires_at`` is stored: a sweep must not walk the tree nor read a million rows to find the
few that are due (a sweep with nothing due must cost at most 1/100 of a ``find``). The column holds
``policy.expiry_both(start, mtime, rules)`` (past the ceiling by both times) and is indexed; a
sweep reads the rows with ``expires_at`` up to ``now`` (plus a small slack) and the policy makes
the exact decision. When a site's rules change, the column is recomputed
(:meth:`Catalog.recompute_expiry`; also done automatically when :meth:`Catalog.due_segments` sees
rules it did not compute the column with).

Threads: one connection, guarded by :attr:`Catalog.lock` (an ``RLock``). Code that uses
:attr:`Catalog.conn` directly (the audit log, purge's ``on_deleted`` callback) must hold that lock
for the whole of its transaction, so another thread's statements never land inside it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvr_guard.errors import InvalidInput
from nvr_guard.model import (
    ClockReading,
    Hold,
    Item,
    Segment,
    SiteRules,
    SweepHistory,
    skew_band,
)
from nvr_guard.workers import libc_function

log = logging.getLogger(__name__)

__all__ = [
    "EXPIRY_SLACK",
    "Catalog",
    "ExpiryCalc",
    "SWEEP_STATES",
    "PackedRows",
    "SegmentRow",
    "SkewReport",
    "SweepItemRecord",
    "SweepRecord",
]

# Rows whose stored expiry is at most this far in the future are handed to the policy as
# candidates. It covers the float rounding of the memoised calendar expiry (ExpiryCalc); the
# policy decides exactly, so a candidate that is not due yet is simply not deleted.
EXPIRY_SLACK = 1.0

PAGE_SIZE = 16384
_AUTOCHECKPOINT = 1000  # pages; SQLite's default
_WAL_SIZE_LIMIT = 64 * 2**20
# a bulk load of at least this many rows is checkpointed on a thread of its own (about 10 MB
# of WAL; a smaller one costs its commit no more than an ordinary batch)
_DEFER_CHECKPOINT_ROWS = 50_000

SWEEP_STATES = ("planned", "blocked", "applying", "done", "confirmed", "failed")

# (site, camera, path, start, mtime, size, expires_at) — the shape the scanner hands over in bulk
SegmentRow = tuple[str, str, bytes, float, float, int, float | None]

_SEG_COLS = "id, site, camera, path, start, mtime, size"


def _migration_1(conn: sqlite3.Connection) -> None:
    # (site, camera, start) rather than (site, camera): it answers the per-camera counts of the
    # mass-deletion guard just as well (index prefix) and also the time-range lookups of holds
    # and exports, for one index maintained instead of two.
    for stmt in (
        """CREATE TABLE segments (
            id INTEGER PRIMARY KEY,
            site TEXT NOT NULL,
            camera TEXT NOT NULL,
            path BLOB NOT NULL UNIQUE,
            start REAL NOT NULL,
            mtime REAL NOT NULL,
            size INTEGER NOT NULL,
            expires_at REAL
        )""",
        "CREATE INDEX segments_expires ON segments(expires_at)",
        "CREATE INDEX segments_site_start ON segments(site, start)",
        "CREATE INDEX segments_site_camera ON segments(site, camera, start)",
        # which rules the expires_at column of a site was computed with (SiteRules.digest)
        "CREATE TABLE expiry_rules (site TEXT PRIMARY KEY, digest TEXT NOT NULL)",
        """CREATE TABLE dirs (
            path BLOB PRIMARY KEY,
            site TEXT NOT NULL,
            mtime_ns INTEGER NOT NULL
        )""",
        "CREATE INDEX dirs_site ON dirs(site)",
        """CREATE TABLE holds (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL DEFAULT 'manual',
            site TEXT,
            camera TEXT,
            start REAL NOT NULL,
            "end" REAL NOT NULL,
            until REAL,
            reason TEXT NOT NULL,
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            released REAL,
            released_by TEXT,
            release_reason TEXT,
            request_id INTEGER
        )""",
        "CREATE INDEX holds_open ON holds(released)",
        """CREATE TABLE sweeps (
            id INTEGER PRIMARY KEY,
            started REAL NOT NULL,
            finished REAL,
            state TEXT NOT NULL CHECK (state IN
                ('planned', 'blocked', 'applying', 'done', 'confirmed', 'failed')),
            actor TEXT NOT NULL,
            dry_run INTEGER NOT NULL DEFAULT 0,
            wall REAL NOT NULL,
            boottime REAL NOT NULL,
            boot_id TEXT NOT NULL,
            site_rules_json TEXT NOT NULL DEFAULT '{}',
            deleted INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX sweeps_state ON sweeps(state, id)",
        """CREATE TABLE sweep_items (
            sweep_id INTEGER NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
            path BLOB NOT NULL,
            site TEXT NOT NULL,
            camera TEXT NOT NULL,
            action TEXT NOT NULL,
            reason TEXT NOT NULL
        )""",
        "CREATE INDEX sweep_items_sweep ON sweep_items(sweep_id)",
    ):
        conn.execute(stmt)


def _migration_2(conn: sqlite3.Connection) -> None:
    # how each site's camera/start were read (layout pattern and zone, or mtime mode): a
    # reconcile trusts catalogued rows of unchanged files only while this is unchanged
    conn.execute("CREATE TABLE site_layouts (site TEXT PRIMARY KEY, layout TEXT NOT NULL)")


# Ordered: migration i brings the schema from user_version i-1 to i. Append, never edit.
@contextlib.contextmanager
def write_transaction(
    conn: sqlite3.Connection, lock: threading.RLock | threading.Lock
) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` under ``lock``, or join the transaction already open on
    ``conn`` (then the outer one commits). Every store on the catalog's connection uses this."""
    with lock:
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        if conn.in_transaction:
            conn.commit()


def execute_ddl(conn: sqlite3.Connection, script: str) -> None:
    """Run a DDL script statement by statement inside the caller's transaction
    (``executescript`` would commit it first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            conn.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]}")


def _migration_3(conn: sqlite3.Connection) -> None:
    # the workflow's tables: the audit log, requests and approvals, enrolled media and scans
    # (each module keeps its own DDL; ``IF NOT EXISTS`` throughout, so catalogs that got these
    # tables before they were a numbered migration pass through unchanged)
    from nvr_guard.store import audit, requests
    from nvr_guard.store import media as store

    audit.ensure_schema(conn)
    execute_ddl(conn, requests.SCHEMA)
    execute_ddl(conn, store.SCHEMA)


def _migration_4(conn: sqlite3.Connection) -> None:
    # (site, start) answered "the oldest footage of a site" (disk pressure) and a status line;
    # (site, camera, start) answers both, one camera at a time (Catalog.oldest_segments), and
    # one index less is about half a second less of every cold load of a million segments
    conn.execute("DROP INDEX IF EXISTS segments_site_start")


def _migration_5(conn: sqlite3.Connection) -> None:
    # scans are bound to what the files hold, not only to their names, sizes and mtimes
    from nvr_guard.store import media as store

    store.add_content_column(conn)


def _migration_6(conn: sqlite3.Connection) -> None:
    # holds.roots: the roots (JSON list of paths) of the hold's site when it was placed, so a
    # hold keeps protecting its footage when the site is renamed or the root moves elsewhere.
    # sweeps.trips: the guards that stopped a sweep and what they measured (JSON), so
    # ``retention confirm`` releases exactly what the admin was shown.
    # root_devices: the file system (st_dev) each root was on at the last reconcile, and that
    # file system's mount point; a root on another device now (its mount is gone) is no part of
    # any volume's disk pressure.
    for stmt in (
        "ALTER TABLE holds ADD COLUMN roots TEXT",
        "ALTER TABLE sweeps ADD COLUMN trips TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE root_devices (
            root BLOB PRIMARY KEY,
            site TEXT NOT NULL,
            dev INTEGER NOT NULL,
            mount BLOB NOT NULL,
            seen REAL NOT NULL
        )""",
    ):
        conn.execute(stmt)


def _migration_7(conn: sqlite3.Connection) -> None:
    # which file system each root was on when last walked: a root that now sits on another one
    # (its disk not mounted, another disk in its place) is not walked until it is back or an
    # admin confirms (IF NOT EXISTS: safe to renumber when migrations of branches are merged)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS root_fs (root BLOB PRIMARY KEY, site TEXT NOT NULL, "
        "fs TEXT NOT NULL)"
    )


def _migration_8(conn: sqlite3.Connection) -> None:
    # expires_at was computed from the path time alone; it now needs both the path time and the
    # mtime past ``keep``. The rules are not known here: forgetting which rules each site's
    # column was computed with makes the next ensure_expiry (every reconcile and sweep does one,
    # before reading the column) recompute it. Until then nothing is deleted that was not
    # already due by the old column, and the policy checks both times in any case.
    conn.execute("DELETE FROM expiry_rules")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
]
SCHEMA_VERSION = len(MIGRATIONS)

# secondary indexes of segments, dropped and rebuilt around a bulk load into an empty table
# (building an index from sorted data is several times cheaper than a million B-tree inserts)
_SEGMENT_INDEXES = {
    "segments_expires": "CREATE INDEX segments_expires ON segments(expires_at)",
    "segments_site_camera": "CREATE INDEX segments_site_camera ON segments(site, camera, start)",
}

# the cameras of a site, one index seek each (a skip-scan of segments_site_camera) instead of
# reading every row of the site
_SITE_CAMERAS = """
WITH RECURSIVE cams(camera) AS (
    SELECT min(camera) FROM segments WHERE site = ?1
    UNION ALL
    SELECT (SELECT min(camera) FROM segments WHERE site = ?1 AND camera > cams.camera)
    FROM cams WHERE cams.camera IS NOT NULL
)
SELECT camera FROM cams WHERE camera IS NOT NULL
"""

_INSERT = (
    "INSERT INTO segments (site, camera, path, start, mtime, size, expires_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT = (
    "INSERT INTO segments (site, camera, path, start, mtime, size, expires_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(path) DO UPDATE SET site = excluded.site, camera = excluded.camera, "
    "start = excluded.start, mtime = excluded.mtime, size = excluded.size, "
    "expires_at = excluded.expires_at"
)


# Rows per INSERT statement in bulk: one statement step per row costs about as much as the
# row's B-tree insert itself; with 64 rows a statement (448 parameters) that overhead is
# shared, the load of a million rows is about 0.6 s cheaper (measured).
_CHUNK = 64
_ROW_PARAMS = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_CHUNK = _INSERT.replace(_ROW_PARAMS, ", ".join([_ROW_PARAMS] * _CHUNK))
_UPSERT_CHUNK = _UPSERT.replace(_ROW_PARAMS, ", ".join([_ROW_PARAMS] * _CHUNK))


@dataclass(frozen=True, slots=True)
class PackedRows:
    """Segment rows made ready for :meth:`Catalog.apply_rows`: whole chunks of ``_CHUNK`` rows
    flattened into one parameter tuple each, the remainder as rows. Plain data, so the
    scanner's worker processes do the packing and send the result."""

    chunks: Sequence[tuple[object, ...]]
    rest: list[SegmentRow]

    def __len__(self) -> int:
        return len(self.chunks) * _CHUNK + len(self.rest)


def pack_rows(rows: Sequence[SegmentRow]) -> PackedRows:
    whole = len(rows) - len(rows) % _CHUNK
    flat = itertools.chain.from_iterable
    chunks = [tuple(flat(rows[i : i + _CHUNK])) for i in range(0, whole, _CHUNK)]
    return PackedRows(chunks, list(rows[whole:]))


# ids per DELETE of remove_segments
_ID_CHUNK = 500


class ExpiryCalc:
    """``policy.expiry(start, rules)`` for many starts, fast; with an mtime,
    ``policy.expiry_both(start, mtime, rules)`` (the later of the two expiries).

    Fixed-length durations are a single addition in the policy already. Calendar durations (6mo,
    1y) need a timezone conversion per call (microseconds each: seconds for a million segments),
    so the expiry of each UTC hour is computed once and the starts within it are shifted from it.
    That is only done where it is exact: when the hour's start and end expire exactly one hour
    apart (no DST change or month-end clamp inside the hour); otherwise every start is computed.
    """

    __slots__ = ("rules", "_expiry", "_fixed", "_hours")

    def __init__(self, rules: SiteRules) -> None:
        from nvr_guard.retention import (
            policy,  # local: policy is pure, but catalog must import without it
        )

        self.rules = rules
        self._expiry = policy.expiry
        keep = rules.keep
        self._fixed: float | None = None
        if keep is not None and keep.months == 0:
            self._fixed = float(keep.seconds)
        self._hours: dict[int, float | None] = {}

    def __call__(self, start: float, mtime: float | None = None) -> float | None:
        if self.rules.keep is None:
            return None
        if self._fixed is not None:
            if mtime is not None and mtime > start:
                return mtime + self._fixed
            return start + self._fixed
        a = self._one(start)
        if mtime is None or mtime == start:
            return a
        b = self._one(mtime)
        return a if a > b else b

    def _one(self, start: float) -> float:
        hour = int(start // 3600)
        base = self._hours.get(hour, -1.0)
        if base == -1.0:
            b0 = hour * 3600.0
            e0 = self._expiry(b0, self.rules)
            e1 = self._expiry(b0 + 3600.0, self.rules)
            base = e0 if (e0 is not None and e1 is not None and e1 - e0 == 3600.0) else None
            if len(self._hours) > 200_000:
                self._hours.clear()
            self._hours[hour] = base
        if base is None:
            e = self._expiry(start, self.rules)
            assert e is not None
            return e
        return base + (start - hour * 3600.0)


@dataclass(frozen=True, slots=True)
class SkewReport:
    """A camera whose path times and mtimes disagree (see :meth:`Catalog.clock_skew`)."""

    site: str
    camera: str
    count: int  # segments outside the band
    path: bytes  # the one that disagrees most
    start: float  # its path time
    mtime: float


@dataclass(frozen=True, slots=True)
class SweepRecord:
    id: int
    started: float
    finished: float | None
    state: str
    actor: str
    dry_run: bool
    clock: ClockReading
    site_rules: dict[str, str]
    deleted: int
    bytes: int
    message: str


@dataclass(frozen=True, slots=True)
class SweepItemRecord:
    sweep_id: int
    path: bytes
    site: str
    camera: str
    action: str
    reason: str


def _segment(row: Sequence[Any]) -> Segment:
    rid, site, camera, path, start, mtime, size = row
    return Segment(
        site=str(site),
        camera=str(camera),
        path=bytes(path),
        start=float(start),
        mtime=float(mtime),
        size=int(size),
        id=int(rid),
    )


_HOLD_COLS = 'id, kind, site, camera, start, "end", until, reason, owner, created, released, roots'


def hold_roots_json(roots: Iterable[bytes]) -> str:
    return json.dumps([os.fsdecode(r) for r in roots])


def _hold_roots(text: str | None) -> tuple[bytes, ...]:
    if not text:
        return ()
    return tuple(os.fsencode(str(r)) for r in json.loads(text))


def _hold(row: Sequence[Any]) -> Hold:
    hid, kind, site, camera, start, end, until, reason, owner, created, released, roots = row
    return Hold(
        id=int(hid),
        reason=str(reason),
        owner=str(owner),
        start=float(start),
        end=float(end),
        camera=None if camera is None else str(camera),
        site=None if site is None else str(site),
        until=None if until is None else float(until),
        created=float(created),
        released=None if released is None else float(released),
        kind=str(kind),
        roots=_hold_roots(roots),
    )


def release_memory() -> None:
    """Hand freed heap back to the kernel after a bulk load.

    The index sorter's helper threads and the loaded rows leave ~100 MB of free-but-mapped
    heap behind after a million-row load (glibc keeps it); a daemon that did a cold start would
    otherwise sit above its 120 MB budget until restarted. No-op where there is no malloc_trim.
    """
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """[lo, hi) of the byte strings that start with ``prefix`` (which ends in ``/``)."""
    if not prefix:
        raise ValueError("empty prefix")
    last = prefix[-1]
    if last == 0xFF:
        raise ValueError("prefix ends in 0xff")
    return prefix, prefix[:-1] + bytes([last + 1])


def _dir_prefix(path: bytes) -> bytes:
    return path if path.endswith(b"/") else path + b"/"


def _private_files(path: Path) -> None:
    """The database and its ``-wal``/``-shm`` files not readable by others.

    They hold every request (reason, recipient and contact) and the audit log: nobody but the
    daemon's user (and root) reads them; auditors ask the daemon. The database file is created
    0600 here before SQLite opens it, and SQLite gives the ``-wal`` and ``-shm`` files it creates
    the database file's mode, whatever the umask. Files an older version left world-readable
    (0644) lose the bits for others and group write when their owner opens them again (0640: an
    admin may give the daemon's group read access deliberately).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return  # SQLite says what is wrong with the path when it opens it
    else:
        os.close(fd)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o027:
                os.chmod(p, stat.S_IMODE(st.st_mode) & 0o740)
        except OSError:
            continue


class Catalog:
    """The catalog database. ``Catalog(state_dir / "catalog.db")``."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0, read_only: bool = False) -> None:
        """``read_only``: for readers that must change nothing, not even by opening (`audit
        verify`, `audit show`): no migration, no re-created audit triggers, no pragma that
        writes; the file is opened with SQLite's ``mode=ro``."""
        self.path = Path(path)
        self.lock = threading.RLock()
        self._closed = False
        # audit triggers this open found dropped and re-created (the engine audits that)
        self.restored_triggers: list[str] = []
        if read_only:
            self.conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            return
        if str(path) != ":memory:":
            _private_files(self.path)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so a
        # multi-row change is never split by the module's implicit transaction handling
        self.conn = sqlite3.connect(
            str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False
        )
        c = self.conn
        c.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        # larger pages: fewer B-tree levels and splits for a million rows (measured: the cold
        # load of 1M segments is ~15% cheaper than with 4 KiB); only takes effect on a new file
        c.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot switch the catalog to WAL (got {mode})")
        # NORMAL in WAL: a power loss may lose the last commits but never corrupts; the audit log
        # raises this to FULL around its own appends (acknowledged entries must survive)
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT}")
        # a WAL grown by a bulk load is cut back to this when it next starts over
        c.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        c.execute("PRAGMA foreign_keys = ON")
        c.execute("PRAGMA temp_store = MEMORY")
        self._migrate()

    # -- schema ----------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self.lock:
            current = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: catalog schema version {current} is newer than this "
                    f"nvr-guard understands ({SCHEMA_VERSION}); upgrade nvr-guard"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                with self.transaction():
                    # re-read inside the write lock: another process may have migrated meanwhile
                    now_at = self.conn.execute("PRAGMA user_version").fetchone()[0]
                    if now_at >= version:
                        continue
                    MIGRATIONS[version - 1](self.conn)
                    self.conn.execute(f"PRAGMA user_version = {version}")
            from nvr_guard.store import audit

            # every open re-creates the audit triggers should someone have dropped them (the
            # chain still shows what was done meanwhile); deferred: when they are there this
            # writes nothing, so a CLI opening the catalog does not wait for the daemon's lock
            self.conn.execute("BEGIN")
            try:
                self.restored_triggers = audit.missing_triggers(self.conn)
                audit.ensure_schema(self.conn)
            except BaseException:
                self.conn.rollback()
                raise
            self.conn.commit()

    @property
    def schema_version(self) -> int:
        with self.lock:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), or join the one already open."""
        with write_transaction(self.conn, self.lock) as conn:
            yield conn

    # -- segments --------------------------------------------------------------------------

    def upsert_segments(
        self, segments: Iterable[Segment], rules_by_site: Mapping[str, SiteRules]
    ) -> int:
        """Insert or refresh segments (by path); ``expires_at`` from the site's rules."""
        calcs: dict[str, ExpiryCalc] = {}
        rows: list[SegmentRow] = []
        for s in segments:
            calc = calcs.get(s.site)
            if calc is None:
                rules = rules_by_site.get(s.site)
                if rules is None:
                    raise KeyError(f"no retention rules for site {s.site!r}")
                calc = calcs[s.site] = ExpiryCalc(rules)
            rows.append(
                (s.site, s.camera, s.path, s.start, s.mtime, s.size, calc(s.start, s.mtime))
            )
        with self.transaction():
            # the site's other rows must follow the same rules as these (a rule change)
            for site, calc in calcs.items():
                self._ensure_expiry(site, calc.rules)
            self.apply_rows(rows, ())
        return len(rows)

    def apply_rows(
        self,
        rows: Iterable[SegmentRow] | PackedRows,
        removed: Iterable[bytes],
        *,
        fresh: bool = False,
    ) -> None:
        """Bulk form for the scanner: upsert ready-made rows, delete paths (one transaction).

        ``rows`` may come packed (:func:`pack_rows`, as the scanner's worker processes send
        them): 64 rows a statement. ``fresh``: the paths are known to be new (a load into an
        empty table inside :meth:`bulk_load`); a plain INSERT is a good deal cheaper than the
        upsert.
        """
        with self.transaction() as c:
            if isinstance(rows, PackedRows):
                c.executemany(_INSERT_CHUNK if fresh else _UPSERT_CHUNK, rows.chunks)
                rows = rows.rest
            c.executemany(_INSERT if fresh else _UPSERT, rows)
            c.executemany("DELETE FROM segments WHERE path = ?", ((p,) for p in sorted(removed)))

    @contextlib.contextmanager
    def bulk_load(self) -> Iterator[bool]:
        """A transaction for a large load; yields True when the segments table was empty.

        Into an empty table the secondary indexes are dropped first and built once at the end
        (sorted build instead of a million random inserts: about 1 s saved per million rows).
        Readers never see the table without its indexes: all of it is one transaction.
        """
        try:
            with self.transaction() as c:
                empty = c.execute("SELECT 1 FROM segments LIMIT 1").fetchone() is None
                old_cache = c.execute("PRAGMA cache_size").fetchone()[0]
                c.execute("PRAGMA cache_size = -65536")  # 64 MiB while loading, given back after
                c.execute("PRAGMA threads = 2")  # helper threads for the index sorter
                try:
                    if empty:
                        for name in _SEGMENT_INDEXES:
                            c.execute(f"DROP INDEX IF EXISTS {name}")
                    yield empty
                    if empty:
                        for sql in _SEGMENT_INDEXES.values():
                            c.execute(sql)
                    # a large load: the commit leaves all of it in the WAL, and copying that
                    # into the database file (and syncing it) is left to a thread, see
                    # _checkpoint_in_background; a small one checkpoints as usual
                    deferred = (
                        empty
                        and (c.execute("SELECT max(rowid) FROM segments").fetchone()[0] or 0)
                        >= _DEFER_CHECKPOINT_ROWS
                    )
                    if deferred:
                        c.execute("PRAGMA wal_autocheckpoint = 0")
                finally:
                    c.execute(f"PRAGMA cache_size = {int(old_cache)}")
        except BaseException:
            self._checkpoint_as_usual()  # rolled back: nothing left to checkpoint
            raise
        with self.lock:
            self.conn.execute("PRAGMA shrink_memory")
        release_memory()
        if deferred:
            self._checkpoint_in_background()

    def _checkpoint_in_background(self) -> None:
        """Checkpoint the WAL on a thread with its own connection, then let this connection's
        commits checkpoint again as usual.

        After a bulk load the WAL holds every page of the table (about 200 MB per million
        segments). Left to SQLite, the first commit after it — still inside the reconcile —
        would copy all of that into the database file and fsync it, a second or more of I/O
        the scanner need not wait for. A PASSIVE checkpoint takes no lock that writers or
        readers wait on; if the process ends first, the next one finishes it (WAL recovery is
        part of every open), so nothing is lost either way.
        """

        def run() -> None:
            try:
                conn = sqlite3.connect(str(self.path), timeout=30.0)
                try:
                    conn.execute("PRAGMA busy_timeout = 30000")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                log.warning("catalog checkpoint after a bulk load failed: %s", exc)
            finally:
                self._checkpoint_as_usual()

        threading.Thread(target=run, name="catalog-checkpoint", daemon=True).start()

    def _checkpoint_as_usual(self) -> None:
        """This connection's commits checkpoint the WAL again (off during a large bulk load)."""
        with self.lock:
            if not self._closed:
                self.conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT}")

    def note_rules(self, site: str, rules: SiteRules) -> None:
        """Record that ``site``'s expires_at values were computed with ``rules``."""
        with self.transaction():
            self._note_rules(site, rules)

    def _note_rules(self, site: str, rules: SiteRules) -> None:
        self.conn.execute(
            "INSERT INTO expiry_rules (site, digest) VALUES (?, ?) "
            "ON CONFLICT(site) DO UPDATE SET digest = excluded.digest",
            (site, rules.digest),
        )

    def remove_paths(self, paths: Iterable[bytes]) -> int:
        # in path order: neighbouring rows share B-tree pages in every index, which makes a
        # purge's bulk delete about four times cheaper than in arbitrary order (measured)
        ordered = sorted(set(paths))
        with self.transaction() as c:
            before = c.total_changes
            c.executemany("DELETE FROM segments WHERE path = ?", ((p,) for p in ordered))
            return c.total_changes - before

    def remove_segments(self, segments: Iterable[Segment]) -> int:
        """Forget these segments (a purge deleted their files): by row id where the segment
        came from the catalog — a rowid lookup instead of a search of the path index — and only
        while the row still holds that path (an id freed meanwhile may be reused).

        In chunks of ids: one ``DELETE … WHERE id IN (…)`` opens the table and its indexes
        once for hundreds of rows, where a statement per row opened them each time (a purge of
        144,000 files spent about twice as long here). The path check is a read of the same
        rows just before."""
        by_id: dict[int, bytes] = {}
        by_path: list[bytes] = []
        for s in segments:
            if s.id is None:
                by_path.append(os.fsencode(s.path))
            else:
                by_id[s.id] = os.fsencode(s.path)
        ids = sorted(by_id)
        n = 0
        with self.transaction() as c:
            for i in range(0, len(ids), _ID_CHUNK):
                chunk = ids[i : i + _ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                same = [
                    rid
                    for rid, path in c.execute(
                        f"SELECT id, path FROM segments WHERE id IN ({marks})", chunk
                    )
                    if by_id[rid] == path
                ]
                if same:
                    marks = ",".join("?" * len(same))
                    n += c.execute(f"DELETE FROM segments WHERE id IN ({marks})", same).rowcount
            return n + self.remove_paths(by_path) if by_path else n

    def remove_under(self, directory: bytes) -> int:
        """Forget every segment below ``directory`` (a directory that vanished), and its dirs."""
        lo, hi = prefix_range(_dir_prefix(directory))
        with self.transaction() as c:
            n = c.execute("DELETE FROM segments WHERE path >= ? AND path < ?", (lo, hi)).rowcount
            c.execute(
                "DELETE FROM dirs WHERE path = ? OR (path >= ? AND path < ?)",
                (directory.rstrip(b"/") or b"/", lo, hi),
            )
            return int(n)

    def remove_sites_except(self, sites: Iterable[str]) -> int:
        """Forget segments and dirs of sites no longer configured."""
        keep = sorted(set(sites))
        marks = ",".join("?" * len(keep))
        with self.transaction() as c:
            n = c.execute(f"DELETE FROM segments WHERE site NOT IN ({marks})", keep).rowcount
            c.execute(f"DELETE FROM dirs WHERE site NOT IN ({marks})", keep)
            c.execute(f"DELETE FROM expiry_rules WHERE site NOT IN ({marks})", keep)
            c.execute(f"DELETE FROM site_layouts WHERE site NOT IN ({marks})", keep)
            return int(n)

    def remove_outside(self, site: str, roots: Sequence[bytes]) -> int:
        """Forget a site's segments and dirs that lie under none of its roots (a root removed)."""
        ranges = [prefix_range(_dir_prefix(r)) for r in roots]
        cond = " OR ".join("(path >= ? AND path < ?)" for _ in ranges) or "0"
        args: list[object] = [site]
        for lo, hi in ranges:
            args += [lo, hi]
        root_rows = [r.rstrip(b"/") or b"/" for r in roots]
        with self.transaction() as c:
            n = c.execute(f"DELETE FROM segments WHERE site = ? AND NOT ({cond})", args).rowcount
            marks = ",".join("?" * len(root_rows)) or "NULL"
            c.execute(
                f"DELETE FROM dirs WHERE site = ? AND NOT ({cond}) AND path NOT IN ({marks})",
                args + root_rows,
            )
            return int(n)

    def get(self, path: bytes) -> Segment | None:
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_SEG_COLS} FROM segments WHERE path = ?", (path,)
            ).fetchone()
        return _segment(row) if row else None

    def stats_under(self, directory: bytes) -> dict[bytes, tuple[float, int]]:
        """path -> (mtime, size) of the catalogued segments below ``directory``."""
        lo, hi = prefix_range(_dir_prefix(directory))
        with self.lock:
            cur = self.conn.execute(
                "SELECT path, mtime, size FROM segments WHERE path >= ? AND path < ?", (lo, hi)
            )
            return {p: (m, s) for p, m, s in cur}

    def due_segments(
        self,
        now_wall: float,
        site: str | None,
        rules: SiteRules | Mapping[str, SiteRules],
    ) -> list[Segment]:
        """Candidates for a sweep: segments whose stored expiry is at most ``now`` (+ slack).

        Reads only the due rows, through the ``expires_at`` index. The exact decision (and the
        reasons) are the policy's. A site whose column was computed with other rules (config
        changed) is recomputed first, so a rule change is never missed.
        """
        if isinstance(rules, SiteRules):
            by_site: dict[str, SiteRules] = {rules.site if site is None else site: rules}
        else:
            by_site = dict(rules)
        sites = [site] if site is not None else sorted(by_site)
        out: list[Segment] = []
        for s in sites:
            r = by_site.get(s)
            if r is None:
                continue
            self._ensure_expiry(s, r)
            if r.keep is None:
                continue
            with self.lock:
                cur = self.conn.execute(
                    f"SELECT {_SEG_COLS} FROM segments INDEXED BY segments_expires "
                    "WHERE expires_at <= ? AND site = ? ORDER BY camera, start, path",
                    (now_wall + EXPIRY_SLACK, s),
                )
                out.extend(_segment(row) for row in cur)
        return self.estimate_starts(out)

    def next_expiry(self, site: str | None = None) -> float | None:
        """The earliest stored expiry (of a site): when the next sweep will have work."""
        with self.lock:
            if site is None:
                row = self.conn.execute("SELECT min(expires_at) FROM segments").fetchone()
            else:
                row = self.conn.execute(
                    "SELECT min(expires_at) FROM segments WHERE site = ?", (site,)
                ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def layout_key(self, site: str) -> str | None:
        with self.lock:
            row = self.conn.execute(
                "SELECT layout FROM site_layouts WHERE site = ?", (site,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_layout_key(self, site: str, key: str) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO site_layouts (site, layout) VALUES (?, ?) "
                "ON CONFLICT(site) DO UPDATE SET layout = excluded.layout",
                (site, key),
            )

    def root_fs(self, root: bytes) -> str | None:
        """Which directory ``root`` was when last walked (nvr_guard.mounts.dir_identity; a record
        of an older version holds only the file system: nvr_guard.mounts.fs_identity)."""
        with self.lock:
            row = self.conn.execute("SELECT fs FROM root_fs WHERE root = ?", (root,)).fetchone()
        return None if row is None else str(row[0])

    def set_root_fs(self, root: bytes, site: str, fs: str) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO root_fs (root, site, fs) VALUES (?, ?, ?) "
                "ON CONFLICT(root) DO UPDATE SET site = excluded.site, fs = excluded.fs",
                (root, site, fs),
            )

    def root_fs_all(self) -> dict[bytes, str]:
        """:meth:`root_fs` of every recorded root."""
        with self.lock:
            rows = self.conn.execute("SELECT root, fs FROM root_fs").fetchall()
        return {bytes(r): str(f) for r, f in rows}

    def forget_root_fs_except(self, roots: Iterable[bytes]) -> None:
        """Forget the file systems of roots no longer configured."""
        keep = sorted(set(roots))
        marks = ",".join("?" * len(keep)) or "NULL"
        with self.transaction() as c:
            c.execute(f"DELETE FROM root_fs WHERE root NOT IN ({marks})", keep)

    def ensure_expiry(self, site: str, rules: SiteRules) -> None:
        """Make the site's stored expiries follow ``rules`` (recomputed if they changed)."""
        self._ensure_expiry(site, rules)

    def _ensure_expiry(self, site: str, rules: SiteRules) -> None:
        with self.lock:
            row = self.conn.execute(
                "SELECT digest FROM expiry_rules WHERE site = ?", (site,)
            ).fetchone()
        if row is None or row[0] != rules.digest:
            has_rows = self.count_upto(site, 1) > 0
            if has_rows or row is not None:
                self.recompute_expiry(site, rules)
            else:
                self.note_rules(site, rules)

    def recompute_expiry(self, site: str, rules: SiteRules) -> int:
        """Refill ``expires_at`` of a site after its rules changed (config reload)."""
        keep = rules.keep
        with self.transaction() as c:
            if keep is None or keep.months == 0:
                # no calendar arithmetic: one statement (a million rows in about a second,
                # where reading them out and back row by row takes several)
                n = c.execute(
                    "UPDATE segments SET expires_at = max(start, mtime) + ? WHERE site = ?",
                    (None if keep is None else float(keep.seconds), site),
                ).rowcount
            else:
                calc = ExpiryCalc(rules)
                rows = c.execute(
                    "SELECT id, start, mtime FROM segments WHERE site = ?", (site,)
                ).fetchall()
                c.executemany(
                    "UPDATE segments SET expires_at = ? WHERE id = ?",
                    ((calc(start, mtime), rid) for rid, start, mtime in rows),
                )
                n = len(rows)
            self._note_rules(site, rules)
        return int(n)

    def oldest_segments(
        self,
        site: str,
        limit: int,
        under: Sequence[bytes] | None = None,
        not_under: Mapping[bytes, Sequence[bytes]] | None = None,
    ) -> list[Segment]:
        """The ``limit`` oldest segments of a site (by start, then path): each camera's rows
        in index order, merged, so only about ``limit`` rows are read however large the site.
        ``under``: only those below one of these roots (the site's roots on one volume);
        ``not_under``: per such root, directories below it whose rows do not count for it (file
        systems mounted inside the root, which are other volumes)."""
        cond = ""
        extra: list[Any] = []
        if under is not None:
            terms: list[str] = []
            for r in under:
                term = "(path >= ? AND path < ?"
                extra.extend(prefix_range(_dir_prefix(r)))
                for o in (not_under or {}).get(r, ()):
                    term += " AND NOT (path >= ? AND path < ?)"
                    extra.extend(prefix_range(_dir_prefix(o)))
                terms.append(term + ")")
            cond = " AND (" + (" OR ".join(terms) or "0") + ")"
        with self.lock:
            cursors = [
                self.conn.execute(
                    f"SELECT {_SEG_COLS} FROM segments INDEXED BY segments_site_camera "
                    f"WHERE site = ? AND camera = ?{cond} ORDER BY start, path",
                    (site, camera, *extra),
                )
                for (camera,) in self.conn.execute(_SITE_CAMERAS, (site,)).fetchall()
            ]
            merged = heapq.merge(*cursors, key=lambda r: (r[4], r[3]))
            out = [_segment(r) for r in itertools.islice(merged, max(int(limit), 0))]
            for cur in cursors:
                cur.close()
            return self.estimate_starts(out)

    def camera_totals(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Segment counts of the given (site, camera) pairs (the mass-deletion guard's base)."""
        out: dict[tuple[str, str], int] = {}
        with self.lock:
            for site, camera in set(keys):
                row = self.conn.execute(
                    "SELECT count(*) FROM segments WHERE site = ? AND camera = ?", (site, camera)
                ).fetchone()
                out[(site, camera)] = int(row[0])
        return out

    def count(self, site: str | None = None) -> int:
        with self.lock:
            if site is None:
                row = self.conn.execute("SELECT count(*) FROM segments").fetchone()
            else:
                row = self.conn.execute(
                    "SELECT count(*) FROM segments WHERE site = ?", (site,)
                ).fetchone()
        return int(row[0])

    def count_upto(self, site: str, limit: int) -> int:
        """``min(count(site), limit)`` without counting a million rows to learn "many"."""
        with self.lock:
            row = self.conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM segments WHERE site = ? LIMIT ?)",
                (site, int(limit)),
            ).fetchone()
        return int(row[0])

    def bytes_by_site(self) -> dict[str, int]:
        with self.lock:
            cur = self.conn.execute("SELECT site, sum(size) FROM segments GROUP BY site")
            return {str(s): int(b or 0) for s, b in cur}

    def has_camera(self, site: str, camera: str) -> bool:
        """Whether the site has footage of the camera (one index seek)."""
        with self.lock:
            row = self.conn.execute(
                "SELECT 1 FROM segments WHERE site = ? AND camera = ? LIMIT 1", (site, camera)
            ).fetchone()
        return row is not None

    def root_devices(self) -> dict[bytes, tuple[int, bytes]]:
        """root -> (st_dev, mount point of that file system) recorded at a reconcile."""
        with self.lock:
            cur = self.conn.execute("SELECT root, dev, mount FROM root_devices")
            return {bytes(r): (int(d), bytes(m)) for r, d, m in cur}

    def set_root_devices(self, rows: Iterable[tuple[bytes, str, int, bytes]], seen: float) -> None:
        """(root, site, st_dev, mount point) rows."""
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO root_devices (root, site, dev, mount, seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(root) DO UPDATE SET site = excluded.site, dev = excluded.dev, "
                "mount = excluded.mount, seen = excluded.seen",
                ((r, s, d, m, seen) for r, s, d, m in rows),
            )

    def forget_root_devices_except(self, roots: Iterable[bytes]) -> None:
        keep = sorted(set(roots))
        marks = ",".join("?" * len(keep)) or "NULL"
        with self.transaction() as c:
            c.execute(f"DELETE FROM root_devices WHERE root NOT IN ({marks})", keep)

    def cameras(self, site: str | None = None) -> list[tuple[str, str]]:
        """(site, camera) pairs present in the catalog."""
        with self.lock:
            if site is None:
                cur = self.conn.execute("SELECT DISTINCT site, camera FROM segments ORDER BY 1, 2")
            else:
                cur = self.conn.execute(
                    "SELECT DISTINCT site, camera FROM segments WHERE site = ? ORDER BY 2", (site,)
                )
            return [(str(s), str(c)) for s, c in cur]

    def segments_of(
        self, site: str | None, camera: str | None, start: float, end: float
    ) -> list[Segment]:
        """Segments whose footage overlaps [start, end) — the same test as ``Hold.covers``, on
        the same estimated starts (:meth:`estimate_starts`).

        A file timed by its mtime alone is catalogued at its end; the one that ends first after
        ``end`` started before ``end`` as far as anyone knows (at the end of its predecessor), so
        it is part of the range too: a request over the middle of a one-hour file gets that
        file."""
        conds = ["start < ?", "max(mtime, start) >= ?"]
        args: list[object] = [end, start]
        if site is not None:
            conds.insert(0, "site = ?")
            args.insert(0, site)
            if camera is not None:
                conds.insert(1, "camera = ?")
                args.insert(1, camera)
        elif camera is not None:
            conds.append("camera = ?")
            args.append(camera)
        with self.lock:
            cur = self.conn.execute(
                f"SELECT {_SEG_COLS} FROM segments WHERE {' AND '.join(conds)} "
                "ORDER BY site, camera, start, path",
                args,
            )
            out = [_segment(r) for r in cur]
            if camera is not None and site is not None:
                scope = [(site, camera)]
            elif site is not None:
                scope = [(site, str(c)) for (c,) in self.conn.execute(_SITE_CAMERAS, (site,))]
            else:
                scope = [sc for sc in self.cameras() if camera is None or sc[1] == camera]
            have = {s.path for s in out}
            for s_, c_ in scope:
                row = self.conn.execute(
                    f"SELECT {_SEG_COLS} FROM segments INDEXED BY segments_site_camera "
                    "WHERE site = ? AND camera = ? AND start >= ? ORDER BY start, path LIMIT 1",
                    (s_, c_, end),
                ).fetchone()
                # only a file without a path time (start == mtime): a path-timed one starting
                # at or after ``end`` holds nothing of the range
                if row is not None and row[4] == row[5] and bytes(row[3]) not in have:
                    out.append(_segment(row))
            out.sort(key=lambda g: (g.site, g.camera, g.start, g.path))
            return self.estimate_starts(out)

    def estimate_starts(self, segments: list[Segment]) -> list[Segment]:
        """The same segments, those timed by their mtime alone with an estimated start.

        A site without ``layout`` has only the mtime of each file: its end. Its start is taken
        as early as the catalog allows, so that everything that may hold footage of a time is
        found by it (holds, requests, exports): the end of the camera's previous segment; for a
        camera's oldest segment, its end minus the longest segment seen on that camera (the
        largest distance between consecutive ends among these segments and the one after
        them); when the camera has no other segment at all, it may hold anything before its
        end (start 0). Such a file is recognised by ``start == mtime``; a path time that happens
        to equal the mtime gets an earlier start too, which only ever holds more.

        Cheap: one index seek per camera (the previous end), another for a camera's oldest
        segment; the rest comes from the list itself (the catalog hands them out in time order).
        """
        groups: dict[tuple[str, str], list[int]] = {}
        for i, g in enumerate(segments):
            if g.start == g.mtime:
                groups.setdefault((g.site, g.camera), []).append(i)
        if not groups:
            return segments
        out = list(segments)
        with self.lock:
            for (site, camera), idx in groups.items():
                idx.sort(key=lambda i: (segments[i].mtime, segments[i].path))
                ends = [segments[i].mtime for i in idx]
                # the previous segment's end: for a row without path time its start is its
                # mtime, so the (site, camera, start) index answers it in one seek; a path-timed
                # neighbour gives its start, earlier than its end (holds more, never less)
                row = self.conn.execute(
                    "SELECT max(start) FROM segments WHERE site = ? AND camera = ? AND start < ?",
                    (site, camera, ends[0]),
                ).fetchone()
                prev: float | None = None if row is None or row[0] is None else float(row[0])
                longest = max((b - a for a, b in zip(ends, ends[1:], strict=False)), default=0.0)
                if prev is None:
                    row = self.conn.execute(
                        "SELECT min(start) FROM segments WHERE site = ? AND camera = ? "
                        "AND start > ?",
                        (site, camera, ends[-1]),
                    ).fetchone()
                    if row is not None and row[0] is not None:
                        longest = max(longest, float(row[0]) - ends[-1])
                for i, e in zip(idx, ends, strict=True):
                    g = segments[i]
                    if prev is not None:
                        est = prev
                    elif longest > 0:
                        est = e - longest
                    else:
                        est = 0.0
                    out[i] = Segment(g.site, g.camera, g.path, est, g.mtime, g.size, g.id)
                    if prev is None or e > prev:
                        prev = e  # the next one starts after this one ended (not before)
        return out

    def clock_skew(self, tolerance: float) -> list[SkewReport]:
        """Cameras whose path times and mtimes disagree beyond ``model.skew_band``: per (site,
        camera) the number of such segments and the one that disagrees most.

        One pass over the table (0.3-0.4 s for a million segments, measured, cold cache
        included), so it runs with the full reconcile (at start and hourly), never with a
        sweep. Files timed by their mtime alone (``start == mtime``) have
        no path time to disagree with.
        """
        lo, hi = skew_band(0.0, tolerance)
        with self.lock:
            cur = self.conn.execute(
                # bare columns next to max(): SQLite takes them from the row with the maximum
                "SELECT site, camera, count(*), path, start, mtime, max(abs(mtime - start)) "
                "FROM segments NOT INDEXED "
                "WHERE start != mtime AND (mtime < start + ? OR mtime > start + ?) "
                "GROUP BY site, camera ORDER BY site, camera",
                (lo, hi),
            )
            return [
                SkewReport(str(si), str(ca), int(n), bytes(p), float(st), float(mt))
                for si, ca, n, p, st, mt, _ in cur
            ]

    # -- directories (incremental reconcile) -----------------------------------------------

    def dirs_of(self, site: str) -> dict[bytes, int]:
        with self.lock:
            cur = self.conn.execute("SELECT path, mtime_ns FROM dirs WHERE site = ?", (site,))
            return {bytes(p): int(m) for p, m in cur}

    def set_dirs(self, site: str, items: Iterable[tuple[bytes, int]]) -> None:
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO dirs (path, site, mtime_ns) VALUES (?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET site = excluded.site, "
                "mtime_ns = excluded.mtime_ns",
                ((p, site, m) for p, m in items),
            )

    def remove_dirs(self, paths: Iterable[bytes]) -> None:
        with self.transaction() as c:
            c.executemany("DELETE FROM dirs WHERE path = ?", ((p,) for p in paths))

    # -- holds -----------------------------------------------------------------------------

    def add_hold(
        self,
        *,
        start: float,
        end: float,
        reason: str,
        owner: str,
        created: float,
        kind: str = "manual",
        site: str | None = None,
        camera: str | None = None,
        until: float | None = None,
        request_id: int | None = None,
        roots: Sequence[bytes] | None = None,
    ) -> Hold:
        if not end > start:
            raise InvalidInput("a hold needs an end after its start")
        if not reason.strip():
            raise InvalidInput("a hold needs a reason")
        with self.transaction() as c:
            cur = c.execute(
                'INSERT INTO holds (kind, site, camera, start, "end", until, reason, owner, '
                "created, request_id, roots) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    site,
                    camera,
                    start,
                    end,
                    until,
                    reason,
                    owner,
                    created,
                    request_id,
                    None if roots is None else hold_roots_json(roots),
                ),
            )
            hid = int(cur.lastrowid or 0)
        hold = self.get_hold(hid)
        assert hold is not None
        return hold

    def get_hold(self, hold_id: int) -> Hold | None:
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_HOLD_COLS} FROM holds WHERE id = ?", (hold_id,)
            ).fetchone()
        return _hold(row) if row else None

    def release_hold(self, hold_id: int, by: str, reason: str, now: float | None = None) -> Hold:
        when = time.time() if now is None else now
        with self.transaction() as c:
            row = c.execute("SELECT released FROM holds WHERE id = ?", (hold_id,)).fetchone()
            if row is None:
                raise InvalidInput(f"hold {hold_id} does not exist; see `nvr-guard hold list`")
            if row[0] is not None:
                raise InvalidInput(f"hold {hold_id} is already released")
            c.execute(
                "UPDATE holds SET released = ?, released_by = ?, release_reason = ? WHERE id = ?",
                (when, by, reason, hold_id),
            )
        hold = self.get_hold(hold_id)
        assert hold is not None
        return hold

    def active_holds(self, now: float) -> list[Hold]:
        with self.lock:
            cur = self.conn.execute(
                f"SELECT {_HOLD_COLS} FROM holds WHERE released IS NULL "
                "AND (until IS NULL OR until > ?) ORDER BY id",
                (now,),
            )
            return [_hold(r) for r in cur]

    def hold_requests(self) -> dict[int, int | None]:
        """Hold id -> the request it keeps footage for, for every hold that is not manual (None:
        a request hold that does not name its request)."""
        with self.lock:
            cur = self.conn.execute("SELECT id, request_id FROM holds WHERE kind != 'manual'")
            return {int(h): None if r is None else int(r) for h, r in cur}

    def list_holds(self, include_released: bool = False) -> list[Hold]:
        where = "" if include_released else "WHERE released IS NULL"
        with self.lock:
            cur = self.conn.execute(f"SELECT {_HOLD_COLS} FROM holds {where} ORDER BY id")
            return [_hold(r) for r in cur]

    def fill_hold_roots(self, roots_by_site: Mapping[str, Sequence[bytes]]) -> int:
        """Give unreleased holds that do not name their roots yet (placed by the workflow, or
        before holds recorded them) the roots their site has now."""
        with self.lock:
            missing = self.conn.execute(
                "SELECT 1 FROM holds WHERE roots IS NULL AND released IS NULL LIMIT 1"
            ).fetchone()
        if missing is None:
            return 0  # the usual case: no write transaction for nothing
        n = 0
        with self.transaction() as c:
            for site, roots in roots_by_site.items():
                n += c.execute(
                    "UPDATE holds SET roots = ? WHERE roots IS NULL AND site = ? "
                    "AND released IS NULL",
                    (hold_roots_json(roots), site),
                ).rowcount
        return n

    def hold_release_info(self, hold_id: int) -> tuple[str | None, str | None]:
        """(released_by, release_reason) of a hold."""
        with self.lock:
            row = self.conn.execute(
                "SELECT released_by, release_reason FROM holds WHERE id = ?", (hold_id,)
            ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    # -- sweeps ----------------------------------------------------------------------------

    def begin_sweep(
        self,
        *,
        started: float,
        actor: str,
        clock: ClockReading,
        site_rules: Mapping[str, str],
        dry_run: bool = False,
        state: str = "planned",
        message: str = "",
    ) -> int:
        _check_state(state)
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO sweeps (started, state, actor, dry_run, wall, boottime, boot_id, "
                "site_rules_json, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    started,
                    state,
                    actor,
                    int(dry_run),
                    clock.wall,
                    clock.boottime,
                    clock.boot_id,
                    json.dumps(dict(site_rules), sort_keys=True),
                    message,
                ),
            )
            return int(cur.lastrowid or 0)

    def record_items(self, sweep_id: int, items: Iterable[Item]) -> int:
        rows = [
            (sweep_id, i.segment.path, i.segment.site, i.segment.camera, i.action.value, i.reason)
            for i in items
        ]
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO sweep_items (sweep_id, path, site, camera, action, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def set_sweep_state(
        self,
        sweep_id: int,
        state: str,
        *,
        finished: float | None = None,
        deleted: int | None = None,
        bytes_: int | None = None,
        message: str | None = None,
    ) -> None:
        _check_state(state)
        sets, args = ["state = ?"], [state]
        for col, val in (
            ("finished", finished),
            ("deleted", deleted),
            ("bytes", bytes_),
            ("message", message),
        ):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)  # type: ignore[arg-type]
        with self.transaction() as c:
            n = c.execute(
                f"UPDATE sweeps SET {', '.join(sets)} WHERE id = ?", [*args, sweep_id]
            ).rowcount
            if n == 0:
                raise InvalidInput(f"sweep {sweep_id} does not exist")

    def set_sweep_trips(self, sweep_id: int, trips: Sequence[Mapping[str, Any]]) -> None:
        """What stopped the sweep (guard kind, site, camera, measured value): what a
        confirmation of it may release."""
        with self.transaction() as c:
            c.execute(
                "UPDATE sweeps SET trips = ? WHERE id = ?",
                (json.dumps(list(map(dict, trips)), sort_keys=True), sweep_id),
            )

    def sweep_trips(self, sweep_id: int) -> list[dict[str, Any]]:
        with self.lock:
            row = self.conn.execute("SELECT trips FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        return [] if row is None else list(json.loads(row[0] or "[]"))

    def get_sweep(self, sweep_id: int) -> SweepRecord | None:
        with self.lock:
            row = self.conn.execute(
                "SELECT id, started, finished, state, actor, dry_run, wall, boottime, boot_id, "
                "site_rules_json, deleted, bytes, message FROM sweeps WHERE id = ?",
                (sweep_id,),
            ).fetchone()
        if row is None:
            return None
        (
            sid,
            started,
            finished,
            state,
            actor,
            dry,
            wall,
            boot,
            boot_id,
            rules,
            deleted,
            nbytes,
            message,
        ) = row
        return SweepRecord(
            id=int(sid),
            started=float(started),
            finished=None if finished is None else float(finished),
            state=str(state),
            actor=str(actor),
            dry_run=bool(dry),
            clock=ClockReading(float(wall), float(boot), str(boot_id)),
            site_rules=dict(json.loads(rules or "{}")),
            deleted=int(deleted),
            bytes=int(nbytes),
            message=str(message),
        )

    def latest_sweep(self, states: Sequence[str] | None = None) -> SweepRecord | None:
        with self.lock:
            if states:
                marks = ",".join("?" * len(states))
                row = self.conn.execute(
                    f"SELECT max(id) FROM sweeps WHERE state IN ({marks})", list(states)
                ).fetchone()
            else:
                row = self.conn.execute("SELECT max(id) FROM sweeps").fetchone()
        return None if row is None or row[0] is None else self.get_sweep(int(row[0]))

    def sweep_items(self, sweep_id: int) -> list[SweepItemRecord]:
        with self.lock:
            cur = self.conn.execute(
                "SELECT sweep_id, path, site, camera, action, reason FROM sweep_items "
                "WHERE sweep_id = ? ORDER BY rowid",
                (sweep_id,),
            )
            return [
                SweepItemRecord(int(a), bytes(p), str(s), str(c), str(act), str(r))
                for a, p, s, c, act, r in cur
            ]

    def last_history(self) -> SweepHistory:
        """What the last applied sweep (done or confirmed) left: feeds the policy's guards."""
        rec = self.latest_sweep(("done", "confirmed"))
        if rec is None:
            return SweepHistory()
        return SweepHistory(
            last_wall=rec.clock.wall,
            last_boottime=rec.clock.boottime,
            boot_id=rec.clock.boot_id,
            site_rules=rec.site_rules,
        )


def read_active_holds(path: Path | str, now: float) -> list[Hold] | None:
    """The active holds of a catalog, read without writing anything (``config check`` as any
    user who may read the state); None when there is no readable catalog."""
    if not os.access(path, os.R_OK):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(holds)")}
        if not cols:
            return None
        # a catalog from before holds kept their roots reads as holds without roots
        sel = _HOLD_COLS if "roots" in cols else _HOLD_COLS.replace(", roots", ", NULL")
        cur = conn.execute(
            f"SELECT {sel} FROM holds WHERE released IS NULL "
            "AND (until IS NULL OR until > ?) ORDER BY id",
            (now,),
        )
        return [_hold(r) for r in cur]
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _check_state(state: str) -> None:
    if state not in SWEEP_STATES:
        raise ValueError(f"unknown sweep state {state!r}; one of {', '.join(SWEEP_STATES)}")
