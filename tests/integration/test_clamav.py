"""ClamAV scan of export destinations: real clamscan and a real clamd, a local EICAR database."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.media import clamav
from nvr_guard.media.clamav import (
    NO_DATABASE,
    ScanResult,
    content_digest,
    engine_info,
    listing_fingerprint,
    scan_tree,
)
from tests.fixtures.clamav import (
    EICAR_FOUND_NAME,
    ClamdServer,
    eicar_bytes,
    encrypted_zip_bytes,
    start_clamd,
    stop_clamd,
)

pytestmark = pytest.mark.integration

# Imported fixtures are found by pytest by name; naming them here marks the imports as used.

ENGINES = ["clamscan", "clamd"]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def scan(engine: str, tree: Path, db: Path, server: ClamdServer | None, **kw: Any) -> ScanResult:
    """Scan with one engine forced; clamd gets the fixture's socket and config."""
    if engine == "clamd":
        assert server is not None
        kw.setdefault("clamd_socket", server.socket)
        kw.setdefault("clamd_config", server.config)
    return scan_tree(tree, scanner=engine, database=db, **kw)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> ClamdServer | None:
    """The session clamd, started only for tests that use the clamd engine."""
    engine = request.node.callspec.params.get("engine")
    if engine == "clamd":
        s: ClamdServer = request.getfixturevalue("clamd_server")
        return s
    return None


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "medium"
    root.mkdir()
    return root


@pytest.mark.parametrize("engine", ENGINES)
def test_clean_tree_is_clean_with_counts(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    write(tree / "a.txt", b"hello\n")
    write(tree / "docs" / "notes.md", b"x" * 5000)
    write(tree / "docs" / "deep" / "empty", b"")
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "clean", r.errors
    assert r.clean
    assert r.engine == engine
    assert r.engine_version.startswith("ClamAV 1.")
    assert (r.files, r.bytes) == (3, 6 + 5000)
    assert r.infected == () and r.errors == ()
    assert r.finished >= r.started and r.duration >= 0
    assert r.listing_fingerprint == listing_fingerprint(tree)
    doc = json.loads(json.dumps(r.as_json()))
    assert doc["result"] == "clean" and doc["files"] == 3 and doc["engine"] == engine


@pytest.mark.parametrize("engine", ENGINES)
def test_eicar_is_found_with_name_and_relative_path(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    write(tree / "ok.txt", b"fine\n")
    # A name with ": " in it: clamscan's "<path>: <verdict>" lines must still be split right.
    write(tree / "sub dir" / "x: y.com", eicar_bytes())
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "infected"
    assert not r.clean
    assert r.infected == (("sub dir/x: y.com", EICAR_FOUND_NAME),)
    assert r.files == 2
    assert r.as_json()["infected"] == [{"path": "sub dir/x: y.com", "signature": EICAR_FOUND_NAME}]


@pytest.mark.parametrize("engine", ENGINES)
def test_eicar_inside_a_zip_is_found(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner/readme.txt", eicar_bytes())
    write(tree / "bundle.zip", buf.getvalue())
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "infected"
    assert r.infected == (("bundle.zip", EICAR_FOUND_NAME),)


@pytest.mark.parametrize("engine", ENGINES)
def test_encrypted_archive_is_not_clean(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    write(tree / "clean.txt", b"hello\n")
    write(tree / "secret.zip", encrypted_zip_bytes())
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "error"
    assert not r.clean
    assert r.infected == ()
    assert len(r.errors) == 1
    assert r.errors[0].startswith("secret.zip: encrypted")
    assert "Heuristics.Encrypted.Zip" in r.errors[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_file_over_max_file_size_is_not_clean(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    write(tree / "small.txt", b"a" * 100)
    write(tree / "big.bin", b"b" * 5000)
    r = scan(engine, tree, clamav_db, server, max_file_size=1000)
    assert r.result == "error"
    assert (r.files, r.bytes) == (1, 100)
    assert r.errors == ("big.bin: too large to scan (5000 bytes > 1000)",)


@pytest.mark.parametrize("engine", ENGINES)
def test_file_over_clamav_hard_limit_is_not_clean(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    # libclamav 1.4 cannot scan 2 GiB or more, whatever max_file_size says (sparse: no disk use).
    with open(tree / "huge.mp4", "wb") as f:
        f.truncate(2**31)
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "error"
    assert r.files == 0
    assert r.errors == (f"huge.mp4: too large to scan ({2**31} bytes > {2**31 - 1})",)


@pytest.mark.parametrize("engine", ENGINES)
def test_symlink_and_fifo_are_not_clean(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    write(tree / "real.txt", b"hello\n")
    os.symlink("/etc/passwd", tree / "link")
    os.mkfifo(tree / "pipe")
    r = scan(engine, tree, clamav_db, server)
    assert r.result == "error"
    assert r.files == 1
    assert sorted(r.errors) == [
        "link: symbolic link (to /etc/passwd), not scanned",
        "pipe: not a regular file, not scanned",
    ]


@pytest.mark.parametrize("contents", ["empty", "metadata-only", "missing"])
def test_no_signature_database_is_an_error_never_clean(
    contents: str, tree: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    if contents != "missing":
        db.mkdir()
    if contents == "metadata-only":
        (db / "freshclam.dat").write_bytes(b"\0" * 16)
        (db / "local.ign2").write_text("Some.Signature\n")
    write(tree / "a.txt", b"hello\n")
    r = scan_tree(tree, scanner="clamscan", database=db)
    assert r.result == "error"
    assert r.files == 0
    assert any(e.startswith(NO_DATABASE) for e in r.errors), r.errors


def test_malformed_signature_database_is_an_error(tree: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    (db / "broken.ndb").write_text("this is not a signature\n")
    write(tree / "a.txt", b"hello\n")
    r = scan_tree(tree, scanner="clamscan", database=db)
    assert r.result == "error"
    assert r.files == 0
    assert r.errors[0].startswith(f"the ClamAV signature database in {db} could not be loaded")
    assert r.errors[-1] == "1 files not scanned"


def test_forced_clamd_not_running_is_an_error(tree: Path, tmp_path: Path) -> None:
    write(tree / "a.txt", b"hello\n")
    dead = tmp_path / "nobody.sock"
    r = scan_tree(tree, scanner="clamd", clamd_socket=dead)
    assert r.result == "error"
    assert r.engine == "clamd"
    assert r.files == 0
    assert r.errors == (f"clamd is not answering on {dead}; nothing was scanned",)


def test_auto_uses_clamd_when_it_answers(
    tree: Path, clamav_db: Path, clamd_server: ClamdServer
) -> None:
    write(tree / "e.txt", eicar_bytes())
    r = scan_tree(
        tree, clamd_socket=clamd_server.socket, clamd_config=clamd_server.config, database=None
    )
    assert r.engine == "clamd"
    assert r.result == "infected"
    assert r.infected == (("e.txt", EICAR_FOUND_NAME),)
    assert r.notes == ()


def test_auto_falls_back_to_clamscan_when_clamd_is_down(
    tree: Path, clamav_db: Path, tmp_path: Path
) -> None:
    write(tree / "e.txt", eicar_bytes())
    r = scan_tree(tree, clamd_socket=tmp_path / "gone.sock", database=clamav_db)
    assert r.engine == "clamscan"
    assert r.result == "infected"
    assert r.infected == (("e.txt", EICAR_FOUND_NAME),)
    assert any("used clamscan" in n for n in r.notes)


@pytest.fixture(scope="module")
def lax_clamd(clamav_db: Path) -> Iterator[ClamdServer]:
    """A clamd configured like Debian's default: no alert on encrypted archives."""
    workdir = Path(tempfile.mkdtemp(prefix="nvrg-laxd-", dir="/tmp"))
    server = start_clamd(workdir, clamav_db, alert_encrypted=False)
    try:
        yield server
    finally:
        stop_clamd(server.process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_clamd_without_alert_encrypted_is_not_trusted(
    tree: Path, clamav_db: Path, lax_clamd: ClamdServer
) -> None:
    write(tree / "secret.zip", encrypted_zip_bytes())
    # auto: the probe shows clamd would pass encrypted archives as OK, so clamscan is used.
    r = scan_tree(tree, clamd_socket=lax_clamd.socket, database=clamav_db)
    assert r.engine == "clamscan"
    assert r.result == "error"
    assert any("AlertEncrypted" in n for n in r.notes)
    assert r.errors[0].startswith("secret.zip: encrypted")
    # forced clamd: refused outright rather than trusting its "OK".
    forced = scan_tree(tree, scanner="clamd", clamd_socket=lax_clamd.socket)
    assert forced.result == "error"
    assert forced.files == 0
    assert "AlertEncrypted" in forced.errors[0]


def test_clamd_stream_limit_reply_is_not_clean(tree: Path, clamd_server: ClamdServer) -> None:
    # Without clamd_config the limits are unknown, so the file is streamed and clamd itself
    # hangs up with "INSTREAM size limit exceeded" (StreamMaxLength is 1M in the fixture).
    write(tree / "two-mib.bin", b"\x01" * (2 * 2**20))
    r = scan_tree(tree, scanner="clamd", clamd_socket=clamd_server.socket)
    assert r.result == "error"
    assert r.files == 0
    assert len(r.errors) == 1
    assert r.errors[0].startswith("two-mib.bin: clamd: INSTREAM size limit exceeded")


def test_clamd_limits_from_config_refuse_before_streaming(
    tree: Path, clamd_server: ClamdServer
) -> None:
    write(tree / "two-mib.bin", b"\x01" * (2 * 2**20))
    r = scan_tree(
        tree, scanner="clamd", clamd_socket=clamd_server.socket, clamd_config=clamd_server.config
    )
    assert r.result == "error"
    assert r.errors == (
        f"two-mib.bin: too large for clamd's StreamMaxLength ({2 * 2**20} > {2**20})",
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_progress_counts_every_file(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    for i in range(7):
        write(tree / f"d{i % 3}" / f"f{i}.txt", f"file {i}\n".encode())
    write(tree / "too-big", b"z" * 2000)
    calls: list[tuple[int, int]] = []
    r = scan(
        engine,
        tree,
        clamav_db,
        server,
        max_file_size=1000,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert r.files == 7
    assert calls[-1] == (8, 8)
    assert all(t == 8 for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done)


@pytest.mark.parametrize("engine", ENGINES)
def test_tree_changed_during_scan_is_not_clean(
    engine: str, tree: Path, clamav_db: Path, server: ClamdServer | None
) -> None:
    for i in range(3):
        write(tree / f"f{i}.txt", b"data\n")

    def meddle(done: int, total: int) -> None:
        if done == 1:
            write(tree / "late-arrival.exe", b"MZ")

    r = scan(engine, tree, clamav_db, server, progress=meddle)
    assert r.result == "error"
    assert r.errors[-1] == "files were written, added or removed during the scan; scan again"


def test_scan_timeout_is_not_clean(tree: Path, clamav_db: Path) -> None:
    write(tree / "a.txt", b"hello\n")
    r = scan_tree(tree, scanner="clamscan", database=clamav_db, timeout=0.001)
    assert r.result == "error"
    assert any("timed out" in e for e in r.errors), r.errors


def test_leftover_export_temp_dir_is_scanned_and_fingerprinted(tree: Path, clamav_db: Path) -> None:
    write(tree / ".NVRG-tmp-1" / "payload.com", eicar_bytes())
    r = scan_tree(tree, scanner="clamscan", database=clamav_db)
    assert r.result == "infected"
    assert r.infected == ((".NVRG-tmp-1/payload.com", EICAR_FOUND_NAME),)
    shutil.rmtree(tree / ".NVRG-tmp-1")
    assert r.listing_fingerprint != listing_fingerprint(tree)


def test_engine_info_from_clamd(clamd_server: ClamdServer) -> None:
    version, sig, date = engine_info("clamd", clamd_socket=clamd_server.socket)
    expected = subprocess.run(["clamd", "--version"], capture_output=True, text=True).stdout
    assert version.startswith("ClamAV 1.")
    assert expected.startswith(version)
    # A local database without daily.cvd carries no version: reported as None, not invented.
    assert (sig, date) == (None, None)


def test_engine_info_reads_the_database_header(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    header = "ClamAV-VDB:23 Nov 2026 08-24 +0000:27432:2077000:90:md5:dsig:builder:1795422240"
    (db / "daily.cld").write_bytes(header.encode().ljust(512, b" "))
    version, sig, date = engine_info("clamscan", database=db)
    assert version.startswith("ClamAV 1.")
    assert (sig, date) == ("27432", "23 Nov 2026 08-24 +0000")


# ---------------------------------------------------------------------------------------------
# listing_fingerprint


def _set_mtime(p: Path, ns: int) -> None:
    os.utime(p, ns=(ns, ns), follow_symlinks=False)


@pytest.mark.parametrize(
    "change",
    ["add", "remove", "grow", "mtime", "rename", "add-empty-subdir-file", "retarget-link"],
)
def test_fingerprint_changes_with_the_listing(change: str, tree: Path) -> None:
    a = write(tree / "a.mp4", b"12345")
    write(tree / "d" / "b.txt", b"b")
    os.symlink("a.mp4", tree / "link")
    _set_mtime(a, 1_700_000_000_000_000_000)
    before = listing_fingerprint(tree)
    assert listing_fingerprint(tree) == before  # stable
    if change == "add":
        write(tree / "c.txt", b"")
    elif change == "remove":
        (tree / "d" / "b.txt").unlink()
    elif change == "grow":
        a.write_bytes(b"123456")
        _set_mtime(a, 1_700_000_000_000_000_000)
    elif change == "mtime":
        _set_mtime(a, 1_700_000_000_000_000_001)
    elif change == "rename":
        (tree / "d" / "b.txt").rename(tree / "d" / "B.txt")
    elif change == "add-empty-subdir-file":
        write(tree / "d" / "e" / "f" / "new", b"")
    elif change == "retarget-link":
        st = os.lstat(tree / "link")
        (tree / "link").unlink()
        # Same target length, same mtime: only the target differs.
        os.symlink("b.mp4", tree / "link")
        _set_mtime(tree / "link", st.st_mtime_ns)
    assert listing_fingerprint(tree) != before


def test_fingerprint_leaves_out_only_the_named_top_level_entry(tree: Path) -> None:
    write(tree / "a.txt", b"a")
    before = listing_fingerprint(tree)
    write(tree / ".NVRG-1234" / "clip.mp4", b"partial")
    assert listing_fingerprint(tree, exclude_name=".NVRG-1234") == before
    assert listing_fingerprint(tree) != before  # no name is exempt by its prefix
    write(tree / ".NVRG-lock", b"")
    assert listing_fingerprint(tree, exclude_name=".NVRG-1234") != before
    # Only at the top level: the same name deeper down is ordinary content.
    (tree / ".NVRG-lock").unlink()
    write(tree / "sub" / ".NVRG-1234", b"")
    assert listing_fingerprint(tree, exclude_name=".NVRG-1234") != before


def test_fingerprint_does_not_depend_on_content_or_directory_mtimes(tree: Path) -> None:
    a = write(tree / "a.txt", b"aaaa")
    st = a.stat()
    before = listing_fingerprint(tree)
    a.write_bytes(b"bbbb")  # same size, mtime restored: the listing is unchanged
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tree / "emptydir").mkdir()
    assert listing_fingerprint(tree) == before


# ---------------------------------------------------------------------------------------------
# Files are read through descriptors: a directory swapped for a link between the walk and the
# read (renameat2 RENAME_EXCHANGE by whoever may write to the medium) is not a clean file.

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def planted(tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    """EICAR in ``tree/sub``; beside the tree a link ``sub`` to a clean copy of the same size."""
    write(tree / "a.txt", b"hello\n")
    write(tree / "sub" / "evil.txt", eicar_bytes())
    decoy = tmp_path / "decoy"
    write(decoy / "clean" / "evil.txt", b"A" * len(eicar_bytes()))
    os.symlink(decoy / "clean", decoy / "sub")
    return tree / "sub", decoy / "sub"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_directory_swapped_for_a_link_after_the_walk_is_not_scanned_clean(
    engine: str,
    tree: Path,
    tmp_path: Path,
    clamav_db: Path,
    server: ClamdServer | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real, decoy = planted(tree, tmp_path)
    choose = clamav._choose
    swapped: list[bool] = []

    def walked_then_swap(*a: Any, **kw: Any) -> Any:
        # called once the tree is listed, before any file is opened
        exchange(real, decoy)
        swapped.append(True)
        return choose(*a, **kw)

    def swap_back(done: int, total: int) -> None:
        if swapped and done == total:
            exchange(real, decoy)  # the EICAR directory back before the walk after the scan
            swapped.clear()

    monkeypatch.setattr(clamav, "_choose", walked_then_swap)
    r = scan(engine, tree, clamav_db, server, progress=swap_back)
    assert (tree / "sub" / "evil.txt").read_bytes() == eicar_bytes()  # EICAR is on the medium
    assert r.result != "clean", r
    assert any(e.startswith("sub/evil.txt: cannot open") for e in r.errors), r.errors


def test_the_commit_time_content_read_does_not_follow_a_swapped_directory(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, decoy = planted(tree, tmp_path)
    kept = clamav._kept

    def listed_then_swap(*a: Any, **kw: Any) -> Any:
        exchange(real, decoy)
        return kept(*a, **kw)

    monkeypatch.setattr(clamav, "_kept", listed_then_swap)
    with pytest.raises(OSError):
        content_digest(tree)


# ClamAV 1.4.3 (Debian bookworm, the container test's tree) names a file given as /proc/self/fd/N
# by the link's resolved path in its verdict line; 1.4.6 (this machine) keeps the name it was
# given. This wrapper runs the real clamscan and rewrites its names the way 1.4.3 prints them;
# with NVRG_TEST_SWAP set it then replaces each scanned file by another one at the same path,
# as a writer on a shared target could between clamscan's open and the daemon's check.
CLAMSCAN_143 = r"""#!/usr/bin/env python3
import os, re, subprocess, sys
real = os.environ["NVRG_REAL_CLAMSCAN"]
r = subprocess.run([real, *sys.argv[1:]], stdout=subprocess.PIPE, close_fds=False)
out = r.stdout
def resolve(m):
    path = os.path.realpath(m.group(1))
    if os.environ.get("NVRG_TEST_SWAP"):
        os.rename(path, path + b".scanned")
        with open(path, "wb") as f:
            f.write(b"another file\n")
    return path + b": "
out = re.sub(rb"^(/proc/self/fd/[0-9]+): ", resolve, out, flags=re.M)
sys.stdout.buffer.write(out)
sys.exit(r.returncode)
"""


@pytest.fixture
def clamscan_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    real = shutil.which("clamscan")
    assert real, "clamscan is not installed"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "clamscan"
    wrapper.write_text(CLAMSCAN_143)
    wrapper.chmod(0o755)
    monkeypatch.setenv("NVRG_REAL_CLAMSCAN", real)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return wrapper


def test_verdicts_named_by_the_resolved_path_count_as_clamav_1_4_3_prints_them(
    tree: Path, clamav_db: Path, clamscan_143: Path
) -> None:
    """Before: every file "no verdict from clamscan", so no medium with files scanned clean on
    bookworm (seen failing in test_deployed's USB flow)."""
    write(tree / "a.txt", b"hello\n")
    write(tree / "sub dir" / "x: y.com", eicar_bytes())
    r = scan_tree(tree, scanner="clamscan", database=clamav_db)
    assert r.infected == (("sub dir/x: y.com", EICAR_FOUND_NAME),), r.errors
    assert r.errors == () and r.files == 2
    (tree / "sub dir" / "x: y.com").unlink()
    r = scan_tree(tree, scanner="clamscan", database=clamav_db)
    assert r.result == "clean" and r.files == 1, r.errors


def test_a_resolved_path_that_now_names_another_file_is_not_a_verdict(
    tree: Path, clamav_db: Path, clamscan_143: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tree / "a.txt", b"hello\n")
    monkeypatch.setenv("NVRG_TEST_SWAP", "1")
    r = scan_tree(tree, scanner="clamscan", database=clamav_db)
    assert r.result == "error" and not r.clean
    assert "a.txt: changed during the scan" in r.errors, r.errors
