"""``nvr-guard web``: the approval console (its own process and unit, never in the daemon)."""

from __future__ import annotations

import sys

import click

from nvr_guard.cli.base import Ctx, pass_ctx


@click.command()
@pass_ctx
def web(c: Ctx) -> None:
    """Serve the web console (web: in the config; its own unit, nvr-guard-web.service)."""
    from nvr_guard.web.server import serve

    sys.exit(serve(c.config))
