"""`nvr-guard` command line: a thin client.

Acting commands go through the daemon's control socket so the daemon knows who calls;
`retention plan/run` and `config` work without a daemon. One module per command group
(``*_cmd.py``); what they share is in ``base``; this module builds the ``cli`` group and ``main``.
"""

from __future__ import annotations

import logging
import sys

import click

from nvr_guard import __version__
from nvr_guard.cli import (
    audit_cmd,
    config_cmd,
    export_cmd,
    hold_cmd,
    layout_cmd,
    media_cmd,
    request_cmd,
    retention_cmd,
    status_cmd,
    unit_cmd,
    web_cmd,
    webauth_cmd,
)
from nvr_guard.cli.base import DEFAULT_CONFIG, Ctx, Group, fail
from nvr_guard.errors import NvrGuardError
from nvr_guard.logs import InertFormatter


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        handlers=[handler],
    )


for _command in (
    status_cmd.daemon,
    status_cmd.status,
    status_cmd.reload_config,
    config_cmd.config,
    layout_cmd.layout,
    retention_cmd.retention,
    hold_cmd.hold,
    audit_cmd.audit,
    request_cmd.request,
    export_cmd.export,
    export_cmd.verify,
    export_cmd.key,
    media_cmd.media,
    unit_cmd.unit_paths,
    web_cmd.web,
    webauth_cmd.web_auth,
):
    cli.add_command(_command)


def main() -> None:
    """The ``nvr-guard`` console script."""
    try:
        cli.main(prog_name="nvr-guard", standalone_mode=True)
    except NvrGuardError as e:
        fail(e, 0)
