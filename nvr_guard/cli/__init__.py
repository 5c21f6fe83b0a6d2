"""`nvr-guard` command line: a thin client.

Acting commands go through the daemon's control socket so the daemon knows who calls;
`retention plan/run` and `config` work without a daemon."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nvr_guard import __version__
from nvr_guard.errors import (
    ConfigError,
    DaemonUnavailable,
    InvalidInput,
    NvrGuardError,
    RuntimeFailure,
    VerifyFailed,
)

DEFAULT_CONFIG = "/etc/nvr-guard/config.yaml"

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Ctx:
    def __init__(self, config: str, as_json: bool, verbose: int) -> None:
        self.config_path = config
        self.as_json = as_json
        self.verbose = verbose
        self._config: Any = None

    @property
    def config(self) -> Any:
        if self._config is None:
            from nvr_guard.config import load_config

            self._config = load_config(self.config_path)
        return self._config

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
        else:
            human()


pass_ctx = click.make_pass_decorator(Ctx)


def fail(e: NvrGuardError, verbose: int) -> NoReturn:
    if isinstance(e, ConfigError):
        for line in e.lines():
            err.print(line, markup=False)
    else:
        err.print(f"nvr-guard: {e}", markup=False)
    if verbose:
        traceback.print_exc()
    sys.exit(e.exit_code)


class Group(click.Group):
    """Maps our error types to exit codes and one-line messages; no tracebacks without -v."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NvrGuardError as e:
            fail(e, ctx.params.get("verbose", 0) if ctx.params else 0)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except (KeyboardInterrupt, BrokenPipeError):
            sys.exit(130)
        except PermissionError as e:  # not a bug: a file this user may not read
            err.print(f"nvr-guard: {unreadable(e)}", markup=False)
            if ctx.params.get("verbose"):
                traceback.print_exc()
            sys.exit(3)
        except Exception as e:  # a bug: say so, keep the traceback for -v
            err.print(f"nvr-guard: internal error: {type(e).__name__}: {e}", markup=False)
            if ctx.params.get("verbose"):
                traceback.print_exc()
            sys.exit(1)


def _who_reads(st: os.stat_result, need: int) -> str:
    """``user nvr-guard, group nvr-guard`` from a mode: who has ``need`` (4 read, 1 enter)."""
    import grp
    import pwd

    def name(get: Callable[[int], Any], i: int) -> str:
        try:
            return str(get(i)[0])
        except KeyError:
            return str(i)

    who = ["root", f"user {name(pwd.getpwuid, st.st_uid)}"] if st.st_uid else ["root"]
    if st.st_mode & (need << 3):
        who.append(f"group {name(grp.getgrgid, st.st_gid)}")
    if st.st_mode & need:
        who = ["everyone"]
    return ", ".join(who)


def unreadable(e: PermissionError) -> str:
    """One line for a file this user may not read: which file, what stops it, who can read it."""
    if not e.filename:
        return f"permission denied: {e.strerror or e}"
    path = Path(os.path.abspath(os.fsdecode(e.filename)))
    for d in [*reversed(path.parents)]:  # the first directory this user may not enter
        if not os.access(d, os.X_OK):
            try:
                st = os.stat(d)
            except OSError:
                break
            return (
                f"cannot read {path}: permission denied (directory {d} is mode "
                f"{st.st_mode & 0o777:04o}: only {_who_reads(st, 1)} may enter it)"
            )
    try:
        st = os.stat(path)
    except OSError:
        return f"cannot read {path}: permission denied"
    return (
        f"cannot read {path}: permission denied (mode {st.st_mode & 0o777:04o}: readable by "
        f"{_who_reads(st, 4)})"
    )


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    envvar="NVR_GUARD_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="config file (env NVR_GUARD_CONFIG)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output: one JSON document")
@click.option("-v", "--verbose", count=True, help="more detail; tracebacks for errors")
@click.version_option(__version__, prog_name="nvr-guard")
@click.pass_context
def cli(ctx: click.Context, config: str, as_json: bool, verbose: int) -> None:
    """nvr-guard: retention and export enforcement for video-recorder hosts."""
    ctx.obj = Ctx(config, as_json, verbose)
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---- helpers ----------------------------------------------------------------------------------
def socket_path(c: Ctx) -> Path:
    """The control socket, even when the config file is broken right now: an admin who just broke
    it must still be able to ask the daemon (which kept the old config) how it is doing, and
    `nvr-guard reload` must reach it to have the refusal recorded."""
    try:
        return Path(c.config.socket)
    except ConfigError:
        import re

        import yaml

        sock: Any = None
        try:
            text = Path(c.config_path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            # the socket's path is in the file: without it the daemon cannot be found, and
            # saying "not running" would be false
            raise InvalidInput(
                f"{c.config_path}: cannot read ({e.strerror}); the daemon's socket is named in "
                "this file: ask an admin for read access, or pass --config PATH"
            ) from None
        try:
            raw = yaml.safe_load(text)
            sock = raw.get("socket") if isinstance(raw, dict) else None
        except yaml.YAMLError:
            # a syntax error elsewhere in the file: the top-level line itself may still be fine
            m = re.search(r"""(?m)^socket:[ \t]*["']?(/[^"'\s#]+)""", text)
            sock = m.group(1) if m else None
        return (
            Path(sock)
            if isinstance(sock, str) and sock.startswith("/")
            else Path("/run/nvr-guard/control.sock")
        )


def daemon_call(c: Ctx, cmd: str, args: dict[str, Any], timeout: float = 30.0) -> Any:
    from nvr_guard.daemon.control import call

    return call(socket_path(c), cmd, args, timeout=timeout)


def act(c: Ctx, cmd: str, args: dict[str, Any], local: Callable[[Any], Any]) -> Any:
    """Run an acting command through the daemon (it learns who calls from the socket); without a
    daemon only root may act, directly on the state (it could edit the state anyway).

    "Without a daemon" means no daemon holds the state lock, not "the daemon did not answer": a
    busy or slow daemon still owns the state, and root acting beside it would bypass its checks
    (a sweep with ``--now``, for one) and race its work."""
    try:
        return daemon_call(c, cmd, args)
    except DaemonUnavailable as e:
        if os.getuid() != 0:
            raise DaemonUnavailable(f"{e}; start the daemon (systemctl start nvr-guard)") from None
        from nvr_guard.engine import Engine, StateLock

        lock = StateLock(c.config.state_dir)
        try:
            if not lock.try_shared():
                raise DaemonUnavailable(
                    f"{e}; a daemon ({lock.holder()}) holds {c.config.state_dir}, so nothing was "
                    "done locally: try again, or check `systemctl status nvr-guard`"
                ) from None
            engine = Engine(c.config)
            engine.reconcile(full=False)  # bring the catalog up to date with the disk first
            return local(engine)
        finally:
            lock.close()


def caller() -> Any:
    from nvr_guard.identity import Caller

    return Caller.local()


class _PlainTable(Table):
    """Cells are data (paths, reasons, names people typed): shown as written, never read as rich
    markup — a reason ``[red]x[/red]`` or a camera ``[link=...]`` must not change what is shown."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kwargs)


def table(title: str | None, columns: list[str]) -> Table:
    t = _PlainTable(title=title, title_justify="left", header_style="bold")
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


# ---- daemon / status ----------------------------------------------------------------------------
@cli.command()
@pass_ctx
def daemon(c: Ctx) -> None:
    """Run the daemon in the foreground (systemd Type=notify)."""
    from nvr_guard.daemon.main import run_daemon

    sys.exit(run_daemon(c.config_path, verbose=c.verbose))


@cli.command()
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


@cli.command("reload")
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


# ---- config ---------------------------------------------------------------------------------
@cli.group(cls=Group)
def config() -> None:
    """Check and show the configuration."""


@config.command("check")
@click.argument("path", required=False)
@pass_ctx
def config_check(c: Ctx, path: str | None) -> None:
    """Validate; print errors as PATH:LINE: message (exit 2)."""
    from nvr_guard.config import check_config

    target = path or c.config_path
    cfg, errors, warnings = check_config(target)
    if cfg is not None:
        errors = errors + _state_problems(cfg)
    if c.as_json:
        c.emit(
            {
                "ok": not errors,
                "path": target,
                "errors": [{"file": f, "line": ln, "message": m} for f, ln, m in errors],
                "warnings": [{"file": f, "line": ln, "message": m} for f, ln, m in warnings],
            },
            lambda: None,
        )
    else:
        for f, ln, m in errors:
            err.print(f"{f}:{ln}: {m}", markup=False)
        for f, ln, m in warnings:
            err.print(f"{f}:{ln}: warning: {m}", markup=False)
        if not errors:
            out.print(
                f"{target}: OK ({len(cfg.sites)} sites)" if cfg else f"{target}: OK", markup=False
            )
    if errors:
        sys.exit(2)


def _state_problems(cfg: Any) -> list[tuple[str, int, str]]:
    """Checks that need the state, when it is readable: an active hold must keep matching a
    site (by name or by one of its roots) under the new config."""
    import time

    from nvr_guard.engine import hold_problems
    from nvr_guard.store.catalog import read_active_holds

    holds = read_active_holds(Path(cfg.state_dir) / "catalog.db", time.time())
    return [] if holds is None else hold_problems(cfg, holds)


@config.command("show")
@pass_ctx
def config_show(c: Ctx) -> None:
    """Effective config, defaults filled in."""
    eff = c.config.effective()
    if c.as_json:
        c.emit(eff, lambda: None)
    else:
        import yaml

        out.print(yaml.safe_dump(eff, allow_unicode=True, sort_keys=False), markup=False)


# ---- layout ---------------------------------------------------------------------------------
@cli.group(cls=Group)
def layout() -> None:
    """Check what the sites' layouts read from recording paths."""


@layout.command("test")
@click.option("--site", help="only this site; a relative PATH is then read below its root")
@click.argument("paths", nargs=-1, required=True)
@pass_ctx
def layout_test(c: Ctx, site: str | None, paths: tuple[str, ...]) -> None:
    """Site, camera and recorded start (and end) each PATH yields, or why it does not match
    (exit 2 when any does not). Reads the config only; no daemon needed."""
    from nvr_guard.retention.layout_check import check_paths

    results = check_paths(c.config, list(paths), site)

    def human() -> None:
        # a line per path, not a table: paths are long and scripts grep these lines
        for r in results:
            if r.ok:
                text = f"{r.path}: site {r.site}, camera {r.camera}, start {r.start}"
                text += f", end {r.end}" if r.end else ""
            else:
                text = f"{r.path}: no match: {r.reason}"
            out.print(text, markup=False)

    c.emit({"ok": all(r.ok for r in results), "paths": [r.as_json() for r in results]}, human)
    if not all(r.ok for r in results):
        sys.exit(2)


# ---- retention ----------------------------------------------------------------------------------
@cli.group(cls=Group)
def retention() -> None:
    """Preview and run retention sweeps."""


def _parse_now(config: Any, now: str | None) -> Any:
    """The real clocks, or the wall clock moved to ``--now`` (boot time stays real, so the clock
    guard sees a jump exactly as it would see a real one)."""
    from dataclasses import replace

    from nvr_guard.model import boot_clock
    from nvr_guard.times import parse_time

    real = boot_clock()
    if now is None:
        return real
    return replace(real, wall=parse_time(now, config.tz, "--now", now=real.wall))


def _now(c: Ctx, now: str | None) -> Any:
    return _parse_now(c.config, now)


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
    """What a sweep would delete and why; deletes nothing."""
    from nvr_guard.engine import preview

    with tempfile.TemporaryDirectory(prefix="nvr-guard-plan-") as tmp:
        outcome = preview(c.config, Path(tmp), _now(c, now), site)
        res = outcome.as_json()
        res["deleted"] = 0
        print_outcome(c, res, "retention plan (nothing is deleted)")


@retention.command("run")
@click.option(
    "--now",
    help="pretend it is this time (ISO 8601); only root, acting locally while no daemon runs",
)
@click.option("--dry-run", is_flag=True, help="plan only, delete nothing")
@pass_ctx
def retention_run(c: Ctx, now: str | None, dry_run: bool) -> None:
    """One sweep now."""
    args = {"now": now, "dry_run": dry_run}

    def local(engine: Any) -> Any:
        return engine.sweep(actor=caller().user, now=_now(c, now), dry_run=dry_run).as_json()

    res = act(c, "retention.run", args, local)
    print_outcome(c, res, "retention run" + (" (dry run)" if dry_run else ""))
    if res.get("trips"):
        sys.exit(3)


@retention.command("confirm")
@click.argument("sweep", type=int)
@pass_ctx
def retention_confirm(c: Ctx, sweep: int) -> None:
    """Release a sweep stopped by the mass-deletion or clock guard (admin)."""
    res = act(
        c, "retention.confirm", {"sweep": sweep}, lambda e: e.confirm(sweep, caller()).as_json()
    )
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
    args = {"site": site, "root": root}
    res = act(c, "retention.confirm_root", args, lambda e: e.confirm_root(caller(), site, root))

    def human() -> None:
        out.print(
            f"root {res['root']} of site {res['site']} confirmed (was {res['was']}); "
            f"{res['forgotten']} catalogued segments no longer there were forgotten",
            markup=False,
        )

    c.emit(res, human)


# ---- holds ----------------------------------------------------------------------------------
@cli.group(cls=Group)
def hold() -> None:
    """Manual legal holds: held footage is never deleted."""


def print_holds(holds: list[dict[str, Any]]) -> None:
    t = table(
        "holds",
        ["id", "kind", "site", "camera", "from", "to", "until", "reason", "owner", "released"],
    )
    for h in holds:
        t.add_row(
            str(h["id"]),
            h["kind"],
            h.get("site") or "*",
            h["camera"] or "*",
            h["from"],
            h["to"],
            h["until"] or "-",
            h["reason"],
            h["owner"],
            h["released"] or "-",
        )
    out.print(t)


def print_holds_not_shown(not_shown: list[dict[str, Any]]) -> None:
    for n in not_shown:
        out.print(
            f"site {n['site']}: footage also held for {n['requests']} request(s) not shown to you",
            markup=False,
        )


@hold.command("add")
@click.option("--camera", required=True, help="camera id, or SITE/CAMERA")
@click.option("--site", help="the camera's site (required when two sites share the camera id)")
@click.option("--from", "start", required=True, help="ISO 8601; no offset = site-local")
@click.option("--to", "end", required=True)
@click.option("--reason", required=True)
@click.option("--until", help="the hold ends by itself then (ISO 8601)")
@pass_ctx
def hold_add(
    c: Ctx, camera: str, site: str | None, start: str, end: str, reason: str, until: str | None
) -> None:
    """Hold a camera's footage in a time range."""
    args = {
        "camera": camera,
        "site": site,
        "from": start,
        "to": end,
        "reason": reason,
        "until": until,
    }
    res = act(
        c,
        "hold.add",
        args,
        lambda e: e.hold_json(
            e.hold_add(caller(), camera, start, end, reason, until, site=site).id
        ),
    )
    c.emit(
        res,
        lambda: out.print(
            f"hold {res['id']} placed on {res['site']}/{res['camera']}: "
            f"{res['from']} .. {res['to']}",
            markup=False,
        ),
    )


@hold.command("list")
@click.option("--all", "include_released", is_flag=True, help="also released holds")
@pass_ctx
def hold_list(c: Ctx, include_released: bool) -> None:
    """Holds in force."""
    res = act(
        c, "hold.list", {"all": include_released}, lambda e: e.holds_view(None, include_released)
    )
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
    res = act(
        c,
        "hold.release",
        {"id": hold_id, "reason": reason},
        lambda e: e.hold_json(e.hold_release(caller(), hold_id, reason).id),
    )
    c.emit(res, lambda: out.print(f"hold {hold_id} released", markup=False))


# ---- audit ---------------------------------------------------------------------------------
@cli.group(cls=Group)
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


def _audit_read(c: Ctx, cmd: str, args: dict[str, Any], local: Callable[[Any], Any]) -> Any:
    """Ask the daemon (it checks the caller's role: auditor, security_lead, admin). Without a
    daemon — nobody holds the state lock — only root reads the database itself."""
    try:
        return daemon_call(c, cmd, args, timeout=600)
    except DaemonUnavailable as e:
        state = Path(c.config.state_dir)
        db = state / "catalog.db"
        if os.getuid() != 0:
            try:
                owner = _who_reads(os.stat(state), 1)
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
            return local(_audit_log(c))
        finally:
            lock.close()


@audit.command("show")
@click.option("--since", help="ISO 8601, or a duration ago (1h)")
@click.option("--request", "request_id", type=int, help="only entries about this request")
@pass_ctx
def audit_show(c: Ctx, since: str | None, request_id: int | None) -> None:
    """Audit entries, oldest first (auditor, security_lead, admin)."""
    from nvr_guard.engine import audit_show_json
    from nvr_guard.times import parse_time

    def local(log_: Any) -> Any:
        t0 = parse_time(since, c.config.tz, "--since") if since else None
        return audit_show_json(log_, c.config.tz, t0, request_id)

    res = _audit_read(c, "audit.show", {"since": since, "request": request_id}, local)
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
    from nvr_guard.engine import audit_verify_json

    data = _audit_read(c, "audit.verify", {}, audit_verify_json)
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


# ---- requests ---------------------------------------------------------------------------------
@cli.group(cls=Group)
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
        ("format", r["format"] + (" (emergency)" if r["emergency"] else "")),
        ("steps", ", ".join(r.get("steps", []))),
        ("still open", ", ".join(r.get("open_steps", [])) or "-"),
        ("decide by", r.get("decide_by") or "-"),
        ("valid until", r.get("valid_until") or "-"),
        ("package", r.get("package") or "-"),
    ):
        t.add_row(k, str(v))
    out.print(t)
    if r["approvals"]:
        a = table("approvals", ["time", "approver", "role", "decision", "note"])
        for x in r["approvals"]:
            a.add_row(x["time"], x["approver"], x["role"], x["decision"], x["note"])
        out.print(a)
    if r.get("violation"):
        out.print(f"[red]violation:[/] {escape(str(r['violation']))}")


@request.command("new")
@click.option("--camera", "cameras", required=True, help="camera id(s), comma-separated")
@click.option("--from", "start", required=True, help="ISO 8601; no offset = site-local")
@click.option("--to", "end", required=True)
@click.option("--reason", required=True, help="purpose of the retrieval")
@click.option("--basis", required=True, help="legal basis")
@click.option("--recipient", required=True, help='"UNIT; PERSON; CONTACT"')
@click.option("--recipient-person", help="recipient person (instead of inside --recipient)")
@click.option("--recipient-contact", help="recipient contact (instead of inside --recipient)")
@click.option(
    "--format", "fmt", type=click.Choice(["mp4", "native"]), default="mp4", show_default=True
)
@click.option("--emergency", is_flag=True, help="emergency export now, approvals within 24 h")
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
    res = daemon_call(c, "request.list", {"state": state})

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
    res = daemon_call(c, "request.show", {"id": rid})
    c.emit(res, lambda: print_request(res))


@request.command("approve")
@click.argument("rid", type=int)
@click.option("--note", default="")
@click.option("--as", "as_step", help="the step to approve as, when you hold several roles")
@pass_ctx
def request_approve(c: Ctx, rid: int, note: str, as_step: str | None) -> None:
    """Approve the next step you hold a role for."""
    res = daemon_call(c, "request.approve", {"id": rid, "note": note, "as_step": as_step})
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


# ---- export ---------------------------------------------------------------------------------
@cli.group(cls=Group)
def export() -> None:
    """Carry out approved exports (technicians)."""


@export.command("run")
@click.argument("rid", type=int)
@click.option(
    "--media", required=True, help="an export target directory (USB media: the media gate)"
)
@pass_ctx
def export_run(c: Ctx, rid: int, media: str) -> None:
    """Write the watermarked, signed export package of an approved request."""
    res = with_progress(
        c,
        lambda: daemon_call(c, "export.run", {"id": rid, "media": media}, timeout=6 * 3600),
        lambda: daemon_call(c, "export.progress", {"id": rid}, timeout=5).get("progress"),
        f"export request {rid}",
    )

    def human() -> None:
        out.print(f"package written: {res['package']}", markup=False)
        for cam, at in (res.get("native_start") or {}).items():
            out.print(
                f"{cam}: the native copy starts at the keyframe {at}, at or before the "
                "requested start (stream copy cannot cut between keyframes)",
                markup=False,
            )

    c.emit(res, human)


@export.command("form")
@click.argument("rid", type=int)
@click.option("-o", "output", type=click.Path(dir_okay=False), help="write the HTML here")
@pass_ctx
def export_form(c: Ctx, rid: int, output: str | None) -> None:
    """Printable approval record (审批表) of a request, as HTML."""
    html = daemon_call(c, "export.form", {"id": rid})["html"]
    if output:
        Path(output).write_text(html, encoding="utf-8")
        c.emit(
            {"id": rid, "form": str(Path(output).resolve())},
            lambda: out.print(f"approval record written to {output}", markup=False),
        )
    else:
        sys.stdout.write(html)


@cli.command("verify")
@click.argument("package_dir", type=click.Path(file_okay=False))
@click.option(
    "--fingerprint",
    "pin",
    metavar="SHA256:...",
    help="the recorder's key fingerprint from the paper approval record or hand-over slip",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False),
    metavar="PEM",
    help="the recorder's public key (PEM), obtained outside the package",
)
@pass_ctx
def verify(c: Ctx, package_dir: str, pin: str | None, key_file: str | None) -> None:
    """Offline check of an export package: hashes and signature (exit 4 when tampered).

    The signer is confirmed only against a fingerprint or key from outside the package: whoever
    carried the package could have re-signed it with a key of their own (exit 4 on a mismatch).
    """
    from nvr_guard.export import verify_package
    from nvr_guard.export.keys import key_file_fingerprint, parse_fingerprint

    # a pin given empty is a mistake (an unset shell variable), never "no pin"
    if pin is not None and key_file is not None:
        raise InvalidInput("give --fingerprint or --key, not both")
    expected = parse_fingerprint(pin) if pin is not None else None
    if key_file is not None:
        if not key_file.strip():
            raise InvalidInput("--key is empty: give the recorder's public key file (PEM)")
        expected = key_file_fingerprint(Path(key_file))
    if not Path(package_dir).is_dir():
        raise InvalidInput(f"{package_dir} is not a directory")
    rep = verify_package(Path(package_dir), expected_fingerprint=expected)
    data = {
        "ok": rep.ok,
        "signer_confirmed": rep.signer_confirmed,
        "package": str(Path(package_dir).resolve()),
        "fingerprint": rep.fingerprint,
        "pinned": expected,
        "problems": [{"kind": p.kind, "message": p.message} for p in rep.problems],
        "checked": list(rep.checked),
    }

    def human() -> None:
        if rep.ok and rep.signer_confirmed:
            out.print(
                f"package OK: {len(rep.checked)} files match, signed by {rep.fingerprint}, "
                "the pinned recorder key",
                markup=False,
            )
        elif rep.ok:
            out.print(
                f"package self-consistent: {len(rep.checked)} files match its manifest",
                markup=False,
            )
            out.print(
                "signature is self-consistent; the signer is NOT confirmed — compare "
                f"{rep.fingerprint} with the fingerprint on the paper record "
                "(or run again with --fingerprint SHA256:... from the paper record)",
                markup=False,
            )
        else:
            err.print(
                f"package FAILED verification: {len(rep.problems)} "
                f"problem{'s' if len(rep.problems) != 1 else ''}",
                markup=False,
            )
        for p in rep.problems:
            err.print(f"{p.kind}: {p.message}", markup=False)

    c.emit(data, human)
    if not rep.ok:
        sys.exit(VerifyFailed.exit_code)


# ---- key ------------------------------------------------------------------------------------
@cli.group(cls=Group)
def key() -> None:
    """The recorder's export-signing key."""


@key.command("show")
@pass_ctx
def key_show(c: Ctx) -> None:
    """The export-signing key's fingerprint, to print on paper and give to recipients.

    Asks the daemon; without one, reads the key file (root or the daemon user) and never
    creates a key.
    """
    from nvr_guard.export.keys import key_file_fingerprint

    try:
        res = daemon_call(c, "key.show", {}, timeout=10)
    except DaemonUnavailable as e:
        path = Path(c.config.signing_key_path())
        if not path.exists() and os.access(path.parent, os.X_OK):
            raise RuntimeFailure(
                f"no export signing key at {path} yet: the daemon creates it when it starts"
            ) from None
        try:
            fp = key_file_fingerprint(path)
        except InvalidInput as e2:
            raise RuntimeFailure(f"{e2} ({e})") from None
        res = {"fingerprint": fp, "path": str(path), "algorithm": "Ed25519"}

    c.emit(
        res,
        lambda: out.print(
            f"{res['fingerprint']}  ({res['algorithm']}, {res['path']})", markup=False
        ),
    )


# ---- media ----------------------------------------------------------------------------------
@cli.group(cls=Group)
def media() -> None:
    """USB media: detection, enrolment, ClamAV scans (the gate in front of every export)."""


def with_progress(
    c: Ctx, work: Callable[[], Any], poll: Callable[[], float | None], what: str
) -> Any:
    """Run ``work`` (a blocking daemon call) with a progress bar fed by ``poll`` on a terminal."""
    import threading

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["ok"] = work()
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    if sys.stderr.isatty() and not c.as_json:
        from rich.progress import BarColumn, Progress, TimeElapsedColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            "[progress.percentage]{task.percentage:>3.0f}%",
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            task = bar.add_task(what, total=1.0)
            while th.is_alive():
                th.join(0.5)
                try:
                    p = poll()
                except NvrGuardError:
                    p = None
                if p is not None:
                    bar.update(task, completed=p)
    th.join()
    if "error" in result:
        raise result["error"]
    return result["ok"]


@media.command("list")
@pass_ctx
def media_list(c: Ctx) -> None:
    """Attached removable media and export target directories, with enrolment and last scan."""
    res = daemon_call(c, "media.list", {})

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


def main() -> None:
    try:
        cli.main(prog_name="nvr-guard", standalone_mode=True)
    except NvrGuardError as e:
        fail(e, 0)
