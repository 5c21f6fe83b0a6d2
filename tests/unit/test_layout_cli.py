"""`nvr-guard layout test`: what a path yields (site, camera, start, end) or why not, from the
config alone, through the installed command line."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.fixtures.site import Site

SH = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def two_sites(site: Site) -> Site:
    """toll: layout in the path (site-local time); lobby: Frigate's layout in UTC; yard: none."""
    (site.base / "frigate").mkdir()
    (site.base / "yard").mkdir()
    site.config.write_text(
        site.config.read_text().replace(
            "people:",
            f"""  lobby:
    keep: 30d
    roots: [{site.base / "frigate"}]
    layout: "%Y-%m-%d/%H/{{camera}}/%M.%S.mp4"
    layout_timezone: UTC
  yard:
    keep: 30d
    roots: [{site.base / "yard"}]
people:""",
        )
    )
    return site


def layout_test(site: Site, *args: str) -> tuple[int, dict[str, Any]]:
    r = site.run("--json", "layout", "test", *args)
    assert r.stdout.strip(), f"exit {r.returncode}: {r.stderr}"
    assert "Traceback" not in r.stderr
    return r.returncode, json.loads(r.stdout)


def test_matching_paths_yield_site_camera_and_start(two_sites: Site) -> None:
    s = two_sites
    toll = s.root / "gate-03/2026-11-20/14/05.07.mp4"
    frigate = s.base / "frigate/2026-11-20/06/front/05.00.mkv"  # extension from the site's list
    code, res = layout_test(s, str(toll), str(frigate))
    assert code == 0, res
    a, b = res["paths"]
    assert a == {
        "path": str(toll),
        "site": "toll",
        "camera": "gate-03",
        "start": "2026-11-20T14:05:07+08:00",
        "end": None,  # no such file: only the path speaks
        "end_from": None,
        "ok": True,
        "reason": None,
        "preset": None,  # a pattern, not a preset
        "explanation": None,
        "sidecar_of": None,
    }
    # Frigate writes UTC: 06:05 UTC is 14:05 in Shanghai, shown in the site's zone
    assert (b["site"], b["camera"], b["start"], b["ok"]) == (
        "lobby",
        "front",
        "2026-11-20T14:05:00+08:00",
        True,
    )


def test_an_existing_file_gives_its_end_and_without_layout_its_mtime(two_sites: Site) -> None:
    s = two_sites
    seg = s.root / "cam1/2026-11-20/14/05.00.mp4"
    seg.parent.mkdir(parents=True)
    seg.write_bytes(b"x")
    closed = datetime(2026, 11, 20, 14, 6, 0, tzinfo=SH).timestamp()
    os.utime(seg, (closed, closed))
    yard = s.base / "yard/cam9/any-name.mp4"
    yard.parent.mkdir(parents=True)
    yard.write_bytes(b"x")
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=SH).timestamp()
    os.utime(yard, (t, t))
    code, res = layout_test(s, str(seg), str(yard))
    assert code == 0, res
    a, b = res["paths"]
    assert (a["start"], a["end"]) == ("2026-11-20T14:05:00+08:00", "2026-11-20T14:06:00+08:00")
    assert (b["site"], b["camera"], b["start"], b["end"]) == (
        "yard",
        "cam9",
        "2026-01-02T03:04:05+08:00",
        None,
    )


@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        ("gate-03/2026-11-20/14/05.07.txt", "extension '.txt' is not in sites.toll.extensions"),
        ("gate-03/20261120/14/05.07.mp4", "do not match layout"),
        ("gate-03/2026-11-20/14/0507.mp4", "file name '0507.mp4' does not match '%M.%S.mp4'"),
        ("gate-03/2026-02-30/14/05.07.mp4", "do not match layout"),  # no 30 February
    ],
)
def test_a_path_that_does_not_match_says_why_and_exits_2(
    two_sites: Site, rel: str, reason: str
) -> None:
    s = two_sites
    good = s.root / "gate-03/2026-11-20/14/05.07.mp4"
    code, res = layout_test(s, str(good), str(s.root / rel))
    assert code == 2
    ok, bad = res["paths"]
    assert ok["ok"] is True
    assert bad["ok"] is False and reason in bad["reason"], bad
    assert bad["camera"] is None and bad["start"] is None


def test_outside_roots_symlinks_and_mtime_without_a_file(two_sites: Site) -> None:
    s = two_sites
    (s.root / "link").symlink_to(s.root / "elsewhere", target_is_directory=True)
    (s.root / "elsewhere/2026-11-20/14").mkdir(parents=True)
    code, res = layout_test(
        s,
        "/etc/passwd.mp4",
        str(s.root / "link/2026-11-20/14/05.07.mp4"),
        str(s.base / "yard/cam9/missing.mp4"),
        str(s.base / "yard/top.mp4"),
    )
    assert code == 2
    reasons = [r["reason"] for r in res["paths"]]
    assert "not under any site's root" in reasons[0]
    assert "is a symlink" in reasons[1]
    assert "mtime" in reasons[2] and "does not exist" in reasons[2]
    assert "first directory below the root is the camera" in reasons[3]
    assert not any(r["ok"] for r in res["paths"])


def test_site_option_reads_relative_paths_below_its_root(two_sites: Site) -> None:
    s = two_sites
    code, res = layout_test(s, "--site", "lobby", "2026-11-20/06/front/05.00.mp4")
    assert code == 0, res
    assert res["paths"][0]["camera"] == "front"
    # a toll path is not under lobby's root
    code, res = layout_test(s, "--site", "lobby", str(s.root / "gate-03/2026-11-20/14/05.07.mp4"))
    assert code == 2 and "not under a root of site lobby" in res["paths"][0]["reason"]
    r = s.run("layout", "test", "--site", "nope", "x.mp4")
    assert r.returncode == 2 and "unknown site 'nope'" in r.stderr


def test_human_output_and_no_daemon_needed(two_sites: Site) -> None:
    s = two_sites
    assert not s.socket.exists()
    r = s.run("layout", "test", str(s.root / "gate-03/2026-11-20/14/05.07.mp4"))
    assert r.returncode == 0, r.stderr
    assert "gate-03" in r.stdout and "2026-11-20T14:05:07+08:00" in r.stdout
    r = s.run("layout", "test", str(s.root / "gate-03/x.mp4"))
    assert r.returncode == 2 and "no match" in r.stdout
    # nothing was created: the state directory is untouched
    assert not s.state.exists()
