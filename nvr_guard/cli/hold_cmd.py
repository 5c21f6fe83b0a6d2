"""`nvr-guard hold add|list|release`: manual legal holds."""

from __future__ import annotations

import textwrap
from typing import Any

import click
from rich.text import Text

from nvr_guard.cli.base import Ctx, Group, act, out, pass_ctx
from nvr_guard.cli.show import local_iso


@click.group(cls=Group)
def hold() -> None:
    """Manual legal holds: held footage is never deleted."""


def print_holds(holds: list[dict[str, Any]]) -> None:
    """The holds, one line each: what footage, from when to when (site-local, with the offset),
    until and released when, by whom and why; on a terminal wrapped to its width."""
    if holds:
        out.print("holds:")
    for h in holds:
        where = f"{h.get('site') or '*'}/{h['camera'] or '*'}"
        line = (
            f"  hold {h['id']} ({h['kind']}) {where}: "
            f"{local_iso(h['from'])} – {local_iso(h['to'])}"
            + (f", until {local_iso(h['until'])}" if h.get("until") else "")
            + (f", released {local_iso(h['released'])}" if h.get("released") else "")
            + f"; by {h['owner']}: {h['reason']}"
        )
        if out.is_terminal:  # wrapped between words, continued indented; a pipe gets one line
            line = textwrap.fill(line, out.width, subsequent_indent="    ", break_long_words=False)
        out.print(Text(line))


def print_holds_not_shown(not_shown: list[dict[str, Any]]) -> None:
    """One line per site where requests not shown to the caller hold footage."""
    for n in not_shown:
        out.print(
            f"site {n['site']}: footage also held for {n['requests']} request(s) not shown to you",
            markup=False,
        )


@hold.command("add")
@click.option("--camera", help="camera id, or SITE/CAMERA")
@click.option("--site", help="the camera's site (required when two sites share the camera id)")
@click.option("--from", "start", help="ISO 8601 (no offset = site-local), 2h (ago), today")
@click.option("--to", "end", help="as --from; now for up to this moment")
@click.option(
    "--request",
    "rid",
    type=int,
    help="instead of --camera/--from/--to: hold a request's footage and keep its exported "
    "package on the export target past export.target_keep",
)
@click.option("--reason", required=True)
@click.option("--until", help="the hold ends by itself then (ISO 8601, or 30d from now)")
@pass_ctx
def hold_add(
    c: Ctx,
    camera: str | None,
    site: str | None,
    start: str | None,
    end: str | None,
    rid: int | None,
    reason: str,
    until: str | None,
) -> None:
    """Hold a camera's footage in a time range (or a request's, with its package)."""
    args: dict[str, object] = {"reason": reason, "until": until}
    if rid is not None:
        if camera or start or end or site:
            raise click.UsageError(
                "--request holds the request's own cameras and range; "
                "leave out --camera, --site, --from and --to"
            )
        args["request"] = rid
    else:
        if not (camera and start and end):
            raise click.UsageError("give --camera, --from and --to (or --request ID)")
        args.update({"camera": camera, "site": site, "from": start, "to": end})
    res = act(c, "hold.add", args)
    c.emit(
        res,
        lambda: out.print(
            f"hold {res['id']} placed on {res['site']}/{res['camera']}: "
            f"{res['from']} .. {res['to']}"
            + (f" (holds {', '.join(map(str, res['holds']))} for request {rid})" if rid else ""),
            markup=False,
        ),
    )


@hold.command("list")
@click.option("--all", "include_released", is_flag=True, help="also released holds")
@pass_ctx
def hold_list(c: Ctx, include_released: bool) -> None:
    """Holds in force."""
    res = act(c, "hold.list", {"all": include_released})
    if isinstance(res, list):  # a daemon from before holds were shown per caller
        res = {"holds": res, "holds_not_shown": []}

    def human() -> None:
        print_holds(res["holds"])
        print_holds_not_shown(res["holds_not_shown"])

    c.emit(res, human)


@hold.command("release")
@click.argument("hold_id", type=int)
@click.option("--reason", required=True)
@pass_ctx
def hold_release(c: Ctx, hold_id: int, reason: str) -> None:
    """End a manual hold."""
    res = act(c, "hold.release", {"id": hold_id, "reason": reason})
    c.emit(res, lambda: out.print(f"hold {hold_id} released", markup=False))
