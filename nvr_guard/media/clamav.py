"""ClamAV scan of an export destination (a USB medium's mount point or an `export.targets` dir).

Footage may only be written onto storage that was just scanned and found clean (SPEC §1, issue 5).
The scan fails closed: a result is "clean" only when every file on the tree got a positive "OK"
from ClamAV. Anything ClamAV could not look into — a file too large for its limits, an encrypted
archive, an unreadable file, a symlink or device node, an engine error, a missing signature
database, clamd not answering when it was asked for — makes the result "error" (or "infected"
when a real signature matched), never "clean".

Two engines, the same verdicts:

* clamd, through its Unix socket with ``zINSTREAM``: we walk the tree ourselves and stream each
  file's bytes, so clamd never needs permission to open files on the medium and never follows
  a link planted on it.
* ``clamscan`` otherwise: one process over a file list we built, with the limits and alerts we
  rely on set on its command line; its one-line-per-file output drives the progress callback.

The result carries a fingerprint of the tree's listing (paths, sizes, mtimes), taken from the
same walk that decided what to scan, and a digest of what every file holds, taken from the bytes
as they were scanned: with clamd, from the very bytes streamed to it (one read); with clamscan,
by reading each file again the moment clamscan has given its verdict on it (from the page cache
clamscan just filled). The tree is listed again after the scan with change times and inode
numbers: a file written during the scan changes its ctime, which no user can set back, so the
bytes digested are the bytes scanned. The media gate compares the listing before an export and
the content digest again right before the package is committed, so a file rewritten after the
scan with its old size and mtime does not pass as scanned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvr_guard.model import show_path

log = logging.getLogger(__name__)

DEFAULT_CLAMD_CONF = Path("/etc/clamav/clamd.conf")
DEFAULT_FRESHCLAM_CONF = Path("/etc/clamav/freshclam.conf")
DEFAULT_DATABASE_DIR = Path("/var/lib/clamav")

NO_DATABASE = (
    "no ClamAV signature database: run freshclam, or copy daily/main.cvd onto this air-gapped host"
)

# libclamav 1.4 refuses to scan anything of 2 GiB or more ("scanning files greater than
# 2147483647 bytes is not supported") and would report such a file as skipped, not as a finding.
CLAMAV_MAX_FILE = 2**31 - 1

# Files that make a directory a signature database (metadata-only files like .info, .fp, .ign2
# or .cfg do not count: with only those, nothing would ever be detected).
_SIGNATURE_SUFFIXES = frozenset(
    ".cvd .cld .cud .hdb .hsb .hdu .hsu .mdb .msb .mdu .msu .ndb .ndu .ldb .ldu .cdb .cbc "
    ".idb .pdb .gdb .wdb .yar .yara .sign".split()
)

# ClamAV reports "could not look inside" as detections under these names; for us they are
# scan failures (nothing known-bad was found, but the file is not known-good either).
_UNSCANNABLE_PREFIXES = ("Heuristics.Encrypted.", "Heuristics.Limits.Exceeded.")

_CHUNK = 256 * 1024
_PROBE_NAME = "encryption-probe.zip"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ScanResult:
    target: str
    engine: str  # "clamd" | "clamscan"
    engine_version: str
    signature_version: str | None
    signature_date: str | None
    started: float
    finished: float
    duration: float
    files: int  # files that got a verdict from the engine
    bytes: int  # their total size
    result: str  # "clean" | "infected" | "error"
    infected: tuple[tuple[str, str], ...]  # (relative path, signature name)
    errors: tuple[str, ...]  # "relative path: why it was not scanned" or a whole-scan failure
    listing_fingerprint: str
    notes: tuple[str, ...] = field(default=())  # e.g. why "auto" chose clamscan over clamd
    # SHA-256 over every file's bytes as scanned ("" when not every file was read whole)
    content_digest: str = ""

    @property
    def clean(self) -> bool:
        return self.result == "clean"

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "signature_version": self.signature_version,
            "signature_date": self.signature_date,
            "started": self.started,
            "finished": self.finished,
            "duration": self.duration,
            "files": self.files,
            "bytes": self.bytes,
            "result": self.result,
            "infected": [{"path": p, "signature": s} for p, s in self.infected],
            "errors": list(self.errors),
            "listing_fingerprint": self.listing_fingerprint,
            "content_digest": self.content_digest,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# The walk and the listing fingerprint


@dataclass(frozen=True)
class _Entry:
    rel: bytes  # relative to the scanned root, b"/"-separated
    abspath: bytes
    kind: str  # "f" regular file, "l" symlink, "o" anything else (fifo, socket, device)
    size: int
    mtime_ns: int
    link: bytes = b""
    ctime_ns: int = 0  # only compared within one scan (before/after): see _fingerprint
    ino: int = 0


def _walk(root: Path) -> tuple[list[_Entry], list[str]]:
    """Every non-directory entry under ``root`` (lstat, links never followed) and walk errors."""
    entries: list[_Entry] = []
    problems: list[str] = []
    base = os.fsencode(root)
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        dir_path = os.path.join(base, rel_dir) if rel_dir else base
        try:
            with os.scandir(dir_path) as it:
                children = list(it)
        except OSError as e:
            problems.append(f"{show_path(rel_dir or b'.')}: directory not readable ({e.strerror})")
            continue
        for child in children:
            rel = rel_dir + b"/" + child.name if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as e:
                problems.append(f"{show_path(rel)}: cannot stat ({e.strerror})")
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
                continue
            link = b""
            if stat.S_ISREG(st.st_mode):
                kind = "f"
            elif stat.S_ISLNK(st.st_mode):
                kind = "l"
                try:
                    link = os.readlink(child.path)
                except OSError:
                    link = b"?"
            else:
                kind = "o"
            entries.append(
                _Entry(
                    rel,
                    child.path,
                    kind,
                    st.st_size,
                    st.st_mtime_ns,
                    link,
                    st.st_ctime_ns,
                    st.st_ino,
                )
            )
    entries.sort(key=lambda e: e.rel)
    return entries, problems


def _kept(entries: Iterable[_Entry], exclude_name: str | None) -> Iterable[_Entry]:
    """``entries`` without the top-level entry ``exclude_name`` and what is under it."""
    if not exclude_name:
        yield from entries
        return
    excl = os.fsencode(exclude_name)
    for e in entries:
        if e.rel.split(b"/", 1)[0] != excl:
            yield e


def _fingerprint(
    entries: Iterable[_Entry], exclude_name: str | None = None, *, changes: bool = False
) -> str:
    """The listing fingerprint; with ``changes``, also every entry's ctime and inode number,
    to tell whether anything was written between two walks of one scan (ctime is not kept
    across scans: some filesystems, FAT among them, do not store it)."""
    h = hashlib.sha256(b"nvr-guard listing v1\0")
    for e in _kept(entries, exclude_name):
        # Length-prefixed fields: no path can be crafted to collide with another listing.
        h.update(struct.pack(">I", len(e.rel)) + e.rel)
        h.update(e.kind.encode() + struct.pack(">QQ", e.size, e.mtime_ns))
        h.update(struct.pack(">I", len(e.link)) + e.link)
        if changes:
            h.update(struct.pack(">QQ", e.ctime_ns, e.ino))
    return h.hexdigest()


def listing_fingerprint(path: Path, exclude_name: str | None = None) -> str:
    """SHA-256 over the sorted (relative path, type, size, mtime_ns) of every non-directory entry.

    Symlinks are listed as links (their own size/mtime and target), never followed. Only the
    top-level entry named exactly ``exclude_name`` is skipped: the export's own temporary
    directory, so that writing the package does not make the scan it relies on stale. Nothing
    else is exempt, whatever its name: anything else on the medium was scanned or is a change.
    """
    entries, _ = _walk(Path(path))
    return _fingerprint(entries, exclude_name)


def _content(entries: Iterable[_Entry], digests: dict[bytes, str], exclude_name: str | None) -> str:
    """SHA-256 over every entry's path, type, size, link target and (regular files) the SHA-256
    of its bytes; "" when a regular file has no digest (it was not read whole)."""
    h = hashlib.sha256(b"nvr-guard content v1\0")
    for e in _kept(entries, exclude_name):
        digest = digests.get(e.rel, "") if e.kind == "f" else ""
        if e.kind == "f" and not digest:
            return ""
        h.update(struct.pack(">I", len(e.rel)) + e.rel)
        h.update(e.kind.encode() + struct.pack(">Q", e.size))
        h.update(struct.pack(">I", len(e.link)) + e.link + digest.encode())
    return h.hexdigest()


def _digest_file(abspath: bytes) -> tuple[str, int]:
    """(SHA-256, bytes read) of a regular file, opened without following a link."""
    fd = os.open(abspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{show_path(abspath)} is no longer a regular file")
        h = hashlib.sha256()
        n = 0
        for chunk in _file_chunks(fd):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n
    finally:
        os.close(fd)


def content_digest(path: Path, exclude_name: str | None = None) -> str:
    """What a scan's ``content_digest`` says of ``path``, computed now by reading every file
    (links are not followed). Raises OSError when a file cannot be read: not the same tree."""
    entries, problems = _walk(Path(path))
    if problems:
        raise OSError(problems[0])
    digests = {
        e.rel: _digest_file(e.abspath)[0] for e in _kept(entries, exclude_name) if e.kind == "f"
    }
    return _content(entries, digests, exclude_name)


# ---------------------------------------------------------------------------------------------
# Engine and signature information


def _read_conf(path: Path) -> dict[str, str]:
    """A clamd/freshclam config as {key: value} (last one wins, comments skipped)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def _conf_size(value: str | None, default: int) -> int:
    if not value:
        return default
    m = re.fullmatch(r"(\d+)\s*([kKmMgG]?)", value.strip())
    if not m:
        return default
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]
    return int(m.group(1)) * mult


def _conf_bool(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "1", "on")


def default_database_dir() -> Path:
    conf = _read_conf(DEFAULT_FRESHCLAM_CONF)
    return Path(conf.get("DatabaseDirectory") or DEFAULT_DATABASE_DIR)


def default_clamd_socket(clamd_config: Path | None = None) -> Path | None:
    conf = _read_conf(clamd_config or DEFAULT_CLAMD_CONF)
    sock = conf.get("LocalSocket")
    return Path(sock) if sock else None


def has_signatures(database: Path) -> bool:
    try:
        names = os.listdir(database)
    except OSError:
        return False
    return any(os.path.splitext(n)[1].lower() in _SIGNATURE_SUFFIXES for n in names)


def _cvd_header(database: Path) -> tuple[str | None, str | None]:
    """(version, date) from the 512-byte header of daily (else main) .cld/.cvd, if present.

    The header reads ``ClamAV-VDB:<date>:<version>:<signatures>:<flevel>:...``; reading it
    directly gives the version of exactly the database this scan used, offline.
    """
    for name in ("daily.cld", "daily.cvd", "main.cld", "main.cvd"):
        try:
            with open(database / name, "rb") as f:
                head = f.read(512).decode("ascii", "replace")
        except OSError:
            continue
        parts = head.split(":")
        if len(parts) >= 3 and parts[0] == "ClamAV-VDB":
            return parts[2].strip() or None, parts[1].strip() or None
    return None, None


def _split_version(text: str) -> tuple[str, str | None, str | None]:
    """``ClamAV 1.4.6/27432/Mon Nov 23 08:24:02 2026`` -> its parts (the last two optional)."""
    text = text.strip().rstrip("\0").strip()
    parts = text.split("/", 2)
    version = parts[0].strip()
    sig = parts[1].strip() if len(parts) > 1 and parts[1].strip() else None
    date = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    return version, sig, date


def engine_info(
    scanner: str = "clamscan",
    *,
    database: Path | None = None,
    clamd_socket: Path | None = None,
    timeout: float = 30,
) -> tuple[str, str | None, str | None]:
    """(engine version, signature version, signature date) as the chosen engine reports them.

    clamd: its ``VERSION`` reply. clamscan: ``clamscan --version`` for the engine, and the
    signature version/date from the database directory's daily/main header (a local test
    database without a .cvd has none: then None).
    """
    if scanner == "clamd":
        sock = clamd_socket or default_clamd_socket()
        if sock is None:
            raise OSError("no clamd socket configured")
        reply = _clamd_command(sock, b"zVERSION\0", timeout)
        return _split_version(reply)
    out = subprocess.run(
        ["clamscan", "--version"], capture_output=True, text=True, timeout=timeout, check=False
    ).stdout
    version, sig, date = _split_version(out or "ClamAV (unknown version)")
    db_sig, db_date = _cvd_header(database or default_database_dir())
    if db_sig is not None or database is not None:
        # The header describes the database this scan loads; --version reads the default one.
        sig, date = db_sig, db_date
    return version, sig, date


# ---------------------------------------------------------------------------------------------
# clamd


def _recv_reply(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\0"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.rstrip(b"\0").decode("utf-8", "replace").strip()


def _clamd_command(path: Path, command: bytes, timeout: float) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fsencode(path))
        s.sendall(command)
        return _recv_reply(s)


def clamd_ping(path: Path | None, timeout: float = 3) -> bool:
    if path is None:
        return False
    try:
        return _clamd_command(path, b"zPING\0", timeout) == "PONG"
    except OSError:
        return False


def _instream(path: Path, chunks: Iterable[bytes], timeout: float) -> str:
    """Send one stream with ``zINSTREAM`` and return clamd's reply (e.g. ``stream: OK``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fsencode(path))
        s.sendall(b"zINSTREAM\0")
        try:
            for chunk in chunks:
                if chunk:
                    s.sendall(struct.pack(">I", len(chunk)) + chunk)
            s.sendall(struct.pack(">I", 0))
        except (BrokenPipeError, ConnectionResetError):
            # clamd hangs up mid-stream when StreamMaxLength is exceeded; its reply says so.
            pass
        try:
            return _recv_reply(s)
        except ConnectionResetError:
            return "connection reset by clamd ERROR"


def _encrypted_zip_probe() -> bytes:
    """A tiny zip whose only member carries the 'encrypted' flag (built by hand, no password).

    Sent to clamd before a scan: clamd answers ``Heuristics.Encrypted.Zip FOUND`` only with
    ``AlertEncrypted yes``; without it, encrypted archives on the medium would pass as OK.
    """
    name = b"a.txt"
    data = b"nvr-guard encryption probe\n"
    crc = zlib.crc32(data)
    flags = 0x0001
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, 0, 0, crc, len(data), len(data), len(name), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        20,
        20,
        flags,
        0,
        0,
        0,
        crc,
        len(data),
        len(data),
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    body = local + name + data
    cd = central + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0)
    return body + cd + end


@dataclass(frozen=True)
class _ClamdLimits:
    stream_max: int
    max_file: int
    alert_exceeds_max: bool
    known: bool  # read from a config file (else ClamAV's defaults were assumed)


def _clamd_limits(clamd_config: Path | None) -> _ClamdLimits:
    conf = _read_conf(clamd_config) if clamd_config is not None else {}
    return _ClamdLimits(
        stream_max=_conf_size(conf.get("StreamMaxLength"), 100 * 2**20),
        max_file=_conf_size(conf.get("MaxFileSize"), 100 * 2**20),
        alert_exceeds_max=_conf_bool(conf.get("AlertExceedsMax")),
        known=bool(conf),
    )


def _classify(rel: str, name: str, infected: list[tuple[str, str]], errors: list[str]) -> None:
    if name.startswith("Heuristics.Encrypted."):
        errors.append(f"{rel}: encrypted, contents cannot be scanned ({name})")
    elif name.startswith("Heuristics.Limits.Exceeded."):
        errors.append(f"{rel}: exceeds the scanner's limits, not fully scanned ({name})")
    else:
        infected.append((rel, name))


def _file_chunks(fd: int) -> Iterable[bytes]:
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return
        yield chunk


# ---------------------------------------------------------------------------------------------
# The scan


_Rel = bytes  # a path relative to the scanned root (``_Tally.bytes`` shadows the name inside)


@dataclass
class _Tally:
    files: int = 0
    bytes: int = 0
    infected: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    digests: dict[_Rel, str] = field(default_factory=dict)  # relative path -> SHA-256
    digest: bool = True  # off only to measure what the digest costs (bench/media_scan.py)


def _scan_clamd(
    files: list[_Entry],
    sock: Path,
    limits: _ClamdLimits,
    max_file_size: int,
    progress: Progress | None,
    deadline: float,
    tally: _Tally,
) -> None:
    total = len(files)
    if progress is not None:
        progress(0, total)
    for done, e in enumerate(files, 1):
        rel = show_path(e.rel)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tally.errors.append(f"scan timed out; {total - done + 1} files not scanned")
            break
        limit = min(max_file_size, CLAMAV_MAX_FILE)
        if e.size > limit:
            tally.errors.append(f"{rel}: too large to scan ({e.size} bytes > {limit})")
        elif limits.known and e.size > limits.stream_max:
            tally.errors.append(
                f"{rel}: too large for clamd's StreamMaxLength ({e.size} > {limits.stream_max})"
            )
        elif e.size > limits.max_file and not limits.alert_exceeds_max:
            # Without AlertExceedsMax clamd answers "OK" for a file it skipped as too large.
            tally.errors.append(
                f"{rel}: larger than clamd's MaxFileSize ({limits.max_file}) and clamd does not "
                "alert on skipped files (AlertExceedsMax); not scanned"
            )
        else:
            _scan_one_clamd(e, rel, sock, remaining, tally)
        if progress is not None:
            progress(done, total)


def _scan_one_clamd(e: _Entry, rel: str, sock: Path, timeout: float, tally: _Tally) -> None:
    try:
        fd = os.open(e.abspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        tally.errors.append(f"{rel}: cannot open ({err.strerror})")
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            tally.errors.append(f"{rel}: no longer a regular file")
            return
        sent = 0
        h = hashlib.sha256()

        def counted() -> Iterable[bytes]:
            nonlocal sent
            for chunk in _file_chunks(fd):
                sent += len(chunk)
                if tally.digest:
                    h.update(chunk)  # the digest is of exactly the bytes clamd scanned
                yield chunk

        try:
            reply = _instream(sock, counted(), timeout)
        except OSError as err:
            tally.errors.append(f"{rel}: clamd failed ({err})")
            return
    finally:
        os.close(fd)
    verdict = reply.removeprefix("stream:").strip()
    if tally.digest and sent == st.st_size:
        tally.digests[e.rel] = h.hexdigest()
    if verdict == "OK":
        tally.files += 1
        tally.bytes += sent
    elif verdict.endswith(" FOUND"):
        tally.files += 1
        tally.bytes += sent
        _classify(rel, verdict[: -len(" FOUND")].strip(), tally.infected, tally.errors)
    else:
        tally.errors.append(f"{rel}: clamd: {reply or 'no reply'}")


def _scan_clamscan(
    files: list[_Entry],
    database: Path,
    max_file_size: int,
    progress: Progress | None,
    deadline: float,
    tally: _Tally,
) -> None:
    total = len(files)
    limit = min(max_file_size, CLAMAV_MAX_FILE)
    todo: list[_Entry] = []
    done = 0
    for e in files:
        rel = show_path(e.rel)
        if e.size > limit:
            tally.errors.append(f"{rel}: too large to scan ({e.size} bytes > {limit})")
            done += 1
        elif b"\n" in e.abspath:
            tally.errors.append(f"{rel}: a newline in the name; clamscan cannot be given it")
            done += 1
        else:
            todo.append(e)
    if progress is not None:
        progress(done, total)
    if not todo:
        return
    by_path = {e.abspath: e for e in todo}
    seen: set[bytes] = set()
    with tempfile.TemporaryDirectory(prefix="nvrg-clamscan-") as tmp:
        listing = Path(tmp) / "files"
        listing.write_bytes(b"".join(e.abspath + b"\n" for e in todo))
        err_path = Path(tmp) / "stderr"
        argv = [
            "clamscan",
            "--stdout",
            "--no-summary",  # counts come from the per-file lines, matched to our own walk
            f"--database={database}",
            f"--file-list={listing}",
            f"--max-filesize={limit}",
            f"--max-scansize={limit}",
            "--alert-encrypted=yes",
            "--alert-exceeds-max=yes",
            "--heuristic-alerts=yes",
            "--scan-archive=yes",
            "--follow-dir-symlinks=0",
            "--follow-file-symlinks=0",
        ]
        with open(err_path, "wb") as err_f:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err_f, stdin=subprocess.DEVNULL
            )
            assert proc.stdout is not None
            killed: list[bool] = []

            def on_deadline() -> None:
                killed.append(True)
                proc.kill()

            # Kill on the deadline from a timer: the loop below blocks on clamscan's output.
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), on_deadline)
            timer.daemon = True
            timer.start()
            try:
                for raw in proc.stdout:
                    line = raw.rstrip(b"\n")
                    hit, verdict = _match_line(line, by_path)
                    if hit is None or hit.abspath in seen:
                        continue
                    e = hit
                    seen.add(e.abspath)
                    rel = show_path(e.rel)
                    text = verdict.decode("utf-8", "replace").strip()
                    if tally.digest:
                        _digest_scanned(e, rel, tally)
                    if text in ("OK", "Empty file"):
                        tally.files += 1
                        tally.bytes += e.size
                    elif text.endswith(" FOUND"):
                        tally.files += 1
                        tally.bytes += e.size
                        _classify(rel, text[: -len(" FOUND")].strip(), tally.infected, tally.errors)
                    else:
                        tally.errors.append(f"{rel}: clamscan: {text}")
                    done += 1
                    if progress is not None:
                        progress(done, total)
                rc = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            timed_out = bool(killed)
        stderr = err_path.read_bytes().decode("utf-8", "replace")
    missing = [e for e in todo if e.abspath not in seen]
    tail = " ".join(stderr.strip().splitlines()[-3:]) or f"exit status {rc}"
    whole_scan_failed = True
    if timed_out:
        tally.errors.append(f"scan timed out; {len(missing)} files not scanned")
    elif "No supported database files found" in stderr:
        tally.errors.append(f"{NO_DATABASE} (clamscan: {database} has no usable signatures)")
    elif "cli_loaddb" in stderr or "Malformed database" in stderr:
        tally.errors.append(
            f"the ClamAV signature database in {database} could not be loaded ({tail}); "
            "run freshclam again or replace the database files"
        )
    elif rc not in (0, 1):
        tally.errors.append(f"clamscan failed: {tail}")
        whole_scan_failed = not seen
    else:
        whole_scan_failed = False
    if missing and not (whole_scan_failed or timed_out):
        # Every file we handed over must come back with a verdict; silence is not "OK".
        tally.errors.extend(f"{show_path(e.rel)}: no verdict from clamscan" for e in missing)
    elif missing:
        tally.errors.append(f"{len(missing)} files not scanned")
    if progress is not None and done < total:
        progress(total, total)


def _digest_scanned(e: _Entry, rel: str, tally: _Tally) -> None:
    """Digest a file clamscan has just read (its pages are still cached). A write between the
    two reads changes the file's ctime, which the walk after the scan compares."""
    try:
        digest, n = _digest_file(e.abspath)
    except OSError as err:
        tally.errors.append(f"{rel}: cannot read it back after the scan ({err.strerror or err})")
        return
    if n != e.size:
        tally.errors.append(f"{rel}: changed size during the scan")
        return
    tally.digests[e.rel] = digest


def _match_line(line: bytes, by_path: dict[bytes, _Entry]) -> tuple[_Entry | None, bytes]:
    """Split ``<path>: <verdict>`` where <path> is one we asked for (a name may hold ': ')."""
    line = line.removeprefix(b"WARNING: ")
    pos = len(line)
    while True:
        pos = line.rfind(b": ", 0, pos)
        if pos < 0:
            return None, b""
        e = by_path.get(line[:pos])
        if e is not None:
            return e, line[pos + 2 :]


def _choose(
    scanner: str, clamd_socket: Path | None, timeout: float, notes: list[str]
) -> tuple[str, Path | None, str | None]:
    """(engine, clamd socket, reason the forced engine cannot be used)."""
    if scanner not in ("auto", "clamd", "clamscan"):
        raise ValueError(f"scanner must be auto, clamd or clamscan, not {scanner!r}")
    if scanner == "clamscan":
        return "clamscan", None, None
    sock = clamd_socket or default_clamd_socket()
    if not clamd_ping(sock, min(timeout, 5)):
        if scanner == "clamd":
            where = show_path(os.fsencode(sock)) if sock else "(no LocalSocket configured)"
            return "clamd", sock, f"clamd is not answering on {where}; nothing was scanned"
        notes.append(f"clamd not answering on {sock}; used clamscan" if sock else "no clamd socket")
        return "clamscan", None, None
    assert sock is not None
    try:
        probe = _instream(sock, [_encrypted_zip_probe()], min(timeout, 30))
    except OSError as e:
        probe = f"probe failed: {e}"
    if not probe.startswith("stream: Heuristics.Encrypted."):
        why = (
            "clamd does not flag encrypted archives (set AlertEncrypted yes in clamd.conf); "
            f"probe reply: {probe!r}"
        )
        if scanner == "clamd":
            return "clamd", sock, why + "; nothing was scanned"
        notes.append(why + "; used clamscan")
        return "clamscan", None, None
    return "clamd", sock, None


def scan_tree(
    path: Path,
    *,
    scanner: str = "auto",
    database: Path | None = None,
    clamd_socket: Path | None = None,
    max_file_size: int = 4 * 2**30,
    progress: Progress | None = None,
    timeout: float = 3600,
    clamd_config: Path | None = None,
    digest: bool = True,
) -> ScanResult:
    """Scan every file under ``path`` and say whether the tree is clean. Never raises for a
    scan problem: that is an "error" result, so the caller cannot mistake it for "clean".

    ``database`` is the signature directory for clamscan (default: freshclam's
    DatabaseDirectory); clamd uses whatever it loaded. ``clamd_config`` tells the clamd limits
    (StreamMaxLength, MaxFileSize, AlertExceedsMax); default: /etc/clamav/clamd.conf when the
    socket is the default one, else ClamAV's built-in defaults are assumed. ``digest=False``
    skips the content digest (only to measure its cost): such a result is never usable for an
    export.
    """
    root = Path(path)
    started_wall = time.time()
    started = time.monotonic()
    deadline = started + timeout
    tally = _Tally(digest=digest)
    engine_version = "ClamAV (unknown version)"
    sig_version: str | None = None
    sig_date: str | None = None

    entries, walk_problems = _walk(root)
    fingerprint = _fingerprint(entries)
    # nothing is exempt here, whatever its name (a leftover export directory is content too)
    changes = _fingerprint(entries, changes=True)
    tally.errors.extend(walk_problems)
    files: list[_Entry] = []
    for e in entries:
        if e.kind == "f":
            files.append(e)
        elif e.kind == "l":
            # A link on export media could point the writer (or a reader) anywhere; we never
            # follow it, so it is content we did not scan.
            tally.errors.append(
                f"{show_path(e.rel)}: symbolic link (to {show_path(e.link)}), not scanned"
            )
        else:
            tally.errors.append(f"{show_path(e.rel)}: not a regular file, not scanned")
    if not root.is_dir():
        tally.errors.append(f"{show_path(os.fsencode(root))}: not a directory")

    engine, sock, refusal = _choose(scanner, clamd_socket, timeout, tally.notes)
    if refusal is not None:
        tally.errors.append(refusal)
    elif engine == "clamd":
        assert sock is not None
        if clamd_config is None and clamd_socket is None:
            clamd_config = DEFAULT_CLAMD_CONF
        try:
            engine_version, sig_version, sig_date = engine_info(
                "clamd", clamd_socket=sock, timeout=min(timeout, 30)
            )
        except OSError as e:
            tally.errors.append(f"clamd VERSION failed: {e}")
        limits = _clamd_limits(clamd_config)
        _scan_clamd(files, sock, limits, max_file_size, progress, deadline, tally)
    else:
        db = database or default_database_dir()
        try:
            engine_version, sig_version, sig_date = engine_info(
                "clamscan", database=db, timeout=min(timeout, 30)
            )
        except (OSError, subprocess.SubprocessError) as e:
            tally.errors.append(f"clamscan --version failed: {e}")
        if not has_signatures(db):
            tally.errors.append(f"{NO_DATABASE} (nothing usable in {db})")
        else:
            _scan_clamscan(files, db, max_file_size, progress, deadline, tally)

    # A tree that changed while we read it was not the tree we scanned.
    after, _ = _walk(root)
    if _fingerprint(after, changes=True) != changes:
        tally.errors.append("files were written, added or removed during the scan; scan again")

    finished = time.monotonic()
    result = "infected" if tally.infected else ("error" if tally.errors else "clean")
    res = ScanResult(
        target=str(root),
        engine=engine,
        engine_version=engine_version,
        signature_version=sig_version,
        signature_date=sig_date,
        started=started_wall,
        finished=started_wall + (finished - started),
        duration=finished - started,
        files=tally.files,
        bytes=tally.bytes,
        result=result,
        infected=tuple(tally.infected),
        errors=tuple(tally.errors),
        listing_fingerprint=fingerprint,
        notes=tuple(tally.notes),
        content_digest=_content(entries, tally.digests, None) if digest else "",
    )
    log.info(
        "scan of %s with %s: %s, %d files, %d bytes, %d infected, %d errors",
        res.target,
        engine,
        result,
        res.files,
        res.bytes,
        len(res.infected),
        len(res.errors),
    )
    return res
