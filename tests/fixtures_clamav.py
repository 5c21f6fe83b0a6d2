"""ClamAV fixtures any test can import: a local EICAR signature database and a real clamd.

There is no network and no official signature database here (nor in CI), so the database is
one body signature for the EICAR test pattern, written at run time. The EICAR string itself is
assembled from parts so that the repository carries no file a virus scanner would flag.

Use from a test module::

    from fixtures_clamav import clamav_db, clamd_server, eicar_bytes

    IMPORTED_FIXTURES = (clamav_db, clamd_server)  # pytest finds them by name; keeps ruff quiet

``clamd_server`` is session-scoped: one ``clamd --foreground`` on a private socket in /tmp,
loading the local database, with the alerts the media gate relies on switched on.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

EICAR_SIGNATURE = "NVRG.Test.EICAR"
# ClamAV appends ".UNOFFICIAL" to names from a database that is not signed by Cisco-Talos.
EICAR_FOUND_NAME = EICAR_SIGNATURE + ".UNOFFICIAL"


def eicar_bytes() -> bytes:
    """The 68-byte EICAR anti-virus test file, built from pieces at run time."""
    head = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$"
    tail = "-".join(["EICAR", "STANDARD", "ANTIVIRUS", "TEST", "FILE!"]) + "$H+H*"
    return (head + tail).encode("ascii")


def write_eicar_db(directory: Path) -> Path:
    """A signature database directory holding one .ndb body signature for EICAR.

    A body signature (offset ``*``: anywhere) also matches the pattern inside other files and
    inside archives, unlike an .hdb whole-file hash.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nvrg-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{eicar_bytes().hex()}\n")
    return directory


def encrypted_zip_bytes() -> bytes:
    """A zip whose member is flagged as encrypted (general-purpose bit 0), made without zip -e.

    The stdlib cannot encrypt; ClamAV only needs the flag to raise Heuristics.Encrypted.Zip,
    which is exactly the case the gate must treat as not clean.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("report.txt", "quarterly numbers\n" * 20)
    data = bytearray(buf.getvalue())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 6] |= 0x01
    data[central + 8] |= 0x01
    return bytes(data)


@dataclass
class ClamdServer:
    socket: Path
    config: Path
    database: Path
    process: subprocess.Popen[bytes]
    log: Path


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"zPING\0")
            return s.recv(16).startswith(b"PONG")
    except OSError:
        return False


def start_clamd(
    workdir: Path, database: Path, *, alert_encrypted: bool = True, timeout: float = 120
) -> ClamdServer:
    """Start a real clamd in the foreground on ``workdir/clamd.sock``; wait until it answers PING.

    No ``User`` line: clamd keeps the test's uid (root in CI) and can read the tmp database.
    StreamMaxLength and MaxFileSize are 1 MiB so the size-limit paths are cheap to exercise.
    """
    sock = workdir / "clamd.sock"
    conf = workdir / "clamd.conf"
    log = workdir / "clamd.log"
    lines = [
        f"LocalSocket {sock}",
        "LocalSocketMode 600",
        f"DatabaseDirectory {database}",
        f"TemporaryDirectory {workdir}",
        f"LogFile {log}",
        "Foreground yes",
        "StreamMaxLength 1M",
        "MaxFileSize 1M",
        "AlertExceedsMax yes",
        f"AlertEncrypted {'yes' if alert_encrypted else 'no'}",
        "SelfCheck 3600",
    ]
    conf.write_text("\n".join(lines) + "\n")
    out = open(workdir / "clamd.out", "wb")
    proc = subprocess.Popen(
        ["clamd", "--foreground", f"--config-file={conf}"],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    out.close()
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not _ping(sock):
        if proc.poll() is not None:
            text = (workdir / "clamd.out").read_text(errors="replace")
            raise RuntimeError(f"clamd exited with {proc.returncode}: {text[-2000:]}")
        if time.monotonic() > deadline:
            stop_clamd(proc)
            raise RuntimeError(f"clamd did not answer PING within {timeout} s")
        time.sleep(delay)  # polling with a deadline, not synchronisation by sleeping
        delay = min(delay * 2, 0.2)
    return ClamdServer(sock, conf, database, proc, log)


def stop_clamd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def clamav_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signature directory with only the EICAR body signature."""
    return write_eicar_db(tmp_path_factory.mktemp("clamav-db"))


@pytest.fixture(scope="session")
def clamd_server(clamav_db: Path) -> Iterator[ClamdServer]:
    # Unix socket paths are limited to 108 bytes: keep the directory short, in /tmp.
    workdir = Path(tempfile.mkdtemp(prefix="nvrg-clamd-", dir="/tmp"))
    os.chmod(workdir, 0o700)
    server = start_clamd(workdir, clamav_db)
    try:
        yield server
    finally:
        stop_clamd(server.process)
        shutil.rmtree(workdir, ignore_errors=True)
