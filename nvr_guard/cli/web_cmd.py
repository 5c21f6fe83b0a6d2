"""``nvr-guard web``: the approval console (its own process and unit, never in the daemon)."""

from __future__ import annotations

import sys

import click

from nvr_guard.cli.base import Ctx, pass_ctx


@click.command()
@pass_ctx
def web(c: Ctx) -> None:
    """Serve the web console (web: in the config; its own unit, nvr-guard-web.service)."""
    from nvr_guard.config import load_config
    from nvr_guard.web.server import serve

    # the console's account reaches neither the recordings nor the daemon's state: the config
    # is checked as a file, not against this host's paths (the daemon checks those)
    sys.exit(serve(load_config(c.config_path, host=False)))
