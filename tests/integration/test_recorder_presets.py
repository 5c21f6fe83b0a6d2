"""Recorder presets on real trees, through `retention run`: the scan catalogues each segment with
the end its name carries; the purge removes a motionEye movie together with its ``.thumb`` and
never touches Viseron's ``init.mp4`` while segments of the camera remain."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.fixtures.site import Site, make_config

BERLIN = ZoneInfo("Europe/Berlin")
DAY = 86400


def _file(path: Path, mtime: float, size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    os.utime(path, (mtime, mtime))
    return path


def _rows(site: Site) -> dict[str, tuple[str, str, float, float | None]]:
    conn = sqlite3.connect(f"file:{site.state / 'catalog.db'}?mode=ro", uri=True)
    try:
        cur = conn.execute('SELECT path, site, camera, start, "end" FROM segments')
        return {os.fsdecode(p): (s, c, st, e) for p, s, c, st, e in cur}
    finally:
        conn.close()


@pytest.fixture
def recorders(site: Site) -> Site:
    extra = ""
    for name, root in (
        ("dahua", "dahua"),
        ("nx-witness", "nx"),
        ("motioneye", "motioneye/Camera1"),
        ("viseron", "viseron"),
    ):
        (site.base / root).mkdir(parents=True)
        extra += f"""  {name.replace("-", "_")}:
    keep: 30d
    timezone: Europe/Berlin
    roots: [{site.base / root}]
    layout: {name}
"""
    site.config.write_text(make_config(site, extra_site=extra, fraction=1.0))
    return site


def _minute(days_ago: float) -> float:
    t = datetime.now(UTC) - timedelta(days=days_ago)
    return float(int(t.timestamp()) // 60 * 60)


def test_scan_catalogues_the_end_the_name_carries(recorders: Site) -> None:
    s = recorders
    t = _minute(2)
    lt, le = datetime.fromtimestamp(t, BERLIN), datetime.fromtimestamp(t + 300, BERLIN)
    dav = _file(
        s.base
        / "dahua"
        / f"{lt:%Y-%m-%d}/001/dav/{lt:%H}/{lt:%H.%M.%S}-{le:%H.%M.%S}[M][0@0][0].dav",
        t + 3600,  # uploaded an hour later: the name's end is the footage's
    )
    ms = int(t * 1000) + 250
    mkv = _file(s.base / "nx" / f"hi_quality/cam-7/{lt:%Y/%m/%d/%H}/{ms}_60000.mkv", t + 61)
    m4s = _file(s.base / "viseron" / f"garage/{int(t)}.m4s", t + 5)
    init = _file(s.base / "viseron" / "garage/init.mp4", t)
    r = s.run("--json", "retention", "run")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(s)
    assert rows[str(dav)] == ("dahua", "001", t, t + 300)
    assert rows[str(mkv)] == ("nx_witness", "cam-7", ms / 1000, ms / 1000 + 60)
    assert rows[str(m4s)] == ("viseron", "garage", t, None)
    assert str(init) not in rows
    # the sidecar is not reported as a file the layout does not match
    st = s.json("status")
    assert not [a for a in st.get("attention", []) if a.get("kind") == "unmatched"], st


def test_purge_removes_a_motioneye_movie_with_its_thumb(recorders: Site) -> None:
    s = recorders
    cam = s.base / "motioneye/Camera1"
    old, young = _minute(40), _minute(1)
    movies = {}
    for label, t in (("old", old), ("young", young)):
        lt = datetime.fromtimestamp(t, BERLIN)
        movie = _file(cam / f"{lt:%Y-%m-%d}/{lt:%H-%M-%S}.mp4", t + 60)
        thumb = _file(Path(f"{movie}.thumb"), t + 61, 10)
        movies[label] = (movie, thumb)
    r = s.run("--json", "retention", "run")
    assert r.returncode == 0, r.stdout + r.stderr
    gone_movie, gone_thumb = movies["old"]
    kept_movie, kept_thumb = movies["young"]
    assert not gone_movie.exists() and not gone_thumb.exists()
    assert kept_movie.exists() and kept_thumb.exists()
    rows = _rows(s)
    assert rows[str(kept_movie)][:2] == ("motioneye", "Camera1")
    assert not any(p.endswith(".thumb") for p in rows)


def test_viseron_init_stays_while_segments_of_the_camera_remain(recorders: Site) -> None:
    s = recorders
    cam = s.base / "viseron/garage"
    init = _file(cam / "init.mp4", _minute(60))  # older than every segment and than keep
    old = [_file(cam / f"{int(_minute(40 - i))}.m4s", _minute(40 - i) + 5) for i in range(3)]
    young = _file(cam / f"{int(_minute(1))}.m4s", _minute(1) + 5)
    r = s.run("--json", "retention", "run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(p.exists() for p in old)
    assert young.exists() and init.exists()
    # the last segment expires too (here: it turns out to be old): init.mp4 is still not
    # nvr-guard's to delete, the recorder's own retention removes the camera's directory
    last = cam / f"{int(_minute(35))}.m4s"
    young.rename(last)
    os.utime(last, (_minute(35) + 5, _minute(35) + 5))
    r = s.run("--json", "retention", "run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not last.exists() and init.exists()
    assert sorted(p.name for p in cam.iterdir()) == ["init.mp4"]
