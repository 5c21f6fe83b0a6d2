"""Hostile input (issue 6, item 3): fuzzed configs, a misbehaving control-socket peer, traversal and
control characters in user text, and filter-syntax injection into the export watermark.

Each test feeds the real code path (the config loader and ``nvr-guard config check``, a real
daemon process, the CLI, a real ffmpeg export) and asserts what an operator would see: an exit
code admins' scripts rely on, one-line messages, a daemon that keeps answering, nothing created.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvr_guard.config import check_config
from tests.fixtures.frames import frame as _frame
from tests.fixtures.frames import read_reply as _read_reply
from tests.fixtures.site import Site, poll, write_segment

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = (REPO / "config" / "example.yaml").read_bytes()


# ---- config fuzzing -----------------------------------------------------------------------------


def _example_here(base: Path) -> bytes:
    """config/example.yaml with its roots and state moved under ``base`` (so an unmutated copy is
    valid here and every error a mutation causes is the mutation's)."""
    text = EXAMPLE.decode()
    for old in ("/srv/recordings/toll", "/media/frigate/recordings", "/srv/recordings/compound"):
        new = base / old.strip("/").replace("/", "-")
        new.mkdir(exist_ok=True)
        text = text.replace(old, str(new))
    text = text.replace("/var/lib/nvr-guard", str(base / "state"))
    return text.encode()


def _assert_well_formed(path: Path, errors: list[tuple[str, int, str]]) -> None:
    for f, line, msg in errors:
        assert f == str(path)
        assert isinstance(line, int) and line >= 1, (line, msg)
        assert msg and all(c.isprintable() for c in msg), repr(msg)
        assert "Traceback" not in msg


def _check_bytes(data: bytes) -> tuple[Any, list[tuple[str, int, str]]]:
    with tempfile.TemporaryDirectory(prefix="nvr-fuzz-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(data)
        cfg, errors, warnings = check_config(path)  # must never raise
        _assert_well_formed(path, errors)
        _assert_well_formed(path, warnings)
        assert (cfg is None) == bool(errors)
        return cfg, errors


def test_the_example_is_valid_once_its_directories_exist(tmp_path: Path) -> None:
    cfg, errors = _check_bytes(_example_here(tmp_path))
    assert errors == [] and cfg is not None


_FRAGMENTS = [
    "sites:",
    "  toll:",
    "    keep: ",
    "    roots: [",
    "/tmp",
    "]",
    "profile: ",
    "min_keep: ",
    "guards:",
    "  max_delete_fraction: ",
    "disk:",
    "  min_free: ",
    "people:",
    "  users:",
    "timezone: ",
    "settle: ",
    "15d",
    "6mo",
    "1e400",
    "99999999999999999999999",
    "-1",
    "0x1f",
    "010",
    "yes",
    "~",
    "null",
    "&a",
    "*a",
    "<<: *a",
    "!!python/object:os.system",
    "!!binary",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "- ",
    "? ",
    "|",
    ">",
    "'",
    '"',
    "\\",
    "#",
    "\t",
    "\n",
    "\n  ",
    "\u202e",
    "\x1b[31m",
    "\x00",
    "\ufeff",
    "收费站",
    "%",
    "{camera}",
    "..",
    "../../etc",
    '"k\\nx": ',
    '"\\e[31m\u202e": ',
    "toll\u202e:",
]


yamlish = st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=8), max_size=60).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=yamlish)
def test_fuzzed_yamlish_text_never_raises(text: str) -> None:
    _check_bytes(text.encode("utf-8", "surrogatepass"))


def _mutate(data: bytes, kind: str, pos: int, arg: int) -> bytes:
    lines = data.split(b"\n")
    i = pos % len(data)
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ (1 << (arg % 8))]) + data[i + 1 :]
    if kind == "truncate":
        return data[:i]
    if kind == "duplicate-line":
        k = pos % len(lines)
        return b"\n".join(lines[: k + 1] + [lines[k]] + lines[k + 1 :])
    if kind == "deep":
        k = pos % len(lines)
        depth = 1 + arg % 400
        nest = b"".join(b" " * (2 * d) + b"k%d:\n" % d for d in range(depth))
        return b"\n".join(lines[:k]) + b"\n" + nest + b"\n".join(lines[k:])
    if kind == "flow-deep":
        depth = 1 + arg % 2000
        return data + b"\nextra: " + b"[" * depth + b"]" * depth + b"\n"
    if kind == "huge":
        return re.sub(rb"\d+", b"9" * (1 + arg % 400), data, count=1 + arg % 5)
    if kind == "unicode":
        junk = ["\u202e", "\x1b[31m", "\u0000", "\ud7ff", "收", "\u2028", "\U0001f4a9", "\x85"]
        return data[:i] + junk[arg % len(junk)].encode() + data[i:]
    if kind == "delete-line":
        k = pos % len(lines)
        return b"\n".join(lines[:k] + lines[k + 1 :])
    raise AssertionError(kind)


MUTATIONS = ["flip", "truncate", "duplicate-line", "deep", "flow-deep", "huge", "unicode",
             "delete-line"]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10**6), st.integers(0, 10**4)),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_example_never_raises(steps: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory(prefix="nvr-fuzz-dirs-") as dirs:
        data = _example_here(Path(dirs))
        for kind, pos, arg in steps:
            if data:
                data = _mutate(data, kind, pos, arg)
        _check_bytes(data)


CLI_CASES = {
    "duplicate key": lambda d: d.replace(b"settle: 2m", b"settle: 2m\nsettle: 3m"),
    "truncated": lambda d: d[: len(d) // 3],
    "byte flip": lambda d: d.replace(b"sites:", b"sit\xffs:"),
    "deep nesting": lambda d: d + b"extra: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "huge number": lambda d: d.replace(b"max_delete_fraction: 0.2", b"max_delete_fraction: 1e999"),
    "control chars": lambda d: d.replace(b"toll-station:", b'"toll\\nx\\e[31m\xe2\x80\xae":'),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_config_check_cli_on_hostile_files(tmp_path: Path, case: str) -> None:
    data = CLI_CASES[case](_example_here(tmp_path))
    path = tmp_path / "hostile.yaml"
    path.write_bytes(data)
    r = subprocess.run(
        [sys.executable, "-m", "nvr_guard", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode in (0, 2), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    if r.returncode == 2:
        lines = r.stderr.splitlines()
        assert lines
        for line in lines:
            assert re.match(rf"^{re.escape(str(path))}:\d+: \S", line), line


# ---- the control socket against a real daemon ---------------------------------------------------

_HEADER = struct.Struct(">I")


def _raw(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def _call(path: Path, obj: Any) -> dict[str, Any] | None:
    with _raw(path) as s:
        s.sendall(_frame(obj))
        return _read_reply(s)


def _status_ok(path: Path) -> bool:
    reply = _call(path, {"v": 1, "cmd": "status", "args": {}})
    return reply is not None and reply["ok"] is True


class _Daemon:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.log = open(site.base / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        poll(self._ready, 60, "the daemon to answer on its socket")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            log = (self.site.base / "daemon.log").read_text(errors="replace")
            raise AssertionError(f"daemon exited {self.proc.returncode}: {log}")
        try:
            return _status_ok(self.site.socket)
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None and _status_ok(self.site.socket)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Daemon]:
    base = tmp_path_factory.mktemp("hostile-daemon")
    # an unprivileged uid must reach the socket: open the temporary directories above it
    for p in [base, *base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    root = base / "rec"
    root.mkdir()
    s = Site(base, root, base / "config.yaml", base / "state", base / "run" / "c.sock")
    s.write_config(sweep_every="1h")
    # root may also file requests, for cameras of every level
    text = s.config.read_text()
    assert "users: {root: {roles: [admin]}}" in text
    s.config.write_text(
        text.replace(
            "users: {root: {roles: [admin]}}", "users: {root: {roles: [admin, operator], level: 2}}"
        )
    )
    os.chmod(s.config, 0o644)
    now = datetime.now(UTC).replace(microsecond=0)
    for h in range(1, 25):
        write_segment(root, "cam1", now - timedelta(hours=h))
    d = _Daemon(s)
    os.chmod(s.socket, 0o666)  # reachable by anyone: the daemon's own checks are under test
    yield d
    d.stop()


def _audit(site: Site, action: str) -> list[dict[str, Any]]:
    return [e for e in site.json("audit", "show")["entries"] if e["action"] == action]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'"status"',
        b'{"v": 1}',
        b'{"v": 1, "cmd": 7, "args": {}}',
        b'{"v": 1, "cmd": "status", "args": []}',
        b'{"v": 99, "cmd": "status", "args": {}}',
        b'{"v": 1, "cmd": "hold.add", "args": {"camera": null}}',
        b'{"v": 1, "cmd": "request.show", "args": {"id": "1; DROP TABLE requests"}}',
        b'{"v": 1, "cmd": "hold.release", "args": {"id": [1], "reason": {}}}',
        b'{"v": 1, "cmd": "../../etc/passwd", "args": {}}',
        b'{"v": 1, "cmd": "' + b"A" * 60000 + b'", "args": {}}',
        b"[" * 30000 + b"]" * 30000,
        b"",
    ],
)
def test_malformed_requests_get_an_error_reply(live: _Daemon, body: bytes) -> None:
    reply = _call(live.site.socket, body)
    assert reply is not None and reply["ok"] is False
    err = reply["error"]
    assert err["code"] in (2, 3), err
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    assert live.alive()


def test_a_10_mb_length_prefix_is_refused_without_reading_it(live: _Daemon) -> None:
    with _raw(live.site.socket) as s:
        s.sendall(_HEADER.pack(10 * 1024 * 1024) + b"{" * 1000)
        t0 = time.monotonic()
        reply = _read_reply(s)
        assert time.monotonic() - t0 < 3.0  # answered at once, not after reading 10 MB
        assert reply is not None and reply["ok"] is False and reply["error"]["code"] == 2
        assert "10485760 bytes exceeds the limit" in reply["error"]["message"]
        # and the connection is closed: nothing more comes (a reset: our body was left unread)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    assert live.alive()


def test_a_one_byte_a_second_client_is_dropped_while_others_are_served(live: _Daemon) -> None:
    frame = _frame({"v": 1, "cmd": "status", "args": {}})
    slow = _raw(live.site.socket, timeout=15.0)
    stop = threading.Event()
    sent: list[float] = []

    def dribble() -> None:
        # pacing, not synchronisation: this client is slow on purpose
        for b in frame:
            try:
                slow.sendall(bytes([b]))
            except OSError:
                return  # the daemon hung up on us
            sent.append(time.monotonic())
            if stop.wait(1.0):
                return

    t0 = time.monotonic()
    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        # meanwhile the daemon answers everybody else, promptly
        for _ in range(5):
            q0 = time.monotonic()
            assert _status_ok(live.site.socket)
            assert time.monotonic() - q0 < 3.0
        reply = _read_reply(slow)  # the timeout reply (or a plain close)
        dropped = time.monotonic() - t0
        assert 4.0 <= dropped <= 6.5, dropped
        if reply is not None:
            assert reply["ok"] is False and "not received within 5 s" in reply["error"]["message"]
        assert len(sent) < len(frame)  # it never got to send its whole request
    finally:
        stop.set()
        slow.close()
        t.join(5)
    assert live.alive()


def test_200_concurrent_clients_get_an_answer_or_busy(live: _Daemon) -> None:
    results: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(200)

    def client(i: int) -> None:
        try:
            go.wait(30)
            cmd = "status" if i % 2 else "hold.list"
            reply = _call(live.site.socket, {"v": 1, "cmd": cmd, "args": {}})
            if reply is None:
                outcome = "closed without reply"
            elif reply["ok"]:
                outcome = "ok"
            elif "busy" in reply["error"]["message"]:
                outcome = "busy"
            else:
                outcome = f"error: {reply['error']}"
        except OSError as exc:
            # the listen backlog (128) may overflow: the kernel refuses, the CLI says so
            outcome = (
                "refused"
                if isinstance(exc, ConnectionRefusedError | BlockingIOError)
                else (f"oserror: {exc}")
            )
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 200
    bad = [r for r in results if r not in ("ok", "busy", "refused")]
    assert not bad, bad[:5]
    assert results.count("ok") >= 64  # at least a full set of slots was served
    assert live.alive()


def test_an_unknown_uid_is_refused_and_audited(live: _Daemon) -> None:
    uid = 54321
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become a uid no account has, ask for something, report back
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            reply = _call(live.site.socket, {"v": 1, "cmd": "hold.list", "args": {}})
            os.write(wfd, json.dumps(reply).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        out = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reply = json.loads(out)
    assert reply["ok"] is False and reply["error"]["code"] == 3
    assert f"uid:{uid}" in reply["error"]["message"]
    # refused when the connection was accepted (before any command was read), on record
    poll(
        lambda: any(
            e["actor"] == f"uid:{uid}" and e["object"] == "control.connect"
            for e in _audit(live.site, "access.denied")
        ),
        what="the refused connection in the audit log",
    )
    assert live.alive()


# ---- traversal and control characters in user text ----------------------------------------------

HOSTILE_TEXT = {
    "traversal": "../../etc",
    "absolute": "/etc/passwd",
    "newline": "cam1\nFORGED: hold released",
    "escape": "\x1b[31mred\x1b[0m",
    "bidi": "cam\u202e1",
    "carriage return": "ok\rFORGED",
    "tab": "a\tb",
    "zero width": "cam\u200b1",
}


def _names_under(base: Path) -> set[str]:
    """Every path below ``base`` (names only: the catalog's contents change with each call)."""
    skip = (".log", "-wal", "-shm", "-journal")
    return {str(p.relative_to(base)) for p in base.rglob("*") if not str(p).endswith(skip)}


def _counts(site: Site) -> tuple[int, int]:
    holds = site.json("hold", "list", "--all")["holds"]
    return len(holds), len(site.json("request", "list")["requests"])


def _refused_cleanly(site: Site, r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode in (2, 3), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # one clear line ...
    assert all(c.isprintable() for c in lines[0]), repr(lines[0])  # ... with nothing raw in it
    assert "FORGED" not in r.stdout


def _request_args(**over: str) -> list[str]:
    now = datetime.now(UTC)
    args = {
        "--camera": "cam1",
        "--from": (now - timedelta(hours=3)).isoformat(timespec="seconds"),
        "--to": (now - timedelta(hours=2)).isoformat(timespec="seconds"),
        "--reason": "robbery at counter 2",
        "--basis": "case 2026-17",
        "--recipient": "City police; Officer Wang; 010-1234",
    }
    args.update(over)
    return ["request", "new", *[x for kv in args.items() for x in kv]]


def test_a_plain_request_is_accepted(live: _Daemon) -> None:
    # the baseline the refusals below differ from in one field only
    before = _counts(live.site)
    r = live.site.run(*_request_args())
    assert r.returncode == 0, r.stderr
    assert _counts(live.site)[1] == before[1] + 1


_TEXT_FIELDS = ["hold camera", "hold reason", "request camera", "reason", "basis", "recipient"]
_CAMERA_FIELDS = ("hold camera", "request camera")


# slashes are fine in a reason ("see case 12/2026"): traversal texts go to camera ids only
@pytest.mark.parametrize(
    ("field", "kind"),
    [
        (f, k)
        for f in _TEXT_FIELDS
        for k in sorted(HOSTILE_TEXT)
        if f in _CAMERA_FIELDS or k not in ("traversal", "absolute")
    ],
)
def test_hostile_text_is_refused_and_nothing_is_created(
    live: _Daemon, field: str, kind: str
) -> None:
    text = HOSTILE_TEXT[kind]
    site = live.site
    before, names = _counts(site), _names_under(site.base)
    if field.startswith("hold"):
        camera, reason = (text, "legal hold") if field == "hold camera" else ("cam1", text)
        r = site.run(
            "hold", "add", "--camera", camera, "--from", "2026-01-01T00:00",
            "--to", "2026-01-02T00:00", "--reason", reason,
        )  # fmt: skip
    else:
        over = {
            "request camera": {"--camera": text},
            "reason": {"--reason": text},
            "basis": {"--basis": text},
            "recipient": {"--recipient": f"{text}; Officer {text}; {text}"},
        }[field]
        r = site.run(*_request_args(**over))
    _refused_cleanly(site, r)
    assert _counts(site) == before
    assert _names_under(site.base) == names
    assert not (site.base / "etc").exists() and not (site.state / "etc").exists()


def test_a_reason_with_quotes_and_colons_is_kept_and_shown_escaped(live: _Daemon) -> None:
    reason = "he said \"stop\": 10:00 'now' \\ {x} %s [red]x[/red] ; drawtext=text=x"
    site = live.site
    r = site.run(
        "hold", "add", "--camera", "cam1", "--from", "2026-01-01T00:00",
        "--to", "2026-01-02T00:00", "--reason", reason,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    held = [h for h in site.json("hold", "list")["holds"] if h["reason"] == reason]
    assert len(held) == 1  # stored and returned exactly as typed
    # a wide terminal, so the table does not wrap the cell
    shown = site.run("hold", "list", env={**os.environ, "COLUMNS": "500"})
    assert shown.returncode == 0
    assert reason in shown.stdout  # printable: shown as is, one line
    entries = [e for e in _audit(site, "hold.add") if e["details"].get("reason") == reason]
    assert entries


# ---- filter-syntax injection into the watermark -------------------------------------------------

INJECTIONS = ["'; drawtext=text=x", "%{e:1+1}", "[out]", "\\\\", ":", "%{pts}"]
WM_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
WM_T0 = 1763600000.0


@pytest.fixture(scope="module")
def wm_footage(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 2-second segments of generated video (small and quick to encode)."""
    where = tmp_path_factory.mktemp("wm-footage")
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi",
            "-i", "testsrc2=size=160x120:rate=10", "-t", "4", "-c:v", "libx264",
            "-preset", "ultrafast", "-g", "10", "-f", "segment", "-segment_time", "2",
            "-reset_timestamps", "1", str(where / "seg%02d.mp4"),
        ],
        check=True,
    )  # fmt: skip
    return sorted(where.glob("seg*.mp4"))


@pytest.mark.integration
@pytest.mark.parametrize("text", INJECTIONS)
def test_filter_syntax_in_every_watermark_text_ends_up_literally(
    wm_footage: list[Path], tmp_path: Path, text: str
) -> None:
    from nvr_guard.export import (
        DirectoryDestination,
        ExportJob,
        SourceSegment,
        load_or_create_key,
        run_export,
    )

    # every text a person or the config can put into the watermark carries the hostile text,
    # each with its own tag so the test can tell them apart
    request = {
        "id": 7,
        "requester": "alice",
        "site": "bank",
        "cameras": [f"cam{text}"],
        "from": "2025-11-20T08:53:20+08:00",
        "to": "2025-11-20T08:53:23+08:00",
        "reason": f"R{text}",
        "basis": f"B{text}",
        "recipient": {"unit": f"U{text}", "person": f"P{text}", "contact": f"C{text}"},
        "format": "mp4",
        "emergency": False,
    }
    template = f"T{text} {{reason}} {{basis}} {{recipient}} {{camera}} {{request}}"
    job = ExportJob(
        request=request,
        approvals=[{"approver": "bob", "role": "manager", "decision": "approve", "time": "t"}],
        technician="tom",
        start=WM_T0 + 0.5,
        end=WM_T0 + 3.0,
        tz=ZoneInfo("Asia/Shanghai"),
        watermark_template=template,
        font=WM_FONT,
        preset="ultrafast",
    )
    dest = tmp_path / "usb"
    dest.mkdir()
    key = load_or_create_key(tmp_path / "state")[0]
    segs = [SourceSegment(p, WM_T0 + 2 * i) for i, p in enumerate(wm_footage)]
    pkg = run_export(
        [(f"cam{text}", segs)], job, DirectoryDestination(dest), key, audit_head=(1, "h")
    )
    clip = pkg.manifest["clips"][0]
    expected = f"T{text} R{text} B{text} U{text} P{text} cam{text} 7"
    assert clip["watermark"] == expected
    assert clip["camera"] == f"cam{text}"
    # the user's text never reaches ffmpeg's command line (only the watermark file has it)
    argv = clip["ffmpeg"]["argv"]
    for tagged in (f"R{text}", f"B{text}", f"U{text}", f"P{text}", f"T{text}"):
        assert not any(tagged in a for a in argv), tagged
    # nothing was written outside the package
    assert [p.name for p in dest.iterdir()] == [pkg.path.name]
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-of", "json", str(pkg.path / clip["file"])],
        check=True,
        capture_output=True,
    ).stdout
    assert abs(float(json.loads(out)["format"]["duration"]) - 2.5) <= 0.2


@pytest.mark.parametrize("template", ["} [out]", "{reason", "{reason.__class__}", "{0[x]}"])
def test_a_watermark_template_that_cannot_render_is_a_config_error(
    tmp_path: Path, template: str
) -> None:
    data = _example_here(tmp_path).decode()
    start = data.index("  watermark:")
    line_no = data[:start].count("\n") + 1
    end = data.index("\n", start)
    data = data[:start] + f"  watermark: {json.dumps(template)}" + data[end:]
    cfg, errors = _check_bytes(data.encode())
    if template.startswith(("{reason.", "{0[")):
        # attribute and index access parse, and render as written (never evaluated)
        assert cfg is not None, errors
        return
    assert cfg is None
    assert [(ln, m.split(":")[0]) for _, ln, m in errors] == [(line_no, "export.watermark")]


# ---- last: this one leaves a blocked sweep behind ---------------------------------------------


def test_a_camera_directory_named_like_markup_is_shown_as_written(live: _Daemon) -> None:
    # a recorder (or anyone who can write the root) names a camera directory "[red]cam"; its
    # old footage trips the mass-deletion guard, and the guard's message names the camera
    site = live.site
    now = datetime.now(UTC).replace(microsecond=0)
    for d in (16, 17):
        write_segment(site.root, "[red]cam", now - timedelta(days=d))
    r = site.run("retention", "run")
    assert r.returncode in (0, 3), r.stderr
    shown = site.run("status", env={**os.environ, "COLUMNS": "500"})
    assert "Traceback" not in shown.stderr and "internal error" not in shown.stderr, shown.stderr
    assert "camera [red]cam " in shown.stdout, shown.stdout
