"""Export engine: approved request's segments -> watermarked ffmpeg clip(s) -> signed package.

Free of catalog and CLI concerns: the caller (the daemon's export command) collects segments,
checks the request is approved and valid, picks the destination and records the audit entries.
"""

from __future__ import annotations

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
    "fingerprint",
    "load_or_create_key",
    "manifest_bytes",
    "public_pem",
    "resolve_font",
    "run_export",
    "verify_package",
    "verify_text",
]
