"""`nvr-guard` command line: a thin client.

Acting commands go through the daemon's control socket so the daemon knows who calls;
`retention plan/run` and `config` work without a daemon. One module per command group
(``*_cmd.py``); what they share is in ``base``; this module builds the ``cli`` group and ``main``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time

import click

from nvr_guard import __version__
from nvr_guard.cli.base import DEFAULT_CONFIG, Ctx, Group, fail
from nvr_guard.errors import NvrGuardError
from nvr_guard.logs import InertFormatter

#: every top-level command: name -> (its module in nvr_guard.cli, the click object there). A
#: module is imported when its command runs (or help lists it), not at every start: a `status`
#: from the shell loads the status module alone.
COMMANDS: dict[str, tuple[str, str]] = {
    "daemon": ("status_cmd", "daemon"),
    "status": ("status_cmd", "status"),
    "reload": ("status_cmd", "reload_config"),
    "config": ("config_cmd", "config"),
    "layout": ("layout_cmd", "layout"),
    "retention": ("retention_cmd", "retention"),
    "hold": ("hold_cmd", "hold"),
    "audit": ("audit_cmd", "audit"),
    "request": ("request_cmd", "request"),
    "export": ("export_cmd", "export"),
    "verify": ("export_cmd", "verify"),
    "key": ("export_cmd", "key"),
    "media": ("media_cmd", "media"),
    "unit-paths": ("unit_cmd", "unit_paths"),
    "web": ("web_cmd", "web"),
    "web-auth": ("webauth_cmd", "web_auth"),
}


class LazyGroup(Group):
    """The top-level group: its commands come from :data:`COMMANDS`, imported when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, sorted (as help shows them)."""
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command named ``cmd_name``, its module imported now; None for an unknown name."""
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        module = importlib.import_module(f"nvr_guard.cli.{where[0]}")
        command = getattr(module, where[1])
        assert isinstance(command, click.Command) and command.name == cmd_name, cmd_name
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        handlers=[handler],
    )


def main() -> None:
    """The ``nvr-guard`` console script. However it ends (done, an error, Ctrl-C, SIGTERM), no
    process it started outlives it: worker processes and the forkserver are ended and waited
    for before it exits (``workers.end_children``). Both are the process's own business: when
    ``main`` is called from another thread (a test running the CLI in its process), neither is
    done."""
    whole_process = threading.current_thread() is threading.main_thread()
    if whole_process:
        signal.signal(signal.SIGTERM, _terminated)  # the daemon installs its own
        # registered before anything imports multiprocessing, so it runs after multiprocessing's
        # own exit handler (last in, first out) has released what the tracker tracks
        atexit.register(_stop_resource_tracker)
    try:
        cli.main(prog_name="nvr-guard", standalone_mode=True)
    except NvrGuardError as e:
        fail(e, 0)
    finally:
        if whole_process and ("multiprocessing" in sys.modules or "subprocess" in sys.modules):
            from nvr_guard.workers import end_children

            end_children(tracker=False)
            _exit_if_stuck(sys.exc_info()[1])


def _exit_if_stuck(exc: BaseException | None, grace: float = 3.0) -> None:
    """The last resort of an interrupted command: a worker pool's reader thread that waits for
    the rest of a result its worker never finished sending (a second Ctrl-C, a SIGTERM while
    its work was being finished) would keep the interpreter from exiting for ever. After a
    grace period such threads are left behind and the process ends here with its exit code."""
    current = threading.current_thread()
    deadline = time.monotonic() + grace
    for t in threading.enumerate():
        if t is current or t.daemon or not t.is_alive():
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            code = exc.code if isinstance(exc, SystemExit) else 1
            _stop_resource_tracker()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)


def _stop_resource_tracker() -> None:
    if "multiprocessing" in sys.modules:
        from nvr_guard.workers import stop_resource_tracker

        stop_resource_tracker()


def _terminated(signum: int, frame: object) -> None:
    sys.exit(128 + signum)
