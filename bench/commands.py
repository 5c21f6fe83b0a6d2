"""Whole-process benchmark of the commands an admin runs, and of the daemon (issue 19).

    python bench/commands.py [--dir /tmp/nvrg-bench] [--quick] [--repeat 3] [--json]

On retention.py's tree (20 cameras x 35 days x 1-minute segments: 1,008,000 files; ``--quick``:
10 x 7), every measure is a real ``nvr-guard`` process (or the daemon), timed from its start to
its exit, with its peak resident set (``ru_maxrss`` of the process and the children it waited
for: the largest one) — against ``find ROOT -type f -printf '%s %T@ %p\\n'`` timed in the same
run:

1. cold: ``retention plan`` as root with no daemon and an empty state (a walk of every root
   into a new catalog, then the plan) — goal <= 2x find;
2. the daemon's start on an empty state until its catalog holds the tree — goal <= 2x find;
3. ``retention plan`` while the daemon runs (it plans from its catalog) — goal <= 1/10 find;
4. ``--config other.yaml retention plan`` while the daemon runs (root's preview of a shorter
   keep on a copy of the catalog: 5 days due) — goal <= 1x find;
5. ``status`` round trip, best and median of 20 — goal <= 150 ms;
6. the daemon sweeping the 5-day backlog (144,000 files), ``audit verify`` of 1,000,000 entries
   (appended to the state for the purpose) through the daemon and as root without one;
7. peak RSS of every process above and of the daemon (VmHWM) — goal <= 150 MB each;
8. no process of a command is left once it exits (checked after each).

The tree is restored afterwards (the backlog days are created again). Exit status 0 unless the
benchmark itself fails: PASS/FAIL is information.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention import FULL, LAYOUT, QUICK, SITE, Shape, camera_names, run_find  # noqa: E402
from web import prepare, stamp  # noqa: E402

MB = 1_000_000
AUDIT_ENTRIES = 1_000_000


@dataclass
class Run:
    seconds: float
    peak: int  # bytes: the largest process of the command
    out: str


@dataclass
class Line:
    what: str
    ours: str
    base: str
    ratio: str
    goal: str
    ok: bool | None


def config_text(base: Path, root: Path, keep: str, state: Path) -> str:
    cams = "".join(f"  {c}: {{name: {c}, level: 1}}\n" for c in camera_names_of(root))
    return f"""state_dir: {state}
timezone: UTC
socket: {base / "cmd-run" / "control.sock"}
socket_group: root
settle: 1m
sweep_every: 1d
guards:
  max_delete_fraction: 0.5
metrics:
  textfile: {base / "cmd-run" / "nvr_guard.prom"}
sites:
  {SITE}:
    keep: {keep}
    roots: [{root}]
    layout: "{LAYOUT}"
    timezone: UTC
cameras:
{cams}people:
  users:
    root: {{roles: [admin]}}
"""


def camera_names_of(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def nvr(config: Path, *args: str, bindir: Path | None = None) -> list[str]:
    exe = (bindir or Path(sys.executable).parent) / "nvr-guard"
    return [str(exe), "--config", str(config), *args]


def installed(base: Path) -> Path | None:
    """A venv with the project installed as `make install-service` installs it (not editable:
    the development venv's editable finder alone costs a command ~15 ms at start), made or
    brought up to date here; its bin directory, or None when pip cannot make it."""
    venv = base / "venv-installed"
    project = Path(__file__).resolve().parents[1]
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "-c",
                    str(project / "constraints.txt"),
                    str(project),
                ],
                check=True,
                capture_output=True,
            )
        else:  # the dependencies are there: only this tree's code again
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "--force-reinstall",
                    str(project),
                ],
                check=True,
                capture_output=True,
            )
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "compileall", "-q", str(venv / "lib")],
            check=False,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no installed venv ({exc}): status is measured with the development venv")
        return None
    return venv / "bin"


def leftovers(before: set[int]) -> list[str]:
    """Processes started by this benchmark since ``before`` that are still alive."""
    me = psutil.Process()
    out = []
    for p in me.children(recursive=True):
        if p.pid not in before:
            try:
                out.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            except psutil.Error:
                continue
    # orphans re-parented to init keep our session
    sid = os.getsid(0)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid in before or p.pid == me.pid or os.getsid(p.pid) != sid:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if "nvr_guard" in cmd or "nvr-guard" in cmd:
                out.append(f"{p.pid} {cmd[:80]}")
        except (psutil.Error, OSError):
            continue
    return sorted(set(out))


_HELPER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    t = time.perf_counter()
    p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    seconds = time.perf_counter() - t
    import resource
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    json.dump({"rc": p.returncode, "seconds": seconds, "peak": peak,
               "out": out.decode(errors="replace"), "err": err.decode(errors="replace")},
              sys.stdout)
    """
)


def measured(cmd: Sequence[str], strays: list[str], what: str) -> Run:
    """``cmd`` run by a small helper process that times it and reads its peak RSS from its own
    RUSAGE_CHILDREN (the largest of the command's processes), then a look for leftovers."""
    before = {p.pid for p in psutil.process_iter()}
    r = subprocess.run(
        [sys.executable, "-c", _HELPER, *cmd], capture_output=True, text=True, check=True
    )
    doc = json.loads(r.stdout)
    if doc["rc"] != 0:
        raise RuntimeError(f"{what}: exit {doc['rc']}: {doc['err'][-2000:]}")
    left = leftovers(before)
    if left:
        strays.append(f"{what}: {', '.join(left)}")
    return Run(float(doc["seconds"]), int(doc["peak"]), str(doc["out"]))


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int) -> None:
    """Start the peak (VmHWM) again from the current RSS (``echo 5 > clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Daemon:
    running: list[Daemon] = []  # stopped when the benchmark ends, however it ends

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = open(log, "ab")
        # the daemon tells systemd READY=1 once its start-up reconcile is done and it serves:
        # the bench stands in for systemd's notification socket
        addr = log.parent / "cmd-run" / "notify.sock"
        addr.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(addr))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            nvr(config, "daemon"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(addr)},
        )
        Daemon.running.append(self)

    def wait_ready(self, timeout: float = 900) -> float:
        """Seconds from the start until the daemon said READY=1; then its later messages are
        read (and dropped) on a thread, as systemd reads them."""
        self.notify.settimeout(1.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {self.proc.returncode}")
            try:
                msg = self.notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in msg.split(b"\n"):
                took = time.monotonic() - self.started
                threading.Thread(target=self._drain, daemon=True).start()
                return took
        raise RuntimeError("the daemon did not get ready in time")

    def _drain(self) -> None:
        while True:
            try:
                self.notify.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return

    def call(self, *args: str) -> Any:
        r = subprocess.run(nvr(self.config, "--json", *args), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{args}: exit {r.returncode}: {r.stderr}")
        return json.loads(r.stdout)

    def wait_catalogued(self, files: int, timeout: float = 900) -> float:
        """Seconds until status counts ``files`` segments (the daemon's first reconcile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {self.proc.returncode}")
            r = subprocess.run(nvr(self.config, "--json", "status"), capture_output=True)
            if r.returncode == 0:
                st = json.loads(r.stdout)
                if st["sites"][SITE]["segments"] >= files:
                    return time.monotonic()
            time.sleep(0.05)  # polling the daemon's answer; the value is its first yes
        raise RuntimeError("the daemon did not catalogue the tree in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        if not self.log.closed:
            self.log.close()
        self.notify.close()


def fresh_state(state: Path) -> None:
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, mode=0o700)


_AUDIT_FILL = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nvr_guard.store.audit import AuditLog
    from nvr_guard.store.catalog import Catalog
    state, n = Path(sys.argv[1]), int(sys.argv[2])
    log = AuditLog(Catalog(state / "catalog.db").conn, head_path=state / "audit.head")
    have = log.head()[0]
    while have < n:
        with log.transaction():
            for _ in range(min(50_000, n - have)):
                log.append_in("bench", "bench.entry", f"entry:{have}", {"n": have})
                have += 1
    print(have)
    """
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/nvrg-bench", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if os.geteuid() != 0:
        print("run as root: the daemon's state and the commands' local mode are root's")
        return 2
    shape: Shape = QUICK if args.quick else FULL
    base: Path = args.dir
    base.mkdir(parents=True, exist_ok=True)
    root, days = prepare(base, shape)
    files = int(
        subprocess.run(
            ["find", str(root), "-type", "f", "-name", "*.mp4"], capture_output=True, check=True
        ).stdout.count(b"\n")
    )
    if files != shape.files:
        print(f"the tree holds {files:,} files, not {shape.files:,}: making the missing ones")
        stamp(root, camera_names(shape), days)
        files = shape.files
    state = base / "cmd-state"
    (base / "cmd-run").mkdir(exist_ok=True)
    cfg = base / "cmd-config.yaml"
    other = base / "cmd-other.yaml"
    keep_all = f"{shape.days + 5}d"
    cfg.write_text(config_text(base, root, keep_all, state))
    other.write_text(config_text(base, root, f"{shape.days - shape.purge_days}d", state))
    bin_installed = installed(base)
    strays: list[str] = []
    lines: list[Line] = []
    peaks: list[tuple[str, int]] = []
    machine = f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"

    find_args = [str(root), "-type", "f", "-printf", r"%s %T@ %p\n"]
    run_find(find_args)  # warm the page cache
    find_runs = []
    for _ in range(max(3, args.repeat)):
        t = time.perf_counter()
        run_find(find_args)
        find_runs.append(time.perf_counter() - t)
    find_s = min(find_runs)
    print(f"find -printf: {', '.join(f'{x:.2f}' for x in find_runs)} s")

    # 1. cold plan, no daemon
    cold = []
    for _ in range(args.repeat):
        fresh_state(state)
        r = measured(nvr(cfg, "retention", "plan", "--rescan"), strays, "cold plan")
        cold.append(r)
    best = min(cold, key=lambda r: r.seconds)
    ratio = best.seconds / find_s
    lines.append(
        Line(
            "cold: retention plan, no daemon, empty state (walk + plan)",
            f"{best.seconds:.2f} s (runs {spread(r.seconds for r in cold)} s)",
            f"find {find_s:.2f} s",
            f"{ratio:.2f}x",
            "<= 2x",
            ratio <= 2.0,
        )
    )
    peaks.append(("retention plan, cold", max(r.peak for r in cold)))

    # 2. the daemon's cold start
    starts = []
    daemon_peak = 0
    d: Daemon | None = None
    for i in range(args.repeat):
        fresh_state(state)
        d = Daemon(cfg, base / "cmd-daemon.log")
        starts.append(d.wait_ready())
        d.wait_catalogued(files)
        daemon_peak = max(daemon_peak, vm_hwm(d.proc.pid))
        if i < args.repeat - 1:
            d.stop()
    assert d is not None
    ratio = min(starts) / find_s
    lines.append(
        Line(
            "daemon start, empty state, until READY=1 (the tree catalogued, serving)",
            f"{min(starts):.2f} s (runs {spread(starts)} s)",
            f"find {find_s:.2f} s",
            f"{ratio:.2f}x",
            "<= 2x",
            ratio <= 2.0,
        )
    )
    peaks.append(("daemon: start (cold reconcile)", daemon_peak))

    # 3. plan through the daemon; 4. preview of another config; 5. status
    via = [measured(nvr(cfg, "retention", "plan"), strays, "plan via daemon") for _ in range(5)]
    best = min(r.seconds for r in via)
    lines.append(
        Line(
            "retention plan, daemon running (from its catalog)",
            f"{best * 1000:.0f} ms (runs {spread((r.seconds * 1000 for r in via), 0)} ms)",
            f"find {find_s:.2f} s",
            f"1/{find_s / best:.0f}",
            "<= 1/10",
            best <= find_s / 10,
        )
    )
    peaks.append(("retention plan via the daemon (CLI)", max(r.peak for r in via)))
    previews = [
        measured(nvr(other, "retention", "plan"), strays, "preview of another config")
        for _ in range(args.repeat)
    ]
    assert "snapshot" in previews[0].out or "copy of the daemon" in previews[0].out, previews[0].out
    best = min(r.seconds for r in previews)
    lines.append(
        Line(
            f"--config other.yaml retention plan, daemon running ({shape.purge_days} days due)",
            f"{best:.2f} s (runs {spread(r.seconds for r in previews)} s)",
            f"find {find_s:.2f} s",
            f"{best / find_s:.2f}x",
            "<= 1x",
            best <= find_s,
        )
    )
    peaks.append(("retention plan of another config (copy)", max(r.peak for r in previews)))
    for where, bindir in (("installed", bin_installed), ("development venv", None)):
        if where == "installed" and bindir is None:
            continue
        cmd = nvr(cfg, "status", bindir=bindir)
        measured(cmd, strays, "status")  # its bytecode written, its files in the page cache
        status = [measured(cmd, strays, "status") for _ in range(20)]
        st_best = min(r.seconds for r in status)
        st_med = statistics.median(r.seconds for r in status)
        lines.append(
            Line(
                f"status round trip (whole process, {where})",
                f"best {st_best * 1000:.0f} ms, median {st_med * 1000:.0f} ms",
                "-",
                "-",
                "<= 150 ms",
                st_med <= 0.150,
            )
        )
    peaks.append(("status (CLI)", max(r.peak for r in status)))

    # 6. a backlog sweep through the daemon (after a reload to a shorter keep), then a million
    # audit entries verified
    cfg.write_text(config_text(base, root, f"{shape.days - shape.purge_days}d", state))
    d.call("reload")
    reset_hwm(d.proc.pid)
    t = time.perf_counter()
    # as a person runs it (the per-camera summary); `--json` lists every deleted segment
    swept = measured(nvr(cfg, "retention", "run"), strays, "retention run")
    sweep_s = time.perf_counter() - t
    found = re.search(r"deleted ([0-9,]+)", swept.out)
    deleted = int(found.group(1).replace(",", "")) if found else 0
    peaks.append(("daemon: sweep of the backlog", vm_hwm(d.proc.pid)))
    peaks.append(("retention run (CLI)", swept.peak))
    print(f"backlog sweep: {deleted:,} deleted in {sweep_s:.1f} s")
    d.stop()
    fill = subprocess.run(
        [sys.executable, "-c", _AUDIT_FILL, str(state), str(AUDIT_ENTRIES)],
        capture_output=True,
        text=True,
    )
    if fill.returncode != 0:
        raise RuntimeError(f"filling the audit log: {fill.stderr}")
    local = measured(nvr(cfg, "--json", "audit", "verify"), strays, "audit verify, no daemon")
    peaks.append((f"audit verify of {AUDIT_ENTRIES:,} entries, no daemon", local.peak))
    d = Daemon(cfg, base / "cmd-daemon.log")
    d.wait_catalogued(files - deleted)
    reset_hwm(d.proc.pid)
    via_d = measured(nvr(cfg, "--json", "audit", "verify"), strays, "audit verify via daemon")
    peaks.append(("daemon: audit verify", vm_hwm(d.proc.pid)))
    peaks.append(("audit verify (CLI, through the daemon)", via_d.peak))
    lines.append(
        Line(
            f"audit verify, {AUDIT_ENTRIES:,} entries",
            f"{local.seconds:.1f} s as root without the daemon, {via_d.seconds:.1f} s through it",
            "-",
            "-",
            "-",
            None,
        )
    )
    d.stop()

    # restore the backlog days for the next run
    stamp(root, camera_names(shape), days[: shape.purge_days])
    cfg.write_text(config_text(base, root, keep_all, state))

    for what, peak in peaks:
        lines.append(
            Line(
                f"peak RSS: {what}", f"{peak / MB:.0f} MB", "-", "-", "<= 150 MB", peak <= 150 * MB
            )
        )
    lines.append(
        Line(
            "processes left after a command exits",
            str(len(strays)),
            "-",
            "-",
            "0",
            not strays,
        )
    )
    report(lines, strays, machine, files, args.json)
    return 0


def spread(values: Any, digits: int = 2) -> str:
    v = list(values)
    return f"{min(v):.{digits}f}–{max(v):.{digits}f}"


def report(lines: list[Line], strays: list[str], machine: str, files: int, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "machine": machine,
                    "files": files,
                    "lines": [vars(x) for x in lines],
                    "strays": strays,
                },
                indent=2,
            )
        )
        return
    print(f"\nmachine: {machine}; tree: {files:,} files\n")
    print("| measure | nvr-guard | baseline | ratio | goal | result |")
    print("|---|---|---|---|---|---|")
    for x in lines:
        res = "-" if x.ok is None else ("PASS" if x.ok else "**FAIL**")
        print(f"| {x.what} | {x.ours} | {x.base} | {x.ratio} | {x.goal} | {res} |")
    for s in strays:
        print(f"left running: {s}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for d in Daemon.running:
            d.stop()
