"""``nvr-guard.1``: the manual page, generated from the click command tree, so that every command,
argument and option it lists is the one the program has (``make install-service`` writes it).

    python -m nvr_guard.cli.manpage > nvr-guard.1
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterator

import click

from nvr_guard import __version__
from nvr_guard.cli import cli as nvr_guard_cli

_EXIT = [
    ("0", "success"),
    ("1", "runtime failure; for status also: the daemon does not answer, or it is not ok"),
    ("2", "invalid input or config (config errors are printed as FILE:LINE: message)"),
    (
        "3",
        "refused by policy: not authorised, not approved, outside hours, media not clean, "
        "guard tripped",
    ),
    ("4", "verification failed: audit chain or export package tampered"),
]


def _esc(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, characters beyond ASCII as
    ``\\[uXXXX]`` (man pages are read in any locale), and no line starting with a control
    character (``.`` or ``'``), which roff would read as a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    out = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)
    return "\n".join(("\\&" + ln if ln.startswith((".", "'")) else ln) for ln in out.splitlines())


def _paragraphs(text: str) -> list[str]:
    """A command's help as roff paragraphs: lines of a paragraph are filled together, as click
    shows them; a paragraph after click's ``\\b`` marker keeps its lines."""
    out: list[str] = []
    for para in text.split("\n\n"):
        lines = [ln.strip() for ln in para.strip("\n").splitlines()]
        if not lines or not any(lines):
            continue
        if out:
            out.append(".PP")
        if lines[0] == "\b":
            out += [".nf", *(_esc(ln) for ln in lines[1:]), ".fi"]
        else:
            out.append(_esc(" ".join(ln for ln in lines if ln)))
    return out


def commands(
    group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command, click.Context]]:
    """Every command under ``group`` (not hidden), depth first, with its full name."""
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        yield (*path, name), cmd, sub
        if isinstance(cmd, click.Group):
            yield from commands(cmd, sub, (*path, name))


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for p in cmd.get_params(ctx):
        record = p.get_help_record(ctx)
        if record is None or "--help" in p.opts:
            continue
        names, help_ = record
        lines += [".TP", f"\\fB{_esc(names)}\\fR", _esc(help_) if help_ else "\\&"]
    return lines


def render(cli: click.Group, today: datetime.date | None = None) -> str:
    """The manual page (man(7) macros) for ``cli``."""
    if today is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
        today = (
            datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date()
            if epoch
            else datetime.date.today()
        )
    ctx = click.Context(cli, info_name="nvr-guard")
    out = [
        f'.TH NVR-GUARD 1 "{today.isoformat()}" "nvr-guard {__version__}" "nvr-guard manual"',
        ".SH NAME",
        "nvr\\-guard \\- " + _esc(cli.get_short_help_str(limit=200).split(": ", 1)[-1].rstrip(".")),
        ".SH SYNOPSIS",
        "\\fBnvr\\-guard\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *_paragraphs(cli.help or ""),
        ".PP",
        "Commands that act for a person go through the daemon's control socket, which learns "
        "who calls from the socket (SO_PEERCRED). Without a daemon only root acts, locally. "
        "Times are ISO 8601 (no offset: site\\-local), or a duration meaning ago or from now "
        "as the option reads (1h, 30d, 6mo), or today, yesterday, tomorrow, now.",
        ".SH GLOBAL OPTIONS",
        *_options(cli, ctx),
        ".SH COMMANDS",
    ]
    for path, cmd, sub in commands(cli, ctx):
        full = " ".join(path)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        out += [
            f".SS {_esc(full)}",
            f"\\fBnvr\\-guard {_esc(full)}\\fR {_esc(usage)}".rstrip(),
            ".PP",
            *_paragraphs(cmd.help or cmd.short_help or ""),
        ]
        opts = _options(cmd, sub)
        if opts and not isinstance(cmd, click.Group):
            out += [".PP", "Options:", ".RS", *opts, ".RE"]
    out += [".SH EXIT STATUS"]
    for code, meaning in _EXIT:
        out += [".TP", f"\\fB{code}\\fR", _esc(meaning)]
    out += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBNVR_GUARD_CONFIG\\fR",
        "the config file when \\-\\-config is not given",
        ".SH FILES",
        ".TP",
        "\\fI/etc/nvr\\-guard/config.yaml\\fR",
        "the config (check it with \\fBnvr\\-guard config check\\fR)",
        ".TP",
        "\\fI/run/nvr\\-guard/control.sock\\fR",
        "the daemon's control socket (config key socket)",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBclamscan\\fR(1), \\fBffmpeg\\fR(1)",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    """Write the manual page to stdout."""
    sys.stdout.write(render(nvr_guard_cli))


if __name__ == "__main__":
    main()
