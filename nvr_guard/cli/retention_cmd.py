"""`nvr-guard retention plan|run|confirm|confirm-root`: preview and run sweeps."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.text import Text

from nvr_guard.cli.base import Ctx, Group, act, caller, daemon_call, err, out, pass_ctx, table
from nvr_guard.errors import DaemonUnavailable

PLAN = "retention.plan"


@click.group(cls=Group)
def retention() -> None:
    """Preview and run retention sweeps."""


def print_outcome(c: Ctx, res: dict[str, Any], title: str) -> None:
    def human() -> None:
        items = res["items"]
        t = table(title, ["action", "site", "camera", "path", "reason"])
        shown = 0
        for it in items:
            if shown >= 200 and not c.verbose:
                break
            style = {"delete": "red", "keep": "green", "blocked": "yellow"}.get(it["action"], "")
            t.add_row(
                Text(it["action"], style=style), it["site"], it["camera"], it["path"], it["reason"]
            )
            shown += 1
        if items:
            out.print(t)
        if len(items) > shown:
            out.print(f"... {len(items) - shown} more (use -v or --json for all)")
        from collections import Counter

        counts = Counter(it["action"] for it in items)
        out.print(
            f"sweep {res['sweep'] if res['sweep'] is not None else '-'}: deleted {res['deleted']}, "
            f"to delete {counts.get('delete', 0)}, held back {counts.get('keep', 0)}, "
            f"blocked by a guard {counts.get('blocked', 0)}"
        )
        for tr in res.get("trips", []):
            err.print(f"guard: {tr['message']}", markup=False)
        for a in res.get("alerts", []):
            err.print(f"alert: {a}", markup=False)
        for u in res.get("unmatched", []):
            err.print(
                f"unmatched: site {u['site']}, root {u['root']}: {u['count']} files with a "
                f"segment extension do not match the layout and are never deleted, e.g. "
                f"{', '.join(u['examples'])}",
                markup=False,
            )
        for a in res.get("attention", []):
            if a["kind"] != "unmatched":
                err.print(f"attention ({a['kind']}): {a['message']}", markup=False)

    c.emit(res, human)


@retention.command("plan")
@click.option("--now", help="pretend it is this time (ISO 8601)")
@click.option("--site", help="only this site")
@pass_ctx
def retention_plan(c: Ctx, now: str | None, site: str | None) -> None:
    """What a sweep would delete and why; deletes nothing (admin, security_lead, auditor)."""
    res = plan(c, now, site)
    print_outcome(c, res, "retention plan (nothing is deleted)")


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
@pass_ctx
def retention_run(c: Ctx, now: str | None, dry_run: bool) -> None:
    """One sweep now."""
    res = act(c, "retention.run", {"now": now, "dry_run": dry_run})
    print_outcome(c, res, "retention run" + (" (dry run)" if dry_run else ""))
    if res.get("trips"):
        sys.exit(3)


@retention.command("confirm")
@click.argument("sweep", type=int)
@pass_ctx
def retention_confirm(c: Ctx, sweep: int) -> None:
    """Release a sweep stopped by the mass-deletion or clock guard (admin)."""
    res = act(c, "retention.confirm", {"sweep": sweep})
    print_outcome(c, res, f"confirmed sweep {sweep}")
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
