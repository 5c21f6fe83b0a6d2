"""How the command line shows things to people: site-local times with their UTC offset, elapsed
times in words, and plain aligned columns that stay readable on an 80-column terminal.

The ``--json`` documents keep their own formats (ISO 8601, seconds, bytes); this is only for the
human output, so it may change with taste without breaking a script."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo

from nvr_guard.text import fmt_span

__all__ = ["columns", "local", "local_iso", "offset", "span", "when"]


def offset(dt: datetime) -> str:
    """``+08:00`` / ``-05:00`` / ``+00:00``: the UTC offset a reader needs to place a time."""
    o = dt.utcoffset()
    minutes = int(o.total_seconds() // 60) if o is not None else 0
    sign = "+" if minutes >= 0 else "-"
    h, m = divmod(abs(minutes), 60)
    return f"{sign}{h:02}:{m:02}"


def local(ts: float, tz: tzinfo, seconds: bool = False) -> str:
    """``2026-11-20 14:05 +08:00``: a time in ``tz`` with its offset, to the minute (or second)."""
    dt = datetime.fromtimestamp(ts, tz)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + " " + offset(dt)


def local_iso(text: str | None, tz: tzinfo | None = None, seconds: bool = False) -> str:
    """An ISO 8601 time from a ``--json`` document shown as :func:`local` (in ``tz`` when given,
    else in the offset it carries); "-" for none, the text itself when it is not a time."""
    if not text:
        return "-"
    try:
        dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return str(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz or UTC)
    return local(dt.timestamp(), tz or dt.tzinfo or UTC, seconds)


def span(t0: float, t1: float, tz: tzinfo) -> str:
    """``2026-11-01 12:13 – 11-15 18:13``: recorded from .. to in ``tz`` (no offset: the caller
    says the times are site-local); the end drops the year, or the date, it shares with the
    start."""
    a, b = datetime.fromtimestamp(t0, tz), datetime.fromtimestamp(t1, tz)
    first = a.strftime("%Y-%m-%d %H:%M")
    if first == b.strftime("%Y-%m-%d %H:%M"):
        return first
    if (a.year, a.month, a.day) == (b.year, b.month, b.day):
        last = b.strftime("%H:%M")
    elif a.year == b.year:
        last = b.strftime("%m-%d %H:%M")
    else:
        last = b.strftime("%Y-%m-%d %H:%M")
    return f"{first} – {last}"


def when(seconds: float) -> str:
    """``45 min ago`` / ``in 3 d 2 h``: how far a time lies from now (``seconds`` = then - now)."""
    if abs(seconds) < 1:
        return "now"
    return f"in {fmt_span(seconds)}" if seconds > 0 else f"{fmt_span(seconds)} ago"


def columns(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int | None = None,
    right: frozenset[int] = frozenset(),
) -> list[str]:
    """Rows as plain text, columns aligned by two spaces, the header first.

    No cell is ever broken: only the last column (free text such as "held 2, settling 1") wraps,
    onto lines indented to where it starts, when ``width`` (a terminal's) is given and a row is
    wider. When even the other columns do not fit (long site and camera names), each row becomes
    a block: its first cells on one line, then one ``header: value`` line per other column.
    Without ``width`` (a pipe, a file) every row stays one line, for grep and awk."""
    table = [list(header), *([*r] for r in rows)]
    n = len(header)
    widths = [max(len(r[i]) for r in table) for i in range(n)]
    lead = sum(widths[:-1]) + 2 * (n - 1)  # where the last column starts
    room = None if width is None else width - lead
    if room is not None and room < _MIN_LAST and n > 2:
        return _blocks(header, rows, width or 80)
    lines = []
    for r in table:
        cells = [
            r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(n - 1)
        ]
        head = "  ".join(cells) + ("  " if n > 1 else "")
        last = r[-1]
        if room is None or len(last) <= room:
            lines.append((head + last).rstrip())
            continue
        parts = textwrap.wrap(last, room, break_long_words=False, break_on_hyphens=False)
        lines.append((head + parts[0]).rstrip())
        lines.extend(" " * lead + p for p in parts[1:])
    return lines


_MIN_LAST = 12  # narrower than this, the last column would wrap a word a line


def _blocks(header: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[str]:
    """Rows too wide for the terminal, one block each: ``site camera`` then ``  HEADER: value``."""
    lines = []
    for r in rows:
        lines.append("  ".join(r[:2]))
        for h, v in zip(header[2:], r[2:], strict=False):
            lines.extend(
                textwrap.wrap(
                    f"{h.lower()}: {v}",
                    width,
                    initial_indent="  ",
                    subsequent_indent="    ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return lines
