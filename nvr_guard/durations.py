"""Durations as written in the config: ``90min 24h 15d 2w 6mo 1y``.

``min`` is minutes everywhere. A bare ``m`` is minutes too, except where the caller refuses it
(``keep``/``min_keep``): there ``keep: 6m`` is almost certainly six months, and reading it as six
minutes would delete half a year of footage within the hour.

Minutes, hours, days and weeks are fixed lengths (a day is 86,400 s). Months and years are
calendar-based: they are added to a date-time in the site's timezone, and a day that does not exist
in the target month is clamped to that month's last day (31 Aug + 6mo = 28/29 Feb).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+)(mo|min|y|w|d|h|m|s)")
# average Gregorian month, only for ordering durations (config checks), never for expiry
_AVG_MONTH_S = 365.2425 * 86400 / 12


@dataclass(frozen=True)
class Duration:
    months: int = 0
    seconds: int = 0

    @classmethod
    def parse(cls, text: str, bare_minutes: bool = True) -> Duration:
        """Parse ``15d``, ``6mo``, ``1y``, ``1d12h``, ``90min``; raise ValueError with a readable
        message. ``bare_minutes=False`` refuses ``m`` (write ``min``), naming the likely ``mo``."""
        if not isinstance(text, str):
            raise ValueError(f"expected a duration such as 15d, 6mo or 1y, got {text!r}")
        s = text.strip()
        if not s:
            raise ValueError("empty duration; write e.g. 15d, 2w, 6mo, 1y, 90min, 24h")
        pos = 0
        months = seconds = 0
        bare_m = False
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            n, unit = int(m.group(1)), m.group(2)
            if unit == "y":
                months += 12 * n
            elif unit == "mo":
                months += n
            else:
                seconds += n * _UNITS[unit]
                bare_m = bare_m or unit == "m"
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ValueError(
                f"bad duration {text!r}; write a number and a unit: 90min, 24h, 15d, 2w, 6mo, 1y"
            )
        if bare_m and not bare_minutes:
            as_months = _PART.sub(lambda m: m[0] + "o" if m[2] == "m" else m[0], s)
            as_minutes = _PART.sub(lambda m: m[0] + "in" if m[2] == "m" else m[0], s)
            raise ValueError(
                f"{text!r}: did you mean {as_months} (months)? minutes are written {as_minutes}"
            )
        return cls(months=months, seconds=seconds)

    def __str__(self) -> str:
        parts: list[str] = []
        y, mo = divmod(self.months, 12)
        if y:
            parts.append(f"{y}y")
        if mo:
            parts.append(f"{mo}mo")
        rest = self.seconds
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            n, rest = divmod(rest, size)
            if n:
                parts.append(f"{n}{unit}")
        return "".join(parts) or "0s"

    @property
    def is_zero(self) -> bool:
        return self.months == 0 and self.seconds == 0

    def approx_seconds(self) -> float:
        """Only for comparing durations (e.g. keep < min_keep); expiry uses :meth:`after`."""
        return self.months * _AVG_MONTH_S + self.seconds

    def timedelta(self) -> timedelta:
        if self.months:
            raise ValueError(f"{self} is calendar-based and has no fixed length")
        return timedelta(seconds=self.seconds)

    def after(self, t: datetime, tz: tzinfo) -> datetime:
        """``t + self``; months are added on the wall calendar of ``tz``."""
        if self.months:
            local = t.astimezone(tz)
            y, m0 = divmod(local.month - 1 + self.months, 12)
            year, month = local.year + y, m0 + 1
            day = min(local.day, calendar.monthrange(year, month)[1])
            local = local.replace(year=year, month=month, day=day)
            t = local.astimezone(UTC)
        return t + timedelta(seconds=self.seconds)

    def after_ts(self, ts: float, tz: tzinfo) -> float:
        """Epoch-seconds version of :meth:`after`; the fast path for fixed-length durations."""
        if not self.months:
            return ts + self.seconds
        return self.after(datetime.fromtimestamp(ts, UTC), tz).timestamp()
