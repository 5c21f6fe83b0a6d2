"""Offline check of an export package: signature, signer key, every file's hash, no extra files.

It never raises: a package handed in by a court or a recipient may be damaged in any way, and the
answer must be a list of what is wrong, each in words an auditor can act on.
"""

from __future__ import annotations

import hashlib
import json
import os
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


@dataclass(frozen=True)
class Problem:
    kind: str  # clip-changed, file-changed, manifest-changed, key-mismatch, missing-file,
    #            extra-file, unreadable
    message: str


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    problems: tuple[Problem, ...]
    manifest: dict[str, Any] | None = None
    fingerprint: str | None = None  # of signer.pub as found
    checked: tuple[str, ...] = field(default_factory=tuple)  # files whose hash matched

    @property
    def ok(self) -> bool:
        return not self.problems

    def messages(self) -> list[str]:
        return [p.message for p in self.problems]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_package(path: Path, expected_fingerprint: str | None = None) -> VerifyResult:
    """Check the package in ``path``.

    ``expected_fingerprint`` (from the audit log, when the caller has it) also catches a package
    re-signed wholesale with another key: signer.pub, manifest and signature replaced together
    are consistent with each other, and only an outside record of the real key tells them apart.
    """
    problems: list[Problem] = []
    checked: list[str] = []
    path = Path(path)
    if not path.is_dir():
        return VerifyResult(path, (Problem("unreadable", f"{path} is not a directory"),))

    def read(name: str) -> bytes | None:
        try:
            return (path / name).read_bytes()
        except FileNotFoundError:
            problems.append(Problem("missing-file", f"missing file: {name}"))
        except OSError as e:
            problems.append(Problem("unreadable", f"cannot read {name}: {e.strerror}"))
        return None

    body, sig, pem = read(MANIFEST), read(SIGNATURE), read(SIGNER)
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
                f"key mismatch: signed by {found_fp}, not by the host key "
                f"{expected_fingerprint} recorded in the audit log",
            )
        )

    if public is not None and body is not None and sig is not None:
        try:
            public.verify(sig, body)
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

    listed: dict[str, Any] = {}
    if manifest is not None and isinstance(manifest.get("files"), dict):
        listed = manifest["files"]
    elif manifest is not None:
        problems.append(Problem("manifest-changed", "manifest changed: no file list in it"))
    for name, meta in sorted(listed.items()):
        # a manifest edited to point outside the package must not make us read other files
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            problems.append(
                Problem("manifest-changed", f"manifest changed: bad file name {name!r}")
            )
            continue
        want = meta.get("sha256") if isinstance(meta, dict) else None
        try:
            got = _sha256(path / name)
        except FileNotFoundError:
            problems.append(Problem("missing-file", f"missing file: {name}"))
            continue
        except OSError as e:
            problems.append(Problem("unreadable", f"cannot read {name}: {e.strerror}"))
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
    try:
        present = sorted(os.listdir(path))
    except OSError as e:
        present = []
        problems.append(Problem("unreadable", f"cannot list {path}: {e.strerror}"))
    for name in present:
        if name not in known:
            problems.append(
                Problem("extra-file", f"extra file: {name} is not part of the signed package")
            )
    return VerifyResult(path, tuple(problems), manifest, found_fp, tuple(checked))
