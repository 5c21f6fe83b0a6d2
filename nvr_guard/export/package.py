"""From an approved request's segments to a verified package directory on the destination.

Order of work: check the destination will take it; hash the sources; encode each
camera's clip into a hidden temporary directory on the destination; write manifest, signature,
public key, approval record and VERIFY.txt; fsync every file and the directory; drop the cached
pages and read everything back to hash it again; only then rename to ``NVRG-<request>-<stamp>``
(with ``-<random>`` after it when that name is taken), never replacing an entry.
Any failure on the way (ffmpeg error, timeout, killed ffmpeg, a full medium, an exception in a
progress callback, Ctrl-C) removes the temporary directory, so a destination never holds a
half-written package that someone could mistake for evidence. The temporary directory is reached
only through its descriptor, never by a path another user could re-point (``writer.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nvr_guard import __version__
from nvr_guard.errors import InvalidInput, PolicyRefused, RuntimeFailure
from nvr_guard.export import ffmpeg as ff
from nvr_guard.export.form import approval_record_html, verify_text
from nvr_guard.export.keys import fingerprint, public_pem
from nvr_guard.export.plan import (
    ClipPlan,
    Piece,
    local_stamp,
    local_text,
    plan_clip,
    render_watermark,
    safe_name,
    utc_stamp,
    watermark_values,
    wrap_for_frame,
)
from nvr_guard.export.writer import PackageDir
from nvr_guard.export.zones import Zone
from nvr_guard.model import show_path

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SIGNER = "signer.pub"
RECORD = "approval-record.html"
VERIFY = "VERIFY.txt"
PACKAGE_FORMAT = "nvr-guard export package 1"


@dataclass(frozen=True)
class SourceSegment:
    path: Path
    start: float  # recorded start, epoch seconds; the duration is found by ffprobe


@dataclass(frozen=True)
class ExportJob:
    request: Mapping[str, Any]
    approvals: Sequence[Mapping[str, Any]]
    technician: str
    start: float
    end: float
    tz: tzinfo
    watermark_template: str
    font: Path
    crf: int = 23
    preset: str = "veryfast"
    timeout: float = 3600  # seconds, per clip (one ffmpeg run)
    # a hole between two segments up to this long is jitter, not missing footage; None = one frame.
    # Raise it for recorders whose file names have whole-second resolution.
    gap_tolerance: float | None = None
    # the group that may read the package (export.group's gid); None: the one it gets by default
    group: int | None = None
    # privacy zones per camera (the camera's own and those approvers added): filled in on every
    # frame of a watermarked clip; a native copy cannot be masked and says so
    zones: Mapping[str, Sequence[Zone]] = field(default_factory=dict)

    @property
    def native(self) -> bool:
        return str(self.request.get("format", "mp4")) == "native"


@runtime_checkable
class Destination(Protocol):
    """Where a package may be written: a configured directory today, scanned USB media later."""

    path: Path

    def check_before_write(self, bytes_needed: int) -> None:
        """Raise PolicyRefused when writing is not allowed or there is no room."""

    def describe(self) -> Mapping[str, Any]:
        """JSON-able description for the manifest (the media scan record, for USB media)."""


@dataclass
class DirectoryDestination:
    """A directory listed in ``export.targets``: only existence, writability and space checked."""

    path: Path
    reserve: int = 64 * 1024 * 1024  # leave the filesystem some room beyond the estimate

    def check_before_write(self, bytes_needed: int) -> None:
        if not self.path.is_dir():
            raise PolicyRefused(f"export target {self.path} is not a directory")
        # effective ids: access() with the real ids drops capabilities, and the unit's daemon
        # writes into root's directories with CAP_DAC_OVERRIDE (a read-only mount: EROFS).
        if not os.access(self.path, os.W_OK | os.X_OK, effective_ids=True):
            raise PolicyRefused(f"export target {self.path} is not writable by this process")
        free = shutil.disk_usage(self.path).free
        if free < bytes_needed + self.reserve:
            raise PolicyRefused(
                f"export target {self.path} has {free // 2**20} MiB free; this export needs "
                f"about {(bytes_needed + self.reserve) // 2**20} MiB. "
                "Free some space or use other media."
            )

    def describe(self) -> Mapping[str, Any]:
        usage = shutil.disk_usage(self.path)
        return {
            "kind": "directory",
            "path": str(self.path),
            "free_bytes": usage.free,
            # configured directories are not scanned media: say so instead of leaving it out
            "scan": None,
        }


@dataclass(frozen=True)
class ExportPackage:
    path: Path
    manifest: dict[str, Any]
    files: tuple[str, ...]
    sha256s: dict[str, str] = field(default_factory=dict)
    # a protected export: the sealed file on the destination (mode, file, sha256, size, package,
    # recipient); ``manifest`` is then the package's inside it
    sealed: dict[str, Any] | None = None


# ---- helpers ------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed: stable key order, UTF-8 (names stay readable)."""
    return (json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()


def _select(segments: Sequence[SourceSegment], start: float, end: float) -> list[SourceSegment]:
    """Segments that may hold footage of [start, end) before knowing their durations: everything
    starting inside the range plus the last one starting at or before its beginning."""
    ordered = sorted(segments, key=lambda s: s.start)
    before = [s for s in ordered if s.start <= start]
    inside = [s for s in ordered if start < s.start < end]
    return before[-1:] + inside


@dataclass
class _Clip:
    camera: str
    plan: ClipPlan
    sources: list[dict[str, Any]]
    audio: bool
    fps: float
    width: int
    height: int
    name: str
    paths: list[bytes]
    watermark: str | None
    video: dict[str, Any] = field(default_factory=dict)
    audio_format: tuple[int, str] | None = None
    audio_note: str = ""
    damaged: list[dict[str, Any]] = field(default_factory=list)  # for the manifest
    damaged_paths: list[bytes] = field(default_factory=list)
    damaged_starts: list[float] = field(default_factory=list)


def _probe_all(
    chosen: Sequence[SourceSegment],
) -> tuple[list[tuple[SourceSegment, ff.Probe]], list[tuple[SourceSegment, str]]]:
    """Probe each source. One ffprobe cannot read (a recorder that crashed mid-write leaves an
    MP4 without its index), or that holds no video, is damaged: it is left out and named, its
    time becomes a gap, and the rest of the export goes on."""
    good: list[tuple[SourceSegment, ff.Probe]] = []
    damaged: list[tuple[SourceSegment, str]] = []
    for s in chosen:
        try:
            p = ff.probe(s.path)
        except (InvalidInput, RuntimeFailure) as e:
            damaged.append((s, str(e)))
            continue
        if p.video_codec is None:
            damaged.append((s, f"{s.path}: no video stream"))
            continue
        if p.width * p.height > MAX_FRAME_AREA:
            # one tiny 8192x8192 file made every frame of the range be scaled up to its size
            damaged.append((s, f"{s.path}: frame size {p.width}x{p.height} is beyond any camera"))
            continue
        # what the packets hold, not what the header claims: an index that outlives its data
        # (cut short) or a header claiming 600 s over 10 s hid the footage missing after it
        try:
            readable = ff.readable_duration(s.path)
        except RuntimeFailure as e:
            damaged.append((s, str(e)))
            continue
        if readable <= 0 < p.duration - SHORT_TOLERANCE:
            damaged.append(
                (
                    s,
                    f"{s.path}: one frame at most of the {p.duration:.3f} s its header claims "
                    "is readable",
                )
            )
            continue
        if 0 < readable < p.duration - SHORT_TOLERANCE:
            damaged.append(
                (
                    s,
                    f"{s.path}: only {readable:.3f} s of the {p.duration:.3f} s its header claims "
                    "are readable; the rest is a gap",
                )
            )
            p = dataclasses.replace(p, duration=readable)
        if p.duration <= 0:
            damaged.append((s, f"{s.path}: no footage in it (duration 0)"))
        else:
            good.append((s, p))
    return good, damaged


MAX_FRAME_AREA = 7680 * 4320  # 8K UHD: a larger source is no camera's footage
SHORT_TOLERANCE = 1.0  # seconds a header may overstate its packets (the last frame's length)


def _video_handling(probes: Sequence[ff.Probe], *, native: bool) -> dict[str, Any]:
    """The clip's frame size and what the sources were. When the resolution changes inside the
    range, the watermarked clip takes the largest source size (by area, rounded down to even
    numbers for H.264 4:2:0) and every other part is scaled into it keeping its aspect ratio; a
    native copy (stream copy) keeps each part as recorded."""
    sizes = sorted({(p.width, p.height) for p in probes}, key=lambda wh: (wh[0] * wh[1], wh))
    width, height = sizes[-1] if sizes else (0, 0)
    scaled = len(sizes) > 1 and not native
    if scaled:
        width, height = width - width % 2, height - height % 2
    return {
        "width": width,
        "height": height,
        "size": f"{width}x{height}",
        "source_codecs": sorted({p.video_codec or "" for p in probes}),
        "source_sizes": [f"{w}x{h}" for w, h in sizes],
        "source_containers": sorted({p.container for p in probes}),
        "scaled": scaled,
    }


def _audio_handling(
    probes: Sequence[ff.Probe], *, native: bool
) -> tuple[bool, tuple[int, str] | None, str]:
    """Whether the clip has audio, the format to convert it to (None: as it is) and what was
    done, in words for the manifest. The watermarked copy always encodes AAC (G.711 A-law and
    mu-law are not allowed in MP4); the native copy keeps the recorded codec (Matroska holds
    them). Audio is left out when any source segment lacks it."""
    codecs = sorted({p.audio_codec for p in probes if p.audio_codec})
    with_audio = sum(1 for p in probes if p.has_audio)
    if not with_audio:
        return False, None, "none: the source has no audio"
    if with_audio < len(probes):
        return (
            False,
            None,
            f"left out: {len(probes) - with_audio} of {len(probes)} source segments have no "
            "audio track",
        )
    if native:
        return True, None, f"copied as recorded ({', '.join(codecs)})"
    formats = {(p.sample_rate, p.channels) for p in probes}
    fmt: tuple[int, str] | None = None
    if len(formats) > 1:
        rate = max(r for r, _ in formats)
        fmt = (rate, "stereo" if any(c > 1 for _, c in formats) else "mono")
    rate_text = f"{fmt[0]} Hz {fmt[1]}" if fmt else f"{probes[0].sample_rate} Hz"
    return True, fmt, f"transcoded to AAC ({rate_text}) from {', '.join(codecs)}"


# ---- optional destination hooks -----------------------------------------------------------------
# A destination may also have (not part of the Destination protocol, so plain directories need
# neither): ``before_commit(tmp)``, called just before the temporary directory is renamed into
# place, raising to stop the rename (the medium was pulled or changed); and
# ``abort(tmp, error) -> NvrGuardError | None``, called after a failure once ``tmp`` was removed
# through its path, to remove what the path no longer reaches (a lazily unmounted medium) and to
# give a clearer error to raise instead (medium full, medium gone, I/O error).
def destination_abort(dest: Destination, tmp: Path, error: BaseException) -> BaseException | None:
    hook = getattr(dest, "abort", None)
    if hook is None:
        return None
    try:
        better: BaseException | None = hook(tmp, error)
    except Exception:  # the clean-up's own failure must not hide the original error
        return None
    return better


def _gap(a: float, b: float, clip: _Clip, tz: tzinfo) -> dict[str, Any]:
    """A hole in the footage for the manifest; with the damaged sources recorded inside it (or
    just before it: its start may precede the range) as its cause."""
    gap: dict[str, Any] = {"from": local_text(a, tz), "to": local_text(b, tz)}
    gap["seconds"] = round(b - a, 3)
    inside = [
        d["path"]
        for d, t in zip(clip.damaged, clip.damaged_starts, strict=True)
        if a - 1.0 <= t < b or (t <= a == clip.plan.start)
    ]
    if inside:
        gap["damaged_sources"] = inside
    return gap


def run_size(run: Any) -> tuple[int, int]:
    """The recorded frame size of a run (its pieces share one shape: codec, width, height...)."""
    shape = run.pieces[0].shape
    return int(shape[1]), int(shape[2])


def _masking(job: ExportJob, camera: str) -> dict[str, Any]:
    """What the manifest says of a clip's privacy zones: the zones filled in (watermarked
    copy), or that a native copy is unmasked although the camera has zones."""
    zones = list(job.zones.get(camera, ()))
    if not zones:
        return {"privacy_zones": [], "masking": "none: no privacy zones for this camera"}
    listed = [z.json() for z in zones]
    if job.native:
        return {
            "privacy_zones": listed,
            "masking": "unmasked native copy: the zones listed were NOT applied (a stream copy "
            "cannot be masked)",
        }
    return {"privacy_zones": listed, "masking": f"{len(zones)} privacy zone(s) filled in"}


def open_package_dir(dest: Destination, name: str, group: int | None) -> PackageDir:
    """The private temporary directory a package named ``name`` is built in on ``dest``; a
    one-line RuntimeFailure when it cannot be made."""
    try:
        return PackageDir(dest.path, name, group=group)
    except OSError as e:
        raise RuntimeFailure(
            f"cannot create the package directory on {dest.path}: {e.strerror or e}; "
            "nothing was exported"
        ) from e


def undo_package(
    pdir: PackageDir, dest: Destination, tmp: Path, error: BaseException, what: str
) -> BaseException:
    """After a failed write of ``what``: remove the temporary package directory, and return the
    error to raise (the destination's clearer one, a one-line RuntimeFailure for an I/O error,
    else ``error`` itself)."""
    pdir.discard()
    clearer = destination_abort(dest, tmp, error)
    if clearer is not None:
        return clearer
    if isinstance(error, OSError):
        # ENOSPC, EIO, a vanished directory...: a user error message, not a traceback
        return RuntimeFailure(
            f"writing {what} on {dest.path} failed: {error.strerror or error}; nothing was exported"
        )
    return error


# ---- the export ---------------------------------------------------------------------------------
NAME_TRIES = 8


def package_name(target: Path, base: str) -> str:
    """The package's final name, decided before anything is signed (the manifest carries it):
    ``base`` (``NVRG-<request>-<utc stamp>``), or, when that is taken (someone may plant
    predictable names on a shared target), ``base-<4 random hex>``, which nobody can guess
    ahead. The commit renames without ever replacing an entry (RENAME_NOREPLACE)."""
    if not os.path.lexists(target / base):
        return base
    for _ in range(NAME_TRIES):
        name = f"{base}-{secrets.token_hex(2)}"
        if not os.path.lexists(target / name):
            return name
    raise RuntimeFailure(
        f"{target / base} and {NAME_TRIES} variants of it already exist; clean up the export "
        "target (someone may be planting names on it) and run the export again"
    )


def run_export(
    clips: Sequence[tuple[str, Sequence[SourceSegment]]],
    job: ExportJob,
    dest: Destination,
    key: Ed25519PrivateKey,
    *,
    audit_head: tuple[int, str],
    progress: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> ExportPackage:
    """Export one clip per (camera, segments) into a signed package on ``dest``.

    ``progress`` gets the overall fraction done (0..1); raising from it stops the export (and
    cleans up). Raises InvalidInput (nothing to export), PolicyRefused (destination refused),
    RuntimeFailure (ffmpeg failed, timed out or was killed; I/O error).
    """
    if not clips:
        raise InvalidInput("nothing to export: no cameras given")
    if job.end <= job.start:
        raise InvalidInput("export range is empty: 'to' must be after 'from'")
    exported = clock()
    rid = safe_name(str(job.request.get("id", "")))
    name = package_name(dest.path, f"NVRG-{rid}-{utc_stamp(exported)}")

    # Probe and plan first: a request with no footage, or a destination that is full, is refused
    # before anything is written.
    planned: list[_Clip] = []
    needed = 0
    for camera, segments in clips:
        chosen = _select(segments, job.start, job.end)
        for s in chosen:
            raw = os.fsencode(s.path)
            # the concat list is line-based: a line break in a name could add directives to it
            if b"\n" in raw or b"\r" in raw or not raw.startswith(b"/"):
                raise InvalidInput(
                    f"camera {camera}: cannot export {show_path(raw)}: "
                    "source paths must be absolute and free of line breaks"
                )
        probes, damaged = _probe_all(chosen)
        fps = next((float(p.fps) for _, p in probes if p.fps), 25.0)
        pieces = [Piece(os.fsencode(s.path), s.start, p.duration, p.shape) for s, p in probes]
        tolerance = job.gap_tolerance if job.gap_tolerance is not None else 1 / fps
        plan = plan_clip(pieces, job.start, job.end, tolerance)
        if not plan.runs:
            why = f" ({len(damaged)} damaged source(s): {damaged[0][1]})" if damaged else ""
            raise InvalidInput(
                f"camera {camera}: no footage between {local_text(job.start, job.tz)} and "
                f"{local_text(job.end, job.tz)}{why}"
            )
        used = {p.path for r in plan.runs for p in r.pieces}
        used_probes = [(s, p) for s, p in probes if os.fsencode(s.path) in used]
        for s, p in used_probes:
            lo, hi = max(job.start, s.start), min(job.end, s.start + p.duration)
            needed += int(p.size * max(0.0, hi - lo) / p.duration) if p.duration else p.size
        video = _video_handling([p for _, p in used_probes], native=job.native)
        audio, audio_format, audio_note = _audio_handling(
            [p for _, p in used_probes], native=job.native
        )
        ext = "mkv" if job.native else "mp4"
        clip_name = (
            f"{safe_name(camera)}_{local_stamp(job.start, job.tz)}_"
            f"{local_stamp(job.end, job.tz)}.{ext}"
        )
        planned.append(
            _Clip(
                camera=camera,
                plan=plan,
                sources=[
                    {
                        "path": show_path(os.fsencode(s.path)),
                        "recorded_start": local_text(s.start, job.tz),
                        "recorded_end": local_text(s.start + p.duration, job.tz),
                        "duration": round(p.duration, 6),
                        "size": p.size,
                    }
                    for s, p in used_probes
                ],
                audio=audio,
                fps=fps,
                width=video["width"],
                height=video["height"],
                name=clip_name,
                paths=[os.fsencode(s.path) for s, _ in used_probes],
                watermark=None,
                video=video,
                audio_format=audio_format,
                audio_note=audio_note,
                damaged=[
                    {
                        "path": show_path(os.fsencode(s.path)),
                        "recorded_start": local_text(s.start, job.tz),
                        "error": error,
                    }
                    for s, error in damaged
                ],
                damaged_paths=[os.fsencode(s.path) for s, _ in damaged],
                damaged_starts=[s.start for s, _ in damaged],
            )
        )
    if len({c.name for c in planned}) != len(planned):
        raise InvalidInput("the same camera is listed twice in one export")
    dest.check_before_write(int(needed * 1.1) + 1024 * 1024)
    destination = dict(dest.describe())

    pdir = open_package_dir(dest, name, job.group)
    tmp = pdir.path
    work = Path(tempfile.mkdtemp(prefix="nvrg-export-"))
    try:
        return _build(
            planned, job, dest, key, audit_head, progress, exported, name, pdir, work, destination
        )
    except BaseException as error:
        better = undo_package(pdir, dest, tmp, error, "the package")
        if better is error:
            raise
        raise better from error
    finally:
        pdir.close()
        shutil.rmtree(work, ignore_errors=True)


def _build(
    planned: list[_Clip],
    job: ExportJob,
    dest: Destination,
    key: Ed25519PrivateKey,
    audit_head: tuple[int, str],
    progress: Callable[[float], None] | None,
    exported: float,
    name: str,
    pdir: PackageDir,
    work: Path,
    destination: dict[str, Any],
) -> ExportPackage:
    # Sources are hashed before encoding, so the manifest names exactly what was read
    for clip in planned:
        for src, raw in zip(clip.sources, clip.paths, strict=True):
            try:
                with open(raw, "rb") as f:
                    src["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise RuntimeFailure(f"cannot read source {src['path']}: {e.strerror}") from None
        # damaged ones too, as they are now: what the recorder left is part of the record
        for bad, raw in zip(clip.damaged, clip.damaged_paths, strict=True):
            try:
                with open(raw, "rb") as f:
                    bad["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
                    bad["size"] = os.fstat(f.fileno()).st_size
            except OSError as e:
                bad["sha256"], bad["size"] = None, None
                bad["error"] += f"; cannot read it ({e.strerror})"

    version = ff.ffmpeg_version()
    total = sum(c.plan.duration for c in planned) or 1.0
    done = 0.0
    clip_entries: list[dict[str, Any]] = []
    for i, clip in enumerate(planned):
        # through the directory's descriptor, passed to ffmpeg: see writer.py
        out = pdir.proc_path(clip.name)
        cwork = work / f"clip{i}"
        cwork.mkdir()
        if job.native:
            cmd = ff.build_copy(clip.plan, cwork, out, audio=clip.audio)
        else:
            values = watermark_values(
                job.request,
                job.approvals,
                job.technician,
                clip.camera,
                exported,
                job.start,
                job.end,
                job.tz,
            )
            clip.watermark = render_watermark(job.watermark_template, values)
            size = ff.font_size_for(clip.height)
            zones = list(job.zones.get(clip.camera, ()))
            cmd = ff.build_encode(
                clip.plan,
                cwork,
                out,
                watermark=wrap_for_frame(clip.watermark, clip.width or 640, size),
                tz=job.tz,
                font=job.font,
                crf=job.crf,
                preset=job.preset,
                audio=clip.audio,
                height=clip.height,
                frame_size=(clip.width, clip.height) if clip.video.get("scaled") else None,
                audio_format=clip.audio_format,
                zones=zones,
                run_sizes=[run_size(r) for r in clip.plan.runs] if zones else None,
            )
        for path, data in cmd.files.items():
            Path(path).write_bytes(data)
        share = clip.plan.duration / total

        def report(frac: float, base: float = done, share: float = share) -> None:
            if progress:
                progress(min(1.0, base + frac * share))

        ff.run_ffmpeg(
            cmd.argv,
            total=clip.plan.duration,
            timeout=job.timeout,
            stderr_path=cwork / "stderr.txt",
            progress=report,
            pass_fds=(pdir.fd,),
        )
        done += share
        result = ff.probe(out, count=True, pass_fds=(pdir.fd,))
        short = clip.plan.duration - result.duration
        if short > max(SHORT_TOLERANCE, 0.01 * clip.plan.duration):
            # ffmpeg ends a concat input quietly at a file it cannot open: a source swapped or
            # cut after it was probed left a clip shorter than the footage the manifest would
            # claim. Nothing is written; the export fails and is recorded.
            raise RuntimeFailure(
                f"the clip of {clip.camera} holds {result.duration:.3f} s of the "
                f"{clip.plan.duration:.3f} s of footage planned: a source changed or could not "
                "be read while exporting; nothing was written"
            )
        native_start: dict[str, Any] = {}
        if job.native and clip.plan.runs:
            # a stream copy cannot start between keyframes: it starts at the one at or before
            # 'from', and the record says exactly where (nothing about footage is vague)
            run = clip.plan.runs[0]
            kf = ff.keyframe_at_or_before(run.pieces[0].path, run.offset)
            at = run.pieces[0].start + kf
            native_start = {
                "native_start": local_text(at, job.tz),
                "native_start_early_seconds": round(max(0.0, run.recorded - at), 3),
            }
        clip_entries.append(
            {
                "camera": clip.camera,
                "file": clip.name,
                "format": "native" if job.native else "mp4",
                "trim": (
                    "keyframe-accurate (stream copy: starts at the keyframe before 'from')"
                    if job.native
                    else "frame-accurate"
                ),
                "requested_seconds": round(job.end - job.start, 6),
                "footage_seconds": round(clip.plan.duration, 6),
                "duration": round(result.duration, 6),
                "frames": result.frames,
                "fps": round(clip.fps, 6),
                "audio": clip.audio and result.has_audio,
                "audio_handling": clip.audio_note,
                "video": {k: v for k, v in clip.video.items() if k not in ("width", "height")},
                "gaps": [_gap(a, b, clip, job.tz) for a, b in clip.plan.gaps],
                "damaged_sources": clip.damaged,
                **native_start,
                "sources": clip.sources,
                "watermark": clip.watermark,
                **_masking(job, clip.camera),
                "ffmpeg": {
                    "argv": cmd.argv,
                    "inputs": {
                        Path(p).name: d.decode("utf-8", "backslashreplace")
                        for p, d in cmd.files.items()
                    },
                },
            }
        )

    pub = key.public_key()
    fp = fingerprint(pub)
    request = dict(job.request)
    export_info = {
        "package": name,
        "technician": job.technician,
        "exported": local_text(exported, job.tz),
        "range": f"{local_text(job.start, job.tz)} – {local_text(job.end, job.tz)}",
        "clips": clip_entries,
        "signer": fp,
        "audit_head": {"seq": audit_head[0], "hash": audit_head[1]},
        "destination": destination,
    }
    files: dict[str, dict[str, Any]] = {}
    for c in clip_entries:
        pdir.settle(c["file"])
        digest, c["size"] = pdir.sha256(c["file"])
        c["sha256"] = digest
        files[c["file"]] = {"sha256": digest, "size": c["size"]}
    record = approval_record_html(request, job.approvals, export_info, tz=job.tz).encode()
    sums = {fname: meta["sha256"] for fname, meta in files.items()}
    sums[RECORD] = hashlib.sha256(record).hexdigest()
    small: dict[str, bytes] = {RECORD: record, VERIFY: verify_text(name, fp, sums).encode()}
    for fname, data in small.items():
        pdir.create(fname, data)
    for fname, data in small.items():
        files[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest: dict[str, Any] = {
        "package_format": PACKAGE_FORMAT,
        "package": name,
        "nvr_guard": __version__,
        "created": datetime.fromtimestamp(exported, UTC).isoformat(timespec="seconds"),
        "request": request,
        "approvals": [dict(a) for a in job.approvals],
        "technician": job.technician,
        "format": "native" if job.native else "mp4",
        "time_range": {
            "from": local_text(job.start, job.tz),
            "to": local_text(job.end, job.tz),
            "timezone": str(job.tz),
        },
        "cameras": [c["camera"] for c in clip_entries],
        "privacy_zones": {
            c["camera"]: c["privacy_zones"] for c in clip_entries if c.get("privacy_zones")
        },
        "gaps": [dict(g, camera=c["camera"]) for c in clip_entries for g in c["gaps"]],
        "damaged_sources": [
            dict(d, camera=c["camera"]) for c in clip_entries for d in c["damaged_sources"]
        ],
        "clips": clip_entries,
        "ffmpeg_version": version,
        "destination": destination,
        "audit_head": {"seq": audit_head[0], "hash": audit_head[1]},
        "signer": {"algorithm": "Ed25519", "fingerprint": fp, "public_key": SIGNER},
        "files": files,
    }
    body = manifest_bytes(manifest)
    pdir.create(MANIFEST, body)
    pdir.create(SIGNATURE, key.sign(body))
    pdir.create(SIGNER, public_pem(pub))

    # read back: what is on the medium must be what was meant, before the name says "done"
    expect = {fname: meta["sha256"] for fname, meta in files.items()}
    expect[MANIFEST] = hashlib.sha256(body).hexdigest()
    for fname in list(small) + [MANIFEST, SIGNATURE, SIGNER]:
        pdir.settle(fname)
    pdir.sync()
    for fname, digest in expect.items():
        got, _ = pdir.sha256(fname)
        if got != digest:
            raise RuntimeFailure(
                f"read-back of {fname} on {dest.path} does not match what was written "
                f"(sha256 {got[:12]}… ≠ {digest[:12]}…): the medium is unreliable, use another"
            )
    final = dest.path / name
    pdir.seal(set(expect) | {SIGNATURE, SIGNER})
    commit_check = getattr(dest, "before_commit", None)
    if commit_check is not None:
        commit_check(pdir.path)
    pdir.commit(name)
    names = tuple(sorted(os.listdir(pdir.fd)))
    return ExportPackage(final.resolve(), manifest, names, {**expect})
