"""From a file's bytes to a validated :class:`Config`, or the list of everything to fix.

The steps: ``loader.read_yaml`` (text, YAML, lines), pydantic validation of the models, each
pydantic error turned into one line in the admin's words (:func:`_message`: "unknown key; did you
mean 'keep'?", not pydantic's ``extra_forbidden``) at the line it is about, then the checks that
span fields (``checks.py``). All errors are collected and sorted by line, not just the first: one
``config check`` run lists everything to fix. A config is returned only without errors; warnings
travel with it (the daemon logs them on load).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from nvr_guard.config.checks import cross_checks
from nvr_guard.config.loader import Lines, Problem, describe, dotted, read_yaml
from nvr_guard.config.models import Config, Site
from nvr_guard.config.types import ID_RE, as_zone, retention_duration
from nvr_guard.errors import ConfigError


# ---- mapping pydantic errors back to lines ----------------------------------------------------
def _unwrap(t: Any) -> Any:
    while True:
        origin = typing.get_origin(t)
        if origin is typing.Annotated:
            t = typing.get_args(t)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            t = args[0] if len(args) == 1 else t
            if len(args) != 1:
                return t
        else:
            return t


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping that holds ``loc[-1]`` (for "did you mean")."""
    t: Any = Config
    for el in loc[:-1]:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            f = t.model_fields.get(str(el))
            if f is None:
                return []
            t = f.annotation
        elif typing.get_origin(t) in (dict, list):
            t = typing.get_args(t)[-1]
        else:
            return []
    t = _unwrap(t)
    if not (isinstance(t, type) and issubclass(t, BaseModel)):
        return []
    return [f.alias or name for name, f in t.model_fields.items()]  # as written in the file


_MISSING_HINTS = {
    "roots": "; list the site's recording directories, e.g. roots: [/srv/recordings/gate]",
    "sites": "; add a sites: section with at least one site (see config/example.yaml)",
}


def _message(err: Any) -> tuple[tuple[Any, ...], bool, str]:
    """(path, about_the_key, one-line message) of one pydantic error."""
    loc = tuple(err["loc"])
    kind = err["type"]
    if "[key]" in loc:  # an invalid mapping key (site id, user name): pydantic marks it so
        i = loc.index("[key]")
        path = loc[:i]
        msg = err["msg"].removeprefix("Value error, ")
        return path, True, f"{dotted(path)}: {msg}"
    path = loc
    where = dotted(path)
    if kind == "extra_forbidden":
        known = _known_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return path, True, f"{where}: unknown key; {hint}known keys here: {', '.join(known)}"
    if kind == "missing":
        hint = _MISSING_HINTS.get(str(loc[-1]), "")
        return path, True, f"{where}: required key missing{hint}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return (
            path,
            False,
            f"{where}: expected a mapping (key: value lines), got {describe(err['input'])}",
        )
    if kind in ("list_type", "tuple_type", "set_type"):
        return path, False, f"{where}: expected a list such as [a, b], got {describe(err['input'])}"
    if kind == "string_type":
        return path, False, f"{where}: expected text, got {describe(err['input'])}"
    msg = err["msg"].removeprefix("Value error, ")
    return path, False, f"{where}: {msg}"


# ---- the whole pipeline --------------------------------------------------------------------------
def _check_data(
    raw: Any, lines: Lines, source: str, host: bool = True
) -> tuple[Config | None, list[Problem], list[Problem]]:
    errors: list[Problem] = []
    warnings: list[Problem] = []

    def problem(path: tuple[Any, ...], key: bool, msg: str) -> None:
        errors.append((source, lines.at(path, key), msg))

    def warn(path: tuple[Any, ...], msg: str) -> None:
        warnings.append((source, lines.at(path, True), msg))

    cfg: Config | None = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            path, key, msg = _message(err)
            problem(path, key, msg)

    # Cross-field checks on whatever validated: the whole config, or else each site on its own,
    # so a typo in one section does not hide a root conflict in another.
    if cfg is not None:
        sites = list(cfg.sites.items())
        zone, legal_min = cfg.timezone, cfg.legal_min_keep
    else:
        sites = []
        raw_sites = raw.get("sites") if isinstance(raw, dict) else None
        for name, rs in (raw_sites or {}).items() if isinstance(raw_sites, dict) else ():
            try:
                if ID_RE.fullmatch(name):
                    sites.append((name, Site.model_validate(rs)))
            except ValidationError:
                pass
        zone, legal_min = "UTC", None
        try:
            zone = as_zone(raw.get("timezone", "Asia/Shanghai"))
            lm = raw.get("legal_min_keep")
            legal_min = retention_duration(lm) if lm is not None else None
        except (ValueError, AttributeError):
            pass
    cross_checks(cfg, sites, zone, legal_min, lines, problem, warn, host=host)

    errors.sort(key=lambda p: p[1])
    warnings.sort(key=lambda p: p[1])
    return (cfg if not errors else None), errors, warnings


def parse_config(
    data: bytes, source: str, host: bool = True
) -> tuple[Config | None, list[Problem], list[Problem]]:
    """Validate config bytes; ``source`` names the file in messages. See :func:`check_config`."""
    doc, fatal = read_yaml(data, source)
    if doc is None:
        return None, fatal, []
    cfg, errors, warnings = _check_data(doc.data, Lines(doc.lines), source, host)
    errors = sorted(doc.problems + errors, key=lambda p: p[1])
    if errors:
        return None, errors, warnings
    assert cfg is not None
    cfg._digest = hashlib.sha256(data).hexdigest()
    cfg._warnings = warnings
    cfg._lines = doc.lines
    return cfg, [], warnings


def check_config(
    path: str | os.PathLike[str], host: bool = True
) -> tuple[Config | None, list[Problem], list[Problem]]:
    """(config or None, errors, warnings) for ``nvr-guard config check``; never raises.

    ``host=False`` leaves out what is checked against this host's files (roots, mounts, the
    recorder's database, the signing key, the font, the export group): for a process that
    reads the config without the daemon's access to those (the web console)."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return (
            None,
            [
                (
                    source,
                    0,
                    "no such file; create it (see config/example.yaml) or pass --config PATH",
                )
            ],
            [],
        )
    except IsADirectoryError:
        return None, [(source, 0, "is a directory; pass the config file itself")], []
    except OSError as e:
        return None, [(source, 0, f"cannot read: {e.strerror or e}")], []
    cfg, errors, warnings = parse_config(data, source, host)
    if cfg is not None:
        cfg._source_path = Path(os.path.abspath(path))
    return cfg, errors, warnings


def load_config(path: str | os.PathLike[str], host: bool = True) -> Config:
    """The validated config; raises :class:`ConfigError` with every (file, line, message).
    ``host``: see :func:`check_config`."""
    cfg, errors, _warnings = check_config(path, host)
    if cfg is None:
        raise ConfigError(errors)
    return cfg
