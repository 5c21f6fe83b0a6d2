"""The manual page is generated from the click command tree and lists every command (issue 15)."""

from __future__ import annotations

import datetime
import importlib
import re
import subprocess
from pathlib import Path

import click

import nvr_guard.cli
from nvr_guard.cli import COMMANDS, cli
from nvr_guard.cli.manpage import commands, render


def top_level() -> dict[str, click.Command]:
    """The top-level commands as the modules define them: every click command of a
    ``nvr_guard/cli/*_cmd.py`` module that is not a subcommand of a group there."""
    found: dict[str, click.Command] = {}
    subs: set[int] = set()
    for path in sorted(Path(nvr_guard.cli.__file__).parent.glob("*_cmd.py")):
        module = importlib.import_module(f"nvr_guard.cli.{path.stem}")
        for value in vars(module).values():
            if isinstance(value, click.Command) and value.callback.__module__ == module.__name__:
                found[str(value.name)] = value
                if isinstance(value, click.Group):
                    subs.update(id(c) for c in value.commands.values())
    return {name: cmd for name, cmd in found.items() if id(cmd) not in subs}


def test_the_lazy_command_table_names_every_top_level_command() -> None:
    """`nvr-guard` imports a command's module only when it runs: the table it goes by must
    name each command the modules define, under its own name."""
    defined = top_level()
    assert len(defined) >= 16
    assert sorted(COMMANDS) == sorted(defined)
    for name, cmd in defined.items():
        assert cli.get_command(click.Context(cli), name) is cmd
    assert cli.get_command(click.Context(cli), "no-such-command") is None


def every_command() -> list[str]:
    """Every command path of the program, found independently of the generator."""
    found: list[str] = []

    def walk(group: click.Group, path: list[str]) -> None:
        for name, cmd in sorted(group.commands.items() if path else top_level().items()):
            if cmd.hidden:
                continue
            found.append(" ".join([*path, name]))
            if isinstance(cmd, click.Group):
                walk(cmd, [*path, name])

    walk(cli, [])
    return found


def test_the_man_page_lists_every_command_with_its_options() -> None:
    page = render(cli, today=datetime.date(2026, 11, 30))
    assert page.startswith('.TH NVR-GUARD 1 "2026-11-30"')
    headings = [ln[4:].replace("\\-", "-") for ln in page.splitlines() if ln.startswith(".SS ")]
    want = every_command()
    assert len(want) > 30 and "retention plan" in want and "export form" in want
    assert sorted(headings) == sorted(want)
    assert [" ".join(p) for p, _, _ in commands(cli, click.Context(cli))] == headings
    for option in ("\\-\\-list", "\\-\\-since", "\\-\\-fingerprint", "\\-\\-json", "\\-\\-config"):
        assert f"\\fB{option}" in page, option
    for section in ("NAME", "SYNOPSIS", "GLOBAL OPTIONS", "COMMANDS", "EXIT STATUS", "FILES"):
        assert f".SH {section}\n" in page


def test_the_man_page_is_valid_roff_in_any_locale() -> None:
    page = render(cli, today=datetime.date(2026, 11, 30))
    assert page.isascii()  # CJK and dashes as \[uXXXX]: man renders them in any locale
    # groff with every warning on: a stray request, a bad escape or an unknown macro shows here
    r = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww"], input=page, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = re.sub(".\x08", "", r.stdout)  # overstrike bold and underline, as a pager shows them
    for shown in ("nvr-guard - retention and export enforcement", "retention plan", "EXIT STATUS"):
        assert shown in text.replace("\u2010", "-").replace("\u2212", "-"), shown
