"""`nvr-guard unit-paths`: the systemd drop-in that makes the config's paths writable.

The unit runs with ProtectSystem=strict: only the paths in ReadWritePaths= are writable for the
daemon. Which paths those must be follows from the config (recording roots, export targets, the
metrics textfile's directory, the directory of a recorder's database (``recorder:``), a state
directory elsewhere than the unit's StateDirectory=, the mount points of USB export media), so the
drop-in is generated from it (``make install-service`` writes it) and never edited by hand. With
USB export media it also lifts PrivateDevices= for removable disks (read-only), which the shipped
unit keeps for sites that export to directories.
Reads only the config: no daemon, no state.
"""

from __future__ import annotations

import posixpath
from typing import Any

import click

from nvr_guard.cli.base import Ctx, out, pass_ctx
from nvr_guard.errors import InvalidInput

# What the shipped unit already makes writable through StateDirectory=/RuntimeDirectory=.
UNIT_STATE_DIR = "/var/lib/nvr-guard"
UNIT_RUNTIME_DIR = "/run/nvr-guard"


def unit_quote(path: str) -> str:
    """One path as a ReadWritePaths= word: '-' (a missing path does not stop the unit),
    specifiers and quotes escaped, double-quoted so spaces survive."""
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"-{escaped}"'


# Trees no config value may open for writing: the system itself (ProtectSystem=strict keeps it
# read-only, and the daemon holds CAP_DAC_OVERRIDE), and the directories above the unit's own.
_SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/root",
)
_KEEP_ABOVE = (UNIT_STATE_DIR, UNIT_RUNTIME_DIR, "/home")


def system_path_problem(path: str) -> str | None:
    """Why ``path`` must not become writable for the daemon, or None."""
    p = posixpath.normpath(path)
    if p == "/":
        return "the whole file system"
    for tree in _SYSTEM_TREES:
        if p == tree or p.startswith(tree + "/"):
            return f"part of the system ({tree})"
    for inner in _KEEP_ABOVE:
        if inner.startswith(p + "/"):
            return f"a directory above {inner}"
    return None


def writable_paths(cfg: Any) -> list[tuple[str, str]]:
    """(path, why) for every path the daemon must write, in config order, without repeats."""
    found: list[tuple[str, str]] = []
    for name, site in cfg.sites.items():
        for root in site.roots:
            found.append((str(root), f"recording root of site {name}"))
    for target in cfg.export.targets:
        found.append((str(target), "export target"))
    for where in cfg.media.mountpoints:
        found.append((str(where), "export media mount point (media.mountpoints)"))
    if cfg.metrics.textfile:
        found.append((posixpath.dirname(str(cfg.metrics.textfile)), "metrics textfile directory"))
    # the recorder's database: SQLite writes its -wal and -shm files beside it
    for name in cfg.sites:
        rec = cfg.recorder_for(name)
        if rec is not None:
            found.append((posixpath.dirname(str(rec.database)), f"{rec.kind} database directory"))
    if posixpath.normpath(str(cfg.state_dir)) != UNIT_STATE_DIR:
        found.append((str(cfg.state_dir), "state_dir (not the unit's StateDirectory=)"))
    sock_dir = posixpath.dirname(str(cfg.socket))
    if posixpath.normpath(sock_dir) != UNIT_RUNTIME_DIR:
        found.append((sock_dir, "control socket directory (not the unit's RuntimeDirectory=)"))
    bad = [(p, why, system_path_problem(p)) for p, why in found if system_path_problem(p)]
    if bad:
        raise InvalidInput(
            "; ".join(f"{p} ({why}) is {problem}" for p, why, problem in bad)
            + ": the unit would make it writable for the daemon; choose a directory of its own"
        )
    seen: set[str] = set()
    unique = []
    for path, why in found:
        if path not in seen:
            seen.add(path)
            unique.append((path, why))
    return unique


def device_access(cfg: Any) -> list[str]:
    """The device settings the unit needs for the config: none unless USB export media are
    used (``media.mountpoints``); then the removable disks' nodes, read-only unless
    ``media.prepare: wipe`` formats them."""
    if not cfg.media.mountpoints:
        return []
    mode = "rw" if cfg.media.prepare == "wipe" else "r"
    return ["PrivateDevices=no", f"DeviceAllow=block-sd {mode}"]


@click.command("unit-paths")
@pass_ctx
def unit_paths(c: Ctx) -> None:
    """Print the systemd drop-in making the config's roots and targets writable."""
    cfg = c.config
    paths = writable_paths(cfg)
    devices = device_access(cfg)
    if c.as_json:
        c.emit(
            {"paths": [{"path": p, "why": why} for p, why in paths], "devices": devices},
            lambda: None,
        )
        return
    lines = [
        f"# Generated by `nvr-guard unit-paths` from {c.config_path}; do not edit.",
        "# Regenerate after changing roots, export targets or metrics.textfile",
        "# (make install-service does), then: systemctl daemon-reload; systemctl restart nvr-guard",
        "[Service]",
    ]
    for path, why in paths:
        lines.append(f"# {why}")
        lines.append(f"ReadWritePaths={unit_quote(path)}")
    if devices:
        lines += [
            "# USB export media (media.mountpoints): `media list/enroll` and the export gate read",
            "# a stick's filesystem UUID from its device node (blkid -p), which PrivateDevices=yes",
            "# hides. DevicePolicy=closed stays: only SCSI/USB disks (block-sd) are opened, for",
            "# reading (read-write only with media.prepare: wipe, whose mkfs writes the device).",
            *devices,
        ]
    out.print("\n".join(lines), markup=False)
