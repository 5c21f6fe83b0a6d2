"""Web console under load: page times of 50 sessions while a retention sweep runs (issue 17).

    python bench/web.py [--dir /tmp/nvrg-bench] [--quick] [--duration S] [--clients N]
                        [--think S] [--json]

Runs as root, like the other benches. It builds (or reuses) ``bench/retention.py``'s tree of
empty segment files (20 cameras x 35 days of one-minute segments, about 1,000,000; ``--quick``:
10 cameras x 7 days, about 100,000) and a fresh state directory beside it, ``web-state``:

- 10,000 requests (``--quick``: 1,000) filed over the last 60 days, inserted in-process through
  the request store before the daemon starts (with their approvals, their state columns and one
  audit entry per act, as the workflow writes them): the recent ones pending (some with the first
  step approved), older ones approved, exported, denied, cancelled or expired;
- two manual holds over the oldest days of the site, so that the sweep the daemon runs when
  it starts deletes nothing: one over the footage that became due in the last 5 minutes before
  the bench began (the steady state), one over everything older (the backlog); ``keep`` makes
  those days due and ``guards.max_delete_fraction`` is 0.5, so that once the bench releases a
  hold a sweep deletes what it kept (steady state: 5 minutes and the daemon's start of 20
  cameras, a few hundred files; backlog: 5 days, 144,000 files; ``--quick``: 1 day) without
  the mass-deletion guard stopping it.

Then it starts a real daemon (``nvr-guard daemon``: it catalogues the tree at start, a cold
reconcile) and a real console (``nvr-guard web``, plain HTTP on 127.0.0.1, ``gateway_user:
root``). People are existing system accounts (``daemon``, ``bin``, ``lp`` ... : a session needs an
account the host resolves, not a password) given roles in ``people:``: operators who file,
department managers and security leads who decide, an auditor, an admin, a technician, a duty
manager. Each of the 50 clients gets its own session by calling ``auth.begin``/``auth.finish``
on the control socket as ``nobody`` (``web.auth_user``, the control socket's group
``nogroup``), as the password helper does after a
PAM check: the password check itself is not what is measured here.

Measured:

1. baseline: one client, no sweep: each page 20 times in a row, and ``/healthz`` (a page that
   only pings the daemon);
2. load, twice: 50 clients (asyncio + httpx, one connection and one session each) browsing in
   a loop ``/requests?waiting=me``, ``/requests``, a request of that list (``/requests/<id>``)
   and ``/status``, for ``--duration`` seconds (60; ``--quick``: 10), each waiting ``--think``
   seconds on average (uniform between half and one and a half times it; 1 s by default, a
   person reading a page) before its next page. Two seconds in, the bench releases a hold and
   asks the daemon for ``retention run`` as root (the sweep the scheduler runs every
   ``sweep_every``); the sweep runs beside the pages. First the backlog (5 days due at once, as
   after a long hold or an outage), then the steady state (the few minutes of footage a
   recorder finds due at each periodic sweep; after the backlog, since held due footage is
   planned again by every sweep).

Printed per page and overall: count, p50, p95, max, and p95 against the goal (300 ms: PASS or
FAIL), the same for the pages that were in flight while the sweep ran, the sweep's length and
deletions, pages per second, and the peak RSS (VmHWM) of the daemon and of the console. Page
times are measured by the client from sending the request to the last byte of the response.
Exit status is 0 unless the benchmark itself crashes: the PASS/FAIL column is information.

Afterwards the days the sweep deleted are put back into the tree (``retention.py`` reuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention import FULL, QUICK, Shape, camera_names, prepare_tree  # noqa: E402

from nvr_guard.wire import ControlClient  # noqa: E402

SITE = "bench"
# the password helper's account (web.auth_user): not the gateway's (root), not a person; the
# control socket's group is its group, so that it may connect
AUTH_USER = "nobody"
AUTH_USER_GROUP = "nogroup"
TLS = ssl.create_default_context()  # shared by the clients (plain HTTP: never used)
STEADY_WINDOW = 300.0  # seconds of footage the steady state's sweep finds due (and the start)
LAYOUT = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"
GOAL_MS = 300.0
REPO = Path(__file__).resolve().parents[1]

# account -> (roles, level); existing system accounts: a session needs one the host resolves
PEOPLE: dict[str, tuple[list[str], int]] = {
    "daemon": (["operator"], 2),
    "bin": (["operator"], 2),
    "sys": (["operator"], 1),
    "sync": (["operator"], 2),
    "games": (["operator"], 2),
    "man": (["operator"], 2),
    "lp": (["dept_manager"], 2),
    "mail": (["dept_manager"], 2),
    "news": (["dept_manager"], 1),
    "uucp": (["security_lead"], 2),
    "proxy": (["security_lead"], 2),
    "www-data": (["auditor"], 2),
    "backup": (["admin"], 2),
    "list": (["technician"], 2),
    "irc": (["duty_manager"], 2),
}
REQUESTERS = ["daemon", "bin", "sys", "sync", "games", "man", "lp", "mail"]
MANAGERS = ["lp", "mail", "news"]
LEADS = ["uucp", "proxy"]
# who the clients are: mostly people who file and decide, a few who read everything
CLIENT_USERS = [
    *["daemon", "bin", "sys", "sync", "games", "man"] * 3,
    *["lp", "mail", "news"] * 4,
    *["uucp", "proxy"] * 4,
    "www-data",
    "www-data",
    "backup",
    "backup",
    "list",
    "irc",
]
ROUTES = ("/requests?waiting=me", "/requests", "/requests/<id>", "/status")


# ---- state -----------------------------------------------------------------------------------


def _stamp_day(args: tuple[bytes, str, str]) -> int:
    """Create (if missing) a camera-day of segments with mtimes at their ends, as a recorder
    leaves them: a file modified long after its name's time is kept by the clock-skew rule."""
    root, camera, day = args
    t0 = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    base = os.path.join(root, camera.encode(), day.encode())
    for hour in range(24):
        d = os.path.join(base, b"%02d" % hour)
        os.makedirs(d, exist_ok=True)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for minute in range(60):
                name = b"%02d.00.mp4" % minute
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
                t = t0 + hour * 3600 + minute * 60 + 60
                os.utime(name, (t, t), dir_fd=dfd)
        finally:
            os.close(dfd)
    return 1440


def stamp(root: Path, cameras: list[str], days: list[str]) -> None:
    """``_stamp_day`` for every camera-day, in 4 worker processes."""
    jobs = [(os.fsencode(root), c, d) for c in cameras for d in days]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as ex:
        sum(ex.map(_stamp_day, jobs, chunksize=4))


def prepare(base: Path, shape: Shape) -> tuple[Path, list[str]]:
    """retention.py's tree, its files' mtimes at their segments' ends (done once per tree)."""
    root, days = prepare_tree(base, shape)
    marker = base / "tree-mtimes.json"
    if not marker.exists() or json.loads(marker.read_text()) != days:
        t = time.perf_counter()
        stamp(root, camera_names(shape), days)
        marker.write_text(json.dumps(days))
        print(f"set the segments' mtimes in {time.perf_counter() - t:.1f} s")
    return root, days


def config_text(base: Path, root: Path, shape: Shape, due_days: int, port: int) -> str:
    users = "".join(
        f"    {u}: {{roles: [{', '.join(r)}], level: {lv}}}\n" for u, (r, lv) in PEOPLE.items()
    )
    cams = "".join(
        f"  {c}: {{name: Camera {i}, level: {1 if i % 4 == 0 else 2}}}\n"
        for i, c in enumerate(camera_names(shape))
    )
    return f"""state_dir: {base / "web-state"}
timezone: UTC
socket: {base / "web-run" / "control.sock"}
socket_group: {AUTH_USER_GROUP}
settle: 1m
sweep_every: 1d
guards:
  max_delete_fraction: 0.5
sites:
  {SITE}:
    keep: {shape.days - due_days}d
    roots: [{root}]
    layout: "{LAYOUT}"
    timezone: UTC
cameras:
{cams}people:
  users:
    root: {{roles: [admin]}}
{users}approval:
  steps: [dept_manager, security_lead]
  hours: "00:00-23:59"
web:
  listen: "127.0.0.1:{port}"
  gateway_user: root
  auth_user: {AUTH_USER}
  auth_socket: {base / "web-run" / "auth.sock"}
  session_limit: 12h
  idle_timeout: 1h
"""


def seed(
    config_path: Path, shape: Shape, n_requests: int, days: list[str], due: int
) -> tuple[int, int]:
    """Requests, approvals and audit entries as the workflow writes them, and the holds over
    the due days: (the backlog's hold, the steady state's hold over the 5 minutes that became
    due last)."""
    from nvr_guard.config import load_config
    from nvr_guard.engine import Engine
    from nvr_guard.model import Approval, Recipient, Request
    from nvr_guard.workflow.record import rules_record

    cfg = load_config(config_path)
    engine = Engine(cfg)
    rng = random.Random(17)
    now = time.time()
    cams = camera_names(shape)
    first = datetime.strptime(days[due], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    last = datetime.strptime(days[-1], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    store = engine.workflow.store
    rules = engine.workflow.rules(SITE)
    audit = engine.audit
    t0 = time.perf_counter()
    created_times = sorted(now - rng.uniform(60, 60 * 86400) for _ in range(n_requests))
    counts: dict[str, int] = {}
    with engine.ctx.recording():
        for created in created_times:
            age = (now - created) / 86400
            roll = rng.random()
            if age < 3:
                state = "pending1" if roll < 0.3 else "pending" if roll < 0.7 else "approved"
                state = "denied" if roll > 0.92 else state
            elif age < 25:
                state = ("approved", "exported", "denied", "cancelled")[
                    0 if roll < 0.4 else 1 if roll < 0.75 else 2 if roll < 0.9 else 3
                ]
            else:
                state = ("exported", "denied", "cancelled", "expired")[
                    0 if roll < 0.5 else 1 if roll < 0.7 else 2 if roll < 0.8 else 3
                ]
            requester = rng.choice(REQUESTERS)
            start = rng.uniform(first, last - 3600)
            start -= start % 60
            r = store.create(
                Request(
                    id=0,
                    requester=requester,
                    site=SITE,
                    cameras=(rng.choice(cams),),
                    start=start,
                    end=start + 3600,
                    reason=f"incident report {rng.randrange(10**6):06d}: damage in the car park",
                    basis="internal investigation",
                    recipient=Recipient(unit="Security office", person="Wang", contact="x1234"),
                    format="mp4",
                    emergency=False,
                    state="pending",
                    created=created,
                )
            )
            audit.append_in(requester, "request.new", f"request:{r.id}", {"id": r.id})
            t = created + rng.uniform(600, 7200)
            mgr = rng.choice([m for m in MANAGERS if m != requester])
            lead = rng.choice(LEADS)
            fields: dict[str, Any] = {}
            if state != "pending":
                decision = "deny" if state == "denied" and roll > 0.5 else "approve"
                store.add_approval(r.id, Approval(mgr, "dept_manager", decision, "", t))
                audit.append_in(mgr, f"request.{decision}", f"request:{r.id}", {})
            if state in ("approved", "exported", "expired", "cancelled") or (
                state == "denied" and roll <= 0.5
            ):
                t += rng.uniform(600, 7200)
                decision = "deny" if state == "denied" else "approve"
                store.add_approval(r.id, Approval(lead, "security_lead", decision, "", t))
                audit.append_in(lead, f"request.{decision}", f"request:{r.id}", {})
                if decision == "approve":
                    fields["approved_at"] = t
            stored = "pending" if state == "pending1" else state
            if stored == "exported":
                fields |= {"exported_at": t + 3600, "exporter": "list", "package": "pkg"}
                audit.append_in("list", "export.done", f"request:{r.id}", {})
            if stored in ("denied", "cancelled", "expired"):
                fields["closed_at"] = t
            if stored != "pending":
                fields["state"] = stored
                fields["judged_by"] = rules_record(rules, r, t, cfg.digest)
            if stored in ("pending", "approved"):  # its footage is held, as request new does
                engine.catalog.add_hold(
                    kind="request",
                    site=SITE,
                    camera=r.cameras[0],
                    start=r.start - 600,
                    end=r.end + 600,
                    reason=f"request {r.id}: {r.reason}",
                    owner=requester,
                    created=created,
                    request_id=r.id,
                    roots=engine.ctx.roots_of(SITE),
                )
            if fields:
                store.update(r.id, **fields)
            counts[stored] = counts.get(stored, 0) + 1
        cutoff = datetime.strptime(days[due], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        # what became due in the last 5 minutes (and while the daemon starts): the steady
        # state's sweep; everything older: the backlog
        recent = now - (shape.days - due) * 86400 - STEADY_WINDOW
        hold = engine.catalog.add_hold(
            kind="manual",
            site=SITE,
            camera=None,
            start=0.0,
            end=recent,
            reason="bench: kept until the backlog's load starts",
            owner="root",
            created=now,
            roots=engine.ctx.roots_of(SITE),
        )
        steady = engine.catalog.add_hold(
            kind="manual",
            site=SITE,
            camera=None,
            start=recent,
            end=cutoff + 86400,
            reason="bench: kept until the steady state's load starts",
            owner="root",
            created=now,
            roots=engine.ctx.roots_of(SITE),
        )
    engine.catalog.close()
    print(
        f"filed {n_requests:,} requests in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    )
    return hold.id, steady.id


# ---- processes -------------------------------------------------------------------------------


@dataclass
class Procs:
    config: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        fh = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.config), *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )
        self.procs[name] = p
        return p

    def peak_rss(self, name: str) -> int:
        """The process's peak resident set (VmHWM), bytes."""
        p = self.procs[name]
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop_all(self) -> None:
        for name in ("web", "daemon"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def wait_for(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)  # polling for a process to come up, with a deadline
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


def call(sock: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    with ControlClient(sock, timeout) as c:
        return c.call(cmd, args)


def open_session(sock: Path, user: str) -> str:
    """A session for ``user``, opened the way the password helper does after PAM said yes."""
    got = call(sock, "auth.begin", {"user": user, "client": "127.0.0.1"})
    if not got.get("allowed"):
        raise RuntimeError(f"auth.begin refused {user}: {got}")
    got = call(sock, "auth.finish", {"user": user, "client": "127.0.0.1", "ok": True})
    return str(got["session"])


def _sessions_as_helper(sock: Path, users: list[str], out: Any) -> None:
    pw = pwd.getpwnam(AUTH_USER)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    out.send([open_session(sock, u) for u in users])
    out.close()


def open_sessions(sock: Path, users: list[str]) -> list[str]:
    """Sessions for ``users``, asked for by a child process running as ``web.auth_user``
    (the daemon takes auth.* only from that account, and it must not be the gateway's)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_sessions_as_helper, args=(sock, users, send))
    child.start()
    send.close()
    tokens: list[str] = recv.recv()
    child.join(60)
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- measurement -----------------------------------------------------------------------------


@dataclass
class Sample:
    route: str
    start: float
    took: float
    status: int


def summarise(samples: list[Sample]) -> dict[str, float]:
    ms = sorted(s.took * 1000 for s in samples)
    if not ms:
        return {"count": 0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    p95 = ms[min(len(ms) - 1, max(0, int(round(0.95 * len(ms))) - 1))]
    return {"count": len(ms), "p50": statistics.median(ms), "p95": p95, "max": ms[-1]}


async def fetch(client: httpx.AsyncClient, route: str, path: str, out: list[Sample]) -> str:
    t = time.perf_counter()
    r = await client.get(path)
    body = r.text
    out.append(Sample(route, t, time.perf_counter() - t, r.status_code))
    return body


ID_RE = re.compile(r'href="/requests/(\d+)"')


async def browse(
    url: str,
    token: str,
    until: float,
    think: float,
    out: list[Sample],
    rng: random.Random,
) -> None:
    cookies = {"nvr-guard-session": token}
    # one TLS context for every client: httpx builds one per client otherwise (loading the CA
    # bundle, about 0.1 s of CPU each), which held the first pages of 50 clients back by seconds
    async with httpx.AsyncClient(base_url=url, cookies=cookies, timeout=120, verify=TLS) as client:
        await asyncio.sleep(rng.uniform(0, think))  # people do not all click at once
        ids: list[str] = []
        i = rng.randrange(len(ROUTES))
        while time.perf_counter() < until:
            route = ROUTES[i % len(ROUTES)]
            i += 1
            if route == "/requests/<id>":
                path = f"/requests/{rng.choice(ids)}" if ids else "/requests"
                if not ids:
                    route = "/requests"
            else:
                path = route
            body = await fetch(client, route, path, out)
            if route.startswith("/requests") and "<id>" not in route:
                found = ID_RE.findall(body)
                if found:
                    ids = found
            if think > 0:
                await asyncio.sleep(rng.uniform(0.5 * think, 1.5 * think))


def baseline(url: str, token: str, rounds: int) -> list[Sample]:
    out: list[Sample] = []

    async def run() -> None:
        async with httpx.AsyncClient(
            verify=TLS, base_url=url, cookies={"nvr-guard-session": token}, timeout=120
        ) as client:
            ids: list[str] = []
            for _ in range(rounds):
                await fetch(client, "/healthz", "/healthz", out)
                for route in ROUTES:
                    if route == "/requests/<id>":
                        if not ids:
                            continue
                        path = f"/requests/{ids[0]}"
                    else:
                        path = route
                    body = await fetch(client, route, path, out)
                    ids = ids or ID_RE.findall(body)

    asyncio.run(run())
    return out


@dataclass
class Sweep:
    t0: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_sweep(sock: Path, hold_id: int, delay: float, sweep: Sweep) -> None:
    time.sleep(delay)  # the load runs for a while before the sweep starts (a schedule)
    try:
        call(sock, "hold.release", {"id": hold_id, "reason": "bench: the load begins"})
        sweep.started = time.perf_counter()
        sweep.result = call(sock, "retention.run", {}, timeout=1800)
    except Exception as exc:  # reported, the load goes on
        sweep.error = str(exc)
    finally:
        sweep.ended = time.perf_counter()


def load(
    url: str, tokens: list[str], duration: float, think: float, sock: Path, hold_id: int
) -> tuple[list[Sample], Sweep, float]:
    out: list[Sample] = []
    sweep = Sweep()
    t0 = sweep.t0 = time.perf_counter()
    until = t0 + duration
    th = threading.Thread(target=run_sweep, args=(sock, hold_id, 2.0, sweep), daemon=True)
    th.start()

    async def run() -> None:
        await asyncio.gather(
            *(browse(url, tok, until, think, out, random.Random(i)) for i, tok in enumerate(tokens))
        )

    asyncio.run(run())
    elapsed = time.perf_counter() - t0
    th.join(1800)
    return out, sweep, elapsed


# ---- report ----------------------------------------------------------------------------------


def table(title: str, groups: list[tuple[str, list[Sample]]], goal: bool) -> list[dict[str, Any]]:
    print(f"\n{title}")
    head = f"{'page':<24}{'count':>7}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
    print(head + ("   goal p95 <= 300 ms" if goal else ""))
    rows = []
    for name, samples in groups:
        s = summarise(samples)
        bad = sum(1 for x in samples if x.status >= 400)
        line = f"{name:<24}{s['count']:>7}{s['p50']:>9.0f}{s['p95']:>9.0f}{s['max']:>9.0f}"
        verdict = None
        if goal and s["count"]:
            verdict = s["p95"] <= GOAL_MS
            line += f"   {'PASS' if verdict else 'FAIL'}"
        if bad:
            line += f"   ({bad} answered >= 400)"
        print(line)
        rows.append({"page": name, **s, "errors": bad, "pass": verdict})
    return rows


def by_route(samples: list[Sample], routes: tuple[str, ...]) -> list[tuple[str, list[Sample]]]:
    groups = [(r, [s for s in samples if s.route == r]) for r in routes]
    return [g for g in groups if g[1]] + [("all pages", samples)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dir", help="tree and state (/tmp/nvrg-bench; --quick: /tmp/nvrg-bench-quick)"
    )
    ap.add_argument("--quick", action="store_true", help="100k segments, 1,000 requests, 10 s")
    ap.add_argument("--duration", type=float, help="seconds of load (60; --quick: 10)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--think", type=float, default=1.0, help="mean seconds between pages")
    ap.add_argument("--requests", type=int, help="requests in the state (10,000; --quick 1,000)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/web.py runs as root (the daemon, gateway and password helper user)")
        return 2
    missing = [u for u in PEOPLE if not _exists(u)]
    if missing:
        print(f"these system accounts are missing: {', '.join(missing)}")
        return 2
    shape = QUICK if args.quick else FULL
    duration = args.duration or (10.0 if args.quick else 60.0)
    n_requests = args.requests or (1_000 if args.quick else 10_000)
    due = shape.purge_days
    base = Path(args.dir or ("/tmp/nvrg-bench-quick" if args.quick else "/tmp/nvrg-bench"))
    base.mkdir(parents=True, exist_ok=True)
    root, days = prepare(base, shape)
    for d in ("web-state", "web-run"):
        shutil.rmtree(base / d, ignore_errors=True)
        (base / d).mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = base / "web-config.yaml"
    config.write_text(config_text(base, root, shape, due, port))
    sock = base / "web-run" / "control.sock"
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    hold_id, steady_id = seed(config, shape, n_requests, days, due)
    procs = Procs(config, base)
    results: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        daemon = procs.spawn("daemon", "daemon")
        wait_for(
            "the daemon",
            lambda: call(sock, "status", timeout=60)["sites"][SITE]["segments"] > 0,
            900,
            daemon,
        )
        segments = call(sock, "status", timeout=300)["sites"][SITE]["segments"]
        print(f"daemon up with {segments:,} segments in {time.perf_counter() - t:.1f} s")
        web = procs.spawn("web", "web")
        wait_for("the console", lambda: httpx.get(url + "/healthz").status_code == 200, 60, web)
        tokens = open_sessions(
            sock, [CLIENT_USERS[i % len(CLIENT_USERS)] for i in range(args.clients)]
        )

        base_samples = baseline(url, open_sessions(sock, ["lp"])[0], 20)
        results["baseline"] = table(
            "baseline: one client (a department manager), no sweep, 20 rounds",
            by_route(base_samples, ("/healthz", *ROUTES)),
            goal=False,
        )

        # the backlog first: while its days stand held and due, every sweep plans (and records)
        # them all, which is not the steady state of a recorder
        scenarios = (
            ("backlog", f"backlog: a purge of {due} days due", hold_id),
            ("steady", "steady state: the periodic sweep, a few minutes of footage due", steady_id),
        )
        for key, what, hold in scenarios:
            samples, sweep, elapsed = load(url, tokens, duration, args.think, sock, hold)
            res: dict[str, Any] = {}
            res["load"] = table(
                f"{what}: {len(tokens)} sessions, {elapsed:.0f} s, think time {args.think:g} s "
                f"({len(samples) / elapsed:.1f} pages/s), the sweep during it",
                by_route(samples, ROUTES),
                goal=True,
            )
            during = [
                s for s in samples if s.start < sweep.ended and s.start + s.took > sweep.started
            ]
            res["during_sweep"] = table(
                f"{key}: pages in flight while the sweep ran",
                by_route(during, ROUTES),
                goal=True,
            )
            ends = sorted(x.start + x.took - sweep.t0 for x in samples)
            if ends:
                print(
                    f"{key}: {len(samples)} pages answered from {ends[0]:.1f} s to "
                    f"{ends[-1]:.1f} s into the load"
                )
            if sweep.error:
                print(f"\n{key} sweep failed: {sweep.error}")
            else:
                print(
                    f"\n{key} sweep: {sweep.ended - sweep.started:.1f} s (from "
                    f"{sweep.started - sweep.t0:.1f} s into the load), "
                    f"deleted {sweep.result.get('deleted', 0):,} segments"
                )
            res["sweep"] = {
                "seconds": round(sweep.ended - sweep.started, 2),
                "deleted": sweep.result.get("deleted"),
                "error": sweep.error,
            }
            results[key] = res
        rss = {name: procs.peak_rss(name) for name in ("daemon", "web")}
        print(
            f"peak RSS: daemon {rss['daemon'] / 2**20:.0f} MB, console {rss['web'] / 2**20:.0f} MB"
        )
        results["peak_rss"] = rss
    finally:
        procs.stop_all()
        # put back what the sweep deleted (and the partly due day): retention.py reuses the tree
        stamp(root, camera_names(shape), days[: due + 1])
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    sys.exit(main())
