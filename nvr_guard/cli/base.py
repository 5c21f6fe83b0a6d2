"""What every command module of the CLI shares: the context, error handling, the way to the
daemon (and root's local mode beside it), tables and progress bars."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.text import Text

from nvr_guard.errors import ConfigError, DaemonUnavailable, InvalidInput, NvrGuardError

if TYPE_CHECKING:
    from rich.table import Table

    from nvr_guard.identity import Caller

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

    @property
    def config_digest(self) -> str:
        """The SHA-256 of the config file as the daemon computes it (``Config.digest``), without
        validating the file: whether the daemon runs under this very file is all it says. A
        file that cannot be read is left to the full load to report."""
        if self._config is None:
            import hashlib

            try:
                return hashlib.sha256(Path(self.config_path).read_bytes()).hexdigest()
            except OSError:
                pass
        return str(self.config.digest)

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


def who_reads(st: os.stat_result, need: int) -> str:
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
                f"{st.st_mode & 0o777:04o}: only {who_reads(st, 1)} may enter it)"
            )
    try:
        st = os.stat(path)
    except OSError:
        return f"cannot read {path}: permission denied"
    return (
        f"cannot read {path}: permission denied (mode {st.st_mode & 0o777:04o}: readable by "
        f"{who_reads(st, 4)})"
    )


def socket_path(c: Ctx) -> Path:
    """The control socket, read from the config file's top-level ``socket`` key alone (by the
    YAML parser: a quicker look at its lines was found to disagree with it on files the daemon
    accepts, and the CLI then spoke to another daemon).

    Not from the validated config: a call through the daemon needs nothing else from the file,
    and validating it all (the models, the host checks) is most of what a ``status`` from the
    shell would cost. It also keeps the daemon reachable when the file is broken right now: an
    admin who just broke it must still be able to ask the daemon (which kept the old config) how
    it is doing, and `nvr-guard reload` must reach it to have the refusal recorded."""
    if c._config is not None:
        return Path(c._config.socket)
    import re

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
    import yaml

    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        sock = raw.get("socket") if isinstance(raw, dict) else None
    except yaml.YAMLError:
        # a syntax error elsewhere in the file: the top-level line itself may still be fine
        m = re.search(r"""(?m)^socket:[ \t]*["']?(/[^"'\s#]+)""", text)
        sock = m.group(1) if m else None
    if isinstance(sock, str) and sock.startswith("/") and "\0" not in sock:
        return Path(os.path.normpath(sock))
    return Path("/run/nvr-guard/control.sock")


def daemon_call(c: Ctx, cmd: str, args: dict[str, Any], timeout: float = 30.0) -> Any:
    """One command through the daemon's control socket."""
    from nvr_guard.wire import call

    return call(socket_path(c), cmd, args, timeout=timeout)


def act(c: Ctx, cmd: str, args: dict[str, Any], *, fresh: bool = True) -> Any:
    """Run a command through the daemon (it learns who calls from the socket); without a
    daemon only root may act, directly on the state (it could edit the state anyway), through the
    same command handler the daemon would run (``nvr_guard.daemon.commands``). ``fresh``: bring
    the catalog up to date with the disk first (what a sweep or hold judges); a command that
    only reads requests, media or the form does not need it.

    "Without a daemon" means no daemon holds the state lock, not "the daemon did not answer": a
    busy or slow daemon still owns the state, and root acting beside it would bypass its checks
    (a sweep with ``--now``, for one) and race its work."""
    try:
        return daemon_call(c, cmd, args)
    except DaemonUnavailable as e:
        if os.getuid() != 0:
            raise DaemonUnavailable(f"{e}; start the daemon (systemctl start nvr-guard)") from None
        from nvr_guard.daemon.commands import Context, dispatch
        from nvr_guard.engine import Engine, StateLock

        lock = StateLock(c.config.state_dir)
        try:
            if not lock.try_shared():
                raise DaemonUnavailable(
                    f"{e}; a daemon ({lock.holder()}) holds {c.config.state_dir}, so nothing was "
                    "done locally (a request the daemon had not started yet is dropped; one it "
                    "had started completes: check before trying again), see "
                    "`systemctl status nvr-guard`"
                ) from None
            engine = Engine(c.config)
            if fresh:
                engine.reconcile(full=False)
            return dispatch(Context(engine, local=True), caller(), cmd, args)
        finally:
            lock.close()


def caller() -> Caller:
    """Who runs this CLI."""
    from nvr_guard.identity import Caller

    return Caller.local()


def table(title: str | None, columns: list[str]) -> Table:
    """A table whose cells are shown as written: data (paths, reasons, names people typed),
    never read as rich markup — a reason ``[red]x[/red]`` or a camera ``[link=...]`` must not
    change what is shown. (rich's tables are imported here, not by every command.)"""
    from rich.table import Table

    class _PlainTable(Table):
        def add_row(self, *renderables: Any, **kwargs: Any) -> None:
            super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kwargs)

    t = _PlainTable(title=title, title_justify="left", header_style="bold")
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


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
