import pickle
import re
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvr_guard.retention.layout import MAX_TIME, MIN_TIME, Layout

SH = ZoneInfo("Asia/Shanghai")
UTC = ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("pattern", "tz", "rel", "camera", "local"),
    [
        (
            "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
            SH,
            "gate-03/2026-11-20/14/05.07.mp4",
            "gate-03",
            datetime(2026, 11, 20, 14, 5, 7, tzinfo=SH),
        ),
        # Frigate: camera below the hour, path time in UTC
        (
            "%Y-%m-%d/%H/{camera}/%M.%S.mp4",
            UTC,
            "2026-11-20/06/front/05.00.mp4",
            "front",
            datetime(2026, 11, 20, 14, 5, 0, tzinfo=SH),
        ),
        # the pattern's extension is not binding: the site's extension list decides
        (
            "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
            SH,
            "c/2026-01-01/00/00.00.mkv",
            "c",
            datetime(2026, 1, 1, tzinfo=SH),
        ),
        (
            "{camera}/%Y/%m/%d/%H%M%S.ts",
            UTC,
            "lobby/2024/02/29/235959.ts",
            "lobby",
            datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
        ),
    ],
)
def test_parse_reads_camera_and_time(pattern, tz, rel, camera, local):
    got = Layout.compile(pattern, tz).parse(rel)
    assert got == (camera, local.timestamp(), None)


@pytest.mark.parametrize(
    "rel",
    [
        "gate/2026-02-30/10/00.00.mp4",  # no such day
        "gate/2026-11-20/10/61.00.mp4",  # no such minute
        "gate/2026-11-20/10/00.00",  # no extension
        "2026-11-20/10/00.00.mp4",  # no camera level
        "gate/extra/2026-11-20/10/00.00.mp4",
    ],
)
def test_parse_rejects_paths_that_do_not_fit(rel):
    assert Layout.compile("{camera}/%Y-%m-%d/%H/%M.%S.mp4", SH).parse(rel) is None


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("%Y-%m-%d/%H/%M.%S.mp4", "no {camera}"),
        ("{cam}/%Y-%m-%d.mp4", "unknown placeholder"),
        ("{camera}/%Y-%j.mp4", "unsupported directive"),
        ("{camera}/%H/%M.mp4", "lacks %Y %m %d"),
        ("/srv/{camera}/%Y-%m-%d.mp4", "relative"),
        ("{camera}/../%Y-%m-%d.mp4", "'..'"),
        ("", "empty"),
        ("{camera}%/%Y-%m-%d.mp4", "lone '%'"),
        ("{camera}/%Y-%m-%d/%", "lone '%'"),
    ],
)
def test_bad_patterns_are_refused(pattern, fragment):
    with pytest.raises(ValueError, match=None) as err:
        Layout.compile(pattern, UTC)
    assert fragment in str(err.value)


# ---- matching per directory == matching the whole path -------------------------------------
#
# The scanner matches a layout's directory part once per directory and then only file names
# (Layout.dir_matcher); parse() does the same. The oracle below matches the whole relative path
# with one regex built from the pattern, the straightforward reading of the layout. For every
# pattern shape (camera before or after the date, in the file name, written twice; a directive
# in both a directory and the file name; a one-component layout) and for valid and broken paths
# alike, the two must agree.

ORACLE_DIRECTIVES = {"Y": "[0-9]{4}", "m": "[0-9]{2}", "d": "[0-9]{2}", "H": "[0-9]{2}"}
ORACLE_DIRECTIVES.update({"M": "[0-9]{2}", "S": "[0-9]{2}"})


def oracle(pattern: str, tz: ZoneInfo, rel: str) -> tuple[str, float, None] | None:
    body = pattern
    ext = re.search(r"\.[A-Za-z0-9]{1,8}$", body)
    if ext:
        body = body[: ext.start()]
    out, seen = [], set()
    for tok in re.findall(r"\{camera\}|%.|[^{%]+", body):
        name = "camera" if tok == "{camera}" else tok[1:] if tok.startswith("%") else None
        if name is None:
            out.append(re.escape(tok))
        elif name == "%":
            out.append("%")
        elif name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            out.append(f"(?P<{name}>{ORACLE_DIRECTIVES.get(name, '[^/]+')})")
    if ext:
        out.append(r"\.[^/.]+")
    m = re.fullmatch("".join(out), rel, re.S)
    if m is None:
        return None
    g = {k: int(v) for k, v in m.groupdict().items() if k != "camera"}
    if g.get("M", 0) > 59 or g.get("S", 0) > 60:
        return None
    try:
        t = datetime(g["Y"], g["m"], g["d"], g.get("H", 0), tzinfo=tz).timestamp()
    except ValueError:
        return None
    if not MIN_TIME <= t <= MAX_TIME:  # years no recorder writes (0024, 9999 in a zone east)
        return None
    return m["camera"], t + g.get("M", 0) * 60 + g.get("S", 0), None


SHAPES = [
    "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
    "%Y-%m-%d/%H/{camera}/%M.%S.mp4",
    "{camera}/%Y/%m/%d/%H%M%S.ts",
    "%Y%m%d/{camera}_%H%M%S.mp4",
    "{camera}/%Y-%m-%d/{camera}-%H.%M.mp4",
    "{camera}/%Y-%m-%d/%H/%Y%m%d%H%M%S.mp4",
    "{camera}-%Y%m%d%H%M%S.mp4",
    "{camera}/%Y-%m-%d/%H%%/%M.mp4",
    "{camera}/%Y-%m-%d/%H/%M/%S.mkv",
    "{camera}/%Y-%m-%d/%H/%M",
    "录像/{camera}/%Y-%m-%d/%H/%M.%S.mp4",
]
VALUE = {"Y": "%04d", "m": "%02d", "d": "%02d", "H": "%02d", "M": "%02d", "S": "%02d"}


@st.composite
def layout_paths(draw: st.DrawFn) -> tuple[str, str]:
    pattern = draw(st.sampled_from(SHAPES))

    def field(lo: int, hi: int, edges: list[int]) -> int:  # the edges drawn often
        return draw(st.one_of(st.sampled_from(edges), st.integers(lo, hi)))

    values = {
        "Y": field(1999, 2040, [2024, 2026]),
        "m": field(0, 13, [0, 2, 12, 13]),
        "d": field(0, 32, [0, 28, 29, 30, 31, 32]),
        "H": field(0, 25, [0, 23, 24]),
        "M": field(0, 61, [0, 59, 60]),
        "S": field(0, 61, [0, 59, 60, 61]),
    }
    camera = draw(st.sampled_from(["gate-03", "cam", "大门", "x\udcff", "a.b", "2026-11-20", "00"]))
    rel = pattern
    for d, fmt in VALUE.items():
        rel = rel.replace(f"%{d}", fmt % values[d])
    rel = rel.replace("%%", "%").replace("{camera}", camera)
    if draw(st.booleans()):
        rel = rel[: rel.rfind(".")] + draw(st.sampled_from([".mkv", ".MP4", "", ".a.mp4"]))
    mutation = draw(st.sampled_from(["none", "none", "char", "cut", "extra", "second"]))
    if mutation == "char":  # one character replaced: digits, separators, foreign digits
        i = draw(st.integers(0, len(rel) - 1))
        rel = rel[:i] + draw(st.sampled_from(["0", "9", "/", "-", "x", "٣", "."])) + rel[i + 1 :]
    elif mutation == "cut":  # a component less
        parts = rel.split("/")
        i = draw(st.integers(0, len(parts) - 1))
        rel = "/".join(parts[:i] + parts[i + 1 :])
    elif mutation == "extra":  # a component more
        parts = rel.split("/")
        i = draw(st.integers(0, len(parts)))
        rel = "/".join(parts[:i] + ["extra"] + parts[i:])
    elif mutation == "second":  # a repeated field that disagrees with its first appearance
        rel = rel.replace(camera, camera + "2", 1) if rel.count(camera) > 1 else rel
    return pattern, rel


@settings(max_examples=1500, deadline=None)
@given(layout_paths(), st.sampled_from([SH, UTC, ZoneInfo("Europe/Berlin")]))
def test_matching_per_directory_agrees_with_matching_the_whole_path(
    case: tuple[str, str], tz: ZoneInfo
) -> None:
    pattern, rel = case
    want = oracle(pattern, tz, rel)
    layout = Layout.compile(pattern, tz)
    assert layout.parse(rel) == want
    # the scanner's way: the directory once, then the name as bytes (the scanner joins names
    # it read, so its paths never start with "/")
    slash = rel.rfind("/")
    if slash != 0:
        match = layout.dir_matcher(rel[: max(slash, 0)])
        name = rel[slash + 1 :].encode("utf-8", "surrogateescape")
        assert (match(name) if match is not None else None) == want
    # and again on a fresh layout (nothing memoised yet)
    assert Layout.compile(pattern, tz).parse(rel) == want


def test_memoised_names_do_not_leak_between_directories() -> None:
    layout = Layout.compile("{camera}/%Y-%m-%d/%H/%M.%S.mp4", UTC)
    a = layout.dir_matcher("cam1/2026-11-20/10")
    b = layout.dir_matcher("cam2/2026-11-21/11")
    assert a is not None and b is not None
    assert a(b"05.07.mp4") == (
        "cam1",
        datetime(2026, 11, 20, 10, 5, 7, tzinfo=UTC).timestamp(),
        None,
    )
    assert b(b"05.07.mp4") == (
        "cam2",
        datetime(2026, 11, 21, 11, 5, 7, tzinfo=UTC).timestamp(),
        None,
    )
    assert a(b"61.00.mp4") is None and b(b"61.00.mp4") is None
    # a directory whose date does not exist matches nothing, whatever the name
    assert layout.dir_matcher("cam1/2026-02-30/10") is None
    assert layout.dir_matcher("cam1/2026-11-20") is None  # not deep enough


def test_an_absolute_path_is_no_segment() -> None:
    # found by the property test: "/name" lost its slash and matched as a name in the root
    layout = Layout.compile("{camera}-%Y%m%d%H%M%S.mp4", UTC)
    assert layout.parse("ate-03-20240228000000.mp4") is not None
    assert layout.parse("/ate-03-20240228000000.mp4") is None


def test_only_ascii_digits_are_read_as_a_time() -> None:
    # recorders write ASCII digits; other scripts' digits make the file no segment (kept)
    layout = Layout.compile("{camera}/%Y-%m-%d/%H/%M.%S.mp4", UTC)
    assert layout.parse("gate/2026-11-20/10/٠٥.00.mp4") is None
    assert layout.parse("gate/٢٠٢٦-11-20/10/05.00.mp4") is None


def test_a_layout_survives_pickling_for_the_worker_processes() -> None:
    layout = Layout.compile("{camera}/%Y-%m-%d/%H/%M.%S.mp4", SH)
    first = layout.parse("gate/2026-11-20/10/05.07.mp4")
    clone = pickle.loads(pickle.dumps(layout))
    assert clone == layout
    assert clone.parse("gate/2026-11-20/10/05.07.mp4") == first


# ---- names no recorder writes, and hours that are not plain (adversarial review, issue 16) ----


@pytest.mark.parametrize(
    ("pattern", "tz", "rel"),
    [
        ("{camera}/%s.m4s", UTC, "cam1/999999999999.m4s"),  # year 33658
        (
            "*/{camera}/%Y/%m/%d/%H/{epoch_ms}_{duration_ms}.mkv",
            UTC,
            "hi/c/2024/05/01/14/999999999999999_60000.mkv",
        ),
        # a valid UTC date that is year 10000 in a zone east of UTC
        (
            "%Y-%m-%d/%H/{camera}/%M.%S.mp4",
            ZoneInfo("Asia/Shanghai"),
            "9999-12-31/23/front/59.59.mp4",
        ),
        ("{camera}/%Y-%m-%d/%H/%M.%S.mp4", UTC, "cam/0024-02-28/00/00.00.mp4"),
    ],
)
def test_a_time_out_of_any_recorders_range_is_unmatched_not_an_error(pattern, tz, rel) -> None:
    # it crashed the start-up reconcile, status and layout test (year 33658 is out of range)
    assert Layout.compile(pattern, tz).parse(rel) is None


def test_a_dst_change_inside_an_hour_reads_each_minute_at_its_own_offset() -> None:
    # Lord Howe moves its clocks by 30 minutes at 02:00 local: 02:45 exists (+11:00) and was
    # read 30 minutes late as the hour's start (+10:30) plus 45 minutes
    lh = ZoneInfo("Australia/Lord_Howe")
    for pattern, rel in [
        ("{camera}/%Y-%m-%d/%H/%M.%S.mp4", "cam/2025-10-05/02/45.00.mp4"),
        ("{camera}/%Y-%m-%d/%H-%M-%S.mp4", "cam/2025-10-05/02-45-00.mp4"),
    ]:
        got = Layout.compile(pattern, lh).parse(rel)
        assert got is not None
        assert got[1] == datetime(2025, 10, 4, 15, 45, tzinfo=UTC).timestamp(), pattern


def test_more_than_two_wildcards_in_a_name_are_refused() -> None:
    # four of them took seconds per hostile file name on every walk
    with pytest.raises(ValueError, match="more than 2"):
        Layout.compile("{camera}/%Y-%m-%d/*_*_*_*_%H%M%S.mp4", UTC)
    with pytest.raises(ValueError, match="more than 2"):
        Layout.compile("{camera}/%Y-%m-%d/{ignore}x*y{ignore}%H%M%S.mp4", UTC)
    Layout.compile("*/{camera}/%Y-%m-%d/x_{ignore}_%H%M%S{ignore}.mp4", UTC)  # two: allowed
