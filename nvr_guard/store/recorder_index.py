"""The recorder's own index: removing the rows of deleted files from Frigate's SQLite database.

Frigate (``frigate/models.py``, ``Recordings``) lists every segment in its ``recordings`` table
(``id``, ``camera``, ``path`` unique, ``start_time``, ``end_time``, ``duration``, ``motion``,
``objects``, ``dBFS``, ``segment_size``, ``regions``...). Its database runs in WAL mode (peewee's
``SqliteQueueDatabase`` insists on it) with one writer thread that waits up to a minute for a lock.
So a row removal here is polite: the database is opened for one call and closed after it (never
kept open), never created (``mode=rw``), each chunk of at most ``chunk`` paths is its own short
``BEGIN IMMEDIATE`` ... ``COMMIT``, and a lock held by someone else is waited for at most
``busy_timeout`` seconds; then the call gives up and says how many rows it left.

Nothing here raises for a database that is missing, locked or shaped differently: the caller
gets an :class:`IndexOutcome` naming the reason, because the files are gone already and the purge
must go on.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

# reasons an IndexOutcome may give (stable names: they appear in attention entries and receipts)
MISSING = "missing"  # the database file does not exist (Frigate not installed or not started)
LOCKED = "locked"  # another connection held the write lock past busy_timeout
SCHEMA = "schema"  # no ``recordings`` table, or it has no ``path`` column
SLOW = "slow"  # the statements ran past busy_timeout (a trigger of the database's own) and
# were interrupted: our transaction, and the wait of Frigate's writer behind it, stay short
NOT_FILE = "not_file"  # the path names something else than a regular file (FIFO, directory)
ERROR = "error"  # anything else SQLite reported (permissions, a damaged file)

CHUNK = 500  # paths per statement and transaction: Frigate's writer waits for one chunk at most


@dataclass(frozen=True)
class IndexOutcome:
    removed: int  # rows deleted
    done: int  # paths handled (their rows are gone, or never were there)
    reason: str | None = None  # None: every path handled; else why the rest was left
    detail: str = ""


def remove_frigate_rows(
    database: str, paths: Sequence[str], *, busy_timeout: float, chunk: int = CHUNK
) -> IndexOutcome:
    """Delete the ``recordings`` rows whose ``path`` is one of ``paths``, in chunks of ``chunk``,
    each chunk in its own short write transaction; stop at the first chunk that fails."""
    if not paths:
        return IndexOutcome(0, 0)
    if not os.path.isfile(database):
        if os.path.lexists(database):
            return IndexOutcome(0, 0, NOT_FILE, f"{database} is not a regular file")
        return IndexOutcome(0, 0, MISSING, f"{database} does not exist")
    for suffix in ("-journal", "-wal", "-shm"):
        # SQLite opens these itself, blocking for ever on a FIFO put there (no statement runs,
        # so no interrupt reaches it)
        side = database + suffix
        if os.path.lexists(side) and not stat.S_ISREG(os.lstat(side).st_mode):
            return IndexOutcome(0, 0, NOT_FILE, f"{side} is not a regular file")
    uri = "file:" + urllib.parse.quote(database) + "?mode=rw"
    try:
        # isolation_level None: transactions are ours (BEGIN IMMEDIATE takes the write lock at
        # once, so the busy timeout covers the whole wait and nothing upgrades half-way)
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        return IndexOutcome(0, 0, _reason(exc), str(exc))
    removed = done = 0
    # the database's own code (a trigger) may run for ever inside our write transaction: every
    # statement of this call is interrupted once it has run for busy_timeout in all
    deadline = time.monotonic() + busy_timeout
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
    try:
        try:
            cols = {row[1] for row in conn.execute('PRAGMA table_info("recordings")')}
        except sqlite3.Error as exc:
            return IndexOutcome(0, 0, _reason(exc), str(exc))
        if "path" not in cols:
            what = "no recordings table" if not cols else "the recordings table has no path column"
            return IndexOutcome(0, 0, SCHEMA, f"{what} (not a Frigate database?)")
        for i in range(0, len(paths), chunk):
            part = list(paths[i : i + chunk])
            marks = ",".join("?" * len(part))
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    cur = conn.execute(f'DELETE FROM "recordings" WHERE "path" IN ({marks})', part)
                    n = cur.rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                return IndexOutcome(removed, done, _reason(exc), str(exc))
            removed += max(0, n)
            done += len(part)
        return IndexOutcome(removed, done)
    finally:
        conn.close()


def _reason(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_INTERRUPT or "interrupted" in str(exc):
        return SLOW
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(exc):
        return LOCKED
    return ERROR


__all__ = [
    "CHUNK",
    "ERROR",
    "LOCKED",
    "MISSING",
    "NOT_FILE",
    "SCHEMA",
    "SLOW",
    "IndexOutcome",
    "remove_frigate_rows",
]
