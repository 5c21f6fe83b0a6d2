"""Export engine with real ffmpeg on generated footage: exact trim, watermark, audio, gaps, hostile
text, and clean failure (killed ffmpeg, timeout, refused destination)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psutil
import pytest

from nvr_guard.errors import InvalidInput, PolicyRefused, RuntimeFailure
from nvr_guard.export import (
    DirectoryDestination,
    ExportJob,
    SourceSegment,
    load_or_create_key,
    resolve_font,
    run_export,
    verify_package,
)
from nvr_guard.export.ffmpeg import Command, build_encode
from nvr_guard.export.plan import (
    Piece,
    local_text,
    plan_clip,
    render_watermark,
    utc_stamp,
    wrap_for_frame,
)

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
SH = ZoneInfo("Asia/Shanghai")
T0 = 1763600000.0  # 2025-11-20 08:53:20 +08:00: recorded start of the first segment
FPS = 25
FRAME = 1 / FPS
W, H = 320, 240


def make_footage(where: Path, *, audio: bool, count: int = 3, seconds: int = 10) -> list[Path]:
    """``count`` segments of ``seconds`` each, cut from one continuous test recording."""
    where.mkdir(parents=True, exist_ok=True)
    argv = [
        "ffmpeg",
        "-v",
        "error",
        "-nostdin",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={W}x{H}:rate={FPS}",
    ]
    if audio:
        argv += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
    argv += ["-t", str(count * seconds), "-c:v", "libx264", "-preset", "ultrafast", "-g", str(FPS)]
    argv += ["-c:a", "aac"] if audio else []
    argv += [
        "-f",
        "segment",
        "-segment_time",
        str(seconds),
        "-reset_timestamps",
        "1",
        str(where / "seg%02d.mp4"),
    ]
    subprocess.run(argv, check=True)
    return sorted(where.glob("seg*.mp4"))


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    base = tmp_path_factory.mktemp("footage")
    return {
        "audio": make_footage(base / "audio", audio=True),
        "silent": make_footage(base / "silent", audio=False, count=2),
    }


def segs(paths: list[Path], starts: list[float] | None = None) -> list[SourceSegment]:
    starts = starts if starts is not None else [T0 + 10 * i for i in range(len(paths))]
    return [SourceSegment(p, s) for p, s in zip(paths, starts, strict=True)]


REQUEST: dict[str, Any] = {
    "id": 42,
    "requester": "alice",
    "site": "bank",
    "cameras": ["lobby-1"],
    "from": "2025-11-20T08:53:23+08:00",
    "to": "2025-11-20T08:53:43+08:00",
    "reason": "robbery at counter 2",
    "basis": "公安机关调取证据通知书 2025-17",
    "recipient": {"unit": "城西派出所", "person": "王警官", "contact": "010-1234"},
    "format": "mp4",
    "emergency": False,
}
APPROVALS = [
    {"approver": "bob", "role": "manager", "decision": "approve", "note": "", "time": "t1"},
    {"approver": "carol", "role": "security", "decision": "approve", "note": "ok", "time": "t2"},
]
TEMPLATE = (
    "NVRG {request} | {camera} | 申请 {requester} | 审批 {approvers} | 导出 {technician} "
    "{exported} | {reason}"
)


def job(start: float, end: float, **kw: Any) -> ExportJob:
    request = dict(REQUEST, **kw.pop("request", {}))
    return ExportJob(
        request=request,
        approvals=APPROVALS,
        technician="tom",
        start=start,
        end=end,
        tz=SH,
        watermark_template=kw.pop("template", TEMPLATE),
        font=FONT,
        preset=kw.pop("preset", "ultrafast"),
        **kw,
    )


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at a directory of our own, to see whether the export leaves anything."""
    d = tmp_path / "private-tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return load_or_create_key(tmp_path / "state")[0]


def dest_dir(tmp_path: Path) -> DirectoryDestination:
    d = tmp_path / "usb"
    d.mkdir(exist_ok=True)
    return DirectoryDestination(d)


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
    ).stdout
    return json.loads(out)


def gray_frame(argv_input: list[str], vf: str, n: int) -> bytes:
    """Frame ``n`` after ``vf`` as raw 8-bit gray pixels."""
    return subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            *argv_input,
            "-vf",
            f"{vf}select=eq(n\\,{n})",
            "-frames:v",
            "1",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "gray",
            "-",
        ],
        check=True,
        capture_output=True,
    ).stdout


def region_diff(a: bytes, b: bytes, x0: int, y0: int, x1: int, y1: int) -> float:
    total = 0
    for y in range(y0, y1):
        row = y * W
        total += sum(abs(a[row + x] - b[row + x]) for x in range(x0, x1))
    return total / ((x1 - x0) * (y1 - y0))


# ---- pure planning ------------------------------------------------------------------------------
def P(start: float, dur: float = 10.0, name: bytes = b"x") -> Piece:
    return Piece(name + str(start).encode(), start, dur)


@pytest.mark.parametrize(
    "pieces, start, end, runs, gaps",
    [
        # mid-segment start and end, contiguous: one run, no gap
        ([P(0), P(10), P(20)], 3.5, 23.0, [(3.5, 19.5, 3.5)], []),
        # jitter below one frame between files is not a gap
        ([P(0), P(10.03), P(20.05)], 1.0, 25.0, [(1.0, 24.0, 1.0)], []),
        # a 5-second hole splits the clip and is listed
        ([P(0), P(10), P(25)], 5.0, 30.0, [(5.0, 15.0, 5.0), (0.0, 5.0, 25.0)], [(20.0, 25.0)]),
        # footage starts late and ends early: head and tail are gaps
        ([P(10)], 5.0, 25.0, [(0.0, 10.0, 10.0)], [(5.0, 10.0), (20.0, 25.0)]),
        # a segment entirely before the range is not used
        ([P(-20), P(0)], 2.0, 4.0, [(2.0, 2.0, 2.0)], []),
        # nothing at all
        ([P(100)], 0.0, 10.0, [], [(0.0, 10.0)]),
    ],
)
def test_plan_clip_runs_and_gaps(
    pieces: list[Piece],
    start: float,
    end: float,
    runs: list[tuple[float, float, float]],
    gaps: list[tuple[float, float]],
) -> None:
    plan = plan_clip(pieces, start, end, FRAME)
    got = [(round(r.offset, 6), round(r.duration, 6), r.recorded) for r in plan.runs]
    assert got == [(round(o, 6), round(d, 6), rec) for o, d, rec in runs]
    assert [(round(a, 6), round(b, 6)) for a, b in plan.gaps] == gaps


def test_gap_tolerance_for_whole_second_file_names() -> None:
    # names with whole seconds: the next file "starts" 0.5 s after the previous one ends
    pieces = [P(0, 9.5), P(10, 9.5), P(20, 9.5)]
    assert len(plan_clip(pieces, 0, 29.5, FRAME).gaps) == 2
    relaxed = plan_clip(pieces, 0, 29.5, 1.0)
    assert relaxed.gaps == () and len(relaxed.runs) == 1


def test_plan_refuses_empty_range() -> None:
    with pytest.raises(InvalidInput, match="'to' must be after 'from'"):
        plan_clip([P(0)], 5.0, 5.0, FRAME)


@pytest.mark.parametrize(
    "template, expect",
    [
        ("{request}/{camera}", "42/lobby-1"),
        ("{reason.__class__} {nope}", "{reason.__class__} {nope}"),  # no attribute access
        ("{approvers}", "bob, carol"),
        ("{operator}={technician}", "tom=tom"),
    ],
)
def test_watermark_template_fields(template: str, expect: str) -> None:
    values = {
        "request": "42",
        "camera": "lobby-1",
        "approvers": "bob, carol",
        "technician": "tom",
        "operator": "tom",
        "reason": "r",
    }
    assert render_watermark(template, values) == expect


def test_watermark_template_unbalanced_brace_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="export.watermark"):
        render_watermark("NVRG {request", {})


def test_wrap_keeps_every_character_and_fits() -> None:
    text = "NVRG 42 | 申请 alice | 审批 bob, carol | " + "x" * 80
    wrapped = wrap_for_frame(text, 320, 12)
    assert wrapped.replace("\n", "").replace(" ", "") == text.replace(" ", "")
    assert all(len(line) <= (320 - 16) / 12 / 0.55 + 1 for line in wrapped.split("\n"))


# ---- real ffmpeg --------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize(
    "start, end",
    [
        (T0 + 3.52, T0 + 23.0),  # starts mid-segment, spans two joins
        (T0 + 10.0, T0 + 20.0),  # exactly one segment
        (T0 + 12.36, T0 + 17.8),  # inside one segment, both ends mid-segment
    ],
)
def test_duration_and_frame_count_match_the_request(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, start: float, end: float
) -> None:
    pkg = run_export(
        [("lobby-1", segs(footage["audio"]))],
        job(start, end),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    clip = pkg.path / pkg.manifest["clips"][0]["file"]
    info = ffprobe(clip)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    want_frames = round((end - start) * FPS)
    assert abs(int(video["nb_read_frames"]) - want_frames) <= 1
    assert abs(float(video["duration"]) - (end - start)) <= FRAME + 1e-6
    assert pkg.manifest["clips"][0]["gaps"] == []
    assert verify_package(pkg.path).ok


@pytest.mark.integration
def test_watermark_region_differs_from_unwatermarked_render(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    start = T0 + 3.52
    pkg = run_export(
        [("lobby-1", segs(footage["audio"]))],
        job(start, start + 4),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    clip = pkg.path / pkg.manifest["clips"][0]["file"]
    marked = gray_frame(["-i", str(clip)], "", 50)
    plain = gray_frame(["-i", str(footage["audio"][0])], "trim=start=3.52,setpts=PTS-STARTPTS,", 50)
    assert len(marked) == len(plain) == W * H
    # the watermark box at the top left, the recorded-time line at the bottom left …
    assert region_diff(marked, plain, 8, 8, 200, 40) > 20
    assert region_diff(marked, plain, 8, H - 20, 160, H - 4) > 20
    # … and the picture elsewhere is the same picture (only encoding noise)
    assert region_diff(marked, plain, 100, 120, 300, 200) < 6


@pytest.mark.integration
@pytest.mark.parametrize("kind, has_audio", [("audio", True), ("silent", False)])
def test_audio_kept_when_present_absent_otherwise(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, kind: str, has_audio: bool
) -> None:
    pkg = run_export(
        [("lobby-1", segs(footage[kind]))],
        job(T0 + 2.0, T0 + 14.0),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    info = ffprobe(pkg.path / pkg.manifest["clips"][0]["file"])
    types = sorted(s["codec_type"] for s in info["streams"])
    assert types == (["audio", "video"] if has_audio else ["video"])
    assert pkg.manifest["clips"][0]["audio"] is has_audio
    if has_audio:
        a = next(s for s in info["streams"] if s["codec_type"] == "audio")
        assert a["codec_name"] == "aac"
        assert abs(float(a["duration"]) - 12.0) < 0.1


HOSTILE = "x' : \\ %{e:1} %{localtime} [out]; drawtext=text=PWNED:x=0,\nline2 ';[in]null[out]"


@pytest.mark.integration
def test_hostile_user_text_ends_up_literally(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    j = job(
        T0 + 1.0,
        T0 + 3.0,
        request={"reason": HOSTILE, "requester": "eve'[x]"},
        template="{requester} {reason}",
    )
    pkg = run_export(
        [("lobby-1", segs(footage["audio"]))],
        j,
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    clip = pkg.manifest["clips"][0]
    assert clip["watermark"] == "eve'[x] " + HOSTILE
    argv = clip["ffmpeg"]["argv"]
    # no user text anywhere in the command: it only reaches ffmpeg through the text file …
    for needle in ("PWNED", "%{e", "eve'", "line2"):
        assert not any(needle in a for a in argv)
    # … which holds it verbatim (wrapped at spaces only), read with expansion off
    text = clip["ffmpeg"]["inputs"]["watermark.txt"]
    assert text.replace("\n", " ").split() == ("eve'[x] " + HOSTILE).replace("\n", " ").split()
    graph = argv[argv.index("-filter_complex") + 1]
    assert graph.count("drawtext") == 2 and "expansion=none" in graph
    assert abs(float(ffprobe(pkg.path / clip["file"])["format"]["duration"]) - 2.0) <= FRAME


@pytest.mark.integration
def test_gap_in_footage_is_listed(footage: dict[str, list[Path]], tmp_path: Path, key: Any) -> None:
    # third segment recorded 5 s late (recorder restart), and the request runs past the end
    starts = [T0, T0 + 10, T0 + 25]
    pkg = run_export(
        [("lobby-1", segs(footage["audio"], starts))],
        job(T0 + 5, T0 + 40),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    gaps = [(g["from"], g["to"]) for g in pkg.manifest["gaps"]]
    assert gaps == [
        ("2025-11-20T08:53:40+08:00", "2025-11-20T08:53:45+08:00"),
        ("2025-11-20T08:53:55+08:00", "2025-11-20T08:54:00+08:00"),
    ]
    assert pkg.manifest["gaps"][0]["camera"] == "lobby-1"
    info = ffprobe(pkg.path / pkg.manifest["clips"][0]["file"])
    assert abs(float(info["format"]["duration"]) - 25.0) <= 2 * FRAME  # 15 s + 10 s of footage
    clocks = [v for k, v in pkg.manifest["clips"][0]["ffmpeg"]["inputs"].items() if "clock" in k]
    assert len(clocks) == 2  # the burned-in time jumps over the hole


@pytest.mark.integration
def test_native_copy_is_stream_copied_and_says_keyframe_accurate(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    pkg = run_export(
        [("lobby-1", segs(footage["audio"]))],
        job(T0 + 3.52, T0 + 23.0, request={"format": "native"}),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    clip = pkg.manifest["clips"][0]
    assert clip["file"].endswith(".mkv") and clip["watermark"] is None
    assert "keyframe-accurate" in clip["trim"]
    argv = clip["ffmpeg"]["argv"]
    assert "copy" in argv and "-filter_complex" not in argv
    info = ffprobe(pkg.path / clip["file"])
    # keyframes every second in the source: at most one GOP more than asked for
    assert 19.48 - FRAME <= float(info["format"]["duration"]) <= 19.48 + 1.0 + FRAME
    assert verify_package(pkg.path).ok
    # and the record says exactly where it starts: the keyframe at or before 'from', which is
    # what the clip's length shows too (asked 3.52 s in, keyframes each second: 3.0 s in)
    early = clip["native_start_early_seconds"]
    assert early == pytest.approx(0.52, abs=FRAME)
    assert clip["native_start"] == local_text(T0 + 3.52 - early, SH)
    assert float(info["format"]["duration"]) == pytest.approx(19.48 + early, abs=2 * FRAME)


def _left_behind(dest: Path, private: Path) -> list[str]:
    return sorted(os.listdir(dest)) + sorted(os.listdir(private))


@pytest.mark.integration
@pytest.mark.slow
def test_killed_ffmpeg_leaves_nothing(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, private_tmp: Path
) -> None:
    dest = dest_dir(tmp_path)
    seen: list[float] = []

    def kill_ffmpeg(fraction: float) -> None:
        seen.append(fraction)
        if 0 < fraction < 1:
            for child in psutil.Process().children(recursive=True):
                if child.name() == "ffmpeg":
                    child.kill()

    with pytest.raises(RuntimeFailure, match="killed by signal SIGKILL"):
        run_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 1, T0 + 29, preset="veryslow"),
            dest,
            key,
            audit_head=(1, "h"),
            progress=kill_ffmpeg,
        )
    assert seen, "progress was never reported"
    assert _left_behind(dest.path, private_tmp) == []


@pytest.mark.integration
@pytest.mark.slow
def test_timeout_leaves_nothing(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, private_tmp: Path
) -> None:
    dest = dest_dir(tmp_path)
    with pytest.raises(RuntimeFailure, match="did not finish within 0.3 s"):
        run_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 1, T0 + 29, preset="veryslow", timeout=0.3),
            dest,
            key,
            audit_head=(1, "h"),
        )
    assert _left_behind(dest.path, private_tmp) == []
    assert not [p for p in psutil.Process().children(recursive=True) if p.name() == "ffmpeg"]


@pytest.mark.integration
def test_exception_in_progress_callback_leaves_nothing(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, private_tmp: Path
) -> None:
    dest = dest_dir(tmp_path)

    def cancel(fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 1, T0 + 9),
            dest,
            key,
            audit_head=(1, "h"),
            progress=cancel,
        )
    assert _left_behind(dest.path, private_tmp) == []


class RefusingMedium:
    def __init__(self, path: Path) -> None:
        self.path = path

    def check_before_write(self, bytes_needed: int) -> None:
        raise PolicyRefused(f"medium at {self.path} was not scanned; needs {bytes_needed} bytes")

    def describe(self) -> dict[str, Any]:
        return {"kind": "usb"}


@pytest.mark.integration
@pytest.mark.parametrize(
    "make_dest, error, match",
    [
        (lambda p: RefusingMedium(p), PolicyRefused, "was not scanned"),
        (lambda p: DirectoryDestination(p, reserve=1 << 60), PolicyRefused, "MiB free"),
    ],
)
def test_refused_destination_gets_nothing(
    footage: dict[str, list[Path]],
    tmp_path: Path,
    key: Any,
    make_dest: Callable[[Path], Any],
    error: type[Exception],
    match: str,
) -> None:
    d = tmp_path / "usb"
    d.mkdir()
    with pytest.raises(error, match=match):
        run_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 1, T0 + 9),
            make_dest(d),
            key,
            audit_head=(1, "h"),
        )
    assert os.listdir(d) == []


@pytest.mark.integration
def test_no_footage_in_range_is_invalid_input(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    dest = dest_dir(tmp_path)
    with pytest.raises(InvalidInput, match="camera lobby-1: no footage between"):
        run_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 100, T0 + 200),
            dest,
            key,
            audit_head=(1, "h"),
        )
    assert os.listdir(dest.path) == []


@pytest.mark.integration
def test_two_cameras_one_package_and_progress_reaches_one(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    fractions: list[float] = []
    pkg = run_export(
        [("lobby-1", segs(footage["audio"])), ("gate-2", segs(footage["silent"]))],
        job(T0 + 2, T0 + 8),
        dest_dir(tmp_path),
        key,
        audit_head=(9, "abc"),
        progress=fractions.append,
    )
    assert pkg.manifest["cameras"] == ["lobby-1", "gate-2"]
    assert sorted(f for f in pkg.files if f.endswith(".mp4")) == [
        "gate-2_20251120T085322+0800_20251120T085328+0800.mp4",
        "lobby-1_20251120T085322+0800_20251120T085328+0800.mp4",
    ]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert pkg.path.is_absolute() and pkg.path.name.startswith("NVRG-42-")
    assert pkg.manifest["audit_head"] == {"seq": 9, "hash": "abc"}
    assert verify_package(pkg.path).ok


def test_replace_keeps_job_frozen() -> None:
    j = job(T0, T0 + 1)
    assert replace(j, crf=30).crf == 30 and j.crf == 23


@pytest.fixture(autouse=True)
def _no_stray_ffmpeg() -> Iterator[None]:
    yield
    assert not [p for p in psutil.Process().children(recursive=True) if p.name() == "ffmpeg"]


@pytest.mark.parametrize(
    "spec, expect",
    [
        (None, FONT),  # the installed CJK font is found without configuration
        ("WenQuanYi Zen Hei", FONT),  # a fontconfig family
        (str(FONT), FONT),  # a file
    ],
)
def test_resolve_font(spec: str | None, expect: Path) -> None:
    assert resolve_font(spec) == expect


@pytest.mark.parametrize(
    "spec, match",
    [
        ("DejaVu Sans", "covers Chinese"),  # installed, but draws Chinese as boxes
        ("/no/such/font.ttf", "does not exist"),
    ],
)
def test_resolve_font_refuses(spec: str, match: str) -> None:
    with pytest.raises(RuntimeFailure, match=match):
        resolve_font(spec)


@pytest.mark.parametrize("name", ["seg\nfile '/etc/passwd'.mp4", "relative.mp4"])
def test_source_names_that_could_rewrite_the_concat_list_are_refused(
    tmp_path: Path, key: Any, name: str
) -> None:
    path = Path(name) if name == "relative.mp4" else tmp_path / name
    dest = dest_dir(tmp_path)
    with pytest.raises(InvalidInput, match="absolute and free of line breaks"):
        run_export(
            [("lobby-1", [SourceSegment(path, T0)])],
            job(T0, T0 + 1),
            dest,
            key,
            audit_head=(1, "h"),
        )
    assert os.listdir(dest.path) == []


def test_user_text_cannot_alter_the_command(tmp_path: Path) -> None:
    """The argv is the same whatever the watermark says: only the text file's content differs."""
    plan = plan_clip([P(0), P(10)], 3.5, 13.0, FRAME)

    def build(text: str) -> Command:
        return build_encode(
            plan, tmp_path, tmp_path / "out.mp4", watermark=text, tz=SH, font=FONT,
            crf=23, preset="veryfast", audio=True, height=H,
        )  # fmt: skip

    benign, hostile = build("NVRG 42 alice"), build(HOSTILE)
    assert hostile.argv == benign.argv
    changed = {k for k in benign.files if benign.files[k] != hostile.files[k]}
    assert changed == {str(tmp_path / "watermark.txt")}
    assert hostile.files[str(tmp_path / "watermark.txt")] == HOSTILE.encode()


@pytest.mark.integration
def test_frames_after_joins_are_at_their_recorded_time(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    """The source files' containers run a few ms past their video (audio is longer); the clip
    must still follow the recorded timeline, or frames and the burned-in clock drift at every
    join. Six 10-s files (the three test files twice): output frame 1350 (t = 54 s) is recorded
    at T0 + 57.52, frame 188 of the sixth file."""
    files = footage["audio"] * 2
    pkg = run_export(
        [("lobby-1", segs(files))], job(T0 + 3.52, T0 + 58.0), dest_dir(tmp_path), key,
        audit_head=(1, "h"),
    )  # fmt: skip
    clip = pkg.path / pkg.manifest["clips"][0]["file"]
    out = gray_frame(["-i", str(clip)], "", 1350)
    sixth = files[5]
    diffs = {n: region_diff(out, gray_frame(["-i", str(sixth)], "", n), 60, 60, 300, 200)
             for n in (186, 187, 188, 189, 190)}  # fmt: skip
    assert min(diffs, key=lambda n: diffs[n]) == 188, diffs
    assert diffs[188] < 6


@pytest.mark.integration
def test_a_planted_package_name_gets_a_random_suffix_not_a_refusal(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    """On a shared target, `NVRG-<request>-<stamp>` is predictable: a user who plants it (here
    a directory and a file, for every second around the export) must not block the export,
    and what they planted is left alone."""
    dest = dest_dir(tmp_path)
    when = T0 + 3600
    planted = f"NVRG-42-{utc_stamp(when)}"
    (dest.path / planted).mkdir()
    (dest.path / planted / "mine.txt").write_text("x")
    pkg = run_export(
        [("lobby-1", segs(footage["audio"]))],
        job(T0 + 2, T0 + 4),
        dest,
        key,
        audit_head=(9, "abc"),
        clock=lambda: when,
    )
    assert re.fullmatch(re.escape(planted) + r"-[0-9a-f]{4}", pkg.path.name), pkg.path.name
    assert pkg.manifest["package"] == pkg.path.name  # signed under its real name
    assert verify_package(pkg.path).ok
    assert (dest.path / planted / "mine.txt").read_text() == "x"


def test_the_commit_never_replaces_an_entry(tmp_path: Path) -> None:
    """The final rename is RENAME_NOREPLACE: an empty directory someone made under the
    package's name in the moment before the rename is not replaced."""
    from nvr_guard.export.writer import _rename_noreplace

    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "clip.mp4").write_bytes(b"ours")
    (tmp_path / "NVRG-1-x").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            _rename_noreplace(fd, ".tmp", "NVRG-1-x")
        _rename_noreplace(fd, ".tmp", "NVRG-1-y")
    finally:
        os.close(fd)
    assert os.listdir(tmp_path / "NVRG-1-x") == []
    assert (tmp_path / "NVRG-1-y" / "clip.mp4").read_bytes() == b"ours"
