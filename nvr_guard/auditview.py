"""The audit log as `audit show` and `audit verify` report it, for the daemon and the CLI alike.

Kept apart from the store (which writes and checks the chain) because this is presentation: an
entry someone edited by hand must still be shown as it is, with what is wrong with it named,
never crash the command that is meant to reveal the edit.
"""

from __future__ import annotations

from typing import Any

from nvr_guard.store.audit import AuditLog
from nvr_guard.times import iso

# Who reads the audit log (it names every request's reason and recipient contact): auditors check
# the record, security leads run the security side, admins run the host.
AUDIT_ROLES = frozenset({"auditor", "security_lead", "admin"})


def audit_row(e: Any, tz: Any, iso: Any) -> dict[str, Any]:
    """One entry for `audit show`, whatever a row edited by hand holds (text in the time, a
    number too large for a date, bytes for a name): shown as it is and listed in
    ``malformed``, never a crash."""
    bad: list[str] = []

    def text(field: str, v: Any) -> Any:
        if isinstance(v, str) or (v is None and field == "object"):
            return v
        bad.append(field)
        if isinstance(v, bytes):
            return "0x" + v.hex()
        return repr(v)

    when: Any
    try:
        if isinstance(e.time, bool) or not isinstance(e.time, int | float):
            raise TypeError
        when = iso(e.time, tz)
    except (TypeError, ValueError, OverflowError, OSError):
        bad.append("time")
        when = ("0x" + e.time.hex()) if isinstance(e.time, bytes) else repr(e.time)
    seq = e.seq
    if isinstance(seq, bool) or not isinstance(seq, int):
        bad.append("seq")
        seq = repr(seq)
    details = e.details
    if "_unparsable" in details or "_value" in details:
        bad.append("details")
        details = {k: (v if isinstance(v, str | int | float | list | dict) or v is None
                       else repr(v)) for k, v in details.items()}  # fmt: skip
    return {
        "seq": seq,
        "time": when,
        "actor": text("actor", e.actor),
        "action": text("action", e.action),
        "object": text("object", e.object),
        "details": details,
        "hash": text("hash", e.hash),
        "malformed": bad,
    }


def audit_show_json(
    log_: AuditLog,
    tz: Any,
    since: float | None,
    request: int | None,
    *,
    actor: str | None = None,
    action: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Entries, oldest first, from ``since``; only those about request ``request``, by
    ``actor``, of ``action`` (``x.`` a family) if given; the last ``limit`` of them if given."""
    entries = log_.entries(
        since=since,
        obj=None if request is None else f"request:{request}",
        actor=actor,
        action=action,
        newest=limit,
    )
    return {"entries": [audit_row(e, tz, iso) for e in entries]}


def audit_verify_json(log_: AuditLog) -> dict[str, Any]:
    """The chain checked against itself and its head file."""
    rep = log_.verify()
    triggers = list(rep.missing_triggers)
    return {
        "ok": rep.ok and not triggers,
        "missing_triggers": triggers,
        "entries": rep.count,
        "first_bad": rep.first_bad,
        "problem": rep.problem or None,
        "head": {"seq": rep.head[0], "hash": rep.head[1]},
        "warnings": list(rep.warnings),
        "reanchored": [
            {"seq": e.seq, "actor": e.actor, "reason": e.details.get("reason"), "time": e.time}
            for e in log_.entries(action="audit.reanchor")
        ],
        "anchor_problem": log_.anchor_problem(),
    }
