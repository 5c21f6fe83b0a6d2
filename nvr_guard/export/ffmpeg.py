"""ffmpeg and ffprobe: probing sources, building the export command, running it.

The command is built as data with ffmpeg-python (never a shell string). User text never enters
the filter graph: the watermark goes through ``textfile=`` with ``expansion=none``; the only
expanding drawtext is the recorded-time clock, whose text file holds nothing but our own constant
``%{pts:gmtime:...}`` expression. Paths inside the graph are our private temp files and the
configured font; ffmpeg-python escapes them for the filter syntax.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg  # ffmpeg-python

from nvr_guard.errors import InvalidInput, RuntimeFailure
from nvr_guard.export.plan import ClipPlan, Run
from nvr_guard.export.zones import Zone

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"

# The containers recorders write footage in (ffmpeg's demuxer names). ffmpeg picks a demuxer by
# a file's content, not its name: without this list a text playlist (HLS, a concat list) saved
# under a segment's name made the export read any file the daemon can, another camera's footage
# included. Every source is probed and read with this list; the concat input adds itself.
SOURCE_FORMATS = "mov,matroska,mpegts,dhav,avi,flv,h264,hevc"
_SOURCE_ONLY = ("-format_whitelist", SOURCE_FORMATS, "-protocol_whitelist", "file")
_CONCAT_FORMATS = "concat," + SOURCE_FORMATS
_FILE_OPTIONS = f"option format_whitelist {SOURCE_FORMATS}\noption protocol_whitelist file".encode()


@dataclass(frozen=True)
class Probe:
    duration: float
    size: int
    fps: Fraction | None
    width: int
    height: int
    video_codec: str | None
    has_audio: bool
    frames: int | None = None  # only when counted (probe(count=True))
    container: str = ""  # ffprobe's format_name: "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "dhav"
    audio_codec: str | None = None  # "aac", "pcm_alaw", ...
    sample_rate: int = 0
    channels: int = 0

    @property
    def shape(self) -> tuple[str | None, int, int, str | None, int, int]:
        """What must be equal for two files to be read as one concat input: a change of codec,
        frame size or audio format starts a new one (the concat demuxer takes the first file's
        stream parameters for all)."""
        return (
            self.video_codec,
            self.width,
            self.height,
            self.audio_codec,
            self.sample_rate,
            self.channels,
        )


def probe(
    path: Path | bytes, *, count: bool = False, timeout: float = 120, pass_fds: Sequence[int] = ()
) -> Probe:
    argv = [FFPROBE, "-v", "error", *_SOURCE_ONLY, "-of", "json", "-show_format", "-show_streams"]
    if count:
        argv += ["-count_packets"]
    argv += ["--", os.fsdecode(path)]
    try:
        cp = subprocess.run(
            argv, capture_output=True, timeout=timeout, check=False, pass_fds=tuple(pass_fds)
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"ffprobe timed out on {os.fsdecode(path)}") from None
    if cp.returncode != 0:
        msg = cp.stderr.decode("utf-8", "replace").strip().splitlines()
        raise InvalidInput(
            f"cannot read {os.fsdecode(path)}: {msg[-1] if msg else 'ffprobe failed'}"
        )
    info = json.loads(cp.stdout)
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    sound = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt = info.get("format", {})
    duration = float(fmt.get("duration") or (video or {}).get("duration") or 0.0)
    container = str(fmt.get("format_name") or "")
    if container == "dhav" and video is not None:
        # Dahua stamps frames with the wall-clock second: the demuxer's duration is the
        # difference of whole seconds, up to a second short. The packets' own times are exact.
        duration = _duration_from_packets(path, timeout, pass_fds) or duration
    fps: Fraction | None = None
    if video:
        for key in ("avg_frame_rate", "r_frame_rate"):
            rate = video.get(key, "0/0")
            num, _, den = rate.partition("/")
            if den and int(den) and int(num):
                fps = Fraction(int(num), int(den))
                break
    frames = None
    if count and video and video.get("nb_read_packets"):
        frames = int(video["nb_read_packets"])
    return Probe(
        duration=duration,
        size=int(fmt.get("size") or 0),
        fps=fps,
        width=int((video or {}).get("width") or 0),
        height=int((video or {}).get("height") or 0),
        video_codec=(video or {}).get("codec_name"),
        has_audio=sound is not None,
        frames=frames,
        container=container,
        audio_codec=(sound or {}).get("codec_name"),
        sample_rate=int((sound or {}).get("sample_rate") or 0),
        channels=int((sound or {}).get("channels") or 0),
    )


def readable_duration(path: Path | bytes, *, timeout: float = 120) -> float:
    """Seconds of video the file's packets really hold (0.0: none could be read)."""
    return _duration_from_packets(path, timeout, ())


def _duration_from_packets(path: Path | bytes, timeout: float, pass_fds: Sequence[int]) -> float:
    """Seconds from the first video packet to the end of the last (its time plus one frame
    interval), read from every packet's time (demuxing only, no decoding). 0.0 if unreadable."""
    argv = [
        FFPROBE, "-v", "error", *_SOURCE_ONLY, "-select_streams", "v:0",
        "-show_entries", "packet=pts_time",
        "-of", "csv=p=0", "--", os.fsdecode(path),
    ]  # fmt: skip
    try:
        cp = subprocess.run(
            argv, capture_output=True, timeout=timeout, check=False, pass_fds=tuple(pass_fds)
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"ffprobe timed out on {os.fsdecode(path)}") from None
    times: list[float] = []
    for line in cp.stdout.decode("ascii", "replace").splitlines():
        try:
            times.append(float(line.strip().rstrip(",")))
        except ValueError:
            continue
    if len(times) < 2:
        return 0.0
    times.sort()
    step = (times[-1] - times[0]) / (len(times) - 1)
    return times[-1] - times[0] + step


def ffmpeg_version() -> str:
    cp = subprocess.run([FFMPEG, "-hide_banner", "-version"], capture_output=True, check=False)
    first = cp.stdout.decode("utf-8", "replace").splitlines()
    return first[0] if first else "unknown"


def keyframe_at_or_before(path: Path | bytes, offset: float, *, timeout: float = 120) -> float:
    """Seconds from the start of ``path`` of the last video keyframe at or before ``offset``:
    where a stream copy cut at ``offset`` really begins (the concat demuxer starts at the
    keyframe before its inpoint). 0.0 when the file has no keyframe before it."""
    argv = [
        FFPROBE, "-v", "error", *_SOURCE_ONLY, "-select_streams", "v:0", "-skip_frame", "nokey",
        "-show_entries", "frame=best_effort_timestamp_time,pts_time", "-of", "csv=p=0",
        "-read_intervals", f"%+{offset + 1:.6f}", "--", os.fsdecode(path),
    ]  # fmt: skip
    try:
        cp = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"ffprobe timed out on {os.fsdecode(path)}") from None
    times: list[float] = []
    for line in cp.stdout.decode("ascii", "replace").splitlines():
        for field in line.split(","):
            try:
                times.append(float(field))
                break
            except ValueError:
                continue
    if not times:
        return 0.0
    first = times[0] if times[0] <= 0.5 else 0.0  # the file's own start (a small pts offset)
    before = [t - first for t in times if t - first <= offset + 1e-6]
    return max(before) if before else 0.0


# ---- command building ---------------------------------------------------------------------------
def _concat_list(run: Run, *, trim_points: bool) -> bytes:
    """A concat-demuxer list. Paths are written as bytes inside single quotes, the list format's
    only quoting; a quote in a name becomes '\\'' as the format requires."""
    lines: list[bytes] = [b"ffconcat version 1.0"]
    for i, p in enumerate(run.pieces):
        lines.append(b"file '" + p.path.replace(b"'", b"'\\''") + b"'")
        # each file is opened with the recorders' containers only: the list's own whitelist
        # (which must name concat) would let a file swapped for a concat list after it was
        # probed read another camera's footage through a relative path and a symlink
        lines.append(_FILE_OPTIONS)
        if not trim_points and i + 1 < len(run.pieces):
            # Place the next file at its recorded start, not after this file's container
            # duration: that is often a few ms longer than the video (audio runs on), and over
            # a day of one-minute files the difference would add up to duplicated frames and a
            # burned-in clock many seconds off. Overlapping audio is resampled (see below).
            spacing = run.pieces[i + 1].start - p.start
            if spacing > 0:
                lines.append(f"duration {spacing:.6f}".encode())
        if trim_points:
            # stream copy cannot cut between keyframes: the demuxer starts at the keyframe
            # before inpoint, which is why a native copy is only keyframe-accurate
            if i == 0 and run.offset > 0:
                lines.append(f"inpoint {run.offset:.6f}".encode())
            if i == len(run.pieces) - 1:
                out = run.offset + run.duration - sum(q.duration for q in run.pieces[:-1])
                if out < p.duration:
                    lines.append(f"outpoint {out:.6f}".encode())
    return b"\n".join(lines) + b"\n"


def clock_text(recorded: float, tz: tzinfo) -> str:
    """drawtext text (expansion on) for the recorded date-time of each frame of one run.

    gmtime of (output pts + recorded start + UTC offset) is the site-local wall time; the offset
    is taken at the run's start and printed beside the time, so a reader knows which zone it is.
    """
    off = tz.utcoffset(datetime.fromtimestamp(recorded, tz)) or timedelta(0)
    secs = int(off.total_seconds())
    sign = "+" if secs >= 0 else "-"
    zone = f"{sign}{abs(secs) // 3600:02d}\\:{abs(secs) % 3600 // 60:02d}"
    shift = recorded + secs
    return f"录制 REC %{{pts:gmtime:{shift:.6f}:%Y-%m-%d %H\\:%M\\:%S}} {zone}"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    output: Path
    files: dict[str, bytes]  # the private inputs the argv refers to (list files, text files)


def font_size_for(height: int) -> int:
    return max(12, round(height / 30))


def build_encode(
    plan: ClipPlan,
    workdir: Path,
    output: Path,
    *,
    watermark: str,
    tz: tzinfo,
    font: Path,
    crf: int,
    preset: str,
    audio: bool,
    height: int,
    frame_size: tuple[int, int] | None = None,
    audio_format: tuple[int, str] | None = None,
    run_labels: Sequence[str] | None = None,
    faststart: bool = False,
    zones: Sequence[Zone] = (),
    run_sizes: Sequence[tuple[int, int]] | None = None,
    run_zones: Sequence[Sequence[Zone]] | None = None,
) -> Command:
    """Watermarked H.264 clip: each run trimmed frame-exactly with its own clock, runs joined,
    the watermark drawn once over the whole clip. Writes the list and text files into
    ``workdir`` (private, 0700) and returns the argv that reads them.

    ``frame_size`` (width, height): every run is scaled to fit it, keeping its aspect ratio
    (black bars fill the rest), for footage whose resolution changes inside the range.
    ``audio_format`` (sample rate, channel layout): every run's audio is converted to it, for
    footage whose audio format changes (the join needs one format).
    ``run_labels``: a text drawn (not expanded) under each run's clock, e.g. the camera of a
    viewing clip that plays several cameras in turn. ``faststart``: the index at the front, so a
    browser starts playing before the whole file has arrived.
    ``zones``: privacy zones filled in on every frame, drawn on each run at its recorded size
    (``run_sizes``: (width, height) per run) before any scaling, so relative zones cover the same
    part of the picture across a resolution change; ``run_zones``: the zones of each run
    instead, when the runs are of several cameras (a viewing clip)."""
    files: dict[str, bytes] = {}
    size = font_size_for(height)
    videos: list[Any] = []
    audios: list[Any] = []
    for i, run in enumerate(plan.runs):
        lst = workdir / f"run{i}.ffconcat"
        clk = workdir / f"clock{i}.txt"
        files[str(lst)] = _concat_list(run, trim_points=False)
        files[str(clk)] = clock_text(run.recorded, tz).encode()
        src = ffmpeg.input(str(lst), f="concat", safe=0, format_whitelist=_CONCAT_FORMATS)
        # start and end, not duration: trim counts a duration from the first frame it keeps, which
        # lies up to a frame after ``start``, and would then keep one frame too many at the end
        cut = {"start": round(run.offset, 6), "end": round(run.offset + run.duration, 6)}
        v = src["v:0"].trim(**cut).setpts("PTS-STARTPTS")
        zs = run_zones[i] if run_zones is not None else zones
        if zs:
            if run_sizes is None:
                raise ValueError("privacy zones need the frame size of each run")
            v = mask_zones(v, zs, run_sizes[i], workdir / f"run{i}", files)
        if frame_size is not None:
            fw, fh = frame_size
            v = (
                v.filter("scale", fw, fh, force_original_aspect_ratio="decrease")
                .filter("pad", fw, fh, "(ow-iw)/2", "(oh-ih)/2")
                .filter("setsar", 1)
            )
        v = v.drawtext(
            fontfile=str(font),
            textfile=str(clk),
            fontsize=size,
            fontcolor="white",
            borderw=2,
            bordercolor="black",
            x=8,
            y=f"h-th-{size // 2}",
        )
        if run_labels is not None:
            label = workdir / f"label{i}.txt"
            files[str(label)] = run_labels[i].encode()
            v = v.drawtext(
                fontfile=str(font),
                textfile=str(label),
                expansion="none",
                fontsize=size,
                fontcolor="white",
                borderw=2,
                bordercolor="black",
                x=8,
                y=f"h-2*th-{size}",
            )
        videos.append(v)
        if audio:
            a = src["a:0"].filter("atrim", **cut).filter("asetpts", "PTS-STARTPTS")
            # async resampling drops the few ms of audio two files overlap by (and fills
            # sub-frame holes with silence) so audio timestamps never run backwards
            a = a.filter("aresample", **{"async": 1})
            if audio_format is not None:
                rate, layout = audio_format
                a = a.filter("aformat", sample_rates=rate, channel_layouts=layout)
            audios.append(a)
    if len(plan.runs) > 1:
        parts: list[Any] = []
        for j, v in enumerate(videos):
            parts.append(v)
            if audio:
                parts.append(audios[j])
        joined = ffmpeg.filter_multi_output(
            parts, "concat", n=len(plan.runs), v=1, a=1 if audio else 0
        )
        video = joined[0]
        audio_out = joined[1] if audio else None
    else:
        video = videos[0]
        audio_out = audios[0] if audio else None
    text = workdir / "watermark.txt"
    files[str(text)] = watermark.encode()
    video = video.drawtext(
        fontfile=str(font),
        textfile=str(text),
        expansion="none",
        fontsize=size,
        fontcolor="white@0.85",
        box=1,
        boxcolor="black@0.45",
        boxborderw=4,
        line_spacing=2,
        x=8,
        y=8,
    )
    streams = [video] + ([audio_out] if audio_out is not None else [])
    opts: dict[str, Any] = {
        "vcodec": "libx264",
        "crf": crf,
        "preset": preset,
        "pix_fmt": "yuv420p",
        # each frame at its own time, none added: MP4 would otherwise be made constant-rate by
        # duplicating frames of variable-rate footage (cameras lower their rate at night)
        "fps_mode": "vfr",
    }
    if audio_out is not None:
        opts.update({"acodec": "aac", "b:a": "128k"})
    if faststart:
        opts["movflags"] = "+faststart"
        opts["format"] = "mp4"  # whatever the output's name says
    out = ffmpeg.output(*streams, str(output), **opts)
    argv = _finish(out.compile(cmd=FFMPEG))
    return Command(argv, output, files)


def mask_zones(
    v: Any, zones: Sequence[Zone], size: tuple[int, int], stem: Path, files: dict[str, bytes]
) -> Any:
    """Fill ``zones`` in on the video stream ``v`` of ``size``: a rectangle with drawbox, a
    polygon by overlaying its mask (a still PNG repeated over every frame)."""
    width, height = size
    for k, z in enumerate(zones):
        if z.rect is not None:
            x, y, w, h = z.box(width, height)
            if w and h:
                v = v.drawbox(x, y, w, h, color="black", thickness="fill")
            continue
        x, y, png = z.mask_png(width, height)
        path = Path(f"{stem}.zone{k}.png")
        files[str(path)] = png
        img = ffmpeg.input(str(path), f="png_pipe", protocol_whitelist="file")
        v = ffmpeg.overlay(v, img, x=x, y=y, eof_action="repeat")
    return v


def build_copy(plan: ClipPlan, workdir: Path, output: Path, *, audio: bool) -> Command:
    """Native (evidence) copy: stream copy, no re-encode, no watermark; cut at keyframes."""
    files: dict[str, bytes] = {}
    lst = workdir / "native.ffconcat"
    body = [b"ffconcat version 1.0"]
    for run in plan.runs:
        body += _concat_list(run, trim_points=True).splitlines()[1:]
    files[str(lst)] = b"\n".join(body) + b"\n"
    src = ffmpeg.input(str(lst), f="concat", safe=0, format_whitelist=_CONCAT_FORMATS)
    streams = [src["v:0"]] + ([src["a:0"]] if audio else [])
    out = ffmpeg.output(*streams, str(output), c="copy")
    argv = _finish(out.compile(cmd=FFMPEG))
    return Command(argv, output, files)


def _finish(argv: list[str]) -> list[str]:
    """Global options: no prompts (-nostdin), never overwrite (-n), machine progress on stdout."""
    return (
        argv[:1]
        + ["-hide_banner", "-nostdin", "-n", "-loglevel", "error", "-nostats"]
        + ["-progress", "pipe:1"]
        + argv[1:]
    )


# ---- running ------------------------------------------------------------------------------------
class Cancelled(Exception):
    """Raised by a progress callback to stop the export (the caller's own reason is the cause),
    or by :func:`run_ffmpeg` when the stop check of :func:`stop_when` gives a reason."""


# The stop check of the runs in this context: returns why the export must stop, else None.
# A context variable, so the caller that owns the export sets it once around the whole package
# build, without every layer in between passing it down.
_STOP: contextvars.ContextVar[Callable[[], str | None] | None] = contextvars.ContextVar(
    "nvr_guard_ffmpeg_stop", default=None
)


@contextlib.contextmanager
def stop_when(check: Callable[[], str | None]) -> Iterator[None]:
    """Within this block, every :func:`run_ffmpeg` polls ``check`` several times a second and,
    once it returns a reason, kills ffmpeg and raises :class:`Cancelled` with that reason —
    also while ffmpeg reports no progress (stalled, or stopped by a signal)."""
    token = _STOP.set(check)
    try:
        yield
    finally:
        _STOP.reset(token)


def _stopped() -> None:
    check = _STOP.get()
    why = check() if check is not None else None
    if why:
        raise Cancelled(why)


def run_ffmpeg(
    argv: Sequence[str],
    *,
    total: float,
    timeout: float,
    stderr_path: Path,
    progress: Callable[[float], None] | None = None,
    pass_fds: Sequence[int] = (),
) -> None:
    """Run ffmpeg, report progress (fraction of ``total`` seconds of output) and enforce a
    timeout. Any failure kills the process and raises; the caller removes the partial output.
    ``pass_fds`` stay open in ffmpeg at the same numbers (for ``/proc/self/fd/N/...`` paths)."""
    deadline = time.monotonic() + timeout
    poll = 1.0 if _STOP.get() is None else 0.2
    _stopped()
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            pass_fds=tuple(pass_fds),
        )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        eof = False
        while not eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeFailure(
                    f"ffmpeg did not finish within {timeout:g} s; the export was stopped"
                )
            ready = sel.select(timeout=min(left, poll))
            _stopped()
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                eof = True
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                key, _, value = line.decode("ascii", "replace").strip().partition("=")
                # out_time_us (and the misnamed out_time_ms) are microseconds
                if key == "out_time_us" and progress and total > 0 and value.isdigit():
                    progress(min(1.0, int(value) / 1e6 / total))
        sel.close()
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(
                f"ffmpeg did not finish within {timeout:g} s; the export was stopped"
            ) from None
        if rc != 0:
            tail = stderr_path.read_bytes().decode("utf-8", "replace").strip().splitlines()
            if rc < 0:
                try:
                    why = f"was killed by signal {signal.Signals(-rc).name}"
                except ValueError:
                    why = f"was killed by signal {-rc}"
            else:
                why = f"failed (exit {rc})"
            detail = f": {tail[-1]}" if tail else ""
            raise RuntimeFailure(f"ffmpeg {why}{detail}")
        if progress:
            progress(1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
