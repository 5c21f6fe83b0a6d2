"""Exports of footage as recorders write it: H.265, G.711 A-law audio, Dahua .dav, 42 Frigate
10-second segments over 7 minutes, a resolution change inside the range, a last segment cut short
by a crash, a variable frame rate. Every package must pass ``nvr-guard verify``."""

from __future__ import annotations

import json
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.export import SourceSegment, run_export, verify_package
from nvr_guard.export import ffmpeg as ff
from nvr_guard.export.plan import Piece, plan_clip
from tests.fixtures.cli import run_cli
from tests.fixtures.footage import dav_segment, segments, truncate
from tests.integration.test_export import FPS, T0, dest_dir, ffprobe, job, key, segs
from tests.integration.test_workflow import Env, env, new_request, unix_users

IMPORTED_FIXTURES = (key, env, unix_users)  # found by pytest by name

pytestmark = pytest.mark.integration
FRAME = 1 / FPS


def streams(path: Path) -> dict[str, dict[str, Any]]:
    info = ffprobe(path)
    return {s["codec_type"]: s for s in info["streams"]} | {"format": info["format"]}


def verified(pkg_path: Path) -> None:
    """The package passes verification, in-process and through the command line."""
    assert verify_package(pkg_path).ok
    r = run_cli(["verify", str(pkg_path)])
    assert r.returncode == 0, r.stderr


def export(sources: list[SourceSegment], start: float, end: float, tmp_path: Path, key: Any,
           **kw: Any) -> Any:  # fmt: skip
    return run_export(
        [("lobby-1", sources)], job(start, end, **kw), dest_dir(tmp_path), key, audit_head=(1, "h")
    )


def frame_times(paths: list[Path], starts: list[float]) -> list[float]:
    """Recorded time of every video frame of the sources."""
    out: list[float] = []
    for p, s in zip(paths, starts, strict=True):
        text = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
             "packet=pts_time", "-of", "csv=p=0", str(p)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        out += [s + float(t.strip(",")) for t in text.split()]
    return sorted(out)


def test_plan_starts_a_run_at_a_change_of_shape_without_a_gap() -> None:
    # containers a few ms longer than their video (audio runs on): the next file's start rules
    sd, hd = ("h264", 320, 240), ("h264", 640, 360)
    pieces = [
        Piece(b"a", 0.0, 10.023, sd),
        Piece(b"b", 10.0, 10.023, hd),
        Piece(b"c", 20.0, 10.023, hd),
        Piece(b"d", 30.0, 10.023, sd),
    ]
    plan = plan_clip(pieces, 4.0, 36.0, FRAME)
    got = [([p.path for p in r.pieces], r.offset, round(r.duration, 6), r.recorded)
           for r in plan.runs]  # fmt: skip
    assert got == [
        ([b"a"], 4.0, 6.0, 4.0),
        ([b"b", b"c"], 0.0, 20.0, 10.0),
        ([b"d"], 0.0, 6.0, 30.0),
    ]
    assert plan.gaps == ()


# ---- codecs --------------------------------------------------------------------------------------
def test_hevc_segments_are_exported_frame_exactly(tmp_path: Path, key: Any) -> None:
    src = segments(tmp_path / "hevc", vcodec="hevc", audio="aac")
    assert ff.probe(src[0]).video_codec == "hevc"
    start, end = T0 + 3.52, T0 + 23.0
    pkg = export(segs(src), start, end, tmp_path, key)
    out = streams(pkg.path / pkg.manifest["clips"][0]["file"])
    assert out["video"]["codec_name"] == "h264" and out["audio"]["codec_name"] == "aac"
    assert abs(int(out["video"]["nb_read_frames"]) - round((end - start) * FPS)) <= 1
    clip = pkg.manifest["clips"][0]
    assert clip["video"]["source_codecs"] == ["hevc"] and clip["gaps"] == []
    verified(pkg.path)


@pytest.mark.parametrize("ext", ["mkv", "mov"])
def test_alaw_audio_is_transcoded_to_aac_and_said_so(tmp_path: Path, key: Any, ext: str) -> None:
    # ffmpeg's MP4 muxer refuses G.711; recorders that keep it write Matroska or QuickTime
    src = segments(tmp_path / ext, audio="alaw", ext=ext)
    assert ff.probe(src[0]).audio_codec == "pcm_alaw"
    start, end = T0 + 2.0, T0 + 24.0
    pkg = export(segs(src), start, end, tmp_path, key)
    out = streams(pkg.path / pkg.manifest["clips"][0]["file"])
    assert out["audio"]["codec_name"] == "aac" and int(out["audio"]["sample_rate"]) == 8000
    assert abs(float(out["audio"]["duration"]) - (end - start)) < 0.1
    assert abs(float(out["video"]["duration"]) - (end - start)) <= FRAME + 1e-6
    clip = pkg.manifest["clips"][0]
    assert clip["audio"] is True
    assert clip["audio_handling"] == "transcoded to AAC (8000 Hz) from pcm_alaw"
    assert "pcm_alaw" in (pkg.path / "approval-record.html").read_text()
    verified(pkg.path)


def test_native_copy_keeps_alaw_as_recorded(tmp_path: Path, key: Any) -> None:
    src = segments(tmp_path / "mkv", audio="alaw", ext="mkv")
    pkg = export(segs(src), T0 + 2.0, T0 + 24.0, tmp_path, key, request={"format": "native"})
    out = streams(pkg.path / pkg.manifest["clips"][0]["file"])
    assert out["audio"]["codec_name"] == "pcm_alaw" and out["video"]["codec_name"] == "h264"
    assert pkg.manifest["clips"][0]["audio_handling"] == "copied as recorded (pcm_alaw)"
    verified(pkg.path)


def test_dahua_dav_is_read_through_the_dhav_demuxer(tmp_path: Path, key: Any) -> None:
    # Dahua names: 14.03.20-14.03.30[M][0@0][0].dav (start and end, camera local)
    where = tmp_path / "2024-05-01/001/dav/14"
    where.mkdir(parents=True)
    t0 = 1714543400.0  # 2024-05-01 14:03:20 +08:00
    src = [
        dav_segment(where / f"14.03.{20 + 10 * i}-14.03.{30 + 10 * i}[M][0@0][0].dav", t0 + 10 * i)
        for i in range(3)
    ]
    p = ff.probe(src[0])
    assert (p.container, p.video_codec, p.audio_codec) == ("dhav", "h264", "pcm_alaw")
    # the demuxer's own duration counts whole seconds (9 s here); the packets say 10 s
    assert abs(p.duration - 10.0) <= FRAME
    start, end = t0 + 4.2, t0 + 27.0
    pkg = export(
        [SourceSegment(s, t0 + 10 * i) for i, s in enumerate(src)], start, end, tmp_path, key
    )
    clip = pkg.manifest["clips"][0]
    assert clip["gaps"] == []  # without the packet-based duration: a 1 s hole after each file
    assert clip["video"]["source_containers"] == ["dhav"]
    out = streams(pkg.path / clip["file"])
    assert abs(int(out["video"]["nb_read_frames"]) - round((end - start) * FPS)) <= 1
    assert out["audio"]["codec_name"] == "aac"
    assert abs(float(out["audio"]["duration"]) - (end - start)) < 0.1
    verified(pkg.path)


# ---- Frigate: 42 ten-second segments over 7 minutes ----------------------------------------------
def test_seven_minutes_of_frigate_segments(tmp_path: Path, key: Any) -> None:
    # 7 minutes from mid-segment touch 43 files: the 42 it spans and the one it starts in
    flat = segments(tmp_path / "flat", count=44, seconds=10, audio="aac")
    assert len(flat) == 44
    t0 = datetime(2024, 5, 1, 14, 3, 20, tzinfo=UTC).timestamp()
    sources = []
    for i, p in enumerate(flat):  # the preset's layout: 2024-05-01/14/front/03.20.mp4 (UTC)
        t = datetime.fromtimestamp(t0 + 10 * i, UTC)
        dst = tmp_path / "frigate/recordings" / t.strftime("%Y-%m-%d/%H/front/%M.%S.mp4")
        dst.parent.mkdir(parents=True, exist_ok=True)
        p.rename(dst)
        sources.append(SourceSegment(dst, t.timestamp()))
    start, end = t0 + 5.48, t0 + 5.48 + 7 * 60  # seven minutes from mid-segment
    pkg = export(sources, start, end, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    assert clip["gaps"] == [] and len(clip["sources"]) == 43
    out = streams(pkg.path / clip["file"])
    assert abs(int(out["video"]["nb_read_frames"]) - 420 * FPS) <= 1
    assert abs(float(out["video"]["duration"]) - 420) <= FRAME + 1e-6
    verified(pkg.path)


# ---- resolution change, damaged last segment, variable frame rate --------------------------------
def test_a_resolution_change_inside_the_range_is_scaled_to_one_size(
    tmp_path: Path, key: Any
) -> None:
    # 4:3 SD, then the camera is switched to 16:9 HD, then back
    a = segments(tmp_path / "a", count=1, size="320x240", audio="aac", name="a%03d")
    b = segments(tmp_path / "b", count=1, size="640x360", audio="aac", name="b%03d")
    c = segments(tmp_path / "c", count=1, size="320x240", audio="aac", name="c%03d")
    src = segs([a[0], b[0], c[0]])
    start, end = T0 + 4.0, T0 + 26.0
    pkg = export(src, start, end, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    assert clip["video"]["scaled"] is True and clip["video"]["size"] == "640x360"
    assert clip["video"]["source_sizes"] == ["320x240", "640x360"]
    assert clip["gaps"] == []
    out = streams(pkg.path / clip["file"])
    assert (out["video"]["width"], out["video"]["height"]) == (640, 360)
    assert abs(int(out["video"]["nb_read_frames"]) - round((end - start) * FPS)) <= 1
    assert abs(float(out["video"]["duration"]) - (end - start)) <= FRAME + 1e-6
    assert "resolution changed" in (pkg.path / "approval-record.html").read_text()
    verified(pkg.path)
    # the native copy is a stream copy: each part stays at its recorded size, and says so
    native = export(src, start, end, tmp_path, key, request={"format": "native"})
    clip = native.manifest["clips"][0]
    assert clip["video"]["scaled"] is False
    assert clip["video"]["source_sizes"] == ["320x240", "640x360"]
    sizes = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "frame=width,height", "-of", "csv=p=0",
         str(native.path / clip["file"])],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert {s.strip(",") for s in sizes} == {"320,240", "640,360"}
    verified(native.path)


def test_a_truncated_last_segment_is_named_and_the_rest_exported(tmp_path: Path, key: Any) -> None:
    src = segments(tmp_path / "crash", count=4, audio="aac")
    truncate(src[-1])  # the recorder died while writing it: an MP4 without its index
    start, end = T0 + 5.0, T0 + 40.0
    pkg = export(segs(src), start, end, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    [bad] = clip["damaged_sources"]
    assert bad["path"] == str(src[-1]) and "Invalid data" in bad["error"]
    assert bad["size"] == src[-1].stat().st_size and len(bad["sha256"]) == 64
    assert [(g["from"], g["to"]) for g in pkg.manifest["gaps"]] == [
        ("2025-11-20T08:53:50+08:00", "2025-11-20T08:54:00+08:00")
    ]
    assert pkg.manifest["gaps"][0]["damaged_sources"] == [str(src[-1])]
    assert pkg.manifest["damaged_sources"][0]["camera"] == "lobby-1"
    assert str(src[-1]) not in [s["path"] for s in clip["sources"]]
    out = streams(pkg.path / clip["file"])
    assert abs(float(out["video"]["duration"]) - 25.0) <= FRAME + 1e-6  # 5 s to 30 s
    record = (pkg.path / "approval-record.html").read_text()
    assert "damaged source" in record and str(src[-1]) in record
    verified(pkg.path)


def test_a_playlist_saved_as_a_segment_never_reads_another_file(tmp_path: Path, key: Any) -> None:
    # an insider who can write the root saved an HLS playlist under a segment's name, pointing
    # at another camera's footage: ffmpeg read it by its content, and the other camera's
    # pictures left under this camera's name, with a package verify accepted
    src = segments(tmp_path / "cam", count=3, audio="aac")
    other = segments(tmp_path / "vault", count=1, audio="aac")[0]
    src[1].write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:60\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10.0,\n{other}\n#EXT-X-ENDLIST\n"
    )
    pkg = export(segs(src), T0 + 1.0, T0 + 29.0, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    [bad] = clip["damaged_sources"]
    assert bad["path"] == str(src[1])
    assert str(other) not in json.dumps(pkg.manifest)
    assert [s["path"] for s in clip["sources"]] == [str(src[0]), str(src[2])]
    assert len(pkg.manifest["gaps"]) == 1
    verified(pkg.path)


def _faststart(path: Path) -> None:
    tmp = path.with_name("fs-" + path.name)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(path), "-c", "copy", "-movflags", "+faststart",
         str(tmp)],
        check=True,
    )  # fmt: skip
    tmp.replace(path)


def test_a_segment_swapped_for_a_concat_list_after_probing_reads_nothing_else(
    tmp_path: Path, key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the recorder's account overwrote a probed segment with a concat list naming a relative
    # path through a symlink to another camera's directory, right before ffmpeg read it: the
    # list's own whitelist (with concat) let the nested list in, and the vault's footage left
    # under this camera's label
    src = segments(tmp_path / "cam", count=3)
    vault = segments(tmp_path / "vault", count=1, size="160x120")[0]
    (src[1].parent / "lnk").symlink_to(vault.parent)
    real_run = ff.run_ffmpeg

    def swap_then_run(*a: Any, **kw: Any) -> Any:
        src[1].write_bytes(f"ffconcat version 1.0\nfile lnk/{vault.name}\n".encode())
        return real_run(*a, **kw)

    monkeypatch.setattr(ff, "run_ffmpeg", swap_then_run)
    # ffmpeg refuses the nested list (not a recorder's container): the export fails, leaving
    # nothing on the medium, and says why
    with pytest.raises(Exception) as e:
        export(segs(src), T0 + 1.0, T0 + 29.0, tmp_path, key)
    assert type(e.value).__name__ == "RuntimeFailure", e.value
    assert not any((tmp_path / "usb").iterdir())


def test_a_segment_cut_short_behind_its_index_is_named_and_the_rest_follows(
    tmp_path: Path, key: Any
) -> None:
    # an MP4 whose index (at the front) outlived its data: the clip ended inside it, the
    # segments after it were listed as sources but missing, and nothing named the loss
    src = segments(tmp_path / "cut", count=4)
    _faststart(src[1])
    truncate(src[1], 0.35)
    pkg = export(segs(src), T0 + 1.0, T0 + 39.0, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    [bad] = clip["damaged_sources"]
    assert bad["path"] == str(src[1]) and "readable" in bad["error"]
    [gap] = pkg.manifest["gaps"]
    out = streams(pkg.path / clip["file"])
    # the footage after the cut is in the clip: all but the missing part of segment 2
    assert abs(float(out["video"]["duration"]) - clip["footage_seconds"]) <= 2 * FRAME
    assert clip["footage_seconds"] < 38.0 - 5.0
    assert gap["to"] == "2025-11-20T08:53:40+08:00"  # where the next segment begins
    verified(pkg.path)


def test_a_header_claiming_more_than_its_packets_does_not_hide_a_gap(
    tmp_path: Path, key: Any
) -> None:
    # a Matroska header saying 600 s over 10 s of footage hid the deletion of what followed
    src = segments(tmp_path / "long", count=3, ext="mkv")
    data = bytearray(src[1].read_bytes())
    at = data.find(b"\x44\x89")  # the Info element's Duration, in milliseconds
    size = data[at + 2] & 0x0F
    data[at + 3 : at + 3 + size] = struct.pack(">d" if size == 8 else ">f", 600_000.0)
    src[1].write_bytes(bytes(data))
    assert ff.probe(src[1]).duration > 500
    src[2].unlink()
    pkg = export(segs(src[:2]), T0 + 1.0, T0 + 29.0, tmp_path, key)
    assert [g["to"] for g in pkg.manifest["gaps"]] == ["2025-11-20T08:53:49+08:00"]
    verified(pkg.path)


def test_a_single_frame_under_a_long_header_does_not_hide_a_gap(tmp_path: Path, key: Any) -> None:
    # one frame under a header claiming 10 minutes: fewer than two packets read as "unknown",
    # so the header's length stood and the deleted footage after it went unreported
    src = segments(tmp_path / "one", count=2, ext="mkv")
    one = segments(tmp_path / "frame", count=1, ext="mkv", seconds=1, fps=1)[0]
    data = bytearray(one.read_bytes())
    at = data.find(b"\x44\x89")
    size = data[at + 2] & 0x0F
    data[at + 3 : at + 3 + size] = struct.pack(">d" if size == 8 else ">f", 600_000.0)
    src[1].write_bytes(bytes(data))
    pkg = export(segs(src), T0 + 1.0, T0 + 19.0, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    assert [d["path"] for d in clip["damaged_sources"]] == [str(src[1])]
    assert [g["to"] for g in pkg.manifest["gaps"]] == ["2025-11-20T08:53:39+08:00"]
    verified(pkg.path)


def test_a_frame_size_beyond_any_camera_is_left_out(tmp_path: Path, key: Any) -> None:
    # one 8192x8192 file made every frame of the range be encoded at that size
    src = segments(tmp_path / "n", count=3)
    big = segments(tmp_path / "big", count=1, size="8192x8192", seconds=1, fps=1)[0]
    big.replace(src[1])
    pkg = export(segs(src), T0 + 1.0, T0 + 29.0, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    [bad] = clip["damaged_sources"]
    assert "beyond any camera" in bad["error"] and clip["video"]["size"] == "320x240"


def test_only_damaged_sources_is_a_clear_refusal(tmp_path: Path, key: Any) -> None:
    src = segments(tmp_path / "bad", count=1)
    truncate(src[0], 0.2)
    with pytest.raises(Exception, match="damaged source") as e:
        export(segs(src), T0 + 1, T0 + 5, tmp_path, key)
    assert type(e.value).__name__ == "InvalidInput"
    assert not any((tmp_path / "usb").iterdir())


def test_variable_frame_rate_keeps_every_frame_at_its_time(tmp_path: Path, key: Any) -> None:
    src = segments(tmp_path / "vfr", count=3, vfr=True, fps=30, audio="aac")
    starts = [T0 + 10 * i for i in range(3)]
    start, end = T0 + 3.0, T0 + 27.0
    want = [t for t in frame_times(src, starts) if start - 1e-6 <= t < end - 1e-6]
    pkg = export(segs(src), start, end, tmp_path, key)
    clip = pkg.manifest["clips"][0]
    assert clip["gaps"] == []
    out = streams(pkg.path / clip["file"])
    assert abs(int(out["video"]["nb_read_frames"]) - len(want)) <= 1
    assert abs(float(out["format"]["duration"]) - (end - start)) <= 0.25  # one frame at 6 fps
    verified(pkg.path)


# ---- through the daemon: the audit names the damage ----------------------------------------------
def test_daemon_export_with_a_crashed_segment_is_audited(env: Env) -> None:
    e = env
    rid = new_request(e)  # lobby-1, 5 s to 25 s of three 10-second segments
    e.ok("nvrg-bob", "request", "approve", str(rid))
    e.ok("nvrg-carol", "request", "approve", str(rid))
    last = sorted((e.site.root / "lobby-1").rglob("*.mp4"))[-1]
    truncate(last)
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    pkg = Path(res["package"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert [d["path"] for d in manifest["damaged_sources"]] == [str(last)]
    assert len(manifest["gaps"]) == 1
    done = [
        x for x in e.audit() if x["object"] == f"request:{rid}" and x["action"] == "export.done"
    ]
    assert len(done) == 1
    detail = done[0]["details"]
    assert [d["path"] for d in detail["damaged_sources"]] == [str(last)]
    assert detail["gaps"][0]["damaged_sources"] == [str(last)]
    assert run_cli(["verify", str(pkg)]).returncode == 0
