"""Hash-chained, append-only audit log (the approval record's "no detail may ever be deleted").

The log lives in the catalog's SQLite file, table ``audit``. Every entry carries the hash of the
entry before it, so editing, deleting or reordering any entry breaks the chain and ``verify``
names the first broken sequence number. Triggers refuse UPDATE and DELETE outright, so tampering
takes deliberate work (dropping the triggers), and that work is then visible through the chain.

A truncated tail (the newest entries removed together, which leaves a valid but shorter chain) is
caught by a side file ``audit.head`` next to the database (the *anchor*): after each append it holds
the newest ``seq`` and ``hash``. The rules, all enforced under the database write lock:

- A brand-new log (no entries, no head file) is not a problem: the first append writes the anchor
  ``0 <genesis>`` (fsynced, directory too) *before* its entry commits, so a crash at any moment
  leaves an anchor that the database matches — never a log with entries and no anchor.
- Every append first checks that the database still holds the anchored entry with the anchored
  hash. If it does not (the anchor is missing, unreadable, ahead of the database, or names another
  hash), the append is refused with :class:`AuditHeadMismatch` (exit 4) and the caller's whole
  transaction rolls back: the daemon does not go on writing past a head it cannot match, and it
  never overwrites the anchor with the shorter chain (which used to make a truncation invisible
  after the next append). ``on_anchor`` tells the owner (the engine raises the ``audit_head``
  attention state) when this starts and stops.
- ``verify`` reports the same mismatches as failures (exit 4); a head file that lags behind the
  database (a crash between the commit and the head update) is a warning.
- Re-anchoring is a deliberate act after an investigated incident: :meth:`AuditLog.reanchor`
  (``nvr-guard audit reanchor --accept-head SEQ --reason R``) appends an ``audit.reanchor`` entry
  that records the old anchor, the database head it accepts and the reason, then anchors there.
  The incident stays in the chain for every later auditor.

Durability: an acknowledged entry must survive kill -9 and power loss, so :meth:`append`
commits with ``PRAGMA synchronous=FULL`` (the catalog runs WAL with NORMAL for speed, which may
lose the last commits on power loss) and returns only after the commit. ``BEGIN IMMEDIATE`` takes
the write lock before the head is read, so concurrent processes serialise and ``seq``/``prev``
always follow the newest committed entry.

Object names follow ``<kind>:<id>`` so ``entries(obj_prefix=...)`` can select a family:
``camera:<site>/<camera>``, ``hold:<id>``, ``sweep:<id>``, ``request:<id>``, ``config:<path>``.

The hash of an entry is SHA-256 over the UTF-8 bytes of the compact JSON array
``[seq, time, actor, action, object, details, prev]`` where ``details`` is the stored canonical
JSON text (keys sorted, no spaces, non-ASCII kept) — see :func:`entry_hash`. An auditor can
recompute it with any JSON library; ``VERIFY.txt`` of export packages refers to this.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from nvr_guard.errors import InvalidInput, NvrGuardError, VerifyFailed
from nvr_guard.model import show_path
from nvr_guard.store.schema import ensure_audit_schema as ensure_schema
from nvr_guard.store.schema import missing_audit_triggers as missing_triggers

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # ``prev`` of the first entry
HEAD_FILE = "audit.head"

# Action names used across the project; stored in entries and matched by auditors' queries, so
# they never change once released. New features add names, none is renamed.
CONFIG_LOAD = "config.load"
CONFIG_RELOAD = "config.reload"
CONFIG_RELOAD_FAILED = "config.reload_failed"
DAEMON_START = "daemon.start"
DAEMON_STOP = "daemon.stop"
HOLD_ADD = "hold.add"
HOLD_RELEASE = "hold.release"
SWEEP_BLOCKED = "sweep.blocked"
SWEEP_CONFIRM = "sweep.confirm"
PURGE_BEGIN = "purge.begin"
PURGE_RECEIPT = "purge.receipt"
PURGE_SKIP = "purge.skip"
DISK_ALERT = "disk.alert"
ACCESS_DENIED = "access.denied"
AUDIT_REANCHOR = "audit.reanchor"

ACTIONS = frozenset(
    {
        CONFIG_LOAD,
        CONFIG_RELOAD,
        CONFIG_RELOAD_FAILED,
        DAEMON_START,
        DAEMON_STOP,
        HOLD_ADD,
        HOLD_RELEASE,
        SWEEP_BLOCKED,
        SWEEP_CONFIRM,
        PURGE_BEGIN,
        PURGE_RECEIPT,
        PURGE_SKIP,
        DISK_ALERT,
        ACCESS_DENIED,
        AUDIT_REANCHOR,
    }
)

# ---------------------------------------------------------------------------------------------
# canonical encoding


def _clean_str(s: str) -> str:
    # names decoded with surrogateescape cannot be stored as SQLite TEXT nor hashed as UTF-8;
    # show them the way the rest of the project shows undecodable paths
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return show_path(s.encode("utf-8", "surrogateescape"))
    return s


def to_json_value(value: Any) -> Any:
    """Convert ``value`` into plain JSON data (str/int/float/bool/None/list/dict with str keys).

    Paths as bytes (recording names need not be UTF-8) go through :func:`show_path`; sets are
    sorted so the same details always hash the same; anything unknown becomes its ``str``.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # NaN/inf are not JSON; keep them readable rather than failing an audit write
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return show_path(bytes(value))
    if isinstance(value, PurePath | os.PathLike):
        return show_path(os.fsencode(value))
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {_key(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [to_json_value(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False))
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return _clean_str(str(value))


def _key(k: Any) -> str:
    if isinstance(k, str):
        return _clean_str(k)
    if isinstance(k, bytes):
        return show_path(k)
    return _clean_str(str(k))


def canonical_json(details: Mapping[str, Any]) -> str:
    """The stored (and hashed) form of an entry's details: sorted keys, compact, UTF-8 kept."""
    return json.dumps(
        to_json_value(details),
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        allow_nan=False,
    )


def entry_hash(
    seq: int, time: float, actor: str, action: str, obj: str, details_json: str, prev: str
) -> str:
    """SHA-256 (hex) of one entry; ``details_json`` is the stored canonical text."""
    payload = json.dumps(
        [seq, time, actor, action, obj, details_json, prev],
        ensure_ascii=False,
        separators=(",", ":"),
        allow_nan=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# entries and reports


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    time: float
    actor: str
    action: str
    object: str
    details: dict[str, Any]
    prev: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        """The entry for ``--json`` output, with its time also as ISO 8601 UTC."""
        return {
            "seq": self.seq,
            "time": self.time,
            "at": _dt.datetime.fromtimestamp(self.time, _dt.UTC).isoformat(timespec="milliseconds"),
            "actor": self.actor,
            "action": self.action,
            "object": self.object,
            "details": self.details,
            "prev": self.prev,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    count: int  # entries in the log
    first_bad: int | None  # sequence number where the chain first breaks
    problem: str  # one line for humans; "" when ok
    head: tuple[int, str] = (0, GENESIS)  # the database's newest (seq, hash)
    warnings: tuple[str, ...] = ()  # not tampering, but worth telling the auditor
    # append-only triggers found dropped: tamper evidence even when the chain is intact
    missing_triggers: tuple[str, ...] = ()

    def message(self) -> str:
        """One line for humans: ok with the head, or where the chain breaks."""
        if self.ok:
            return f"audit log ok: {self.count} entries, head {self.head[0]} {self.head[1][:16]}"
        return f"audit log TAMPERED at entry {self.first_bad}: {self.problem}"


class AuditHeadMismatch(VerifyFailed):
    """The database does not hold the entry the head file anchors: appends are refused."""


_COLUMNS = "seq, time, actor, action, object, details, prev, hash"
_Row = tuple[int, float, str, str, str, str, str, str]


def _entry(row: _Row) -> AuditEntry:
    seq, t, actor, action, obj, details, prev, h = row
    try:
        parsed = json.loads(details)
    except ValueError:
        parsed = {"_unparsable": details}
    if not isinstance(parsed, dict):
        parsed = {"_value": parsed}
    return AuditEntry(seq, t, actor, action, obj, parsed, prev, h)


def _db_path(conn: sqlite3.Connection) -> str | None:
    for _, name, path in conn.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return str(path) or None  # "" for :memory: and temporary databases
    return None


def read_head_file(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(seq, hash) from a head file; None when absent. ValueError when unreadable garbage."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != 64:
        raise ValueError(f"{os.fspath(path)}: not an audit head file")
    return int(parts[0]), parts[1]


#: set while a gateway's request runs (``acting_via``): every entry written then says so
_ACTING: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "nvr_guard_audit_acting", default=None
)


@contextlib.contextmanager
def acting_via(via: str | None, client: str | None) -> Iterator[None]:
    """Within the block, entries this thread appends carry ``via`` and ``client`` (an action
    taken through the web console is on record as such, with the person's address)."""
    if via is None:
        yield
        return
    token = _ACTING.set({"via": via, "client": client or ""})
    try:
        yield
    finally:
        _ACTING.reset(token)


class AuditLog:
    """The audit log on one SQLite connection (normally the catalog's).

    ``head_path`` defaults to ``audit.head`` next to the database file (none for in-memory
    databases); pass ``None`` explicitly to disable the side file.

    ``lock`` serialises every use of the connection by this log: pass the lock that guards the
    connection for its other users (the catalog's), so that an append and the state change it
    records are one transaction that no other thread's statement can land in or commit early.
    ``on_anchor`` is called with a message when appends start being refused because the anchor
    does not match, and with None when they are accepted again (outside any transaction).
    """

    _AUTO: Any = object()

    def __init__(
        self,
        conn: sqlite3.Connection,
        clock: Callable[[], float] = time.time,
        head_path: str | os.PathLike[str] | None = _AUTO,
        *,
        lock: threading.RLock | None = None,
        on_anchor: Callable[[str | None], None] | None = None,
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.lock = lock if lock is not None else threading.RLock()
        self.on_anchor = on_anchor
        self._anchor_problem: str | None = None  # as last reported through on_anchor
        self._pending_anchor: tuple[str | None] | None = None  # to report after the commit
        self._recording = False  # a recording() transaction is open (on the lock's thread)
        if head_path is AuditLog._AUTO:
            db = _db_path(conn)
            self.head_path: str | None = (
                os.path.join(os.path.dirname(db), HEAD_FILE) if db else None
            )
        else:
            self.head_path = os.fspath(head_path) if head_path is not None else None

    # -- writing ---------------------------------------------------------------------------

    def append(
        self, actor: str, action: str, obj: str, details: Mapping[str, Any] | None = None
    ) -> AuditEntry:
        """Append one entry in its own durable transaction; returns after the commit."""
        with self.lock:
            if self._recording and self.conn.in_transaction:
                return self.append_in(actor, action, obj, details)  # commits with the change
            if self.conn.in_transaction:
                # committing here would commit the caller's half-done work with it
                raise RuntimeError(
                    "AuditLog.append inside an open transaction; use append_in() or commit first"
                )
            with self.transaction():
                entry = self.append_in(actor, action, obj, details)
            return entry

    def append_in(
        self, actor: str, action: str, obj: str, details: Mapping[str, Any] | None = None
    ) -> AuditEntry:
        """Append inside the caller's open transaction on this log's connection.

        The entry becomes durable with the caller's commit (use :meth:`transaction` to get the
        FULL-sync commit and the head file update); if the caller rolls back, it never existed.
        Raises :class:`AuditHeadMismatch` when the database no longer holds the anchored head.
        """
        with self.lock:
            if not self.conn.in_transaction:
                raise RuntimeError(
                    "AuditLog.append_in needs an open transaction (see transaction())"
                )
            self._check_anchor()
            return self._insert(actor, action, obj, details)

    def _insert(
        self, actor: str, action: str, obj: str, details: Mapping[str, Any] | None
    ) -> AuditEntry:
        conn = self.conn
        via = _ACTING.get()
        if via is not None:
            details = {**(details or {}), **via}
        details_json = canonical_json(details or {})
        t = float(self.clock())
        if not math.isfinite(t):
            raise ValueError(f"audit clock returned {t!r}")
        actor, action, obj = _clean_str(actor), _clean_str(action), _clean_str(obj)
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        h = entry_hash(seq, t, actor, action, obj, details_json, prev)
        conn.execute(
            f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, t, actor, action, obj, details_json, prev, h),
        )
        return AuditEntry(seq, t, actor, action, obj, json.loads(details_json), prev, h)

    def _check_anchor(self) -> None:
        """Refuse to append past a head the database does not hold (caller holds the write lock).

        A brand-new log gets its anchor ``0 <genesis>`` here, durably, before its first entry can
        commit: from then on a log with entries always has an anchor it must match.
        """
        if self.head_path is None:
            return
        seq, _ = self.head()
        try:
            recorded = read_head_file(self.head_path)
        except (OSError, ValueError):
            recorded = None
        if recorded is None and seq == 0 and not os.path.lexists(self.head_path):
            _write_atomic(self.head_path, f"0 {GENESIS}\n".encode("ascii"), sync_dir=True)
        problem = self.anchor_problem()
        self._pending_anchor = (problem,)
        if problem is not None:
            raise AuditHeadMismatch(
                f"audit log refuses to append: {problem}. Investigate, then re-anchor "
                "deliberately with `nvr-guard audit reanchor` (see docs/threat-model.md)"
            )

    def anchor_problem(self) -> str | None:
        """Why the database does not hold the anchored head, or None when it does."""
        return self._anchor()[0]

    def _anchor(self) -> tuple[str | None, int | None]:
        """(problem, first entry concerned) of the head file against the database."""
        if self.head_path is None:
            return None, None
        with self.lock:
            seq, _ = self.head()
            try:
                recorded = read_head_file(self.head_path)
            except (OSError, ValueError) as exc:
                return f"head file {self.head_path} unreadable ({exc})", seq
            if recorded is None:
                if seq == 0:
                    return None, None  # brand-new: nothing written yet, nothing to anchor
                return (
                    f"head file {self.head_path} missing while the log holds {seq} entries "
                    "(deleted: a truncation of the log could no longer be seen)"
                ), seq
            rseq, rhash = recorded
            if rseq == 0:
                if rhash != GENESIS:
                    return f"head file {self.head_path} anchors entry 0 at a non-genesis hash", 1
                return None, None
            if seq < rseq:
                return (
                    f"log truncated: the head file {self.head_path} records entry {rseq}, "
                    f"the database ends at {seq}"
                ), seq + 1
            row = self.conn.execute("SELECT hash FROM audit WHERE seq = ?", (rseq,)).fetchone()
            if row is None or row[0] != rhash:
                return (
                    f"entry {rseq} differs from the one recorded in the head file "
                    f"{self.head_path}: the log was rewritten"
                ), rseq
            return None, None

    def check_anchor(self) -> str | None:
        """Look at the anchor now (daemon start, status) and report a change through
        ``on_anchor``; the problem, or None."""
        with self.lock:
            problem = self.anchor_problem()
            self._pending_anchor = (problem,)
            self._report_anchor()
            return problem

    def _report_anchor(self) -> None:
        pending, self._pending_anchor = self._pending_anchor, None
        if pending is None or pending[0] == self._anchor_problem:
            return
        self._anchor_problem = pending[0]
        if pending[0] is not None:
            log.error("audit log refuses appends: %s", pending[0])
        if self.on_anchor is not None:
            try:
                self.on_anchor(pending[0])
            except Exception:  # the reporter must never break the log
                log.exception("reporting the audit anchor state")

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """One transaction for a state change and the entries that record it.

        Inside it, :meth:`append` joins the transaction instead of committing on its own, and
        the catalog's stores join it too: the change and its entry commit together or not at
        all (a kill -9, a refused append, a bug in between). Nested uses join the outer one.

        A user-facing refusal (an :class:`NvrGuardError` other than a verification failure)
        commits what was recorded before it propagates: code refuses before it changes
        anything, and the refusal's own ``access.denied`` entry must stay on record. Any other
        exception — an append refused by the anchor check included — rolls everything back.
        """
        with self.lock:
            if self._recording:
                yield
                return
            kept: NvrGuardError | None = None
            self._recording = True
            try:
                with self.transaction():
                    try:
                        yield
                    except NvrGuardError as exc:
                        if isinstance(exc, VerifyFailed):
                            raise
                        kept = exc
            finally:
                self._recording = False
            if kept is not None:
                raise kept

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` with synchronous=FULL, then the head file update.

        Holds the log's lock throughout. Rolls back on any exception. If the body commits by
        itself (a helper using ``with conn:``), what remains is committed the same way. When
        the body wrote nothing (a read that could have been refused, and was not), the head
        file is left as it is: it names the same head, and rewriting it costs an fsync.
        """
        with self.lock:
            conn = self.conn
            if conn.in_transaction:
                raise RuntimeError("AuditLog.transaction inside an open transaction")
            try:
                with _full_sync(conn):
                    conn.execute("BEGIN IMMEDIATE")
                    before = conn.total_changes
                    try:
                        yield conn
                    except BaseException:
                        if conn.in_transaction:
                            conn.rollback()
                        raise
                    if conn.in_transaction:
                        conn.commit()
                if conn.total_changes != before:
                    self.sync_head()
            finally:
                self._report_anchor()

    def reopen_transaction(self) -> None:
        """Inside :meth:`transaction`: begin again (``BEGIN IMMEDIATE``) when the body's
        callback committed, so what follows still commits with the FULL-sync and head update."""
        with self.lock:
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN IMMEDIATE")

    def sync_head(self) -> None:
        """Write the database's newest (seq, hash) to the head file (atomic rename, fsynced).

        Done under the database write lock so concurrent appenders cannot leave an older head
        behind a newer one, and only when the database still holds the head being replaced: a
        shorter or rewritten chain is never adopted. A failure to write is logged, never fatal
        — the entry is committed, and a lagging head still matches.
        """
        if self.head_path is None:
            return
        with self.lock:
            conn = self.conn
            if conn.in_transaction:
                return  # the caller's commit is still pending; the next append writes the head
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    seq, h = self.head()
                    if seq and self.anchor_problem() is None:
                        _write_atomic(self.head_path, f"{seq} {h}\n".encode("ascii"))
                finally:
                    conn.rollback()
            except (OSError, sqlite3.Error) as exc:
                log.warning("audit head file %s not updated: %s", self.head_path, exc)

    def reanchor(self, actor: str, reason: str, accept_seq: int) -> AuditEntry:
        """Deliberately anchor the log at its present head after an investigated incident.

        ``accept_seq`` is the database head the admin looked at (``audit verify`` prints it); if
        the log moved meanwhile, nothing is done. The ``audit.reanchor`` entry records the old
        anchor, the accepted head and the reason, so the incident stays on record.
        """
        if not reason.strip():
            raise InvalidInput("--reason is required: say what was investigated and found")
        if self.head_path is None:
            raise InvalidInput("this audit log has no head file to re-anchor")
        with self.lock:
            conn = self.conn
            if conn.in_transaction:
                raise RuntimeError("AuditLog.reanchor inside an open transaction")
            with _full_sync(conn):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    problem = self.anchor_problem()
                    seq, h = self.head()
                    if problem is None:
                        raise InvalidInput(
                            f"the audit log matches its head file (head {seq}); "
                            "nothing to re-anchor"
                        )
                    if seq != accept_seq:
                        raise InvalidInput(
                            f"the log's head is entry {seq}, not {accept_seq}: it changed since "
                            "you looked; run `nvr-guard audit verify` again"
                        )
                    try:
                        with open(self.head_path, "rb") as fh:
                            old = fh.read(200).decode("ascii", "backslashreplace").strip()
                    except FileNotFoundError:
                        old = None
                    entry = self._insert(
                        actor,
                        AUDIT_REANCHOR,
                        "audit",
                        {
                            "reason": reason,
                            "problem": problem,
                            "previous_head_file": old,
                            "accepted_head": {"seq": seq, "hash": h},
                        },
                    )
                    conn.commit()
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    raise
            _write_atomic(
                self.head_path, f"{entry.seq} {entry.hash}\n".encode("ascii"), sync_dir=True
            )
            self._pending_anchor = (None,)
            self._report_anchor()
            return entry

    # -- reading ---------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """The newest entry's (seq, hash); (0, genesis) for an empty log."""
        with self.lock:
            row = self.conn.execute(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def get(self, seq: int) -> AuditEntry | None:
        """The entry with that sequence number, or None."""
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_COLUMNS} FROM audit WHERE seq = ?", (seq,)
            ).fetchone()
        return _entry(row) if row else None

    def entries(
        self,
        since: float | None = None,
        obj_prefix: str | None = None,
        action: str | None = None,
        *,
        until: float | None = None,
        obj: str | None = None,
        after_seq: int | None = None,
        actor: str | None = None,
        newest: int | None = None,
    ) -> Iterator[AuditEntry]:
        """Entries in chain order, filtered; ``action`` ending in ``.`` matches a family;
        ``newest``: only the last that many of those (still in chain order)."""
        where: list[str] = []
        args: list[Any] = []
        if actor is not None:
            where.append("actor = ?")
            args.append(actor)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time < ?")
            args.append(until)
        if obj_prefix is not None:
            where.append("substr(object, 1, ?) = ?")
            args += [len(obj_prefix), obj_prefix]
        if obj is not None:
            where.append("object = ?")
            args.append(obj)
        if action is not None:
            if action.endswith("."):
                where.append("substr(action, 1, ?) = ?")
                args += [len(action), action]
            else:
                where.append("action = ?")
                args.append(action)
        if after_seq is not None:
            where.append("seq > ?")
            args.append(after_seq)
        sql = f"SELECT {_COLUMNS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if newest is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT ?)"
            args.append(int(newest))
        sql += " ORDER BY seq"
        # read whole under the lock: a generator that held it between yields would block every
        # other thread for as long as its consumer dawdles (or for ever, if it stops early)
        with self.lock:
            rows = self.conn.execute(sql, args).fetchall()
        for row in rows:
            yield _entry(row)

    def after(
        self, after_seq: int, upto_seq: int, actions: Sequence[str], limit: int
    ) -> list[AuditEntry]:
        """At most ``limit`` entries with ``after_seq < seq <= upto_seq`` and one of
        ``actions``, in chain order."""
        marks = ", ".join("?" * len(actions))
        with self.lock:
            rows = self.conn.execute(
                f"SELECT {_COLUMNS} FROM audit WHERE seq > ? AND seq <= ? "
                f"AND action IN ({marks}) ORDER BY seq LIMIT ?",
                (after_seq, upto_seq, *actions, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def action_counts(
        self, after_seq: int, upto_seq: int, actions: Sequence[str]
    ) -> dict[str, int]:
        """How many entries with ``after_seq < seq <= upto_seq`` have each of ``actions``."""
        marks = ", ".join("?" * len(actions))
        with self.lock:
            rows = self.conn.execute(
                "SELECT action, count(*) FROM audit WHERE seq > ? AND seq <= ? "
                f"AND action IN ({marks}) GROUP BY action",
                (after_seq, upto_seq, *actions),
            ).fetchall()
        return {str(a): int(n) for a, n in rows}

    def verify(self) -> VerifyReport:
        """Walk the whole chain; report the first entry that was edited, removed or moved, or
        a database that does not hold the head its head file anchors."""
        with self.lock:
            return self._verify()

    def verify_after(self, seq: int, h: str) -> VerifyReport:
        """Verify only what an earlier verification that ended at ``(seq, h)`` has not seen:
        that entry is still there with its hash, the entries after it chain on from it, no
        sequence number is missing (count against the newest), the head file anchors the
        log and the append-only triggers stand. An entry before ``seq`` rewritten with its
        hash recomputed is seen only by the full walk (``verify``)."""
        with self.lock:
            if seq <= 0:
                return self._verify()
            row = self.conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
            if row is None or row[0] != h:
                return VerifyReport(
                    ok=False,
                    count=self._count(),
                    first_bad=seq,
                    problem=(
                        f"entry {seq} was removed or altered since it was last verified "
                        "(its hash is not the one verified)"
                    ),
                    head=self.head(),
                )
            total, last = self.conn.execute("SELECT count(*), max(seq) FROM audit").fetchone()
            report = self._verify(start=(seq, h))
            if report.ok and int(total) != int(last or 0):
                return dataclasses.replace(
                    report,
                    ok=False,
                    count=int(total),
                    first_bad=None,
                    problem=(
                        f"{int(last) - int(total)} entries missing (deleted): the log holds "
                        f"{int(total)} entries numbered up to {int(last)}"
                    ),
                )
            return dataclasses.replace(report, count=int(total))

    def _count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM audit").fetchone()[0])

    def _verify(self, start: tuple[int, str] = (0, GENESIS)) -> VerifyReport:
        expected_seq = start[0] + 1
        prev = start[1]
        count = start[0]
        first_bad: int | None = None
        problem = ""
        cur = self.conn.cursor()
        try:
            for seq, t, actor, action, obj, details, prev_col, h in cur.execute(
                f"SELECT {_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq", (start[0],)
            ):
                count += 1
                if first_bad is not None:
                    continue
                if seq != expected_seq:
                    first_bad = expected_seq
                    missing = (
                        f"entry {expected_seq}"
                        if seq == expected_seq + 1
                        else f"entries {expected_seq}..{seq - 1}"
                    )
                    problem = f"{missing} missing (deleted): the chain jumps to {seq}"
                elif prev_col != prev:
                    first_bad = seq
                    problem = (
                        f"entry {seq} does not follow entry {seq - 1} (prev hash mismatch): "
                        "an entry was removed, replaced or moved"
                    )
                else:
                    try:
                        good = entry_hash(seq, t, actor, action, obj, details, prev_col) == h
                    except (TypeError, ValueError):
                        good = False
                    if not good:
                        first_bad = seq
                        problem = f"entry {seq} was altered (content does not match its hash)"
                prev = h
                expected_seq = seq + 1
        finally:
            cur.close()
        head = self.head()
        warnings: list[str] = []
        if first_bad is None:
            first_bad, problem = self._check_head_file(head, warnings)
        missing_triggers = self._missing_triggers()
        if missing_triggers:
            warnings.append(
                "append-only triggers missing: "
                + ", ".join(missing_triggers)
                + " (someone dropped them; the chain shows whether entries were changed)"
            )
        return VerifyReport(
            ok=first_bad is None,
            count=count,
            first_bad=first_bad,
            problem=problem,
            head=head,
            warnings=tuple(warnings),
            missing_triggers=tuple(missing_triggers),
        )

    def _check_head_file(
        self, head: tuple[int, str], warnings: list[str]
    ) -> tuple[int | None, str]:
        problem, first_bad = self._anchor()
        if problem is not None:
            return first_bad, problem
        if self.head_path is not None:
            with contextlib.suppress(OSError, ValueError):
                recorded = read_head_file(self.head_path)
                if recorded is not None and recorded[0] < head[0]:
                    lag = head[0] - recorded[0]
                    warnings.append(
                        f"head file {self.head_path} records entry {recorded[0]}, "
                        f"{lag} behind the log: the newest not yet anchored (normal right "
                        "after a crash; the next append anchors them)"
                    )
        return None, ""

    def _missing_triggers(self) -> list[str]:
        return missing_triggers(self.conn)


class ChainWatch:
    """The audit chain as ``status`` and the metrics report it, without walking all of it on
    every call: each check verifies what was appended since the last one (``verify_after``),
    and the whole chain is walked again whenever the last full walk is ``full_every`` seconds
    old (the daemon's scheduler does it before then), at the first check, and while the last
    check failed. ``audit verify`` always walks all of it."""

    def __init__(
        self, log: AuditLog, full_every: float = 300.0, now: Callable[[], float] = time.time
    ) -> None:
        self.log = log
        self.full_every = full_every
        self.now = now
        self.full_at: float | None = None  # when the last full walk ran (``now``'s clock)
        self._last: VerifyReport | None = None

    def full_age(self) -> float | None:
        """Seconds since the last full walk (None: none yet)."""
        return None if self.full_at is None else self.now() - self.full_at

    def check(self, full: bool = False) -> VerifyReport:
        """Verify the entries appended since the last check, or the whole chain when asked,
        when the last full walk is ``full_every`` old (or in the future), or after a failure."""
        # the log's own lock, and no other: status calls in holding it (the engine lock), the
        # daemon's audit job without it; a second lock taken first here deadlocked the two
        with self.log.lock:
            age = self.full_age()
            last = self._last
            if full or last is None or not last.ok or age is None or not 0 <= age < self.full_every:
                report = self.log.verify()
                self.full_at = self.now()
            else:
                report = self.log.verify_after(*last.head)
            self._last = report
            return report


@contextlib.contextmanager
def _full_sync(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the body with ``PRAGMA synchronous=FULL`` and restore the previous level after."""
    row = conn.execute("PRAGMA synchronous").fetchone()
    before = int(row[0]) if row else 2
    if before < 2:
        conn.execute("PRAGMA synchronous=FULL")
    try:
        yield
    finally:
        if before < 2:
            conn.execute(f"PRAGMA synchronous={before}")


def _write_atomic(path: str, data: bytes, sync_dir: bool = False) -> None:
    # The file content is fsynced so a crash never leaves a torn head; the directory is not
    # (unless asked): a rename lost to power loss leaves the previous head, which is behind the
    # database — never a false "truncated" report — and saves a journal commit per append
    # (purges append per batch). The first anchor and a re-anchor do sync it: a lost first
    # anchor would leave entries with no head file, a lost re-anchor the old mismatch.
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


__all__ = [
    "ACTIONS",
    "GENESIS",
    "AuditEntry",
    "AuditHeadMismatch",
    "AuditLog",
    "ChainWatch",
    "VerifyReport",
    "canonical_json",
    "ensure_schema",
    "entry_hash",
    "read_head_file",
    "to_json_value",
]
