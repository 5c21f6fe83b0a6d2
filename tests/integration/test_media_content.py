"""A scan vouches for what the files on a medium hold, and for nothing it did not see.

- No name is exempt: EICAR under a ``.NVRG-`` name (the export writer's prefix) added after the
  scan, or dropped during the export, makes the scan stale; only the export's own temporary
  directory, by its exact name, is left out while it writes.
- The scan is bound to content: a file rewritten after the scan with its old size and mtime
  (to the nanosecond) is caught when the medium is read again right before the commit; one
  rewritten during the scan makes the scan not clean.
Real loop-device sticks, real clamscan and clamd, real exports (see test_media_gate)."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.errors import PolicyRefused
from nvr_guard.media.clamav import content_digest, scan_tree
from nvr_guard.store.catalog import Catalog
from nvr_guard.store.media import MediaStore
from tests.fixtures.clamav import EICAR_FOUND_NAME, ClamdServer, eicar_bytes
from tests.integration.test_media_gate import (
    SCAN,
    Stick,
    decide,
    export,
    footage,
    key,
    leftovers,
    refused,
    stick,
)

IMPORTED_FIXTURES = (stick, footage, key)

EICAR = eicar_bytes()
ENGINES = ["clamscan", "clamd"]


def same_size_same_mtime(path: Path, data: bytes) -> None:
    """Rewrite ``path`` with ``data`` (same length) and put its atime and mtime back, to the ns."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def innocent() -> bytes:
    """Harmless text exactly as long as the EICAR file."""
    return (
        b"meeting notes, 3rd floor: nothing to see here, move along".ljust(len(EICAR) - 1) + b"\n"
    )


# ---- no name is exempt ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".NVRG-autorun.exe", ".NVRG-x/payload.com"])
def test_eicar_under_the_writers_prefix_after_the_scan_makes_it_stale(
    stick: Stick, name: str
) -> None:
    stick.enroll()
    assert stick.scan().result == "clean"
    stick.dest(reserve=0).check_before_write(2**20)
    assert stick.mount is not None
    (stick.mount / name).parent.mkdir(exist_ok=True)
    (stick.mount / name).write_bytes(EICAR)
    assert "were added, changed or removed since the scan" in refused(lambda: stick.dest(reserve=0))
    rescan = stick.scan()
    assert rescan.result == "infected"
    assert [i["path"] for i in rescan.infected] == [name]


@pytest.mark.slow
def test_eicar_under_the_writers_prefix_dropped_during_the_export_discards_the_package(
    stick: Stick, footage: list[Path], key: Any
) -> None:
    stick.enroll()
    stick.scan()
    assert stick.mount is not None
    mount = stick.mount

    def drop(frac: float) -> None:
        if frac > 0.1 and not (mount / ".NVRG-autorun.exe").exists():
            (mount / ".NVRG-autorun.exe").write_bytes(EICAR)

    with pytest.raises(PolicyRefused, match="changed during the export"):
        export(footage, stick.dest(reserve=0), key, progress=drop)
    assert leftovers(mount) == [".NVRG-autorun.exe"]  # the dropped file; nothing of the export


# ---- the scan is bound to content ----------------------------------------------------------------
@pytest.mark.slow
def test_a_file_rewritten_after_the_scan_keeping_size_and_mtime_is_caught_before_commit(
    stick: Stick, footage: list[Path], key: Any
) -> None:
    assert stick.mount is not None
    notes = stick.mount / "notes.txt"
    notes.write_bytes(innocent())
    stick.enroll()
    scan = stick.scan()
    assert scan.result == "clean" and scan.content_digest
    same_size_same_mtime(notes, EICAR)
    # names, sizes and mtimes are as scanned: the listing check at the start lets it through...
    stick.dest(reserve=0).check_before_write(2**20)
    # ...the content, read again right before the commit, does not
    with pytest.raises(PolicyRefused, match="is not what was scanned"):
        export(footage, stick.dest(reserve=0), key)
    assert leftovers(stick.mount) == []
    assert stick.scan().infected == ({"path": "notes.txt", "signature": EICAR_FOUND_NAME},)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> ClamdServer | None:
    if request.node.callspec.params.get("engine") == "clamd":
        s: ClamdServer = request.getfixturevalue("clamd_server")
        return s
    return None


def scan(engine: str, tree: Path, db: Path, server: ClamdServer | None, **kw: Any) -> Any:
    if engine == "clamd":
        assert server is not None
        kw.update(clamd_socket=server.socket, clamd_config=server.config)
    return scan_tree(tree, scanner=engine, database=db, **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_scan_digest_is_of_what_the_files_hold(
    engine: str, tmp_path: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    tree = tmp_path / "medium"
    (tree / "d").mkdir(parents=True)
    (tree / "a.txt").write_bytes(innocent())
    (tree / "d" / "b.bin").write_bytes(os.urandom(300_000))
    (tree / "empty").write_bytes(b"")
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "clean" and len(r.content_digest) == 64
    assert content_digest(tree) == r.content_digest  # the same bytes, read again
    same_size_same_mtime(tree / "a.txt", EICAR)
    assert content_digest(tree) != r.content_digest
    # without the digest (only for measuring its cost) there is nothing to compare against
    assert scan(engine, tree, clamav_db, server, digest=False).content_digest == ""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_file_rewritten_during_the_scan_keeping_size_and_mtime_is_not_clean(
    engine: str, tmp_path: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    tree = tmp_path / "medium"
    tree.mkdir()
    for i in range(3):
        (tree / f"f{i}.txt").write_bytes(innocent())

    def rewrite_after_the_last_verdict(done: int, total: int) -> None:
        # every file has had its verdict (and its digest): f0 was scanned clean as it was
        if total and done == total and (tree / "f0.txt").read_bytes() != EICAR:
            same_size_same_mtime(tree / "f0.txt", EICAR)

    r = scan(engine, tree, clamav_db, server, progress=rewrite_after_the_last_verdict)
    assert (tree / "f0.txt").read_bytes() == EICAR
    assert r.result == "error", r
    assert "files were written, added or removed during the scan; scan again" in r.errors


def test_a_scan_without_a_content_digest_is_refused() -> None:
    d = decide(scan=replace(SCAN, content_digest=""))
    assert not d.allowed
    assert "did not record what the files hold" in d.reason and "media scan" in d.reason


def test_scans_recorded_before_content_digests_need_a_new_scan(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    cat = Catalog(db)
    store = MediaStore(cat.conn, cat.lock)
    store.record_scan(replace(SCAN, content_digest="cd1"))
    cat.close()
    # the catalog as the previous release left it: no content_digest column, schema version 4
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("DROP TRIGGER scans_no_update")
    raw.execute("ALTER TABLE scans DROP COLUMN content_digest")
    # ... and without what later migrations added (they run again on open)
    raw.execute("ALTER TABLE holds DROP COLUMN roots")
    raw.execute("ALTER TABLE sweeps DROP COLUMN trips")
    raw.execute("DROP TABLE root_devices")
    raw.execute("DROP TABLE root_fs")
    raw.execute("PRAGMA user_version = 4")
    raw.close()
    cat = Catalog(db)
    try:
        old = MediaStore(cat.conn, cat.lock).latest_scan(SCAN.media_id or "")
        assert old is not None and old.content_digest == ""
        assert "did not record what the files hold" in decide(scan=old).reason
    finally:
        cat.close()
