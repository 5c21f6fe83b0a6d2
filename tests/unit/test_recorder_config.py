"""``recorder:`` (top level and per site): which sites it serves, what is refused at its line,
and what only warns (a database not there yet)."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest

from nvr_guard.config import Config, check_config


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "rec").mkdir(exist_ok=True)
    (tmp_path / "rec2").mkdir(exist_ok=True)
    db = tmp_path / "frigate.db"
    if not db.exists():
        sqlite3.connect(db).close()
    text = textwrap.dedent(text).lstrip("\n").replace("@T", str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


BAD = [
    pytest.param(
        """
        sites:
          a:
            keep: 7d
            roots: [@T/rec]
            recorder: {kind: zoneminder, database: @T/frigate.db}
        """,
        5,
        "recorder kind 'zoneminder' is not supported; supported kinds: frigate",
        id="unknown-kind",
    ),
    pytest.param(
        """
        recorder:
          kind: frigate
        sites:
          a: {keep: 7d, roots: [@T/rec]}
        """,
        1,
        "database",
        id="no-database",
    ),
    pytest.param(
        """
        sites:
          a:
            keep: 7d
            roots: [@T/rec]
            recorder:
              kind: frigate
              database: @T/frigate.db
              roots: [@T/rec]
        """,
        8,
        "only the top-level recorder takes roots",
        id="roots-in-site",
    ),
    pytest.param(
        """
        recorder:
          kind: frigate
          database: @T/rec
          roots: [@T/rec]
        sites:
          a: {keep: 7d, roots: [@T/rec]}
        """,
        3,
        "is not a regular file",
        id="database-is-a-directory",
    ),
    pytest.param(
        """
        recorder:
          kind: frigate
          database: @T/frigate.db
          roots: [@T/rec]
          busy_timeout: 5m
        sites:
          a: {keep: 7d, roots: [@T/rec]}
        """,
        5,
        "busy_timeout: 5m is outside (0, 10s]",
        id="busy-timeout",
    ),
    pytest.param(
        """
        recorder:
          kind: frigate
          database: relative/frigate.db
        sites:
          a: {keep: 7d, roots: [@T/rec]}
        """,
        3,
        "relative path",
        id="relative-database",
    ),
    pytest.param(
        # two Frigates in Docker both see /media/frigate/recordings: one top-level recorder
        # mapped both roots onto the same rows (carpark's deletions removed school's rows)
        """
        recorder:
          kind: frigate
          database: @T/frigate.db
          recordings: /media/frigate/recordings
        sites:
          school: {keep: 1y, roots: [@T/rec], layout: frigate}
          carpark: {keep: 15d, roots: [@T/rec2], layout: frigate}
        """,
        4,
        "would stand for both",
        id="one-recordings-two-roots",
    ),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_bad_recorder_is_refused_at_its_line(tmp_path, text, line, fragment):
    path = write(tmp_path, text)
    cfg, errors, _ = check_config(path)
    assert cfg is None
    assert any(ln == line and fragment in msg for _f, ln, msg in errors), errors


def test_one_database_through_a_symlink_is_the_same_database(tmp_path):
    # two site recorders naming one database, once through a symlink, with the same
    # recordings path: a carpark sweep removed a school's rows; the text check missed it
    path = write(
        tmp_path,
        """
        sites:
          school:
            keep: 1y
            roots: [@T/rec]
            recorder:
              {kind: frigate, database: @T/frigate.db, recordings: /media/frigate/recordings}
          carpark:
            keep: 15d
            roots: [@T/rec2]
            recorder:
              {kind: frigate, database: @T/link.db, recordings: /media/frigate/recordings}
        """,
    )
    (tmp_path / "link.db").symlink_to(tmp_path / "frigate.db")
    cfg, errors, _ = check_config(path)
    assert cfg is None
    assert any("would stand for both" in m for _f, _ln, m in errors), errors


def test_missing_database_and_idle_recorder_only_warn(tmp_path):
    path = write(
        tmp_path,
        """
        recorder: {kind: frigate, database: @T/later/frigate.db}
        sites:
          a: {keep: 7d, roots: [@T/rec]}
        """,
    )
    cfg, errors, warnings = check_config(path)
    assert errors == [] and cfg is not None
    msgs = [(ln, msg) for _f, ln, msg in warnings]
    assert any(ln == 1 and "later/frigate.db does not exist (yet)" in m for ln, m in msgs)
    assert any("serves no site" in m and "layout: frigate" in m for _ln, m in msgs)
    assert cfg.recorder_for("a") is None


def test_which_sites_a_recorder_serves(tmp_path):
    raw = {
        "recorder": {"kind": "frigate", "database": str(tmp_path / "frigate.db")},
        "sites": {
            "frig": {"keep": "7d", "roots": ["/srv/frigate"], "layout": "frigate"},
            "other": {"keep": "7d", "roots": ["/srv/other"], "layout": "{camera}/%Y/%m.mp4"},
            "own": {
                "keep": "7d",
                "roots": ["/srv/own"],
                "layout": "frigate",
                "recorder": {"kind": "frigate", "database": "/opt/own/frigate.db"},
            },
        },
    }
    cfg = Config.model_validate(raw)
    assert cfg.recorder_for("frig") is cfg.recorder  # layout frigate: the top-level one
    assert cfg.recorder_for("other") is None
    own = cfg.recorder_for("own")
    assert own is not None and own.database == "/opt/own/frigate.db"  # the site's overrides
    raw["recorder"]["roots"] = ["/srv/other/"]  # given roots: those sites, whatever the layout
    cfg = Config.model_validate(raw)
    assert cfg.recorder_for("frig") is None
    assert cfg.recorder_for("other") is cfg.recorder
    assert cfg.recorder.busy_timeout.seconds == 3 and cfg.recorder.recordings is None
