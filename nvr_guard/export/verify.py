"""Offline check of an export package: signature, signer key, every file's hash, no extra files.

It never raises: a package handed in by a court or a recipient may be damaged in any way, and the
answer must be a list of what is wrong, each in words an auditor can act on.

What a package can prove about itself is limited: whoever carries it can replace the clip, edit the
manifest, sign it with a key of their own and put that key in ``signer.pub``; the result is
consistent in itself. Only the recorder's key fingerprint, obtained by a channel the courier does
not control (the signed and stamped paper approval record, the hand-over slip, ``nvr-guard key
show`` on the recorder), tells such a forgery apart. So the result says separately whether the
package is self-consistent (``ok``) and whether the signer was confirmed against such a pin
(``signer_confirmed``).

The package directory is read through one directory descriptor, every file opened with
``O_NOFOLLOW | O_NONBLOCK`` and checked to be a regular file before a byte is read: a symlink
could make the check hash a file outside the package, and a FIFO would block the reader forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from nvr_guard.export.keys import fingerprint

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SIGNER = "signer.pub"
CLIP_SUFFIXES = (".mp4", ".mkv")
# the small files are read whole; a manifest of a few clips is a few hundred KiB at most
_SMALL_LIMIT = 64 * 1024 * 1024

_TYPE_NAMES = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class Problem:
    kind: str  # clip-changed, file-changed, manifest-changed, key-mismatch, missing-file,
    #            extra-file, unreadable, not-regular, name-mismatch
    message: str


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    problems: tuple[Problem, ...]
    manifest: dict[str, Any] | None = None
    fingerprint: str | None = None  # of signer.pub as found
    checked: tuple[str, ...] = field(default_factory=tuple)  # files whose hash matched
    pinned: str | None = None  # the fingerprint the caller pinned, if any
    signature_valid: bool = False  # manifest.sig verifies over manifest.json with signer.pub

    @property
    def ok(self) -> bool:
        """The package is self-consistent: nothing changed since whoever signed it signed it."""
        return not self.problems

    @property
    def signer_confirmed(self) -> bool:
        """The signer is the pinned key: only then is the package known to be the recorder's."""
        return (
            self.ok
            and self.signature_valid
            and self.pinned is not None
            and self.fingerprint == self.pinned
        )

    def messages(self) -> list[str]:
        return [p.message for p in self.problems]


def _type_name(mode: int) -> str | None:
    """None for a regular file, else what the entry is, in words."""
    if stat.S_ISREG(mode):
        return None
    for test, name in _TYPE_NAMES:
        if test(mode):
            return name
    return "not a regular file"


class _Reader:
    """Reads files of one package directory through its descriptor, never following links."""

    def __init__(self, dfd: int, problems: list[Problem]) -> None:
        self.dfd = dfd
        self.problems = problems
        self.refused: set[str] = set()  # names already reported as not regular

    def _open(self, name: str) -> int | None:
        if name in self.refused:
            return None
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self.dfd,
            )
        except FileNotFoundError:
            self.problems.append(Problem("missing-file", f"missing file: {name}"))
            return None
        except OSError as e:
            # ELOOP: the name is a symbolic link (O_NOFOLLOW)
            try:
                mode = os.stat(name, dir_fd=self.dfd, follow_symlinks=False).st_mode
            except OSError:
                mode = 0
            what = _type_name(mode) if mode else None
            if what is not None:
                self._not_regular(name, what)
            else:
                self.problems.append(Problem("unreadable", f"cannot read {name}: {e.strerror}"))
            return None
        try:
            what = _type_name(os.fstat(fd).st_mode)
        except OSError as e:
            os.close(fd)
            self.problems.append(Problem("unreadable", f"cannot read {name}: {e.strerror}"))
            return None
        if what is not None:
            os.close(fd)
            self._not_regular(name, what)
            return None
        return fd

    def _not_regular(self, name: str, what: str) -> None:
        if name not in self.refused:
            self.refused.add(name)
            self.problems.append(
                Problem(
                    "not-regular",
                    f"not a regular file: {name} is {what}; a package holds only regular files",
                )
            )

    def read(self, name: str) -> bytes | None:
        fd = self._open(name)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            try:
                data = f.read(_SMALL_LIMIT + 1)
            except OSError as e:
                self.problems.append(Problem("unreadable", f"cannot read {name}: {e.strerror}"))
                return None
        if len(data) > _SMALL_LIMIT:
            self.problems.append(
                Problem("unreadable", f"cannot read {name}: larger than {_SMALL_LIMIT} bytes")
            )
            return None
        return data

    def sha256(self, name: str) -> str | None:
        fd = self._open(name)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            try:
                return hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                self.problems.append(Problem("unreadable", f"cannot read {name}: {e.strerror}"))
                return None


def _plain_name(name: object) -> bool:
    """A file name a package can hold: one path component, no NUL, encodable as a file name
    (a signed manifest is still input: a forger signs whatever they like)."""
    if not isinstance(name, str) or "/" in name or "\0" in name or name in ("", ".", ".."):
        return False
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


def verify_package(path: Path, expected_fingerprint: str | None = None) -> VerifyResult:
    """Check the package in ``path``.

    ``expected_fingerprint`` is the recorder's key fingerprint from outside the package (the paper
    record, ``nvr-guard key show``, the audit log). Without it the result can only say that the
    package is consistent in itself (``ok``); with it, a package re-signed wholesale with another
    key is a ``key-mismatch`` and ``signer_confirmed`` is true only for the recorder's own key.
    """
    problems: list[Problem] = []
    checked: list[str] = []
    path = Path(path)
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        why = "is not a directory" if not path.is_dir() else f"cannot be opened: {e.strerror}"
        return VerifyResult(
            path, (Problem("unreadable", f"{path} {why}"),), pinned=expected_fingerprint
        )
    try:
        return _verify(path, dfd, expected_fingerprint, problems, checked)
    finally:
        os.close(dfd)


def _verify(
    path: Path,
    dfd: int,
    expected_fingerprint: str | None,
    problems: list[Problem],
    checked: list[str],
) -> VerifyResult:
    reader = _Reader(dfd, problems)
    # the listing first: a symlink or FIFO among the files is refused before anything is opened
    try:
        present = sorted(os.listdir(dfd))
    except OSError as e:
        present = []
        problems.append(Problem("unreadable", f"cannot list {path}: {e.strerror}"))
    for name in present:
        try:
            mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
        except OSError:
            continue  # vanished meanwhile: reported as missing if the manifest lists it
        what = _type_name(mode)
        if what is not None:
            reader._not_regular(name, what)

    body, sig, pem = reader.read(MANIFEST), reader.read(SIGNATURE), reader.read(SIGNER)
    manifest: dict[str, Any] | None = None
    if body is not None:
        try:
            loaded = json.loads(body)
            manifest = loaded if isinstance(loaded, dict) else None
        except ValueError:
            manifest = None
        if manifest is None:
            problems.append(
                Problem("manifest-changed", "manifest changed: manifest.json is not valid JSON")
            )

    public: Ed25519PublicKey | None = None
    found_fp: str | None = None
    if pem is not None:
        try:
            key = serialization.load_pem_public_key(pem)
            if isinstance(key, Ed25519PublicKey):
                public = key
                found_fp = fingerprint(key)
            else:
                problems.append(Problem("key-mismatch", "key mismatch: signer.pub is not Ed25519"))
        except ValueError:
            problems.append(
                Problem("key-mismatch", "key mismatch: signer.pub is not a PEM public key")
            )

    claimed = None
    if manifest is not None:
        signer = manifest.get("signer")
        claimed = signer.get("fingerprint") if isinstance(signer, dict) else None
    if found_fp and claimed and found_fp != claimed:
        problems.append(
            Problem(
                "key-mismatch",
                f"key mismatch: signer.pub is {found_fp}, but the manifest names {claimed} "
                "— the public key was replaced",
            )
        )
    if found_fp and expected_fingerprint and found_fp != expected_fingerprint:
        problems.append(
            Problem(
                "key-mismatch",
                f"key mismatch: signed by {found_fp}, not by the recorder's key "
                f"{expected_fingerprint} (the pinned fingerprint) — this package was not "
                "signed by that recorder",
            )
        )

    signature_valid = False
    if public is not None and body is not None and sig is not None:
        try:
            public.verify(sig, body)
            signature_valid = True
        except InvalidSignature:
            if found_fp and claimed and found_fp != claimed:
                pass  # already reported as the key mismatch it is
            else:
                problems.append(
                    Problem(
                        "manifest-changed",
                        "manifest changed: manifest.sig does not match manifest.json "
                        "(the manifest or its signature was altered after signing)",
                    )
                )

    if manifest is not None:
        named = manifest.get("package")
        # abspath, not resolve: "." names the directory the user is in, a link is not followed
        here = Path(os.path.abspath(path)).name
        if not isinstance(named, str) or named != here:
            problems.append(
                Problem(
                    "name-mismatch",
                    f"name mismatch: the directory is {here!r}, the signed manifest names the "
                    f"package {named!r} — a package is checked under the name it was exported as",
                )
            )

    listed: dict[str, Any] = {}
    if manifest is not None and isinstance(manifest.get("files"), dict):
        listed = manifest["files"]
    elif manifest is not None:
        problems.append(Problem("manifest-changed", "manifest changed: no file list in it"))
    for name, meta in sorted(listed.items()):
        # a manifest edited to point outside the package must not make us read other files
        if not _plain_name(name):
            problems.append(
                Problem("manifest-changed", f"manifest changed: bad file name {name!r}")
            )
            continue
        want = meta.get("sha256") if isinstance(meta, dict) else None
        got = reader.sha256(name)
        if got is None:
            continue
        if got == want:
            checked.append(name)
        elif name.endswith(CLIP_SUFFIXES):
            problems.append(
                Problem(
                    "clip-changed",
                    f"clip changed: {name} has SHA-256 {got}, the manifest says {want}",
                )
            )
        else:
            problems.append(
                Problem(
                    "file-changed",
                    f"file changed: {name} has SHA-256 {got}, the manifest says {want}",
                )
            )
    known = set(listed) | {MANIFEST, SIGNATURE, SIGNER}
    for name in present:
        if name not in known and name not in reader.refused:
            problems.append(
                Problem("extra-file", f"extra file: {name} is not part of the signed package")
            )
    return VerifyResult(
        path,
        tuple(problems),
        manifest,
        found_fp,
        tuple(checked),
        pinned=expected_fingerprint,
        signature_valid=signature_valid,
    )
