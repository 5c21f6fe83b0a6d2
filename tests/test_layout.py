from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.layout import Layout

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
    assert got == (camera, local.timestamp())


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
    ],
)
def test_bad_patterns_are_refused(pattern, fragment):
    with pytest.raises(ValueError, match=None) as err:
        Layout.compile(pattern, UTC)
    assert fragment in str(err.value)
