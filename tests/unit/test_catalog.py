"""The SQLite catalog: schema, segments, expiry index, holds, sweeps, crash consistency."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.errors import InvalidInput
from nvr_guard.model import Action, ClockReading, Item, Segment, SiteRules
from nvr_guard.retention import policy
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.store.catalog import SCHEMA_VERSION, Catalog, pack_rows
from nvr_guard.text import Duration

SH = ZoneInfo("Asia/Shanghai")
DAY = 86400.0
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=SH).timestamp()


def rules(site: str = "gate", keep: str | None = "10d", min_keep: str | None = None) -> SiteRules:
    return SiteRules(
        site=site,
        keep=Duration.parse(keep) if keep else None,
        min_keep=Duration.parse(min_keep) if min_keep else None,
        tz=SH,
        settle=120.0,
    )


def seg(
    name: str, start: float, site: str = "gate", camera: str = "cam1", size: int = 10
) -> Segment:
    path = f"/rec/{site}/{camera}/{name}.mp4".encode()
    return Segment(site, camera, path, start, start + 60, size)


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.db", expiry=ExpiryCalc)
    yield c
    c.close()


def tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_fresh_database_gets_every_table_and_the_current_version(tmp_path: Path) -> None:
    c = Catalog(tmp_path / "catalog.db")
    assert c.schema_version == SCHEMA_VERSION
    assert {"segments", "dirs", "holds", "sweeps", "sweep_items", "audit"} <= tables(c.conn)
    assert c.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    indexes = {r[0] for r in c.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"segments_expires", "segments_site_camera"} <= indexes
    # dropped by migration 4: (site, camera, start) serves its queries
    assert "segments_site_start" not in indexes
    c.close()


def test_reopen_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    c = Catalog(tmp_path / "catalog.db", expiry=ExpiryCalc)
    c.upsert_segments([seg("a", NOW)], {"gate": rules()})
    c.close()
    c2 = Catalog(tmp_path / "catalog.db")
    assert c2.schema_version == SCHEMA_VERSION
    assert c2.count() == 1
    c2.close()


def test_a_newer_schema_is_refused_not_downgraded(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    Catalog(db).close()
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    raw.commit()
    raw.close()
    with pytest.raises(RuntimeError, match="newer"):
        Catalog(db)


def test_upsert_get_update_remove(cat: Catalog) -> None:
    a, b = seg("a", NOW - 5 * DAY), seg("b", NOW - 4 * DAY, camera="cam2")
    assert cat.upsert_segments([a, b], {"gate": rules()}) == 2
    got = cat.get(a.path)
    assert got is not None and (got.site, got.camera, got.start, got.size) == (
        "gate",
        "cam1",
        a.start,
        10,
    )
    # same path again: refreshed in place, not duplicated
    cat.upsert_segments(
        [Segment("gate", "cam1", a.path, a.start, a.mtime + 5, 99)], {"gate": rules()}
    )
    assert cat.count() == 2
    got = cat.get(a.path)
    assert got is not None and got.size == 99
    assert cat.count("gate") == 2 and cat.count("other") == 0
    assert cat.bytes_by_site() == {"gate": 109}
    assert cat.camera_totals([("gate", "cam1"), ("gate", "cam2"), ("gate", "none")]) == {
        ("gate", "cam1"): 1,
        ("gate", "cam2"): 1,
        ("gate", "none"): 0,
    }
    assert cat.remove_paths([a.path, b"/not/there.mp4"]) == 1
    assert cat.get(a.path) is None and cat.count() == 1


def test_remove_segments_by_id_only_while_the_row_holds_that_path(cat: Catalog) -> None:
    a, b, c = (
        Segment("gate", "cam1", f"/rec/gate/cam1/{n}.mp4".encode(), NOW, NOW, 1) for n in "abc"
    )
    cat.upsert_segments([a, b, c], {"gate": rules()})
    ga, gb = cat.get(a.path), cat.get(b.path)
    assert ga is not None and gb is not None and ga.id is not None and gb.id is not None
    # b's id now names another path (a row freed and reused): that row must stay
    stale = Segment("gate", "cam1", b"/rec/gate/cam1/gone.mp4", NOW, NOW, 1, id=gb.id)
    assert cat.remove_segments([ga, stale, c]) == 2  # c has no id: removed by path
    assert cat.get(a.path) is None and cat.get(c.path) is None
    assert cat.get(b.path) is not None and cat.count() == 1


def test_remove_segments_in_chunks_checks_every_path(cat: Catalog) -> None:
    segs = [
        Segment("gate", "cam1", b"/rec/gate/cam1/%04d.mp4" % i, NOW + i, NOW + i, 1)
        for i in range(1300)
    ]
    cat.upsert_segments(segs, {"gate": rules()})
    stored = cat.segments_of("gate", "cam1", NOW - 1, NOW + 2000)
    assert len(stored) == 1300 and all(s.id is not None for s in stored)
    # every 97th id now stands for another path: those rows stay, on both sides of the
    # chunk boundaries (500, 1000)
    planned = [
        s if k % 97 else Segment(s.site, s.camera, b"/elsewhere.mp4", s.start, s.mtime, 1, id=s.id)
        for k, s in enumerate(stored)
    ]
    kept = {s.path for k, s in enumerate(stored) if k % 97 == 0}
    assert cat.remove_segments(planned) == 1300 - len(kept)
    left = {s.path for s in cat.segments_of("gate", "cam1", NOW - 1, NOW + 2000)}
    assert left == kept and len(kept) == 14


def test_non_utf8_and_newline_paths_round_trip(cat: Catalog) -> None:
    odd = Segment("gate", "cam1", b"/rec/gate/cam1/\xff\xfe\nx.mp4", NOW, NOW, 1)
    cat.upsert_segments([odd], {"gate": rules()})
    got = cat.get(odd.path)
    assert got is not None and got.path == odd.path


@pytest.mark.parametrize(
    ("offset", "due"),
    [(-1.0, True), (0.0, True), (2.0, False), (3600.0, False)],
)
def test_due_segments_returns_exactly_the_expired(cat: Catalog, offset: float, due: bool) -> None:
    # expiry = end (mtime = start + 60 s) + 10d; a segment whose expiry is `offset` s after now
    s = seg("x", NOW - 10 * DAY - 60 + offset)
    young = seg("young", NOW - 1 * DAY)
    cat.upsert_segments([s, young], {"gate": rules()})
    got = [g.path for g in cat.due_segments(NOW, "gate", rules())]
    assert got == ([s.path] if due else [])


def test_due_segments_reads_through_the_expiry_index(cat: Catalog) -> None:
    plan = cat.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM segments INDEXED BY segments_expires "
        "WHERE expires_at <= ? AND site = ?",
        (NOW, "gate"),
    ).fetchall()
    assert any("segments_expires" in str(row) for row in plan)


def test_due_segments_of_all_sites_and_keep_forever(cat: Catalog) -> None:
    by_site = {"gate": rules("gate", "10d"), "vault": rules("vault", None)}
    old = NOW - 400 * DAY
    cat.upsert_segments([seg("g", old, site="gate"), seg("v", old, site="vault")], by_site)
    got = cat.due_segments(NOW, None, by_site)
    assert [g.site for g in got] == ["gate"]


def test_rule_change_recomputes_expiry_before_answering(cat: Catalog) -> None:
    s = seg("x", NOW - 7 * DAY)
    cat.upsert_segments([s], {"gate": rules(keep="10d")})
    assert cat.due_segments(NOW, "gate", rules(keep="10d")) == []
    # the config now says 5d: the stored expiry was computed with 10d and must not be trusted
    got = cat.due_segments(NOW, "gate", rules(keep="5d"))
    assert [g.path for g in got] == [s.path]
    row = cat.conn.execute("SELECT expires_at FROM segments").fetchone()
    assert row[0] == pytest.approx(s.start + 5 * DAY)


@pytest.mark.parametrize("rebuild_from", [1, 10**9])
def test_recomputed_expiries_are_found_through_the_index_either_way(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch, rebuild_from: int
) -> None:
    # most of the table changing, the expiry index is dropped and built again in the same
    # transaction (rebuild_from 1); otherwise it is updated row by row: the same answers
    import nvr_guard.store.segments as segments

    monkeypatch.setattr(segments, "_REBUILD_MIN", rebuild_from)
    gate = [seg(f"g{i}", NOW - i * DAY) for i in range(12)]
    vault = [seg("v", NOW - 11 * DAY, site="vault")]
    by_site = {"gate": rules("gate", "10d"), "vault": rules("vault", "10d")}
    cat.upsert_segments([*gate, *vault], by_site)
    assert cat.recompute_expiry("gate", rules("gate", "5d")) == 12
    got = cat.due_segments(NOW, "gate", rules("gate", "5d"))
    assert sorted(g.path for g in got) == sorted(s.path for s in gate[6:])  # ended > 5 d ago
    assert [g.path for g in cat.due_segments(NOW, "vault", by_site["vault"])] == [vault[0].path]
    indexes = {r[0] for r in cat.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "segments_expires" in indexes


@pytest.mark.parametrize(
    "local",
    [
        datetime(2026, 8, 31, 10, 0, 7),  # + 6mo clamps to 28 Feb
        datetime(2026, 8, 30, 23, 59, 59),
        datetime(2024, 2, 29, 0, 30),
        datetime(2026, 5, 17, 3, 15, 1),
    ],
)
def test_memoised_calendar_expiry_matches_the_policy(local: datetime) -> None:
    r = rules(keep="6mo")
    calc = ExpiryCalc(r)
    start = local.replace(tzinfo=SH).timestamp()
    for delta in (0.0, 1.5, 59.0, 1799.0):
        want = policy.expiry(start + delta, r)
        assert want is not None
        assert calc(start + delta) == pytest.approx(want, abs=1e-3)


def test_oldest_segments_and_segments_of(cat: Catalog) -> None:
    segs = [seg(f"s{i}", NOW - i * 3600, camera="cam1" if i % 2 else "cam2") for i in range(6)]
    cat.upsert_segments(segs, {"gate": rules()})
    oldest = cat.oldest_segments("gate", 2)
    assert [s.start for s in oldest] == [NOW - 5 * 3600, NOW - 4 * 3600]
    inside = cat.segments_of("gate", "cam1", NOW - 3.5 * 3600, NOW)
    # cam1 has i = 1, 3, 5; start 3 h ago is inside, 5 h ago ended (mtime +60 s) before the range
    assert sorted(s.start for s in inside) == [NOW - 3 * 3600, NOW - 3600]


def test_holds_add_release_and_active(cat: Catalog) -> None:
    h1 = cat.add_hold(
        start=NOW - DAY,
        end=NOW,
        reason="incident 42",
        owner="alice",
        created=NOW,
        site="gate",
        camera="cam1",
    )
    h2 = cat.add_hold(
        start=NOW - DAY, end=NOW, reason="audit", owner="bob", created=NOW, until=NOW + 3600
    )
    assert [h.id for h in cat.active_holds(NOW)] == [h1.id, h2.id]
    # h2 ends by itself
    assert [h.id for h in cat.active_holds(NOW + 7200)] == [h1.id]
    released = cat.release_hold(h1.id, "carol", "case closed", now=NOW + 10)
    assert released.released == NOW + 10
    assert cat.hold_release_info(h1.id) == ("carol", "case closed")
    assert [h.id for h in cat.active_holds(NOW + 20)] == [h2.id]
    assert [h.id for h in cat.list_holds()] == [h2.id]
    assert [h.id for h in cat.list_holds(include_released=True)] == [h1.id, h2.id]
    with pytest.raises(InvalidInput, match="already released"):
        cat.release_hold(h1.id, "carol", "again")
    with pytest.raises(InvalidInput, match="does not exist"):
        cat.release_hold(999, "carol", "?")
    with pytest.raises(InvalidInput):
        cat.add_hold(start=NOW, end=NOW - 1, reason="x", owner="a", created=NOW)


def test_sweeps_and_history(cat: Catalog) -> None:
    assert cat.last_history().last_wall is None
    clock = ClockReading(NOW, 5000.0, "boot-a")
    s1 = cat.begin_sweep(
        started=NOW, actor="daemon", clock=clock, site_rules={"gate": "keep=10d min_keep=none"}
    )
    s = seg("x", NOW - 20 * DAY)
    cat.record_items(s1, [Item(s, Action.DELETE, "expired: keep=10d")])
    cat.set_sweep_state(s1, "done", finished=NOW + 1, deleted=1, bytes_=10)
    later = ClockReading(NOW + 300, 5300.0, "boot-a")
    s2 = cat.begin_sweep(started=NOW + 300, actor="daemon", clock=later, site_rules={})
    cat.set_sweep_state(s2, "blocked", message="mass-deletion guard")
    hist = cat.last_history()
    # the blocked sweep applied nothing: history is the last applied one
    assert (hist.last_wall, hist.last_boottime, hist.boot_id) == (NOW, 5000.0, "boot-a")
    assert hist.site_rules == {"gate": "keep=10d min_keep=none"}
    rec = cat.get_sweep(s1)
    assert rec is not None and (rec.state, rec.deleted, rec.bytes) == ("done", 1, 10)
    items = cat.sweep_items(s1)
    assert [(i.path, i.action, i.reason) for i in items] == [
        (s.path, "delete", "expired: keep=10d")
    ]
    cat.set_sweep_state(s2, "confirmed")
    assert cat.last_history().last_wall == NOW + 300
    with pytest.raises(ValueError):
        cat.set_sweep_state(s2, "bogus")


def test_a_version_1_catalog_is_migrated_in_place(tmp_path: Path) -> None:
    from nvr_guard.store.catalog import MIGRATIONS

    db = tmp_path / "catalog.db"
    raw = sqlite3.connect(db)
    MIGRATIONS[0](raw)
    raw.execute("PRAGMA user_version = 1")
    raw.execute(
        "INSERT INTO segments (site, camera, path, start, mtime, size, expires_at) "
        "VALUES ('gate', 'c', x'2f612e6d7034', 1.0, 1.0, 1, 2.0)"
    )
    raw.commit()
    raw.close()
    c = Catalog(db)
    assert c.schema_version == SCHEMA_VERSION >= 4
    assert "site_layouts" in tables(c.conn)
    indexes = {r[0] for r in c.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "segments_site_start" not in indexes and "segments_site_camera" in indexes
    assert c.get(b"/a.mp4") is not None
    c.close()


def test_opening_does_not_wait_for_another_writer(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    daemon = Catalog(db)
    daemon.conn.execute("BEGIN IMMEDIATE")  # e.g. a long cold reconcile holding the write lock
    try:
        t = time.monotonic()
        cli = Catalog(db, timeout=5.0)
        assert time.monotonic() - t < 2.0
        assert cli.count() == 0
        cli.close()
    finally:
        daemon.conn.rollback()
        daemon.close()


def test_upsert_with_new_rules_brings_the_site_rows_along(cat: Catalog) -> None:
    a = seg("a", NOW - 7 * DAY)
    cat.upsert_segments([a], {"gate": rules(keep="10d")})
    cat.upsert_segments([seg("b", NOW)], {"gate": rules(keep="5d")})
    row = cat.conn.execute("SELECT expires_at FROM segments WHERE path = ?", (a.path,)).fetchone()
    assert row[0] == a.mtime + 5 * DAY  # past keep by both times: the end counts


# ---- bulk loading ---------------------------------------------------------------------------


def _rows(
    n: int, size: int = 1
) -> list[tuple[str, str, bytes, float, float, int, float, float | None]]:
    # every other row with an end read from its path
    return [
        (
            "gate",
            f"c{i % 3}",
            b"/r/c%d/%06d.mp4" % (i % 3, i),
            1e9 + i,
            1e9 + i,
            size,
            2e9 + i,
            1e9 + i + 60 if i % 2 else None,
        )
        for i in range(n)
    ]


def _dump(cat: Catalog) -> list[tuple[object, ...]]:
    return cat.conn.execute(
        "SELECT site, camera, path, start, mtime, size, expires_at FROM segments ORDER BY path"
    ).fetchall()


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 129, 1000])
def test_packed_rows_load_and_update_exactly_like_plain_rows(tmp_path: Path, n: int) -> None:
    plain, packed = Catalog(tmp_path / "a.db"), Catalog(tmp_path / "b.db")
    with plain.bulk_load():
        plain.apply_rows(_rows(n), (), fresh=True)
    with packed.bulk_load():
        p = pack_rows(_rows(n))
        assert len(p) == n
        packed.apply_rows(p, (), fresh=True)
    assert _dump(packed) == _dump(plain) and len(_dump(plain)) == n
    # the upsert form: the same paths with new values replace the rows, none is added
    plain.apply_rows(_rows(n, size=7), ())
    packed.apply_rows(pack_rows(_rows(n, size=7)), ())
    assert _dump(packed) == _dump(plain)
    assert {r[5] for r in _dump(packed)} <= {7} and packed.count() == n
    plain.close()
    packed.close()


def test_oldest_segments_merge_cameras_by_start_then_path(cat: Catalog) -> None:
    import random

    rnd = random.Random(7)
    segs = []
    for i in range(400):
        site = "gate" if i % 5 else "lobby"
        # few distinct starts: many ties across and within cameras, broken by path
        start = NOW - rnd.randrange(40) * 60
        segs.append(Segment(site, f"cam{rnd.randrange(6)}", b"/rec/%03d.mp4" % i, start, start, 1))
    cat.upsert_segments(segs, {"gate": rules(), "lobby": rules("lobby")})
    for site in ("gate", "lobby", "none"):
        everything = cat.conn.execute(
            "SELECT path FROM segments NOT INDEXED WHERE site = ? ORDER BY start, path", (site,)
        ).fetchall()
        for limit in (0, 1, 7, 50, len(everything), len(everything) + 5):
            got = [s.path for s in cat.oldest_segments(site, limit)]
            assert got == [p for (p,) in everything[:limit]]


def test_oldest_segments_under_a_root_leave_out_what_is_mounted_inside_it(cat: Catalog) -> None:
    """A file system mounted inside a root (cross_mounts) is another volume: its rows do not
    fill the batch of the root's volume, nested either way."""
    paths = [b"/r/c3/old", b"/r/c3/x/mid", b"/r/c1/new", b"/q/other"]
    segs = [Segment("gate", "c", p, NOW - 100 + i, NOW - 100 + i, 1) for i, p in enumerate(paths)]
    cat.upsert_segments(segs, {"gate": rules()})

    def got(under: list[bytes], not_under: dict[bytes, list[bytes]]) -> list[bytes]:
        return [s.path for s in cat.oldest_segments("gate", 10, under, not_under)]

    assert got([b"/r", b"/r/c3/x"], {b"/r": [b"/r/c3"]}) == [b"/r/c3/x/mid", b"/r/c1/new"]
    assert got([b"/r/c3"], {b"/r/c3": [b"/r/c3/x"]}) == [b"/r/c3/old"]
    assert got([b"/r"], {}) == paths[:3]


def test_a_bulk_load_reaches_the_database_file_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    cat = Catalog(db)
    with cat.bulk_load():
        cat.apply_rows(_rows(60_000), (), fresh=True)
    # the commit left the rows in the WAL; the background checkpoint copies them into the
    # database file (seen here through a copy of that file alone), and this connection's
    # commits checkpoint as usual again afterwards
    for t in threading.enumerate():  # none left if it has finished already
        if t.name == "catalog-checkpoint":
            t.join(timeout=60)
            assert not t.is_alive()
    snap = tmp_path / "snap.db"
    snap.write_bytes(db.read_bytes())
    raw = sqlite3.connect(snap)
    assert raw.execute("SELECT count(*) FROM segments").fetchone()[0] == 60_000
    raw.close()
    assert cat.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    cat.close()


def test_a_failed_bulk_load_leaves_nothing_and_checkpoints_as_usual(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    with pytest.raises(RuntimeError, match="walk failed"):
        with cat.bulk_load():
            cat.apply_rows(_rows(500), (), fresh=True)
            raise RuntimeError("walk failed")
    assert cat.count() == 0
    indexes = {r[0] for r in cat.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"segments_expires", "segments_site_camera"} <= indexes
    assert cat.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    cat.close()


def test_a_small_bulk_load_checkpoints_at_its_commit(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.db")
    with cat.bulk_load():
        cat.apply_rows(_rows(300), (), fresh=True)
    # nothing left for a background thread: the commit checkpointed as any other
    assert cat.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    busy, _, _ = cat.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and cat.count() == 300
    cat.close()
