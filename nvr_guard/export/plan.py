"""Pure export planning: which parts of which segments make up a clip, where the footage has holes,
and the watermark text. No disk, clock or process here: the adapters (``ffmpeg``, ``package``) feed
in probed durations and the current time, so every decision below is testable from a table.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from nvr_guard.errors import InvalidInput


@dataclass(frozen=True)
class Piece:
    """One source segment as the planner sees it: recorded start and probed duration.

    ``shape`` is what must match for segments to share one concat input (codec, frame size,
    audio format): a recorder that changes resolution mid-range starts a new run there."""

    path: bytes
    start: float
    duration: float
    shape: Hashable = None


@dataclass(frozen=True)
class Run:
    """Segments that follow each other without a hole, cut out of one concat-demuxer input.

    ``offset`` and ``duration`` are seconds on the run's own timeline (its first segment starts at
    0); ``recorded`` is the recorded time of the run's first output frame, used for the burned-in
    clock: after a hole the clock must jump, so each run gets its own clock offset.
    """

    pieces: tuple[Piece, ...]
    offset: float
    duration: float
    recorded: float


@dataclass(frozen=True)
class ClipPlan:
    runs: tuple[Run, ...]
    gaps: tuple[tuple[float, float], ...]  # recorded [from, to) inside the request with no footage
    start: float
    end: float

    @property
    def duration(self) -> float:
        return sum(r.duration for r in self.runs)


def plan_clip(pieces: Sequence[Piece], start: float, end: float, frame: float) -> ClipPlan:
    """Cut [start, end) out of ``pieces``.

    ``frame`` is the gap tolerance, by default one frame's duration: a hole up to that long is
    recorder jitter between two files, not missing footage, and must neither split the clip nor
    appear as a gap. Overlapping segments (a recorder restarting) are kept whole in the run:
    cutting them frame-exactly would need a re-probe of every file, and the overlap is at most a
    few frames in practice. A segment of another ``shape`` than the one before it starts a new
    run without a gap: the runs are joined after decoding, where sizes can be made equal.
    """
    if end <= start:
        raise InvalidInput("export range is empty: 'to' must be after 'from'")
    used = sorted(
        (p for p in pieces if p.start < end and p.start + p.duration > start and p.duration > 0),
        key=lambda p: p.start,
    )
    groups: list[list[Piece]] = []
    for p in used:
        if groups:
            last = groups[-1][-1]
            if p.start - (last.start + last.duration) <= frame and p.shape == last.shape:
                groups[-1].append(p)
                continue
        groups.append([p])
    runs: list[Run] = []
    gaps: list[tuple[float, float]] = []
    cursor = start  # recorded time up to which footage has been accounted for
    for i, g in enumerate(groups):
        first = g[0]
        run_end_rec = min(end, g[-1].start + g[-1].duration)
        if i + 1 < len(groups) and groups[i + 1][0].start < run_end_rec:
            # the next run (another shape) begins before this one's container says it ends:
            # it ends there (a file's container is often a few ms longer than its video)
            run_end_rec = groups[i + 1][0].start
        # the run's timeline: a recorded time T sits at T - first.start (files butt end to end)
        rec_from = max(start, first.start)
        if rec_from - cursor > frame:
            gaps.append((cursor, rec_from))
        offset = rec_from - first.start
        duration = run_end_rec - rec_from
        if duration > frame / 2:
            runs.append(Run(tuple(g), offset, duration, rec_from))
        cursor = max(cursor, run_end_rec)
    if end - cursor > frame:
        gaps.append((cursor, end))
    return ClipPlan(tuple(runs), tuple(gaps), start, end)


# ---- watermark text -----------------------------------------------------------------------------
class _Fields(string.Formatter):
    """``str.format_map`` without attribute or index access: ``{reason.__class__}`` must not
    reach into Python objects, and an unknown ``{field}`` stays visible as written so a typo in the
    config template shows up on the clip rather than failing the export."""

    def render(self, template: str, values: Mapping[str, str]) -> str:
        out: list[str] = []
        try:
            parsed = list(self.parse(template))
        except ValueError as e:
            raise InvalidInput(f"export.watermark: {e}; write fields as {{request}}") from None
        for literal, field, spec, conv in parsed:
            out.append(literal)
            if field is not None:
                if field in values:
                    out.append(values[field])
                else:  # as written, conversion and spec included: "%{e:1+1}" stays itself
                    out.append(
                        "{"
                        + field
                        + (f"!{conv}" if conv else "")
                        + (f":{spec}" if spec else "")
                        + "}"
                    )
        return "".join(out)


def local_text(ts: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def approvers_of(approvals: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for a in approvals:
        if str(a.get("decision", "approve")).startswith("approve"):
            name = str(a.get("approver", ""))
            if name and name not in names:
                names.append(name)
    return names


def watermark_values(
    request: Mapping[str, Any],
    approvals: Sequence[Mapping[str, Any]],
    technician: str,
    camera: str,
    exported: float,
    start: float,
    end: float,
    tz: tzinfo,
) -> dict[str, str]:
    recipient = request.get("recipient") or {}
    rec = " ".join(str(recipient.get(k, "")) for k in ("unit", "person") if recipient.get(k))
    return {
        "request": str(request.get("id", "")),
        "requester": str(request.get("requester", "")),
        "approvers": ", ".join(approvers_of(approvals)),
        "technician": technician,
        "operator": technician,
        "exported": local_text(exported, tz),
        "camera": camera,
        "site": str(request.get("site", "")),
        "reason": str(request.get("reason", "")),
        "basis": str(request.get("basis", "")),
        "recipient": rec,
        "format": str(request.get("format", "")),
        "from": local_text(start, tz),
        "to": local_text(end, tz),
        # the per-frame recorded time is its own overlay line; in the text it is the range
        "recorded": f"{local_text(start, tz)} – {local_text(end, tz)}",
    }


def render_watermark(template: str, values: Mapping[str, str]) -> str:
    return _Fields().render(template, values)


def _width(ch: str) -> float:
    """Rough advance of a character in ems: CJK glyphs are square, Latin ones about half."""
    return 1.0 if unicodedata.east_asian_width(ch) in ("W", "F") else 0.55


def wrap_for_frame(text: str, frame_width: int, font_size: int) -> str:
    """Break ``text`` into lines that fit the frame: drawtext clips at the right edge, and a
    watermark cut off after the request id would hide who approved the copy."""
    budget = max(8.0, (frame_width - 16) / font_size)
    lines: list[str] = []
    for para in text.split("\n"):
        line, used = "", 0.0
        for word in _words(para):
            w = sum(_width(c) for c in word)
            if line and used + w > budget:
                lines.append(line.rstrip())
                line, used = word.lstrip(), sum(_width(c) for c in word.lstrip())
            else:
                line, used = line + word, used + w
            while used > budget:  # one word longer than the line: hard break
                cut, acc = 0, 0.0
                for i, c in enumerate(line):
                    if acc + _width(c) > budget:
                        cut = max(i, 1)
                        break
                    acc += _width(c)
                lines.append(line[:cut])
                line = line[cut:]
                used = sum(_width(c) for c in line)
        lines.append(line.rstrip())
    return "\n".join(lines)


def _words(para: str) -> list[str]:
    """Split keeping separators: spaces stay with the following word; CJK characters are words."""
    out: list[str] = []
    cur = ""
    for c in para:
        if c == " " or _width(c) == 1.0:
            if cur:
                out.append(cur)
            cur = c
            if _width(c) == 1.0:
                out.append(cur)
                cur = ""
        else:
            cur += c
    if cur:
        out.append(cur)
    return out


def utc_stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%SZ")


def local_stamp(ts: float, tz: tzinfo) -> str:
    """For file names: no ':' (FAT/exFAT media refuse it); the offset keeps the time unambiguous."""
    return datetime.fromtimestamp(ts, tz).strftime("%Y%m%dT%H%M%S%z")


def safe_name(text: str) -> str:
    """A camera id as part of a file name on any medium."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".")
    return cleaned or "camera"
