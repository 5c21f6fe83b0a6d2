"""Export engine benchmark: nvr-guard's export against the same ffmpeg command run directly.

    python bench/export.py [--dir /tmp/nvrg-bench-export] [--runs 2] [--preset veryfast] [--quick]
                           [--case minute|frigate]

Generates (or reuses) a 10-minute 720p25 recording (testsrc2 with temporal noise, so the encoder
has real work, plus a sine audio track) cut into 1-minute segments with recorded start times, then
exports 7 minutes starting mid-segment (``--quick``: 3 minutes of source, 84 s exported).
``--case frigate``: the same footage cut as Frigate records it, 10-second segments in its tree
(``<day>/<hour>/<camera>/<MM>.<SS>.mp4``, UTC), 44 files of which the 7-minute export reads 43
(``--quick``: 9 files, 84 s). Both cases time:

- nvr-guard: ``run_export`` end to end — probe and hash the sources, encode with the watermark,
  write manifest/signature/record, fsync, read back and hash, rename;
- baseline: the exact ffmpeg argv that nvr-guard ran (taken from the package manifest, with the
  same list and text files recreated at the same paths), started directly with no progress
  reading, to a file in the same directory.

The runs alternate (ours, baseline, ours, baseline …) and the best of each side is compared: other
work on the machine only ever adds time. Goal: ours <= 1.10 x baseline. Also printed: the
realtime factor (seconds of footage per second of wall time) and the output duration and frame
count against the request (goal: within one frame). Exit status is 0 unless the benchmark itself
crashes: the PASS/FAIL column is information, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from nvr_guard.export import (
    DirectoryDestination,
    ExportJob,
    SourceSegment,
    load_or_create_key,
    run_export,
    verify_package,
)
from nvr_guard.export import ffmpeg as ff

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
TZ = ZoneInfo("Asia/Shanghai")
T0 = 1763600000.0  # recorded start of the first segment (2025-11-20 08:53:20 +08:00)
FPS = 25
TEMPLATE = (
    "NVRG {request} | {camera} | 申请 {requester} | 审批 {approvers} | 导出 {technician} {exported}"
)


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (ffmpeg, ffprobe, openssl)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def make_source(where: Path, minutes: float, seconds: int = 60) -> list[Path]:
    """``minutes`` of 720p footage in ``seconds``-long segments; reused when already there."""
    done = where / f".complete-{minutes}-{seconds}"
    if done.exists():
        return sorted(where.glob("seg*.mp4"))
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    t = time.perf_counter()
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-nostdin",
            "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate={FPS}",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-vf", "noise=alls=20:allf=t",
            "-t", str(round(minutes * 60)),
            "-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * FPS), "-b:v", "4M",
            "-c:a", "aac",
            "-f", "segment", "-segment_time", str(seconds), "-reset_timestamps", "1",
            str(where / "seg%03d.mp4"),
        ],
        check=True,
    )  # fmt: skip
    done.touch()
    print(f"generated {minutes} min of 720p source in {time.perf_counter() - t:.1f} s")
    return sorted(where.glob("seg*.mp4"))


def frigate_tree(flat: list[Path], root: Path, camera: str, t0: float) -> list[SourceSegment]:
    """Hard links of the 10-second segments under Frigate's names (recordings/<YYYY-MM-DD>/<HH>/
    <camera>/<MM>.<SS>.mp4, UTC), each with its recorded start."""
    out = []
    for i, p in enumerate(flat):
        t = t0 + 10 * i
        rel = time.strftime(f"%Y-%m-%d/%H/{camera}/%M.%S.mp4", time.gmtime(t))
        dst = root / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dst)
        out.append(SourceSegment(dst, t))
    return out


def probe_output(path: Path) -> tuple[float, int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
         "stream=nb_read_packets:format=duration", "-of", "json", str(path)],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    info = json.loads(out)
    return float(info["format"]["duration"]), int(info["streams"][0]["nb_read_packets"])


# wall seconds spent inside ffmpeg during the last run_ours: the rest of its time is nvr-guard's
# own work (probing, hashing, writing, reading back), measured in the same run, so other load on
# the machine changes it far less than it changes a comparison of two separate runs
INSIDE_FFMPEG: list[float] = []


def _timed_run_ffmpeg(*args: Any, **kw: Any) -> None:
    t = time.perf_counter()
    try:
        _real_run_ffmpeg(*args, **kw)
    finally:
        INSIDE_FFMPEG.append(time.perf_counter() - t)


_real_run_ffmpeg = ff.run_ffmpeg
ff.run_ffmpeg = _timed_run_ffmpeg


def run_ours(
    segments: list[SourceSegment], job: ExportJob, out: Path, key: Any
) -> tuple[float, float, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    INSIDE_FFMPEG.clear()
    c, t = cpu_seconds(), time.perf_counter()
    pkg = run_export(
        [("gate-01", segments)], job, DirectoryDestination(out), key, audit_head=(1, "0" * 64),
        progress=lambda f: None,
    )  # fmt: skip
    return time.perf_counter() - t, cpu_seconds() - c, pkg


def run_baseline(clip: dict[str, Any], out: Path) -> tuple[float, float]:
    """The same argv as nvr-guard ran, with its input files recreated where the argv expects them.
    nvr-guard's ffmpeg writes through the package directory's descriptor (``/proc/self/fd/N/
    <clip>``); the baseline writes the same name into a new directory ``out`` beside the package
    (same file system)."""
    argv: list[str] = list(clip["ffmpeg"]["argv"])
    inputs: dict[str, str] = clip["ffmpeg"]["inputs"]
    workdirs = {Path(a).parent for a in argv if Path(a).name in inputs}
    for d in workdirs:
        d.mkdir(parents=True, exist_ok=True)
        for name, text in inputs.items():
            (d / name).write_bytes(text.encode())
    target = out / Path(argv[-1]).name
    argv[-1] = str(target)
    shutil.rmtree(out, ignore_errors=True)
    target.parent.mkdir(parents=True)
    # no progress reader on the baseline: drop -progress pipe:1, keep everything else
    i = argv.index("-progress")
    plain = argv[:i] + argv[i + 2 :]
    try:
        c, t = cpu_seconds(), time.perf_counter()
        subprocess.run(plain, check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t, cpu_seconds() - c
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)
        for d in workdirs:
            shutil.rmtree(d.parent if d.name.startswith("clip") else d, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nvrg-bench-export"))
    ap.add_argument("--runs", type=int, default=2, help="runs per side (alternating)")
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--crf", type=int, default=23)
    ap.add_argument("--quick", action="store_true", help="3-minute source, 84 s export")
    ap.add_argument(
        "--case",
        choices=["minute", "frigate"],
        default="minute",
        help="1-minute segments, or Frigate's 10-second ones in its tree",
    )
    args = ap.parse_args(argv)

    export_s = 84.0 if args.quick else 420.0
    if args.case == "frigate":
        count = 9 if args.quick else 44
        flat = make_source(args.dir / f"source-frigate-{count}", count / 6, seconds=10)
        segments = frigate_tree(flat, args.dir / "frigate" / "recordings", "gate-01", T0)
        start = T0 + 5.48  # mid-segment, and not on a keyframe
        shape = f"{len(flat)} x 10-s 720p25 Frigate segments"
    else:
        minutes = 3 if args.quick else 10
        src = make_source(args.dir / f"source-{minutes}min", minutes)
        segments = [SourceSegment(p, T0 + 60 * i) for i, p in enumerate(src)]
        start = T0 + 90.48  # mid-segment, and not on a keyframe
        shape = f"{len(src)} x 1-min 720p25 segments"
    end = start + export_s
    key, fp = load_or_create_key(args.dir / "state")
    job = ExportJob(
        request={"id": 1, "requester": "alice", "site": "bench", "cameras": ["gate-01"],
                 "reason": "benchmark", "basis": "none", "format": "mp4",
                 "recipient": {"unit": "lab", "person": "bench", "contact": "-"}},
        approvals=[{"approver": "bob", "role": "manager", "decision": "approve", "note": "",
                    "time": "2025-11-20T09:00:00+08:00"}],
        technician="tom", start=start, end=end, tz=TZ, watermark_template=TEMPLATE, font=FONT,
        crf=args.crf, preset=args.preset,
    )  # fmt: skip
    print(
        f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}; "
        f"{shape}; exporting {export_s:.0f} s from +{start - T0:.2f} s; "
        f"libx264 preset={args.preset} crf={args.crf}; {args.runs} run(s) per side"
    )
    ours: list[float] = []
    base: list[float] = []
    ours_cpu: list[float] = []
    base_cpu: list[float] = []
    own: list[float] = []
    pkg = None
    for r in range(args.runs):
        secs, cpu, pkg = run_ours(segments, job, args.dir / "out-ours", key)
        ours.append(secs)
        ours_cpu.append(cpu)
        inside = sum(INSIDE_FFMPEG)
        own.append(secs - inside)
        print(
            f"  run {r + 1}: nvr-guard {secs:.2f} s wall, {cpu:.2f} s CPU "
            f"({inside:.2f} s in ffmpeg, {secs - inside:.2f} s its own work)",
            flush=True,
        )
        b, bc = run_baseline(pkg.manifest["clips"][0], args.dir / "out-baseline")
        base.append(b)
        base_cpu.append(bc)
        print(f"  run {r + 1}: ffmpeg direct {b:.2f} s wall, {bc:.2f} s CPU", flush=True)
    assert pkg is not None
    clip = pkg.path / pkg.manifest["clips"][0]["file"]
    duration, frames = probe_output(clip)
    want_frames = round(export_s * FPS)
    ok_verify = verify_package(pkg.path).ok

    best_ours, best_base = min(ours), min(base)
    ratio = best_ours / best_base
    rt = export_s / best_ours
    cpu_ratio = min(ours_cpu) / min(base_cpu)
    diff_frames = abs(duration - export_s) * FPS
    verdict = "PASS" if ratio <= 1.10 else "FAIL"
    dur_ok = diff_frames <= 1 + 1e-6 and abs(frames - want_frames) <= 1
    dur_verdict = "PASS" if dur_ok else "FAIL"
    load = os.getloadavg()[0]
    print()
    print(f"package: {pkg.path} (verify: {'ok' if ok_verify else 'FAILED'}), signer {fp}")
    used = pkg.manifest["clips"][0]
    print(f"source segments read: {len(used['sources'])}, gaps: {len(used['gaps'])}")
    print(f"export wall time, nvr-guard run_export (best of {len(ours)}): {best_ours:.2f} s")
    print(
        f"export wall time, same ffmpeg argv run directly (best of {len(base)}): {best_base:.2f} s"
    )
    print(f"ratio nvr-guard / ffmpeg direct: {ratio:.3f} (goal <= 1.10) {verdict}")
    # the same ratio from within one process: ffmpeg direct stood in by ours' own ffmpeg time
    within = (min(own) + best_base) / best_base
    print(
        f"nvr-guard's own work outside ffmpeg: {min(own):.2f} s (best of {len(own)}); "
        f"added to the best direct run: {within:.3f}x"
    )
    print(
        f"CPU time nvr-guard / ffmpeg direct: {min(ours_cpu):.1f} s / {min(base_cpu):.1f} s "
        f"= {cpu_ratio:.3f} (insensitive to other load; load average now {load:.2f})"
    )
    print(f"realtime factor: {rt:.2f}x ({export_s:.0f} s of 720p footage in {best_ours:.1f} s)")
    print(
        f"output duration: {duration:.3f} s for {export_s:.3f} s requested "
        f"({diff_frames:.2f} frames off; goal <= 1) {dur_verdict}"
    )
    print(f"output frames: {frames} for {want_frames} expected ({frames - want_frames:+d})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
