"""The host's export-signing key (Ed25519): created once, kept 0600 in the state directory.

The fingerprint is ``SHA256:`` + unpadded base64 of the SHA-256 of the public key's DER
(SubjectPublicKeyInfo) — the same bytes ``openssl pkey -pubin -outform DER`` prints, so an auditor
can recompute it with plain tools (VERIFY.txt shows how) and compare it with the audit log.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nvr_guard.errors import InvalidInput, RuntimeFailure

KEY_FILE = "export-key.pem"  # the config's default (Config.signing_key_path)


def fingerprint(public: Ed25519PublicKey) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def parse_fingerprint(text: str) -> str:
    """A fingerprint as typed from paper: surrounding blanks and base64 padding are forgiven,
    anything else that is not ``SHA256:`` + 43 base64 characters is refused (InvalidInput)."""
    fp = "".join(text.split()).rstrip("=")
    if not _FINGERPRINT.fullmatch(fp):
        raise InvalidInput(
            f"--fingerprint {text!r} is not a key fingerprint: expected SHA256: followed by "
            "43 base64 characters, as printed by `nvr-guard key show` and on the approval record"
        )
    return fp


def key_file_fingerprint(path: Path) -> str:
    """Fingerprint of the Ed25519 key in a PEM file (public key, or a private key's public half).

    Creates nothing: for ``verify --key`` and ``key show``, which must never make a new key.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read key file {path}: {e.strerror}") from None
    public: object
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            public = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise InvalidInput(f"{path} is not a PEM key (public or unencrypted private)") from None
    if not isinstance(public, Ed25519PublicKey):
        raise InvalidInput(f"{path} is not an Ed25519 key; export packages are signed with Ed25519")
    return fingerprint(public)


def key_location_problem(path: Path | str, trusted: Collection[int]) -> str | None:
    """Why someone other than ``trusted`` uids (root and the daemon user) could replace the key
    at ``path``, or None. Checked at ``config check`` and again at every load of the key.

    - a symbolic link on the way (the key's directories as configured) must be owned by a
      trusted user: a link cannot be re-pointed, but in a sticky directory its owner may
      remove and remake it;
    - then the path is resolved (realpath) and every directory of the resolved path, up to
      ``/``, must be owned by a trusted user and not writable by group or others — except a
      sticky directory (``/tmp``) above the key's own directory, where nobody else can rename
      our entry. The key's own directory is never allowed to be shared, sticky or not.
    Returns a phrase that completes "export signing key ...".
    """
    p = os.path.abspath(os.fspath(path))
    # links among the configured directories (the file itself is checked on open: O_NOFOLLOW)
    parts = p.split("/")[1:-1]
    cur = "/"
    for part in parts:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            break
        except OSError as e:
            return f"directory {cur} cannot be inspected ({e.strerror})"
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in trusted:
            return (
                f"path goes through the symbolic link {cur}, owned by uid {st.st_uid}: its "
                "owner could point it at another key; name the real directory"
            )
    real = os.path.realpath(p)
    own = os.path.dirname(real)
    d = own
    while True:
        try:
            dst = os.stat(d)
        except FileNotFoundError:
            d2 = os.path.dirname(d)
            if d2 == d:
                return None
            d = d2
            continue
        except OSError as e:
            return f"directory {d} cannot be inspected ({e.strerror})"
        others_write = dst.st_mode & 0o022 and not (d != own and dst.st_mode & stat.S_ISVTX)
        if dst.st_uid not in trusted:
            return (
                f"directory {d}{' (the real path of ' + p + ')' if real != p else ''} is owned "
                f"by uid {dst.st_uid}: someone other than root or the daemon user could replace "
                "the key; keep it in a directory only they can write"
            )
        if others_write:
            return (
                f"directory {d}{' (the real path of ' + p + ')' if real != p else ''} is "
                f"writable by group or others (mode {stat.S_IMODE(dst.st_mode):04o}): someone "
                "other than root or the daemon user could replace the key; keep it in a "
                "directory only they can write"
            )
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_or_create_key(
    state_dir: Path, key_path: Path | None = None
) -> tuple[Ed25519PrivateKey, str]:
    """The signing key and its fingerprint; generated on first call.

    Created with O_EXCL and mode 0600 from the start (never chmod'ed afterwards, so there is no
    moment in which another user could open it). An existing key that is readable by group or
    others is refused rather than used: a leaked signing key makes every package forgeable.
    """
    path = key_path or state_dir / KEY_FILE
    try:
        # never through a link at the file itself; the opened file is what is checked and read
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    except OSError as e:
        raise RuntimeFailure(f"export signing key {path} cannot be opened: {e.strerror}") from None
    if fd < 0:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            # a crash between create and rename last time: the half-written file is worthless
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        # link (not rename) so two daemons starting at once cannot overwrite each other's key
        try:
            os.link(tmp, path)
        except FileExistsError:
            tmp.unlink()
            return load_or_create_key(state_dir, key_path)
        tmp.unlink()
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return key, fingerprint(key.public_key())
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeFailure(f"export signing key {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise RuntimeFailure(
                f"export signing key {path} is owned by uid {st.st_uid}, not by this daemon's "
                f"user (uid {os.geteuid()}) or root: someone else could have put it there"
            )
        mode = st.st_mode & 0o777
        if mode & 0o077:
            raise RuntimeFailure(
                f"export signing key {path} has mode {mode:04o}; it must be 0600 "
                f"(chmod 600 {path}), or every package it signed could be forged"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError as e:
        raise RuntimeFailure(f"export signing key {path} is unreadable: {e}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise RuntimeFailure(f"export signing key {path} is not an Ed25519 key")
    return loaded, fingerprint(loaded.public_key())


# ---- recipients' certificates (protected exports) -----------------------------------------------
@dataclass(frozen=True)
class RecipientCert:
    """A recipient unit's X.509 certificate, as ``export.recipients`` names it."""

    path: str
    pem: bytes
    fingerprint: str  # as `openssl x509 -noout -fingerprint -sha256` prints it
    subject: str
    not_before: float
    not_after: float
    key: str  # "RSA 3072", "EC secp384r1"
    usable: str | None  # why its key cannot receive an encrypted package, else None

    def problem(self, now: float) -> str | None:
        """Why a package may not be encrypted to it at ``now``, else None."""
        if self.usable is not None:
            return self.usable
        if now < self.not_before:
            return f"certificate {self.path} is not valid before {_utc(self.not_before)}"
        if now > self.not_after:
            return f"certificate {self.path} expired on {_utc(self.not_after)}"
        return None

    def json(self) -> dict[str, Any]:
        """What the audit log and the record say of it."""
        return {
            "certificate": self.path,
            "fingerprint": self.fingerprint,
            "subject": self.subject,
            "not_before": _utc(self.not_before),
            "not_after": _utc(self.not_after),
            "key": self.key,
        }


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def load_recipient_cert(path: Path | str) -> RecipientCert:
    """Read a recipient's certificate (PEM); InvalidInput when it is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read certificate {path}: {e.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise InvalidInput(f"{path} is not a PEM X.509 certificate") from None
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    fp = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    pub = cert.public_key()
    usable: str | None = None
    if cert.public_key_algorithm_oid == x509.oid.PublicKeyAlgorithmOID.RSASSA_PSS:
        key, need = "RSA-PSS", ""
        usable = (
            f"certificate {path}: its key is an RSA-PSS (signing-only) key, which cannot receive "
            "CMS-encrypted data; the unit needs a plain RSA (rsaEncryption) or EC certificate"
        )
    elif isinstance(pub, rsa.RSAPublicKey):
        key, need = f"RSA {pub.key_size}", "key_encipherment"
        if pub.key_size < 2048:
            usable = (
                f"certificate {path}: an RSA key of {pub.key_size} bits is too weak (2048 at least)"
            )
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        key, need = f"EC {pub.curve.name}", "key_agreement"
    else:
        key, need = type(pub).__name__, ""
        usable = (
            f"certificate {path}: its key ({key}) cannot receive CMS-encrypted data; "
            "the unit needs an RSA or EC certificate"
        )
    if usable is None:
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        if ku is not None and not getattr(ku, need):
            usable = f"certificate {path}: its key usage does not allow encryption ({need} not set)"
    return RecipientCert(
        path=str(path),
        pem=pem,
        fingerprint=fp,
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        key=key,
        usable=usable,
    )
