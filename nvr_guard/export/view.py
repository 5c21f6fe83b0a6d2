"""Viewing without copying (调阅): the clip a requester watches, and still frames for approvers.

Both are cut from the recorders' segments with the export's own pieces — the source checks and
probes (``package``), the frame-exact plan (``plan``) and the ffmpeg graph with its burned-in
clock (``ffmpeg.build_encode``) — and both carry a watermark naming who looks, at what and when,
so a phone held up to the screen still shows whose viewing it was. A viewing clip plays the
request's cameras one after another, each run labelled with its camera; it has no audio (the
join of several cameras would need one audio format, and nothing of the record depends on it).
Nothing here decides who may look: the workflow (``workflow.viewing``) does.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path

import ffmpeg  # ffmpeg-python

from nvr_guard.errors import InvalidInput, RuntimeFailure
from nvr_guard.export import ffmpeg as ff
from nvr_guard.export.package import (
    SHORT_TOLERANCE,
    SourceSegment,
    _probe_all,
    _select,
    run_size,
)
from nvr_guard.export.plan import ClipPlan, Piece, Run, local_text, plan_clip, wrap_for_frame
from nvr_guard.export.zones import Zone
from nvr_guard.model import show_path

MAX_VIEW_WIDTH = 1280  # a browser window, not an evidence copy
MAX_PREVIEW_WIDTH = 640
VIEW_PRESET = "veryfast"
VIEW_CRF = 23


@dataclass(frozen=True)
class ViewPlan:
    """What a viewing clip holds: the runs of every camera in turn, the camera of each run,
    and the one frame size they are scaled into (the largest source, at most
    ``MAX_VIEW_WIDTH`` wide)."""

    plan: ClipPlan
    labels: tuple[str, ...]
    frame_size: tuple[int, int]
    source_sizes: tuple[tuple[int, int], ...]

    @property
    def duration(self) -> float:
        """Seconds of footage the clip plays."""
        return self.plan.duration


def _even(n: float) -> int:
    return max(2, int(n) - int(n) % 2)


def fit_width(width: int, height: int, limit: int) -> tuple[int, int]:
    """(width, height) scaled down to at most ``limit`` wide, aspect kept, both even."""
    if width <= limit:
        return _even(width), _even(height)
    return _even(limit), _even(height * limit / width)


def _camera_pieces(
    camera: str, segments: Sequence[SourceSegment], start: float, end: float
) -> tuple[ClipPlan, list[ff.Probe]]:
    chosen = _select(segments, start, end)
    for s in chosen:
        raw = os.fsencode(s.path)
        # the concat list is line-based: a line break in a name could add directives to it
        if b"\n" in raw or b"\r" in raw or not raw.startswith(b"/"):
            raise InvalidInput(
                f"camera {camera}: cannot read {show_path(raw)}: source paths must be absolute "
                "and free of line breaks"
            )
    probes, _damaged = _probe_all(chosen)
    fps = next((float(p.fps) for _, p in probes if p.fps), 25.0)
    pieces = [Piece(os.fsencode(s.path), s.start, p.duration, p.shape) for s, p in probes]
    plan = plan_clip(pieces, start, end, 1 / fps)
    used = {q.path for r in plan.runs for q in r.pieces}
    return plan, [p for s, p in probes if os.fsencode(s.path) in used]


def plan_view(
    clips: Sequence[tuple[str, Sequence[SourceSegment]]], start: float, end: float
) -> ViewPlan:
    """The viewing clip of ``clips`` (camera, its segments) over [start, end)."""
    runs: list[Run] = []
    labels: list[str] = []
    sizes: set[tuple[int, int]] = set()
    for camera, segments in clips:
        plan, probes = _camera_pieces(camera, segments, start, end)
        runs.extend(plan.runs)
        labels.extend([camera] * len(plan.runs))
        sizes |= {(p.width, p.height) for p in probes}
    if not runs:
        raise InvalidInput(f"no footage left between {start:.0f} and {end:.0f} to watch")
    width, height = max(sizes, key=lambda wh: (wh[0] * wh[1], wh))
    return ViewPlan(
        ClipPlan(tuple(runs), (), start, end),
        tuple(labels),
        fit_width(width, height, MAX_VIEW_WIDTH),
        tuple(sorted(sizes)),
    )


def view_watermark(rid: int, viewer: str, when: float, tz: tzinfo) -> str:
    """The text burned into a viewing clip: whose viewing, of what, when."""
    return f"调阅 request {rid} · {viewer} · {local_text(when, tz)}"


def preview_watermark(rid: int, viewer: str, when: float, tz: tzinfo) -> str:
    """The text burned into a preview frame."""
    return f"预览 preview · request {rid} · {viewer} · {local_text(when, tz)}"


def encode_view(
    vp: ViewPlan,
    workdir: Path,
    output: Path,
    *,
    watermark: str,
    tz: tzinfo,
    font: Path,
    timeout: float,
    progress: Callable[[float], None] | None = None,
    zones: Mapping[str, Sequence[Zone]] | None = None,
) -> ff.Probe:
    """Encode the viewing clip into ``output`` (which must not exist): every run trimmed
    frame-exactly with its recorded-time clock and its camera, the watermark over all of it,
    H.264 with the index in front; each camera's privacy ``zones`` filled in. Raises
    RuntimeFailure when ffmpeg fails or the clip comes out shorter than the footage planned
    (a source changed while it was read)."""
    fw, fh = vp.frame_size
    size = ff.font_size_for(fh)
    cmd = ff.build_encode(
        vp.plan,
        workdir,
        output,
        watermark=wrap_for_frame(watermark, fw, size),
        tz=tz,
        font=font,
        crf=VIEW_CRF,
        preset=VIEW_PRESET,
        audio=False,
        height=fh,
        frame_size=vp.frame_size,
        run_labels=vp.labels,
        faststart=True,
        run_zones=[list((zones or {}).get(cam, ())) for cam in vp.labels],
        run_sizes=[run_size(r) for r in vp.plan.runs],
    )
    for path, data in cmd.files.items():
        Path(path).write_bytes(data)
    ff.run_ffmpeg(
        cmd.argv,
        total=vp.duration,
        timeout=timeout,
        stderr_path=workdir / "stderr.txt",
        progress=progress,
    )
    result = ff.probe(output)
    if vp.duration - result.duration > max(SHORT_TOLERANCE, 0.01 * vp.duration):
        raise RuntimeFailure(
            f"the viewing clip holds {result.duration:.3f} s of the {vp.duration:.3f} s of "
            "footage planned: a source changed or could not be read"
        )
    return result


@dataclass(frozen=True)
class Still:
    """One preview frame: the camera, the recorded time it shows, the JPEG bytes."""

    camera: str
    at: float
    jpeg: bytes


def _piece_at(plan: ClipPlan, t: float) -> tuple[Piece, float]:
    """The piece holding recorded time ``t`` (the nearest one when ``t`` falls in a hole) and
    the offset of ``t`` into it."""
    pieces = [p for r in plan.runs for p in r.pieces]
    for p in pieces:
        if p.start <= t < p.start + p.duration:
            return p, t - p.start
    p = min(pieces, key=lambda q: min(abs(q.start - t), abs(q.start + q.duration - t)))
    return p, min(max(0.0, t - p.start), max(0.0, p.duration - 0.1))


def still_times(plan: ClipPlan) -> list[float]:
    """The recorded times of the three preview frames: the first frame, the middle of the
    footage and its last second."""
    first = plan.runs[0].recorded
    last_run = plan.runs[-1]
    last = max(first, last_run.recorded + last_run.duration - 0.5)
    return [first, (first + last) / 2, last]


def _frame(
    source: bytes,
    offset: float,
    text: Path,
    font: Path,
    width: int,
    zones: Sequence[Zone] = (),
    size_of: tuple[int, int] | None = None,
) -> bytes:
    w, _ = fit_width(width, 2, min(width, MAX_PREVIEW_WIDTH))
    size = max(12, w // 40)
    src = ffmpeg.input(
        os.fsdecode(source),
        ss=f"{offset:.3f}",
        format_whitelist=ff.SOURCE_FORMATS,
        protocol_whitelist="file",
    )
    v = src["v:0"]
    files: dict[str, bytes] = {}
    if zones and size_of is not None:
        v = ff.mask_zones(v, zones, size_of, text.with_suffix(""), files)
        for path, data in files.items():
            Path(path).write_bytes(data)
    v = v.filter("scale", w, -2).drawtext(
        fontfile=str(font),
        textfile=str(text),
        expansion="none",
        fontsize=size,
        fontcolor="white@0.9",
        box=1,
        boxcolor="black@0.5",
        boxborderw=4,
        x=6,
        y=6,
    )
    out = ffmpeg.output(v, "pipe:1", vframes=1, format="image2", vcodec="mjpeg", q=4)
    argv = out.compile(cmd=ff.FFMPEG)
    argv = argv[:1] + ["-hide_banner", "-nostdin", "-loglevel", "error"] + argv[1:]
    try:
        cp = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure("ffmpeg did not cut a preview frame within 60 s") from None
    if cp.returncode != 0 or not cp.stdout.startswith(b"\xff\xd8"):
        tail = cp.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeFailure(
            f"ffmpeg could not cut a preview frame of {show_path(source)}"
            + (f": {tail[-1]}" if tail else "")
        )
    return cp.stdout


def _around(segments: Sequence[SourceSegment], start: float, end: float) -> list[SourceSegment]:
    """The segments (by their recorded starts) that hold the range's start, middle and end."""
    ordered = sorted(segments, key=lambda s: s.start)
    if len(ordered) <= 3:
        return ordered
    chosen: dict[int, SourceSegment] = {}
    for t in (start, (start + end) / 2, end):
        at = max((i for i, s in enumerate(ordered) if s.start <= t), default=0)
        chosen[at] = ordered[at]
    return [chosen[i] for i in sorted(chosen)]


def stills(
    camera: str,
    segments: Sequence[SourceSegment],
    start: float,
    end: float,
    *,
    watermark: str,
    font: Path,
    workdir: Path,
    zones: Sequence[Zone] = (),
) -> list[Still]:
    """Three watermarked JPEG frames of ``camera`` over [start, end): start, middle, end, at
    most ``MAX_PREVIEW_WIDTH`` wide. Only the segments holding those three instants are read
    (probed and decoded): a day-long range costs what a minute does."""
    plan, probes = _camera_pieces(camera, _around(segments, start, end), start, end)
    if not plan.runs:
        raise InvalidInput(f"camera {camera}: no footage left in the range to preview")
    width = max((p.width for p in probes), default=MAX_PREVIEW_WIDTH)
    text = workdir / f"preview-{len(os.listdir(workdir))}.txt"
    text.write_bytes(watermark.encode())
    out = []
    for t in still_times(plan):
        piece, offset = _piece_at(plan, t)
        shape = piece.shape if isinstance(piece.shape, tuple) else None
        size_of = (int(shape[1]), int(shape[2])) if shape else None
        out.append(
            Still(
                camera,
                piece.start + offset,
                _frame(piece.path, offset, text, font, width, zones, size_of),
            )
        )
    return out
