"""Guarded deletion on real trees: what purge deletes, what it refuses, the receipts it writes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nvr_guard.model import Segment
from nvr_guard.retention import purge as purge_mod
from nvr_guard.retention.purge import PROCESS_MIN, PurgeResult, PurgeTarget, digest_paths, purge
from nvr_guard.store.audit import AuditEntry, AuditLog, ensure_schema

OLD = 1_760_000_000.0  # 2025-10-09, long expired
NOW = 1_763_900_000.0
SETTLE = 120.0
EXTS = frozenset({".mp4", ".mkv"})


@dataclass
class World:
    tmp: Path
    root: Path
    outside: Path
    audit: AuditLog
    process_min: int  # 0: the unlinks run in worker processes, as for a large purge
    removed: list[list[Segment]] = field(default_factory=list)

    @property
    def conn(self) -> sqlite3.Connection:
        return self.audit.conn

    def seg(
        self, rel: bytes | str, mtime: float = OLD, size: int = 100, camera: str = "cam1"
    ) -> Segment:
        """Create a recording file under the root and catalogue it (as the scanner would)."""
        path = os.path.join(os.fsencode(self.root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"v" * size)
        os.utime(path, (mtime, mtime))
        st = os.stat(path)
        seg = Segment("site", camera, path, start=st.st_mtime - 60, mtime=st.st_mtime, size=size)
        self.conn.execute("INSERT INTO segments VALUES (?)", (path,))
        self.conn.commit()
        return seg

    def target(self, seg: Segment, root: bytes | None = None, **kw: object) -> PurgeTarget:
        args: dict[str, object] = {"extensions": EXTS, "settle": SETTLE}
        args.update(kw)
        return PurgeTarget(seg, root if root is not None else os.fsencode(self.root), **args)  # type: ignore[arg-type]

    def run(self, targets: list[PurgeTarget], **kw: object) -> PurgeResult:
        def on_deleted(segs: list[Segment]) -> None:
            self.removed.append(list(segs))
            self.conn.executemany("DELETE FROM segments WHERE path = ?", [(s.path,) for s in segs])

        args: dict[str, object] = {
            "audit": self.audit,
            "actor": "nvr-guard",
            "sweep_id": 7,
            "now": lambda: NOW,
            "on_deleted": on_deleted,
            "process_min": self.process_min,
        }
        args.update(kw)
        return purge(targets, **args)  # type: ignore[arg-type]

    def entries(self, action: str) -> list[AuditEntry]:
        return list(self.audit.entries(action=action))

    def catalogued(self) -> set[bytes]:
        return {r[0] for r in self.conn.execute("SELECT path FROM segments")}


# every test runs twice: unlinks on worker threads (small purges) and in worker processes
# (purges of PROCESS_MIN targets or more); the guarantees are the same
@pytest.fixture(params=["threads", "processes"])
def w(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    root = tmp_path / "rec"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (tmp_path / "state").mkdir()
    conn = sqlite3.connect(tmp_path / "state" / "catalog.db", timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    ensure_schema(conn)
    conn.execute("CREATE TABLE segments (path BLOB PRIMARY KEY)")
    conn.commit()
    process_min = 0 if request.param == "processes" else PROCESS_MIN
    yield World(tmp_path, root, outside, AuditLog(conn, clock=lambda: NOW), process_min)
    conn.close()


def victim(w: World, name: str = "victim.mp4", size: int = 100) -> Path:
    """A file outside the root that must survive everything."""
    p = w.outside / name
    p.write_bytes(b"x" * size)
    os.utime(p, (OLD, OLD))
    return p


def kinds(result: PurgeResult) -> list[str]:
    return [reason.split(":")[0] for _, reason in result.skipped]


# ---- deletion and receipts ----------------------------------------------------------------


def test_deletes_segments_and_writes_receipt(w: World) -> None:
    segs = [
        w.seg(f"cam1/2025-10-0{d}/1{h}/00.00.mp4", mtime=OLD + d * 3600 + h, size=100 + d + h)
        for d in (1, 2)
        for h in (0, 1)
    ]
    result = w.run([w.target(s) for s in reversed(segs)])
    assert sorted(s.path for s in result.deleted) == sorted(s.path for s in segs)
    assert not any(os.path.lexists(s.path) for s in segs)
    assert result.skipped == []
    assert result.bytes == sum(s.size for s in segs)
    assert w.catalogued() == set()

    (begin,) = w.entries("purge.begin")
    (receipt,) = w.entries("purge.receipt")
    assert result.receipts == [receipt.seq]
    expected = hashlib.sha256(b"\n".join(sorted(s.path for s in segs))).hexdigest()
    assert begin.details["digest"] == expected and begin.details["planned"] == 4
    assert begin.seq < receipt.seq and receipt.details["begin"] == begin.seq
    d = receipt.details
    assert receipt.object == "camera:site/cam1" and receipt.actor == "nvr-guard"
    assert (d["site"], d["camera"], d["sweep"]) == ("site", "cam1", 7)
    assert (d["count"], d["bytes"], d["digest"]) == (4, result.bytes, expected)
    # OLD is 2025-10-09T08:53:20Z; starts are mtime - 60 s
    assert d["from"] == "2025-10-09T09:52:20Z"  # min start: OLD + 1 h - 60 s
    assert d["to"] == "2025-10-09T10:52:21Z"  # max start: OLD + 2 h + 1 s - 60 s
    assert w.entries("purge.skip") == []
    assert w.audit.verify().ok


def test_digest_paths_sorts_and_joins_with_newlines() -> None:
    paths = [b"/r/b.mp4", b"/r/a\n.mp4", b"/r/\xff.mp4"]
    expected = hashlib.sha256(b"/r/a\n.mp4\n/r/b.mp4\n/r/\xff.mp4").hexdigest()
    assert digest_paths(paths) == digest_paths(reversed(paths)) == expected
    assert digest_paths([]) == hashlib.sha256(b"").hexdigest()


def test_batches_and_cameras_get_their_own_receipts(w: World) -> None:
    segs = [w.seg(f"cam1/2025-10-01/00/{m:02d}.00.mp4") for m in range(5)]
    segs += [w.seg(f"cam2/2025-10-01/00/{m:02d}.00.mp4", camera="cam2") for m in range(2)]
    result = w.run([w.target(s) for s in segs], batch_size=2)
    receipts = w.entries("purge.receipt")
    assert [(e.details["camera"], e.details["count"]) for e in receipts] == [
        ("cam1", 2),
        ("cam1", 2),
        ("cam1", 1),
        ("cam2", 2),
    ]
    assert result.receipts == [e.seq for e in receipts]
    assert len(w.entries("purge.begin")) == 4
    assert [len(b) for b in w.removed] == [2, 2, 1, 2]
    cam1 = sorted(s.path for s in segs[:5])
    got = [e.details["digest"] for e in receipts[:3]]
    assert got == [digest_paths(cam1[0:2]), digest_paths(cam1[2:4]), digest_paths(cam1[4:])]
    assert not any(os.path.lexists(s.path) for s in segs)


def test_odd_names_are_deleted_and_digested_byte_exact(w: World) -> None:
    names = [b"cam1/2025-10-01/\xff\xfe.mp4", b"cam1/2025-10-01/line\nbreak.mp4", "cam1/录像 1.MP4"]
    segs = [w.seg(n) for n in names]
    result = w.run([w.target(s) for s in segs])
    assert len(result.deleted) == 3 and kinds(result) == []
    assert not any(os.path.lexists(s.path) for s in segs)
    (receipt,) = w.entries("purge.receipt")
    assert (
        receipt.details["digest"]
        == hashlib.sha256(b"\n".join(sorted(s.path for s in segs))).hexdigest()
    )
    assert w.audit.verify().ok


# ---- refusals -------------------------------------------------------------------------------


def test_symlink_to_outside_file_is_never_followed(w: World) -> None:
    target = victim(w)
    link = w.root / "cam1" / "2025-10-01" / "00.00.mp4"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    st = os.stat(target)
    seg = Segment("site", "cam1", os.fsencode(link), st.st_mtime, st.st_mtime, st.st_size)
    result = w.run([w.target(seg)])
    assert kinds(result) == ["symlink"] and result.deleted == []
    assert target.read_bytes() == b"x" * 100
    assert link.is_symlink()  # not ours to remove either
    (skip,) = w.entries("purge.skip")
    assert skip.details["kinds"] == {"symlink": 1} and skip.details["count"] == 1
    assert skip.details["examples"][0]["path"] == str(link)
    assert w.entries("purge.receipt") == []


def test_file_swapped_for_symlink_after_plan_is_not_deleted(w: World) -> None:
    seg = w.seg("cam1/2025-10-01/00/00.00.mp4")
    target = victim(w)  # same size and mtime as the planned file
    os.unlink(seg.path)
    os.symlink(target, seg.path)
    result = w.run([w.target(seg)])
    assert kinds(result) == ["symlink"]
    assert target.read_bytes() == b"x" * 100 and os.path.islink(seg.path)


@pytest.mark.parametrize("swapped", ["cam1", "cam1/2025-10-01", "cam1/2025-10-01/00"])
def test_directory_swapped_for_symlink_after_plan_touches_nothing_outside(
    w: World, swapped: str
) -> None:
    segs = [w.seg(f"cam1/2025-10-01/00/{m:02d}.00.mp4") for m in range(3)]
    moved = w.outside / "moved"
    os.rename(w.root / swapped, moved)
    os.symlink(moved, w.root / swapped)
    before = sorted(p.relative_to(w.outside) for p in w.outside.rglob("*"))
    result = w.run([w.target(s) for s in segs])
    assert result.deleted == [] and kinds(result) == ["symlink-on-path"] * 3
    assert sorted(p.relative_to(w.outside) for p in w.outside.rglob("*")) == before
    assert len(list(moved.rglob("*.mp4"))) == 3
    assert w.catalogued() == {s.path for s in segs}  # rows stay: nothing was deleted


def test_root_that_is_a_symlink_is_refused(w: World) -> None:
    seg = w.seg("cam1/2025-10-01/00.00.mp4")
    link_root = w.tmp / "rec-link"
    link_root.symlink_to(w.root)
    via = Segment(
        "site", "cam1", os.fsencode(link_root / "cam1/2025-10-01/00.00.mp4"), 0, seg.mtime, seg.size
    )
    result = w.run([w.target(via, root=os.fsencode(link_root))])
    assert kinds(result) == ["symlink-on-path"] and os.path.exists(seg.path)


@pytest.mark.parametrize(
    ("rel_path", "kind"),
    [
        ("{root}/cam1/../../outside/victim.mp4", "unsafe-path"),
        ("{root}/cam1/./../../outside/victim.mp4", "unsafe-path"),
        ("{root}//../outside/victim.mp4", "unsafe-path"),
        ("{outside}/victim.mp4", "outside-root"),
        ("{root}-sibling/victim.mp4", "outside-root"),  # a prefix of the name is not "inside"
        ("{root}", "outside-root"),
        ("outside/victim.mp4", "unsafe-path"),  # relative
    ],
)
def test_paths_escaping_the_root_are_refused(w: World, rel_path: str, kind: str) -> None:
    v = victim(w)
    sibling = Path(f"{w.root}-sibling")
    sibling.mkdir()
    (sibling / "victim.mp4").write_bytes(b"x" * 100)
    os.utime(sibling / "victim.mp4", (OLD, OLD))
    path = rel_path.format(root=w.root, outside=w.outside).encode()
    seg = Segment("site", "cam1", path, OLD, OLD, 100)
    result = w.run([w.target(seg)])
    assert kinds(result) == [kind]
    assert v.exists() and (sibling / "victim.mp4").exists()
    (skip,) = w.entries("purge.skip")
    assert skip.details["kinds"] == {kind: 1}


def test_unsafe_root_is_refused(w: World) -> None:
    seg = w.seg("cam1/a.mp4")
    root = os.fsencode(w.root) + b"/../rec"
    result = w.run([w.target(seg, root=root)])
    assert kinds(result) == ["unsafe-root"] and os.path.exists(seg.path)


@pytest.mark.parametrize(
    ("name", "exts", "deleted"),
    [
        ("cam1/a.mp4", {".mp4"}, True),
        ("cam1/a.MP4", {".mp4"}, True),  # extensions compare lower-cased
        ("cam1/a.mkv", {"mkv"}, True),  # a configured extension without its dot still counts
        ("cam1/a.txt", {".mp4"}, False),
        ("cam1/a.mp4.part", {".mp4"}, False),
        ("cam1/.mp4", {".mp4"}, False),  # a hidden file named like an extension
        ("cam1/mp4", {".mp4"}, False),
    ],
)
def test_extension_must_be_a_segment_extension(
    w: World, name: str, exts: set[str], deleted: bool
) -> None:
    seg = w.seg(name)
    result = w.run([w.target(seg, extensions=frozenset(exts))])
    assert os.path.exists(seg.path) is not deleted
    assert kinds(result) == ([] if deleted else ["extension"])


@pytest.mark.parametrize(
    ("age", "deleted"),
    [(0.0, False), (SETTLE - 1, False), (SETTLE, True), (SETTLE + 1, True), (-30.0, False)],
)
def test_settling_files_are_not_deleted(w: World, age: float, deleted: bool) -> None:
    seg = w.seg("cam1/2025-11-23/12/00.00.mp4", mtime=NOW - age)
    result = w.run([w.target(seg)])
    assert os.path.exists(seg.path) is not deleted
    assert kinds(result) == ([] if deleted else ["settling"])


def test_file_rewritten_after_plan_is_settling(w: World) -> None:
    seg = w.seg("cam1/2025-10-01/00.00.mp4")
    with open(seg.path, "ab") as fh:  # the recorder (or someone) writes to it again
        fh.write(b"more")
    os.utime(seg.path, (NOW - 5, NOW - 5))
    assert kinds(w.run([w.target(seg)])) == ["settling"]
    assert os.path.exists(seg.path)


@pytest.mark.parametrize(
    ("planned_mtime", "planned_size", "deleted"),
    [
        (OLD + 0.25, 101, False),  # size differs: rewritten or swapped
        (OLD - 10, 100, False),  # mtime differs
        (OLD + 0.2504, 100, True),  # within the catalog's rounding tolerance
        (OLD, 100, True),  # a catalog holding whole seconds
        (OLD + 0.25, 100, True),
    ],
)
def test_changed_since_plan_is_skipped(
    w: World, planned_mtime: float, planned_size: int, deleted: bool
) -> None:
    seg = w.seg("cam1/2025-10-01/00.00.mp4", mtime=OLD + 0.25, size=100)
    planned = Segment(seg.site, seg.camera, seg.path, seg.start, planned_mtime, planned_size)
    result = w.run([w.target(planned)])
    assert os.path.exists(seg.path) is not deleted
    assert kinds(result) == ([] if deleted else ["changed"])


def test_vanished_file_is_skipped_and_not_receipted(w: World) -> None:
    a = w.seg("cam1/2025-10-01/a.mp4")
    b = w.seg("cam1/2025-10-01/b.mp4")
    os.unlink(a.path)
    result = w.run([w.target(a), w.target(b)])
    assert kinds(result) == ["vanished"] and result.deleted == [b]
    (receipt,) = w.entries("purge.receipt")
    assert receipt.details["count"] == 1 and receipt.details["digest"] == digest_paths([b.path])


def test_skips_are_counted_by_kind_with_examples(w: World) -> None:
    good = w.seg("cam1/2025-10-01/00.mp4")
    settling = [w.seg(f"cam1/2025-11-23/{i}.mp4", mtime=NOW) for i in range(7)]
    wrong = w.seg("cam1/2025-10-01/notes.txt")
    result = w.run([w.target(s) for s in [good, *settling, wrong]])
    assert result.deleted == [good]
    (skip,) = w.entries("purge.skip")
    assert skip.details["kinds"] == {"extension": 1, "settling": 7}
    assert skip.details["count"] == 8 and len(skip.details["examples"]) == 5
    assert all(os.path.exists(s.path) for s in [*settling, wrong])


# ---- directories ----------------------------------------------------------------------------


def test_empty_date_dirs_removed_root_and_camera_kept(w: World) -> None:
    gone = [w.seg(f"cam1/2025-10-01/{h:02d}/00.00.mp4") for h in range(3)]
    kept = w.seg("cam1/2025-10-02/00/00.00.mp4", mtime=NOW)  # settling: stays
    flat = w.seg("cam2/00.00.mp4", camera="cam2")  # file right in the camera dir
    (w.root / "cam1" / "2025-09-30").mkdir()  # empty, but not emptied by us: left alone
    result = w.run([w.target(s) for s in [*gone, kept, flat]])
    assert len(result.deleted) == 4
    assert not (w.root / "cam1" / "2025-10-01").exists()
    assert os.path.exists(kept.path)
    assert (w.root / "cam1" / "2025-09-30").is_dir()
    assert (w.root / "cam1").is_dir() and (w.root / "cam2").is_dir()
    assert list((w.root / "cam2").iterdir()) == []
    assert w.root.is_dir()


def test_frigate_layout_keeps_first_level(w: World) -> None:
    # %Y-%m-%d/%H/{camera}/%M.%S.mp4: the camera stands at depth 3; rule: depth >= 2 only
    segs = [
        w.seg(f"2025-10-01/{h:02d}/{cam}/00.00.mp4", camera=cam)
        for h in (0, 1)
        for cam in ("front", "back")
    ]
    result = w.run([w.target(s) for s in segs])
    assert len(result.deleted) == 4
    assert (w.root / "2025-10-01").is_dir()
    assert list((w.root / "2025-10-01").iterdir()) == []


def test_directory_with_remaining_files_is_kept(w: World) -> None:
    a = w.seg("cam1/2025-10-01/00/a.mp4")
    other = w.root / "cam1" / "2025-10-01" / "00" / "index.db"
    other.write_bytes(b"recorder's own file")
    w.run([w.target(a)])
    assert other.exists() and not os.path.exists(a.path)


# ---- catalog callback and crash ordering ------------------------------------------------------


def test_rows_and_receipt_commit_together(w: World) -> None:
    segs = [w.seg(f"cam1/2025-10-01/{m}.mp4") for m in range(3)]
    seen: list[tuple[bool, bool]] = []

    def on_deleted(batch: list[Segment]) -> None:
        # at this point the files are gone, the receipt not yet written
        seen.append(
            (
                any(os.path.lexists(s.path) for s in batch),
                bool(list(w.audit.entries(action="purge.receipt"))),
            )
        )
        w.conn.executemany("DELETE FROM segments WHERE path = ?", [(s.path,) for s in batch])

    w.run([w.target(s) for s in segs], on_deleted=on_deleted)
    assert seen == [(False, False)]
    assert w.catalogued() == set() and len(w.entries("purge.receipt")) == 1


def test_callback_that_commits_itself_still_gets_a_receipt(w: World) -> None:
    seg = w.seg("cam1/2025-10-01/a.mp4")

    def on_deleted(batch: list[Segment]) -> None:
        with w.conn:  # commits on exit, as a catalog helper might
            w.conn.executemany("DELETE FROM segments WHERE path = ?", [(s.path,) for s in batch])

    result = w.run([w.target(seg)], on_deleted=on_deleted)
    assert w.catalogued() == set() and len(result.receipts) == 1
    assert w.audit.verify().ok and not w.conn.in_transaction


def test_failing_callback_rolls_back_rows_but_receipt_is_written(w: World) -> None:
    seg = w.seg("cam1/2025-10-01/a.mp4")

    def on_deleted(batch: list[Segment]) -> None:
        w.conn.executemany("DELETE FROM segments WHERE path = ?", [(s.path,) for s in batch])
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError):
        w.run([w.target(seg)], on_deleted=on_deleted)
    assert not os.path.exists(seg.path)
    assert w.catalogued() == {seg.path}  # stale row: the scanner removes it
    (receipt,) = w.entries("purge.receipt")
    assert receipt.details["count"] == 1 and "disk I/O error" in receipt.details["catalog_error"]
    assert not w.conn.in_transaction and w.audit.verify().ok


def test_a_failure_before_any_unlink_surfaces_as_itself_and_deletes_nothing(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = w.seg("cam1/2025-10-01/a.mp4")

    def begin_fails(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(purge_mod, "_begin", begin_fails)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        w.run([w.target(seg)])
    assert os.path.exists(seg.path) and w.catalogued() == {seg.path}
    assert w.entries("purge.receipt") == [] and not w.conn.in_transaction


def test_nothing_to_do_writes_nothing(w: World) -> None:
    result = w.run([])
    assert result == PurgeResult()
    assert w.audit.head()[0] == 0


def test_without_worker_processes_threads_do_the_work(
    w: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_processes() -> object:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(purge_mod, "worker_context", no_processes)
    segs = [w.seg(f"cam1/2025-10-01/{m}.mp4") for m in range(3)]
    result = w.run([w.target(s) for s in segs], process_min=0)
    assert len(result.deleted) == 3 and not any(os.path.lexists(s.path) for s in segs)
    assert "using threads" in caplog.text


def test_rows_of_a_group_go_while_later_groups_are_unlinked(w: World) -> None:
    # on_deleted runs per batch inside one open transaction, before the receipts: nothing of
    # it is visible to another connection until the commit after the sync
    segs = [
        w.seg(f"cam{c}/2025-10-01/{m}.mp4", camera=f"cam{c}") for c in range(3) for m in range(4)
    ]
    other = sqlite3.connect(w.tmp / "state" / "catalog.db")
    seen: list[int] = []

    def on_deleted(batch: list[Segment]) -> None:
        w.conn.executemany("DELETE FROM segments WHERE path = ?", [(s.path,) for s in batch])
        seen.append(other.execute("SELECT count(*) FROM segments").fetchone()[0])

    result = w.run([w.target(s) for s in segs], on_deleted=on_deleted, batch_size=2)
    other.close()
    assert seen == [12] * 6  # six batches, none committed before the end
    assert len(result.receipts) == 6 and w.catalogued() == set()


# ---- the recorder-index hook --------------------------------------------------------------


def test_after_batch_sees_only_deleted_files_and_adds_to_the_receipt(w: World) -> None:
    gone = w.seg("cam1/2025-10-01/10/00.00.mp4")
    young = w.seg("cam1/2025-10-01/10/00.10.mp4", mtime=NOW - 10)  # settling: kept
    seen: list[list[bytes]] = []

    def hook(segs: list[Segment]) -> dict[str, object]:
        seen.append([s.path for s in segs])
        assert not any(os.path.lexists(s.path) for s in segs)  # called once the files are gone
        return {"index_rows": len(segs)}

    w.run([w.target(gone), w.target(young)], after_batch=hook)
    assert seen == [[gone.path]]
    (receipt,) = w.entries("purge.receipt")
    assert receipt.details["index_rows"] == 1 and receipt.details["count"] == 1


def test_after_batch_failing_never_fails_the_purge(w: World) -> None:
    segs = [w.seg(f"cam1/2025-10-01/10/0{i}.00.mp4") for i in range(3)]

    def hook(segs: list[Segment]) -> dict[str, object]:
        raise RuntimeError("recorder database exploded")

    result = w.run([w.target(s) for s in segs], after_batch=hook)
    assert len(result.deleted) == 3 and not any(os.path.lexists(s.path) for s in segs)
    (receipt,) = w.entries("purge.receipt")
    assert receipt.details["count"] == 3 and "index_rows" not in receipt.details
    assert w.catalogued() == set()
