"""`nvr-guard config check|show`: the configuration, checked without starting anything."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from nvr_guard.cli.base import Ctx, Group, err, out, pass_ctx


@click.group(cls=Group)
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
    site (by name or by one of its roots) under the new config, and an undecided request its
    site."""
    import time

    from nvr_guard.engine import hold_problems, request_problems
    from nvr_guard.store.catalog import read_active_holds
    from nvr_guard.store.requests import read_undecided

    db = Path(cfg.state_dir) / "catalog.db"
    holds = read_active_holds(db, time.time())
    undecided = read_undecided(db)
    return ([] if holds is None else hold_problems(cfg, holds)) + (
        [] if undecided is None else request_problems(cfg, undecided)
    )


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
