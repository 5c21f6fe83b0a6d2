"""Shared fixtures: real recording trees, configs and the installed command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

SH = ZoneInfo("Asia/Shanghai")
LAYOUT = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"


def write_segment(root: Path, camera: str, t: datetime, size: int = 1000, tz: Any = SH) -> Path:
    p = root / camera / t.astimezone(tz).strftime("%Y-%m-%d/%H/%M.%S.mp4")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\0" * size)
    ts = t.timestamp() + 60  # closed a minute after it started
    os.utime(p, (ts, ts))
    return p


def make_footage(
    root: Path, camera: str, start: datetime, count: int, seconds: int = 10, size: str = "320x240"
) -> None:
    """Real H.264 segments (ffmpeg testsrc2) with the recorded start time in their path."""
    for i in range(count):
        t = start + timedelta(seconds=i * seconds)
        p = root / camera / t.astimezone(SH).strftime("%Y-%m-%d/%H/%M.%S.mp4")
        p.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                f"testsrc2=size={size}:rate=25:duration={seconds}",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-g",
                "25",
                str(p),
            ],
            check=True,
        )
        ts = t.timestamp() + seconds
        os.utime(p, (ts, ts))


def build_tree(
    root: Path, cameras: list[str], days: int, per_day: int, now: datetime
) -> list[Path]:
    """Segments from ``days`` ago up to ten minutes ago, ``per_day`` per camera and day."""
    paths = []
    step = timedelta(days=1) / per_day
    for cam in cameras:
        t = now - timedelta(days=days)
        while t < now - timedelta(minutes=10):
            paths.append(write_segment(root, cam, t))
            t += step
    return paths


def poll(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Wait for ``pred`` to be truthy, with a deadline (no sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclass
class Site:
    base: Path
    root: Path
    config: Path
    state: Path
    socket: Path

    def run(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        user: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "nvr_guard", "--config", str(self.config), *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, input=input, timeout=timeout, env=env, user=user
        )

    def json(self, *args: str) -> Any:
        r = self.run("--json", *args)
        assert r.stdout.strip(), f"no JSON from {args}: exit {r.returncode}, stderr {r.stderr}"
        return json.loads(r.stdout)

    def write_config(self, **over: Any) -> None:
        self.config.write_text(make_config(self, **over))


def make_config(
    s: Site,
    keep: str = "15d",
    min_keep: str | None = None,
    fraction: float = 0.2,
    min_free: str = "1%",
    action: str = "alert",
    sweep_every: str = "5m",
    extra_site: str = "",
    settle: str = "2m",
    layout: str | None = LAYOUT,
) -> str:
    site = f"""  toll:
    keep: {keep}
    roots: [{s.root}]
"""
    if layout:
        site += f'    layout: "{layout}"\n'
    if min_keep:
        site += f"    min_keep: {min_keep}\n"
    return f"""state_dir: {s.state}
timezone: Asia/Shanghai
socket: {s.socket}
socket_group: root
settle: {settle}
sweep_every: {sweep_every}
guards: {{max_delete_fraction: {fraction}, max_clock_jump: 1d}}
disk: {{min_free: {min_free}, action: {action}}}
sites:
{site}{extra_site}people:
  users: {{root: {{roles: [admin]}}}}
"""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "rec"
    root.mkdir()
    s = Site(
        tmp_path, root, tmp_path / "config.yaml", tmp_path / "state", tmp_path / "run" / "c.sock"
    )
    s.write_config()
    yield s


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
