"""`nvr-guard retention plan|run|confirm|confirm-root`: preview and run sweeps."""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict
from datetime import UTC, tzinfo
from typing import Any

import click
from rich.text import Text

from nvr_guard.cli.base import Ctx, Group, act, caller, daemon_call, err, out, pass_ctx
from nvr_guard.cli.show import columns, span
from nvr_guard.errors import DaemonUnavailable
from nvr_guard.text import human_bytes, printable

PLAN = "retention.plan"


@click.group(cls=Group)
def retention() -> None:
    """Preview and run retention sweeps."""


def _site_tz(c: Ctx, site: str) -> tzinfo:
    """The site's zone from the config; UTC (and the offset says so) when it cannot be read."""
    try:
        return c.config.site_tz(site)  # type: ignore[no-any-return]
    except Exception:  # a config this user cannot read, or a site it no longer names
        return UTC


def held_back_kind(reason: str) -> str:
    """``held`` / ``settling`` / ``floor`` ...: the rule a reason names first (every reason the
    policy gives starts with it: "held: hold 3 (...)", "settling: modified 40 s ago ...")."""
    head = reason.split(":", 1)[0].strip()
    return head if head and len(head) <= 24 and " " not in head else "other"


def summary_rows(c: Ctx, items: list[dict[str, Any]], done: bool = False) -> list[list[str]]:
    """One row per site and camera: what is to delete (count, bytes, recorded span), and what is
    held back, counted by the rule that holds it. In a plan what a guard stopped is still to
    delete (a confirmation deletes it) and also counted as held back by the guard; after a
    sweep (``done``) it is only held back."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        groups[(str(it["site"]), str(it["camera"]))].append(it)
    rows = []
    for (site_, camera), its in sorted(groups.items()):
        due = [i for i in its if i["action"] == "delete" or (i["action"] == "blocked" and not done)]
        blocked = sum(1 for i in its if i["action"] == "blocked")
        kept = Counter(held_back_kind(str(i["reason"])) for i in its if i["action"] == "keep")
        stopped = [f"guard {blocked:,}"] if blocked else []
        times = [float(i["recorded"]) for i in due if i.get("recorded") is not None]
        rows.append(
            [
                printable(site_),  # names from the recording tree: inert in a terminal
                printable(camera),
                f"{len(due):,}",
                human_bytes(sum(int(i.get("size") or 0) for i in due)) if due else "-",
                span(min(times), max(times), _site_tz(c, site_)) if times else "-",
                ", ".join(stopped + [f"{k} {n:,}" for k, n in kept.most_common()]) or "-",
            ]
        )
    return rows


def print_outcome(
    c: Ctx, res: dict[str, Any], title: str, list_all: bool = False, done: bool = False
) -> None:
    """Summary first (one line per site and camera), then with ``list_all`` every segment with
    its action and reason; guard trips, alerts and unmatched files on stderr. ``done``: the
    deletions happened (a sweep, not a plan)."""

    def human() -> None:
        items = res["items"]
        width = out.width if out.is_terminal else None
        out.print(title, markup=False)
        if items:
            header = [
                "SITE",
                "CAMERA",
                "DELETED" if done else "TO DELETE",
                "SIZE",
                "RECORDED (site-local)",
                "HELD BACK",
            ]
            rows = summary_rows(c, items, done)
            for row in columns(header, rows, width, frozenset({2, 3})):
                out.print(row, markup=False, highlight=False)
        else:
            out.print("nothing is due: no segment is past its rule", markup=False)
        for u in res.get("unmanaged", []):
            out.print(
                f"site {printable(str(u['site']))}: {int(u['segments']):,} segment(s) "
                f"({human_bytes(int(u['bytes']))}) kept: {u['reason']}",
                markup=False,
            )
        if list_all and items:
            out.print("")
            for it in items:
                style = {"delete": "red", "keep": "green", "blocked": "yellow"}.get(it["action"])
                line = Text(f"{it['action']:<7}", style=style or "")
                line.append(f"  {printable(str(it['path']))}  {printable(str(it['reason']))}")
                out.print(line)
        counts = Counter(it["action"] for it in items)
        out.print(
            f"sweep {res['sweep'] if res['sweep'] is not None else '-'}: deleted {res['deleted']}, "
            f"to delete {counts.get('delete', 0)}, held back {counts.get('keep', 0)}, "
            f"blocked by a guard {counts.get('blocked', 0)}",
            markup=False,
        )
        if items and not list_all:
            out.print("--list shows every segment and why", markup=False)
        for tr in res.get("trips", []):
            err.print(f"guard: {printable(str(tr['message']))}", markup=False)
        for a in res.get("alerts", []):
            err.print(f"alert: {printable(str(a))}", markup=False)
        for u in res.get("unmatched", []):
            err.print(
                f"unmatched: site {u['site']}, root {u['root']}: {u['count']} files with a "
                f"segment extension do not match the layout and are never deleted, e.g. "
                f"{', '.join(u['examples'])}",
                markup=False,
            )
        for a in res.get("attention", []):
            if a["kind"] != "unmatched":
                err.print(f"attention ({a['kind']}): {printable(str(a['message']))}", markup=False)

    c.emit(res, human)


_LIST = click.option(
    "--list", "list_all", is_flag=True, help="after the summary, every segment and why"
)


def _title_of(res: dict[str, Any]) -> str:
    sweep = res.get("sweep")
    return f"sweep {sweep}" if sweep is not None else "sweep (nothing was due)"


@retention.command("plan")
@click.option("--now", help="pretend it is this time (ISO 8601, or 2w from now)")
@click.option("--site", help="only this site")
@_LIST
@pass_ctx
def retention_plan(c: Ctx, now: str | None, site: str | None, list_all: bool) -> None:
    """What a sweep would delete and why; deletes nothing (admin, security_lead, auditor)."""
    res = plan(c, now, site)
    print_outcome(c, res, "retention plan (nothing is deleted)", list_all)


def plan(c: Ctx, now: str | None, site: str | None) -> dict[str, Any]:
    """The plan from the command's handler: root runs it here, on a scratch copy of the state
    and under the config file it names (a preview of a config change needs no daemon); anyone
    else asks the daemon, which checks their role and plans under the config in force: the
    state directory is the daemon's alone (0700)."""
    args: dict[str, Any] = {"now": now, "site": site}
    if os.getuid() == 0:
        from nvr_guard.daemon.commands import Context, dispatch

        return dict(dispatch(Context(None, local=True, config=c.config), caller(), PLAN, args))
    try:
        res = daemon_call(c, PLAN, {**args, "config_digest": c.config.digest}, timeout=3600)
    except DaemonUnavailable as e:
        raise DaemonUnavailable(
            f"{e}; without the daemon only root previews a sweep (it reads the state in "
            f"{c.config.state_dir})"
        ) from None
    return dict(res)


@retention.command("run")
@click.option(
    "--now",
    help="pretend it is this time (ISO 8601); only root, acting locally while no daemon runs",
)
@click.option("--dry-run", is_flag=True, help="plan only, delete nothing")
@_LIST
@pass_ctx
def retention_run(c: Ctx, now: str | None, dry_run: bool, list_all: bool) -> None:
    """One sweep now."""
    res = act(c, "retention.run", {"now": now, "dry_run": dry_run})
    title = "retention run (dry run: nothing is deleted)" if dry_run else _title_of(res)
    print_outcome(c, res, title, list_all, done=not dry_run)
    if res.get("trips"):
        sys.exit(3)


@retention.command("confirm")
@click.argument("sweep", type=int)
@_LIST
@pass_ctx
def retention_confirm(c: Ctx, sweep: int, list_all: bool) -> None:
    """Release a sweep stopped by the mass-deletion or clock guard (admin)."""
    res = act(c, "retention.confirm", {"sweep": sweep})
    print_outcome(c, res, f"confirmed sweep {sweep}: {_title_of(res)}", list_all, done=True)
    if res.get("trips"):
        # blocked again: something changed since the sweep that was confirmed
        sys.exit(3)


@retention.command("confirm-root")
@click.argument("site")
@click.argument("root")
@pass_ctx
def retention_confirm_root(c: Ctx, site: str, root: str) -> None:
    """Accept a root out of service as it is now: on another file system, emptied, or missing
    (admin). Its catalogued footage that is no longer there is forgotten."""
    res = act(c, "retention.confirm_root", {"site": site, "root": root})

    def human() -> None:
        out.print(
            f"root {res['root']} of site {res['site']} confirmed (was {res['was']}); "
            f"{res['forgotten']} catalogued segments no longer there were forgotten",
            markup=False,
        )

    c.emit(res, human)
