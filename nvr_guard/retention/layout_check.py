"""`nvr-guard layout test`: what the scanner would make of a path, and why not when it would not.

An admin writing a ``layout:`` for a new recorder wants to know, before any sweep, whether a
file's camera, recorded start and end come out right. With a preset, the result carries the
preset's explanation; a file the preset names as a sidecar (Viseron's ``init.mp4``, motionEye's
``<movie>.thumb``) is no segment, and the result says which segment(s) it belongs to.
This reads the config only (no daemon, no catalog) and applies the scanner's rules in the
scanner's order: under a site's root, a segment extension, no symlink on the way, then the layout
(or, without one, the first directory level as camera and the file's mtime as start).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from typing import Any

from nvr_guard.config import Config
from nvr_guard.errors import InvalidInput
from nvr_guard.times import iso


@dataclass
class PathResult:
    path: str  # as given
    site: str | None = None
    camera: str | None = None
    start: str | None = None  # ISO 8601 in the site's timezone
    # the end the path carries, else the file's mtime (when the path gave the start and the file
    # exists)
    end: str | None = None
    end_from: str | None = None  # "path" or "mtime" (None: no end)
    reason: str | None = None  # why it does not match; None when it does
    preset: str | None = None  # the site's layout preset, if it names one
    explanation: str | None = None  # the preset's explanation
    sidecar_of: list[str] | None = None  # a sidecar: the segment(s) it belongs to

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "site": self.site,
            "camera": self.camera,
            "start": self.start,
            "end": self.end,
            "end_from": self.end_from,
            "ok": self.ok,
            "reason": self.reason,
            "preset": self.preset,
            "explanation": self.explanation,
            "sidecar_of": self.sidecar_of,
        }


def check_paths(config: Config, paths: list[str], site: str | None = None) -> list[PathResult]:
    if site is not None and site not in config.sites:
        raise InvalidInput(
            f"unknown site {site!r}; sites in {config.source_path}: {', '.join(config.sites)}"
        )
    return [_claimed(config, check_path(config, p, site), site) for p in paths]


def _claimed(config: Config, res: PathResult, site: str | None) -> PathResult:
    """The site whose ``cameras:`` claims the file's camera, when its root is split by cameras
    (shared by sites, or a site listing its cameras): the scanner's assignment."""
    if res.site is None or res.camera is None or res.reason is not None:
        return res
    given = res.path
    if os.path.isabs(given) or site is None:
        path = os.path.normpath(os.path.abspath(given))
    else:
        path = os.path.normpath(os.path.join(config.sites[site].roots[0], given))
    splitting = [
        n
        for n, s in config.sites.items()
        if s.cameras is not None
        and any(path.startswith(os.path.normpath(r).rstrip("/") + "/") for r in s.roots)
    ]
    if not splitting:
        return res
    for n in splitting:
        if any(fnmatch.fnmatchcase(res.camera, p) for p in config.sites[n].cameras or ()):
            res.site = n
            return res
    res.reason = (
        f"camera {res.camera!r} is claimed by no site's cameras: "
        f"({', '.join('sites.' + n for n in splitting)}): never catalogued, never deleted "
        "(attention camera_unclaimed)"
    )
    return res


def _camera_id(raw: str) -> str:
    # as the scanner stores it: undecodable bytes of a directory name written as \xNN
    try:
        raw.encode("utf-8")
        return raw
    except UnicodeEncodeError:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _find_root(config: Config, path: str, site: str | None) -> tuple[str, str] | None:
    """(site, root) whose root holds ``path`` (the deepest root when roots nest)."""
    best: tuple[str, str] | None = None
    for name, s in config.sites.items():
        if site is not None and name != site:
            continue
        for r in s.roots:
            root = os.path.normpath(r)
            if path.startswith(root.rstrip("/") + "/") and (
                best is None or len(root) > len(best[1])
            ):
                best = (name, root)
    return best


def _symlink_on_the_way(root: str, rel: str) -> str | None:
    """The first component below ``root`` that is a symlink (the scanner never follows one)."""
    here = root
    for part in rel.split("/"):
        here = os.path.join(here, part)
        try:
            st = os.lstat(here)
        except OSError:
            return None  # not there (yet): nothing to follow
        if stat.S_ISLNK(st.st_mode):
            return here
    return None


def check_path(config: Config, given: str, site: str | None = None) -> PathResult:
    res = PathResult(given)
    if os.path.isabs(given) or site is None:
        path = os.path.normpath(os.path.abspath(given))
    else:  # with --site, a relative path is read below the site's (first) root
        path = os.path.normpath(os.path.join(config.sites[site].roots[0], given))
    found = _find_root(config, path, site)
    if found is None:
        if site is not None:
            roots = ", ".join(config.sites[site].roots)
            res.reason = f"not under a root of site {site} ({roots})"
        else:
            res.reason = "not under any site's root (sites.*.roots)"
        return res
    res.site, root = found
    rel = path[len(root.rstrip("/")) + 1 :]
    name = rel.rsplit("/", 1)[-1]
    preset = config.preset_for(res.site)
    if preset is not None:
        res.preset, res.explanation = preset.name, preset.explanation
        owner = preset.sidecar_of(name)
        if owner is not None:
            _sidecar(config, res, root, rel, owner)
            return res
    exts = config.extensions_for(res.site)
    dot = name.rfind(".")
    if dot <= 0 or name[dot:].lower() not in exts:
        shown = repr(name[dot:]) if dot > 0 else "none"
        res.reason = (
            f"not a segment file: extension {shown} is not in sites.{res.site}.extensions "
            f"({', '.join(sorted(exts))})"
        )
        return res
    link = _symlink_on_the_way(root, rel)
    if link is not None:
        res.reason = f"{link} is a symlink: never catalogued, never deleted"
        return res
    try:
        st: os.stat_result | None = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        res.reason = "not a regular file"
        return res
    tz = config.site_tz(res.site)
    layout = config.layout_for(res.site)
    if layout is not None:
        layout = layout.for_root(root)
        slash = rel.rfind("/")
        rel_dir = rel[: max(slash, 0)]
        matcher = layout.dir_matcher(rel_dir)
        if matcher is None:
            res.reason = (
                f"directories {rel_dir or '(none)'!r} below {root} do not match layout "
                f"{layout.pattern!r}"
            )
            return res
        got = matcher(name.encode("utf-8", "surrogateescape"))
        if got is None:
            last = layout.pattern.rsplit("/", 1)[-1]
            res.reason = f"file name {name!r} does not match {last!r} of layout {layout.pattern!r}"
            return res
        camera, start, end = got
        res.camera, res.start = _camera_id(camera), iso(start, tz)
        if end is not None:
            res.end, res.end_from = iso(end, tz), "path"
        elif st is not None and st.st_mtime >= start:
            res.end, res.end_from = iso(st.st_mtime, tz), "mtime"  # the recorder last wrote it
        return res
    if "/" not in rel:
        res.reason = (
            f"directly in the root {root}: without a layout the first directory below the root "
            "is the camera"
        )
        return res
    res.camera = _camera_id(rel.split("/", 1)[0])
    if st is None:
        res.reason = (
            f"site {res.site} has no layout, so the recorded start is the file's mtime, and "
            "this file does not exist"
        )
        return res
    res.start = iso(st.st_mtime, tz)
    return res


def _sidecar(config: Config, res: PathResult, root: str, rel: str, owner: str) -> None:
    """Fill ``res`` for a file the site's preset names a sidecar: which segment(s) it belongs
    to (``owner``: the segment's name, "" for every segment beside it)."""
    directory = os.path.join(root, os.path.dirname(rel))
    name = os.path.basename(rel)
    layout = config.layout_for(res.site or "")
    if owner:
        res.sidecar_of = [os.path.join(directory, owner)]
        res.reason = (
            f"a sidecar of segment {res.sidecar_of[0]} (never a segment; the purge removes it "
            "together with that segment)"
        )
        return
    segments: list[str] = []
    if layout is not None:
        matcher = layout.for_root(root).dir_matcher(os.path.dirname(rel))
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            names = []
        exts = config.extensions_for(res.site or "")
        for n in names:
            dot = n.rfind(".")
            if dot <= 0 or n[dot:].lower() not in exts or matcher is None:
                continue
            got = matcher(n.encode("utf-8", "surrogateescape"))
            if got is not None:
                res.camera = _camera_id(got[0])
                segments.append(os.path.join(directory, n))
    res.sidecar_of = segments
    res.reason = (
        f"{name} is a sidecar shared by every segment in {directory} ({len(segments)} now): never "
        "a segment, never deleted while a segment of the camera remains"
    )
