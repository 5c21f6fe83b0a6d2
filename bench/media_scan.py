"""Media scan benchmark: what binding a scan to the files' contents costs on a 4 GiB stick.

    sudo python bench/media_scan.py [--dir /var/tmp/nvrg-bench-media] [--size-gib 4] [--runs 2]
                                    [--clamd-socket /run/clamav/clamd.ctl]

Builds (or reuses) an ext4 image of ``--size-gib`` GiB, fills it to about 90 % with what a stick
handed to the recorder tends to hold (a few large incompressible files like earlier exports or
video, a few hundred documents and photos of 64 KiB to 8 MiB, a few thousand small files), and
attaches it as a loop device with direct I/O (so the host's page cache of the image file does not
serve reads). Before every run the filesystem is unmounted and mounted again: each run starts
with a cold cache, as a freshly plugged stick does.

In the same run, taking turns:

- ``scan``: ``scan_tree(digest=False)`` (the baseline: the scan as it was, no content digest);
- ``scan+digest``: ``scan_tree()`` as ``media scan`` runs it, digesting every file's bytes;
- ``commit check``: ``content_digest()`` alone, the medium read again as the gate does right
  before a package is committed (cold too: a long export has usually pushed the stick's pages
  out of memory by then).

Printed: the best wall and CPU time of each (other work on the machine only ever adds time; CPU
time, clamscan's included, is the steadier figure on a busy machine), the ratio scan+digest /
scan, and the commit check against the scan. The signature database is one
made-up body signature, so ClamAV's own work per byte is as small as it gets: the ratios are an
upper bound (the real daily/main databases make the scan slower and the digest relatively
cheaper). clamscan is used unless ``--clamd-socket`` names a running clamd. Not part of the test
suite; exit status 0 unless the benchmark itself fails.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvr_guard.media.clamav import content_digest, scan_tree

CHUNK = 4 * 2**20


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (clamscan)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def write_file(path: Path, size: int, rng: random.Random, compressible: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            if compressible:
                pat = b"Lorem ipsum dolor sit amet, %d. " % rng.randrange(10**6)
                f.write((pat * (n // len(pat) + 1))[:n])
            else:
                f.write(rng.randbytes(n))
            left -= n


def fill(mount: Path, size: int, seed: int = 7) -> tuple[int, int]:
    """Fill ``mount`` to about 90 % of ``size``; returns (files, bytes)."""
    rng = random.Random(seed)
    budget = int(size * 0.9)
    files = used = 0
    # 70 %: large incompressible files (earlier exports, camera footage), 128-512 MiB
    while used < budget * 0.7:
        n = rng.randrange(128, 513) * 2**20
        write_file(mount / "video" / f"clip{files:03d}.mp4", n, rng, False)
        files, used = files + 1, used + n
    # 25 %: documents and photos, 64 KiB - 8 MiB, a third of them compressible text
    while used < budget * 0.95:
        n = rng.randrange(64, 8193) * 1024
        d = mount / "docs" / f"d{files % 40:02d}"
        write_file(d / f"f{files:05d}.bin", n, rng, files % 3 == 0)
        files, used = files + 1, used + n
    # the rest: small files, 1-64 KiB
    while used < budget:
        n = rng.randrange(1, 65) * 1024
        d = mount / "misc" / f"m{files % 100:02d}"
        write_file(d / f"s{files:06d}.txt", n, rng, True)
        files, used = files + 1, used + n
    return files, used


class Stick:
    def __init__(self, base: Path, size_gib: int) -> None:
        self.image = base / f"stick-{size_gib}g.img"
        self.mount = base / "mnt"
        self.size = size_gib * 2**30
        self.done = base / f".filled-{size_gib}g"
        self.loop = ""

    def attach(self) -> None:
        fresh = not self.done.exists()
        if fresh:
            self.image.unlink(missing_ok=True)
            with open(self.image, "wb") as f:
                f.truncate(self.size)
            sh("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "NVRGBENCH", str(self.image))
        self.loop = sh("losetup", "--direct-io=on", "-f", "--show", str(self.image))
        self.mount.mkdir(parents=True, exist_ok=True)
        sh("mount", self.loop, str(self.mount))
        if fresh:
            t = time.perf_counter()
            files, used = fill(self.mount, self.size)
            sh("sync")
            print(
                f"filled: {files:,} files, {used / 2**30:.2f} GiB in "
                f"{time.perf_counter() - t:.0f} s"
            )
            self.done.touch()

    def cold(self) -> None:
        """Unmount and mount again: the filesystem's cached pages and inodes are dropped."""
        sh("umount", str(self.mount))
        sh("mount", self.loop, str(self.mount))

    def detach(self) -> None:
        if self.loop:
            subprocess.run(["umount", str(self.mount)], check=False)
            subprocess.run(["losetup", "-d", self.loop], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/nvrg-bench-media"))
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--clamd-socket", type=Path, default=None)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop devices and mounts)")
    a.dir.mkdir(parents=True, exist_ok=True)
    db = a.dir / "db"
    db.mkdir(exist_ok=True)
    (db / "bench.ndb").write_text(f"NVRG.Bench.Marker:0:*:{b'nvr-guard bench marker'.hex()}\n")
    engine = "clamd" if a.clamd_socket else "clamscan"
    stick = Stick(a.dir, a.size_gib)
    stick.attach()
    try:
        kw: dict[str, Any] = {"scanner": engine, "database": db, "timeout": 7200}
        if a.clamd_socket:
            kw["clamd_socket"] = a.clamd_socket

        def scan(digest: bool) -> Callable[[], Any]:
            return lambda: scan_tree(stick.mount, digest=digest, **kw)

        sides: dict[str, Callable[[], Any]] = {
            "scan": scan(False),
            "scan+digest": scan(True),
            "commit check": lambda: content_digest(stick.mount),
        }
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        info: dict[str, Any] = {}
        for run in range(a.runs):
            for name, fn in sides.items():
                stick.cold()
                c, t = cpu_seconds(), time.perf_counter()
                out = fn()
                dt, dc = time.perf_counter() - t, cpu_seconds() - c
                best[name] = min(best.get(name, dt), dt)
                cpu[name] = min(cpu.get(name, dc), dc)
                if name != "commit check":
                    if out.result != "clean":
                        raise SystemExit(f"{name}: scan not clean: {out.errors[:3]}")
                    info = {"files": out.files, "bytes": out.bytes, "engine": out.engine_version}
                print(f"run {run + 1} {name:>13}: {dt:7.1f} s wall, {dc:7.1f} s CPU")
        gib = info["bytes"] / 2**30
        print(
            f"\n{engine} ({info['engine']}), {info['files']:,} files, {gib:.2f} GiB, "
            f"cold cache, best of {a.runs}:"
        )
        for name, dt in best.items():
            print(
                f"  {name:>13}: {dt:7.1f} s wall ({info['bytes'] / 2**20 / dt:5.0f} MiB/s), "
                f"{cpu[name]:7.1f} s CPU"
            )
        for what, d in (("wall", best), ("CPU", cpu)):
            print(
                f"  {what:>4}: scan+digest / scan = {d['scan+digest'] / d['scan']:.2f}, "
                f"commit check / scan = {d['commit check'] / d['scan']:.2f}"
            )
    finally:
        stick.detach()


if __name__ == "__main__":
    main()
