"""The shipped systemd unit, sysusers and tmpfiles snippets, checked with systemd's own tools."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.fixtures.site import Site, poll, write_segment

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "nvr-guard.service"
SYSUSERS = REPO / "systemd" / "nvr-guard.sysusers"
TMPFILES = REPO / "systemd" / "nvr-guard.tmpfiles"
MAX_EXPOSURE = 2.0  # issue 15; test_deployed.py checks the loaded unit against the same budget


def run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def entry_point() -> Path:
    """The installed `nvr-guard` script next to the interpreter running the tests."""
    script = Path(sys.executable).parent / "nvr-guard"
    assert script.is_file(), f"{script} missing: install the project (make venv)"
    return script


def unit_directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    # verify insists that ExecStart's binary exists; point it at the real entry point, the way
    # a venv install's drop-in would.
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/nvr-guard daemon" in text
    assert "ExecReload=/usr/bin/nvr-guard reload" in text
    copy = tmp_path / "nvr-guard.service"
    copy.write_text(text.replace("=/usr/bin/nvr-guard ", f"={entry_point()} "))
    return copy


def test_systemd_analyze_verify_is_silent(verifiable_unit: Path) -> None:
    result = run("systemd-analyze", "verify", "--man=no", str(verifiable_unit))
    assert result.stderr == "", result.stderr
    assert result.returncode == 0


def test_verify_would_catch_a_broken_unit(tmp_path: Path, verifiable_unit: Path) -> None:
    # Guard against a test that passes because verify checks nothing here.
    broken = tmp_path / "broken" / "nvr-guard.service"
    broken.parent.mkdir()
    broken.write_text(verifiable_unit.read_text().replace("Type=notify", "Type=notfy"))
    result = run("systemd-analyze", "verify", "--man=no", str(broken))
    assert "service type" in result.stderr  # a warning only: exit code 0, hence the stderr rule


def exposure(unit: Path) -> float:
    result = run("systemd-analyze", "security", "--offline=true", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_security_exposure_within_budget() -> None:
    level = exposure(UNIT)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}"


def test_exposure_parser_sees_a_weak_unit(tmp_path: Path) -> None:
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(weak) > 9.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        # a refused reload fails `systemctl reload` (exit 2), unlike a bare SIGHUP
        ("ExecReload", "/usr/bin/nvr-guard reload"),
        ("WatchdogSec", "60"),
        ("Restart", "on-failure"),
        ("User", "nvr-guard"),
        ("StateDirectory", "nvr-guard"),
        ("RuntimeDirectory", "nvr-guard"),
        ("RuntimeDirectoryMode", "0750"),
        ("ConfigurationDirectory", "nvr-guard"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateNetwork", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
    ],
)
def test_unit_settings_the_daemon_relies_on(key: str, value: str) -> None:
    assert value in unit_directives(UNIT.read_text()).get(key, [])


def test_example_recording_roots_are_optional_read_write_paths() -> None:
    paths = " ".join(unit_directives(UNIT.read_text())["ReadWritePaths"]).split()
    assert "-/srv/recordings" in paths
    assert "-/media/frigate/recordings" in paths
    assert all(p.startswith("-") for p in paths), "a missing root must not stop the service"


def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        assert shutil.which(tool), f"{tool} not installed"
    (tmp_path / "etc").mkdir()
    (tmp_path / "var" / "lib").mkdir(parents=True)
    # "-" reads the snippet from stdin: with --root a path argument is looked up in the root.
    users = run("systemd-sysusers", f"--root={tmp_path}", "-", stdin=SYSUSERS.read_bytes())
    assert users.returncode == 0, users.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("nvr-guard:"))
    assert entry[5] == "/var/lib/nvr-guard"
    assert entry[6] == "/usr/sbin/nologin"
    groups = {
        g[0]: g for g in (line.split(":") for line in (tmp_path / "etc/group").read_text().split())
    }
    assert "nvr-guard" in groups
    # export.group's default: who may read packages; the daemon is a member to give it to them
    assert groups["nvr-guard-export"][3].split(",") == ["nvr-guard"]

    dirs = run(
        "systemd-tmpfiles", f"--root={tmp_path}", "--create", "-", stdin=TMPFILES.read_bytes()
    )
    assert dirs.returncode == 0, dirs.stderr
    state = tmp_path / "var" / "lib" / "nvr-guard"
    assert state.is_dir()
    assert state.stat().st_mode & 0o777 == 0o700
    assert state.stat().st_uid == int(entry[2])


# ---------------------------------------------------------------------------------------------
# The unit's system-call filter and MemoryDenyWriteExecute, applied for real.
#
# There is no systemd (PID 1) to start the unit here, but its riskiest settings
# (SystemCallFilter=, MemoryDenyWriteExecute=, RestrictAddressFamilies=) are a seccomp filter,
# and that can be built from the unit file itself with libseccomp (always installed with
# systemd) and applied to a process running what the daemon does: SQLite in WAL mode, psutil,
# Ed25519, inotify, APScheduler threads, the control socket, ffmpeg with a CJK watermark and
# clamscan. A call the filter refuses shows up as a failed step with EPERM here, long before a
# production host finds it.

LAUNCHER = r"""
import ctypes, ctypes.util, json, os, sys

allowed = json.loads(sys.argv[1])
families = json.loads(sys.argv[2])
argv = sys.argv[3:]
lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]


class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(Cmp)]
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
EQ, MASKED_EQ = 4, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def rule(nr, *cmps):
    arr = (Cmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, ALLOW, nr, len(cmps), arr)
    if rc < 0:
        raise SystemExit(f"seccomp_rule_add_array({nr}) failed: {rc}")


ctx = lib.seccomp_init(EPERM)  # like SystemCallErrorNumber=EPERM for everything not allowed
for name in allowed:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        continue  # not a syscall of this architecture
    if name == "mmap":  # MemoryDenyWriteExecute: never writable and executable at once
        wx = PROT_WRITE | PROT_EXEC
        for ok in (0, PROT_WRITE, PROT_EXEC):
            rule(nr, Cmp(2, MASKED_EQ, wx, ok))
    elif name in ("mprotect", "pkey_mprotect"):  # ... nor made executable later
        rule(nr, Cmp(2, MASKED_EQ, PROT_EXEC, 0))
    elif name == "socket":  # RestrictAddressFamilies=
        for family in families:
            rule(nr, Cmp(0, EQ, family, 0))
    elif name == "shmat":
        rule(nr, Cmp(2, MASKED_EQ, SHM_EXEC, 0))
    else:
        rule(nr)
if lib.seccomp_load(ctx) != 0:  # also sets no_new_privs, as NoNewPrivileges=yes does
    raise SystemExit("seccomp_load failed")
os.execv(argv[0], argv)
"""

WORKLOAD = r"""
import json, mmap, os, sqlite3, subprocess, sys, threading
from pathlib import Path

work = Path(sys.argv[1])
font = sys.argv[2]
steps = {}


def step(name, func):
    try:
        steps[name] = func()
    except Exception as exc:  # reported per step, asserted by the test
        steps[name] = f"FAILED: {type(exc).__name__}: {exc}"


def sqlite_wal():
    db = sqlite3.connect(work / "catalog.db")
    assert db.execute("pragma journal_mode=wal").fetchone()[0] == "wal"
    db.execute("create table seg(path blob, start real)")
    db.executemany("insert into seg values (?, ?)", [(b"/r/%d.mp4" % i, i) for i in range(2000)])
    db.commit()
    return db.execute("select count(*) from seg").fetchone()[0] == 2000


def figures():
    import psutil
    return (psutil.disk_usage(str(work)).total > 0
            and psutil.Process().memory_info().rss > 0
            and len(psutil.disk_partitions()) > 0)


def ed25519():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"manifest"), b"manifest")
    return True


def control_socket():
    from nvr_guard.daemon.control import ControlServer
    from nvr_guard.wire import call
    server = ControlServer(work / "c.sock", None)
    server.start()
    try:
        return call(work / "c.sock", "ping")["pong"]
    finally:
        server.stop()


def inotify():
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    closed = threading.Event()

    class Hint(FileSystemEventHandler):
        def on_closed(self, event):
            closed.set()

    observer = Observer()
    observer.schedule(Hint(), str(work), recursive=True)
    observer.start()
    try:
        (work / "segment.mp4").write_bytes(b"\0" * 1024)
        return closed.wait(10)
    finally:
        observer.stop()
        observer.join(5)


def scheduler():
    import datetime
    from apscheduler.schedulers.background import BackgroundScheduler
    ran = threading.Event()
    sched = BackgroundScheduler()
    sched.add_job(ran.set, "interval", hours=1, next_run_time=datetime.datetime.now())
    sched.start()
    try:
        return ran.wait(10)
    finally:
        sched.shutdown()


def ffmpeg():
    out = work / "clip.mp4"
    run = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi",
         "-i", "testsrc=duration=1:size=320x240:rate=10",
         "-vf", f"drawtext=fontfile={font}:text='调取 NVRG-1':fontcolor=white:x=10:y=10",
         "-c:v", "libx264", "-preset", "veryfast", "-y", str(out)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-500:]
    return out.stat().st_size > 0


def clamscan():
    import hashlib
    sample = work / "sample.bin"
    sample.write_bytes(b"nvr-guard scanner test pattern\n" * 10)
    digest = hashlib.md5(sample.read_bytes()).hexdigest()
    sigs = work / "local.hdb"
    sigs.write_text(f"{digest}:{sample.stat().st_size}:NvrGuard.Test.Sample\n")
    run = subprocess.run(["clamscan", "--no-summary", "-d", str(sigs), str(sample)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "NvrGuard.Test.Sample" in run.stdout, run.stdout + run.stderr
    return True


def refused_wx_mapping():
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        return "refused"
    return "allowed"


def refused_inet_socket():
    import socket
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError:
        return "refused"
    return "allowed"


def refused_setuid():
    try:
        os.setuid(os.getuid())
    except PermissionError:
        return "refused"
    return "allowed"


for name, func in [("sqlite_wal", sqlite_wal), ("figures", figures), ("ed25519", ed25519),
                   ("control_socket", control_socket), ("inotify", inotify),
                   ("scheduler", scheduler), ("ffmpeg", ffmpeg), ("clamscan", clamscan),
                   ("refused_wx_mapping", refused_wx_mapping),
                   ("refused_inet_socket", refused_inet_socket),
                   ("refused_setuid", refused_setuid)]:
    step(name, func)
print(json.dumps(steps))
"""


def expand_syscall_set(name: str, seen: set[str] | None = None) -> set[str]:
    """Syscall names of a systemd set such as @system-service, nested sets resolved."""
    seen = set() if seen is None else seen
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = run("systemd-analyze", "syscall-filter", name)
    assert out.returncode == 0, out.stderr
    names: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= expand_syscall_set(item, seen)
    return names


def unit_syscall_allow_list() -> list[str]:
    """What SystemCallFilter= in the unit allows: the first (allow) line, minus "~" lines."""
    lines = unit_directives(UNIT.read_text())["SystemCallFilter"]
    allowed: set[str] = set()
    for index, value in enumerate(lines):
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= expand_syscall_set(item)
        if deny:
            allowed -= names
        else:
            # a later allow line re-admits calls: only fchown (the export group), on purpose
            assert index == 0 or names == {"fchown"}, f"{value} widens the filter"
            allowed |= names
    return sorted(allowed)


def unit_address_families() -> list[int]:
    """RestrictAddressFamilies= of the unit as numbers (an allow list)."""
    values = " ".join(unit_directives(UNIT.read_text())["RestrictAddressFamilies"]).split()
    assert values and not any(v.startswith("~") for v in values)
    return [int(getattr(socket, v)) for v in values]


def test_allow_list_excludes_privileged_calls() -> None:
    allowed = set(unit_syscall_allow_list())
    assert {"openat", "unlinkat", "inotify_add_watch", "fsync", "rename"} <= allowed
    assert not {"setuid", "chown", "mount", "clock_settime", "setpriority", "reboot"} & allowed
    # fchown on a descriptor it opened (packages get the export group); never by path
    assert "fchown" in allowed and not {"fchownat", "lchown"} & allowed


@pytest.mark.slow
def test_daemon_workload_runs_under_the_units_syscall_filter(tmp_path: Path) -> None:
    directives = unit_directives(UNIT.read_text())
    assert directives["MemoryDenyWriteExecute"] == ["yes"]
    work = tmp_path / "w"
    work.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            json.dumps(unit_syscall_allow_list()),
            json.dumps(unit_address_families()),
            sys.executable,
            "-c",
            WORKLOAD,
            str(work),
            "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    steps = json.loads(result.stdout.strip().splitlines()[-1])
    assert steps == {
        "sqlite_wal": True,
        "figures": True,
        "ed25519": True,
        "control_socket": True,
        "inotify": True,
        "scheduler": True,
        "ffmpeg": True,
        "clamscan": True,
        # The filter is really in force: these two are what it exists to stop.
        "refused_wx_mapping": "refused",
        "refused_inet_socket": "refused",
        "refused_setuid": "refused",
    }


# ---------------------------------------------------------------------------------------------
# The real nvr-guard, sandboxed the way the unit sandboxes it: as an unprivileged user holding
# only the unit's ambient capabilities, under the unit's seccomp filter. This is what decides
# whether "not root, CAP_DAC_OVERRIDE + CAP_FOWNER" is enough to purge a recorder's footage.

RECORDER_UID = 1234  # the recorder's own user, not the daemon's
NOBODY = 65534  # stands in for the nvr-guard system user


def unit_capabilities() -> list[str]:
    directives = unit_directives(UNIT.read_text())
    ambient = " ".join(directives["AmbientCapabilities"]).split()
    assert ambient == " ".join(directives["CapabilityBoundingSet"]).split()
    return [c.removeprefix("CAP_").lower() for c in ambient]


def sandboxed(*argv: str) -> list[str]:
    """argv run as nobody with the unit's capabilities and system-call filter."""
    caps = ",".join(f"+{c}" for c in unit_capabilities())
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        f"--inh-caps=-all,{caps}",
        f"--ambient-caps=-all,{caps}",
        f"--bounding-set=-all,{caps}",
        sys.executable,
        "-c",
        LAUNCHER,
        json.dumps(unit_syscall_allow_list()),
        json.dumps(unit_address_families()),
        sys.executable,
        "-m",
        "nvr_guard",
        *argv,
    ]


def hand_to_recorder(root: Path) -> None:
    """Make the tree look like a recorder's: its own uid, no write access for anyone else."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chown(dirpath, RECORDER_UID, RECORDER_UID)
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            os.chown(path, RECORDER_UID, RECORDER_UID)
            os.chmod(path, 0o644)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def state_for_service_user(state: Path) -> None:
    # StateDirectory= creates it owned by User=.
    state.mkdir(mode=0o700, exist_ok=True)
    os.chown(state, NOBODY, NOBODY)


@pytest.mark.slow
def test_sandboxed_daemon_notifies_serves_reloads_and_stops(
    site: Site, now: datetime, tmp_path: Path
) -> None:
    assert os.geteuid() == 0, "needs root to run the daemon as another user"
    expired = [
        write_segment(site.root, "cam1", now - timedelta(days=40, hours=h)) for h in range(3)
    ]
    kept = write_segment(site.root, "cam1", now - timedelta(days=1))
    # A first sweep of an archive would wait for confirmation; that guard is tested elsewhere.
    site.write_config(sweep_every="1h", fraction=1.0)
    hand_to_recorder(site.root)
    state_for_service_user(site.state)

    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="2000000")
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "daemon.log").open("w+")
    proc = subprocess.Popen(
        sandboxed("--config", str(site.config), "daemon"),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    seen: list[str] = []

    def wait_for(key: str) -> None:
        """Read notifications until one carries ``key`` (e.g. READY=1)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                seen.extend(notify.recv(4096).decode().splitlines())
            except TimeoutError:
                break
            if key in seen:
                seen.clear()
                return
        log.seek(0)
        raise AssertionError(f"no {key} from the daemon; got {seen}; log:\n{log.read()}")

    try:
        wait_for("READY=1")
        status = site.json("status")
        assert status["ok"] is True
        # The first sweep (at start) purges the recorder's expired files: the capabilities
        # suffice, without root.
        poll(lambda: not any(p.exists() for p in expired), 30, "the expired segments to go")
        assert kept.exists()
        wait_for("WATCHDOG=1")  # WATCHDOG_USEC=2 s: pinged about every second
        proc.send_signal(signal.SIGHUP)
        wait_for("RELOADING=1")
        wait_for("READY=1")
        # ExecReload=: `nvr-guard reload` as the unit runs it (the service user, its filter)
        reload = sandboxed("--config", str(site.config), "reload")
        r = subprocess.run(reload, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for("RELOADING=1")
        wait_for("READY=1")
        good = site.config.read_text()
        site.config.write_text(good.replace("sweep_every: 1h", "sweep_every: 1 hour"))
        r = subprocess.run(reload, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr  # `systemctl reload` fails
        assert f"{site.config}:" in r.stderr and "sweep_every" in r.stderr, r.stderr
        assert [a["kind"] for a in site.json("status")["attention"]] == ["reload_refused"]
        site.config.write_text(good)
        proc.send_signal(signal.SIGTERM)
        wait_for("STOPPING=1")
        assert proc.wait(timeout=10) == 0
        assert not site.socket.exists()
        # What the daemon wrote is the service user's, not root's.
        assert {p.stat().st_uid for p in site.state.iterdir()} == {NOBODY}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()
