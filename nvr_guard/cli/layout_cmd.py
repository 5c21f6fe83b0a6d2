"""`nvr-guard layout test`: what the sites' layouts read from recording paths."""

from __future__ import annotations

import sys

import click

from nvr_guard.cli.base import Ctx, Group, out, pass_ctx


@click.group(cls=Group)
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
                text += " (from the name)" if r.end_from == "path" else ""
            elif r.sidecar_of is not None:
                text = f"{r.path}: sidecar: {r.reason}"
            else:
                text = f"{r.path}: no match: {r.reason}"
            out.print(text, markup=False)
        # each preset's explanation once, after the paths
        shown: set[str] = set()
        for r in results:
            if r.preset and r.preset not in shown:
                shown.add(r.preset)
                out.print(f"layout {r.preset} (site {r.site}): {r.explanation}", markup=False)

    c.emit({"ok": all(r.ok for r in results), "paths": [r.as_json() for r in results]}, human)
    if not all(r.ok for r in results):
        sys.exit(2)
