"""Retention engine benchmark: ratios against baselines measured in the same run (issue 3).

    python bench/retention.py [--dir /tmp/nvrg-bench] [--quick] [--json]

Builds (or reuses) a tree of empty segment files, ``CAM/YYYY-MM-DD/HH/MM.SS.mp4``: 20 cameras x
35 days x 1440 one-minute segments (about 1,000,000; ``--quick``: 10 cameras x 7 days, about
100,000), then measures:

- cold reconcile (empty catalog) vs ``find ROOT -type f -printf '%s %T@ %p\\n'``: goal <= 3x
- a sweep with nothing due vs that same find: goal <= 1/100
- purging the 5 oldest days (1 in --quick) vs ``find COPY -delete`` on an identical copy:
  goal <= 1.2x (each timed run on either side starts from a synced file system)
- a new segment catalogued after close, with a Watcher running: goal <= 2 s
- RSS of a fresh process holding the catalog (a full reconcile as at daemon start, a sweep,
  the watcher on every directory): goal <= 120 MB

``--frigate`` measures the cold reconcile alone on a Frigate-shaped tree instead
(``YYYY-MM-DD/HH/CAMERA/MM.SS.mp4`` in UTC, 10-second segments: 20 cameras x 6 days x 8,640,
about 1,000,000 files; ``--quick``: 10 cameras x 1 day), read with the ``frigate`` preset,
against the same ``find``: goal <= 3x.

Every measurement is taken with a warm page cache (the baseline ``find`` runs once before it is
timed): dropping the caches needs root and disturbs the whole machine. Timings are the best of a
few runs on both sides, since other work on the machine only ever adds time. Exit status is 0
unless the benchmark itself crashes: the PASS/FAIL column is information, not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

from nvr_guard.model import GuardRules, Segment, SiteRules, boot_clock
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.layout import Layout
from nvr_guard.retention.presets import compile_layout
from nvr_guard.retention.scan import Scanner, SiteScan
from nvr_guard.retention.watch import Watcher
from nvr_guard.store.catalog import Catalog
from nvr_guard.text import Duration

SITE = "bench"
LAYOUT = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"
EXTS = frozenset({".mp4"})
LIVE = "cam-live"  # camera of the latency measurement, removed afterwards


@dataclass(frozen=True)
class Shape:
    cameras: int
    days: int
    purge_days: int

    @property
    def files(self) -> int:
        return self.cameras * self.days * 1440


FULL = Shape(cameras=20, days=35, purge_days=5)
QUICK = Shape(cameras=10, days=7, purge_days=1)


# ---- tree generation -------------------------------------------------------------------------


def day_names(shape: Shape, last: datetime) -> list[str]:
    """The tree's days, oldest first, ending with ``last``."""
    return [
        (last - timedelta(days=shape.days - 1 - i)).strftime("%Y-%m-%d") for i in range(shape.days)
    ]


def _make_day(args: tuple[bytes, str, str]) -> int:
    root, camera, day = args
    n = 0
    base = os.path.join(root, camera.encode(), day.encode())
    for hour in range(24):
        d = os.path.join(base, b"%02d" % hour)
        os.makedirs(d, exist_ok=True)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for minute in range(60):
                fd = os.open(b"%02d.00.mp4" % minute, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
                os.close(fd)
                n += 1
        finally:
            os.close(dfd)
    return n


def generate(root: Path, cameras: Sequence[str], days: Sequence[str]) -> int:
    jobs = [(os.fsencode(root), c, d) for c in cameras for d in days]
    # fork: nothing else runs yet in this process, and it starts faster than spawn
    with ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("fork")) as ex:
        return sum(ex.map(_make_day, jobs, chunksize=4))


def reuse_or_clear(root: Path, marker: Path, want: object) -> bool:
    """True when a previous run left the tree ``want`` describes; else an empty ``root``."""
    if marker.exists() and root.is_dir():
        try:
            if json.loads(marker.read_text()) == want:
                return True
        except ValueError:
            pass
    if root.exists():
        shutil.rmtree(root)
    marker.unlink(missing_ok=True)
    root.mkdir(parents=True)
    return False


def _make_frigate_hour(args: tuple[bytes, str, int, Sequence[str]]) -> int:
    root, day, hour, cameras = args
    n = 0
    for camera in cameras:
        d = os.path.join(root, day.encode(), b"%02d" % hour, camera.encode())
        os.makedirs(d, exist_ok=True)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(360):  # Frigate's 10-second segments
                name = b"%02d.%02d.mp4" % (i // 6, (i % 6) * 10)
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
                n += 1
        finally:
            os.close(dfd)
    return n


def prepare_frigate_tree(base: Path, cameras: int, days: int) -> Path:
    """A Frigate-shaped tree under ``base/tree-frigate``, reused when complete."""
    root = base / "tree-frigate"
    marker = base / "tree-frigate.json"
    last = datetime.now(UTC)
    day_list = [(last - timedelta(days=days - 1 - i)).strftime("%Y-%m-%d") for i in range(days)]
    want = {"cameras": cameras, "days": day_list}
    if reuse_or_clear(root, marker, want):
        print(f"reusing the Frigate-shaped tree under {root}")
        return root
    cams = [f"cam{c:02d}" for c in range(cameras)]
    jobs = [(os.fsencode(root), d, h, cams) for d in day_list for h in range(24)]
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("fork")) as ex:
        n = sum(ex.map(_make_frigate_hour, jobs, chunksize=4))
    print(f"generated {n:,} Frigate-shaped files under {root} in {time.perf_counter() - t:.1f} s")
    marker.write_text(json.dumps(want))
    return root


def frigate_reconcile(base: Path, quick: bool, repeat: int) -> Line:
    """Cold reconcile of a Frigate-shaped tree against ``find -printf`` on it."""
    root = prepare_frigate_tree(base, 10 if quick else 20, 1 if quick else 6)
    find_args = [str(root), "-type", "f", "-printf", r"%s %T@ %p\n"]
    run_find(find_args)  # warm-up, untimed
    find_s = min(timed(lambda: run_find(find_args)) for _ in range(max(3, repeat)))
    rules = SiteRules(SITE, Duration.parse("40d"), None, UTC, settle=0.0)
    layout = compile_layout("frigate", UTC, explicit_tz=False)  # the preset, as a config names it
    s = SiteScan(SITE, [os.fsencode(root)], layout, EXTS, rules)
    cold: list[float] = []
    files = 0
    for _ in range(repeat):
        cat = fresh_catalog(base / "state-frigate")
        try:
            t = time.perf_counter()
            stats = Scanner(cat, [s]).reconcile()
            cold.append(time.perf_counter() - t)
            files = stats.files
        finally:
            cat.close()
    print(f"  Frigate reconcile runs: {', '.join(f'{c:.2f}' for c in cold)} s")
    ratio = min(cold) / find_s
    return Line(
        f"cold reconcile, Frigate layout ({files:,} files)",
        f"{min(cold):.2f} s",
        f"find {find_s:.2f} s",
        f"{ratio:.2f}x",
        "<= 3x",
        ratio <= 3.0,
    )


def camera_names(shape: Shape) -> list[str]:
    return [f"cam{c:02d}" for c in range(shape.cameras)]


def prepare_tree(base: Path, shape: Shape) -> tuple[Path, list[str]]:
    """The tree under ``base/tree``; reused when a previous run left a complete one."""
    root = base / "tree"
    marker = base / "tree.json"
    last = datetime.now(UTC)
    days = day_names(shape, last)
    want = {"cameras": shape.cameras, "days": days}
    if reuse_or_clear(root, marker, want):
        print(f"reusing {shape.files:,} files under {root}")
        return root, days
    t = time.perf_counter()
    n = generate(root, camera_names(shape), days)
    print(f"generated {n:,} empty segment files under {root} in {time.perf_counter() - t:.1f} s")
    marker.write_text(json.dumps(want))
    return root, days


# ---- measurements ----------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_find(args: list[str]) -> None:
    subprocess.run(["find", *args], check=True, stdout=subprocess.DEVNULL)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def fresh_catalog(state: Path) -> Catalog:
    for suffix in ("", "-wal", "-shm"):
        p = state / f"catalog.db{suffix}"
        p.unlink(missing_ok=True)
    (state / "audit.head").unlink(missing_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    return Catalog(state / "catalog.db", expiry=ExpiryCalc)


def site_scan(root: Path, keep: str) -> SiteScan:
    rules = SiteRules(SITE, Duration.parse(keep), None, UTC, settle=0.0)
    return SiteScan(SITE, [os.fsencode(root)], Layout.compile(LAYOUT, UTC), EXTS, rules)


def steady_sweep(cat: Catalog, rules: dict[str, SiteRules]) -> int:
    """What the daemon does every sweep_every when nothing is due: catalog query + decide."""
    from nvr_guard.retention import policy

    clock = boot_clock()
    candidates = cat.due_segments(clock.wall, None, rules)
    holds = cat.active_holds(clock.wall)
    totals = cat.camera_totals({(s.site, s.camera) for s in candidates})
    plan = policy.decide(
        candidates, clock, rules, GuardRules(), holds, totals, history=cat.last_history()
    )
    return len(plan.deletions)


def catalog_latency(cat: Catalog, root: Path, s: SiteScan, samples: int) -> list[float]:
    lost: list[int] = []
    w = Watcher(Scanner(cat, [s]), [s], on_overflow=lambda: lost.append(1))
    if not w.start():
        raise RuntimeError("the watcher could not start")
    out: list[float] = []
    try:
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        for i in range(samples):
            # a camera that starts recording: half the segments open a new hour directory
            # (its watch is added on the fly), half land in an existing one
            hour = root / LIVE / today / f"{(i // 2) % 24:02d}"
            hour.mkdir(parents=True, exist_ok=True)
            p = os.fsencode(hour / f"{i:02d}.00.mp4")
            with open(p, "wb") as fh:
                fh.write(b"\0" * 1024)
            t = time.perf_counter()
            deadline = t + 10
            while cat.get(p) is None and time.perf_counter() < deadline:
                time.sleep(0.005)  # polling: the value measured is the first time it is there
            out.append(time.perf_counter() - t if cat.get(p) is not None else float("inf"))
    finally:
        w.stop()
        shutil.rmtree(root / LIVE, ignore_errors=True)
    return out


_RSS_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import psutil
    sys.path.insert(0, sys.argv[3])
    from retention import site_scan, steady_sweep
    from nvr_guard.store.catalog import Catalog
    from nvr_guard.retention.expiry import ExpiryCalc
    from nvr_guard.retention.scan import Scanner
    from nvr_guard.retention.watch import Watcher

    cat = Catalog(sys.argv[1], expiry=ExpiryCalc)
    s = site_scan(__import__("pathlib").Path(sys.argv[2]), "40d")
    scanner = Scanner(cat, [s])
    inc = scanner.reconcile()  # what the daemon does when it starts
    steady_sweep(cat, {s.site: s.rules})
    w = Watcher(scanner, [s], on_overflow=lambda: None)
    w.start()
    rss = psutil.Process().memory_info().rss
    w.stop()
    print(json.dumps({"rss": rss, "segments": cat.count(), "reconcile": inc.as_json()}))
    """
)


def child_rss(state: Path, root: Path) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _RSS_CHILD,
            str(state / "catalog.db"),
            str(root),
            str(Path(__file__).resolve().parent),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Line:
    what: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    ok: bool | None  # None: not measured

    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "FAIL")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/nvrg-bench", help="where the tree and catalog live")
    ap.add_argument("--quick", action="store_true", help="about 100,000 files instead of 1M")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--repeat", type=int, default=2, help="runs per timing (best is kept)")
    ap.add_argument(
        "--frigate", action="store_true", help="only the cold reconcile, on a Frigate-shaped tree"
    )
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else FULL
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    if args.frigate:
        print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}; warm page cache")
        report([frigate_reconcile(base, args.quick, args.repeat)], args.json)
        return 0
    root, days = prepare_tree(base, shape)
    state = base / "state"
    lines: list[Line] = []
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}; warm page cache")

    # -- find baseline (warm) --
    find_args = [str(root), "-type", "f", "-printf", r"%s %T@ %p\n"]
    run_find(find_args)  # warm-up, untimed
    cpu0 = children_cpu()
    find_runs = [timed(lambda: run_find(find_args)) for _ in range(max(3, args.repeat))]
    find_cpu = (children_cpu() - cpu0) / len(find_runs)
    find_s = min(find_runs)

    # -- cold reconcile --
    s = site_scan(root, "40d")  # 40 days: nothing of the 35 is due
    cold: list[float] = []
    stats = None
    cat: Catalog | None = None
    for _ in range(args.repeat):
        if cat is not None:
            cat.close()
        cat = fresh_catalog(state)
        scanner = Scanner(cat, [s])
        t = time.perf_counter()
        stats = scanner.reconcile()
        cold.append(time.perf_counter() - t)
    assert cat is not None and stats is not None
    cold_s = min(cold)
    ratio = cold_s / find_s
    lines.append(
        Line(
            f"cold reconcile ({stats.files:,} files)",
            f"{cold_s:.2f} s",
            f"find {find_s:.2f} s",
            f"{ratio:.2f}x",
            "<= 3x",
            ratio <= 3.0,
        )
    )
    print(f"  reconcile runs: {', '.join(f'{c:.2f}' for c in cold)} s; {stats.as_json()}")
    cpu_note = (
        f"cold reconcile used {stats.cpu_seconds:.1f} CPU-s over {os.cpu_count()} cores "
        f"(find: {find_cpu:.1f} CPU-s on one); on an otherwise idle machine that is about "
        f"{stats.cpu_seconds / (os.cpu_count() or 1):.1f} s against find's {find_cpu:.1f} s = "
        f"{stats.cpu_seconds / (os.cpu_count() or 1) / max(find_cpu, 1e-9):.1f}x (an estimate: "
        "the table above is the measurement)"
    )
    rss_after_reconcile = psutil.Process().memory_info().rss

    # -- steady sweep, nothing due --
    rules = {SITE: s.rules}
    steady_sweep(cat, rules)  # first one notes the rules
    runs = [timed(lambda: steady_sweep(cat, rules)) for _ in range(21)]
    sweep_s = statistics.median(runs)
    ratio = sweep_s / find_s
    lines.append(
        Line(
            "sweep, nothing due (median of 21)",
            f"{sweep_s * 1000:.2f} ms",
            f"find {find_s:.2f} s",
            f"1/{1 / ratio:,.0f}" if ratio else "0",
            "<= 1/100",
            ratio <= 0.01,
        )
    )

    # -- new segment latency with a watcher --
    lat = catalog_latency(cat, root, s, samples=10)
    worst = max(lat)
    lines.append(
        Line(
            "new segment catalogued (worst of 10)",
            f"{worst * 1000:.0f} ms",
            "close()",
            f"median {statistics.median(lat) * 1000:.0f} ms",
            "<= 2 s",
            worst <= 2.0,
        )
    )

    # -- RSS of a process holding the catalog --
    info = child_rss(state, root)
    rss_mb = int(str(info["rss"])) / 2**20
    lines.append(
        Line(
            f"RSS holding {int(str(info['segments'])):,} segments",
            f"{rss_mb:.0f} MB",
            "-",
            "-",
            "<= 120 MB",
            rss_mb <= 120,
        )
    )

    # -- purge the oldest days vs find -delete of a copy --
    lines.append(purge_line(cat, root, base, shape, days, s, args.repeat))
    cat.close()

    report(lines, False)
    print(f"\n{cpu_note}")
    print(
        f"(bench process RSS after the cold reconcile: "
        f"{rss_after_reconcile / 2**20:.0f} MB; load average now {os.getloadavg()[0]:.2f})"
    )
    if args.json:
        print(json.dumps([ln.__dict__ for ln in lines], indent=1))
    return 0


def report(lines: list[Line], as_json: bool) -> None:
    print()
    widths = [
        max(len(getattr(ln, f)) for ln in lines)
        for f in ("what", "ours", "baseline", "ratio", "goal")
    ]
    head = ("measure", "nvr-guard", "baseline", "ratio", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print(fmt.format(*head, "result"))
    for ln in lines:
        print(fmt.format(ln.what, ln.ours, ln.baseline, ln.ratio, ln.goal, ln.verdict()))
    if as_json:
        print(json.dumps([ln.__dict__ for ln in lines], indent=1))


def purge_line(
    cat: Catalog, root: Path, base: Path, shape: Shape, days: list[str], s: SiteScan, repeat: int
) -> Line:
    what = f"purge {shape.purge_days} oldest day(s)"
    try:
        from nvr_guard.retention import purge as purge_mod
        from nvr_guard.store.audit import AuditLog
    except ImportError:
        return Line(what, "not available", "-", "-", "<= 1.2x", None)
    old_days = days[: shape.purge_days]
    boundary = datetime.strptime(days[shape.purge_days], "%Y-%m-%d").replace(tzinfo=UTC)
    n = len(cat.segments_of(SITE, None, 0.0, boundary.timestamp()))

    copy = base / "copy"
    audit = AuditLog(cat.conn)

    def find_delete() -> float:
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        generate(copy, camera_names(shape), old_days)
        run_find([str(copy), "-type", "f", "-printf", ""])  # warm, like the tree is
        os.sync()  # no dirty data left from the set-up (see the purge side)
        return timed(lambda: run_find([str(copy), "-mindepth", "2", "-delete"]))

    def on_deleted(done: list[Segment]) -> None:
        cat.remove_segments(done)  # what the engine's purge callback does

    def our_purge() -> tuple[float, int]:
        segs = cat.segments_of(SITE, None, 0.0, boundary.timestamp())
        targets = [purge_mod.PurgeTarget(seg, os.fsencode(root), EXTS, 0.0) for seg in segs]
        # the purge ends with a syncfs of the recordings' file system: without this, it would
        # also write out what the set-up left dirty (the restored days, the catalog's WAL)
        os.sync()
        t = time.perf_counter()
        result = purge_mod.purge(
            targets,
            audit=audit,
            actor="bench",
            sweep_id=None,
            now=time.time,
            on_deleted=on_deleted,
        )
        took = time.perf_counter() - t
        # put the days back (so the next run, and the next bench, find the same tree) and
        # catalogue them again, as the daemon's scanner would
        generate(root, camera_names(shape), old_days)
        run_find([str(root), "-type", "f", "-printf", ""])  # warm again, like find's copy
        Scanner(cat, [s]).reconcile()
        return took, len(result.deleted)

    # the two sides take turns, so that whatever the file system still has to do after
    # 144,000 deletions falls on both alike
    find_times: list[float] = []
    runs: list[float] = []
    deleted = n
    for _ in range(max(1, repeat)):
        find_times.append(find_delete())
        took, got = our_purge()
        runs.append(took)
        deleted = min(deleted, got)
    shutil.rmtree(copy, ignore_errors=True)
    find_s = min(find_times)
    (base / "tree.json").touch()
    ours = min(runs)
    print(
        f"  purge runs: {', '.join(f'{r:.2f}' for r in runs)} s; find -delete runs: "
        f"{', '.join(f'{r:.2f}' for r in find_times)} s"
    )
    ratio = ours / find_s
    ok = ratio <= 1.2 and deleted == n
    return Line(
        f"{what}: {deleted:,} of {n:,} files",
        f"{ours:.2f} s",
        f"find -delete {find_s:.2f} s",
        f"{ratio:.2f}x",
        "<= 1.2x",
        ok,
    )


if __name__ == "__main__":
    sys.exit(main())
