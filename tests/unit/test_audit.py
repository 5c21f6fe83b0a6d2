"""Audit chain: append, query, verify, tamper detection, durability settings (concurrent writers in
separate processes: tests/integration/test_audit_processes.py)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nvr_guard.store.audit import (
    GENESIS,
    AuditLog,
    ChainWatch,
    canonical_json,
    ensure_schema,
    entry_hash,
    read_head_file,
)
from tests.fixtures.locks import ContendedLock


def connect(path: Path | str, isolation_level: str | None = "") -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=isolation_level)
    conn.execute("PRAGMA journal_mode=WAL")  # as the catalog runs it
    conn.execute("PRAGMA synchronous=NORMAL")
    ensure_schema(conn)
    return conn


class Clock:
    def __init__(self, t: float = 1_763_000_000.25) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 1.5
        return self.t


# both sqlite3 transaction styles the rest of the project may use on the shared connection
@pytest.fixture(params=["", None], ids=["legacy-implicit", "autocommit"])
def db(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, AuditLog]]:
    path = tmp_path / "catalog.db"
    conn = connect(path, request.param)
    yield path, AuditLog(conn, clock=Clock())
    conn.close()


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("alice", "hold.add", f"hold:{i + 1}", {"reason": f"case {i + 1}", "i": i})


def test_append_builds_a_chain_and_head(db: tuple[Path, AuditLog]) -> None:
    path, log = db
    assert log.head() == (0, GENESIS)
    a = log.append("alice", "hold.add", "hold:1", {"reason": "robbery 2026-11-20"})
    b = log.append("bob", "hold.release", "hold:1", {"reason": "case closed"})
    assert (a.seq, b.seq) == (1, 2)
    assert a.prev == GENESIS and b.prev == a.hash
    assert log.head() == (2, b.hash)
    # the hash is reproducible from the stored columns by the documented recipe
    row = log.conn.execute("SELECT * FROM audit WHERE seq = 2").fetchone()
    payload = json.dumps(list(row[:7]), ensure_ascii=False, separators=(",", ":"))
    assert hashlib.sha256(payload.encode()).hexdigest() == b.hash == row[7]
    # the head file next to the database follows every append
    assert read_head_file(path.parent / "audit.head") == (2, b.hash)
    rep = log.verify()
    assert (rep.ok, rep.count, rep.first_bad, rep.problem) == (True, 2, None, "")


def test_entries_filters(db: tuple[Path, AuditLog]) -> None:
    _, log = db
    log.append("nvr-guard", "config.load", "config:/etc/nvr-guard/config.yaml", {"digest": "ab"})
    h = log.append("alice", "hold.add", "hold:4", {"reason": "x"})
    log.append("alice", "hold.add", "hold:42", {"reason": "y"})
    log.append("alice", "hold.release", "hold:4", {"reason": "done"})
    r = log.append("nvr-guard", "purge.receipt", "camera:toll/cam-1", {"count": 3})
    assert [e.seq for e in log.entries()] == [1, 2, 3, 4, 5]
    assert [e.seq for e in log.entries(since=h.time)] == [2, 3, 4, 5]
    assert [e.seq for e in log.entries(obj_prefix="hold:")] == [2, 3, 4]
    assert [e.seq for e in log.entries(obj="hold:4")] == [2, 4]
    assert [e.seq for e in log.entries(action="hold.add")] == [2, 3]
    assert [e.seq for e in log.entries(action="hold.")] == [2, 3, 4]
    assert [e.seq for e in log.entries(obj_prefix="camera:toll/", action="purge.receipt")] == [5]
    assert [e.seq for e in log.entries(until=r.time)] == [1, 2, 3, 4]
    assert next(log.entries(action="purge.receipt")).details == {"count": 3}
    assert log.get(3) is not None and log.get(3).object == "hold:42"  # type: ignore[union-attr]
    assert log.get(99) is None


def test_unicode_and_bytes_details_round_trip(db: tuple[Path, AuditLog]) -> None:
    _, log = db
    details = {
        "camera": "收费站出口",
        "path": b"/srv/rec/cam/\xff\xfe bad\n.mp4",
        "cams": frozenset({"b", "a"}),
        "span": (1.5, 2.5),
        "nan": float("nan"),
        7: "int key",
    }
    e = log.append("张三", "hold.add", "hold:1", details)
    stored = next(log.entries())
    assert stored.details == e.details
    assert stored.details["camera"] == "收费站出口"
    assert stored.details["path"] == "/srv/rec/cam/\\xff\\xfe bad\\n.mp4"
    assert stored.details["cams"] == ["a", "b"]
    assert stored.details["span"] == [1.5, 2.5]
    assert stored.details["nan"] == "nan" and stored.details["7"] == "int key"
    assert stored.actor == "张三"
    # the same details in another key order hash the same (canonical form)
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
    row = log.conn.execute("SELECT details FROM audit WHERE seq = 1").fetchone()
    assert e.hash == entry_hash(e.seq, e.time, e.actor, e.action, e.object, row[0], e.prev)
    assert log.verify().ok


@pytest.mark.parametrize("stmt", ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"])
def test_triggers_refuse_update_and_delete(db: tuple[Path, AuditLog], stmt: str) -> None:
    _, log = db
    fill(log, 3)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log.conn.execute(stmt)
    if log.conn.in_transaction:
        log.conn.rollback()
    assert [e.actor for e in log.entries()] == ["alice"] * 3
    assert log.verify().ok


def _drop_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")


def _tamper_as_an_intruder(path: Path, tamper: Callable[[sqlite3.Connection], object]) -> None:
    """Change the file with the plain sqlite3 module, as an intruder would: the append-only
    triggers dropped first (and left dropped)."""
    evil = sqlite3.connect(path, isolation_level=None)
    _drop_triggers(evil)
    evil.execute("BEGIN")
    tamper(evil)
    evil.execute("COMMIT")
    evil.close()


def _edit_details(conn: sqlite3.Connection) -> None:
    conn.execute("""UPDATE audit SET details = '{"i":4,"reason":"nothing to see"}' WHERE seq = 5""")


def _edit_time(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit SET time = time - 3600 WHERE seq = 5")


def _delete_middle(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq = 5")


def _delete_and_renumber(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq = 5")
    for seq in range(6, 11):
        conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq - 1, seq))


def _swap(conn: sqlite3.Connection) -> None:
    cols = "time, actor, action, object, details, prev, hash"
    r3 = conn.execute(f"SELECT {cols} FROM audit WHERE seq = 3").fetchone()
    r4 = conn.execute(f"SELECT {cols} FROM audit WHERE seq = 4").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE audit SET {sets} WHERE seq = 3", (*r4,))
    conn.execute(f"UPDATE audit SET {sets} WHERE seq = 4", (*r3,))


def _truncate_tail(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq >= 8")


def _delete_first(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq <= 2")


@pytest.mark.parametrize(
    ("tamper", "first_bad", "words"),
    [
        (_edit_details, 5, "altered"),
        (_edit_time, 5, "altered"),
        (_delete_middle, 5, "missing"),
        (_delete_and_renumber, 5, "does not follow"),
        (_swap, 3, "does not follow"),
        (_truncate_tail, 8, "truncated"),
        (_delete_first, 1, "missing"),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_verify_names_the_first_bad_entry(
    tmp_path: Path, tamper: Callable[[sqlite3.Connection], None], first_bad: int, words: str
) -> None:
    path = tmp_path / "catalog.db"
    log = AuditLog(connect(path), clock=Clock())
    fill(log, 10)
    assert log.verify().ok
    # the tamperer works on the file with the plain sqlite3 module, as an intruder would
    _tamper_as_an_intruder(path, tamper)
    # an auditor's read-only look: the dropped triggers are reported too
    rep = AuditLog(sqlite3.connect(path)).verify()
    assert not rep.ok
    assert rep.first_bad == first_bad
    assert words in rep.problem
    assert any("triggers missing" in w for w in rep.warnings)
    assert f"entry {first_bad}" in rep.message()
    # the next start (catalog migrations) puts the triggers back; the chain still tells
    rep = AuditLog(connect(path)).verify()
    assert (rep.ok, rep.first_bad, rep.warnings) == (False, first_bad, ())


@pytest.mark.parametrize(
    ("tamper", "first_bad", "at_once"),
    [
        (_edit_details, 5, False),
        (_edit_time, 5, False),
        (_delete_middle, None, True),  # count against the newest number: seen at once
        (_delete_and_renumber, 5, True),  # one entry fewer: the head file
        (_swap, 3, False),
        (_truncate_tail, 8, True),  # the head file
        (_delete_first, None, True),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_chain_watch_reports_an_old_entry_tampered_by_the_next_full_walk(
    tmp_path: Path,
    tamper: Callable[[sqlite3.Connection], None],
    first_bad: int | None,
    at_once: bool,
) -> None:
    path = tmp_path / "catalog.db"
    log = AuditLog(connect(path), clock=Clock())
    fill(log, 10)
    now = [1000.0]
    watch = ChainWatch(log, full_every=300.0, now=lambda: now[0])
    assert watch.check().ok and watch.full_at == 1000.0  # the first check walks everything
    _tamper_as_an_intruder(path, tamper)
    connect(path).close()  # the triggers back: only the chain tells
    if not at_once:
        fill(log, 2)  # appended after the tampering: verified as they come
    now[0] += 299.0
    rep = watch.check()
    assert rep.ok is not at_once  # between full walks only new entries (and deletions)
    assert watch.full_at == 1000.0  # no walk: entries since the last check, count, head file
    now[0] += 1.0
    rep = watch.check()
    assert not rep.ok and watch.full_at == 1300.0
    full = AuditLog(sqlite3.connect(path)).verify()
    assert (rep.first_bad, rep.problem) == (full.first_bad, full.problem)
    if first_bad is not None:
        assert rep.first_bad == first_bad


def test_a_full_check_beside_a_status_check_does_not_deadlock(tmp_path: Path) -> None:
    # the daemon's audit job checks the whole chain without the engine lock while a status
    # holds it (the log's lock) and checks the new entries: a check that took a lock of its own
    # first and then waited for the log's stopped both for good
    conn = sqlite3.connect(tmp_path / "catalog.db", check_same_thread=False)
    ensure_schema(conn)
    log = AuditLog(conn, clock=Clock())
    fill(log, 4)
    watch = ChainWatch(log, full_every=300.0, now=lambda: 1000.0)
    assert watch.check().ok
    watched = ContendedLock(log.lock)
    log.lock = watched  # type: ignore[assignment]
    reports: list[bool] = []

    def status() -> None:
        with watched:
            job.start()
            assert watched.contended.wait(10), "the full check never asked for the log's lock"
            reports.append(watch.check().ok)

    job = threading.Thread(target=lambda: reports.append(watch.check(full=True).ok), daemon=True)
    holder = threading.Thread(target=status, daemon=True)
    holder.start()
    holder.join(20)
    job.join(20)
    assert reports == [True, True], "the full check and the status check wait on each other"


def test_chain_watch_checks_each_new_entry(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    log = AuditLog(connect(path), clock=Clock())
    fill(log, 4)
    watch = ChainWatch(log, full_every=300.0, now=lambda: 1000.0)
    assert watch.check().ok
    fill(log, 3)
    rep = watch.check()
    assert rep.ok and rep.count == 7 and rep.head == log.head()
    # the newest entry rewritten with its hash recomputed: not the entry last verified
    _drop_triggers(log.conn)
    seq, t, actor, action, obj, prev = log.conn.execute(
        "SELECT seq, time, actor, action, object, prev FROM audit WHERE seq = 7"
    ).fetchone()
    h = entry_hash(seq, t, actor, action, obj, '{"x":1}', prev)
    log.conn.execute("UPDATE audit SET details = '{\"x\":1}', hash = ? WHERE seq = 7", (h,))
    log.conn.commit()
    rep = watch.check()
    assert not rep.ok and rep.first_bad == 7 and "since it was last verified" in rep.problem
    assert watch.full_at == 1000.0  # seen without walking the chain


def test_rewritten_chain_is_caught_by_the_head_file(tmp_path: Path) -> None:
    # an intruder who recomputes every hash after an edit leaves a consistent chain; the head
    # file (outside the database) still pins the last acknowledged entry
    path = tmp_path / "catalog.db"
    log = AuditLog(connect(path), clock=Clock())
    fill(log, 6)
    conn = log.conn
    _drop_triggers(conn)
    conn.execute("""UPDATE audit SET details = '{"i":2,"reason":"edited"}' WHERE seq = 3""")
    prev = conn.execute("SELECT hash FROM audit WHERE seq = 2").fetchone()[0]
    for seq, t, actor, action, obj, details in conn.execute(
        "SELECT seq, time, actor, action, object, details FROM audit WHERE seq >= 3 ORDER BY seq"
    ).fetchall():
        h = entry_hash(seq, t, actor, action, obj, details, prev)
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, h, seq))
        prev = h
    conn.commit()
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 6 and "rewritten" in rep.problem


def test_deleted_head_file_is_a_failure_not_a_warning(tmp_path: Path) -> None:
    # without it a truncation could no longer be seen: that is itself a finding (exit 4)
    path = tmp_path / "catalog.db"
    log = AuditLog(connect(path), clock=Clock())
    fill(log, 3)
    os.unlink(tmp_path / "audit.head")
    rep = log.verify()
    assert not rep.ok and rep.count == 3
    assert "head file" in rep.problem and "missing" in rep.problem


def test_in_memory_log_has_no_head_file() -> None:
    conn = sqlite3.connect(":memory:")
    ensure_schema(conn)
    ensure_schema(conn)  # idempotent
    log = AuditLog(conn, clock=Clock())
    assert log.head_path is None
    fill(log, 2)
    assert log.verify().ok and log.verify().count == 2


def test_append_in_joins_the_callers_transaction(db: tuple[Path, AuditLog]) -> None:
    _, log = db
    conn = log.conn
    conn.execute("CREATE TABLE segments (path BLOB PRIMARY KEY)")
    if conn.in_transaction:
        conn.commit()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO segments VALUES (?)", (b"/a",))
    log.append_in("nvr-guard", "purge.receipt", "camera:s/c", {"count": 1})
    conn.rollback()
    assert log.head() == (0, GENESIS)  # rolled back with the caller's work
    assert conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 0

    with log.transaction():
        conn.execute("INSERT INTO segments VALUES (?)", (b"/b",))
        e = log.append_in("nvr-guard", "purge.receipt", "camera:s/c", {"count": 1})
    assert log.head() == (1, e.hash)
    assert conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 1
    assert log.verify().ok


def test_misuse_is_refused(db: tuple[Path, AuditLog]) -> None:
    _, log = db
    with pytest.raises(RuntimeError, match="append_in"):
        log.conn.execute("BEGIN")
        log.append("a", "hold.add", "hold:1", {})
    log.conn.rollback()
    with pytest.raises(RuntimeError, match="open transaction"):
        log.append_in("a", "hold.add", "hold:1", {})
    assert log.head() == (0, GENESIS)


def test_append_commits_with_full_sync_and_restores_the_setting(
    db: tuple[Path, AuditLog],
) -> None:
    _, log = db
    seen: list[int] = []
    conn = log.conn
    log_clock = log.clock

    def clock() -> float:
        # called inside the append's transaction: observe the sync level in force there
        seen.append(conn.execute("PRAGMA synchronous").fetchone()[0])
        return log_clock()

    log.clock = clock
    log.append("a", "daemon.start", "daemon", {})
    assert seen == [2]  # FULL while the entry commits
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # the catalog's NORMAL again
    assert not conn.in_transaction


def test_failed_append_rolls_back(db: tuple[Path, AuditLog]) -> None:
    _, log = db

    def broken() -> float:
        raise OSError("clock gone")

    log.clock = broken
    with pytest.raises(OSError):
        log.append("a", "daemon.start", "daemon", {})
    assert not log.conn.in_transaction and log.head() == (0, GENESIS)


def test_a_recording_that_wrote_nothing_leaves_the_head_file_alone(
    db: tuple[Path, AuditLog],
) -> None:
    # reads that could have been refused run in a recording (a refusal's entry commits with
    # it); when nothing was refused, nothing is rewritten (nor fsynced)
    path, log = db
    fill(log, 2)
    head = path.parent / "audit.head"
    before = os.stat(head)
    with log.recording():
        pass
    after = os.stat(head)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with log.recording():
        log.append("alice", "access.denied", "request:9", {"reason": "not hers"})
    assert os.stat(head).st_ino != before.st_ino  # replaced (written beside, renamed)
    assert read_head_file(head) == log.head()
