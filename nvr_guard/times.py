"""Time input and output for the command line: ISO 8601 in, site-local ISO 8601 out."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, tzinfo

from nvr_guard.errors import InvalidInput
from nvr_guard.model import ClockReading, boot_clock
from nvr_guard.text import Duration

# options whose duration means "from now"; every other time option reads a duration as "ago"
_AHEAD = frozenset({"--until", "--now"})


# days named as journalctl names them: midnight (site-local) of that day, and the moment itself
_DAYS = {"yesterday": -1, "today": 0, "tomorrow": 1}


def accepted_forms(what: str) -> str:
    """The forms a time option takes, as its error message lists them."""
    direction = "from now" if what in _AHEAD else "ago"
    return (
        "ISO 8601 (2026-11-20T14:05:00+08:00; without an offset it is site-local), "
        f"a duration meaning {direction} (90min, 1h, 30d, 2w, 6mo, 1y), "
        "today, yesterday, tomorrow (midnight site-local) or now"
    )


def parse_time(text: str, tz: tzinfo, what: str = "time", now: float | None = None) -> float:
    """ISO 8601 -> epoch seconds; a time without an offset is read in ``tz`` (site-local).

    A duration (``1h``, ``30d``, ``6mo``) is read relative to ``now`` (default: the real time) the
    way the option reads: ``--since 1h`` and ``--from 2h`` are ago, ``--until 30d`` and
    ``--now 2w`` (a preview) are from now. Months and years are calendar-based in ``tz``.
    ``today``, ``yesterday`` and ``tomorrow`` are that day's midnight in ``tz`` and ``now`` is
    the moment itself, as ``journalctl --since`` reads them."""
    s = text.strip()
    word = s.lower()
    if word == "now" or word in _DAYS:
        base = time.time() if now is None else now
        if word == "now":
            return _in_range(base, text, what)
        day = datetime.fromtimestamp(base, tz).date() + timedelta(days=_DAYS[word])
        midnight = datetime.combine(day, datetime.min.time(), tzinfo=tz)
        return _in_range(midnight.timestamp(), text, what)
    if s[:1].isdigit():
        try:
            d = Duration.parse(s)
        except ValueError:
            d = None
        if d is not None:
            base = time.time() if now is None else now
            sign = 1 if what in _AHEAD else -1
            try:
                ts = Duration(months=sign * d.months, seconds=sign * d.seconds).after_ts(base, tz)
            except (OverflowError, ValueError, OSError):
                ts = float("nan")
            return _in_range(ts, text, what)
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        forms = accepted_forms(what)
        raise InvalidInput(f"{what}: {text!r} is not a time; write {forms}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    try:
        ts = dt.timestamp()
    except (OverflowError, ValueError, OSError):
        ts = float("nan")
    return _in_range(ts, text, what)


def clock_at(now: str | None, tz: tzinfo) -> ClockReading:
    """The real clocks, or the wall clock moved to ``now`` (``--now``, read in ``tz``); boot time
    stays real, so the clock guard sees the jump exactly as it would see a real one."""
    real = boot_clock()
    if now is None:
        return real
    return replace(real, wall=parse_time(now, tz, "--now", now=real.wall))


# recordings exist between these instants; anything else is a typo, and must not reach code that
# turns times back into dates (year 0 or 10000 in a site's zone has no datetime)
_EARLIEST = datetime(1970, 1, 2, tzinfo=UTC).timestamp()
_LATEST = datetime(9998, 12, 31, tzinfo=UTC).timestamp()


def _in_range(ts: float, text: str, what: str) -> float:
    if not (_EARLIEST <= ts <= _LATEST):  # also false for NaN
        raise InvalidInput(f"{what}: {text!r} is out of range; times lie between 1970 and 9998")
    return ts


def iso(ts: float | None, tz: tzinfo = UTC) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")
