"""Config loading: each refusal names FILE:LINE and the key; good configs resolve to their rules.

Bad configs are written with the placeholders ``@A`` and ``@B`` for two existing recording roots
(temporary directories), so each case is about exactly one mistake.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from nvr_guard.config import PROFILES, Config, check_config, load_config, parse_config
from nvr_guard.errors import ConfigError
from nvr_guard.model import GuardRules
from nvr_guard.text import Duration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "config"
DURATION_HINT = "write a number and a unit: 90min, 24h, 15d, 2w, 6mo, 1y"


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    a, b = tmp_path / "rec-a", tmp_path / "rec-b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "link-to-a").symlink_to(a)
    return {"@A": a, "@B": b, "@T": tmp_path}


def write(tmp_path: Path, roots: dict[str, Path], text: str, name: str = "config.yaml") -> Path:
    text = textwrap.dedent(text).lstrip("\n")
    for mark, path in roots.items():
        text = text.replace(mark, str(path))
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def D(s: str) -> Duration:
    return Duration.parse(s)


# ---- bad configs: (yaml, line, message fragment) -----------------------------------------
BAD = [
    pytest.param(
        """
        sites:
          a:
            profile: highway
            kepp: 15d
            roots: [@A]
        """,
        4,
        "sites.a.kepp: unknown key; did you mean 'keep'?",
        id="unknown-key",
    ),
    pytest.param(
        """
        sweep_evry: 5m
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "sweep_evry: unknown key; did you mean 'sweep_every'?",
        id="unknown-top-key",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A]
            profile: school
        """,
        5,
        "sites.a.profile: duplicate key (first at line 3)",
        id="duplicate-key",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
          b: {profile: school, roots: [@B]}
          a: {profile: general, roots: [@B]}
        """,
        4,
        "sites.a: duplicate key (first at line 2)",
        id="duplicate-site",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: @A
        """,
        4,
        "sites.a.roots: expected a list such as [a, b], got",
        id="wrong-type-list",
    ),
    pytest.param(
        """
        guards: 0.2
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "guards: expected a mapping (key: value lines), got '0.2'",
        id="wrong-type-mapping",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        people:
          users:
            bob: {roles: dept_manager}
        """,
        5,
        "people.users.bob.roles: expected a list",
        id="wrong-type-roles",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            keep: no
            roots: [@A]
        """,
        4,
        "sites.a.keep: 'no' is not a duration (YAML 1.1 would read it as a boolean)",
        id="keep-no",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        cameras:
          gate-01:
            name: "北门"
            level: 010
        """,
        6,
        "cameras.gate-01.level: '010' has a leading zero (YAML 1.1 reads it as octal 8)",
        id="level-octal",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        cameras:
          gate-01: {level: 3}
        """,
        4,
        "cameras.gate-01.level: 3 is out of range; write 1 (internal cameras) or 2",
        id="level-range",
    ),
    pytest.param(
        """
        sites:
          lobby:
            profile: general
            keep: 15x
            roots: [@A]
        """,
        4,
        f"sites.lobby.keep: bad duration '15x'; {DURATION_HINT}",
        id="bad-duration",
    ),
    pytest.param(
        """
        settle: 1:30
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "settle: '1:30' is not a duration (YAML 1.1 reads it as base-60)",
        id="sexagesimal",
    ),
    pytest.param(
        """
        sweep_every: 1mo
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "sweep_every: 1mo uses months or years; write a fixed length",
        id="interval-in-months",
    ),
    pytest.param(
        """
        sites:
          a: {keep: 0d, roots: [@A]}
        """,
        2,
        "sites.a.keep: '0d' is zero",
        id="zero-keep",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: genral
            roots: [@A]
        """,
        3,
        "sites.a.profile: unknown profile 'genral'; did you mean 'general'?",
        id="unknown-profile",
    ),
    pytest.param(
        """
        sites:
          a:
            keep: 10d
            min_keep: 30d
            roots: [@A]
        """,
        3,
        "sites.a.keep: keep 10d is shorter than min_keep 30d",
        id="keep-below-floor",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: residential
            keep: 20d
            roots: [@A]
        """,
        4,
        "sites.a.keep: keep 20d is shorter than min_keep 30d (from profile residential)",
        id="keep-below-profile-floor",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A]
            min_keep: 30d
        """,
        5,
        "sites.a.min_keep: keep 15d (from profile highway) is shorter than min_keep 30d",
        id="floor-above-profile-keep",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots:
              - @A
              - @T/missing
        """,
        6,
        "sites.a.roots[1]: @T/missing does not exist",
        id="root-missing",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@T/a-file]}
        """,
        2,
        "sites.a.roots[0]: @T/a-file is not a directory",
        id="root-is-a-file",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
          b:
            profile: school
            roots: [@B, @A/sub]
        """,
        5,
        "sites.b.roots[1]: @A/sub overlaps sites.a.roots[0] (@A): @A/sub is inside @A",
        id="root-nested",
    ),
    pytest.param(
        """
        sites:
          inner: {profile: highway, roots: [@A/sub]}
          outer: {profile: school, roots: [@A]}
        """,
        3,
        "sites.outer.roots[0]: @A overlaps sites.inner.roots[0] (@A/sub): @A/sub is inside @A",
        id="root-contains-other",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
          b: {profile: school, roots: [@A/]}
        """,
        3,
        "sites.b.roots[0]: @A is the same directory as sites.a.roots[0]",
        id="root-twice",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A, @B, @A]
        """,
        4,
        "sites.a.roots[2]: @A is the same directory as sites.a.roots[0]",
        id="root-twice-in-site",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
          b: {profile: highway, roots: [@T/link-to-a]}
        """,
        3,
        "sites.b.roots[0]: @T/link-to-a is the same directory as sites.a.roots[0]",
        id="root-via-symlink",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [/]}
        """,
        2,
        "sites.a.roots[0]: the whole file system cannot be a recording root",
        id="root-slash",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [recordings/a]
        """,
        4,
        "sites.a.roots[0]: 'recordings/a' is a relative path",
        id="relative-root",
    ),
    pytest.param(
        """
        state_dir: var/lib/nvr-guard
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "state_dir: 'var/lib/nvr-guard' is a relative path",
        id="relative-state-dir",
    ),
    pytest.param(
        """
        socket: control.sock
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "socket: 'control.sock' is a relative path",
        id="relative-socket",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        export:
          targets: [/mnt/exports, exports]
        """,
        4,
        "export.targets[1]: 'exports' is a relative path",
        id="relative-export-target",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A/../rec-b]
        """,
        4,
        "contains '..'",
        id="dotdot-root",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A]
            layout: "%Y-%m-%d/%H/%M.%S.mp4"
        """,
        5,
        "sites.a.layout: layout '%Y-%m-%d/%H/%M.%S.mp4' has no {camera}",
        id="layout-no-camera",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A]
            layout: "{camera}/%Y-%m-%d/%j.mp4"
        """,
        5,
        "sites.a.layout: layout '{camera}/%Y-%m-%d/%j.mp4': unsupported directive '%j'",
        id="layout-bad-directive",
    ),
    pytest.param(
        """
        timezone: Asia/Shangai
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "timezone: unknown timezone 'Asia/Shangai'; did you mean Asia/Shanghai?",
        id="bad-timezone",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: general
            roots: [@A]
            layout: "%Y-%m-%d/%H/{camera}/%M.%S.mp4"
            layout_timezone: Mars/Olympus
        """,
        6,
        "sites.a.layout_timezone: unknown timezone 'Mars/Olympus'",
        id="bad-layout-timezone",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A], timezone: ../../etc/passwd}
        """,
        2,
        "sites.a.timezone: unknown timezone",
        id="timezone-path",
    ),
    pytest.param(
        """
        sites:
          a:
            roots: [@A]
        """,
        2,
        "sites.a: set profile: (highway, residential, general, school) or keep:",
        id="no-profile-no-keep",
    ),
    pytest.param(
        """
        sites:
          a:
            min_keep: 30d
            roots: [@A]
        """,
        2,
        "sites.a: set profile:",
        id="floor-only",
    ),
    pytest.param(
        """
        timezone: UTC
        sites: {}
        """,
        2,
        "sites: no sites; add at least one site",
        id="empty-sites",
    ),
    pytest.param(
        """
        timezone: UTC
        sites:
        """,
        2,
        "sites: no sites",
        id="null-sites",
    ),
    pytest.param(
        """
        timezone: UTC
        """,
        1,
        "sites: required key missing",
        id="missing-sites",
    ),
    pytest.param(
        """
        sites:
          ../etc:
            profile: highway
            roots: [@A]
        """,
        2,
        "sites.../etc: '../etc' is not a valid site id",
        id="site-id-traversal",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        cameras:
          "gate\\t01": {level: 1}
        """,
        4,
        "is not a valid camera id",
        id="camera-id-control-char",
    ),
    pytest.param(
        """
        guards: {max_delete_fraction: -0.1}
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        1,
        "guards.max_delete_fraction: -0.1 is not between 0 and 1",
        id="negative-fraction",
    ),
    pytest.param(
        """
        guards:
          max_delete_fraction: 1.5
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        2,
        "guards.max_delete_fraction: 1.5 is not between 0 and 1",
        id="fraction-over-1",
    ),
    pytest.param(
        """
        disk:
          min_free: 150%
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        2,
        "disk.min_free: 150% is not between 0 and 1",
        id="percent-over-100",
    ),
    pytest.param(
        """
        disk:
          min_free: 10
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        2,
        "disk.min_free: 10 is not between 0 and 1; write a fraction such as 0.2 or a percentage",
        id="percent-without-sign",
    ),
    pytest.param(
        """
        disk:
          min_free: lots
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        2,
        "disk.min_free: expected a fraction such as 0.2 or a percentage such as 20%",
        id="fraction-not-a-number",
    ),
    pytest.param(
        """
        disk:
          min_free: 10%
          action: delete-everything
        sites:
          a: {profile: highway, roots: [@A]}
        """,
        3,
        "disk.action: 'delete-everything' is not one of: alert, overwrite-oldest",
        id="disk-action",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        media:
          require_enrolled: yes
        """,
        4,
        "media.require_enrolled: 'yes' is ambiguous (a YAML 1.1 boolean); write true or false",
        id="bool-yes",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        media: {scanner: antivirus}
        """,
        3,
        "media.scanner: 'antivirus' is not one of: auto, clamd, clamscan",
        id="scanner",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        cameras:
          gate-01: {level: 1, name: no}
        """,
        4,
        "cameras.gate-01.name: 'no' would be read as a boolean by YAML 1.1 tools; put it in quotes",
        id="text-no",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A]
            extensions: [mp4]
        """,
        5,
        "sites.a.extensions[0]: extension 'mp4' must start with '.'",
        id="extension-no-dot",
    ),
    pytest.param(
        """
        sites:
          a:
            profile: highway
            roots: [@A]
            extensions: [.mp4, .MP4]
        """,
        5,
        "sites.a.extensions: '.MP4' is listed twice",
        id="extension-twice",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        approval:
          hours: 8-20
        """,
        4,
        "approval.hours: '8-20' is not a time window; write HH:MM-HH:MM",
        id="hours",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        approval:
          decide_within: three days
        """,
        4,
        "approval.decide_within: 'three days' is not a number of working days",
        id="decide-within",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        approval:
          valid_for: 60d
        """,
        4,
        "approval.valid_for: 60d is longer than the 30 days",
        id="valid-for",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        approval:
          holidays: [2026-10-01, 2026-02-30]
        """,
        4,
        "approval.holidays: '2026-02-30' is not a date",
        id="holiday",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A]}
        export: {crf: 052}
        """,
        3,
        "export.crf: '052' has a leading zero",
        id="crf-octal",
    ),
    pytest.param(
        """
        sites:
          a: &site {profile: highway, roots: [@A]}
          b: *site
        """,
        3,
        "alias *site is not supported",
        id="alias",
    ),
    pytest.param(
        """
        sites:
          a: {profile: highway, roots: [@A], keep: !!int 15}
        """,
        2,
        "sites.a.keep: explicit tag 'tag:yaml.org,2002:int' is not supported",
        id="explicit-tag",
    ),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_bad_config_is_refused_at_its_line(tmp_path, roots, text, line, fragment):
    path = write(tmp_path, roots, text)
    for mark, p in roots.items():
        fragment = fragment.replace(mark, str(p))
    cfg, errors, _warnings = check_config(path)
    assert cfg is None
    assert any(ln == line and fragment in msg for _f, ln, msg in errors), errors
    assert all(f == str(path) for f, _ln, _msg in errors)
    # every message is one line
    assert all("\n" not in msg for _f, _ln, msg in errors)
    # load_config refuses the same file with the same list
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.errors == errors
    assert exc.value.exit_code == 2
    assert f"{path}:{line}: " in "\n".join(exc.value.lines())


# ---- a bare `m` in a retention key (issue 11, item 14) ---------------------------------------
@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        pytest.param(
            """
            sites:
              a:
                roots: [@A]
                keep: 6m
            """,
            4,
            "sites.a.keep: '6m': did you mean 6mo (months)? minutes are written 6min",
            id="keep",
        ),
        pytest.param(
            """
            sites:
              a:
                keep: 1y
                min_keep: 1d6m
                roots: [@A]
            """,
            4,
            "sites.a.min_keep: '1d6m': did you mean 1d6mo (months)? minutes are written 1d6min",
            id="min_keep",
        ),
        pytest.param(
            """
            legal_min_keep: 1m
            sites:
              a: {keep: 1y, roots: [@A]}
            """,
            1,
            "legal_min_keep: '1m': did you mean 1mo (months)? minutes are written 1min",
            id="legal_min_keep",
        ),
    ],
)
def test_bare_m_in_a_retention_key_is_refused_at_its_line(tmp_path, roots, text, line, fragment):
    path = write(tmp_path, roots, text)
    cfg, errors, _warnings = check_config(path)
    assert cfg is None
    assert [(ln, msg) for _f, ln, msg in errors] == [(line, fragment)], errors
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.lines() == [f"{path}:{line}: {fragment}"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("sites:\n  a: {keep: 8000y, roots: [@A]}\n", 2),
        ("sites:\n  a: {keep: 1y, roots: [@A]}\ncameras:\n  front: {keep: 8000y}\n", 4),
        ("sites:\n  a: {keep: 101y, min_keep: 1d, roots: [@A]}\n", 2),
        ("sites:\n  a: {keep: 5300w, roots: [@A]}\n", 2),  # 101.6 years in weeks
    ],
)
def test_a_keep_past_100_years_is_refused_at_its_line(tmp_path, roots, text, line):
    # 8000y passed config check, then crashed plan and start, and a reload with it (reported
    # as refused) stopped all retention
    path = write(tmp_path, roots, text)
    cfg, errors, _warnings = check_config(path)
    assert cfg is None
    assert [ln for _f, ln, _m in errors] == [line], errors
    assert "longer than 100 years" in errors[0][2]
    ok = write(tmp_path, roots, "sites:\n  a: {keep: 100y, roots: [@A]}\n")
    assert check_config(ok)[0] is not None


def test_min_is_minutes_everywhere_and_m_stays_minutes_outside_retention(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        settle: 3m
        sweep_every: 10min
        rescan_every: 1h30m
        sites:
          a: {keep: 90min, min_keep: 1h30min, roots: [@A]}
          b: {keep: 6mo, roots: [@B]}
        """,
    )
    cfg = load_config(path)
    assert cfg.settle == D("180s") and cfg.sweep_every == D("600s")
    assert cfg.rescan_every == D("5400s")
    rules = cfg.site_rules()
    assert (rules["a"].keep, rules["a"].min_keep) == (D("5400s"), D("5400s"))
    assert rules["b"].keep == Duration(months=6)
    # what `config show` writes for a retention key reads back as the same duration
    eff = cfg.effective()
    assert eff["sites"]["a"]["keep"] == "1h30min" and eff["settle"] == "3m"
    again = write(tmp_path, roots, yaml.safe_dump(eff, allow_unicode=True), name="again.yaml")
    assert load_config(again).site_rules()["a"].keep == D("5400s")


def test_all_errors_are_reported_in_line_order(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        settle: soon
        sites:
          a:
            profile: highway
            keep: 15x
            roots: [relative]
          b:
            roots: [@B]
        cameras:
          c1: {level: 010}
        disk: {action: nuke}
        """,
    )
    cfg, errors, _ = check_config(path)
    assert cfg is None
    got = [(ln, msg.split(":")[0]) for _f, ln, msg in errors]
    assert got == [
        (1, "settle"),
        (5, "sites.a.keep"),
        (6, "sites.a.roots[0]"),
        (7, "sites.b"),
        (10, "cameras.c1.level"),
        (11, "disk.action"),
    ]


def test_cross_checks_run_even_when_another_section_is_bad(tmp_path, roots):
    # the typo in `media` must not hide the nested roots or the floor problem
    path = write(
        tmp_path,
        roots,
        """
        sites:
          a: {profile: highway, roots: [@A]}
          b: {keep: 5d, min_keep: 7d, roots: [@A/sub]}
        media: {scaner: auto}
        """,
    )
    _cfg, errors, _ = check_config(path)
    messages = {(ln, msg.split(":")[0]) for _f, ln, msg in errors}
    assert messages == {(3, "sites.b.keep"), (3, "sites.b.roots[0]"), (4, "media.scaner")}


# ---- the file itself ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        pytest.param(b"", 1, "the file is empty", id="empty"),
        pytest.param(b"# only a comment\n", 1, "the file is empty", id="comment-only"),
        pytest.param(b"- a\n- b\n", 1, "the top level must be a mapping", id="list"),
        pytest.param(b"just text\n", 1, "the top level must be a mapping", id="scalar"),
        pytest.param(
            b"sites:\n  a: {profile: highway\n  b: 1\n", 3, "YAML syntax error", id="syntax"
        ),
        pytest.param(b"sites:\n  a:\n\tprofile: x\n", 3, "YAML syntax error", id="tab"),
        pytest.param(b"a: 1\n---\nb: 2\n", 2, "YAML syntax error", id="two-documents"),
        pytest.param(b"timezone: UTC\nname: caf\xe9\n", 2, "not valid UTF-8", id="latin1"),
    ],
)
def test_unusable_file(tmp_path, content, line, fragment):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    cfg, errors, warnings = check_config(path)
    assert cfg is None and warnings == []
    assert len(errors) == 1
    f, ln, msg = errors[0]
    assert (f, ln) == (str(path), line)
    assert fragment in msg


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.yaml"
    _, errors, _ = check_config(missing)
    assert errors == [(str(missing), 0, errors[0][2])]
    assert "no such file" in errors[0][2]
    _, errors, _ = check_config(tmp_path)
    assert errors[0][:2] == (str(tmp_path), 0) and "is a directory" in errors[0][2]
    with pytest.raises(ConfigError):
        load_config(missing)


# ---- good configs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("site_yaml", "keep", "min_keep", "profile"),
    [
        pytest.param("profile: highway", D("15d"), None, "highway", id="highway"),
        pytest.param("profile: residential", D("30d"), D("30d"), "residential", id="residential"),
        pytest.param("profile: general", D("6mo"), None, "general", id="general"),
        pytest.param("profile: school", D("1y"), None, "school", id="school"),
        pytest.param(
            "{profile: residential, keep: 45d}",
            D("45d"),
            D("30d"),
            "residential",
            id="override-keep",
        ),
        pytest.param(
            "{profile: residential, keep: 20d, min_keep: 15d}",
            D("20d"),
            D("15d"),
            "residential",
            id="override-both",
        ),
        pytest.param(
            "{profile: school, min_keep: 30d}", D("1y"), D("30d"), "school", id="add-floor"
        ),
        pytest.param("{profile: highway, keep: 2w}", D("14d"), None, "highway", id="weeks"),
        pytest.param("{keep: 90min}", D("90m"), None, None, id="keep-only"),
        pytest.param("{keep: 24h, min_keep: 24h}", D("1d"), D("1d"), None, id="keep-equals-floor"),
        pytest.param(
            "{profile: general, keep: }", D("6mo"), None, "general", id="empty-keep-is-unset"
        ),
    ],
)
def test_site_rules_resolve_profile_and_overrides(
    tmp_path, roots, site_yaml, keep, min_keep, profile
):
    if site_yaml.startswith("{"):
        body = site_yaml[:-1] + ", roots: [@A]}"
    else:
        body = "{" + site_yaml + ", roots: [@A]}"
    path = write(tmp_path, roots, f"sites:\n  s: {body}\n")
    rules = load_config(path).site_rules()["s"]
    assert (rules.keep, rules.min_keep, rules.profile) == (keep, min_keep, profile)
    assert rules.site == "s"


def test_profiles_match_the_spec():
    assert {n: (p.keep, p.min_keep) for n, p in PROFILES.items()} == {
        "highway": (D("15d"), None),
        "residential": (D("30d"), D("30d")),
        "general": (D("6mo"), None),
        "school": (D("1y"), None),
    }


def test_full_config_values(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        state_dir: /srv/nvr-state
        timezone: Asia/Shanghai
        settle: 90s
        socket: /run/nvr/ctl.sock
        socket_group: video
        sweep_every: 1m
        rescan_every: 30m
        guards: {max_delete_fraction: 5%, max_clock_jump: 2h}
        disk: {min_free: 0.25, action: overwrite-oldest}
        sites:
          frigate:
            profile: general
            roots: [@A]
            layout: "%Y-%m-%d/%H/{camera}/%M.%S.mp4"
            layout_timezone: UTC
            extensions: [.MP4, .Mkv]
          berlin:
            keep: 2w
            roots: ["@B"]
            timezone: Europe/Berlin
            approval: {steps: [boss], hours: "09:00-17:00"}
        cameras:
          front: {level: 1, name: "no"}
          side: {name: 侧门}
        people:
          users:
            alice: {roles: [operator, boss], level: 2}
            bob: {roles: [dept_manager]}
          groups:
            guards: {roles: [security_lead]}
        approval:
          decide_within: 5
          hours: "08:00-24:00"
          holidays: [2026-10-01..2026-10-03, 2026-01-01]
          workdays: [2026-09-27]
        export: {targets: ["@T"], crf: 18, preset: slow}
        media: {require_enrolled: false, scanner: clamscan}
        """,
    )
    cfg = load_config(path)
    assert cfg.source_path == path and cfg.source_path.is_absolute()
    assert cfg.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cfg.tz == ZoneInfo("Asia/Shanghai")
    assert cfg.site_tz("frigate") == ZoneInfo("Asia/Shanghai")
    assert cfg.site_tz("berlin") == ZoneInfo("Europe/Berlin")
    rules = cfg.site_rules()
    assert list(rules) == ["frigate", "berlin"]
    fr, be = rules["frigate"], rules["berlin"]
    assert (fr.keep, fr.min_keep, fr.tz, fr.settle) == (
        D("6mo"),
        None,
        ZoneInfo("Asia/Shanghai"),
        90.0,
    )
    assert (fr.min_free, fr.disk_action) == (0.25, "overwrite-oldest")
    assert (be.keep, be.tz, be.profile) == (D("14d"), ZoneInfo("Europe/Berlin"), None)
    assert cfg.guard_rules() == GuardRules(max_delete_fraction=0.05, max_clock_jump=7200.0)
    assert cfg.sweep_every == D("1m") and cfg.rescan_every == D("30m")
    assert (cfg.state_dir, cfg.socket, cfg.socket_group) == (
        "/srv/nvr-state",
        "/run/nvr/ctl.sock",
        "video",
    )
    # the Frigate path is read in UTC: 06:05 UTC = 14:05 in Shanghai
    layout = cfg.layout_for("frigate")
    assert layout is not None and cfg.layout_for("berlin") is None
    when = datetime(2026, 11, 20, 14, 5, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
    assert layout.parse("2026-11-20/06/cam1/05.00.mp4") == ("cam1", when, None)
    assert cfg.extensions_for("frigate") == frozenset({".mp4", ".mkv"})
    assert cfg.extensions_for("berlin") == frozenset(
        {".mp4", ".mkv", ".ts", ".avi", ".h264", ".h265", ".dav"}
    )
    assert cfg.cameras["front"].name == "no" and cfg.cameras["front"].level == 1
    assert cfg.cameras["side"].level == 2  # unclassified camera: the stricter level
    assert cfg.people.users["bob"].level == 1 and cfg.people.groups["guards"].roles == [
        "security_lead"
    ]
    assert cfg.approval.decide_within == 5
    assert cfg.approval.hours_window() == (8 * 60, 24 * 60)
    assert cfg.approval.holidays == [
        date(2026, 1, 1),
        date(2026, 10, 1),
        date(2026, 10, 2),
        date(2026, 10, 3),
    ]
    assert cfg.approval_for("berlin") == (["boss"], "09:00-17:00")
    assert cfg.approval_for("frigate") == (["dept_manager", "security_lead"], "08:00-24:00")
    assert cfg.export.targets == [str(roots["@T"])] and cfg.export.crf == 18
    assert cfg.media.require_enrolled is False and cfg.media.scanner == "clamscan"
    assert cfg.warnings == []


def test_defaults(tmp_path, roots):
    cfg = load_config(write(tmp_path, roots, "sites:\n  a: {profile: highway, roots: [@A]}\n"))
    assert (cfg.state_dir, cfg.timezone, cfg.socket, cfg.socket_group) == (
        "/var/lib/nvr-guard",
        "Asia/Shanghai",
        "/run/nvr-guard/control.sock",
        "nvr-guard",
    )
    assert (cfg.settle, cfg.sweep_every, cfg.rescan_every) == (D("2m"), D("5m"), D("1h"))
    assert cfg.guard_rules() == GuardRules(max_delete_fraction=0.2, max_clock_jump=86400.0)
    assert (cfg.disk.min_free, cfg.disk.action) == (0.1, "alert")
    a = cfg.approval
    assert (a.steps, a.decide_within, a.valid_for, a.hours) == (
        ["dept_manager", "security_lead"],
        3,
        D("30d"),
        "08:00-20:00",
    )
    assert (a.emergency.roles, a.emergency.backfill_within, a.max_range) == ([], D("24h"), D("24h"))
    assert (cfg.media.scanner, cfg.media.scan_max_age, cfg.media.require_enrolled) == (
        "auto",
        D("15m"),
        True,
    )
    assert cfg.signing_key_path() == "/var/lib/nvr-guard/export-key.pem"


@pytest.mark.parametrize(
    ("text", "value"),
    [("3 working days", 3), ("1 working day", 1), ("10", 10), ("5 Working Days", 5)],
)
def test_decide_within_forms(tmp_path, roots, text, value):
    path = write(
        tmp_path,
        roots,
        f"approval: {{decide_within: {text}}}\nsites:\n  a: {{profile: highway, roots: [@A]}}\n",
    )
    assert load_config(path).approval.decide_within == value


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.1), ("0.1", 0.1), ("0", 0.0), ("100%", 1.0), ("12.5%", 0.125)]
)
def test_min_free_forms(tmp_path, roots, text, value):
    path = write(
        tmp_path,
        roots,
        f"disk: {{min_free: {text}}}\nsites:\n  a: {{profile: highway, roots: [@A]}}\n",
    )
    assert load_config(path).site_rules()["a"].min_free == pytest.approx(value)


def test_quoted_text_that_looks_like_yaml11_values_is_text(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        sites:
          a: {profile: highway, roots: [@A]}
        cameras:
          "010": {level: 2, name: "yes"}
          on-ramp: {level: 1, name: '1:30'}
        """,
    )
    cfg = load_config(path)
    assert cfg.cameras["010"].name == "yes"
    assert cfg.cameras["on-ramp"].name == "1:30"


def test_effective_is_json_and_round_trips(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        legal_min_keep: 30d
        sites:
          a: {profile: residential, keep: 45d, roots: [@A]}
          b:
            profile: general
            min_keep: 30d
            roots: [@B]
            layout: "%Y-%m-%d/%H/{camera}/%M.%S.mp4"
            layout_timezone: UTC
        approval: {holidays: [2026-10-01..2026-10-02]}
        """,
    )
    cfg = load_config(path)
    eff = cfg.effective()
    json.dumps(eff)  # JSON-able as is
    assert eff["settle"] == "2m" and eff["legal_min_keep"] == "30d"
    assert eff["guards"] == {
        "max_delete_fraction": "20%",
        "max_clock_jump": "1d",
        "max_clock_skew": "1h",
    }
    assert eff["disk"] == {"min_free": "10%", "action": "alert"}
    assert eff["sites"]["a"]["keep"] == "45d" and eff["sites"]["a"]["min_keep"] == "30d"
    assert (
        eff["sites"]["a"]["timezone"] == "Asia/Shanghai"
        and eff["sites"]["a"]["layout_timezone"] is None
    )
    assert eff["sites"]["b"]["keep"] == "6mo" and eff["sites"]["b"]["layout_timezone"] == "UTC"
    assert eff["sites"]["b"]["extensions"][0] == ".mp4"
    assert eff["approval"]["decide_within"] == "3 working days"
    assert eff["approval"]["holidays"] == ["2026-10-01", "2026-10-02"]
    # `config show` output is itself a valid config with the same effect
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(eff, allow_unicode=True, sort_keys=False), encoding="utf-8")
    cfg2 = load_config(again)
    assert cfg2.effective() == eff
    assert cfg2.site_rules() == cfg.site_rules()


# ---- warnings ---------------------------------------------------------------------------------
def test_legal_minimum_warnings(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        legal_min_keep: 30d
        sites:
          toll:
            profile: highway
            roots: [@A]
          campus:
            profile: school
            min_keep: 30d
            roots: [@B]
          office:
            profile: general
            roots: [@A/sub]
        """,
    )
    # office's root is nested in toll's: an error, yet the warnings are still reported
    cfg, errors, warnings = check_config(path)
    assert cfg is None and [ln for _f, ln, _m in errors] == [12]
    assert [(ln, m.split(":")[0]) for _f, ln, m in warnings] == [
        (4, "sites.toll"),
        (10, "sites.office"),
    ]
    assert "keep 15d is below the legal minimum legal_min_keep 30d" in warnings[0][2]
    assert "set min_keep: 30d" in warnings[1][2]


def test_warnings_do_not_refuse_the_config(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        legal_min_keep: 30d
        sites:
          toll: {profile: highway, roots: [@A], layout_timezone: UTC}
        people:
          users: {alice: {roles: [operator]}}
        export: {targets: [@T/no-such-dir]}
        """,
    )
    cfg, errors, warnings = check_config(path)
    assert errors == [] and cfg is not None
    got = sorted((ln, m.split(":")[0]) for _f, ln, m in warnings)
    assert got == [
        (1, "approval.steps"),  # default steps, nobody holds those roles (approval: not written)
        (3, "sites.toll"),
        (3, "sites.toll.layout_timezone"),
        (6, "export.targets[0]"),
    ]
    assert cfg.warnings == warnings
    assert load_config(path).site_rules()["toll"].keep == D("15d")


# ---- the shipped examples cannot rot -----------------------------------------------------------
def _with_tmp_roots(text: str, base: Path) -> str:
    """The examples' roots do not exist here: point each at a fresh directory, same lines."""

    def repl(m: re.Match[str]) -> str:
        new = []
        for raw in m.group(1).split(","):
            d = base / raw.strip().strip("/").replace("/", "_")
            d.mkdir(parents=True, exist_ok=True)
            new.append(str(d))
        return "roots: [" + ", ".join(new) + "]"

    out, n = re.subn(r"roots:\s*\[([^\]]*)\]", repl, text)
    assert n > 0, "examples write roots as a flow list: roots: [/a, /b]"
    return out


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_an_example_per_profile():
    assert set(EXAMPLE_FILES) >= {f"{p}.yaml" for p in PROFILES} | {"example.yaml"}


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_loads(tmp_path, name):
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    cfg, errors, warnings = parse_config(_with_tmp_roots(text, tmp_path).encode(), name)
    assert errors == [] and warnings == []
    assert cfg is not None
    profile = name.removesuffix(".yaml")
    if profile in PROFILES:
        assert profile in {s.profile for s in cfg.sites.values()}
    for site in cfg.sites:
        cfg.layout_for(site)
    json.dumps(cfg.effective())


def test_general_example_reads_frigate_paths_in_utc(tmp_path):
    text = (EXAMPLES / "general.yaml").read_text(encoding="utf-8")
    cfg, _, _ = parse_config(_with_tmp_roots(text, tmp_path).encode(), "general.yaml")
    assert cfg is not None
    (site,) = cfg.sites
    layout = cfg.layout_for(site)
    assert layout is not None and layout.tz == ZoneInfo("UTC")
    assert cfg.site_rules()[site].tz == ZoneInfo("Asia/Shanghai")


def test_full_example_has_every_spec_key():
    cfg_keys = set(Config.model_fields)
    text = (EXAMPLES / "example.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    spec_top = {
        "state_dir",
        "timezone",
        "settle",
        "socket",
        "socket_group",
        "sweep_every",
        "guards",
        "disk",
        "sites",
        "cameras",
        "people",
        "approval",
        "export",
        "media",
    }
    assert spec_top <= set(data) <= cfg_keys
    assert set(data["guards"]) == {"max_delete_fraction", "max_clock_jump", "max_clock_skew"}
    assert set(data["disk"]) == {"min_free", "action"}
    site_keys = set().union(*(s.keys() for s in data["sites"].values()))
    assert {
        "profile",
        "roots",
        "layout",
        "extensions",
        "layout_timezone",
        "keep",
        "min_keep",
    } <= site_keys
    assert {"steps", "decide_within", "valid_for", "hours", "emergency"} <= set(data["approval"])
    assert {"targets"} <= set(data["export"])
    assert {"scanner", "scan_max_age", "require_enrolled"} <= set(data["media"])
    assert set(data["people"]) == {"users", "groups"}


def test_export_group_that_does_not_exist_is_an_error_at_its_line(tmp_path, roots):
    # a group name no host has: a typo would leave every package unreadable to its handlers
    path = write(
        tmp_path,
        roots,
        """
        sites:
          a: {profile: highway, roots: [@A]}
        export:
          targets: []
          group: nvg-no-such-group
        """,
    )
    cfg, errors, _ = check_config(path)
    assert cfg is None
    assert [(line, msg.split(";")[0]) for _, line, msg in errors] == [
        (5, "export.group: group 'nvg-no-such-group' does not exist")
    ]
    # an existing group is taken; the default, even written out (`config show` writes every
    # default), is looked up only at export time: sysusers creates it with the service
    ok = write(
        tmp_path, roots, "sites:\n  a: {profile: highway, roots: [@A]}\nexport: {group: root}\n"
    )
    assert load_config(ok).export.group == "root"
    default = write(tmp_path, roots, "sites:\n  a: {profile: highway, roots: [@A]}\n")
    assert load_config(default).export.group == "nvr-guard-export"
    named = write(
        tmp_path,
        roots,
        "sites:\n  a: {profile: highway, roots: [@A]}\nexport: {group: nvr-guard-export}\n",
    )
    assert load_config(named).export.group == "nvr-guard-export"


def test_recipient_certificates_are_checked_at_their_lines(tmp_path, roots):
    from tests.fixtures.pki import make_unit

    ok = make_unit(tmp_path / "pki", "ok").cert
    old = make_unit(tmp_path / "pki", "old", days=(-100, -1)).cert
    soon = make_unit(tmp_path / "pki", "soon", days=(-1, 10)).cert
    ed = make_unit(tmp_path / "pki", "ed", kind="ed25519").cert
    path = write(
        tmp_path,
        roots,
        f"""
        sites:
          a: {{profile: highway, roots: [@A]}}
        export:
          recipients:
            police: {ok}
            old: {old}
            soon: {soon}
            ed: {ed}
            gone: {tmp_path / "missing.pem"}
        """,
    )
    cfg, errors, warnings = check_config(path)
    assert cfg is None
    assert [(line, msg.split(":")[0]) for _, line, msg in errors] == [
        (8, "export.recipients.ed"),
        (9, "export.recipients.gone"),
    ]
    assert "RSA or EC certificate" in errors[0][2] and "cannot read" in errors[1][2]
    got = {line: msg for _, line, msg in warnings}
    assert "expired on" in got[6] and "ends in 9 days" in got[7]


def test_privacy_zones_and_protection_keys_are_read_and_checked(tmp_path, roots):
    path = write(
        tmp_path,
        roots,
        """
        sites:
          a: {profile: highway, roots: [@A], export: {encrypt: passphrase}}
        cameras:
          c1:
            privacy_zones:
              - [0.1, 0.1, 0.2, 0.2]
              - {polygon: [[0, 0], [0.5, 0], [0.2, 0.4]], name: door}
        export: {encrypt_from_level: 2, native_with_zones: refuse, target_keep: 7d}
        """,
    )
    cfg = load_config(path)
    zones = cfg.cameras["c1"].privacy_zones
    assert zones[0].rect == (0.1, 0.1, 0.2, 0.2) and zones[1].name == "door"
    assert cfg.sites["a"].export.encrypt == "passphrase"
    assert cfg.export.target_keep.seconds == 7 * 86400 and cfg.export.native_with_zones == "refuse"
    for bad, line, why in [
        ("cameras:\n  c1: {privacy_zones: [[0.9, 0, 0.2, 0.1]]}\n", 4, "reaches past the frame"),
        ("export: {encrypt: aes}\n", 3, "not one of"),
        ("export: {native_with_zones: maybe}\n", 3, "not one of"),
        ("export: {encrypt: recipient}\n", 3, "needs the units' certificates"),
    ]:  # fmt: skip
        p = write(tmp_path, roots, "sites:\n  a: {profile: highway, roots: [@A]}\n" + bad)
        cfg, errors, _ = check_config(p)
        assert cfg is None and any(ln == line and why in msg for _, ln, msg in errors), errors
