"""The scanner on real temporary trees: layouts, symlinks, odd names, incremental, inotify hints."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

from nvr_guard.model import SiteRules
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.layout import Layout
from nvr_guard.retention.scan import Scanner, SiteScan
from nvr_guard.retention.watch import Watcher
from nvr_guard.store.catalog import Catalog
from nvr_guard.text import Duration
from tests.fixtures.locks import ContendedLock

SH = ZoneInfo("Asia/Shanghai")
UTC = ZoneInfo("UTC")
EXTS = frozenset({".mp4", ".mkv", ".ts"})


def rules(site: str = "gate") -> SiteRules:
    return SiteRules(site, Duration.parse("30d"), None, SH, 120.0)


def site(root: Path, layout: str | None = None, tz: ZoneInfo = SH, name: str = "gate") -> SiteScan:
    lay = Layout.compile(layout, tz) if layout else None
    return SiteScan(name, [os.fsencode(root)], lay, EXTS, rules(name))


def touch(root: Path | bytes, rel: str | bytes, mtime: float | None = None) -> bytes:
    path = os.path.join(os.fsencode(root), os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"x" * 3)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    c = (
        Catalog(tmp_path / "state" / "catalog.db", expiry=ExpiryCalc)
        if _mk(tmp_path / "state")
        else None
    )
    assert c is not None
    yield c
    c.close()


def _mk(p: Path) -> bool:
    p.mkdir(parents=True, exist_ok=True)
    return True


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "rec"
    r.mkdir()
    return r


def catalogued(cat: Catalog) -> dict[bytes, tuple[str, str, float]]:
    rows = cat.conn.execute("SELECT path, site, camera, start FROM segments").fetchall()
    return {bytes(p): (s, c, st) for p, s, c, st in rows}


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)  # polling interval of a deadline loop, not a synchronisation sleep
    return cond()


@pytest.mark.parametrize(
    ("layout", "tz", "rel", "camera", "start"),
    [
        (
            "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
            SH,
            "gate-03/2026-11-20/14/05.07.mp4",
            "gate-03",
            datetime(2026, 11, 20, 14, 5, 7, tzinfo=SH),
        ),
        # Frigate: camera below the hour, path time written in UTC
        (
            "%Y-%m-%d/%H/{camera}/%M.%S.mp4",
            UTC,
            "2026-11-20/06/front/05.00.mp4",
            "front",
            datetime(2026, 11, 20, 14, 5, 0, tzinfo=SH),
        ),
        (
            "%Y/%m/%d/{camera}/%H%M%S.ts",
            SH,
            "2026/02/28/lobby/235959.ts",
            "lobby",
            datetime(2026, 2, 28, 23, 59, 59, tzinfo=SH),
        ),
        # extension compared case-insensitively, the pattern's own extension is not binding
        (
            "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
            SH,
            "gate-03/2026-11-20/14/05.07.MKV",
            "gate-03",
            datetime(2026, 11, 20, 14, 5, 7, tzinfo=SH),
        ),
    ],
)
def test_layout_gives_camera_and_start(
    cat: Catalog, root: Path, layout: str, tz: ZoneInfo, rel: str, camera: str, start: datetime
) -> None:
    path = touch(root, rel)
    touch(root, "gate-03/notes/readme.mp4")  # does not match the layout
    touch(root, "stray.mp4")  # directly in the root
    stats = Scanner(cat, [site(root, layout, tz)], workers=1).reconcile()
    assert catalogued(cat) == {path: ("gate", camera, start.timestamp())}
    assert (stats.added, stats.files, stats.ignored) == (1, 1, 2)


def test_without_layout_camera_is_first_level_and_start_is_mtime(cat: Catalog, root: Path) -> None:
    t = datetime(2026, 11, 1, 8, 0, tzinfo=SH).timestamp()
    deep = touch(root, "cam-a/2026/11/01/0800.mp4", mtime=t)
    flat = touch(root, "cam-b/clip.ts", mtime=t + 60)
    touch(root, "loose.mp4")  # no camera directory
    stats = Scanner(cat, [site(root)], workers=1).reconcile()
    assert catalogued(cat) == {deep: ("gate", "cam-a", t), flat: ("gate", "cam-b", t + 60)}
    assert stats.ignored == 1
    seg = cat.get(deep)
    assert seg is not None and seg.mtime == t and seg.size == 3


def test_symlinks_are_never_catalogued(cat: Catalog, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    elsewhere = touch(outside, "evidence.mp4")
    touch(outside, "sub/more.mp4")
    real = touch(root, "cam1/real.mp4")
    os.symlink(elsewhere, os.path.join(root, "cam1", "link-out.mp4"))
    os.symlink(real, os.path.join(root, "cam1", "link-in.mp4"))
    os.symlink(outside / "sub", root / "cam1" / "linked-dir")
    os.symlink(outside, root / "cam2")  # a whole "camera" that is a symlink
    scanner = Scanner(cat, [site(root)], workers=1)
    stats = scanner.reconcile()
    assert set(catalogued(cat)) == {real}
    assert stats.ignored == 4
    # a hint for a path below a symlinked directory is refused as well
    assert scanner.hint(os.path.join(os.fsencode(root), b"cam2", b"evidence.mp4")) == "ignored"
    assert scanner.hint(os.path.join(os.fsencode(root), b"cam1", b"link-out.mp4")) == "ignored"
    assert set(catalogued(cat)) == {real}


def test_wrong_extensions_are_ignored(cat: Catalog, root: Path) -> None:
    good = touch(root, "cam1/a.mp4")
    for rel in ("cam1/a.mp4.part", "cam1/a.jpg", "cam1/.mp4", "cam1/noext"):
        touch(root, rel)
    stats = Scanner(cat, [site(root)], workers=1).reconcile()
    assert set(catalogued(cat)) == {good}
    assert stats.ignored == 4


def test_undecodable_and_newline_names_are_catalogued(cat: Catalog, root: Path) -> None:
    odd = touch(root, b"cam\xff/seg\nment \xfe.mp4")
    scanner = Scanner(cat, [site(root)], workers=1)
    scanner.reconcile()
    got = catalogued(cat)
    assert set(got) == {odd}
    assert got[odd][1] == "cam\\xff"  # shown escaped, stored as valid text
    # and with a layout, the camera part may be undecodable too
    cat2 = Catalog(Path(os.fsdecode(os.path.dirname(cat.path))) / "other.db", expiry=ExpiryCalc)
    lay = touch(root, b"c\xe9am/2026-11-20/14/05.07.mp4")
    Scanner(cat2, [site(root, "{camera}/%Y-%m-%d/%H/%M.%S.mp4")], workers=1).reconcile()
    assert set(catalogued(cat2)) == {lay}
    cat2.close()


def test_vanished_files_and_directories_are_removed(cat: Catalog, root: Path) -> None:
    a = touch(root, "cam1/d1/a.mp4")
    b = touch(root, "cam1/d2/b.mp4")
    c = touch(root, "cam2/c.mp4")
    scanner = Scanner(cat, [site(root)], workers=1)
    assert scanner.reconcile().added == 3
    os.unlink(a)
    os.unlink(c)
    os.rmdir(root / "cam2")
    stats = scanner.reconcile()
    assert stats.removed == 2
    assert set(catalogued(cat)) == {b}


def test_reconcile_updates_changed_files_and_is_quiet_when_nothing_changed(
    cat: Catalog, root: Path
) -> None:
    a = touch(root, "cam1/a.mp4", mtime=1_700_000_000)
    scanner = Scanner(cat, [site(root)], workers=1)
    scanner.reconcile()
    again = scanner.reconcile()
    assert (again.added, again.updated, again.removed, again.files) == (0, 0, 0, 1)
    with open(a, "ab") as fh:
        fh.write(b"more")
    os.utime(a, (1_700_000_100, 1_700_000_100))
    assert scanner.reconcile().updated == 1
    seg = cat.get(a)
    assert seg is not None and (seg.size, seg.mtime) == (7, 1_700_000_100)


def test_incremental_picks_up_new_and_deleted_files(cat: Catalog, root: Path) -> None:
    old_t = time.time() - 3600
    a = touch(root, "cam1/d1/a.mp4")
    b = touch(root, "cam1/d1/b.mp4")
    scanner = Scanner(cat, [site(root)], workers=1)
    scanner.reconcile()
    # make every directory look settled (not "racy"), as it would be minutes later
    for d in (root, root / "cam1", root / "cam1" / "d1"):
        os.utime(d, (old_t, old_t))
    scanner.reconcile()
    quiet = scanner.incremental()
    assert (quiet.added, quiet.removed, quiet.updated, quiet.dirs) == (0, 0, 0, 0)

    new = touch(root, "cam1/d1/c.mp4")
    os.unlink(a)
    newdir = touch(root, "cam1/d2/deep/x.mp4")
    stats = scanner.incremental()
    assert (stats.added, stats.removed) == (2, 1)
    assert set(catalogued(cat)) == {b, new, newdir}

    # a removed directory: its rows go without listing anything else
    os.unlink(newdir)
    os.rmdir(root / "cam1" / "d2" / "deep")
    os.rmdir(root / "cam1" / "d2")
    assert scanner.incremental().removed == 1
    assert set(catalogued(cat)) == {b, new}


def test_incremental_on_a_never_walked_site_does_a_full_walk(cat: Catalog, root: Path) -> None:
    a = touch(root, "cam1/a.mp4")
    stats = Scanner(cat, [site(root)], workers=1).incremental()
    assert stats.added == 1 and set(catalogued(cat)) == {a}


def test_reconcile_forgets_sites_and_roots_no_longer_configured(
    cat: Catalog, root: Path, tmp_path: Path
) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    a = touch(root, "cam1/a.mp4")
    o = touch(other_root, "cam9/o.mp4")
    Scanner(cat, [site(root), site(other_root, name="yard")], workers=1).reconcile()
    assert set(catalogued(cat)) == {a, o}
    Scanner(cat, [site(root)], workers=1).reconcile()
    assert set(catalogued(cat)) == {a}


def test_hint_adds_refreshes_and_removes(cat: Catalog, root: Path, tmp_path: Path) -> None:
    scanner = Scanner(cat, [site(root, "{camera}/%Y-%m-%d/%H/%M.%S.mp4")], workers=1)
    p = touch(root, "gate/2026-11-20/14/05.07.mp4")
    assert scanner.hint(p) == "added"
    assert scanner.hint(p) == "unchanged"
    with open(p, "ab") as fh:
        fh.write(b"more")
    assert scanner.hint(p) == "updated"
    os.unlink(p)
    assert scanner.hint(p) == "removed"
    assert scanner.hint(os.fsencode(tmp_path / "elsewhere.mp4")) == "ignored"
    d = touch(root, "gate/2026-11-21/00/00.00.mp4")
    assert scanner.hint(os.path.dirname(os.path.dirname(d))) == "walked"
    assert set(catalogued(cat)) == {d}


def test_a_hint_beside_an_incremental_pass_does_not_deadlock(root: Path, tmp_path: Path) -> None:
    # the daemon's watcher calls hint() on its own thread while the scheduler's incremental pass
    # holds the engine's (the catalog's) lock and then wants the scanner's: a hint that took the
    # scanner's lock first and then waited for the catalog's stopped both for good. Its own
    # catalog, closed only when both threads are done (a deadlocked one would hang the close)
    (tmp_path / "own").mkdir()
    cat = Catalog(tmp_path / "own" / "catalog.db", expiry=ExpiryCalc)
    lay = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"
    scanner = Scanner(cat, [site(root, lay)], workers=1)
    touch(root, "gate/2026-11-20/14/05.07.mp4")
    scanner.reconcile()
    new = touch(root, "gate/2026-11-21/00/00.00.mp4")
    watched = ContendedLock(cat.lock)
    cat.lock = watched  # type: ignore[assignment]
    passes: list[object] = []

    def incremental_job() -> None:
        with watched:  # as Sweeper.reconcile: the engine lock first
            hinting.start()
            assert watched.contended.wait(10), "the hint never asked for the catalog's lock"
            passes.append(scanner.incremental())

    hinting = threading.Thread(target=scanner.hint, args=(new,), daemon=True)
    job = threading.Thread(target=incremental_job, daemon=True)
    job.start()
    job.join(20)
    hinting.join(20)
    assert passes and not job.is_alive() and not hinting.is_alive(), (
        "the incremental pass and the hint wait on each other's lock"
    )
    assert new in catalogued(cat)
    cat.close()


@pytest.mark.slow
def test_worker_processes_give_the_same_catalog(tmp_path: Path, root: Path) -> None:
    paths = {
        touch(root, f"cam{c}/2026-11-{d:02d}/{h:02d}/00.00.mp4")
        for c in range(3)
        for d in (1, 2)
        for h in range(3)
    }
    one = Catalog(tmp_path / "one.db", expiry=ExpiryCalc)
    two = Catalog(tmp_path / "two.db", expiry=ExpiryCalc)
    lay = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"
    s1 = Scanner(one, [site(root, lay)], workers=1).reconcile()
    pooled = Scanner(two, [site(root, lay)], workers=2, pool_min_rows=1)
    used: list[int] = []
    real_run_pool = pooled._run_pool

    def spy(pending: list[object], apply: Callable[..., None]) -> None:
        used.append(len(pending))
        real_run_pool(pending, apply)  # type: ignore[arg-type]

    pooled._run_pool = spy  # type: ignore[method-assign]
    s2 = pooled.reconcile()
    assert used == [3]  # every camera walked in worker processes
    assert s1.added == s2.added == len(paths)
    assert catalogued(one) == catalogued(two)
    assert set(catalogued(two)) == paths
    q = "SELECT path, mtime_ns FROM dirs ORDER BY path"
    # root + 3 cameras + 6 days + 18 hours
    assert len(one.conn.execute(q).fetchall()) == len(two.conn.execute(q).fetchall()) == 28
    one.close()
    two.close()


# ---- inotify ---------------------------------------------------------------------------------


@pytest.fixture
def watching(cat: Catalog, root: Path) -> Iterator[tuple[Scanner, Watcher, list[str]]]:
    s = site(root, "{camera}/%Y-%m-%d/%H/%M.%S.mp4")
    scanner = Scanner(cat, [s], workers=1)
    scanner.reconcile()
    overflows: list[str] = []
    w = Watcher(scanner, [s], on_overflow=lambda: overflows.append("x"))
    assert w.start()
    yield scanner, w, overflows
    w.stop()


def test_watcher_catalogs_a_closed_segment(
    cat: Catalog, root: Path, tmp_path: Path, watching: tuple[Scanner, Watcher, list[str]]
) -> None:
    hour = root / "gate" / "2026-11-20" / "14"
    hour.mkdir(parents=True)
    p = hour / "05.07.mp4"
    with open(p, "wb") as fh:
        fh.write(b"frames")
    assert wait_for(lambda: cat.get(os.fsencode(p)) is not None)
    # written elsewhere, then renamed into the tree (how many recorders finish a segment)
    staging = tmp_path / "staging.mp4"
    staging.write_bytes(b"frames")
    moved = hour / "06.00.mp4"
    os.rename(staging, moved)
    assert wait_for(lambda: cat.get(os.fsencode(moved)) is not None)
    # renamed out of the tree: forgotten
    os.rename(moved, tmp_path / "gone.mp4")
    assert wait_for(lambda: cat.get(os.fsencode(moved)) is None)


def test_queue_overflow_calls_back(watching: tuple[Scanner, Watcher, list[str]]) -> None:
    _, w, overflows = watching
    obs = w._observer
    assert obs is not None
    # what the kernel sends when its event queue overflowed (wd -1, IN_Q_OVERFLOW)
    obs.inotify_fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))
    assert wait_for(lambda: len(overflows) == 1)
    assert w.overflows == 1


def test_watch_limit_exhaustion_calls_back(
    root: Path, watching: tuple[Scanner, Watcher, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, w, overflows = watching
    obs = w._observer
    assert obs is not None

    def no_more_watches(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(obs.inotify_fd, "add_callback", no_more_watches)
    (root / "gate" / "2026-11-22").mkdir(parents=True)
    assert wait_for(lambda: len(overflows) >= 1)


def test_a_layout_change_rereads_unchanged_files(cat: Catalog, root: Path) -> None:
    p = touch(root, "gate/2026-11-20/14/05.07.mp4")
    lay = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"
    Scanner(cat, [site(root, lay, SH)], workers=1).reconcile()
    assert catalogued(cat)[p][2] == datetime(2026, 11, 20, 14, 5, 7, tzinfo=SH).timestamp()
    # the admin corrects layout_timezone: the same, unchanged file now reads 8 hours later
    stats = Scanner(cat, [site(root, lay, UTC)], workers=1).incremental()
    assert stats.updated == 1
    assert catalogued(cat)[p][2] == datetime(2026, 11, 20, 14, 5, 7, tzinfo=UTC).timestamp()


def test_a_rules_change_refreshes_stored_expiry_on_reconcile(cat: Catalog, root: Path) -> None:
    p = touch(root, "cam1/a.mp4", mtime=1_700_000_000)
    s30 = site(root)
    Scanner(cat, [s30], workers=1).reconcile()
    s7 = SiteScan(
        s30.site, s30.roots, None, EXTS, SiteRules("gate", Duration.parse("7d"), None, SH, 120.0)
    )
    Scanner(cat, [s7], workers=1).reconcile()
    row = cat.conn.execute("SELECT expires_at FROM segments WHERE path = ?", (p,)).fetchone()
    assert row[0] == 1_700_000_000 + 7 * 86400


def test_a_small_cold_tree_is_walked_without_worker_processes(
    cat: Catalog, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nvr_guard.retention.scan as scan_mod

    def no_pool(*a: object, **k: object) -> None:
        raise AssertionError("worker processes started for a tiny tree")

    monkeypatch.setattr(scan_mod.concurrent.futures, "ProcessPoolExecutor", no_pool)
    paths = {touch(root, f"cam{c}/x.mp4") for c in range(3)}
    assert Scanner(cat, [site(root)], workers=2).reconcile().added == 3
    assert set(catalogued(cat)) == paths


def test_reconcile_walks_in_process_when_worker_processes_fail(
    cat: Catalog, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures.process as cfp

    import nvr_guard.retention.scan as scan_mod

    class NoWorkers:
        def __init__(self, *a: object, **k: object) -> None:
            raise cfp.BrokenProcessPool("no processes here")

    monkeypatch.setattr(scan_mod.concurrent.futures, "ProcessPoolExecutor", NoWorkers)
    paths = {touch(root, f"cam{c}/x.mp4") for c in range(3)}
    stats = Scanner(cat, [site(root)], workers=2, pool_min_rows=1).reconcile()
    assert stats.added == 3 and set(catalogued(cat)) == paths


def test_a_file_that_no_longer_matches_the_layout_is_forgotten(cat: Catalog, root: Path) -> None:
    p = touch(root, "gate/2026-11-20/14/05.07.mp4")
    Scanner(cat, [site(root, "{camera}/%Y-%m-%d/%H/%M.%S.mp4")], workers=1).reconcile()
    assert set(catalogued(cat)) == {p}
    stats = Scanner(cat, [site(root, "%Y-%m-%d/%H/{camera}/%M.%S.mp4")], workers=1).reconcile()
    assert (stats.removed, stats.ignored) == (1, 1)
    assert catalogued(cat) == {}


def test_a_root_that_is_a_symlink_is_not_walked(cat: Catalog, tmp_path: Path) -> None:
    real = tmp_path / "real"
    touch(real, "cam1/a.mp4")
    link = tmp_path / "link"
    os.symlink(real, link)
    stats = Scanner(cat, [site(link)], workers=1).reconcile()
    assert stats.files == 0 and catalogued(cat) == {}


def test_a_root_removed_from_the_site_is_forgotten(cat: Catalog, tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    a = touch(r1, "cam1/a.mp4")
    b = touch(r2, "cam2/b.mp4")
    both = SiteScan("gate", [os.fsencode(r1), os.fsencode(r2)], None, EXTS, rules())
    Scanner(cat, [both], workers=1).reconcile()
    assert set(catalogued(cat)) == {a, b}
    stats = Scanner(cat, [site(r1)], workers=1).reconcile()
    assert stats.removed == 1 and set(catalogued(cat)) == {a}


# ---- a root shared by sites that split it by cameras (issue 16) ------------------------------

FRIGATE = "%Y-%m-%d/%H/{camera}/%M.%S.mp4"


def shared(root: Path, north: tuple[str, ...], south: tuple[str, ...]) -> list[SiteScan]:
    lay = Layout.compile(FRIGATE, UTC)
    return [
        SiteScan("north", [os.fsencode(root)], lay, EXTS, rules("north"), cameras=north),
        SiteScan("south", [os.fsencode(root) + b"/"], lay, EXTS, rules("south"), cameras=south),
    ]


def owners(cat: Catalog) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for _p, (s, c, _st) in catalogued(cat).items():
        out.setdefault(c, set()).add(s)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shared_root_is_walked_once_and_split_by_camera(
    cat: Catalog, root: Path, workers: int
) -> None:
    for h in range(4):  # four top-level directories: the pool has jobs to share
        for cam in ("front", "gate-1", "back", "porch"):
            touch(root, f"2024-05-0{h + 1}/14/{cam}/03.20.mp4", 1714572200.0)
    sc = Scanner(cat, shared(root, ("front", "gate*"), ("back",)), workers=workers, pool_min_rows=1)
    stats = sc.reconcile()
    assert stats.files == 12 and stats.unclaimed == 4
    assert owners(cat) == {"front": {"north"}, "gate-1": {"north"}, "back": {"south"}}
    # one walk: the directories are the first site's only
    sites = {r[0] for r in cat.conn.execute("SELECT DISTINCT site FROM dirs")}
    assert sites == {"north"}
    (e,) = sc.attention.entries()
    assert (e.kind, e.site, e.details["camera"], e.details["count"]) == (
        "camera_unclaimed",
        "north",
        "porch",
        4,
    )
    # walked again (one site asked for): nothing changes hands, nothing is counted twice
    again = sc.reconcile("south")
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert owners(cat) == {"front": {"north"}, "gate-1": {"north"}, "back": {"south"}}


def test_incremental_and_hints_follow_the_camera_claims(cat: Catalog, root: Path) -> None:
    touch(root, "2024-05-01/14/front/03.20.mp4", 1714572200.0)
    sc = Scanner(cat, shared(root, ("front",), ("back",)), workers=1)
    sc.reconcile()
    new_back = touch(root, "2024-05-01/15/back/00.00.mp4", 1714575600.0)
    lost = touch(root, "2024-05-01/15/attic/00.00.mp4", 1714575600.0)
    st = sc.incremental()
    assert st.added == 1 and st.unclaimed == 1
    assert catalogued(cat)[new_back][:2] == ("south", "back")
    assert lost not in catalogued(cat)
    assert [e.details["camera"] for e in sc.attention.entries()] == ["attic"]
    hinted = touch(root, "2024-05-01/16/back/00.00.mp4", 1714579200.0)
    assert sc.hint(hinted) == "added"
    assert catalogued(cat)[hinted][:2] == ("south", "back")
    other = touch(root, "2024-05-01/16/shed/00.00.mp4", 1714579200.0)
    assert sc.hint(other) == "ignored" and other not in catalogued(cat)
    assert sorted(e.details["camera"] for e in sc.attention.entries()) == ["attic", "shed"]
    # a new config claims attic for south: its rows are south's, the full walk clears both
    # entries it can account for (shed is claimed by nobody yet)
    sc2 = Scanner(
        cat, shared(root, ("front",), ("back", "attic")), workers=1, attention=sc.attention
    )
    sc2.incremental()  # the claims changed: a full walk
    assert catalogued(cat)[lost][:2] == ("south", "attic")
    assert [e.details["camera"] for e in sc2.attention.entries()] == ["shed"]


def test_reassign_moves_rows_to_the_site_that_claims_them_now(cat: Catalog, root: Path) -> None:
    a = touch(root, "2024-05-01/14/front/03.20.mp4", 1714572200.0)
    b = touch(root, "2024-05-01/14/back/03.20.mp4", 1714572200.0)
    Scanner(cat, shared(root, ("front", "back"), ("side",)), workers=1).reconcile()
    assert catalogued(cat)[b][0] == "north"
    sc = Scanner(cat, shared(root, ("front",), ("ba*",)), workers=1)
    assert sc.reassign() == {"north", "south"}
    assert catalogued(cat)[b][0] == "south" and catalogued(cat)[a][0] == "north"
    # claimed by nobody now: forgotten (not deleted), and nothing else changes
    sc = Scanner(cat, shared(root, ("front",), ("side",)), workers=1)
    assert sc.reassign() == {"south"}
    assert b not in catalogued(cat) and os.path.exists(b)
    assert sc.reassign() == set()
