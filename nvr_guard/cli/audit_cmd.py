"""`nvr-guard audit show|verify|reanchor`: the tamper-evident audit log."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from nvr_guard.cli.base import Ctx, Group, caller, daemon_call, err, out, pass_ctx, table, who_reads
from nvr_guard.errors import DaemonUnavailable, InvalidInput, VerifyFailed


@click.group(cls=Group)
def audit() -> None:
    """Show and verify the tamper-evident audit log."""


def _audit_log(c: Ctx, *, write: bool = False) -> Any:
    from nvr_guard.store.audit import AuditLog
    from nvr_guard.store.catalog import Catalog

    db = Path(c.config.state_dir) / "catalog.db"
    if not db.exists():
        raise InvalidInput(f"no state in {c.config.state_dir}: the daemon has not run yet")
    # read-only unless writing (reanchor): a check must not repair what it is checking (opening
    # the catalog for writing re-creates dropped audit triggers, themselves tamper evidence)
    return AuditLog(Catalog(db, read_only=not write).conn, head_path=db.parent / "audit.head")


def _audit_read(c: Ctx, cmd: str, args: dict[str, Any]) -> Any:
    """Ask the daemon (it checks the caller's role: auditor, security_lead, admin). Without a
    daemon — nobody holds the state lock — only root reads the database itself, through the
    command's own handler given only the log (read-only)."""
    try:
        return daemon_call(c, cmd, args, timeout=600)
    except DaemonUnavailable as e:
        state = Path(c.config.state_dir)
        db = state / "catalog.db"
        if os.getuid() != 0:
            try:
                owner = who_reads(os.stat(state), 1)
            except OSError:
                owner = "root"
            raise DaemonUnavailable(
                f"{e}; without the daemon only root reads the audit log in {db} (readable by "
                f"{owner})"
            ) from None
        from nvr_guard.engine import StateLock

        if not db.exists():
            raise InvalidInput(f"no state in {state}: the daemon has not run yet") from None
        lock = StateLock(state)
        try:
            if not lock.try_shared():
                raise DaemonUnavailable(
                    f"{e}; a daemon ({lock.holder()}) holds {state}, so the log was not read "
                    "locally: try again, or check `systemctl status nvr-guard`"
                ) from None
            from nvr_guard.daemon.commands import Context, dispatch

            return dispatch(Context.of_audit_log(_audit_log(c), c.config), caller(), cmd, args)
        finally:
            lock.close()


@audit.command("show")
@click.option(
    "--since", help="ISO 8601 (no offset = site-local), a duration ago (1h), today, yesterday"
)
@click.option("--request", "request_id", type=int, help="only entries about this request")
@click.option("--actor", help="only entries by this person (or web-login, nvr-guard)")
@click.option("--action", help="only this action; 'request.' for the whole family")
@click.option("--limit", type=click.IntRange(1, 1_000_000), help="only the newest N of those")
@pass_ctx
def audit_show(
    c: Ctx,
    since: str | None,
    request_id: int | None,
    actor: str | None,
    action: str | None,
    limit: int | None,
) -> None:
    """Audit entries, oldest first (auditor, security_lead, admin)."""
    args: dict[str, Any] = {"since": since, "request": request_id}
    args.update({k: v for k, v in (("actor", actor), ("action", action), ("limit", limit)) if v})
    res = _audit_read(c, "audit.show", args)
    rows = res["entries"]
    malformed = [r["seq"] for r in rows if r.get("malformed")]

    def human() -> None:
        t = table("audit", ["seq", "time", "actor", "action", "object", "details"])
        for r in rows:
            flag = f" [MALFORMED: {', '.join(r['malformed'])}]" if r.get("malformed") else ""
            t.add_row(
                str(r["seq"]) + flag,
                str(r["time"]),
                str(r["actor"]),
                str(r["action"]),
                str(r["object"]),
                json.dumps(r["details"], ensure_ascii=False, default=repr)[:200],
            )
        out.print(t)
        if malformed:
            err.print(
                f"audit log TAMPERED WITH: entries {', '.join(map(str, malformed))} hold values "
                "nvr-guard never writes (shown flagged, as they are); run `nvr-guard audit verify`",
                markup=False,
            )

    c.emit({"entries": rows}, human)
    if malformed:
        sys.exit(VerifyFailed.exit_code)


@audit.command("verify")
@pass_ctx
def audit_verify(c: Ctx) -> None:
    """Check the hash chain and its head file (exit 4 on an edited, deleted or reordered entry,
    a truncated log, or a head file that is missing or does not match). Auditor, security_lead,
    admin."""
    data = _audit_read(c, "audit.verify", {})
    head = data["head"]
    triggers = list(data.get("missing_triggers") or [])

    def human() -> None:
        chain_ok = data["first_bad"] is None and data["problem"] is None
        if chain_ok:
            out.print(
                f"audit chain intact: {data['entries']} entries, head {head['seq']} "
                f"{head['hash'][:16]}",
                markup=False,
            )
            if triggers:
                err.print(
                    "audit log TAMPERED WITH: append-only triggers dropped "
                    f"({', '.join(triggers)})",
                    markup=False,
                )
        else:
            err.print(
                f"audit chain BROKEN at entry {data['first_bad']}: {data['problem']}",
                markup=False,
            )
            if data.get("anchor_problem") is not None:
                err.print(
                    "after investigating, an admin re-anchors the head file deliberately: "
                    f"nvr-guard audit reanchor --accept-head {head['seq']} --reason '...'",
                    markup=False,
                )
        for w in data["warnings"]:
            err.print(f"warning: {w}", markup=False)
        for r in data["reanchored"]:
            out.print(
                f"note: re-anchored at entry {r['seq']} by {r['actor']}: {r['reason']}",
                markup=False,
            )

    c.emit(data, human)
    if not data["ok"]:
        sys.exit(VerifyFailed.exit_code)


@audit.command("reanchor")
@click.option(
    "--accept-head",
    "accept",
    type=int,
    required=True,
    help="the log's present head entry, as `audit verify` shows it",
)
@click.option("--reason", required=True, help="what was investigated and found")
@pass_ctx
def audit_reanchor(c: Ctx, accept: int, reason: str) -> None:
    """Admin, after an investigated incident: anchor the head file at the log's present head.

    Appends an audit.reanchor entry with the old head file, the accepted head and the reason;
    the daemon accepts appends again at once. Needs write access to the state directory.
    """
    entry = _audit_log(c, write=True).reanchor(caller().user, reason, accept)
    c.emit(
        {"seq": entry.seq, "hash": entry.hash, "details": entry.details},
        lambda: out.print(
            f"audit log re-anchored at entry {entry.seq} (accepted head {accept}); "
            "the incident is recorded in that entry",
            markup=False,
        ),
    )
