"""Recorder presets and the pattern-language additions: every preset reads a tree generated from
its recorder's example shape (midnight, a DST change day in Europe/Berlin, Dahua's end across
midnight, epoch milliseconds), through the Layout API and through `layout test --json`; Hikvision
and Milestone are refused at config load with file:line."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.retention.layout import Layout
from nvr_guard.retention.presets import PRESETS, REFUSED, compile_layout
from tests.fixtures.site import Site, make_config

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*a: int) -> float:
    return datetime(*a, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Case:
    """One recording as a recorder names it: camera, start and end (None: the name has none),
    both as the instants the name stands for."""

    camera: str
    start: float
    end: float | None
    rel: str  # the path under the root
    root: str = ""  # the root's own name, for presets whose camera is the root's name


def _local(t: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(t, tz)


# instants around the edges, each with the local wall time a recorder in Berlin writes
MIDNIGHT = utc(2024, 12, 31, 22, 59, 50)  # 23:59:50 local on New Year's Eve
SPRING_BEFORE = utc(2024, 3, 31, 0, 59, 59)  # 01:59:59 CET, the last second before the change
SPRING_AFTER = utc(2024, 3, 31, 1, 0, 0)  # 03:00:00 CEST, the first after it
AUTUMN_FIRST = utc(2024, 10, 27, 0, 30, 0)  # 02:30 CEST: the first of the two 02:30s
PLAIN = utc(2024, 5, 1, 12, 3, 20)  # 14:03:20 CEST
EDGES = [PLAIN, MIDNIGHT, SPRING_BEFORE, SPRING_AFTER, AUTUMN_FIRST]


def _by_start(make: Callable[[float, datetime], Case]) -> Callable[[], list[Case]]:
    def cases() -> list[Case]:
        return [make(t, _local(t, BERLIN)) for t in EDGES]

    return cases


def frigate() -> list[Case]:
    # Frigate names in UTC, whatever the zone: the directory hour is the UTC hour
    out = []
    for t in EDGES:
        u = datetime.fromtimestamp(t, UTC)
        out.append(Case("front", t, None, f"{u:%Y-%m-%d}/{u:%H}/front/{u:%M.%S}.mp4"))
    return out


def dahua() -> list[Case]:
    out = []
    for t in EDGES:
        lt, le = _local(t, BERLIN), _local(t + 300, BERLIN)
        rel = f"{lt:%Y-%m-%d}/001/dav/{lt:%H}/{lt:%H.%M.%S}-{le:%H.%M.%S}[M][0@0][0].dav"
        out.append(Case("001", t, t + 300, rel))
    # across midnight: 23:58:20 to 00:03:20, the end written smaller than the start
    t = utc(2024, 5, 1, 21, 58, 20)
    out.append(Case("002", t, t + 300, "2024-05-01/002/dav/23/23.58.20-00.03.20[R][0@0][0].dav"))
    # the repeated hour in autumn: 02:55 (first, CEST) to 02:05 (second, CET) is 10 minutes
    t = utc(2024, 10, 27, 0, 55)
    out.append(Case("003", t, t + 600, "2024-10-27/003/dav/02/02.55.00-02.05.00[M][0@0][0].dav"))
    return out


def nx_witness() -> list[Case]:
    out = []
    for i, t in enumerate(EDGES):
        ms = int(t * 1000) + 123  # epoch milliseconds: the start is exact to the millisecond
        lt = _local(t, BERLIN)
        quality = "hi_quality" if i % 2 else "low_quality"
        rel = f"{quality}/e3e9a385-7fe0/{lt:%Y/%m/%d/%H}/{ms}_60500.mkv"
        out.append(Case("e3e9a385-7fe0", ms / 1000, ms / 1000 + 60.5, rel))
    return out


def viseron() -> list[Case]:
    return [Case("garage", t, None, f"garage/{int(t)}.m4s") for t in EDGES]


PRESET_CASES: dict[str, Callable[[], list[Case]]] = {
    "frigate": frigate,
    "dahua": dahua,
    "nx-witness": nx_witness,
    "shinobi": _by_start(
        lambda t, lt: Case("mon1", t, None, f"Xk2aP/mon1/{lt:%Y-%m-%dT%H-%M-%S}.mp4")
    ),
    "motioneye": _by_start(
        lambda t, lt: Case("Camera1", t, None, f"{lt:%Y-%m-%d}/{lt:%H-%M-%S}.mp4", "Camera1")
    ),
    "motion": _by_start(lambda t, lt: Case("porch", t, None, f"07-{lt:%Y%m%d%H%M%S}.mkv", "porch")),
    # up to 1.36 <event id>-video.mp4; 1.38 names the codec: <event id>-video.<codec>.mp4
    "zoneminder": lambda: (
        _by_start(lambda t, lt: Case("3", t, None, f"3/{lt:%y/%m/%d/%H/%M/%S}/48211-video.mp4"))()
        + _by_start(
            lambda t, lt: Case("3", t, None, f"3/{lt:%y/%m/%d/%H/%M/%S}/48212-video.h264.mp4")
        )()
    ),
    "ispy": _by_start(
        lambda t, lt: Case("2", t, None, f"video/BNAQK/2_{lt:%Y-%m-%d_%H-%M-%S}.mp4")
    ),
    "agent-dvr": _by_start(
        lambda t, lt: Case("4", t, None, f"video/QWXYZ/4_{lt:%Y-%m-%d_%H-%M-%S}_348.mp4")
    ),
    "viseron": viseron,
    "blue-iris": _by_start(lambda t, lt: Case("Cam1", t, None, f"Cam1.{lt:%Y%m%d_%H%M%S}.bvr")),
}


def test_every_preset_has_generated_cases() -> None:
    assert set(PRESET_CASES) == set(PRESETS)
    # and every recorder of the table is a preset, the unprunable ones refused
    assert set(PRESETS) | set(REFUSED) == {
        "frigate",
        "dahua",
        "nx-witness",
        "shinobi",
        "motioneye",
        "motion",
        "zoneminder",
        "ispy",
        "agent-dvr",
        "viseron",
        "blue-iris",
        "hikvision",
        "milestone",
    }


def _layout(name: str, root: str) -> Layout:
    return compile_layout(name, BERLIN, explicit_tz=False).for_root(f"/srv/{root or name}")


def test_zoneminder_never_reads_the_file_of_an_event_still_recording() -> None:
    # 1.38 writes incomplete.<codec>.<container> until the event ends
    zm = _layout("zoneminder", "")
    assert zm.parse("3/24/05/01/14/03/20/incomplete.h264.mp4") is None
    assert zm.parse("3/24/05/01/14/03/20/48211-video.h264.mp4") is not None


@pytest.mark.parametrize("name", sorted(PRESET_CASES))
def test_preset_reads_camera_start_and_end_of_its_recorders_names(name: str) -> None:
    for c in PRESET_CASES[name]():
        got = _layout(name, c.root).parse(c.rel)
        assert got == (c.camera, c.start, c.end), (name, c.rel)


@pytest.mark.parametrize("name", sorted(PRESET_CASES))
def test_preset_example_path_matches(name: str) -> None:
    # the README's example path (placeholders filled in) is read by the preset
    example = (
        PRESETS[name]
        .example.replace("<camera id>", "cam")
        .replace("<group>", "g")
        .replace("<monitor>", "m")
        .replace("<monitor id>", "3")
        .replace("<event id>", "9")
        .replace("<dir>", "D")
        .replace("<camid>", "1")
        .replace("<camera>", "cam")
    )
    assert _layout(name, "").parse(example) is not None, example


def test_frigate_reads_utc_and_layout_timezone_overrides() -> None:
    rel = "2024-05-01/14/front/03.20.mp4"
    assert compile_layout("frigate", BERLIN, False).parse(rel) == (
        "front",
        utc(2024, 5, 1, 14, 3, 20),
        None,
    )
    # an explicit layout_timezone wins over the preset's UTC
    assert compile_layout("frigate", BERLIN, True).parse(rel) == (
        "front",
        utc(2024, 5, 1, 12, 3, 20),
        None,
    )


def test_a_local_time_skipped_or_repeated_by_dst_does_not_crash() -> None:
    layout = compile_layout("shinobi", BERLIN, False)
    # 02:30 on the spring day does not exist: read with the offset before the change (+01:00)
    assert layout.parse("g/m/2024-03-31T02-30-00.mp4") == ("m", utc(2024, 3, 31, 1, 30), None)
    # 02:30 on the autumn day exists twice: the first (CEST) instant
    assert layout.parse("g/m/2024-10-27T02-30-00.mp4") == ("m", utc(2024, 10, 27, 0, 30), None)


def test_dahua_directories_that_name_no_date_match_nothing() -> None:
    layout = compile_layout("dahua", BERLIN, False)
    for rel in (
        "2024-02-30/001/dav/14/14.03.20-14.08.20[M][0@0][0].dav",  # no 30 February
        "2024-05-01/001/dav/14/14.63.20-14.08.20[M][0@0][0].dav",  # minute 63
        "2024-05-01/001/dav/14/14.03.20-14.68.20[M][0@0][0].dav",  # end minute 68
        "2024-05-01/001/pic/14/14.03.20-14.08.20[M][0@0][0].dav",  # not dav/
        "2024-05-01/001/dav/14/14.03.20[M][0@0][0].dav",  # no end
    ):
        assert layout.parse(rel) is None, rel


@pytest.mark.parametrize(
    ("pattern", "rel", "want"),
    [
        # {end:...} with a date of its own: no next-day rule
        (
            "{camera}/%Y%m%d%H%M%S-{end:%Y%m%d%H%M%S}.mp4",
            "c/20240501235950-20240502000010.mp4",
            ("c", utc(2024, 5, 1, 21, 59, 50), utc(2024, 5, 1, 22, 0, 10)),
        ),
        # %s with {end:%s}
        (
            "{camera}/%s-{end:%s}.ts",
            "c/1714572200-1714572260.ts",
            ("c", 1714572200.0, 1714572260.0),
        ),
        # * as a whole component, * as the rest of a name, {ignore} inside a name
        (
            "*/{camera}/%Y-%m-%d_%H*.mp4",
            "any/c/2024-05-01_14-whatever.mp4",
            ("c", utc(2024, 5, 1, 12), None),
        ),
        ("{camera}/{ignore}_%Y%m%d.mp4", "c/x_y_20240501.mp4", ("c", utc(2024, 4, 30, 22), None)),
        # a directory date beside an epoch: the epoch is the start
        ("{camera}/%Y/{epoch_ms}.mkv", "c/2024/1714572200500.mkv", ("c", 1714572200.5, None)),
        (
            "{camera}/{epoch_ms}_{duration_ms}.mkv",
            "c/1714572200000_5.mkv",
            ("c", 1714572200.0, 1714572200.005),
        ),
    ],
)
def test_pattern_language_additions(pattern: str, rel: str, want: tuple[Any, ...]) -> None:
    assert Layout.compile(pattern, BERLIN).parse(rel) == want


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("{camera}/%s_{epoch_ms}.mp4", "both give the start"),
        ("{camera}/%Y-%m-%d/{end:%H}_{duration_ms}.mp4", "both give the end"),
        ("{camera}/%Y-%m-%d/{end:}.mp4", "names no directive"),
        ("{camera}/%Y-%m-%d/%H-{end:%H%}.mp4", "a lone '%'"),
        ("{camera}/%Y-%m-%d/{end:%q}.mp4", "unsupported directive"),
        ("{camera}/{nope}/%Y-%m-%d.mp4", "unknown placeholder"),
        ("{camera}/%H%M.mp4", "lacks %Y %m %d"),
    ],
)
def test_bad_patterns_are_refused_with_the_reason(pattern: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Layout.compile(pattern, BERLIN)


def test_a_root_named_camera_layout_reads_nothing_until_bound_to_a_root() -> None:
    layout = compile_layout("motioneye", BERLIN, False)
    assert layout.parse("2024-05-01/14-03-20.mp4") is None
    assert layout.for_root(b"/var/lib/motioneye/Camera1/").parse("2024-05-01/14-03-20.mp4") == (
        "Camera1",
        utc(2024, 5, 1, 12, 3, 20),
        None,
    )


def test_sidecars_are_never_segments() -> None:
    viseron = compile_layout("viseron", BERLIN, False)
    assert viseron.parse("garage/init.mp4") is None and viseron.is_sidecar(b"init.mp4")
    assert not viseron.is_sidecar(b"1714572200.m4s")
    me = compile_layout("motioneye", BERLIN, False)
    assert me.is_sidecar(b"14-03-20.mp4.thumb") and not me.is_sidecar(b".thumb")
    assert PRESETS["motioneye"].sidecar_of("14-03-20.mp4.thumb") == "14-03-20.mp4"
    assert PRESETS["viseron"].sidecar_of("init.mp4") == ""
    assert PRESETS["viseron"].sidecar_of("1.m4s") is None


# ---- through the config and `layout test --json` --------------------------------------------


def _root_of(base: Path, name: str, case_root: str) -> Path:
    return base / f"p-{name}" / case_root if case_root else base / f"p-{name}"


@pytest.fixture
def preset_sites(site: Site) -> Site:
    extra = ""
    for name, cases in PRESET_CASES.items():
        root = _root_of(site.base, name, cases()[0].root)
        root.mkdir(parents=True)
        extra += f"""  {name.replace("-", "_")}:
    keep: 30d
    timezone: Europe/Berlin
    roots: [{root}]
    layout: {name}
"""
    site.config.write_text(make_config(site, extra_site=extra, fraction=1.0))
    return site


def _layout_test(site: Site, *paths: str) -> tuple[int, dict[str, Any]]:
    r = site.run("--json", "layout", "test", *paths)
    assert r.stdout.strip(), f"exit {r.returncode}: {r.stderr}"
    return r.returncode, json.loads(r.stdout)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, BERLIN).isoformat(timespec="seconds")


def test_layout_test_json_reads_every_preset(preset_sites: Site) -> None:
    s = preset_sites
    paths: list[str] = []
    want: list[tuple[str, Case]] = []
    for name, cases in PRESET_CASES.items():
        for c in cases():
            paths.append(str(_root_of(s.base, name, c.root) / c.rel))
            want.append((name, c))
    code, res = _layout_test(s, *paths)
    assert code == 0, [r for r in res["paths"] if not r["ok"]]
    for (name, c), r in zip(want, res["paths"], strict=True):
        got = (r["site"], r["camera"], r["start"], r["end"], r["end_from"], r["preset"])
        assert got == (
            name.replace("-", "_"),
            c.camera,
            _iso(c.start),
            None if c.end is None else _iso(c.end),
            None if c.end is None else "path",
            name,
        ), c.rel
        assert r["explanation"] == PRESETS[name].explanation


def test_layout_test_names_a_sidecars_segments(preset_sites: Site) -> None:
    s = preset_sites
    cam = s.base / "p-viseron/garage"
    cam.mkdir()
    for n in ("1714572200.m4s", "1714572205.m4s", "init.mp4", "notes.txt"):
        (cam / n).write_bytes(b"x")
    movie = s.base / "p-motioneye/Camera1/2024-05-01/14-03-20.mp4"
    code, res = _layout_test(s, str(cam / "init.mp4"), f"{movie}.thumb")
    assert code == 2  # neither is a segment
    init, thumb = res["paths"]
    assert init["ok"] is False and init["sidecar_of"] == [
        str(cam / "1714572200.m4s"),
        str(cam / "1714572205.m4s"),
    ]
    assert init["camera"] == "garage" and "never deleted" in init["reason"]
    assert thumb["sidecar_of"] == [str(movie)] and "removes it together" in thumb["reason"]
    human = s.run("layout", "test", str(cam / "init.mp4"), str(cam / "1714572200.m4s"))
    assert "sidecar" in human.stdout and "layout viseron (site viseron):" in human.stdout
    assert "camera garage, start " in human.stdout


def test_preset_default_extensions_and_explicit_ones(preset_sites: Site) -> None:
    s = preset_sites
    dav = s.base / "p-dahua/2024-05-01/001/dav/14/14.03.20-14.08.20[M][0@0][0].mp4"
    code, res = _layout_test(s, str(dav))
    assert code == 2 and "is not in sites.dahua.extensions (.dav)" in res["paths"][0]["reason"]
    eff = s.json("config", "show")
    assert eff["sites"]["dahua"]["extensions"] == [".dav"]
    assert eff["sites"]["frigate"]["layout_timezone"] == "UTC"
    assert eff["sites"]["blue_iris"]["extensions"] == [".bvr", ".mp4"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unprunable_recorders_are_refused_at_load_with_file_and_line(site: Site, name: str) -> None:
    other = site.base / "nvr"
    other.mkdir()
    extra = f"""  hik:
    keep: 30d
    roots: [{other}]
    layout: {name}
"""
    site.config.write_text(make_config(site, extra_site=extra))
    line = next(i for i, text in enumerate(site.config.read_text().splitlines(), 1) if name in text)
    r = site.run("config", "check")
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stdout + r.stderr
    assert f"{site.config}:{line}" in err, err
    assert "own retention" in err and "retention: none" in err
    assert {"hikvision": "index00.bin", "milestone": "media database"}[name] in err
    # nothing came of it: no state written
    assert not (site.state / "catalog.db").exists()


def test_a_dahua_end_crossing_midnight_on_a_dst_day() -> None:
    # 23:58 on the autumn day to 00:03 the next day: plain next-day rule, exact 5 minutes
    layout = compile_layout("dahua", BERLIN, False)
    got = layout.parse("2024-10-27/001/dav/23/23.58.00-00.03.00[M][0@0][0].dav")
    assert got is not None and got[2] is not None
    assert got[2] - got[1] == 300
    # the spring day: 01:58 CET to 03:03 CEST is 5 minutes, not 65
    got = layout.parse("2024-03-31/001/dav/01/01.58.00-03.03.00[M][0@0][0].dav")
    assert got is not None and got[2] is not None and got[2] - got[1] == 300


def test_presets_write_their_zone_in_the_docs() -> None:
    for p in PRESETS.values():
        assert p.zone in ("utc", "local", "epoch")
        assert p.extensions and all(e.startswith(".") for e in p.extensions)
        assert p.explanation and p.recorder_setting


def test_epoch_names_through_the_scanners_per_directory_matcher() -> None:
    layout = compile_layout("nx-witness", BERLIN, False)
    matcher = layout.dir_matcher("hi_quality/cam/2024/05/01/14")
    assert matcher is not None
    assert matcher(b"1714572200123_60000.mkv") == ("cam", 1714572200.123, 1714572260.123)
    assert matcher(b"1714572200123.mkv") is None
