"""`nvr-guard daemon`, `status` and `reload`: the daemon and its health."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any

import click
from rich.text import Text

from nvr_guard.cli.base import Ctx, daemon_call, err, out, pass_ctx, socket_path
from nvr_guard.cli.hold_cmd import print_holds, print_holds_not_shown
from nvr_guard.cli.show import local_iso, when
from nvr_guard.errors import DaemonUnavailable
from nvr_guard.text import fmt_span, human_bytes


@click.command()
@pass_ctx
def daemon(c: Ctx) -> None:
    """Run the daemon in the foreground (systemd Type=notify)."""
    from nvr_guard.daemon.main import run_daemon

    sys.exit(run_daemon(c.config_path, verbose=c.verbose))


def not_ok_reasons(st: dict[str, Any]) -> list[str]:
    """Why ``ok`` is false, one line each, in the order an admin should look: the audit chain,
    sweeps a guard stopped, open violations, then the attention entries."""
    why = []
    a = st.get("audit") or {}
    if a and not a.get("ok", True):
        why.append(f"audit chain BROKEN: {a.get('problem')} (check with `nvr-guard audit verify`)")
    for b in st.get("blocked_sweeps") or []:
        # the policy's imports: only when a sweep is blocked (a healthy status is a shell's
        # quick look)
        from nvr_guard.retention.policy import name_sweep

        for m in str(b.get("message") or "").splitlines() or ["stopped by a guard"]:
            why.append(f"sweep {b['id']} blocked: {name_sweep(m, b['id'])}")
    for v in st.get("violations") or []:
        why.append(f"violation: {v}")
    if st.get("violations_not_shown"):
        why.append(f"violation: {st['violations_not_shown']} on requests not shown to you")
    for e in st.get("attention") or []:
        where = f", site {e['site']}" if e.get("site") else ""
        why.append(f"attention ({e['kind']}{where}): {e['message']}")
    if not why and not st.get("ok", True):
        why.append("not ok (no reason given by the daemon: see `journalctl -u nvr-guard`)")
    return why


def _ts(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def print_status(st: dict[str, Any]) -> None:
    """The daemon's status for people: what is wrong first, then each site, then the rest;
    times site-local with their offset and how long ago, durations in words."""
    now = _ts(st.get("time")) or time.time()

    def at(text: str | None) -> str:
        """``2026-11-20 14:05 +08:00 (45 min ago)``"""
        t = _ts(text)
        return "-" if t is None else f"{local_iso(text)} ({when(t - now)})"

    def say(line: str, style: str = "") -> None:
        out.print(Text(line, style=style))

    why = not_ok_reasons(st)
    head = "nvr-guard: OK" if st["ok"] else f"nvr-guard: ATTENTION ({len(why)})"
    say(head, "bold green" if st["ok"] else "bold red")
    busy = st.get("busy")
    if busy:

        def real(text: str | None) -> str:
            """``at`` against the real time: the status' own time is the old one here."""
            t = _ts(text)
            return "-" if t is None else f"{local_iso(text)} ({when(t - time.time())})"

        say(
            f"busy: {busy.get('doing')} since {real(busy.get('since'))}; this status was made "
            f"{real(busy.get('status_from'))} (attention entries as they stand now)",
            "yellow",
        )
    say(f"  at {local_iso(st.get('time'), seconds=True)}, config {st.get('config')}")
    for w in why:
        say(f"  - {w}", "yellow")
    for name, s in st["sites"].items():
        free = s.get("disk_free_fraction")
        say(
            f"site {name} ({s['rule']}): {s['segments']:,} segments, {human_bytes(s['bytes'])}"
            + (f", disk {free:.1%} free" if free is not None else "")
        )
        if s.get("oldest"):
            due = _ts(s.get("oldest_expires"))
            line = f"  oldest recorded {at(s['oldest'])}"
            if due is not None and s.get("oldest_past_rule"):
                line += (
                    f"; due for deletion {fmt_span(now - due)} ago (held, or a sweep is blocked)"
                )
            elif due is not None:
                line += f"; due for deletion {when(due - now)}"
            say(line)
            say(f"  newest recorded {at(s.get('newest'))}")
    if st["holds"]:
        print_holds(st["holds"])
    print_holds_not_shown(st.get("holds_not_shown") or [])
    ls = st.get("last_sweep")
    if ls:
        say(
            f"last sweep {ls.get('id')}: {ls.get('state')} {at(ls.get('time'))}, "
            f"deleted {ls.get('deleted')}"
            + (f" ({human_bytes(ls['bytes'])})" if ls.get("bytes") else "")
        )
    ret = st.get("retention") or {}
    if ret:
        d = st.get("daemon") or {}
        up = d.get("uptime")
        late = ret.get("last_sweep_lateness_max")
        trips = ret.get("guard_trips") or {}
        say(
            "since start"
            + (f" ({fmt_span(float(up))} ago)" if up is not None else "")
            + f": {ret.get('deleted', 0):,} segments deleted"
            + (f"; the last sweep at most {fmt_span(late)} late" if late is not None else "")
            + (
                "; guard trips: " + ", ".join(f"{k} {n}" for k, n in sorted(trips.items()))
                if trips
                else ""
            )
        )
    a = st["audit"]
    say(
        f"audit: {a['entries']:,} entries, chain "
        + ("intact" if a["ok"] else f"BROKEN: {a['problem']}")
        + (f" (whole chain walked {at(a['verified_full'])})" if a.get("verified_full") else ""),
        "" if a["ok"] else "red",
    )
    key = st.get("export_key") or {}
    say(
        f"export signing key: {key.get('fingerprint') or 'not available'}"
        " (printed on every approval record; recipients pin it with verify --fingerprint)"
    )
    d = st.get("daemon") or {}
    if d.get("last_error"):
        say(f"last error: {d['last_error']}", "red")
    req = st.get("open_requests") or {}
    for r in req.get("pending", []):
        say(
            f"request {r['id']} pending ({', '.join(r['open_steps'])}), "
            f"decide by {at(r.get('decide_by'))}"
        )
    for r in req.get("expiring", []):
        say(f"request {r['id']} approved, valid until {at(r.get('valid_until'))}")
    copies = st.get("export_copies") or {}
    if copies.get("on_targets") or copies.get("on_media"):
        say(
            f"exported copies: {copies.get('on_targets', 0)} on export targets (kept "
            f"{copies.get('keep')}; {copies.get('held', 0)} held), {copies.get('on_media', 0)} "
            "out on media not known destroyed"
        )
        for cp in (copies.get("items") or [])[:5]:
            held = f", held by {cp['held_by']}" if cp.get("held_by") else ""
            say(f"package of request {cp['request']} destroyed from {at(cp.get('due'))}{held}")
    for sc in st.get("last_scans", [])[:3]:
        finished = sc.get("finished")
        done = f", {when(float(finished) - now)}" if isinstance(finished, int | float) else ""
        say(
            f"scan {sc.get('id')}: {sc.get('target_path')} {sc.get('result')} "
            f"({sc.get('engine')}, {sc.get('files')} files{done})"
        )


@click.command()
@pass_ctx
def status(c: Ctx) -> None:
    """Health, disks, per-site retention, holds, blocked sweeps (asks the running daemon).

    Exit 0 while everything is ok; 1 while it is not (the reasons are listed first, as
    ``--json`` lists them under ``attention``, ``blocked_sweeps``, ``violations`` and ``audit``),
    and 1 when no daemon answers (``--json``: ``{"ok": false, "error": ...}``) — like
    ``systemctl is-active``, a script may test the exit code alone."""
    try:
        st = daemon_call(c, "status", {}, timeout=10)
    except DaemonUnavailable as e:
        if c.as_json:
            c.emit({"ok": False, "error": str(e)}, lambda: None)
            sys.exit(1)
        raise

    c.emit(st, lambda: print_status(st))
    if not st.get("ok"):
        sys.exit(1)


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
