"""Export engine: approved request's segments -> watermarked ffmpeg clip(s) -> signed package.

Free of catalog and CLI concerns: the caller (the daemon's export command) collects segments,
checks the request is approved and valid, picks the destination and records the audit entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nvr_guard.export.ffmpeg import Cancelled
from nvr_guard.export.fonts import resolve_font
from nvr_guard.export.form import approval_record_html, verify_text
from nvr_guard.export.keys import fingerprint, load_or_create_key, public_pem
from nvr_guard.export.package import (
    Destination,
    DirectoryDestination,
    ExportJob,
    ExportPackage,
    SourceSegment,
    manifest_bytes,
    run_export,
)
from nvr_guard.export.verify import Problem, VerifyResult, verify_package


def export_package(
    clips: Sequence[tuple[str, Sequence[SourceSegment]]],
    job: ExportJob,
    dest: Destination,
    key: Ed25519PrivateKey,
    *,
    audit_head: tuple[int, str],
    progress: Callable[[float], None] | None = None,
    seal: Any = None,
    staging: Path | None = None,
) -> ExportPackage:
    """The package of an export: plain (``run_export``), or sealed for its recipient when
    ``seal`` (``protect.Seal``) is given (``protect.run_sealed_export``, staging in
    ``staging``)."""
    if seal is None:
        return run_export(clips, job, dest, key, audit_head=audit_head, progress=progress)
    from nvr_guard.export.protect import run_sealed_export

    if staging is None:
        raise ValueError("a sealed export needs its staging directory")
    return run_sealed_export(
        clips, job, dest, key, seal=seal, staging=staging, audit_head=audit_head, progress=progress
    )


__all__ = [
    "Cancelled",
    "Destination",
    "DirectoryDestination",
    "ExportJob",
    "ExportPackage",
    "Problem",
    "SourceSegment",
    "VerifyResult",
    "approval_record_html",
    "export_package",
    "fingerprint",
    "load_or_create_key",
    "manifest_bytes",
    "public_pem",
    "resolve_font",
    "run_export",
    "verify_package",
    "verify_text",
]
