"""Time options accept ISO 8601 and durations read the way the option reads."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.errors import InvalidInput
from nvr_guard.times import parse_time
from tests.fixtures.site import Site

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 8, 31, 12, 0, tzinfo=SH).timestamp()


@pytest.mark.parametrize(
    "text, what, expected",
    [
        ("1h", "--since", NOW - 3600),
        ("2h", "--from", NOW - 7200),
        ("90min", "--to", NOW - 5400),
        ("30d", "--until", NOW + 30 * 86400),
        ("2w", "--now", NOW + 14 * 86400),
        # calendar months in the zone: 31 Aug - 6mo = 28 Feb, + 6mo = 28 Feb next year
        ("6mo", "--since", datetime(2026, 2, 28, 12, 0, tzinfo=SH).timestamp()),
        ("6mo", "--until", datetime(2027, 2, 28, 12, 0, tzinfo=SH).timestamp()),
        (
            "2026-11-20T14:05:00+08:00",
            "--since",
            datetime(2026, 11, 20, 14, 5, tzinfo=SH).timestamp(),
        ),
        ("2026-11-20T14:05", "--from", datetime(2026, 11, 20, 14, 5, tzinfo=SH).timestamp()),
        ("2026-11-20", "--to", datetime(2026, 11, 20, tzinfo=SH).timestamp()),
    ],
)
def test_durations_read_as_the_option_reads(text: str, what: str, expected: float) -> None:
    assert parse_time(text, SH, what, now=NOW) == expected


@pytest.mark.parametrize(
    "text",
    [
        "the day before", "1 h", "h1", "", "1x", "-1h", "2026-13-01", "todays",
        # out of range: year 0 in the site's zone, year 9999 west of UTC, a huge duration
        "0001-01-01T00:00", "9999-12-31T23:00-08:00", "99999999y", "1969-12-31T00:00Z",
    ],
)  # fmt: skip
def test_other_text_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_time(text, SH, "--since", now=NOW)
    assert "\n" not in str(info.value) and "--since" in str(info.value)


@pytest.mark.parametrize(
    "text, tz, now, expected",
    [
        ("today", SH, NOW, datetime(2026, 8, 31, tzinfo=SH)),
        ("Yesterday", SH, NOW, datetime(2026, 8, 30, tzinfo=SH)),
        ("tomorrow", SH, NOW, datetime(2026, 9, 1, tzinfo=SH)),
        ("now", SH, NOW, datetime(2026, 8, 31, 12, 0, tzinfo=SH)),
        # midnight of the site's day, not of UTC's: 07:00 in Shanghai is still yesterday in UTC
        ("today", SH, datetime(2026, 8, 31, 7, 0, tzinfo=SH).timestamp(),
         datetime(2026, 8, 31, tzinfo=SH)),
        # the day after a DST change: yesterday's midnight had the winter offset (+01:00)
        ("yesterday", ZoneInfo("Europe/Berlin"),
         datetime(2026, 3, 30, 12, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp(),
         datetime(2026, 3, 29, 0, 0, tzinfo=ZoneInfo("Europe/Berlin"))),
    ],
)  # fmt: skip
def test_named_days_are_site_local_midnight(
    text: str, tz: ZoneInfo, now: float, expected: datetime
) -> None:
    got = parse_time(text, tz, "--since", now=now)
    assert got == expected.timestamp()
    if text == "yesterday" and tz.key == "Europe/Berlin":
        assert datetime.fromtimestamp(got, tz).utcoffset().total_seconds() == 3600


@pytest.mark.parametrize(("what", "direction"), [("--since", "ago"), ("--until", "from now")])
def test_a_refused_time_names_the_accepted_forms(what: str, direction: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_time("last tuesday", SH, what, now=NOW)
    msg = str(info.value)
    assert msg.startswith(f"{what}: 'last tuesday' is not a time")
    for form in ("ISO 8601", f"duration meaning {direction}", "today", "yesterday", "now"):
        assert form in msg, msg


def test_audit_since_today_through_the_command_line(site: Site) -> None:
    import json
    from datetime import UTC, timedelta

    from tests.fixtures.site import write_segment

    site.write_config()
    write_segment(site.root, "cam1", datetime.now(UTC) - timedelta(hours=3))
    r = site.run(
        "hold", "add", "--camera", "cam1", "--from", "yesterday", "--to", "now",
        "--reason", "case 8",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    today = json.loads(site.run("--json", "audit", "show", "--since", "today").stdout)["entries"]
    assert "hold.add" in [e["action"] for e in today]
    tomorrow = site.run("--json", "audit", "show", "--since", "tomorrow")
    assert tomorrow.returncode == 0 and json.loads(tomorrow.stdout)["entries"] == []
    bad = site.run("audit", "show", "--since", "last week")
    assert bad.returncode == 2 and "today, yesterday" in bad.stderr


def test_hold_and_audit_take_durations(site: Site) -> None:
    import json
    import time
    from datetime import UTC, timedelta

    from tests.fixtures.site import write_segment

    site.write_config()
    write_segment(site.root, "cam1", datetime.now(UTC) - timedelta(hours=3))
    t = time.time()
    r = site.run(
        "--json", "hold", "add", "--camera", "cam1", "--from", "4h", "--to", "2h",
        "--until", "30d", "--reason", "case 7",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    hold = json.loads(r.stdout)
    got = {k: datetime.fromisoformat(hold[k]).timestamp() for k in ("from", "to", "until")}
    for k, want in (("from", t - 4 * 3600), ("to", t - 2 * 3600), ("until", t + 30 * 86400)):
        assert abs(got[k] - want) < 60, (k, hold)
    r = site.run("--json", "audit", "show", "--since", "1h")
    assert r.returncode == 0, r.stderr
    assert "hold.add" in [e["action"] for e in json.loads(r.stdout)["entries"]]
