"""The catalog after a kill -9 of the process writing it: a real child process, killed in the
middle of a big insert and right after a bulk load (the rest of the catalog's tests are in
tests/unit/test_catalog.py)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.store.catalog import Catalog
from tests.unit.test_catalog import NOW, rules, seg

_CHILD = textwrap.dedent(
    """
    import sys
    from zoneinfo import ZoneInfo
    from nvr_guard.store.catalog import Catalog
    from nvr_guard.text import Duration
    from nvr_guard.model import SiteRules

    cat = Catalog(sys.argv[1])
    rules = SiteRules("gate", Duration.parse("10d"), None, ZoneInfo("UTC"), 60.0)
    committed = [
        ("gate", "c", b"/r/c/%d.mp4" % i, 1e9 + i, 1e9 + i, 1, 1e9 + i, None) for i in range(10)
    ]
    cat.apply_rows(committed, ())
    cat.note_rules("gate", rules)

    def rows():
        for i in range(10, 50_000_000):
            if i == 200_000:
                print("ready", flush=True)  # deep inside the open transaction
            yield ("gate", "c", b"/r/c/%d.mp4" % i, 1e9 + i, 1e9 + i, 1, 1e9 + i, None)

    cat.apply_rows(rows(), ())
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_big_insert_leaves_a_consistent_catalog(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and not line:
        if sel.select(timeout=deadline - time.monotonic()):
            line = child.stdout.readline()
    assert line.strip() == "ready", f"child did not get going: {line!r}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    cat = Catalog(db, expiry=ExpiryCalc)
    assert cat.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # all of the committed batch, none of the killed transaction
    assert cat.count() == 10
    assert cat.get(b"/r/c/9.mp4") is not None and cat.get(b"/r/c/10.mp4") is None
    cat.upsert_segments([seg("after", NOW)], {"gate": rules()})
    assert cat.count() == 11
    cat.close()


_BULK_CHILD = textwrap.dedent(
    """
    import signal, sys
    from nvr_guard.store.catalog import Catalog

    cat = Catalog(sys.argv[1])
    rows = [("gate", "c", b"/r/c/%07d.mp4" % i, 1e9 + i, 1e9 + i, 1, 2e9 + i, None)
            for i in range(200_000)]
    with cat.bulk_load():
        cat.apply_rows(rows, (), fresh=True)
    print("committed", flush=True)  # the checkpoint thread has just started
    signal.pause()
    """
)


def test_kill_9_right_after_a_bulk_load_keeps_every_row(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _BULK_CHILD, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = child.stdout.readline()  # blocks until the child prints or dies
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert line.strip() == "committed"
    cat = Catalog(db)
    assert cat.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert cat.count() == 200_000
    indexes = {r[0] for r in cat.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"segments_expires", "segments_site_camera"} <= indexes
    cat.close()
