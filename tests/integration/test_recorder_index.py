"""The recorder's own index: Frigate's ``recordings`` rows of the files a sweep deleted are removed
in the same purge batch; a locked, missing or differently shaped database never delays the
deletion, leaves its rows under attention ``recorder_index``, and is retried with the next batch.

Real files in Frigate's tree, a real SQLite database with Frigate's schema in WAL mode, a real
second process holding its write lock."""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from nvr_guard.attention import RECORDER_INDEX
from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from nvr_guard.model import ClockReading
from tests.fixtures.frigate_db import (
    FRIGATE_LAYOUT,
    FRIGATE_RECORD_DIR,
    WriteLockHolder,
    add_row,
    create_frigate_db,
    row_paths,
    write_frigate_segment,
)
from tests.fixtures.site import Site


class FixedClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> ClockReading:
        return ClockReading(self.t, 1000.0 + self.t, "recorder-index-test-boot")


def frigate_config(site: Site, recorder: str, top_level: str = "") -> None:
    site.config.write_text(
        f"""state_dir: {site.state}
timezone: Asia/Shanghai
socket: {site.socket}
socket_group: root
settle: 2m
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 0%, action: alert}}
{top_level}sites:
  toll:
    keep: 1d
    roots: [{site.root}]
    layout: "{FRIGATE_LAYOUT}"
    layout_timezone: UTC
{recorder}people:
  users: {{root: {{roles: [admin]}}}}
"""
    )


def footage(
    site: Site, db: Path, now: datetime, hours: list[float], db_root: str | None = None
) -> dict[float, tuple[Path, str]]:
    """One segment (and its Frigate row) per hour ago in ``hours``: {hours: (file, row path)}."""
    out = {}
    for h in hours:
        start = now - timedelta(hours=h)
        p = write_frigate_segment(site.root, "front", start)
        rel = p.relative_to(site.root).as_posix()
        row = f"{db_root or site.root}/{rel}"
        add_row(db, row, "front", start)
        out[h] = (p, row)
    return out


def receipts(engine: Engine) -> list[dict[str, Any]]:
    return [e.details for e in engine.audit.entries(action="purge.receipt")]


def attention_of(engine: Engine) -> list[dict[str, Any]]:
    return [a for a in engine.attention.as_json() if a["kind"] == RECORDER_INDEX]


def test_rows_of_deleted_files_go_and_rows_of_kept_files_stay(site: Site, now: datetime) -> None:
    db = create_frigate_db(site.base / "frigate.db")
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}}}\n")
    segs = footage(site, db, now, [30, 29, 28, 20, 2])  # three past keep (1d), two young
    # the 28 h old segment is held: its file, and so its row, must stay
    _hold(site, now - timedelta(hours=28))
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    out = engine.sweep()
    assert out.deleted == 2
    gone = [segs[30], segs[29]]
    kept = [segs[28], segs[20], segs[2]]
    assert not any(p.exists() for p, _ in gone)
    assert all(p.exists() for p, _ in kept)
    assert row_paths(db) == {row for _, row in kept}
    (rec,) = receipts(engine)
    assert rec["count"] == 2 and rec["index_rows"] == 2 and "index_error" not in rec
    assert attention_of(engine) == []


def _hold(site: Site, t: datetime) -> None:
    r = site.run(
        "hold", "add", "--camera", "front",
        "--from", (t - timedelta(minutes=1)).isoformat(),
        "--to", (t + timedelta(minutes=1)).isoformat(),
        "--reason", "case 7",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_locked_database_files_deleted_on_time_rows_retried_later(
    site: Site, now: datetime
) -> None:
    db = create_frigate_db(site.base / "frigate.db")
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}, busy_timeout: 1s}}\n")
    segs = footage(site, db, now, [30, 29, 2])
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    holder = WriteLockHolder(db)  # Frigate's writer (or anyone) holds the lock past the timeout
    try:
        t0 = time.monotonic()
        out = engine.sweep()
        took = time.monotonic() - t0
        # the files are gone at this sweep, whatever the index said
        assert out.deleted == 2
        assert not segs[30][0].exists() and not segs[29][0].exists() and segs[2][0].exists()
        assert took < 30  # one busy timeout (1 s) per batch, not Frigate's 60 s
        # the rows are left, and said so: attention, receipt
        assert row_paths(db) == {row for _, row in segs.values()}
        (rec,) = receipts(engine)
        assert rec["count"] == 2 and rec["index_rows"] == 0
        assert rec["index_left"] == 2 and rec["index_error"] == f"{db}: locked"
        (att,) = attention_of(engine)
        assert att["site"] == "toll" and att["reason"] == "locked" and att["rows_left"] == 2
        assert str(db) in att["message"] and "2 rows" in att["message"]
        st = engine.status()
        assert st["ok"] is False and any(a["kind"] == RECORDER_INDEX for a in st["attention"])
    finally:
        holder.release()
    # the next batch (another file due) retries the rows left, and the entry clears
    later = footage(site, db, now, [27])
    engine.reconcile()
    out = engine.sweep()
    assert out.deleted == 1 and not later[27][0].exists()
    assert row_paths(db) == {segs[2][1]}
    assert receipts(engine)[-1]["index_rows"] == 3 and "index_left" not in receipts(engine)[-1]
    assert attention_of(engine) == []
    actions = [
        (e.action, e.object)
        for e in engine.audit.entries(action="attention.")
        if RECORDER_INDEX in e.object
    ]
    assert actions == [
        ("attention.raised", f"attention:{RECORDER_INDEX}:toll"),
        ("attention.cleared", f"attention:{RECORDER_INDEX}:toll"),
    ]


def test_a_trigger_that_never_ends_is_stopped_and_the_sweep_goes_on(
    site: Site, now: datetime
) -> None:
    # a database carrying a DELETE trigger of its own that runs for ever held nvr-guard's sweep
    # (and its lock, and Frigate's writer) for good, at every start too
    db = create_frigate_db(site.base / "frigate.db")
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TRIGGER slow BEFORE DELETE ON recordings BEGIN SELECT max(x) FROM "
        "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c); END"
    )
    conn.commit()
    conn.close()
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}, busy_timeout: 1s}}\n")
    segs = footage(site, db, now, [30, 29])
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    t0 = time.monotonic()
    out = engine.sweep()
    assert time.monotonic() - t0 < 30  # it did not return at all
    assert out.deleted == 2 and not any(p.exists() for p, _ in segs.values())
    assert row_paths(db) == {row for _, row in segs.values()}  # rolled back, left
    (att,) = attention_of(engine)
    assert att["reason"] == "slow" and "stopped" in att["message"]


def test_a_locked_database_costs_one_timeout_per_sweep_not_one_per_camera(
    site: Site, now: datetime
) -> None:
    # each (site, camera) batch waited busy_timeout again, holding the daemon's lock throughout
    db = create_frigate_db(site.base / "frigate.db")
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}, busy_timeout: 2s}}\n")
    cams = [f"cam{i}" for i in range(5)]
    for cam in cams:
        start = now - timedelta(hours=30)
        p = write_frigate_segment(site.root, cam, start)
        add_row(db, f"{site.root}/{p.relative_to(site.root).as_posix()}", cam, start)
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    holder = WriteLockHolder(db)
    try:
        t0 = time.monotonic()
        out = engine.sweep()
        took = time.monotonic() - t0
    finally:
        holder.release()
    assert out.deleted == 5
    recs = receipts(engine)
    assert len(recs) == 5 and all(r["index_error"] == f"{db}: locked" for r in recs)
    assert took < 8, took  # one 2 s wait, not five (10 s)
    (att,) = attention_of(engine)
    assert att["rows_left"] == 5


def test_a_trigger_just_under_the_timeout_costs_one_budget_per_sweep(
    site: Site, now: datetime
) -> None:
    # a trigger burning a little less than busy_timeout on every call was never interrupted:
    # the sweep waited for it once per camera (8 cameras: 49 s before the daemon was ready)
    db = create_frigate_db(site.base / "frigate.db")
    conn = sqlite3.connect(db)
    n = 200_000
    t0 = time.monotonic()
    burn = (
        "SELECT max(x) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        "WHERE x < {n}) SELECT x FROM c)"
    )
    conn.execute(burn.format(n=n)).fetchone()
    per = max(time.monotonic() - t0, 1e-3)
    n = int(n * 1.2 / per)  # about 1.2 s per call on this machine now
    conn.execute(f"CREATE TRIGGER burn BEFORE DELETE ON recordings BEGIN {burn.format(n=n)}; END")
    conn.commit()
    conn.close()
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}, busy_timeout: 2s}}\n")
    for i in range(10):
        start = now - timedelta(hours=30)
        p = write_frigate_segment(site.root, f"cam{i}", start)
        add_row(db, f"{site.root}/{p.relative_to(site.root).as_posix()}", f"cam{i}", start)
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    t0 = time.monotonic()
    assert engine.sweep().deleted == 10
    took = time.monotonic() - t0
    assert took < 9, took  # one budget (5 s) and one call over, not ten calls (12 s)
    assert any(r.get("index_error") == f"{db}: slow" for r in receipts(engine))
    (att,) = attention_of(engine)
    assert att["reason"] == "slow"


def test_a_fifo_beside_the_database_never_wedges_the_sweep(site: Site, now: datetime) -> None:
    # SQLite opens frigate.db-journal itself and blocked for ever on a FIFO put there
    import threading

    db = create_frigate_db(site.base / "frigate.db")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}, busy_timeout: 1s}}\n")
    segs = footage(site, db, now, [30])
    os.mkfifo(f"{db}-journal")  # after the rows are in: our own writer would block on it too
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(engine.sweep().deleted), daemon=True)
    t.start()
    t.join(60)
    assert done == [1], "the sweep did not return"
    assert not segs[30][0].exists()
    (att,) = attention_of(engine)
    assert att["reason"] == "not_file" and "-journal" in att["message"]


def test_a_database_path_that_is_not_a_file_is_named_so(site: Site, now: datetime) -> None:
    # replaced by a FIFO after the config was loaded (config check refuses one); it was said
    # not to exist
    fifo = create_frigate_db(site.base / "frigate.db")
    frigate_config(site, f"    recorder: {{kind: frigate, database: {fifo}}}\n")
    old = write_frigate_segment(site.root, "front", now - timedelta(hours=30))
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    fifo.unlink()
    os.mkfifo(fifo)
    engine.reconcile()
    assert engine.sweep().deleted == 1 and not old.exists()
    (att,) = attention_of(engine)
    assert att["reason"] == "not_file" and "not a regular file" in att["message"]


def test_other_schema_leaves_rows_and_deletes_files(site: Site, now: datetime) -> None:
    db = site.base / "not-frigate.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute('CREATE TABLE "recordings" ("id" TEXT PRIMARY KEY, "file" TEXT)')  # no path
    conn.execute("INSERT INTO recordings VALUES ('a', 'x')")
    conn.commit()
    conn.close()
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}}}\n")
    old = write_frigate_segment(site.root, "front", now - timedelta(hours=30))
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    assert engine.sweep().deleted == 1 and not old.exists()
    (att,) = attention_of(engine)
    assert att["reason"] == "schema" and "no path column" in att["message"]
    (rec,) = receipts(engine)
    assert rec["index_rows"] == 0 and rec["index_left"] == 1
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM recordings").fetchone()[0] == 1  # untouched
    conn.close()


def test_missing_database_is_attention_not_an_error(site: Site, now: datetime) -> None:
    db = site.base / "frigate" / "frigate.db"  # Frigate not started yet
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}}}\n")
    r = site.run("config", "check")
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    assert f"{site.config}:" in said and "does not exist (yet)" in said
    old = write_frigate_segment(site.root, "front", now - timedelta(hours=30))
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    assert engine.sweep().deleted == 1 and not old.exists()
    (att,) = attention_of(engine)
    assert att["reason"] == "missing" and att["rows_left"] == 1
    assert not db.exists()  # never created by nvr-guard


def test_docker_paths_are_mapped_through_recordings(site: Site, now: datetime) -> None:
    db = create_frigate_db(site.base / "frigate.db")
    frigate_config(
        site,
        f"    recorder: {{kind: frigate, database: {db}, recordings: {FRIGATE_RECORD_DIR}/}}\n",
    )
    segs = footage(site, db, now, [30, 2], db_root=FRIGATE_RECORD_DIR)
    # a row spelled with the host path is not how this Frigate stores it: never matched
    host_row = str(segs[30][0])
    add_row(db, host_row, "front", now - timedelta(hours=40))
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    assert engine.sweep().deleted == 1
    assert segs[30][1].startswith(FRIGATE_RECORD_DIR + "/")
    assert row_paths(db) == {segs[2][1], host_row}
    assert receipts(engine)[0]["index_rows"] == 1


def test_top_level_recorder_serves_the_sites_of_its_roots_in_chunks(
    site: Site, now: datetime
) -> None:
    db = create_frigate_db(site.base / "frigate.db")
    frigate_config(
        site, "", top_level=f"recorder: {{kind: frigate, database: {db}, roots: [{site.root}]}}\n"
    )
    # 1,200 due segments: three chunks of at most 500 rows, each its own short transaction
    start = now - timedelta(hours=40)
    rows = []
    conn = sqlite3.connect(db)
    for i in range(1200):
        t = start + timedelta(seconds=10 * i)
        p = write_frigate_segment(site.root, "front", t)
        rows.append(str(p))
        conn.execute(
            "INSERT INTO recordings (id, camera, path, start_time, end_time, duration) "
            "VALUES (?, 'front', ?, ?, ?, 10)",
            (f"{t.timestamp()}-x{i}", str(p), t.timestamp(), t.timestamp() + 10),
        )
    conn.commit()
    conn.close()
    young = footage(site, db, now, [1])
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    assert engine.sweep().deleted == 1200
    assert row_paths(db) == {young[1][1]}
    assert sum(r["index_rows"] for r in receipts(engine)) == 1200


def test_a_batch_cut_short_has_its_rows_removed_when_its_receipt_is_recovered(
    site: Site, now: datetime
) -> None:
    """kill -9 between the unlinks and the receipt: the next start writes a ``recovered``
    receipt for the files that are gone, and removes their Frigate rows with it."""
    db = create_frigate_db(site.base / "frigate.db")
    frigate_config(site, f"    recorder: {{kind: frigate, database: {db}}}\n")
    segs = footage(site, db, now, [30, 29, 2])
    clock = FixedClock(now.timestamp())
    engine = Engine(load_config(site.config), clock=clock)
    engine.reconcile()
    sw = engine.sweeper
    plan = sw.plan(clock())
    assert len(plan.deletions) == 2
    # what a purge leaves when killed after its unlinks: a sweep still applying, its items,
    # a purge.begin without receipt, the files gone, their catalog rows still there
    sid = sw.catalog.begin_sweep(
        started=now.timestamp(), actor="nvr-guard", clock=clock(), site_rules={}, state="applying"
    )
    sw.catalog.record_items(sid, plan.items)
    engine.audit.append(
        "nvr-guard",
        "purge.begin",
        "camera:toll/front",
        {"sweep": sid, "site": "toll", "camera": "front", "planned": 2, "digest": "-"},
    )
    for it in plan.deletions:
        Path(it.segment.path.decode()).unlink()
    assert sw.recover_purges() == 2
    (rec,) = receipts(engine)
    assert rec["recovered"] is True and rec["count"] == 2 and rec["index_rows"] == 2
    assert row_paths(db) == {segs[2][1]}


def test_a_config_that_cannot_be_applied_is_refused_whole(
    site: Site, now: datetime, monkeypatch
) -> None:
    # a reload whose expiries could not be computed was reported refused, yet stayed in force
    # half-applied (new rules, old expiries) and stopped all retention
    import pytest

    from nvr_guard.errors import ConfigError

    frigate_config(site, "")
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    old = engine.config
    site.config.write_text(site.config.read_text().replace("keep: 1d", "keep: 2d"))
    new = load_config(site.config)

    def broken(*_a: object) -> None:
        raise ValueError("year 10026 is out of range")

    monkeypatch.setattr(engine.catalog, "recompute_expiry", broken)
    with pytest.raises(ConfigError, match="the old config stays"):
        engine.apply_config(new, "root")
    assert engine.config is old
    assert engine.rules["toll"].describe() == old.site_rules()["toll"].describe()
    assert not list(engine.audit.entries(action="config.reload"))
