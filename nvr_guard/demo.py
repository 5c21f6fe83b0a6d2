"""`make demo`: a small recording tree for four sites, and the real daemon running on it.

It generates footage spanning more than a year (two segments a day per camera, and one real
six-second clip), a config with one site per built-in profile, places a manual legal hold, starts
`nvr-guard daemon` in the foreground, shows the mass-deletion guard stopping the first sweep,
confirms it the way an admin would, and prints what each site keeps, holds and purged, and why.

Then, as root, it walks an export the way the people involved would: demo Unix users
(``nvrdemo-*``, system accounts without login or home) each run the CLI as a separate process
that talks to the daemon over its control socket: a request for a few seconds of the clip, two
approvals, the technician's ClamAV scan of the export target and the export, and the package
checked with ``verify --fingerprint``. It prints each command and its outcome, and where the
package is.

It then goes on recording a segment now and then until Ctrl-C, which stops the daemon cleanly
(``--once``: stop after the walk-through). Ctrl-C at any point stops the daemon. The demo users
and their groups stay, so that the demo's config keeps working; a second run starts over with
them, and ``--remove-users`` (``make clean``) removes them.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

console = Console(highlight=False)
SH = ZoneInfo("Asia/Shanghai")
DAYS = 400
STEP_H = 12

SITES: dict[str, dict[str, Any]] = {
    "toll-station": {
        "profile": "highway",
        "cameras": ["toll-01", "toll-02"],
        "layout": "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
        "tz": SH,
    },
    "compound": {
        "profile": "residential",
        "cameras": ["gate-01", "gate-02"],
        "layout": None,
        "tz": SH,
    },
    "lobby": {
        "profile": "general",
        "cameras": ["front", "atm"],
        "layout": "%Y-%m-%d/%H/{camera}/%M.%S.mp4",
        "tz": UTC,
    },
    "campus": {
        "profile": "school",
        "cameras": ["hall", "yard"],
        "layout": "{camera}/%Y-%m-%d/%H/%M.%S.mp4",
        "tz": SH,
    },
}

# The real clip the walk-through exports: a few seconds of ffmpeg's test pattern, recorded
# half an hour ago on the toll station's exit camera (the filler segments are 12 h apart).
CLIP_SITE, CLIP_CAMERA = "toll-station", "toll-01"
CLIP_SECONDS = 6
CLIP_AGO = timedelta(minutes=30)

# The demo's people: Unix users made for the walk-through, in a group that may reach the
# control socket; the technician is also in the group that may read export packages.
SOCKET_GROUP = "nvrdemo"
EXPORT_GROUP = "nvrdemo-export"
MARK = "nvr-guard demo user (make demo)"  # the accounts' comment: only these are ever removed
REQUESTER, MANAGER, SECURITY, TECHNICIAN = (
    "nvrdemo-alice",
    "nvrdemo-bob",
    "nvrdemo-carol",
    "nvrdemo-tom",
)
PEOPLE: dict[str, tuple[str, bool]] = {  # user -> (role, in the export group)
    REQUESTER: ("operator", False),
    MANAGER: ("dept_manager", False),
    SECURITY: ("security_lead", False),
    TECHNICIAN: ("technician", True),
}


class Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, held back while accounts are being changed."""

    def __init__(self) -> None:
        self.shield = 0
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.shield:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Finish the block first (useradd and friends must not be killed half-way)."""
        self.shield += 1
        try:
            yield
        finally:
            self.shield -= 1
        if not self.shield and self.pending:
            self.pending = False
            raise KeyboardInterrupt


interrupts = Interrupts()


def segment_path(root: Path, site: dict[str, Any], camera: str, t: datetime) -> Path:
    if site["layout"] is None:  # no layout: camera directory, recorded time = mtime
        return root / camera / t.astimezone(SH).strftime("%Y%m%d-%H%M%S.mp4")
    local = t.astimezone(site["tz"])
    rel = site["layout"].replace("{camera}", camera)
    return root / local.strftime(rel)


def record_clip(path: Path, start: datetime) -> None:
    """A real H.264 segment (ffmpeg's test pattern, 320x240), closed CLIP_SECONDS after start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src = f"testsrc2=size=320x240:rate=25:duration={CLIP_SECONDS}"
    argv = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", str(path)]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, start_new_session=True)
    ts = start.timestamp() + CLIP_SECONDS
    os.utime(path, (ts, ts))


def clamav_database(base: Path) -> Path | None:
    """None when this machine has ClamAV's signatures (freshclam ran); else a one-signature
    database for the demo (the EICAR test pattern), so that `media scan` really runs ClamAV."""
    system = Path("/var/lib/clamav")
    if system.is_dir() and any(p.suffix in (".cvd", ".cld") for p in system.iterdir()):
        return None
    db = base / "clamav-db"
    db.mkdir()
    eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "-".join(
        ["EICAR", "STANDARD", "ANTIVIRUS", "TEST", "FILE!"]
    )
    (db / "nvrdemo.ndb").write_text(f"NVRG.Demo.EICAR:0:*:{(eicar + '$H+H*').encode().hex()}\n")
    return db


def generate(base: Path, now: datetime, people: bool) -> Path:
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / "state").mkdir(mode=0o700)
    counts: Counter[str] = Counter()
    clip_start = now - CLIP_AGO
    for name, site in SITES.items():
        root = base / "recordings" / name
        root.mkdir(parents=True)
        for cam in site["cameras"]:
            t = now - timedelta(days=DAYS)
            while t < now - timedelta(minutes=10):
                p = segment_path(root, site, cam, t)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"\0" * 4096)
                ts = t.timestamp() + 60
                os.utime(p, (ts, ts))
                counts[name] += 1
                t += timedelta(hours=STEP_H)
        # a file that is not a segment and one symlink: never touched
        (root / "README.txt").write_text("recorder notes - not footage\n")
    clip = segment_path(base / "recordings" / CLIP_SITE, SITES[CLIP_SITE], CLIP_CAMERA, clip_start)
    record_clip(clip, clip_start)
    counts[CLIP_SITE] += 1
    outside = base / "outside-evidence.mp4"
    outside.write_bytes(b"\0" * 100)
    os.symlink(outside, base / "recordings" / "toll-station" / "toll-01" / "link-to-outside.mp4")
    config = f"""# nvr-guard demo config (generated by `make demo`)
state_dir: {base / "state"}
timezone: Asia/Shanghai
socket: {base / "run" / "control.sock"}
socket_group: {SOCKET_GROUP if people else "root"}
sweep_every: 30s
settle: 2m
guards: {{max_delete_fraction: 0.2, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
"""
    for name, site in SITES.items():
        root = base / "recordings" / name
        config += f"  {name}:\n    profile: {site['profile']}\n    roots: [{root}]\n"
        if site["layout"]:
            config += f'    layout: "{site["layout"]}"\n'
            if site["tz"] is UTC:
                config += "    layout_timezone: UTC\n"
    config += """cameras:
  toll-01: {level: 2, name: "收费站出口"}
  atm: {level: 1, name: "ATM"}
people:
  users:
    root: {roles: [admin]}
"""
    if people:
        for user, (role, _) in PEOPLE.items():
            config += f"    {user}: {{roles: [{role}], level: 2}}\n"
        (base / "run").mkdir(mode=0o750)  # as the unit's RuntimeDirectoryMode makes it
        os.chown(base / "run", 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
        target = base / "export"
        target.mkdir()
        os.chown(target, 0, grp.getgrnam(EXPORT_GROUP).gr_gid)
        os.chmod(target, 0o2750)  # the README's `chgrp nvr-guard-export && chmod 2750`
        config += f"""approval:
  steps: [dept_manager, security_lead]
  hours: "00:00-24:00"   # the demo exports at any hour (default 08:00-20:00)
export:
  targets: [{target}]
  group: {EXPORT_GROUP}
  preset: ultrafast       # a quick demo; the default is medium
"""
        db = clamav_database(base)
        if db is not None:
            config += f"media: {{scanner: clamscan, database: {db}}}\n"
    (base / "config.yaml").write_text(config)
    os.chmod(base / "config.yaml", 0o644)  # the demo users' CLI reads it, whatever the umask
    os.chmod(base, 0o755)
    console.print(
        f"generated {sum(counts.values())} segments over {DAYS} days: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; {CLIP_CAMERA}'s latest is a real {CLIP_SECONDS} s clip (ffmpeg test pattern)"
    )
    return base / "config.yaml"


def as_user(user: str) -> dict[str, Any]:
    """subprocess arguments running a child as ``user`` with the groups a login gives them."""
    pw = pwd.getpwnam(user)
    return {
        "user": pw.pw_uid,
        "group": pw.pw_gid,
        "extra_groups": os.getgrouplist(user, pw.pw_gid),
        "cwd": "/",
    }


def nvr(
    cfg: Path, *args: str, check: bool = True, show: bool = True, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nvr_guard", "--config", str(cfg), *args]
    if show:
        prompt = f"{user}$" if user else "$"
        console.print(f"[bold cyan]{prompt} nvr-guard {shlex.join(args)}[/]", soft_wrap=True)
    # its own session: Ctrl-C reaches the demo, which stops the child (subprocess.run kills
    # it on KeyboardInterrupt) and then the daemon, in that order
    res = subprocess.run(
        cmd,
        text=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **(as_user(user) if user else {}),
    )
    if check and res.returncode not in (0, 3):
        console.print(res.stdout, res.stderr, markup=False)
        raise SystemExit(f"demo: `nvr-guard {' '.join(args)}` failed with exit {res.returncode}")
    return res


def wait_for(pred: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)  # polling a real daemon at a human pace
    raise SystemExit(f"demo: timed out waiting for {what}")


def summary(cfg: Path, base: Path) -> None:
    # `status` may exit 1 while something needs attention; its JSON is complete either way
    st = json.loads(nvr(cfg, "--json", "status", show=False, check=False).stdout)
    audit = json.loads(nvr(cfg, "--json", "audit", "show", show=False).stdout)["entries"]
    purged: dict[str, int] = defaultdict(int)
    for e in audit:
        if e["action"] == "purge.receipt":
            purged[e["details"]["site"]] += int(e["details"]["count"])
    t = Table(title="what each site keeps, holds and purged, and why", header_style="bold")
    for col in ("site", "profile / rule", "kept", "oldest kept", "purged", "why"):
        t.add_column(col)
    holds = st["holds"]
    for name, s in st["sites"].items():
        why = f"older than {s['rule'].split()[0].removeprefix('keep=')} is past the ceiling"
        held = [h for h in holds if h["site"] == name]
        if held:
            h = held[0]
            why += (
                f"; hold {h['id']} keeps {h['camera']} {h['from'][:10]}..{h['to'][:10]}"
                f" ({h['reason']})"
            )
        t.add_row(
            name,
            f"{s['profile']}: {s['rule']}",
            str(s["segments"]),
            (s["oldest"] or "-")[:16],
            str(purged.get(name, 0)),
            why,
        )
    console.print(t)
    link = base / "recordings" / "toll-station" / "toll-01" / "link-to-outside.mp4"
    console.print(
        f"symlink inside a root still there: {link.is_symlink()}, its target outside untouched: "
        f"{(base / 'outside-evidence.mp4').exists()}; README.txt (not a segment) untouched: "
        f"{(base / 'recordings' / 'toll-station' / 'README.txt').exists()}"
    )


# -- the demo's people ---------------------------------------------------------------------


def _exists(getter: Any, name: str) -> Any:
    try:
        return getter(name)
    except KeyError:
        return None


def foreign_accounts() -> list[str]:
    """Accounts and groups with a demo name that the demo did not make: it never takes them
    over (a group it would reuse could let its other members read the demo's packages)."""
    users = [
        n for n in PEOPLE if (pw := _exists(pwd.getpwnam, n)) is not None and pw.pw_gecos != MARK
    ]
    return users + foreign_groups()


def _demo_users() -> set[str]:
    return {n for n in PEOPLE if getattr(_exists(pwd.getpwnam, n), "pw_gecos", None) == MARK}


def foreign_groups() -> list[str]:
    """Demo-named groups that someone other than the demo's own users belongs to (as a member
    or by primary group): groups have no mark of their maker, so their members tell."""
    ours = _demo_users()
    out = []
    for g in (SOCKET_GROUP, EXPORT_GROUP):
        gr = _exists(grp.getgrnam, g)
        if gr is None:
            continue
        if any(m not in ours for m in gr.gr_mem) or any(
            pw.pw_gid == gr.gr_gid and pw.pw_name not in ours for pw in pwd.getpwall()
        ):
            out.append(g)
    return out


def add_people() -> None:
    """The demo's groups and users, made now or taken over from a run that was killed; each
    with exactly the groups the walk-through needs."""
    with interrupts.shielded():
        for g in (SOCKET_GROUP, EXPORT_GROUP):
            if _exists(grp.getgrnam, g) is None:
                subprocess.run(["groupadd", "--system", g], check=True)
        for name, (_, exporter) in PEOPLE.items():
            if _exists(pwd.getpwnam, name) is None:
                argv = ["useradd", "--system", "-M", "-N", "-g", SOCKET_GROUP, "-c", MARK]
                subprocess.run([*argv, "-s", "/usr/sbin/nologin", name], check=True)
            groups = EXPORT_GROUP if exporter else ""
            subprocess.run(["usermod", "-g", SOCKET_GROUP, "-G", groups, name], check=True)


def remove_people() -> list[str]:
    """Remove the demo's users (only those it made) and then its groups; returns what is left."""
    left = []
    for name in PEOPLE:
        pw = _exists(pwd.getpwnam, name)
        if pw is not None and pw.pw_gecos == MARK:
            r = subprocess.run(["userdel", name], capture_output=True, text=True)
            if r.returncode != 0:
                left.append(f"user {name} ({r.stderr.strip()})")
    foreign = foreign_groups()
    for g in (EXPORT_GROUP, SOCKET_GROUP):
        if g in foreign:
            left.append(f"group {g} (others belong to it: not the demo's)")
        elif _exists(grp.getgrnam, g) is not None:
            r = subprocess.run(["groupdel", g], capture_output=True, text=True)
            if r.returncode != 0:
                left.append(f"group {g} ({r.stderr.strip()})")
    return left


def remove_users_command() -> int:
    """``--remove-users``: exit 0 when no demo account is left."""
    present = [n for n in PEOPLE if getattr(_exists(pwd.getpwnam, n), "pw_gecos", None) == MARK]
    present += [g for g in (SOCKET_GROUP, EXPORT_GROUP) if _exists(grp.getgrnam, g) is not None]
    if not present:
        return 0
    if os.geteuid() != 0:
        print(f"demo: only root can remove the demo accounts {', '.join(present)}", file=sys.stderr)
        return 1
    left = remove_people()
    for what in left:
        print(f"demo: not removed: {what}", file=sys.stderr)
    if not left:
        print(f"removed the demo accounts {', '.join(present)}")
    return 1 if left else 0


def people_can_run(cfg: Path) -> str | None:
    """None when a demo user can run this CLI on this config; else why not."""
    r = subprocess.run(
        [sys.executable, "-m", "nvr_guard", "--config", str(cfg), "config", "check"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **as_user(REQUESTER),
    )
    if r.returncode == 0:
        return None
    why = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
    return (
        f"{REQUESTER} cannot run `{sys.executable} -m nvr_guard` on {cfg}: {why}. The source "
        "tree, its virtualenv and the demo directory must be readable by other users (a clone "
        "under /root is not): clone it under /opt or /srv, or set NVR_GUARD_DEMO_DIR"
    )


# -- the walk-through ----------------------------------------------------------------------


def step(cfg: Path, user: str, *args: str, lines: int = 8) -> subprocess.CompletedProcess[str]:
    """One command as one person: the command line, then what it printed and its exit code."""
    res = nvr(cfg, *args, check=False, user=user)
    out = (res.stdout.strip() + "\n" + res.stderr.strip()).strip().splitlines()
    if "--json" not in args and out:
        shown = out if len(out) <= lines else [*out[:lines], f"... ({len(out) - lines} more)"]
        console.print("\n".join("    " + line for line in shown), markup=False, soft_wrap=True)
    if res.returncode != 0:
        console.print(res.stdout, res.stderr, markup=False)
        raise SystemExit(f"demo: `nvr-guard {shlex.join(args)}` as {user} exited {res.returncode}")
    return res


def outcome(text: str) -> None:
    console.print(f"    [green]-> {text}[/]", soft_wrap=True)


def walk_export(cfg: Path, base: Path, now: datetime) -> tuple[Path, str]:
    """Request -> approve -> scan -> export -> verify, each as its own person and process."""
    target = base / "export"
    start = now - CLIP_AGO
    t_from = (start + timedelta(seconds=1)).astimezone(SH).strftime("%Y-%m-%dT%H:%M:%S")
    t_to = (start + timedelta(seconds=5)).astimezone(SH).strftime("%Y-%m-%dT%H:%M:%S")
    console.print(
        Panel(
            "An export, as the people involved do it. Each command below runs as that Unix user "
            f"(runuser -u USER -- nvr-guard --config {cfg} ...), a separate process that the "
            "daemon knows by its uid on the control socket; the roles come from `people:` in "
            f"the config: {REQUESTER} operator, {MANAGER} dept_manager, {SECURITY} "
            f"security_lead, {TECHNICIAN} technician (also in the group {EXPORT_GROUP}, which "
            "may read packages).",
            style="blue",
        )
    )
    r = step(
        cfg,
        REQUESTER,
        "--json",
        "request",
        "new",
        "--camera",
        CLIP_CAMERA,
        "--from",
        t_from,
        "--to",
        t_to,
        "--reason",
        "hit and run at exit 3",
        "--basis",
        "刑事诉讼法 art. 54",
        "--recipient",
        "City police, traffic unit; Officer Wang; 010-5555",
    )
    rid = str(json.loads(r.stdout)["id"])
    outcome(f"request {rid} filed (exit 0); its footage is held while it is decided")
    for who in (MANAGER, SECURITY):
        step(cfg, who, "request", "approve", rid, lines=1)
        outcome("approved (exit 0)")
    step(cfg, TECHNICIAN, "media", "scan", str(target))
    outcome("the export target is clean (exit 0): exports may go there for the next 15 min")
    r = step(cfg, TECHNICIAN, "--json", "export", "run", rid, "--media", str(target))
    pkg = Path(json.loads(r.stdout)["package"])
    outcome(f"exported (exit 0): {pkg}")
    r = step(cfg, TECHNICIAN, "--json", "key", "show")
    fingerprint = str(json.loads(r.stdout)["fingerprint"])
    outcome(f"the recorder's signing key is {fingerprint} (also on the printed approval record)")
    step(cfg, TECHNICIAN, "verify", str(pkg), "--fingerprint", fingerprint)
    outcome("the package verifies against the pinned key (exit 0)")
    return pkg, fingerprint


def show_package(pkg: Path, fingerprint: str, cfg: Path) -> None:
    files = ", ".join(sorted(p.name for p in pkg.iterdir()))
    console.print(
        Panel(
            f"The package is in {pkg}\n({files})\n"
            f"Open approval-record.html there for the paper record (审批表). Check it again "
            f"with: nvr-guard verify {pkg} --fingerprint {fingerprint}\n"
            "It stays there until the next demo starts over. While the daemon runs, try the "
            "CLI as one of the demo users, e.g.: "
            f"runuser -u {SECURITY} -- {sys.executable} -m nvr_guard --config {cfg} request list",
            style="green",
        )
    )
    # one plain line, never wrapped, for scripts
    print(f"package: {pkg}", flush=True)


# -- the demo ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nvr_guard.demo", description=__doc__)
    ap.add_argument(
        "--once",
        action="store_true",
        help="stop after the walk-through instead of recording until Ctrl-C",
    )
    ap.add_argument(
        "--remove-users",
        action="store_true",
        help="remove the demo's Unix users and groups (make clean), and nothing else",
    )
    opts = ap.parse_args(argv)
    if opts.remove_users:
        sys.exit(remove_users_command())
    interrupts.install()
    try:
        run(opts.once)
    except KeyboardInterrupt:
        console.print("demo interrupted; everything it started is stopped")
        sys.exit(130)


def run(once: bool) -> None:
    if os.geteuid() != 0:
        raise SystemExit(
            "demo: run it as root (`sudo make demo`): it places a hold before its daemon starts "
            "and creates the Unix users of the export walk-through"
        )
    base = Path(os.environ.get("NVR_GUARD_DEMO_DIR", "demo")).resolve()
    now = datetime.now(UTC).replace(microsecond=0)
    console.print(
        Panel.fit(
            "nvr-guard demo: four sites (highway 15d, residential 30d, general 6mo, "
            "school 1y), footage spanning 400 days, then an export walked through by its people",
            style="bold",
        )
    )
    people = True
    if foreign := foreign_accounts():
        people = False
        console.print(
            f"[yellow]{', '.join(foreign)} exist(s) and the demo did not make them: the export "
            "walk-through is left out[/]"
        )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        if people:
            add_people()
        cfg = generate(base, now, people)
        if people and (why := people_can_run(cfg)) is not None:
            console.print(f"[yellow]{why}; the export walk-through is left out[/]", soft_wrap=True)
            people = False
            with interrupts.shielded():
                remove_people()
            cfg = generate(base, now, people)
        nvr(cfg, "config", "check")
        held_from = (now - timedelta(days=25)).astimezone(SH).strftime("%Y-%m-%dT%H:%M")
        held_to = (now - timedelta(days=20)).astimezone(SH).strftime("%Y-%m-%dT%H:%M")
        res = nvr(
            cfg,
            "hold",
            "add",
            "--camera",
            "toll-01",
            "--from",
            held_from,
            "--to",
            held_to,
            "--reason",
            "police case 2026-117: hit and run at exit 3",
        )
        console.print(res.stdout.strip(), markup=False)

        console.print("[bold cyan]$ nvr-guard daemon[/]  (foreground; logs below)")
        with interrupts.shielded():  # never a daemon started but not known here
            daemon = subprocess.Popen(
                [sys.executable, "-m", "nvr_guard", "--config", str(cfg), "daemon"],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def blocked() -> Any:
            r = nvr(cfg, "--json", "status", check=False, show=False)
            if not r.stdout.strip() or r.stdout.lstrip()[0] != "{":
                return None
            st = json.loads(r.stdout)  # exit 1 while not ok: a blocked sweep is not ok
            if "error" in st:  # no daemon answered yet
                return None
            return st.get("blocked_sweeps") or None

        sweeps = wait_for(blocked, "the first sweep")
        sweep_id = sweeps[0]["id"]
        console.print(
            Panel(
                "The first sweep wanted to delete most of this existing archive, so the "
                f"mass-deletion guard stopped it (sweep {sweep_id})."
                " An admin reviews and confirms:",
                style="yellow",
            )
        )
        plan = nvr(cfg, "retention", "plan", "--site", "toll-station")
        lines = plan.stdout.splitlines()
        console.print("\n".join(lines[:14] + ["..."] + lines[-3:]), markup=False)
        res = nvr(cfg, "retention", "confirm", str(sweep_id))
        console.print(
            res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr, markup=False
        )
        summary(cfg, base)
        if people:
            pkg, fingerprint = walk_export(cfg, base, now)
            show_package(pkg, fingerprint, cfg)
        if once:
            return
        console.print(
            Panel.fit(
                "the daemon keeps running: a new segment is recorded every 20 s and "
                "catalogued; Ctrl-C stops it cleanly",
                style="green",
            )
        )
        root = base / "recordings" / "toll-station"
        last = 0.0
        try:
            while daemon.poll() is None:
                if time.monotonic() - last >= 20:
                    last = time.monotonic()
                    p = segment_path(root, SITES["toll-station"], "toll-02", datetime.now(UTC))
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(b"\0" * 4096)
                    console.print(f"recorder wrote {p.relative_to(base)}")
                time.sleep(0.5)  # idle loop of an interactive demo, not synchronisation
        except KeyboardInterrupt:
            return  # the way this part ends
    finally:
        # nothing interrupts the clean-up: a second Ctrl-C is ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if daemon is not None:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            console.print(f"daemon stopped (exit {daemon.returncode}); audit chain:")
            verify = nvr(cfg, "audit", "verify", check=False, show=False)
            console.print(verify.stdout.strip() or verify.stderr.strip(), markup=False)
        if people:
            console.print(
                f"the demo users ({', '.join(PEOPLE)}) stay for the next run; "
                "`make clean` removes them"
            )


if __name__ == "__main__":
    main()
