"""Privacy zones, checked on the frames: inside a zone the detail of a high-contrast test pattern
is gone on every sampled frame, outside it the picture equals an unmasked export's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.export import run_export, verify_package
from nvr_guard.export.zones import Zone, parse_mask, zones_from
from tests.fixtures.footage import segments
from tests.integration.test_export import FPS, T0, dest_dir, job, key, segs

__all__ = ["key"]

SAMPLE_EVERY = 10  # frames


def gray_frames(clip: Path) -> tuple[int, int, list[bytes]]:
    """Every SAMPLE_EVERY-th frame of ``clip`` as 8-bit gray pixels, with the frame size."""
    size = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=width,height", "-of", "csv=p=0", str(clip)],
        check=True, capture_output=True, text=True,
    ).stdout.strip().split(",")  # fmt: skip
    w, h = int(size[0]), int(size[1])
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(clip), "-vf",
         f"select=not(mod(n\\,{SAMPLE_EVERY}))", "-fps_mode", "passthrough",
         "-f", "rawvideo", "-pix_fmt", "gray", "-"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    n = w * h
    return w, h, [raw[i : i + n] for i in range(0, len(raw), n)]


def region(frame: bytes, w: int, box: tuple[int, int, int, int]) -> list[int]:
    x0, y0, x1, y1 = box
    return [frame[y * w + x] for y in range(y0, y1) for x in range(x0, x1)]


def variance(values: list[int]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def rel_box(w: int, h: int, x: float, y: float, bw: float, bh: float, inset: int = 2) -> Any:
    """A pixel box a little inside the relative box (its edge is rounded outwards)."""
    return (
        int(x * w) + inset,
        int(y * h) + inset,
        int((x + bw) * w) - inset,
        int((y + bh) * h) - inset,
    )


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return segments(tmp_path_factory.mktemp("checker"), count=2, seconds=4, checker=True)


ZONES = zones_from(
    [
        [0.6, 0.4, 0.3, 0.25],  # a rectangle (a neighbour's window)
        {"polygon": [[0.1, 0.45], [0.4, 0.45], [0.25, 0.8]], "name": "door"},  # a triangle
    ],
    "cameras.lobby-1.privacy_zones",
)


def test_inside_a_zone_the_detail_is_gone_on_every_frame_and_outside_it_is_unchanged(
    checker: list[Path], tmp_path: Path, key: Any
) -> None:
    start, end = T0 + 1.0, T0 + 7.0
    plain = run_export(
        [("lobby-1", segs(checker, [T0, T0 + 4]))], job(start, end), dest_dir(tmp_path), key,
        audit_head=(1, "h"),
    )  # fmt: skip
    masked = run_export(
        [("lobby-1", segs(checker, [T0, T0 + 4]))],
        job(start, end, zones={"lobby-1": ZONES}),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    w, h, pf = gray_frames(plain.path / plain.manifest["clips"][0]["file"])
    _, _, mf = gray_frames(masked.path / masked.manifest["clips"][0]["file"])
    assert len(pf) == len(mf) >= round((end - start) * FPS / SAMPLE_EVERY) - 1
    rect = rel_box(w, h, 0.6, 0.4, 0.3, 0.25)
    # inside the triangle: a box around its centroid that lies wholly inside it
    tri = rel_box(w, h, 0.2, 0.52, 0.1, 0.1, inset=0)
    outside = rel_box(w, h, 0.45, 0.68, 0.5, 0.12)  # clear of the zones, watermark and clock
    for n, (p, m) in enumerate(zip(pf, mf, strict=True)):
        for box in (rect, tri):
            assert variance(region(p, w, box)) > 2000, f"frame {n}: the pattern is not there"
            assert variance(region(m, w, box)) < 10, f"frame {n}: detail left in zone {box}"
        a, b = region(p, w, outside), region(m, w, outside)
        assert sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a) < 3, f"frame {n}"
    # the manifest and the record list the zones applied; the package verifies
    clip = masked.manifest["clips"][0]
    assert clip["privacy_zones"] == [z.json() for z in ZONES]
    assert clip["masking"] == "2 privacy zone(s) filled in"
    assert masked.manifest["privacy_zones"] == {"lobby-1": clip["privacy_zones"]}
    record = (masked.path / "approval-record.html").read_text()
    assert "privacy masking" in record and "door: polygon" in record
    assert plain.manifest["clips"][0]["privacy_zones"] == []
    assert verify_package(masked.path).ok


def test_a_zone_covers_the_same_part_of_the_picture_across_a_resolution_change(
    tmp_path: Path, key: Any
) -> None:
    a = segments(tmp_path / "a", count=1, seconds=3, size="320x240", checker=True, name="a%03d")
    b = segments(tmp_path / "b", count=1, seconds=3, size="640x480", checker=True, name="b%03d")
    zone = zones_from([[0.25, 0.25, 0.5, 0.5]], "zones")
    pkg = run_export(
        [("lobby-1", segs([a[0], b[0]], [T0, T0 + 3]))],
        job(T0, T0 + 6, zones={"lobby-1": zone}),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    clip = pkg.manifest["clips"][0]
    assert clip["video"]["scaled"] is True
    w, h, frames = gray_frames(pkg.path / clip["file"])
    assert (w, h) == (640, 480)
    inside = rel_box(w, h, 0.25, 0.25, 0.5, 0.5, inset=6)
    edge_free = rel_box(w, h, 0.0, 0.8, 1.0, 0.1)  # below the zone, above the clock
    for n, f in enumerate(frames):
        assert variance(region(f, w, inside)) < 10, f"frame {n}"
        assert variance(region(f, w, edge_free)) > 1000, f"frame {n}"


def test_a_native_copy_is_not_masked_and_says_so(checker: list[Path], tmp_path: Path, key: Any):
    pkg = run_export(
        [("lobby-1", segs(checker, [T0, T0 + 4]))],
        job(T0, T0 + 4, zones={"lobby-1": ZONES}, request={"format": "native"}),
        dest_dir(tmp_path),
        key,
        audit_head=(1, "h"),
    )
    clip = pkg.manifest["clips"][0]
    assert clip["masking"].startswith("unmasked native copy")
    assert clip["privacy_zones"] == [z.json() for z in ZONES]
    assert "unmasked native copy" in (pkg.path / "approval-record.html").read_text()


# ---- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, error",
    [
        ([0.5, 0.5, 0.6, 0.1], "reaches past the frame"),
        ([0.1, 0.1, 0, 0.2], "above 0"),
        ([0.1, 0.1, 0.2], "4 numbers"),
        ([[0, 0], [1, 1]], "at least 3 points"),
        ([[0, 0], [0.5, 0.5], [1, 1]], "no area"),
        ([1.5, 0, 0.1, 0.1], "outside 0..1"),
        (["x", 0, 0.1, 0.1], "not a number"),
        ({"rect": [0, 0, 0.1, 0.1], "polygon": [[0, 0]]}, "either rect"),
        ({"rect": [0, 0, 0.1, 0.1], "colour": "red"}, "unknown key"),
        ("0,0,1,1", "a zone is"),
    ],
)
def test_a_bad_zone_is_refused_with_what_is_wrong(value: Any, error: str) -> None:
    from nvr_guard.errors import InvalidInput

    with pytest.raises(InvalidInput, match=error):
        zones_from([value], "cameras.c1.privacy_zones")


def test_a_mask_names_its_cameras_or_applies_to_all() -> None:
    got = parse_mask("0,0,0.5,0.5; c2:0.5,0.5,0.25,0.25", ["c1", "c2"], "approval by bob")
    assert [z.rect for z in got["c1"]] == [(0.0, 0.0, 0.5, 0.5)]
    assert [z.rect for z in got["c2"]] == [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 0.25, 0.25)]
    assert got["c2"][1].source == "approval by bob"
    from nvr_guard.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not one of the request's"):
        parse_mask("c9:0,0,0.1,0.1", ["c1"], "x")
    with pytest.raises(InvalidInput, match="empty"):
        parse_mask(" ; ", ["c1"], "x")


def test_pixel_boxes_cover_the_zone_rounded_outwards() -> None:
    z = Zone(rect=(0.1, 0.1, 0.2, 0.2))
    assert z.box(333, 201) == (32, 20, 68, 42)  # 33.3 -> 32, 99.9 -> 100; 20.1 -> 20, 60.3 -> 62
    x, y, w, h = z.box(333, 201)
    assert x <= 0.1 * 333 and x + w >= 0.3 * 333 and y <= 0.1 * 201 and y + h >= 0.3 * 201


def test_a_viewing_clip_and_preview_frames_are_masked_per_camera(
    checker: list[Path], tmp_path: Path
) -> None:
    from nvr_guard.export import resolve_font
    from nvr_guard.export.view import encode_view, plan_view, stills
    from tests.integration.test_export import FONT, SH

    clips = [("c1", segs(checker, [T0, T0 + 4])), ("c2", segs(checker, [T0, T0 + 4]))]
    vp = plan_view(clips, T0 + 1, T0 + 3)
    zone = zones_from([[0.6, 0.4, 0.3, 0.25]], "z")
    out = tmp_path / "view.mp4"
    work = tmp_path / "work"
    work.mkdir()
    encode_view(vp, work, out, watermark="v", tz=SH, font=FONT, timeout=120, zones={"c1": zone})
    w, h, frames = gray_frames(out)
    box = rel_box(w, h, 0.6, 0.4, 0.3, 0.25)
    half = len(frames) // 2
    # the first half plays c1 (masked), the second c2 (no zones)
    assert all(variance(region(f, w, box)) < 10 for f in frames[: half - 1])
    assert all(variance(region(f, w, box)) > 2000 for f in frames[half + 1 :])
    # the approver's preview frames: masked the same way
    shots = stills(
        "c1", clips[0][1], T0 + 1, T0 + 3, watermark="p", font=resolve_font(None),
        workdir=work, zones=zone,
    )  # fmt: skip
    for s in shots:
        img = tmp_path / "still.jpg"
        img.write_bytes(s.jpeg)
        pw, ph, [frame] = gray_frames(img)
        assert variance(region(frame, pw, rel_box(pw, ph, 0.6, 0.4, 0.3, 0.25))) < 30
    plain = stills(
        "c2", clips[1][1], T0 + 1, T0 + 3, watermark="p", font=resolve_font(None), workdir=work
    )
    img = tmp_path / "plain.jpg"
    img.write_bytes(plain[0].jpeg)
    pw, ph, [frame] = gray_frames(img)
    assert variance(region(frame, pw, rel_box(pw, ph, 0.6, 0.4, 0.3, 0.25))) > 1000


def test_the_printed_record_of_a_native_request_says_its_zones_are_not_applied() -> None:
    from nvr_guard.export import approval_record_html

    zones = {"lobby-1": [z.json() for z in ZONES]}
    native = approval_record_html(
        {"id": 3, "format": "native", "privacy_zones": zones}, [], None, signer="SHA256:x"
    )
    assert "unmasked native copy: these zones are NOT applied" in native
    assert "door: polygon" in native
    mp4 = approval_record_html(
        {"id": 3, "format": "mp4", "privacy_zones": zones}, [], None, signer="SHA256:x"
    )
    assert "unmasked" not in mp4 and "0.6,0.4,0.3,0.25" in mp4


@pytest.mark.parametrize(
    "points",
    [
        # a star drawn in one stroke: its outline crosses itself around the centre
        [[0.5, 0.05], [0.68, 0.6], [0.2, 0.25], [0.8, 0.25], [0.32, 0.6]],
        # a square with its corners listed twice (copied and pasted)
        [[0.3, 0.3], [0.7, 0.3], [0.7, 0.7], [0.3, 0.7]] * 2,
    ],
)
def test_a_self_crossing_or_doubled_polygon_covers_all_it_encloses(points: list[Any]) -> None:
    import struct
    import zlib

    zone = zones_from([{"polygon": points}], "z")[0]
    w, h = 200, 200
    x0, y0, png = zone.mask_png(w, h)
    # decode our own PNG (8-bit RGBA, filter 0 per row): is the pixel at the centre opaque?
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    bw, bh = struct.unpack(">II", png[16:24])
    idat = png.index(b"IDAT")
    size = struct.unpack(">I", png[idat - 4 : idat])[0]
    raw = zlib.decompress(png[idat + 4 : idat + 4 + size])
    cx, cy = 100 - x0, (0.35 if len(points) == 5 else 0.5) * h - y0
    row = int(cy) * (1 + 4 * bw)
    alpha = raw[row + 1 + 4 * int(cx) + 3]
    assert alpha == 255, "the middle of the polygon is left visible"
