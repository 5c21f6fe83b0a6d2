"""`nvr-guard retention plan|run|confirm|confirm-root`: preview and run sweeps."""

from __future__ import annotations

import os
import sys
from collections import Counter
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


def _site_tz(c: Ctx, site: str, res: dict[str, Any] | None = None) -> tzinfo:
    """The site's zone as the plan names it (``timezones``), else from the config; UTC (and the
    offset says so) when it cannot be read."""
    name = ((res or {}).get("timezones") or {}).get(site)
    if isinstance(name, str):
        from zoneinfo import ZoneInfo

        try:
            return ZoneInfo(name)
        except (ValueError, OSError):
            pass
    try:
        return c.config.site_tz(site)  # type: ignore[no-any-return]
    except Exception:  # a config this user cannot read, or a site it no longer names
        return UTC


def summary_rows(c: Ctx, res: dict[str, Any], done: bool = False) -> list[list[str]]:
    """One row per site and camera: what is to delete (count, bytes, recorded span), and what is
    held back, counted by the rule that holds it (see ``sweeper.summarize``)."""
    summary = res.get("summary")
    if summary is None:
        from nvr_guard.retention.sweeper import summarize

        skipped = {str(x.get("path")) for x in res.get("skipped") or []}
        summary = summarize(res["items"], done, skipped)
    rows = []
    for r in summary:
        stopped = [f"guard {r['blocked']:,}"] if r["blocked"] else []
        kept = [f"{k} {n:,}" for k, n in r["kept"].items()]
        rows.append(
            [
                printable(str(r["site"])),  # names from the recording tree: inert in a terminal
                printable(str(r["camera"])),
                f"{r['due']:,}",
                human_bytes(r["bytes"]) if r["due"] else "-",
                span(r["first"], r["last"], _site_tz(c, r["site"], res))
                if r["first"] is not None
                else "-",
                ", ".join(stopped + kept) or "-",
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
        summary = res.get("summary")
        any_items = bool(items) or bool(summary)
        width = out.width if out.is_terminal else None
        out.print(title, markup=False)
        if any_items:
            header = [
                "SITE",
                "CAMERA",
                "DELETED" if done else "TO DELETE",
                "SIZE",
                "RECORDED (site-local)",
                "HELD BACK",
            ]
            rows = summary_rows(c, res, done)
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
        if summary is not None and not items:
            blocked = sum(r["blocked"] for r in summary)
            counts = Counter(
                delete=sum(r["due"] for r in summary) - (0 if done else blocked),
                keep=sum(sum(r["kept"].values()) for r in summary),
                blocked=blocked,
            )
        else:
            counts = Counter(it["action"] for it in items)
            if done and res.get("skipped"):
                # what the purge skipped was not deleted: held back (it says why, on stderr)
                n = len(res["skipped"])
                counts["delete"] -= n
                counts["keep"] += n
        out.print(
            f"sweep {res['sweep'] if res['sweep'] is not None else '-'}: deleted {res['deleted']}, "
            f"to delete {counts.get('delete', 0)}, held back {counts.get('keep', 0)}, "
            f"blocked by a guard {counts.get('blocked', 0)}",
            markup=False,
        )
        if any_items and not list_all:
            out.print("--list shows every segment and why", markup=False)
        skipped = res.get("skipped") or []
        if done and skipped:
            shown = "; ".join(
                f"{printable(str(x.get('path')))}: {printable(str(x.get('reason')))}"
                for x in skipped[:3]
            )
            more = (
                f" (and {len(skipped) - 3:,} more; --json lists them)" if len(skipped) > 3 else ""
            )
            err.print(
                f"skipped: {len(skipped):,} file(s) due were not deleted (found changed, moved or "
                f"no segment any more; the next sweep looks again): {shown}{more}",
                markup=False,
            )
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
@click.option(
    "--rescan",
    is_flag=True,
    help="walk the roots again on a copy of the catalog instead of planning from the "
    "daemon's catalog (what runs without a daemon)",
)
@_LIST
@pass_ctx
def retention_plan(c: Ctx, now: str | None, site: str | None, rescan: bool, list_all: bool) -> None:
    """What a sweep would delete and why; deletes nothing (admin, security_lead, auditor)."""
    res = plan(c, now, site, rescan, summary=not (list_all or c.as_json))
    print_outcome(c, res, f"retention plan (nothing is deleted; {basis_words(res)})", list_all)


def basis_words(res: dict[str, Any]) -> str:
    """What a plan was made from, in words."""
    basis, walked = res.get("basis"), res.get("walked") or []
    if basis == "catalog":
        return "from the daemon's catalog"
    if basis == "snapshot":
        how = "a copy of the daemon's catalog under this config file"
        if walked:
            how += f", sites walked again for their new roots or layout: {', '.join(walked)}"
        return how
    return "a walk of every root"


def plan(
    c: Ctx, now: str | None, site: str | None, rescan: bool = False, summary: bool = False
) -> dict[str, Any]:
    """The plan, made where it is cheapest and still right.

    - A daemon runs under this config file: it plans from its catalog, which its watcher keeps
      current (``--rescan``: it walks a copy of the catalog against the disk instead).
    - A daemon runs under another config (a preview of a change): root plans locally on a copy
      of the daemon's catalog with every expiry under this file, walking only sites whose
      roots or layout differ; anyone else is refused (the daemon plans only under its own).
    - No daemon: root walks the roots on a scratch copy of the state; anyone else is refused
      (the state directory is the daemon's alone, 0700).
    """
    from nvr_guard.errors import ConfigMismatch

    args: dict[str, Any] = {"now": now, "site": site}
    root = os.getuid() == 0
    if rescan and root:
        return _local_plan(c, args, rescan=True)
    try:
        res = daemon_call(
            c,
            PLAN,
            {**args, "config_digest": c.config_digest, "rescan": rescan, "summary": summary},
            timeout=3600,
        )
    except ConfigMismatch:
        if not root:
            raise
        return _local_plan(c, args, rescan=False)
    except DaemonUnavailable as e:
        if root:
            return _local_plan(c, args, rescan=True)
        raise DaemonUnavailable(
            f"{e}; without the daemon only root previews a sweep (it reads the state in "
            f"{c.config.state_dir})"
        ) from None
    return dict(res)


def _local_plan(c: Ctx, args: dict[str, Any], rescan: bool) -> dict[str, Any]:
    """Root's plan in this process, on a scratch copy of the state."""
    from nvr_guard.daemon.commands import Context, dispatch

    ctx = Context(None, local=True, config=c.config)
    return dict(dispatch(ctx, caller(), PLAN, {**args, "rescan": rescan}))


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
    summary = not (list_all or c.as_json)
    res = act(c, "retention.run", {"now": now, "dry_run": dry_run, "summary": summary})
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
    res = act(c, "retention.confirm", {"sweep": sweep, "summary": not (list_all or c.as_json)})
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
