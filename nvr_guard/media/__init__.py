"""USB media and export targets: detection (``detect``), enrolment and scan records (``store``),
the ClamAV scan (``clamav``) and the gate that allows a write only onto freshly scanned, clean,
enrolled storage (``gate``)."""

from __future__ import annotations

from nvr_guard.media.detect import Medium, Partition, find_medium, list_media
from nvr_guard.media.gate import (
    Decision,
    MediaDestination,
    ScannedDirectory,
    ScanTarget,
    gate_decision,
    resolve_scan_target,
    scan_record,
)
from nvr_guard.store.media import Enrolment, MediaStore, ScanRecord

__all__ = [
    "Decision",
    "Enrolment",
    "MediaDestination",
    "MediaStore",
    "Medium",
    "Partition",
    "ScanRecord",
    "ScanTarget",
    "ScannedDirectory",
    "find_medium",
    "gate_decision",
    "list_media",
    "resolve_scan_target",
    "scan_record",
]
