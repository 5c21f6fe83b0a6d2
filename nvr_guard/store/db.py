"""The catalog database file: opening it, its transactions, and running its migrations.

One database file, ``state_dir/catalog.db``, in WAL mode so the CLI can read while the daemon
writes. Every change that touches more than one row runs in one transaction, so a kill -9 at any
moment leaves either the state before or the state after it — never half a reconcile.

Threads: one connection, guarded by :attr:`Database.lock` (an ``RLock``). Code that uses
:attr:`Database.conn` directly (the audit log, purge's ``on_deleted`` callback) must hold that
lock for the whole of its transaction, so another thread's statements never land inside it.

What the tables hold is in ``schema.py``; this module knows nothing of them, so every store
module can build on it without importing another.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar, cast

__all__ = [
    "AUTOCHECKPOINT",
    "PAGE_SIZE",
    "Database",
    "Migration",
    "copy_database",
    "execute_ddl",
    "migrate",
    "read_state",
    "write_transaction",
]

PAGE_SIZE = 16384
AUTOCHECKPOINT = 1000  # pages; SQLite's default
_WAL_SIZE_LIMIT = 64 * 2**20
# request writes remembered by id (``Database.request_written``); beyond that, all are read again
REQUEST_LOG = 4096

# migration i brings the schema from user_version i-1 to i (see schema.MIGRATIONS)
Migration = Callable[[sqlite3.Connection], None]


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


def migrate(
    conn: sqlite3.Connection,
    lock: threading.RLock,
    path: Path,
    migrations: Sequence[Migration],
) -> None:
    """Bring the database to ``len(migrations)`` (``PRAGMA user_version``), one transaction per
    step; a database newer than this code is refused, never downgraded."""
    latest = len(migrations)
    with lock:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > latest:
            raise RuntimeError(
                f"{path}: catalog schema version {current} is newer than this "
                f"nvr-guard understands ({latest}); upgrade nvr-guard"
            )
        for version in range(current + 1, latest + 1):
            with write_transaction(conn, lock):
                # re-read inside the write lock: another process may have migrated meanwhile
                now_at = conn.execute("PRAGMA user_version").fetchone()[0]
                if now_at >= version:
                    continue
                migrations[version - 1](conn)
                conn.execute(f"PRAGMA user_version = {version}")


def copy_database(src: Path, dst: Path) -> None:
    """Copy a database file consistently (SQLite's online backup), reading ``src`` read-only:
    a scratch copy of the state that nothing done to it can reach the original."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


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


_F = TypeVar("_F", bound=Callable[..., Any])
_R = TypeVar("_R")


def read_state(path: Path | str, read: Callable[[sqlite3.Connection], _R | None]) -> _R | None:
    """``read(conn)`` on a read-only connection to the catalog at ``path``, writing nothing
    (``config check`` as any user who may read the state); None when there is no readable
    catalog, or ``read`` finds nothing to read (a table never created)."""
    if not os.access(path, os.R_OK):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        return read(conn)
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _moves_on(counter: str) -> Callable[[_F], _F]:
    """A store method that writes: once it returns (or fails), ``Database.<counter>`` moves
    on, so answers computed before it are not reused. After the write, not before: an answer
    computed in between would be filed under the new count with the old rows."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            finally:
                db = getattr(self, "_db", self)
                setattr(db, counter, getattr(db, counter) + 1)

        return cast(_F, wrapper)

    return decorate


# writes requests, approvals or holds (RequestStore, HoldStore)
changes_requests = _moves_on("requests_generation")
# writes segment rows (SegmentStore)
changes_segments = _moves_on("segments_generation")


class Database:
    """One connection to the catalog file, its lock and its transactions; the stores
    (segments, tree, holds, sweeps) are mixins over it, composed into ``Catalog``.

    Opening runs no migration (``Catalog`` does, with the schema's list)."""

    def __init__(
        self,
        path: Path | str,
        *,
        timeout: float = 30.0,
        read_only: bool = False,
        scratch: bool = False,
    ) -> None:
        """``read_only``: for readers that must change nothing, not even by opening (`audit
        verify`, `audit show`): no pragma that writes; the file is opened with SQLite's
        ``mode=ro``. ``scratch``: a throw-away copy (a `retention plan` preview), deleted when
        done: nothing is synced to disk (a million-row load's WAL alone is 200 MB, and syncing
        it, then its checkpoint at close, took longer than the plan)."""
        self.path = Path(path)
        self.scratch = scratch
        self.lock = threading.RLock()
        self._closed = False
        self._reader: tuple[sqlite3.Connection, threading.RLock] | None = None  # reader()
        # bumped by every write to requests, approvals or holds (their stores' methods): what
        # the daemon's answers about them were computed at (see Engine.read_memo)
        self.requests_generation = 0
        # the same for segment rows (status' per-site totals)
        self.segments_generation = 0
        # which request rows (a request, or its approvals) were written, in order: the
        # workflow's parsed copy of every request (``workflow.index``) reads those again only
        self.request_rows = 0
        self._request_log: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=REQUEST_LOG
        )
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
        c.execute("PRAGMA synchronous = OFF" if scratch else "PRAGMA synchronous = NORMAL")
        c.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT}")
        # a WAL grown by a bulk load is cut back to this when it next starts over
        c.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        c.execute("PRAGMA foreign_keys = ON")
        c.execute("PRAGMA temp_store = MEMORY")

    def request_written(self, rid: int) -> None:
        """Note that request ``rid`` or its approvals were written (after the write, under the
        lock: see ``_moves_on``)."""
        self.request_rows += 1
        self._request_log.append((self.request_rows, rid))

    def requests_written_since(self, version: int) -> set[int] | None:
        """The requests written after ``request_rows`` was ``version``; None when the log no
        longer reaches back that far (more than REQUEST_LOG writes since: read them all)."""
        if version == self.request_rows:
            return set()
        log = self._request_log
        if not log or log[0][0] > version + 1 or version > self.request_rows:
            return None
        return {rid for n, rid in log if n > version}

    @property
    def schema_version(self) -> int:
        """The migration the database is at (``PRAGMA user_version``)."""
        with self.lock:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def reader(self) -> tuple[sqlite3.Connection, threading.RLock] | None:
        """A second connection to the same file, read-only, with a lock of its own: for reads
        that must not wait behind a long write transaction on the shared connection (a purge
        commits its receipts at the end): they see what was committed. Opened once, closed
        with the database; None for a database in memory, or one closed."""
        if self._reader is None and not self._closed and str(self.path) != ":memory:":
            with self.lock:
                if self._reader is None and not self._closed:
                    ro = Database(self.path, read_only=True)
                    self._reader = (ro.conn, threading.RLock())
        return self._reader

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        with self.lock:
            self._closed = True
            self.conn.close()
            if self._reader is not None:
                with self._reader[1]:
                    self._reader[0].close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), or join the one already open."""
        with write_transaction(self.conn, self.lock) as conn:
            yield conn

    def table_exists(self, name: str) -> bool:
        """Whether the database has a table of that name."""
        with self.lock:
            row = self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
        return row is not None
