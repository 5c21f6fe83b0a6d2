"""Segments: the recordings on disk as the catalog knows them, and their expiry index.

Why ``expires_at`` is stored: a sweep must not walk the tree nor read a million rows to find the
few that are due (a sweep with nothing due must cost at most 1/100 of a ``find``). The column holds
``policy.expiry_both(start, mtime, rules)`` (past the ceiling by both times) and is indexed; a
sweep reads the rows with ``expires_at`` up to ``now`` (plus a small slack) and the policy makes
the exact decision. When a site's rules change, the column is recomputed
(:meth:`SegmentStore.recompute_expiry`; also done automatically when
:meth:`SegmentStore.due_segments` sees rules it did not compute the column with).

The expiry of a segment is a retention rule, not storage: the catalog is given the calculator
(``Catalog(path, expiry=retention.expiry.ExpiryCalc)``) instead of importing it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nvr_guard.model import Segment, SiteRules, skew_band
from nvr_guard.store.db import AUTOCHECKPOINT, Database, changes_segments
from nvr_guard.store.schema import (
    SEGMENT_INDEXES,
    create_segment_indexes,
    drop_segment_indexes,
)
from nvr_guard.workers import libc_function

log = logging.getLogger(__name__)

__all__ = [
    "EXPIRY_SLACK",
    "Expiry",
    "ExpiryFactory",
    "KnownRow",
    "PackedRows",
    "SegmentRow",
    "SegmentStore",
    "SkewReport",
    "pack_rows",
    "prefix_range",
    "read_rows_between",
    "release_memory",
]


# Rows whose stored expiry is at most this far in the future are handed to the policy as
# candidates. It covers the float rounding of the memoised calendar expiry (ExpiryCalc); the
# policy decides exactly, so a candidate that is not due yet is simply not deleted.
EXPIRY_SLACK = 1.0

# a bulk load of at least this many rows is checkpointed on a thread of its own (about 10 MB
# of WAL; a smaller one costs its commit no more than an ordinary batch)
_DEFER_CHECKPOINT_ROWS = 50_000

# (site, camera, path, start, mtime, size, expires_at, end) — the shape the scanner hands over in
# bulk; end: the end the path carries, None when it carries none
SegmentRow = tuple[str, str, bytes, float, float, int, float | None, float | None]

_SEG_COLS = 'id, site, camera, path, start, mtime, size, "end"'

# path -> (site, camera, start, mtime, size, end): what the scanner compares the disk with
KnownRow = tuple[str, str, float, float, int, float | None]


class Expiry(Protocol):
    """When a segment expires under one site's rules: ``expiry(start)`` by the path time,
    ``expiry(start, mtime)`` past the ceiling by both (None: kept forever); with ``camera``,
    under that camera's own rule where it has one."""

    def __call__(
        self, start: float, mtime: float | None = None, camera: str | None = None
    ) -> float | None: ...


# the calculator for a site's rules (``retention.expiry.ExpiryCalc``)
ExpiryFactory = Callable[[SiteRules], Expiry]

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
    'INSERT INTO segments (site, camera, path, start, mtime, size, expires_at, "end") '
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT = (
    'INSERT INTO segments (site, camera, path, start, mtime, size, expires_at, "end") '
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(path) DO UPDATE SET site = excluded.site, camera = excluded.camera, "
    "start = excluded.start, mtime = excluded.mtime, size = excluded.size, "
    'expires_at = excluded.expires_at, "end" = excluded."end"'
)


# Rows per INSERT statement in bulk: one statement step per row costs about as much as the
# row's B-tree insert itself; with 64 rows a statement (448 parameters) that overhead is
# shared, the load of a million rows is about 0.6 s cheaper (measured).
_CHUNK = 64
_ROW_PARAMS = "(?, ?, ?, ?, ?, ?, ?, ?)"
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
    """Pack rows for :meth:`SegmentStore.apply_rows` (see :class:`PackedRows`)."""
    whole = len(rows) - len(rows) % _CHUNK
    flat = itertools.chain.from_iterable
    chunks = [tuple(flat(rows[i : i + _CHUNK])) for i in range(0, whole, _CHUNK)]
    return PackedRows(chunks, list(rows[whole:]))


# rows of a site from which recompute_expiry builds the expiry index again (see there)
_REBUILD_MIN = 100_000

# ids per DELETE of remove_segments
_ID_CHUNK = 500


@dataclass(frozen=True, slots=True)
class SkewReport:
    """A camera whose path times and mtimes disagree (see :meth:`Catalog.clock_skew`)."""

    site: str
    camera: str
    count: int  # segments outside the band
    path: bytes  # the one that disagrees most
    start: float  # its path time
    mtime: float


def _segment(row: Sequence[Any]) -> Segment:
    rid, site, camera, path, start, mtime, size, end = row
    return Segment(
        # one string object per name (sys.intern), not one per row: a backlog of a hundred
        # thousand segments names a few dozen sites and cameras
        site=sys.intern(str(site)),
        camera=sys.intern(str(camera)),
        path=bytes(path),
        start=float(start),
        mtime=float(mtime),
        size=int(size),
        id=int(rid),
        path_end=None if end is None else float(end),
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


def read_rows_between(db: Path | str, lo: bytes, hi: bytes) -> dict[bytes, KnownRow]:
    """The rows with ``lo <= path < hi`` of a catalog file, read through a read-only connection
    of their own (the scanner's worker processes, which must not share the daemon's)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return _read_rows(conn, lo, hi)
    finally:
        conn.close()


def _read_rows(conn: sqlite3.Connection, lo: bytes, hi: bytes) -> dict[bytes, KnownRow]:
    cur = conn.execute(
        'SELECT path, site, camera, start, mtime, size, "end" FROM segments '
        "WHERE path >= ? AND path < ?",
        (lo, hi),
    )
    return {p: (s, c, st, m, z, e) for p, s, c, st, m, z, e in cur}


class SegmentStore(Database):
    """The ``segments`` and ``expiry_rules`` tables (a mixin of ``Catalog``)."""

    # the expiry calculator the catalog was opened with (None: expiries cannot be computed)
    expiry: ExpiryFactory | None = None
    # threads checkpointing the WAL after a bulk load (close waits for them)
    _checkpointers: list[threading.Thread] = []  # noqa: RUF012 - replaced, never mutated

    def _expiry_factory(self) -> ExpiryFactory:
        # checked by every method that writes expiries, whatever the rules, so that a catalog
        # opened without the calculator fails the same way with fixed and calendar rules
        if self.expiry is None:
            raise RuntimeError(
                f"{self.path}: catalog opened without an expiry calculator; "
                "open it as Catalog(path, expiry=ExpiryCalc) to compute expiries"
            )
        return self.expiry

    def upsert_segments(
        self, segments: Iterable[Segment], rules_by_site: Mapping[str, SiteRules]
    ) -> int:
        """Insert or refresh segments (by path); ``expires_at`` from the site's rules."""
        calcs: dict[str, tuple[SiteRules, Expiry]] = {}
        rows: list[SegmentRow] = []
        for s in segments:
            known = calcs.get(s.site)
            if known is None:
                rules = rules_by_site.get(s.site)
                if rules is None:
                    raise KeyError(f"no retention rules for site {s.site!r}")
                known = calcs[s.site] = (rules, self._expiry_factory()(rules))
            calc = known[1]
            rows.append(
                (
                    s.site,
                    s.camera,
                    s.path,
                    s.start,
                    s.mtime,
                    s.size,
                    calc(s.start, s.mtime, s.camera),
                    s.path_end,
                )
            )
        with self.transaction():
            # the site's other rows must follow the same rules as these (a rule change)
            for site, (rules, _) in calcs.items():
                self._ensure_expiry(site, rules)
            self.apply_rows(rows, ())
        return len(rows)

    @changes_segments
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
                c.execute("PRAGMA cache_size = -24576")  # 24 MiB while loading, given back after
                c.execute("PRAGMA threads = 2")  # helper threads for the index sorter
                # the index builds at the end sort a million keys: in temporary files, not in
                # memory (the connection's temp_store), or they alone take 100 MB
                c.execute("PRAGMA temp_store = FILE")
                try:
                    if empty:
                        drop_segment_indexes(c)
                    yield empty
                    if empty:
                        # the sorter takes up to the cache's size in memory per thread: less
                        # of it for the builds (they spill to temporary files instead)
                        c.execute("PRAGMA cache_size = -8192")
                        c.execute("PRAGMA shrink_memory")
                        release_memory()
                        create_segment_indexes(c)
                    # a large load: the commit leaves all of it in the WAL, and copying that
                    # into the database file (and syncing it) is left to a thread, see
                    # _checkpoint_in_background; a small one checkpoints as usual
                    deferred = (
                        not self.scratch  # a scratch copy is never synced nor kept
                        and empty
                        and (c.execute("SELECT max(rowid) FROM segments").fetchone()[0] or 0)
                        >= _DEFER_CHECKPOINT_ROWS
                    )
                    if deferred:
                        c.execute("PRAGMA wal_autocheckpoint = 0")
                finally:
                    c.execute(f"PRAGMA cache_size = {int(old_cache)}")
                    c.execute("PRAGMA temp_store = MEMORY")
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

        t = threading.Thread(target=run, name="catalog-checkpoint", daemon=True)
        self._checkpointers = [*(x for x in self._checkpointers if x.is_alive()), t]
        t.start()

    def close(self) -> None:
        """Wait for a background checkpoint still running, then close the connection.

        The checkpoint's own connection must be gone first: SQLite's last connection to close
        removes the ``-wal`` file by name, which would take away the WAL of a database that
        replaced this one at the same path (a test's or the bench's fresh catalog)."""
        for t in self._checkpointers:
            t.join(timeout=120)  # bounded: it takes the catalog's lock at its very end
        super().close()

    def _checkpoint_as_usual(self) -> None:
        """This connection's commits checkpoint the WAL again (off during a large bulk load)."""
        with self.lock:
            if not self._closed:
                self.conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT}")

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

    @changes_segments
    def remove_paths(self, paths: Iterable[bytes]) -> int:
        # in path order: neighbouring rows share B-tree pages in every index, which makes a
        # purge's bulk delete about four times cheaper than in arbitrary order (measured)
        """Forget the segments of these paths; returns how many rows went."""
        ordered = sorted(set(paths))
        with self.transaction() as c:
            before = c.total_changes
            c.executemany("DELETE FROM segments WHERE path = ?", ((p,) for p in ordered))
            return c.total_changes - before

    @changes_segments
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

    @changes_segments
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

    @changes_segments
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

    @changes_segments
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
        """The segment catalogued at ``path``, or None."""
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
            if r.keep is None and not any(c.keep is not None for c in r.cameras):
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

    @changes_segments
    def recompute_expiry(self, site: str, rules: SiteRules) -> int:
        """Refill ``expires_at`` of a site after its rules changed (config reload); a camera
        with a rule of its own (``cameras.<id>``) under that rule."""
        factory = self._expiry_factory()
        own = [c.camera for c in rules.cameras]
        # (extra WHERE terms, their arguments, the rules of those rows)
        groups: list[tuple[str, list[object], SiteRules]] = [
            (" AND camera = ?", [c], rules.for_camera(c)) for c in own
        ]
        marks = ",".join("?" * len(own))
        groups.append((f" AND camera NOT IN ({marks})" if own else "", list(own), rules))
        n = 0
        with self.transaction() as c:
            # most of the table changes (a site's rules on a one-site recorder, a preview of a
            # config): its expiry index is built again afterwards, which is about three times
            # cheaper than moving every row in it
            site_rows = c.execute("SELECT count(*) FROM segments WHERE site = ?", (site,))
            rebuild = site_rows.fetchone()[0] >= max(
                _REBUILD_MIN, c.execute("SELECT count(*) FROM segments").fetchone()[0] // 2
            )
            if rebuild:
                c.execute("DROP INDEX IF EXISTS segments_expires")
            for where, args, r in groups:
                keep = r.keep
                if keep is None or keep.months == 0:
                    # no calendar arithmetic: one statement (a million rows in about a second,
                    # where reading them out and back row by row takes several)
                    n += c.execute(
                        "UPDATE segments SET expires_at = max(start, mtime) + ? "
                        f"WHERE site = ?{where}",
                        [None if keep is None else float(keep.seconds), site, *args],
                    ).rowcount
                else:
                    calc = factory(r)
                    rows = c.execute(
                        f"SELECT id, start, mtime FROM segments WHERE site = ?{where}",
                        [site, *args],
                    ).fetchall()
                    c.executemany(
                        "UPDATE segments SET expires_at = ? WHERE id = ?",
                        ((calc(start, mtime), rid) for rid, start, mtime in rows),
                    )
                    n += len(rows)
            if rebuild:
                c.execute(SEGMENT_INDEXES["segments_expires"])
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
        """How many segments the catalog holds (of a site)."""
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
        """site -> bytes of its catalogued segments."""
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

    @changes_segments
    def move_camera_under(
        self, root: bytes, camera: str, from_site: str, to_site: str | None
    ) -> int:
        """Give the rows of ``camera`` of ``from_site`` below ``root`` to ``to_site`` (their
        expiries stay until the site's are computed again), or forget them (``None``)."""
        lo, hi = prefix_range(_dir_prefix(root))
        where = "site = ? AND camera = ? AND path >= ? AND path < ?"
        with self.transaction() as c:
            if to_site is None:
                cur = c.execute(f"DELETE FROM segments WHERE {where}", (from_site, camera, lo, hi))
            else:
                cur = c.execute(
                    f"UPDATE segments SET site = ? WHERE {where}",
                    (to_site, from_site, camera, lo, hi),
                )
            return int(cur.rowcount)

    def cameras(self, site: str | None = None) -> list[tuple[str, str]]:
        """(site, camera) pairs present in the catalog."""
        # a skip scan of the (site, camera, start) index: one seek per pair found, instead of
        # reading every segment's entry (a million of them for a few dozen cameras)
        out: list[tuple[str, str]] = []
        with self.lock:
            if site is None:
                sites = []
                row = self.conn.execute("SELECT min(site) FROM segments").fetchone()
                while row is not None and row[0] is not None:
                    sites.append(str(row[0]))
                    row = self.conn.execute(
                        "SELECT min(site) FROM segments WHERE site > ?", (row[0],)
                    ).fetchone()
            else:
                sites = [site]
            for one in sites:
                row = self.conn.execute(
                    "SELECT min(camera) FROM segments WHERE site = ?", (one,)
                ).fetchone()
                while row is not None and row[0] is not None:
                    out.append((one, str(row[0])))
                    row = self.conn.execute(
                        "SELECT min(camera) FROM segments WHERE site = ? AND camera > ?",
                        (one, row[0]),
                    ).fetchone()
        return out

    def segments_of(
        self, site: str | None, camera: str | None, start: float, end: float
    ) -> list[Segment]:
        """Segments whose footage overlaps [start, end) — the same test as ``Hold.covers``, on
        the same estimated starts (:meth:`estimate_starts`).

        A file timed by its mtime alone is catalogued at its end; the one that ends first after
        ``end`` started before ``end`` as far as anyone knows (at the end of its predecessor), so
        it is part of the range too: a request over the middle of a one-hour file gets that
        file."""
        # the start as Segment.span reads it: no later than the mtime less the named length
        conds = [
            'CASE WHEN "end" IS NULL AND start > mtime THEN mtime - 3600 '
            'ELSE min(start, mtime - max(coalesce("end", start) - start, 0)) END < ?',
            'max(mtime, start, coalesce("end", start)) >= ?',
        ]
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
                if (
                    row is not None
                    and row[4] == row[5]
                    and row[7] is None
                    and bytes(row[3]) not in have
                ):
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
            if g.start == g.mtime and g.path_end is None:
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
                    out[i] = Segment(g.site, g.camera, g.path, est, g.mtime, g.size, g.id, None)
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

    # -- what the scanner and the status read ------------------------------------------------

    def rows_between(self, lo: bytes, hi: bytes) -> dict[bytes, KnownRow]:
        """path -> (site, camera, start, mtime, size, end) of the rows with ``lo <= path < hi``."""
        with self.lock:
            return _read_rows(self.conn, lo, hi)

    def count_between(self, lo: bytes, hi: bytes) -> int:
        """How many rows have ``lo <= path < hi``."""
        with self.lock:
            row = self.conn.execute(
                "SELECT count(*) FROM segments WHERE path >= ? AND path < ?", (lo, hi)
            ).fetchone()
        return int(row[0])

    def any_between(self, lo: bytes, hi: bytes) -> bool:
        """Whether any row has ``lo <= path < hi`` (one index seek)."""
        with self.lock:
            row = self.conn.execute(
                "SELECT 1 FROM segments WHERE path >= ? AND path < ? LIMIT 1", (lo, hi)
            ).fetchone()
        return row is not None

    def site_stats(self, site: str) -> tuple[int, int, float | None, float | None]:
        """(segments, bytes, oldest start, newest start) of a site, in one pass over its rows."""
        with self.lock:
            count, size, oldest, newest = self.conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(start), max(start) "
                "FROM segments WHERE site = ?",
                (site,),
            ).fetchone()
        return int(count), int(size), oldest, newest

    def site_totals(self) -> dict[str, tuple[int, int, float | None]]:
        """site -> (segments, bytes, oldest start) of every site with rows, in one pass."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT site, count(*), coalesce(sum(size), 0), min(start) "
                "FROM segments GROUP BY site"
            ).fetchall()
        return {str(r[0]): (int(r[1]), int(r[2]), r[3]) for r in rows}
