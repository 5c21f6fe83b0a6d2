"""A segment's end read from its path (Dahua's start-end, Nx Witness's duration): stored by
migration 9's ``segments.end``, handed out as ``Segment.path_end``, and used instead of the
mtime by the range queries, holds and estimated starts."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.model import Hold, Segment, SiteRules
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.store.catalog import Catalog
from nvr_guard.store.schema import MIGRATIONS, SCHEMA_VERSION, _migration_9
from nvr_guard.text import Duration

UTC = ZoneInfo("UTC")
T = 1_800_000_000.0
RULES = {"gate": SiteRules("gate", Duration.parse("10d"), None, UTC, 120.0)}


def seg(name: str, start: float, mtime: float, end: float | None) -> Segment:
    return Segment("gate", "c", f"/rec/c/{name}.dav".encode(), start, mtime, 10, None, end)


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.db", expiry=ExpiryCalc)
    yield c
    c.close()


def test_a_version_8_catalog_gains_the_end_column(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    raw = sqlite3.connect(db)
    before = MIGRATIONS.index(_migration_9)
    for m in MIGRATIONS[:before]:
        m(raw)
    raw.execute(f"PRAGMA user_version = {before}")
    raw.execute(
        "INSERT INTO segments (site, camera, path, start, mtime, size, expires_at) "
        "VALUES ('gate', 'c', x'2f612e6d7034', 1.0, 2.0, 1, 3.0)"
    )
    raw.commit()
    assert "end" not in {r[1] for r in raw.execute("PRAGMA table_info(segments)")}
    raw.close()
    with Catalog(db, expiry=ExpiryCalc) as c:
        assert c.schema_version == SCHEMA_VERSION > before
        old = c.get(b"/a.mp4")
        assert old is not None and old.path_end is None and old.end == 2.0  # the mtime
        c.upsert_segments([seg("new", T, T + 200, T + 300)], RULES)
        new = c.get(b"/rec/c/new.dav")
        assert new is not None and (new.path_end, new.end) == (T + 300, T + 300)
    # opened again (and the migration run twice, as after a renumbering): unchanged
    raw = sqlite3.connect(db)
    _migration_9(raw)
    assert raw.execute('SELECT "end" FROM segments ORDER BY id').fetchall() == [(None,), (T + 300,)]
    raw.close()


def test_range_queries_use_the_paths_end(cat: Catalog) -> None:
    # a recorder that preallocates: the mtime is before the end the name gives
    early = seg("early", T + 1000, T + 1010, T + 1300)
    # a camera whose clock was reset: an old name, written now (the later mtime still counts)
    reset = seg("reset", T - 86400, T + 5000, T - 86400 + 300)
    cat.upsert_segments([early, reset], RULES)
    names = lambda lo, hi: [s.path for s in cat.segments_of("gate", "c", lo, hi)]  # noqa: E731
    assert names(T + 1200, T + 1250) == [reset.path, early.path]  # by the mtime alone: lost
    assert names(T + 1400, T + 1500) == [reset.path]
    assert names(T + 6000, T + 7000) == []


def test_a_hold_covers_by_the_paths_end() -> None:
    hold = Hold(1, "case", "root", T + 1200, T + 1250)
    early = seg("early", T + 1000, T + 1010, T + 1300)
    assert hold.covers(early, T) and early.end == T + 1300
    assert not hold.covers(seg("plain", T + 1000, T + 1010, None), T)
    # the name's end never shortens the footage: a reset clock's fresh file stays held
    reset = seg("reset", T - 86400, T + 5000, T - 86400 + 300)
    assert Hold(2, "case", "root", T + 4000, T + 4500).covers(reset, T)
    assert reset.end == T + 5000


def test_a_path_end_is_never_taken_for_an_mtime_only_file(cat: Catalog) -> None:
    # start == mtime marks a file timed by its mtime alone; with an end from its path it is not
    timed = seg("timed", T, T, T + 60)
    cat.upsert_segments([timed, seg("prev", T - 600, T - 600, None)], RULES)
    got = {s.path: s for s in cat.segments_of("gate", "c", T, T + 30)}
    assert got[timed.path].start == T and got[timed.path].path_end == T + 60


def test_a_hold_covers_a_file_from_a_camera_whose_clock_runs_ahead() -> None:
    # named 15:09 by a camera 9 minutes fast, closed at 15:01 by the host's clock: the hold over
    # 15:00-15:05 (when the host wrote it) must hold it; it was deleted
    ahead = Segment("gate", "c", b"/rec/c/15/09.00.mp4", T + 540, T + 60, 10)
    assert Hold(1, "case", "root", T, T + 300).covers(ahead, T)
    # the name carries no length: a hold inside the minute before its mtime (when the host
    # wrote it) holds it too; it was held only from the mtime on
    assert Hold(4, "case", "root", T + 5, T + 50).covers(ahead, T)
    # with a length in its name, the footage began that long before its mtime
    dav = seg("dav", T + 540, T + 60, T + 840)
    assert Hold(2, "case", "root", T - 240, T - 200).covers(dav, T)
    assert not Hold(3, "case", "root", T - 600, T - 300).covers(dav, T)


def test_range_queries_follow_a_camera_whose_clock_runs_ahead(cat: Catalog) -> None:
    ahead = Segment("gate", "c", b"/rec/c/15/09.00.mp4", T + 540, T + 60, 10)
    cat.upsert_segments([ahead], RULES)
    assert [s.path for s in cat.segments_of("gate", "c", T, T + 300)] == [ahead.path]
    assert [s.path for s in cat.segments_of("gate", "c", T + 5, T + 50)] == [ahead.path]
