"""Protected exports: the package sealed for its recipient before it leaves the recorder.

A protected export builds the ordinary signed package (``package.run_export``) in a private
staging directory on the recorder (``<state_dir>/staging``, 0700, the daemon's), seals it into
one file, and writes that file to the destination the way a package is written (hidden
temporary directory, fsync, read back, rename that never replaces). The destination then holds
``NVRG-<request>-<stamp>/`` with the sealed file and a README.txt saying how to open it; the
plaintext never reaches the medium, and the staging directory is removed on success and on
failure (after a kill -9, by the next daemon start: ``remove_stale_staging``).

Two seals:

- ``passphrase``: a 7z archive, AES-256 with its file names encrypted too (py7zr), which 7-Zip
  opens on a stock Windows PC and ``7z`` on Linux. The passphrase is 20 characters of an
  unambiguous 32-letter alphabet in groups of four (100 bits), made here, returned once to the
  technician and stored nowhere. The archive is read back and decrypted once before the commit
  (every file's CRC checked).
- ``recipient``: CMS EnvelopedData (AES-256-CBC; the content key wrapped with RSA-OAEP or ECDH)
  to the recipient unit's X.509 certificate, made by ``openssl cms`` from a tar of the package,
  streamed: the unit decrypts with ``openssl cms -decrypt`` and its own key; no secret to hand
  over.

After decryption the package is the same as an unprotected one and verifies the same way; the
sealed file's SHA-256 goes to the audit log and the paper record, so the recipient can prove
which file arrived.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nvr_guard.errors import PolicyRefused, RuntimeFailure
from nvr_guard.export.keys import RecipientCert
from nvr_guard.export.package import (
    Destination,
    DirectoryDestination,
    ExportJob,
    ExportPackage,
    SourceSegment,
    open_package_dir,
    package_name,
    run_export,
    undo_package,
)
from nvr_guard.export.writer import PackageDir

README = "README.txt"
STAGING = "staging"  # under the state directory
PASSPHRASE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1: read aloud safely
PASSPHRASE_CHARS = 20  # x 5 bits = 100 bits
OPENSSL = "openssl"
SEAL_SHARE = 0.1  # of the progress bar: sealing after the encode
STAGING_RESERVE = 256 * 1024 * 1024  # left free on the state directory's file system


def new_passphrase() -> str:
    """A fresh random passphrase: ``ABCD-EFGH-JKLM-NPQR-STUV`` (100 bits)."""
    chars = "".join(secrets.choice(PASSPHRASE_ALPHABET) for _ in range(PASSPHRASE_CHARS))
    return "-".join(chars[i : i + 4] for i in range(0, PASSPHRASE_CHARS, 4))


@dataclass(frozen=True)
class Seal:
    """How to seal one export: ``mode`` passphrase (with ``passphrase``) or recipient (with
    ``cert``, the certificate of ``unit``)."""

    mode: str
    passphrase: str | None = None
    cert: RecipientCert | None = None
    unit: str = ""

    @property
    def suffix(self) -> str:
        """The sealed file's extension."""
        return ".7z" if self.mode == "passphrase" else ".p7m"


def staging_dir(state_dir: Path) -> Path:
    """The private staging directory (created 0700 when missing; refused when it is not a
    directory of this process that only it can enter)."""
    path = state_dir / STAGING
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or stat.S_IMODE(st.st_mode) & 0o077
    ):
        raise RuntimeFailure(
            f"{path} must be a directory of the daemon's user with mode 0700 (it holds "
            "unencrypted packages while they are sealed); fix or remove it"
        )
    return path


def remove_stale_staging(state_dir: Path) -> list[Path]:
    """Remove what an export killed mid-way (kill -9, power loss) left in the staging
    directory: unencrypted packages that must not outlive their export. Called when no export
    runs (daemon start, under the export lock). Returns what was removed."""
    path = state_dir / STAGING
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        p = path / name
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                continue
        removed.append(p)
    return removed


@dataclass
class _Staging(DirectoryDestination):
    """The staging directory as the package builder sees it: the manifest describes the real
    destination (the medium and its scan record), where the sealed package goes."""

    outer: Destination | None = None

    def describe(self) -> Mapping[str, Any]:
        """The real destination's description."""
        return self.outer.describe() if self.outer is not None else super().describe()

    def check_before_write(self, bytes_needed: int) -> None:
        """Room on the destination for the sealed package (checked again with its real size
        once it is made), and in the staging directory for the unencrypted one meanwhile:
        a full medium is refused before the encode, not after it."""
        if self.outer is not None:
            self.outer.check_before_write(bytes_needed)
        free = shutil.disk_usage(self.path).free
        if free < bytes_needed + STAGING_RESERVE:
            raise PolicyRefused(
                f"an encrypted export is built on the recorder before it is sealed, and "
                f"{self.path.parent} has {free // 2**20} MiB free; this one needs about "
                f"{(bytes_needed + STAGING_RESERVE) // 2**20} MiB there. Free space on the state "
                "directory's file system, or export a shorter range."
            )


def run_sealed_export(
    clips: Sequence[tuple[str, Sequence[SourceSegment]]],
    job: ExportJob,
    dest: Destination,
    key: Ed25519PrivateKey,
    *,
    seal: Seal,
    staging: Path,
    audit_head: tuple[int, str],
    progress: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> ExportPackage:
    """Build the package in ``staging``, seal it, and write the sealed file to ``dest``.

    Returns the package on ``dest`` (its ``manifest`` is the inner package's; ``sealed``
    describes the sealed file). Errors as :func:`run_export`; nothing stays in ``staging``."""

    def inner_progress(f: float) -> None:
        if progress is not None:
            progress(f * (1 - SEAL_SHARE))

    stage = Path(tempfile.mkdtemp(prefix="export-", dir=staging))
    try:
        inner = run_export(
            clips,
            job,
            _Staging(stage, reserve=0, outer=dest),
            key,
            audit_head=audit_head,
            progress=inner_progress,
            clock=clock,
        )
        size = sum(os.lstat(inner.path / f).st_size for f in inner.files)
        dest.check_before_write(size + size // 50 + 1024 * 1024)
        name = package_name(dest.path, inner.path.name)
        sealed = _write_sealed(inner, name, job, dest, seal)
        if progress is not None:
            progress(1.0)
        return sealed
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_sealed(
    inner: ExportPackage, name: str, job: ExportJob, dest: Destination, seal: Seal
) -> ExportPackage:
    pdir = open_package_dir(dest, name, job.group)
    tmp = pdir.path
    archive = inner.path.name + seal.suffix
    try:
        fd = os.open(
            archive,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pdir.fd,
        )
        with os.fdopen(fd, "w+b") as out:
            if seal.mode == "passphrase":
                assert seal.passphrase is not None
                _write_7z(out, inner.path, seal.passphrase)
            else:
                assert seal.cert is not None
                _write_cms(out, inner.path, seal.cert, float(job.timeout))
        pdir.settle(archive)
        digest, size = pdir.sha256(archive)
        if seal.mode == "passphrase":
            assert seal.passphrase is not None
            _test_7z(pdir, archive, seal.passphrase, inner)
        info: dict[str, Any] = {
            "mode": seal.mode,
            "file": archive,
            "sha256": digest,
            "size": size,
            "package": inner.path.name,
        }
        if seal.cert is not None:
            info["recipient"] = {"unit": seal.unit, **seal.cert.json()}
        readme = open_me_text(info).encode()
        pdir.create(README, readme)
        pdir.settle(README)
        pdir.sync()
        if pdir.sha256(README)[0] != _sha256(readme):
            raise RuntimeFailure(
                f"read-back of {README} on {dest.path} does not match what was written: the "
                "medium is unreliable, use another"
            )
        pdir.seal({archive, README})
        commit_check = getattr(dest, "before_commit", None)
        if commit_check is not None:
            commit_check(pdir.path)
        pdir.commit(name)
        files = tuple(sorted(os.listdir(pdir.fd)))
    except BaseException as error:
        better = undo_package(pdir, dest, tmp, error, "the sealed package")
        if better is error:
            raise
        raise better from error
    finally:
        pdir.close()
    return replace(
        inner,
        path=(dest.path / name).resolve(),
        files=files,
        sha256s={archive: digest, README: _sha256(readme)},
        sealed=info,
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _write_7z(out: Any, package: Path, passphrase: str) -> None:
    import py7zr

    filters = [{"id": py7zr.FILTER_COPY}, {"id": py7zr.FILTER_CRYPTO_AES256_SHA256}]
    with py7zr.SevenZipFile(
        out, "w", password=passphrase, header_encryption=True, filters=filters
    ) as z:
        z.writeall(package, package.name)


def _test_7z(pdir: PackageDir, archive: str, passphrase: str, inner: ExportPackage) -> None:
    """Read the archive back from the destination and decrypt it: every file's CRC must match,
    and it must hold exactly the package's files."""
    import py7zr

    fd = pdir.open(archive)
    try:
        with os.fdopen(fd, "rb") as f, py7zr.SevenZipFile(f, "r", password=passphrase) as z:
            names = {n for n in z.getnames() if n != inner.path.name}
            bad = z.testzip()
    except Exception as e:  # py7zr raises its own and lzma/crypto errors on a damaged archive
        raise RuntimeFailure(
            f"read-back of {archive} failed ({type(e).__name__}: {e}): the medium is unreliable, "
            "use another"
        ) from None
    want = {f"{inner.path.name}/{f}" for f in inner.files}
    if bad is not None or names != want:
        raise RuntimeFailure(
            f"read-back of {archive} does not hold the package it was made from "
            f"({'file ' + bad + ' damaged' if bad else 'other files'}): the medium is unreliable, "
            "use another"
        )


def _tar_entry(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def _write_cms(out: Any, package: Path, cert: RecipientCert, timeout: float) -> None:
    """tar of the package -> ``openssl cms -encrypt`` (streamed) -> ``out``."""
    with tempfile.TemporaryDirectory(prefix="nvrg-cms-") as work:
        # the certificate as it was checked, not whatever the configured path holds by now
        pem = Path(work) / "recipient.pem"
        pem.write_bytes(cert.pem)
        argv = [OPENSSL, "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER"]
        argv += ["-stream", "-recip", str(pem)]
        if cert.key.startswith("RSA"):
            argv += ["-keyopt", "rsa_padding_mode:oaep"]
        errf = Path(work) / "stderr.txt"
        with open(errf, "wb") as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err)
            except OSError as e:
                raise RuntimeFailure(f"cannot run {OPENSSL}: {e.strerror}") from None
            broken = False
            try:
                assert proc.stdin is not None
                try:
                    with tarfile.open(
                        fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT
                    ) as tar:
                        tar.add(package, arcname=package.name, filter=_tar_entry)
                    proc.stdin.close()
                except BrokenPipeError:
                    broken = True  # openssl ended early: its exit code and message say why
                rc = proc.wait(timeout=timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if rc != 0 or broken:
            why = errf.read_bytes().decode(errors="replace").strip().splitlines()
            raise RuntimeFailure(
                f"openssl cms could not encrypt the package (exit {rc}: "
                f"{why[0] if why else 'no message'}); nothing was exported"
            )
    out.flush()
    os.fsync(out.fileno())


def open_me_text(info: dict[str, Any]) -> str:
    """README.txt next to the sealed file: what it is and how to open it (no secret in it)."""
    f, inner = info["file"], info["package"]
    lines = [
        "nvr-guard protected export / 受保护的导出包",
        "",
        f"Sealed file 加密文件: {f}",
        f"SHA-256: {info['sha256']}",
        f"Size 大小: {info['size']} bytes",
        "",
        "Compare the SHA-256 above with the one on the paper record (export form) before you",
        "open it: `sha256sum "
        + f
        + "` (Linux) or `certutil -hashfile "
        + f
        + " SHA256` (Windows).",
        "请先核对上面的 SHA-256 与纸质审批表上的是否一致。",
        "",
    ]
    if info["mode"] == "passphrase":
        lines += [
            "Encrypted with AES-256 (7z). The passphrase was handed over separately (slip) —",
            "it is not on this medium and the recorder did not keep it.",
            "口令另行交付（口令单），不在本介质上，录像机也未保存。",
            "",
            "Windows: open it with 7-Zip (7-zip.org), enter the passphrase, extract.",
            f"Linux:   7z x {f}    (asks for the passphrase)",
        ]
    else:
        r = info.get("recipient") or {}
        lines += [
            f"Encrypted (CMS, AES-256) to the certificate of {r.get('unit', '')}:",
            f"  {r.get('subject', '')}",
            f"  SHA-256 fingerprint {r.get('fingerprint', '')}",
            "Only the holder of that certificate's private key can open it.",
            "只有该证书私钥的持有者才能打开。",
            "",
            f"openssl cms -decrypt -binary -inform DER -in {f} -inkey unit-key.pem \\",
            f"    -recip unit-cert.pem -out {inner}.tar",
            f"tar xf {inner}.tar",
        ]
    lines += [
        "",
        f"Then check the package {inner}/ with `nvr-guard verify {inner} --fingerprint <the",
        "fingerprint on the paper record>` or the steps in its VERIFY.txt.",
        "",
    ]
    return "\n".join(lines)
