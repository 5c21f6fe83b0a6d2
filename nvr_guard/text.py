"""How durations, shares and sizes are written: read from the config and the command line, shown
in messages, receipts and ``config show``.

One module, so that a value reads the same wherever it appears: ``keep: 6mo`` in the file,
``keep=6mo`` in a deletion reason, ``6mo`` in ``config show``; and so that a new message picks an
existing format instead of inventing a fifth way to print "24 hours". Several formats exist on
purpose, each named for what it is for (an exact limit, a rough elapsed time, a share compared with
its threshold); their outputs are pinned by tests and scripts, so they are never merged into one.

Durations as written in the config: ``90min 24h 15d 2w 6mo 1y``.

``min`` is minutes everywhere. A bare ``m`` is minutes too, except where the caller refuses it
(``keep``/``min_keep``): there ``keep: 6m`` is almost certainly six months, and reading it as six
minutes would delete half a year of footage within the hour.

Minutes, hours, days and weeks are fixed lengths (a day is 86,400 s). Months and years are
calendar-based: they are added to a date-time in the site's timezone, and a day that does not exist
in the target month is clamped to that month's last day (31 Aug + 6mo = 28/29 Feb).

Pure: nothing here reads the disk or the clock, so the retention policy and the access checks (pure
cores) may use it; it imports nothing of the project, so anything may import it.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

__all__ = [
    "DURATION_HINT",
    "Duration",
    "fmt_age",
    "fmt_duration",
    "fmt_limit",
    "fmt_mib",
    "fmt_percent",
    "fmt_percent_exact",
    "fmt_span",
    "fmt_span_exact",
    "human_bytes",
    "parse_fraction",
    "printable",
]

DURATION_HINT = "write a number and a unit: 90min, 24h, 15d, 2w, 6mo, 1y"

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+)(mo|min|y|w|d|h|m|s)")
# average Gregorian month, only for ordering durations (config checks), never for expiry
_AVG_MONTH_S = 365.2425 * 86400 / 12


# ---- durations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Duration:
    """A length of time as written in the config: calendar months plus fixed seconds."""

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
            raise ValueError(f"bad duration {text!r}; {DURATION_HINT}")
        if bare_m and not bare_minutes:
            as_months = _PART.sub(lambda m: m[0] + "o" if m[2] == "m" else m[0], s)
            as_minutes = _PART.sub(lambda m: m[0] + "in" if m[2] == "m" else m[0], s)
            raise ValueError(
                f"{text!r}: did you mean {as_months} (months)? minutes are written {as_minutes}"
            )
        return cls(months=months, seconds=seconds)

    def __str__(self) -> str:
        return fmt_duration(self)

    @property
    def is_zero(self) -> bool:
        """True for ``0s``, ``0d`` ...: no length at all."""
        return self.months == 0 and self.seconds == 0

    def approx_seconds(self) -> float:
        """Only for comparing durations (e.g. keep < min_keep); expiry uses :meth:`after`."""
        return self.months * _AVG_MONTH_S + self.seconds

    def timedelta(self) -> timedelta:
        """The fixed length; ValueError for a duration with months or years."""
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


def fmt_duration(d: Duration, minute: str = "m") -> str:
    """A duration as an admin writes it, largest unit first: ``30d``, ``1y6mo``, ``1d12h``.
    ``minute="min"`` for retention keys, which refuse a bare ``m``."""
    y, mo = divmod(d.months, 12)
    out = (f"{y}y" if y else "") + (f"{mo}mo" if mo else "")
    rest = d.seconds
    for unit, size in (("d", 86400), ("h", 3600), (minute, 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            out += f"{n}{unit}"
    return out or "0s"


def fmt_limit(d: Duration | None) -> str:
    """15d / 6mo / 1y / 1d12h, or "forever" for no limit."""
    return "forever" if d is None else str(d)


# ---- elapsed times -----------------------------------------------------------------------------
def fmt_span(seconds: float) -> str:
    """3 d 2 h / 5 min / 40 s: a rough elapsed time (a clock jump), sign dropped."""
    s = abs(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    d, rest = divmod(int(s), 86400)
    h = rest // 3600
    if d == 0:
        return f"{h} h"
    return f"{d} d {h} h" if h else f"{d} d"


def fmt_span_exact(seconds: float) -> str:
    """``24 h``, ``24 h 1 s``, ``3 d``: a configured limit to the second; hours up to two days, as
    people say "within 24 h"."""
    rest = round(seconds)
    parts: list[str] = []
    if rest >= 2 * 86400 and rest % 86400 == 0:
        return f"{rest // 86400} d"
    for unit, size in (("h", 3600), ("min", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n} {unit}")
    return " ".join(parts) or "0 s"


def fmt_age(seconds: float) -> str:
    """40 s / 5 min / 2.5 h: how old a result is (a media scan), tenths of an hour past two."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- shares ------------------------------------------------------------------------------------
_DEC_NUM = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_FRACTION_HINT = "a fraction such as 0.2 or a percentage such as 20%"


def parse_fraction(v: str | int | float) -> float:
    """A share of something: ``0.2``, ``20%`` (or a number); ValueError outside 0..1 (0%..100%)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = float(v)
        text = repr(v)
    else:
        text = str(v).strip()
        pct = text.endswith("%")
        num = text[:-1].strip() if pct else text
        if not _DEC_NUM.fullmatch(num):
            raise ValueError(f"expected {_FRACTION_HINT}, got {str(v)!r}")
        f = float(num) / 100 if pct else float(num)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"{text} is not between 0 and 1; write {_FRACTION_HINT}")
    return f


def fmt_percent(fraction: float) -> str:
    """31% / 20.5% / 0.1%: enough digits to tell a value from the threshold it is compared with."""
    p = fraction * 100
    text = f"{p:.1f}"
    return (text[:-2] if text.endswith(".0") else text) + "%"


def fmt_percent_exact(fraction: float) -> str:
    """``20%``, ``12.5%``: as an admin writes it, to six significant digits and without float noise
    (0.1 is ``10%``, not ``10.000000000000002%``); :func:`parse_fraction` reads it back."""
    return f"{round(fraction * 100, 6):g}%"


# ---- sizes -------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    """512 B / 1.5 KiB / 38.2 GiB: binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_mib(n: int) -> str:
    """1,204 MiB / 512 KiB: whole units with thousands separators, for free-space figures."""
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


# ---- names in messages -------------------------------------------------------------------------
def printable(s: str) -> str:
    """``s`` with control characters escaped: a name someone typed stays one line, inert in a
    terminal, wherever a message prints it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
