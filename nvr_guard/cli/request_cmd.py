"""`nvr-guard request ...`: retrieval requests and their approvals."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

from nvr_guard.cli.base import Ctx, Group, act, daemon_call, out, pass_ctx, table
from nvr_guard.errors import InvalidInput


@click.group(cls=Group)
def request() -> None:
    """Retrieval requests (调取申请) and their approvals."""


def parse_recipient(text: str, person: str | None, contact: str | None) -> dict[str, str]:
    """``--recipient "UNIT; PERSON; CONTACT"`` (or ``unit=..; person=..; contact=..``).

    Positions are kept: an empty middle part leaves that field empty (and the request is then
    refused naming it) rather than shifting the next part into it; more than three parts are
    refused rather than dropped, so what is recorded is what was typed."""
    parts = [p.strip() for p in text.split(";")]
    if len(parts) == 1 and "," in text:
        parts = [p.strip() for p in text.split(",")]
    out = {"unit": "", "person": "", "contact": ""}
    named: set[str] = set()
    positional: list[str] = []
    for p in parts:
        key, sep, value = p.partition("=")
        if sep and key.strip() in out:
            out[key.strip()] = value.strip()
            named.add(key.strip())
        else:
            positional.append(p)
    while positional and not positional[-1]:
        positional.pop()  # a trailing separator
    # unnamed parts fill the fields not named, in order
    free = [k for k in ("unit", "person", "contact") if k not in named]
    if len(positional) > len(free):
        raise InvalidInput(
            f"--recipient has {len(positional) + len(named)} parts; write UNIT; PERSON; CONTACT "
            "(three parts), or unit=...; person=...; contact=... when a part holds a ';'"
        )
    for k, v in zip(free, positional, strict=False):
        out[k] = v
    if person:
        out["person"] = person
    if contact:
        out["contact"] = contact
    return out


def _format_text(fmt: str) -> str:
    if fmt == "view":
        return "view: viewing request (调阅), watched in the web console, never exported"
    return fmt


def print_request(r: dict[str, Any]) -> None:
    t = table(f"request {r['id']}: {r['state']}", ["field", "value"])
    rec = r["recipient"]
    for k, v in (
        ("requester", r["requester"]),
        ("site", r["site"]),
        ("cameras", ", ".join(r["cameras"])),
        ("range", f"{r['from']} .. {r['to']}"),
        ("reason", r["reason"]),
        ("legal basis", r["basis"]),
        ("recipient", f"{rec['unit']} / {rec['person']} / {rec['contact']}"),
        ("format", _format_text(r["format"]) + (" (emergency)" if r["emergency"] else "")),
        ("steps", ", ".join(r.get("steps", []))),
        ("still open", ", ".join(r.get("open_steps", [])) or "-"),
        ("decide by", r.get("decide_by") or "-"),
        ("valid until", r.get("valid_until") or "-"),
        ("encryption", _encrypt_text(r)),
        ("privacy zones", _zones_text(r.get("privacy_zones") or {})),
        ("package", r.get("package") or "-"),
        ("copy", _copy_text(r)),
    ):
        t.add_row(k, str(v))
    out.print(t)
    if r["approvals"]:
        a = table("approvals", ["time", "approver", "role", "decision", "note"])
        for x in r["approvals"]:
            note = x["note"] + (f" [mask {x['mask']}]" if x.get("mask") else "")
            a.add_row(x["time"], x["approver"], x["role"], x["decision"], note)
        out.print(a)
    if r.get("violation"):
        out.print(f"[red]violation:[/] {escape(str(r['violation']))}")


def _encrypt_text(r: dict[str, Any]) -> str:
    mode = r.get("encrypt") or "none"
    text = {
        "none": "none (a plain package)",
        "passphrase": "passphrase (AES-256 7z; the passphrase is shown once at export)",
        "recipient": f"to the certificate of {r['recipient']['unit']} (CMS)",
    }.get(mode, mode)
    sealed = r.get("sealed")
    if sealed:
        text += f"; sealed file {sealed.get('file')} sha256 {sealed.get('sha256')}"
    return text


def _zones_text(zones: dict[str, Any]) -> str:
    if not zones:
        return "-"
    return "; ".join(f"{cam}: {len(zs)} zone(s)" for cam, zs in zones.items())


def _copy_text(r: dict[str, Any]) -> str:
    """Whether the exported copy is known destroyed."""
    d = r.get("destroyed")
    if d:
        return f"destroyed {d.get('time')} ({d.get('how')}, by {d.get('by')})"
    if r.get("package"):
        return "not known destroyed"
    return "-"


@request.command("new")
@click.option("--camera", "cameras", required=True, help="camera id(s), comma-separated")
@click.option(
    "--from", "start", required=True, help="ISO 8601 (no offset = site-local), 2h (ago), today"
)
@click.option("--to", "end", required=True, help="as --from; now for up to this moment")
@click.option("--reason", required=True, help="purpose of the retrieval")
@click.option("--basis", required=True, help="legal basis")
@click.option("--recipient", required=True, help='"UNIT; PERSON; CONTACT"')
@click.option("--recipient-person", help="recipient person (instead of inside --recipient)")
@click.option("--recipient-contact", help="recipient contact (instead of inside --recipient)")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mp4", "native", "view"]),
    default="mp4",
    show_default=True,
    help="mp4: watermarked copy; native: evidence copy; view: watched in the web console "
    "(调阅), never copied",
)
@click.option("--emergency", is_flag=True, help="emergency export now, approvals within 24 h")
@click.option(
    "--encrypt",
    type=click.Choice(["none", "passphrase", "recipient"]),
    help="how the package leaves: passphrase (AES-256 7z), recipient (to the unit's certificate "
    "in export.recipients); default: the site's export.encrypt",
)
@pass_ctx
def request_new(
    c: Ctx,
    cameras: str,
    start: str,
    end: str,
    reason: str,
    basis: str,
    recipient: str,
    recipient_person: str | None,
    recipient_contact: str | None,
    fmt: str,
    emergency: bool,
    encrypt: str | None,
) -> None:
    """File a retrieval request; its footage is held at once."""
    args = {
        "cameras": cameras,
        "from": start,
        "to": end,
        "reason": reason,
        "basis": basis,
        "recipient": parse_recipient(recipient, recipient_person, recipient_contact),
        "format": fmt,
        "emergency": emergency,
    }
    if encrypt is not None:
        args["encrypt"] = encrypt
    res = daemon_call(c, "request.new", args)

    def human() -> None:
        out.print(f"request {res['id']} filed; footage held", markup=False)
        print_request(res)

    c.emit(res, human)


@request.command("list")
@click.option("--state", help="pending, approved, exported, closed, denied, cancelled, expired")
@pass_ctx
def request_list(c: Ctx, state: str | None) -> None:
    """Requests, with open violations."""
    res = act(c, "request.list", {"state": state}, fresh=False)

    def human() -> None:
        t = table(
            "requests",
            ["id", "state", "requester", "cameras", "from", "to", "open steps", "violation"],
        )
        for r in res:
            t.add_row(
                str(r["id"]),
                r["state"],
                r["requester"],
                ",".join(r["cameras"]),
                r["from"],
                r["to"],
                ", ".join(r.get("open_steps", [])) or "-",
                r.get("violation") or "-",
            )
        out.print(t)

    c.emit({"requests": res}, human)


@request.command("show")
@click.argument("rid", type=int)
@pass_ctx
def request_show(c: Ctx, rid: int) -> None:
    """One request with its approvals."""
    res = act(c, "request.show", {"id": rid}, fresh=False)
    c.emit(res, lambda: print_request(res))


@request.command("approve")
@click.argument("rid", type=int)
@click.option("--note", default="")
@click.option("--as", "as_step", help="the step to approve as, when you hold several roles")
@click.option(
    "--mask",
    metavar="x,y,w,h[;...]",
    help="privacy zones to fill in on this request's export, as fractions of the frame; "
    "CAMERA:x,y,w,h for one camera only",
)
@pass_ctx
def request_approve(c: Ctx, rid: int, note: str, as_step: str | None, mask: str | None) -> None:
    """Approve the next step you hold a role for."""
    args: dict[str, Any] = {"id": rid, "note": note, "as_step": as_step}
    if mask is not None:
        args["mask"] = mask
    res = daemon_call(c, "request.approve", args)
    c.emit(res, lambda: print_request(res))


@request.command("deny")
@click.argument("rid", type=int)
@click.option("--reason", required=True)
@pass_ctx
def request_deny(c: Ctx, rid: int, reason: str) -> None:
    """Deny a request (the reason is recorded)."""
    res = daemon_call(c, "request.deny", {"id": rid, "reason": reason})
    c.emit(res, lambda: print_request(res))


@request.command("cancel")
@click.argument("rid", type=int)
@pass_ctx
def request_cancel(c: Ctx, rid: int) -> None:
    """Withdraw a request (requester or admin)."""
    res = daemon_call(c, "request.cancel", {"id": rid})
    c.emit(res, lambda: print_request(res))


@request.command("resolve")
@click.argument("rid", type=int)
@click.option("--reason", required=True)
@pass_ctx
def request_resolve(c: Ctx, rid: int, reason: str) -> None:
    """Admin: resolve an emergency export's violation with a reason."""
    res = daemon_call(c, "request.resolve", {"id": rid, "reason": reason})
    c.emit(res, lambda: print_request(res))
