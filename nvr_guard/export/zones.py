"""Privacy zones: parts of a camera's picture that every watermarked export and view fills in.

A zone is given in relative coordinates (0..1 of the frame's width and height), so it covers the
same part of the picture whatever resolution the camera records at, before or after a change: a
rectangle ``[x, y, w, h]`` (a neighbour's window, a cash-counting desk) or a polygon of three or
more ``[x, y]`` points (a door seen at an angle). The admin sets zones per camera
(``cameras.<id>.privacy_zones``); an approver may add zones for one request (``request approve
--mask``). Pure code: pixel rectangles and polygon masks are computed here for a given frame
size; ``ffmpeg.build_encode`` draws them.

Rounding always covers more, never less: a zone's pixel box is widened outwards to even
coordinates (4:2:0 chroma), and a polygon's mask takes every pixel the polygon touches.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nvr_guard.errors import InvalidInput

MAX_ZONES = 32  # per camera and per approval: more is a mistake, and each costs a filter


@dataclass(frozen=True)
class Zone:
    """One zone. ``rect`` (x, y, w, h) or ``polygon`` (points), relative to the frame;
    ``source``: where it comes from ("camera" or "approval by <user>"), for the record."""

    rect: tuple[float, float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] = ()
    name: str = ""
    source: str = "camera"

    def json(self) -> dict[str, Any]:
        """The zone as the manifest, the record and ``request show`` list it."""
        out: dict[str, Any] = {}
        if self.rect is not None:
            out["rect"] = [_r(v) for v in self.rect]
        else:
            out["polygon"] = [[_r(x), _r(y)] for x, y in self.polygon]
        if self.name:
            out["name"] = self.name
        out["source"] = self.source
        return out

    def text(self) -> str:
        """Short human form for the paper record: ``x,y,w,h`` or ``polygon x,y x,y ...``."""
        if self.rect is not None:
            body = ",".join(f"{_r(v):g}" for v in self.rect)
        else:
            body = "polygon " + " ".join(f"{_r(x):g},{_r(y):g}" for x, y in self.polygon)
        return f"{self.name + ': ' if self.name else ''}{body} ({self.source})"

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The pixel box (x, y, w, h) that covers the zone on a ``width`` x ``height`` frame,
        widened outwards to even coordinates and clipped to the frame."""
        if self.rect is not None:
            x, y, w, h = self.rect
            xs, ys = (x, x + w), (y, y + h)
        else:
            xs = (min(p[0] for p in self.polygon), max(p[0] for p in self.polygon))
            ys = (min(p[1] for p in self.polygon), max(p[1] for p in self.polygon))
        x0 = max(0, math.floor(xs[0] * width) // 2 * 2)
        y0 = max(0, math.floor(ys[0] * height) // 2 * 2)
        x1 = min(width, -(-math.ceil(xs[1] * width) // 2) * 2)
        y1 = min(height, -(-math.ceil(ys[1] * height) // 2) * 2)
        return x0, y0, max(0, x1 - x0), max(0, y1 - y0)

    def mask_png(self, width: int, height: int) -> tuple[int, int, bytes]:
        """For a polygon: its pixel box's (x, y) and an RGBA PNG of the box, opaque black on
        every pixel the polygon touches and transparent elsewhere (overlaid on the frame)."""
        x0, y0, w, h = self.box(width, height)
        pts = [(px * width - x0, py * height - y0) for px, py in self.polygon]
        rows = []
        for j in range(h):
            inside = bytearray(w)
            # a pixel row is covered where the polygon crosses any of its height: the spans of
            # the row's top, middle and bottom lines, each widened by a pixel
            for yy in (j + 0.001, j + 0.5, j + 0.999):
                for a, b in _spans(pts, yy):
                    lo, hi = max(0, math.floor(a) - 1), min(w, math.ceil(b) + 1)
                    inside[lo:hi] = b"\x01" * max(0, hi - lo)
            row = bytearray(b"\x00")  # PNG filter: none
            for v in inside:
                row += b"\x00\x00\x00\xff" if v else b"\x00\x00\x00\x00"
            rows.append(bytes(row))
        return x0, y0, _png(w, h, b"".join(rows))


def _r(v: float) -> float:
    return round(v, 6)


def _spans(pts: Sequence[tuple[float, float]], y: float) -> list[tuple[float, float]]:
    """The spans of the horizontal line at ``y`` inside the polygon, by the non-zero winding
    rule: a self-intersecting outline (a star drawn in one stroke) or points listed twice cover
    everything they enclose, never leaving a hole that even-odd filling would leave."""
    crossings: list[tuple[float, int]] = []
    n = len(pts)
    for i in range(n):
        (ax, ay), (bx, by) = pts[i], pts[(i + 1) % n]
        if ay <= y < by:
            crossings.append((ax + (y - ay) * (bx - ax) / (by - ay), 1))
        elif by <= y < ay:
            crossings.append((ax + (y - ay) * (bx - ax) / (by - ay), -1))
    crossings.sort()
    spans: list[tuple[float, float]] = []
    winding = 0
    start = 0.0
    for x, d in crossings:
        before = winding
        winding += d
        if before == 0 and winding != 0:
            start = x
        elif before != 0 and winding == 0:
            spans.append((start, x))
    return spans


def _png(width: int, height: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


# ---- parsing ------------------------------------------------------------------------------------
def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise InvalidInput(f"{where}: {v!r} is not a number")
    try:
        f = float(v)
    except ValueError:
        raise InvalidInput(f"{where}: {v!r} is not a number") from None
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise InvalidInput(
            f"{where}: {v!r} is outside 0..1 (zones are fractions of the frame's width and "
            "height, e.g. 0.25)"
        )
    return f


def zone_from(value: Any, where: str, source: str = "camera") -> Zone:
    """One zone from config or JSON: ``[x, y, w, h]``, ``[[x, y], [x, y], [x, y], ...]`` or a
    mapping ``{rect: [...]}`` / ``{polygon: [...]}`` with an optional ``name``."""
    name = ""
    if isinstance(value, Mapping):
        unknown = set(value) - {"rect", "polygon", "name", "source"}
        if unknown:
            raise InvalidInput(
                f"{where}: unknown key {sorted(unknown)[0]!r}; a zone has rect or polygon, "
                "and a name"
            )
        name = str(value.get("name") or "")
        source = str(value.get("source") or source)
        if ("rect" in value) == ("polygon" in value):
            raise InvalidInput(f"{where}: give either rect: [x, y, w, h] or polygon: [[x, y], ...]")
        value = value["rect"] if "rect" in value else value["polygon"]
    if not isinstance(value, list | tuple) or not value:
        raise InvalidInput(
            f"{where}: a zone is [x, y, w, h] or a polygon [[x, y], [x, y], [x, y], ...]"
        )
    if all(not isinstance(v, list | tuple) for v in value):
        if len(value) != 4:
            raise InvalidInput(
                f"{where}: a rectangle is [x, y, w, h] (4 numbers, got {len(value)})"
            )
        x, y, w, h = (_number(v, where) for v in value)
        if w <= 0 or h <= 0:
            raise InvalidInput(f"{where}: the zone's width and height must be above 0")
        if x + w > 1.0 + 1e-9 or y + h > 1.0 + 1e-9:
            raise InvalidInput(
                f"{where}: the zone reaches past the frame (x + w and y + h must be at most 1)"
            )
        return Zone(rect=(x, y, w, h), name=name, source=source)
    points: list[tuple[float, float]] = []
    for p in value:
        if not isinstance(p, list | tuple) or len(p) != 2:
            raise InvalidInput(f"{where}: a polygon's points are [x, y] pairs")
        points.append((_number(p[0], where), _number(p[1], where)))
    if len(points) < 3:
        raise InvalidInput(f"{where}: a polygon needs at least 3 points")
    area = sum(
        a[0] * b[1] - b[0] * a[1] for a, b in zip(points, points[1:] + points[:1], strict=True)
    )
    if abs(area) < 1e-9:
        raise InvalidInput(f"{where}: the polygon has no area (its points lie on a line)")
    return Zone(polygon=tuple(points), name=name, source=source)


def zones_from(values: Iterable[Any], where: str, source: str = "camera") -> list[Zone]:
    """A list of zones (see :func:`zone_from`), at most MAX_ZONES."""
    out = [zone_from(v, f"{where}[{i}]", source) for i, v in enumerate(values)]
    if len(out) > MAX_ZONES:
        raise InvalidInput(f"{where}: {len(out)} zones; at most {MAX_ZONES}")
    return out


def parse_mask(text: str, cameras: Sequence[str], source: str) -> dict[str, list[Zone]]:
    """``--mask "x,y,w,h[;...]"`` of an approval: rectangles separated by ``;``, each for every
    camera of the request, or for one when written ``CAMERA:x,y,w,h``. Returns zones per camera
    (only cameras that got one)."""
    out: dict[str, list[Zone]] = {}
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise InvalidInput(
            "--mask is empty; write x,y,w,h (fractions of the frame), e.g. 0,0,0.3,0.2"
        )
    for i, part in enumerate(parts):
        where = f"--mask zone {i + 1} ({part!r})"
        cams: Sequence[str] = cameras
        if ":" in part:
            cam, _, part = part.partition(":")
            cam = cam.strip()
            if cam not in cameras:
                raise InvalidInput(
                    f"{where}: camera {cam!r} is not one of the request's ({', '.join(cameras)})"
                )
            cams = [cam]
        nums = [n.strip() for n in part.split(",")]
        zone = zone_from(nums, where, source)
        for cam in cams:
            out.setdefault(cam, []).append(zone)
    if any(len(z) > MAX_ZONES for z in out.values()):
        raise InvalidInput(f"--mask: at most {MAX_ZONES} zones per camera")
    return out
