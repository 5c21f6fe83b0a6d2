"""The rules a request is decided by, as stored with it and shown in its record.

Once a request is decided it is judged by the rules in force then, not by a later reload; the
request bookkeeping and the export both write this record, so it lives apart from either.
"""

from __future__ import annotations

from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

from nvr_guard.text import Duration
from nvr_guard.times import iso
from nvr_guard.workflow import access


def rules_record(
    rules: access.AccessRules, r: access.Request, now: float, digest: str
) -> dict[str, Any]:
    """The rules ``r`` is decided by, as stored with it and shown in its record: enough to judge
    it again exactly as then, and to read what applied."""
    h0, h1 = rules.hours
    return {
        "decided": iso(now, rules.tz),
        "config_digest": digest,
        "steps": list(rules.steps),
        "decide_within": rules.decide_within,
        "holidays": sorted(d.isoformat() for d in rules.holidays),
        "workdays": sorted(d.isoformat() for d in rules.workdays),
        "valid_for": str(rules.valid_for),
        "hours": f"{h0 // 60:02d}:{h0 % 60:02d}-{h1 // 60:02d}:{h1 % 60:02d}",
        "timezone": str(rules.tz),
        "after_hours_role": rules.duty_role,
        "after_hours_valid": rules.after_hours_valid,
        "native_role": rules.native_role,
        "emergency_roles": sorted(rules.emergency_roles),
        "backfill_within": rules.backfill_within,
        "max_range": rules.max_range,
        "technician_role": rules.technician_role,
        "requester_roles": sorted(rules.requester_roles),
        "approver_may_export": rules.approver_may_export,
        "camera_levels": {c: access.camera_level(c, rules) for c in r.cameras},
    }


def rules_from_record(d: dict[str, Any]) -> access.AccessRules:
    """The rules a request was decided by, read back from its record."""

    def minutes(hhmm: str) -> int:
        h, m = hhmm.split(":")
        return int(h) * 60 + int(m)

    a, b = d["hours"].split("-")
    return access.AccessRules(
        steps=tuple(d["steps"]),
        decide_within=int(d["decide_within"]),
        holidays=frozenset(date.fromisoformat(x) for x in d["holidays"]),
        workdays=frozenset(date.fromisoformat(x) for x in d["workdays"]),
        valid_for=Duration.parse(d["valid_for"]),
        hours=(minutes(a), minutes(b)),
        tz=ZoneInfo(d["timezone"]),
        duty_role=d["after_hours_role"],
        after_hours_valid=float(d["after_hours_valid"]),
        native_role=d["native_role"],
        emergency_roles=frozenset(d["emergency_roles"]),
        backfill_within=float(d["backfill_within"]),
        max_range=float(d["max_range"]),
        technician_role=d["technician_role"],
        requester_roles=frozenset(d["requester_roles"]),
        approver_may_export=bool(d["approver_may_export"]),
        camera_levels=dict(d["camera_levels"]),
    )
