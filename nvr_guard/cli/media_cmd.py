"""`nvr-guard media ...`: USB media, enrolment and ClamAV scans (the gate in front of every
export)."""

from __future__ import annotations

import sys

import click

from nvr_guard.cli.base import (
    Ctx,
    Group,
    act,
    daemon_call,
    err,
    out,
    pass_ctx,
    table,
    with_progress,
)


@click.group(cls=Group)
def media() -> None:
    """USB media: detection, enrolment, ClamAV scans (the gate in front of every export)."""


@media.command("list")
@pass_ctx
def media_list(c: Ctx) -> None:
    """Attached removable media and export target directories, with enrolment and last scan."""
    res = act(c, "media.list", {}, fresh=False)

    def human() -> None:
        t = table(
            "media",
            [
                "id",
                "device",
                "vendor / model",
                "serial",
                "size",
                "fs",
                "mounted",
                "enrolled",
                "last scan",
            ],
        )
        from nvr_guard.text import human_bytes

        for m in res["media"]:
            scan = m.get("last_scan")
            last = f"{scan['result']} {scan.get('finished_iso') or ''}" if scan else "never"
            enr = m.get("enrolled")
            t.add_row(
                m["id"],
                m.get("device") or "-",
                " ".join(x for x in (m.get("vendor"), m.get("model")) if x) or "-",
                m.get("serial") or "-",
                human_bytes(m["size"]) if m.get("size") else "-",
                m.get("fs_type") or "-",
                (m.get("mountpoint") or "-") + (" (ro)" if m.get("readonly") else ""),
                enr["label"] if enr else "no",
                last,
            )
        out.print(t)

    c.emit(res, human)


@media.command("enroll")
@click.argument("medium")
@click.option("--label", required=True, help="a name people recognise, e.g. 'evidence stick 3'")
@pass_ctx
def media_enroll(c: Ctx, medium: str, label: str) -> None:
    """Admin: allow exports onto this medium (binds its serial and filesystem UUID)."""
    res = daemon_call(c, "media.enroll", {"media": medium, "label": label})
    c.emit(res, lambda: out.print(f"medium {res['id']} enrolled as {res['label']!r}", markup=False))


@media.command("remove")
@click.argument("medium")
@click.option("--reason", required=True)
@pass_ctx
def media_remove(c: Ctx, medium: str, reason: str) -> None:
    """Admin: withdraw a medium's enrolment."""
    res = daemon_call(c, "media.remove", {"media": medium, "reason": reason})
    c.emit(res, lambda: out.print(f"medium {medium} removed from the enrolled media", markup=False))


@media.command("scan")
@click.argument("medium")
@pass_ctx
def media_scan(c: Ctx, medium: str) -> None:
    """Scan a medium (or an export.targets directory) with ClamAV; exit 3 when not clean."""

    def poll() -> float | None:
        p = daemon_call(c, "media.scan_progress", {"media": medium}, timeout=5).get("progress")
        return p[0] / p[1] if p and p[1] else None

    res = with_progress(
        c,
        lambda: daemon_call(c, "media.scan", {"media": medium}, timeout=4 * 3600),
        poll,
        f"scanning {medium}",
    )

    def human() -> None:
        out.print(
            f"{res['target']}: {res['result'].upper()} — {res['files']} files, "
            f"{res['bytes']} bytes, {res['engine']} {res['engine_version']}, "
            f"signatures {res.get('signature_version') or '?'}",
            markup=False,
        )
        for i in res.get("infected", []):
            err.print(f"infected: {i['path']}: {i['signature']}", markup=False)
        for e in res.get("errors", []):
            err.print(f"not scanned: {e}", markup=False)

    c.emit(res, human)
    if res["result"] != "clean":
        if not c.as_json:
            err.print(
                f"nvr-guard: {res['target']} is not clean: nothing will be written to it",
                markup=False,
            )
        sys.exit(3)


@media.command("wipe")
@click.argument("medium")
@click.option("--confirm", required=True, help="the medium's id again, to confirm")
@pass_ctx
def media_wipe(c: Ctx, medium: str, confirm: str) -> None:
    """Admin, with media.prepare: wipe — format an unmounted medium instead of scanning it."""
    res = daemon_call(c, "media.wipe", {"media": medium, "confirm": confirm}, timeout=900)
    c.emit(
        res,
        lambda: out.print(
            f"{res['device']} formatted ({res['tool']}); {res['note']}", markup=False
        ),
    )
