"""The real entry point, `python -m nvr_guard`, as a process: a handful of smoke tests, each
checking that the in-process runner the other tests use (tests/fixtures/cli.py) gives exactly
what the process gives — exit code, stdout, stderr — for human tables, --json, one-line errors,
help text, logging on stderr and a path that is not UTF-8."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fixtures.cli import cli_process, run_cli
from tests.fixtures.site import Site, build_tree, write_segment

Outcome = tuple[int, str, str] | str


def both(argv: list[str], between: Callable[[], None] = lambda: None) -> tuple[Outcome, Outcome]:
    """(process, in-process) outcomes of one command line; ``between`` undoes what the first
    run changed. Output that text mode cannot decode is the same error from both."""

    def outcome(run: Callable[[list[str]], subprocess.CompletedProcess[str]]) -> Outcome:
        try:
            r = run(argv)
        except UnicodeDecodeError as e:
            return f"{type(e).__name__}: {e.reason} at {e.start}"  # the same byte
        return r.returncode, r.stdout, r.stderr

    real = outcome(cli_process)
    between()
    return real, outcome(run_cli)


def test_version_and_help_are_the_same_in_process() -> None:
    real, here = both(["--version"])
    assert real == here and real[0] == 0 and "nvr-guard" in real[1]
    real, here = both(["hold", "--help"])
    assert real == here and real[0] == 0 and "Usage: nvr-guard hold" in real[1]
    real, here = both(["no-such-command"])
    assert real == here and real[0] == 2 and "No such command" in real[2]


def test_a_broken_config_is_the_same_one_line_error_in_process(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("state_dir: /x\nsites:\n  a: {keep: 6m, roots: [/nowhere]}\n")
    real, here = both(["config", "check", str(cfg)])
    assert real == here and real[0] == 2 and real[2].startswith(f"{cfg}:3:")
    real, here = both(["--config", str(tmp_path / "missing.yaml"), "status"])
    assert real == here and real[0] == 2 and real[1] == ""


def test_status_without_a_daemon_is_the_same_in_process(site: Site) -> None:
    real, here = both(["--config", str(site.config), "status"])
    assert real == here and real[0] == 1 and "not running" in real[2]


def test_tables_json_and_warnings_of_a_local_sweep_are_the_same_in_process(
    site: Site, tmp_path: Path
) -> None:
    """Root without a daemon acts locally: the plan (JSON), the mass-deletion guard's warning
    (logging to stderr), exit 3, and the hold list (no terminal: one line per hold)."""
    now = datetime.now(UTC).replace(microsecond=0)
    build_tree(site.root, ["cam1", "cam2"], days=20, per_day=24, now=now)
    fixed = (now - timedelta(minutes=5)).isoformat()
    real, here = both(["--config", str(site.config), "--json", "retention", "plan", "--now", fixed])
    assert real == here and real[0] == 0 and '"items"' in real[1]
    again = lambda: shutil.rmtree(site.state)  # noqa: E731 - the same sweep number
    real, here = both(["--config", str(site.config), "retention", "run"], again)
    assert real == here and real[0] == 3 and "WARNING nvr_guard" in real[2]
    add = ["--config", str(site.config), "hold", "add", "--camera", "cam1", "--from", "2h"]
    reasons = ("a reason long enough to be folded by a table eighty columns wide " * 2, "x")
    for reason in reasons:
        assert run_cli([*add, "--to", "1h", "--reason", reason]).returncode == 0
    real, here = both(["--config", str(site.config), "hold", "list"])
    assert real == here and real[0] == 0
    lines = real[1].splitlines()
    assert all(any(ln.endswith(f"by root: {r.strip()}") for ln in lines) for r in reasons), lines


@pytest.mark.parametrize("name", ["05.07.mp4", "05.07\udcff.mp4"])
def test_layout_test_of_odd_paths_is_the_same_in_process(site: Site, name: str) -> None:
    """Paths are echoed back; a byte that is not UTF-8 (surrogateescape on the way out) cannot be
    decoded from either: the same error, at the same byte."""
    path = os.fsdecode(site.root) + "/gate-03/2026-11-20/14/" + name
    write_segment(site.root, "cam0", datetime(2026, 11, 20, 6, tzinfo=UTC))
    for argv in (["layout", "test", path], ["--json", "layout", "test", path]):
        real, here = both(["--config", str(site.config), *argv])
        assert real == here, (real, here)
        if "\udcff" in name:
            assert str(real).startswith("UnicodeDecodeError: invalid start byte"), real
        else:
            assert real[0] in (0, 2) and "Traceback" not in real[2]
