"""`nvr-guard daemon`, `status` and `reload`: the daemon and its health."""

from __future__ import annotations

import sys

import click
from rich.markup import escape

from nvr_guard.cli.base import Ctx, daemon_call, err, out, pass_ctx, socket_path, table
from nvr_guard.cli.hold_cmd import print_holds, print_holds_not_shown
from nvr_guard.errors import DaemonUnavailable


@click.command()
@pass_ctx
def daemon(c: Ctx) -> None:
    """Run the daemon in the foreground (systemd Type=notify)."""
    from nvr_guard.daemon.main import run_daemon

    sys.exit(run_daemon(c.config_path, verbose=c.verbose))


@click.command()
@pass_ctx
def status(c: Ctx) -> None:
    """Health, disks, per-site retention, holds, blocked sweeps (asks the running daemon)."""
    try:
        st = daemon_call(c, "status", {}, timeout=10)
    except DaemonUnavailable as e:
        if c.as_json:
            c.emit({"ok": False, "error": str(e)}, lambda: None)
            sys.exit(1)
        raise

    def human() -> None:
        out.print(
            f"[bold]nvr-guard[/] {'[green]OK' if st['ok'] else '[red]ATTENTION'}[/]"
            f"  {st['time']}  config {escape(str(st['config']))}"
        )
        t = table("sites", ["site", "rule", "segments", "size", "oldest", "newest", "disk free"])
        from nvr_guard.text import human_bytes

        for name, s in st["sites"].items():
            free = s["disk_free_fraction"]
            t.add_row(
                name,
                s["rule"],
                str(s["segments"]),
                human_bytes(s["bytes"]),
                s["oldest"] or "-",
                s["newest"] or "-",
                f"{free:.1%}" if free is not None else "-",
            )
        out.print(t)
        for a_ in st.get("attention", []):
            where = f" {a_['site']}" if a_.get("site") else ""
            out.print(
                f"[yellow]attention ({escape(a_['kind'])}{escape(where)})[/]: "
                f"{escape(a_['message'])}"
            )
        for b in st["blocked_sweeps"]:
            # the message names cameras: directory names, which may look like markup
            out.print(f"[yellow]blocked sweep {b['id']}[/]: {escape(b['message'])}", markup=True)
        if st["holds"]:
            print_holds(st["holds"])
        print_holds_not_shown(st.get("holds_not_shown") or [])
        a = st["audit"]
        out.print(
            f"audit: {a['entries']} entries, chain "
            f"{'intact' if a['ok'] else 'BROKEN: ' + escape(str(a['problem']))}"
        )
        key = st.get("export_key") or {}
        out.print(
            f"export signing key: {key.get('fingerprint') or 'not available'}"
            " (printed on every approval record; recipients pin it with verify --fingerprint)",
            markup=False,
        )
        if st.get("last_sweep"):
            ls = st["last_sweep"]
            out.print(
                f"last sweep: {ls.get('id')} {ls.get('state')} at {ls.get('time')},"
                f" deleted {ls.get('deleted')}"
            )
        ret = st.get("retention") or {}
        if ret:
            late = ret.get("last_sweep_lateness_max")
            out.print(
                f"since start: {ret.get('deleted', 0)} segments deleted"
                + (f", last sweep at most {late:.0f} s after expiry" if late is not None else "")
                + (f", guard trips {ret.get('guard_trips')}" if ret.get("guard_trips") else ""),
                markup=False,
            )
        d = st.get("daemon") or {}
        if d.get("last_error"):
            out.print(f"[red]last error:[/] {escape(str(d['last_error']))}")
        for v in st.get("violations", []):
            out.print(f"[red]violation:[/] {escape(str(v))}")
        if st.get("violations_not_shown"):
            out.print(
                f"[red]violation:[/] {st['violations_not_shown']} on requests not shown to you"
            )
        req = st.get("open_requests") or {}
        for r in req.get("pending", []):
            out.print(
                f"request {r['id']} pending ({', '.join(r['open_steps'])}), "
                f"decide by {r['decide_by']}",
                markup=False,
            )
        for r in req.get("expiring", []):
            out.print(f"request {r['id']} approved, valid until {r['valid_until']}", markup=False)
        for s in st.get("last_scans", [])[:3]:
            out.print(
                f"scan {s.get('id')}: {s.get('target_path')} {s.get('result')} "
                f"({s.get('engine')}, {s.get('files')} files)",
                markup=False,
            )

    c.emit(st, human)


@click.command("reload")
@pass_ctx
def reload_config(c: Ctx) -> None:
    """Ask the daemon to reload its config and wait for the outcome (admin).

    Exit 0 when applied; 2 with the FILE:LINE errors when refused (the old config stays in
    force); 1 when no daemon answers. systemd's ExecReload= runs this."""
    # validating and applying (expiries of changed sites, the file watcher) can take a while on
    # a large archive; systemd's own reload timeout still applies
    try:
        res = daemon_call(c, "reload", {}, timeout=900)
    except DaemonUnavailable:
        from nvr_guard.config import check_config

        cfg, errors, _ = check_config(c.config_path)
        if cfg is not None:
            raise
        # no daemon reached (the broken file may even hide where its socket is): the config
        # is refused all the same, and says why
        for path_, line, msg in errors:
            err.print(f"{path_}:{line}: {msg}", markup=False)
        err.print(
            f"nvr-guard: {c.config_path} is invalid and no daemon answered at "
            f"{socket_path(c)}; nothing was reloaded",
            markup=False,
        )
        sys.exit(2)

    def human() -> None:
        if res["applied"]:
            out.print(f"config reloaded: {res['config']} ({res['digest'][:12]})", markup=False)

    c.emit(res, human)
    if not res["applied"]:
        for line in res["errors"]:
            err.print(line, markup=False)
        err.print(
            f"nvr-guard: reload refused; the previous config ({res['digest'][:12]}) stays in force",
            markup=False,
        )
        sys.exit(2)
