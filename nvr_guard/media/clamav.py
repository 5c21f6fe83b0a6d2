"""ClamAV scan of an export destination (a USB medium's mount point or an `export.targets` dir).

Footage may only be written onto storage that was just scanned and found clean.
The scan fails closed: a result is "clean" only when every file on the tree got a positive "OK"
from ClamAV. Anything ClamAV could not look into — a file too large for its limits, an encrypted
archive, an unreadable file, a symlink or device node, an engine error, a missing signature
database, clamd not answering when it was asked for — makes the result "error" (or "infected"
when a real signature matched), never "clean".

Two engines, the same verdicts:

* clamd, through its Unix socket with ``zINSTREAM``: we walk the tree ourselves and stream each
  file's bytes, so clamd never needs permission to open files on the medium and never follows
  a link planted on it.
* ``clamscan`` otherwise: one process over the descriptors of the files we opened (given to it
  as ``/proc/self/fd/N``, never a path on the medium), with the limits and alerts we rely on set
  on its command line; its one-line-per-file output drives the progress callback.

Nothing is ever opened by its full path on the medium: the walk goes from directory descriptor
to directory descriptor (O_NOFOLLOW, O_DIRECTORY) and each file is opened relative to its
directory, without following a link, and must be the inode the walk listed (``_Tree``). Whoever
can write to the medium cannot swap a directory for a link to clean copies while the scanner or
the digest reads: the read fails, and the scan is not clean.

The result carries a fingerprint of the tree's listing (paths, sizes, mtimes), taken from the same
walk that decided what to scan, and a digest of what every file holds, taken from the bytes as they
were scanned: with clamd, from the very bytes streamed to it (one read); with clamscan, by reading
each file again through the descriptor clamscan read it by, the moment clamscan has given its
verdict on it (from the page cache clamscan just filled). The tree is listed again after the scan
with change times and inode numbers: a file written during the scan changes its ctime, which no
user can set back, so the bytes digested are the bytes scanned. The media gate compares the listing
before an export and the content digest again right before the package is committed, so a file
rewritten after the scan with its old size and mtime does not pass as scanned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
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
# files (so descriptors) one clamscan run gets; each run loads the signature database again
_CLAMSCAN_BATCH = 8000

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
    kind: str  # "f" regular file, "l" symlink, "o" anything else (fifo, socket, device)
    size: int
    mtime_ns: int
    link: bytes = b""
    ctime_ns: int = 0  # only compared within one scan (before/after): see _fingerprint
    ino: int = 0
    dev: int = 0


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _Tree:
    """The scanned tree, read through descriptors only: the root is opened once, every
    directory below it relative to its parent's descriptor and every file relative to its
    directory's, never following a link (O_NOFOLLOW), and a file opened for the scan or the
    digest must be the very inode the walk listed (same device and inode number, still a
    regular file). A directory swapped for a link, or for another directory, between the walk
    and the read (rename/RENAME_EXCHANGE by whoever can write to the medium) is then an error,
    not a different file read under the listed name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir: tuple[bytes, int] | None = None  # the last directory a file was opened in

    def close(self) -> None:
        if self._dir is not None:
            os.close(self._dir[1])
            self._dir = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def walk(self) -> tuple[list[_Entry], list[str]]:
        """Every non-directory entry (lstat, links never followed) and the walk's problems."""
        entries: list[_Entry] = []
        problems: list[str] = []
        # depth-first, one open descriptor per level
        stack: list[tuple[bytes, int, list[tuple[bytes, os.stat_result]]]] = []

        def enter(rel: bytes, fd: int) -> None:
            kids: list[tuple[bytes, os.stat_result]] = []
            try:
                with os.scandir(fd) as it:
                    names = [c.name for c in it]
                for name in names:
                    n = os.fsencode(name)
                    child = rel + b"/" + n if rel else n
                    try:
                        kids.append((child, os.stat(n, dir_fd=fd, follow_symlinks=False)))
                    except OSError as e:
                        problems.append(f"{show_path(child)}: cannot stat ({e.strerror})")
            except OSError as e:
                problems.append(f"{show_path(rel or b'.')}: directory not readable ({e.strerror})")
            kids.sort(reverse=True)
            stack.append((rel, fd, kids))

        enter(b"", os.dup(self.fd))
        try:
            while stack:
                rel_dir, dfd, kids = stack[-1]
                if not kids:
                    stack.pop()
                    os.close(dfd)
                    continue
                rel, st = kids.pop()
                name = rel.rsplit(b"/", 1)[-1]
                if stat.S_ISDIR(st.st_mode):
                    try:
                        sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                    except OSError as e:
                        problems.append(f"{show_path(rel)}: directory not readable ({e.strerror})")
                        continue
                    now = os.fstat(sub)
                    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                        os.close(sub)
                        problems.append(f"{show_path(rel)}: replaced while it was listed")
                        continue
                    enter(rel, sub)
                    continue
                link = b""
                if stat.S_ISREG(st.st_mode):
                    kind = "f"
                elif stat.S_ISLNK(st.st_mode):
                    kind = "l"
                    try:
                        link = os.readlink(name, dir_fd=dfd)
                    except OSError:
                        link = b"?"
                else:
                    kind = "o"
                entries.append(
                    _Entry(
                        rel,
                        kind,
                        st.st_size,
                        st.st_mtime_ns,
                        link,
                        st.st_ctime_ns,
                        st.st_ino,
                        st.st_dev,
                    )
                )
        finally:
            for _, dfd, _ in stack:
                os.close(dfd)
        entries.sort(key=lambda e: e.rel)
        return entries, problems

    def _dir_fd(self, rel_dir: bytes) -> int:
        if self._dir is not None and self._dir[0] == rel_dir:
            return self._dir[1]
        if self._dir is not None:
            os.close(self._dir[1])
            self._dir = None
        fd = os.dup(self.fd)
        try:
            for part in rel_dir.split(b"/") if rel_dir else []:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        self._dir = (rel_dir, fd)
        return fd

    def open_file(self, e: _Entry) -> int:
        """A descriptor on exactly the regular file ``e`` the walk listed; OSError otherwise
        (a link anywhere on the way, another file under the name, not a regular file)."""
        rel_dir, _, name = e.rel.rpartition(b"/")
        fd = os.open(name, _FILE_FLAGS, dir_fd=self._dir_fd(rel_dir))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (e.dev, e.ino):
            os.close(fd)
            raise OSError(f"{show_path(e.rel)} was replaced since it was listed")
        return fd


def _walk(root: Path) -> tuple[list[_Entry], list[str]]:
    """Every non-directory entry under ``root`` (lstat, links never followed) and walk errors."""
    with _Tree(Path(root)) as t:
        return t.walk()


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


def _digest_fd(fd: int) -> tuple[str, int]:
    """(SHA-256, bytes read) of an open regular file, read from its start."""
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = os.pread(fd, _CHUNK, n)
        if not chunk:
            return h.hexdigest(), n
        h.update(chunk)
        n += len(chunk)


def content_digest(path: Path, exclude_name: str | None = None) -> str:
    """What a scan's ``content_digest`` says of ``path``, computed now by reading every file
    through the same descriptor walk as the scan (links are not followed, each file must be
    the inode listed). Raises OSError when a file cannot be read: not the same tree."""
    with _Tree(Path(path)) as t:
        entries, problems = t.walk()
        if problems:
            raise OSError(problems[0])
        digests = {}
        for e in _kept(entries, exclude_name):
            if e.kind != "f":
                continue
            fd = t.open_file(e)
            try:
                digests[e.rel] = _digest_fd(fd)[0]
            finally:
                os.close(fd)
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


def _classify(rel: str, name: str, tally: _Tally, raw: bytes) -> None:
    infected, errors = tally.infected, tally.errors
    if name.startswith("Heuristics.Encrypted."):
        digest = tally.digests.get(raw)
        if digest is not None and digest in tally.sealed:
            # a protected export this recorder sealed (its SHA-256 is on record): encrypted
            # by design, made here from footage, not something brought in on the medium
            tally.notes.append(
                f"{rel}: an export package this recorder sealed (SHA-256 {digest}), encrypted "
                f"by design ({name}); accepted"
            )
            return
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
    # SHA-256 of the sealed exports this recorder wrote: flagged as encrypted, they are accepted
    sealed: frozenset[str] = frozenset()


def _scan_clamd(
    tree: _Tree,
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
            _scan_one_clamd(tree, e, rel, sock, remaining, tally)
        if progress is not None:
            progress(done, total)


def _scan_one_clamd(
    tree: _Tree, e: _Entry, rel: str, sock: Path, timeout: float, tally: _Tally
) -> None:
    try:
        fd = tree.open_file(e)
    except OSError as err:
        tally.errors.append(f"{rel}: cannot open ({err.strerror or err})")
        return
    try:
        st = os.fstat(fd)
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
        _classify(rel, verdict[: -len(" FOUND")].strip(), tally, e.rel)
    else:
        tally.errors.append(f"{rel}: clamd: {reply or 'no reply'}")


def _batch_size() -> int:
    """How many files one clamscan run gets: each is held open for it (see _scan_clamscan), so
    the soft limit on open files is raised towards the hard one, leaving room for the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _CLAMSCAN_BATCH + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (OSError, ValueError):
            pass
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    room = (_CLAMSCAN_BATCH + 256 if soft == resource.RLIM_INFINITY else soft) - in_use - 64
    return max(1, min(_CLAMSCAN_BATCH, room))


def _scan_clamscan(
    tree: _Tree,
    files: list[_Entry],
    database: Path,
    max_file_size: int,
    progress: Progress | None,
    deadline: float,
    tally: _Tally,
) -> None:
    """clamscan never gets a path on the medium: we open every file ourselves (relative to its
    directory's descriptor, no link followed, the very inode listed), hand the descriptors to
    clamscan (pass_fds) and give it ``/proc/self/fd/N`` to scan. That name is the kernel's link
    to the open file itself, so what clamscan reads is the file we opened whatever is renamed
    on the medium meanwhile; it is the only link clamscan is allowed to follow
    (``--follow-file-symlinks=1``: names given to it, never links met inside directories, and
    it is given no directory). The digest is then read from the same descriptor."""
    total = len(files)
    limit = min(max_file_size, CLAMAV_MAX_FILE)
    todo: list[_Entry] = []
    done = 0
    for e in files:
        if e.size > limit:
            tally.errors.append(f"{show_path(e.rel)}: too large to scan ({e.size} bytes > {limit})")
            done += 1
        else:
            todo.append(e)
    if progress is not None:
        progress(done, total)
    batch = _batch_size()
    for i in range(0, len(todo), batch):
        if time.monotonic() >= deadline:
            tally.errors.append(f"scan timed out; {len(todo) - i} files not scanned")
            break
        part = todo[i : i + batch]
        opened: dict[bytes, tuple[_Entry, int, os.stat_result]] = {}
        try:
            for e in part:
                try:
                    fd = tree.open_file(e)
                except OSError as err:
                    tally.errors.append(f"{show_path(e.rel)}: cannot open ({err.strerror or err})")
                    done += 1
                    continue
                opened[f"/proc/self/fd/{fd}".encode()] = (e, fd, os.fstat(fd))
            if opened:
                done = _clamscan_run(
                    opened, database, limit, progress, deadline, tally, done, total
                )
        finally:
            for _, fd, _ in opened.values():
                os.close(fd)
    if progress is not None and done < total:
        progress(total, total)


def _clamscan_run(
    opened: dict[bytes, tuple[_Entry, int, os.stat_result]],
    database: Path,
    limit: int,
    progress: Progress | None,
    deadline: float,
    tally: _Tally,
    done: int,
    total: int,
) -> int:
    """One clamscan process over the descriptors in ``opened``; returns the new ``done``.

    ClamAV before 1.4.6 (Debian bookworm's 1.4.3) names a file it was given as
    ``/proc/self/fd/N`` by the link's resolved path in its verdict line (what ``realpath`` of the
    link gives in this process: the path the file was opened at, as the kernel reports it now).
    Such a line is matched through that alias, and counts only if the path still leads to the
    very inode we opened (else a verdict about some other file: an error, never "OK")."""
    seen: set[bytes] = set()
    aliases: dict[bytes, bytes] = {}
    ambiguous: set[bytes] = set()
    for name in opened:
        real = os.path.realpath(name)
        if real != name and real in aliases:
            ambiguous.add(real)
        aliases[real] = name
    for real in ambiguous:
        del aliases[real]
    with tempfile.TemporaryDirectory(prefix="nvrg-clamscan-") as tmp:
        listing = Path(tmp) / "files"
        listing.write_bytes(b"".join(name + b"\n" for name in opened))
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
            "--follow-file-symlinks=1",  # only the /proc/self/fd/N names we give it
        ]
        with open(err_path, "wb") as err_f:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=err_f,
                stdin=subprocess.DEVNULL,
                pass_fds=[fd for _, fd, _ in opened.values()],
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
                    found, verdict = _match_line(line, opened)
                    if found is None:
                        alias, verdict = _match_line(line, aliases)
                        if alias is None or aliases[alias] in seen:
                            continue
                        found = aliases[alias]
                        if not _same_inode(alias, opened[found][2]):
                            seen.add(found)
                            rel = show_path(opened[found][0].rel)
                            tally.errors.append(f"{rel}: changed during the scan")
                            done += 1
                            continue
                    name = found
                    if name in seen:
                        continue
                    seen.add(name)
                    e, fd, st = opened[name]
                    rel = show_path(e.rel)
                    text = verdict.decode("utf-8", "replace").strip()
                    if tally.digest:
                        _digest_scanned(e, fd, st, rel, tally)
                    if text in ("OK", "Empty file"):
                        tally.files += 1
                        tally.bytes += e.size
                    elif text.endswith(" FOUND"):
                        tally.files += 1
                        tally.bytes += e.size
                        _classify(rel, text[: -len(" FOUND")].strip(), tally, e.rel)
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
    missing = [e for name, (e, _, _) in opened.items() if name not in seen]
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
    return done


def _digest_scanned(e: _Entry, fd: int, before: os.stat_result, rel: str, tally: _Tally) -> None:
    """Digest a file clamscan has just read, through the descriptor clamscan read it by (its
    pages are still cached). A write between the two reads changes the file's ctime."""
    try:
        digest, n = _digest_fd(fd)
        after = os.fstat(fd)
    except OSError as err:
        tally.errors.append(f"{rel}: cannot read it back after the scan ({err.strerror or err})")
        return
    if n != e.size or after.st_size != e.size:
        tally.errors.append(f"{rel}: changed size during the scan")
        return
    if (after.st_ctime_ns, after.st_mtime_ns) != (before.st_ctime_ns, before.st_mtime_ns):
        tally.errors.append(f"{rel}: written during the scan")
        return
    tally.digests[e.rel] = digest


def _same_inode(path: bytes, st: os.stat_result) -> bool:
    """Does ``path`` (no link followed) name the file whose stat is ``st``?"""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _match_line(line: bytes, by_path: dict[bytes, Any]) -> tuple[bytes | None, bytes]:
    """Split ``<path>: <verdict>`` where <path> is one we asked for."""
    line = line.removeprefix(b"WARNING: ")
    pos = len(line)
    while True:
        pos = line.rfind(b": ", 0, pos)
        if pos < 0:
            return None, b""
        if line[:pos] in by_path:
            return line[:pos], line[pos + 2 :]


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
    sealed: frozenset[str] = frozenset(),
) -> ScanResult:
    """Scan every file under ``path`` and say whether the tree is clean. Never raises for a
    scan problem: that is an "error" result, so the caller cannot mistake it for "clean".

    ``database`` is the signature directory for clamscan (default: freshclam's
    DatabaseDirectory); clamd uses whatever it loaded. ``clamd_config`` tells the clamd limits
    (StreamMaxLength, MaxFileSize, AlertExceedsMax); default: /etc/clamav/clamd.conf when the
    socket is the default one, else ClamAV's built-in defaults are assumed. ``digest=False``
    skips the content digest (only to measure its cost): such a result is never usable for an
    export. ``sealed``: the SHA-256 of the protected exports this recorder sealed; such a file,
    flagged as encrypted, is accepted with a note (the digest of what was scanned decides).
    """
    root = Path(path)
    started_wall = time.time()
    started = time.monotonic()
    deadline = started + timeout
    tally = _Tally(digest=digest, sealed=sealed)
    tree: _Tree | None = None
    entries: list[_Entry] = []
    try:
        tree = _Tree(root)
    except OSError as e:
        walk_problems = [f"{show_path(os.fsencode(root))}: cannot open ({e.strerror})"]
    if tree is not None:
        entries, walk_problems = tree.walk()
    try:
        return _scan(
            root,
            tree,
            entries,
            walk_problems,
            scanner,
            database,
            clamd_socket,
            max_file_size,
            progress,
            timeout,
            clamd_config,
            digest,
            started_wall,
            started,
            deadline,
            tally,
        )
    finally:
        if tree is not None:
            tree.close()


def _scan(
    root: Path,
    tree: _Tree | None,
    entries: list[_Entry],
    walk_problems: list[str],
    scanner: str,
    database: Path | None,
    clamd_socket: Path | None,
    max_file_size: int,
    progress: Progress | None,
    timeout: float,
    clamd_config: Path | None,
    digest: bool,
    started_wall: float,
    started: float,
    deadline: float,
    tally: _Tally,
) -> ScanResult:
    engine_version = "ClamAV (unknown version)"
    sig_version: str | None = None
    sig_date: str | None = None
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
    engine, sock, refusal = _choose(scanner, clamd_socket, timeout, tally.notes)
    if tree is None:
        pass  # nothing to scan: the error is recorded
    elif refusal is not None:
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
        _scan_clamd(tree, files, sock, limits, max_file_size, progress, deadline, tally)
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
            _scan_clamscan(tree, files, db, max_file_size, progress, deadline, tally)

    # A tree that changed while we read it was not the tree we scanned.
    after, _ = tree.walk() if tree is not None else ([], [])
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
