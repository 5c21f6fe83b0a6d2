"""Time input and output for the command line: ISO 8601 in, site-local ISO 8601 out."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

from nvr_guard.errors import InvalidInput


def parse_time(text: str, tz: tzinfo, what: str = "time") -> float:
    """ISO 8601 -> epoch seconds; a time without an offset is read in ``tz`` (site-local)."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise InvalidInput(
            f"{what}: {text!r} is not an ISO 8601 time; write e.g. 2026-11-20T14:05:00+08:00"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp()


def iso(ts: float | None, tz: tzinfo = UTC) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
