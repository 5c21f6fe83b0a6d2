"""Checks that one field cannot make alone: between fields, and against the host.

Run after the models validated (``validate.py``), on the whole config or, when some section failed,
on every site that passed on its own, so that one ``config check`` lists everything to fix: a typo
in one section must not hide a root conflict in another.

- A site's ceiling below its floor (``keep`` < ``min_keep``), or below the declared legal minimum.
- A camera's own ``keep``/``min_keep`` below the floor of any site it may be at, or its ceiling
  below its floor; a ``retention: none`` site that also states a rule (``profile``, ``keep``).
- Roots that exist, are no symlinks, and share no footage with another site's roots, judged on the
  file system (bind mounts and symlinks count): one site's rule must never reach another's files.
  The one exception is a root shared on purpose: the same path in several sites, each selecting
  its cameras (``cameras:``), the selections provably disjoint, read with the same layout.
- The signing key where only the daemon can replace it; the watermark font able to draw the text;
  approval steps that somebody can fill.
"""

from __future__ import annotations

import fnmatch
import os
import string
from typing import Any
from zoneinfo import ZoneInfo

from nvr_guard.config.loader import Lines, dotted
from nvr_guard.config.models import DEFAULT_EXPORT_GROUP, Config, Recorder, Site, resolve_keep
from nvr_guard.config.profiles import PROFILES
from nvr_guard.mounts import Mount, fs_location, mount_points_below, mounts
from nvr_guard.retention.presets import PRESETS, compile_layout
from nvr_guard.text import Duration, fmt_duration


def cross_checks(
    cfg: Config | None,
    sites: list[tuple[str, Site]],
    zone: str,
    legal_min: Duration | None,
    lines: Lines,
    problem: Any,
    warn: Any,
    host: bool = True,
) -> None:
    """Run every check on ``sites`` (and on ``cfg`` when the whole config validated); report each
    finding through ``problem(path, about_key, msg)`` or ``warn(path, msg)``. ``host=False``:
    only the checks of the file itself, none against this host's files."""
    for name, site in sites:
        _site_checks(name, site, zone, legal_min, problem, warn)
    _camera_claim_checks(sites, lines, problem)
    if cfg is not None:
        _camera_checks(cfg, problem, warn)
        _people_warnings(cfg, warn)
        _web_checks(cfg, problem)
    if not host:
        return
    _root_checks(sites, lines, problem, zone)
    _recorder_checks(cfg, sites, problem, warn)
    if cfg is not None:
        _font_check(cfg, problem)
        _signing_key_checks(cfg, problem)
        _export_group_check(cfg, problem, warn)
        _recipient_checks(cfg, problem, warn)
        for i, t in enumerate(cfg.export.targets):
            if not os.path.isdir(t):
                warn(
                    ("export", "targets", i),
                    f"export.targets[{i}]: {t} is not an existing directory (yet)",
                )


def _site_checks(
    name: str, site: Site, zone: str, legal_min: Duration | None, problem: Any, warn: Any
) -> None:
    base = ("sites", name)
    if site.retention == "none":
        # nothing is deleted there: a ceiling or floor would promise a rule nobody enforces
        for key in ("profile", "keep", "min_keep"):
            if getattr(site, key) is not None:
                problem(
                    base + (key,),
                    True,
                    f"sites.{name}.{key}: contradicts retention: none (nvr-guard deletes nothing "
                    "at this site; the recorder's own retention applies); remove one of the two",
                )
        _layout_checks(name, site, base, zone, problem, warn)
        return
    if site.profile is None and site.keep is None:
        problem(
            base,
            True,
            f"sites.{name}: set profile: ({', '.join(PROFILES)}) or keep: (e.g. 30d); "
            "without either there is no retention rule",
        )
        return
    keep, min_keep = resolve_keep(site)
    if (
        keep is not None
        and min_keep is not None
        and keep.approx_seconds() < min_keep.approx_seconds()
    ):
        # Point at whichever of the two the admin wrote (both, if both: keep is the usual slip).
        key = "keep" if site.keep is not None else "min_keep"

        def origin(k: str, v: Duration) -> str:
            own = getattr(site, k) is not None
            return f"{k} {fmt_duration(v)}" + ("" if own else f" (from profile {site.profile})")

        problem(
            base + (key,),
            False,
            f"sites.{name}.{key}: {origin('keep', keep)} is shorter than "
            f"{origin('min_keep', min_keep)}; "
            "the ceiling must not be below the floor",
        )
    if legal_min is not None and keep is not None:
        where = base + ("keep",) if site.keep is not None else (base + ("profile",))
        if keep.approx_seconds() < legal_min.approx_seconds():
            warn(
                where,
                f"sites.{name}: keep {fmt_duration(keep)} is below the legal minimum "
                f"legal_min_keep {fmt_duration(legal_min)}; "
                "footage would be deleted earlier than the law requires",
            )
        elif min_keep is None or min_keep.approx_seconds() < legal_min.approx_seconds():
            warn(
                base + ("min_keep",) if site.min_keep is not None else base,
                f"sites.{name}: floor min_keep {fmt_duration(min_keep) if min_keep else 'none'} "
                f"is below legal_min_keep {fmt_duration(legal_min)}; "
                "disk pressure could delete younger footage: "
                f"set min_keep: {fmt_duration(legal_min)}",
            )
    _layout_checks(name, site, base, zone, problem, warn)


def _layout_checks(
    name: str, site: Site, base: tuple[str, str], zone: str, problem: Any, warn: Any
) -> None:
    if site.layout is None and site.layout_timezone is not None:
        warn(
            base + ("layout_timezone",),
            f"sites.{name}.layout_timezone: has no effect without layout:",
        )
    if site.layout is not None:
        tz = ZoneInfo(site.layout_timezone or site.timezone or zone)
        try:
            compile_layout(site.layout, tz, site.layout_timezone is not None)
        except ValueError as e:
            problem(base + ("layout",), False, f"sites.{name}.layout: {e}")
        else:
            if any(part.startswith(".") for part in site.layout.split("/")):
                problem(
                    base + ("layout",),
                    False,
                    f"sites.{name}.layout: a path component starts with '.'; hidden files and "
                    "directories are never segments (recorders write their temporaries so)",
                )


MAX_BUSY_TIMEOUT = 10.0  # seconds; the sweep (holding the daemon's lock) waits at most this once


def _recorder_checks(
    cfg: Config | None, sites: list[tuple[str, Site]], problem: Any, warn: Any
) -> None:
    """``recorder:`` blocks: a database that is a file (a missing one only warns: the recorder
    may not have started yet; purges then raise ``recorder_index``), a sane busy timeout,
    ``roots`` only at the top level, and a top-level recorder that serves some site."""
    blocks: list[tuple[tuple[Any, ...], Recorder]] = [
        (("sites", name, "recorder"), site.recorder) for name, site in sites if site.recorder
    ]
    if cfg is not None and cfg.recorder is not None:
        blocks.append((("recorder",), cfg.recorder))
    for base, r in blocks:
        label = dotted(base)
        if len(base) > 1 and r.roots is not None:
            problem(
                base + ("roots",),
                True,
                f"{label}.roots: only the top-level recorder takes roots; a site's recorder "
                "serves that site's roots",
            )
        t = float(r.busy_timeout.seconds)
        if not 0 < t <= MAX_BUSY_TIMEOUT:
            problem(
                base + ("busy_timeout",),
                False,
                f"{label}.busy_timeout: {fmt_duration(r.busy_timeout)} is outside (0, 10s]; "
                "a purge batch waits this long at most for the recorder's write lock",
            )
        if os.path.lexists(r.database) and not os.path.isfile(r.database):
            problem(
                base + ("database",),
                False,
                f"{label}.database: {r.database} is not a regular file (a {r.kind} database is "
                "one SQLite file, e.g. /opt/frigate/config/frigate.db)",
            )
        elif not os.path.exists(r.database):
            warn(
                base + ("database",),
                f"{label}.database: {r.database} does not exist (yet); until it does, purges "
                "delete on time and leave its rows, under attention recorder_index",
            )
    if cfg is not None:
        _recorder_mapping_check(cfg, sites, problem)
    if cfg is not None and cfg.recorder is not None:
        if not any(cfg.recorder_for(name) is cfg.recorder for name in cfg.sites):
            what = (
                "none of its roots is a site's root"
                if cfg.recorder.roots is not None
                else f"no site has layout: {cfg.recorder.kind} (or give it roots:)"
            )
            warn(("recorder",), f"recorder: serves no site: {what}")


def _recorder_mapping_check(cfg: Config, sites: list[tuple[str, Site]], problem: Any) -> None:
    """``recordings:`` maps a root onto the recorder's paths: two different roots mapped onto
    the same paths of one database would have a deletion under one remove the rows of the
    same-named footage kept under the other."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (db file, recordings) -> (site, root)
    for name, site in sites:
        rec = cfg.recorder_for(name)
        if rec is None or rec.recordings is None:
            continue
        where = ("sites", name, "recorder") if site.recorder is rec else ("recorder",)
        try:  # the file itself: a symlink, hard link or bind mount is the same database
            st = os.stat(rec.database)
            ident = f"{st.st_dev}:{st.st_ino}"
        except OSError:
            ident = os.path.realpath(rec.database)
        for root in site.roots:
            key = (ident, rec.recordings.rstrip("/"))
            root_n = os.path.normpath(str(root))
            other = seen.setdefault(key, (name, root_n))
            if other[1] != root_n:
                problem(
                    (*where, "recordings"),
                    False,
                    f"{dotted(where)}.recordings: {rec.recordings} in {rec.database} would stand "
                    f"for both {other[1]} (site {other[0]}) and {root_n} (site {name}); a "
                    "deletion under one would remove the rows of footage kept under the other. "
                    "Give each recorder's site its own recorder: block with its own database",
                )


def _shortest(d: Duration) -> float:
    return d.months * 28 * 86400.0 + d.seconds


def _longest(d: Duration) -> float:
    return d.months * 31 * 86400.0 + d.seconds


def _camera_checks(cfg: Config, problem: Any, warn: Any) -> None:
    """A camera's own ``keep``/``min_keep`` stay within every site's floor.

    Camera ids are not bound to a site in the config (a site's cameras are found in its paths),
    so a camera rule applies at every site that has that camera and is checked against the
    floor of every site nvr-guard enforces retention at: a rule that would be legal at one
    site and break another's floor is refused rather than applied half-way."""
    all_sites = [(n, s, *resolve_keep(s)) for n, s in sorted(cfg.sites.items())]
    all_sites = [x for x in all_sites if x[1].retention != "none"]
    for cid, cam in cfg.cameras.items():
        base = ("cameras", cid)
        # a site whose cameras: does not match the id never has this camera
        sites = [
            x
            for x in all_sites
            if x[1].cameras is None or any(fnmatch.fnmatchcase(cid, p) for p in x[1].cameras)
        ]
        if cam.keep is not None and cam.min_keep is not None:
            if cam.keep.approx_seconds() < cam.min_keep.approx_seconds():
                problem(
                    base + ("keep",),
                    False,
                    f"cameras.{cid}.keep: keep {fmt_duration(cam.keep)} is shorter than "
                    f"min_keep {fmt_duration(cam.min_keep)}; the ceiling must not be below the "
                    "floor",
                )
        for key in ("keep", "min_keep"):
            value: Duration | None = getattr(cam, key)
            if value is None:
                continue
            # by the calendar's shortest month against its longest: 1mo may be 28 days, which
            # is below a 30d floor in February
            below = [
                f"site {n} (min_keep {fmt_duration(floor, 'min')})"
                for n, _s, _keep, floor in sites
                if floor is not None and _shortest(value) < _longest(floor)
            ]
            if below:
                problem(
                    base + (key,),
                    False,
                    f"cameras.{cid}.{key}: {fmt_duration(value, 'min')} is shorter than the "
                    f"floor of {', '.join(below)}; a camera's rule may not go below the floor of "
                    "a site (it applies at every site that has this camera)",
                )
        if cam.min_keep is not None and cam.keep is None:
            above = [
                f"site {n} (keep {fmt_duration(keep)})"
                for n, _s, keep, _floor in sites
                if keep is not None and keep.approx_seconds() < cam.min_keep.approx_seconds()
            ]
            if above:
                problem(
                    base + ("min_keep",),
                    False,
                    f"cameras.{cid}.min_keep: {fmt_duration(cam.min_keep)} is longer than the "
                    f"keep of {', '.join(above)}; the ceiling must not be below the floor: set "
                    f"cameras.{cid}.keep too (at least {fmt_duration(cam.min_keep)})",
                )
        legal = cfg.legal_min_keep
        if (
            cam.keep is not None
            and legal is not None
            and cam.keep.approx_seconds() < legal.approx_seconds()
        ):
            warn(
                base + ("keep",),
                f"cameras.{cid}: keep {fmt_duration(cam.keep)} is below the legal minimum "
                f"legal_min_keep {fmt_duration(legal)}; footage would be deleted earlier than "
                "the law requires",
            )


def _root_checks(
    sites: list[tuple[str, Site]], lines: Lines, problem: Any, zone: str = "UTC"
) -> None:
    """Roots exist, are not symlinks, and no two of them share footage.

    Two roots share footage when one is the other, or lies inside it, *on the file system*: a
    bind mount (``mount --bind /srv/school /srv/highway``) makes a second name for a directory
    that ``realpath`` cannot see through, and a school root (1 y) configured again as a highway
    root (15 d) would lose its footage after 15 days. So identity is (st_dev, st_ino), and
    nesting is judged by where each root lies inside its file system (the mount table's device
    and path). A site with ``cross_mounts: true`` also owns the trees mounted below its roots."""
    table = mounts()
    by_name = dict(sites)
    # (site, index, root, (st_dev, st_ino), regions: [(device, path in fs)])
    seen: list[tuple[str, int, str, tuple[int, int], list[tuple[str, bytes]]]] = []
    entries = [(n, i, r, s.cross_mounts) for n, s in sites for i, r in enumerate(s.roots)]
    # report each conflict at the later line, naming the earlier root
    entries.sort(key=lambda e: lines.at(("sites", e[0], "roots", e[1])))
    for name, i, root, cross in entries:
        path = ("sites", name, "roots", i)
        where = dotted(path)
        if root == "/":
            problem(path, False, f"{where}: the whole file system cannot be a recording root")
            continue
        if os.path.islink(root.rstrip("/") or "/"):
            # the purge opens a root with O_NOFOLLOW (a symlink swapped in must not redirect
            # deletions), so a symlinked root could never be purged; refused here, by name,
            # rather than footage silently kept forever
            problem(
                path,
                False,
                f"{where}: {root} is a symlink (to {os.readlink(root.rstrip('/'))}); "
                f"write the directory itself ({os.path.realpath(root)}): nvr-guard never "
                "follows a symlink to find or delete footage",
            )
        if not os.path.isdir(root):
            what = "is not a directory" if os.path.exists(root) else "does not exist"
            problem(
                path,
                False,
                f"{where}: {root} {what}; "
                "create it or fix the path (roots must be existing directories)",
            )
            continue
        st = os.stat(root)
        ident = (st.st_dev, st.st_ino)
        here = fs_location(root, table)
        regions = [here if here is not None else ("path", os.fsencode(os.path.realpath(root)))]
        if cross:
            regions += [(m.device, m.fs_root) for m in _mounts_below(root, table)]
        for oname, oi, oroot, oident, oregions in seen:
            other = dotted(("sites", oname, "roots", oi))
            split = by_name[name].cameras is not None or by_name[oname].cameras is not None
            if oname != name and root == oroot and split:
                # the same path in two sites: allowed when both select their cameras (the
                # selections are compared in _camera_checks) and read the files alike
                why = _share_problem(name, by_name[name], oname, by_name[oname], zone)
                if why is None:
                    continue
                problem(path, False, f"{where}: {root} is also {other}; {why}")
                break
            if ident == oident:
                problem(
                    path,
                    False,
                    f"{where}: {root} is the same directory as {other} ({oroot}); "
                    "each root belongs to one site, once"
                    + (
                        ""
                        if oname == name
                        else " (sites share a root only by splitting its cameras: the same "
                        "path in each, with disjoint cameras: lists)"
                    ),
                )
                break
            nest = _nesting(regions, oregions)
            if nest:
                inner, outer = (root, oroot) if nest == "inner" else (oroot, root)
                problem(
                    path,
                    False,
                    f"{where}: {root} overlaps {other} ({oroot}): {inner} is inside {outer} "
                    "(on the file system: bind mounts and symlinks count); "
                    "roots must not nest, or one site's rule would delete another's footage",
                )
                break
        seen.append((name, i, root, ident, regions))


def _share_problem(name: str, site: Site, oname: str, osite: Site, zone: str) -> str | None:
    """Why two sites may not share a root (None: they may). Both must select their cameras, and
    read the root alike: one walk catalogues it, and each file goes to the site claiming its
    camera, so a file must mean the same (camera, time) to both."""
    missing = [n for n, s in ((oname, osite), (name, site)) if s.cameras is None]
    if missing:
        return (
            f"a root shared by several sites needs cameras: in each of them (missing in "
            f"sites.{', sites.'.join(missing)}); list each site's cameras there, disjoint, or "
            "give each site its own root"
        )
    mine, theirs = _reading(site, zone), _reading(osite, zone)
    for key in ("layout", "layout_timezone", "extensions", "cross_mounts"):
        a, b = mine[key], theirs[key]
        if a != b:
            return (
                f"sites that share a root must read it alike, but {key} differs "
                f"(sites.{oname}: {b!r}, sites.{name}: {a!r}); set the same {key} in both"
            )
    return None


def _reading(site: Site, zone: str) -> dict[str, Any]:
    """How a site reads its roots, as the scanner will: layout, the zone of its path times,
    extensions (a preset's own unless listed) and whether it crosses mounts."""
    preset = PRESETS.get(site.layout) if site.layout else None
    if site.layout is None:
        tz = None
    elif site.layout_timezone:
        tz = site.layout_timezone
    elif preset is not None and preset.zone == "utc":
        tz = "UTC"
    else:
        tz = site.timezone or zone
    if preset is not None and "extensions" not in site.model_fields_set:
        exts = sorted(e.lower() for e in preset.extensions)
    else:
        exts = sorted(e.lower() for e in site.extensions)
    return {
        "layout": site.layout,
        "layout_timezone": tz,
        "extensions": exts,
        "cross_mounts": site.cross_mounts,
    }


def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def _may_overlap(p: str, q: str) -> bool | None:
    """True when ``p`` and ``q`` match a common camera id for certain, None when they may
    (not shown either way), False when no id can match both.

    Two ids: equal. An id and a glob: the glob matches the id. Two globs: disjoint only when
    the literal text before the first wildcard, or after the last one, differs where both have
    it (``front*`` and ``back*``, ``*-hd`` and ``*-sd``); anything else may overlap."""
    if not _is_glob(p) and not _is_glob(q):
        return p == q
    if not _is_glob(p) or not _is_glob(q):
        lit, pat = (p, q) if not _is_glob(p) else (q, p)
        return fnmatch.fnmatchcase(lit, pat)
    if p == q:
        return True

    def head(s: str) -> str:
        return s[: min(s.find(c) if c in s else len(s) for c in "*?[")]

    def tail(s: str) -> str:
        return s[max(s.rfind(c) for c in "*?[]") + 1 :]

    hp, hq, tp, tq = head(p), head(q), tail(p), tail(q)
    if not (hp.startswith(hq) or hq.startswith(hp)):
        return False
    if not (tp.endswith(tq) or tq.endswith(tp)):
        return False
    return None


def _camera_claim_checks(sites: list[tuple[str, Site]], lines: Lines, problem: Any) -> None:
    """Sites sharing a root claim disjoint camera sets: no id two of them could both claim.

    Compared pattern by pattern, reported at the later line naming the earlier one. A pair of
    globs that cannot be shown disjoint is refused too ("may overlap"): the file of a camera two
    sites claim would be deleted by whichever keep is shorter."""
    sharing: dict[str, list[str]] = {}
    for name, site in sites:
        for r in site.roots:
            sharing.setdefault(r, [])
            if name not in sharing[r]:
                sharing[r].append(name)
    pairs = {
        tuple(sorted((a, b))) for names in sharing.values() for a in names for b in names if a != b
    }
    by_name = dict(sites)
    for a, b in sorted(pairs):
        ca, cb = by_name[a].cameras, by_name[b].cameras
        if ca is None or cb is None:
            continue  # refused by _root_checks
        for j, q in enumerate(cb):
            for i, p in enumerate(ca):
                first, later = ("sites", a, "cameras", i), ("sites", b, "cameras", j)
                if lines.at(first) > lines.at(later):
                    first, later = later, first
                fp, lp = (p, q) if first[1] == a else (q, p)
                got = _may_overlap(lp, fp)
                if got is False:
                    continue
                how = "claims the same cameras as" if got else "may match the same cameras as"
                problem(
                    later,
                    False,
                    f"{dotted(later)}: {lp!r} {how} {dotted(first)} ({fp!r}); sites "
                    f"{a} and {b} share a root, and a camera must belong to one of them "
                    "(its footage would follow the shorter keep); make the lists disjoint "
                    "(literal ids, or globs with different fixed beginnings or endings)",
                )


def _mounts_below(root: str, table: list[Mount]) -> list[Mount]:
    below = mount_points_below(os.fsencode(root), table)
    real = os.fsencode(os.path.realpath(root)).rstrip(b"/")
    spelled = {real + p[len(os.fsencode(root)) :] for p in below}
    return [m for m in table if m.mount_point in spelled]


def _nesting(mine: list[tuple[str, bytes]], theirs: list[tuple[str, bytes]]) -> str:
    """ "inner" when one of ``mine`` lies in one of ``theirs``, "outer" for the reverse, else ""."""

    def under(a: bytes, b: bytes) -> bool:
        return a == b or b == b"/" or a.startswith(b.rstrip(b"/") + b"/")

    for dev, p in mine:
        for odev, op in theirs:
            if dev != odev:
                continue
            if under(p, op):
                return "inner"
            if under(op, p):
                return "outer"
    return ""


DAEMON_USER = "nvr-guard"  # the systemd unit's User= (systemd/nvr-guard.service)


def _daemon_uid(cfg: Config) -> tuple[int, str]:
    """(uid, name) of the user the daemon runs as, as far as a config check can tell: the owner
    of ``state_dir`` (the daemon creates it, systemd's StateDirectory= hands it to User=); before
    it exists, the ``nvr-guard`` system user; without one, whoever runs the check."""
    import pwd

    try:
        uid = os.stat(cfg.state_dir).st_uid
    except OSError:
        try:
            pw = pwd.getpwnam(DAEMON_USER)
            return pw.pw_uid, pw.pw_name
        except KeyError:
            uid = os.geteuid()
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, f"uid {uid}"


def _signing_key_checks(cfg: Config, problem: Any) -> None:
    """A configured ``export.signing_key`` must be the daemon's alone: a file owned by the daemon
    user (0600, not a link) in directories that only it or root can write. Whoever can replace
    the key, or the directory entry that names it, can sign forged packages with the recorder's
    name — or swap in their own key before the fingerprint is put on record."""
    import stat

    path = cfg.export.signing_key
    if not path:
        return
    where = ("export", "signing_key")
    uid, user = _daemon_uid(cfg)
    trusted = {0, uid}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        problem(where, False, f"export.signing_key: cannot inspect {path}: {e.strerror}")
        return
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            problem(where, False, f"export.signing_key: {path} is a symbolic link; name the file")
            return
        if not stat.S_ISREG(st.st_mode):
            problem(where, False, f"export.signing_key: {path} is not a regular file")
            return
        if st.st_uid != uid:
            problem(
                where,
                False,
                f"export.signing_key: {path} is owned by uid {st.st_uid}, not by the daemon "
                f"user {user}; chown {user} {path}",
            )
        if st.st_mode & 0o077:
            problem(
                where,
                False,
                f"export.signing_key: {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"it must be 0600 (chmod 600 {path})",
            )
    d = os.path.dirname(path)
    while True:
        try:
            dst = os.stat(d)
        except FileNotFoundError:
            if os.path.normpath(d) == os.path.normpath(cfg.state_dir):
                d = os.path.dirname(d)  # the daemon creates it (0750) at its first start
                continue
            problem(
                where,
                False,
                f"export.signing_key: directory {d} does not exist; create it owned by {user} "
                "with mode 0700",
            )
            return
        except OSError as e:
            problem(where, False, f"export.signing_key: cannot inspect {d}: {e.strerror}")
            return
        # a sticky world-writable directory (/tmp) lets nobody else rename our entry in it
        others_write = dst.st_mode & 0o022 and not (
            d != os.path.dirname(path) and dst.st_mode & stat.S_ISVTX
        )
        if dst.st_uid not in trusted or others_write:
            who = (
                f"owned by uid {dst.st_uid}"
                if dst.st_uid not in trusted
                else f"writable by group or others (mode {stat.S_IMODE(dst.st_mode):04o})"
            )
            problem(
                where,
                False,
                f"export.signing_key: directory {d} is {who}: someone other than "
                f"{'root' if user == 'root' else user + ' or root'} could replace the key; keep "
                "it in a directory only they can write",
            )
            return
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    # the same for the real path (links resolved) and the links on the way: a link into a
    # directory another user owns lets them swap the key under the running daemon
    from nvr_guard.export.keys import key_location_problem

    why = key_location_problem(path, trusted)
    if why is not None:
        problem(where, False, f"export.signing_key: {why}")


def _export_group_check(cfg: Config, problem: Any, warn: Any) -> None:
    """``export.group`` names a group that exists, with the daemon's user in it.

    A group of the admin's choosing that does not exist is an error (a typo would leave every
    package unreadable to the people who handle it). The default, ``nvr-guard-export``, written
    out or not (``config show`` writes every default), is only looked up at export time:
    systemd-sysusers creates it with the service, and a host without it (a test bench, root
    running the daemon by hand) still exports, the package keeping the daemon's own group.
    """
    import grp
    import pwd

    where = ("export", "group")
    name = cfg.export.group
    try:
        gr = grp.getgrnam(name)
    except KeyError:
        if name != DEFAULT_EXPORT_GROUP:
            problem(
                where,
                False,
                f"export.group: group {name!r} does not exist; create it (groupadd {name}) and "
                "put the technicians and auditors in it, or name an existing group",
            )
        return
    uid, user = _daemon_uid(cfg)
    if uid == 0:
        return
    try:
        pw_gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        return
    if gr.gr_gid != pw_gid and user not in gr.gr_mem:
        warn(
            where,
            f"export.group: the daemon's user {user} is not a member of group {name}, so it "
            f"can give packages that group only on targets that are the group's with the setgid "
            f"bit (chgrp {name} DIR && chmod g+s DIR); add it: usermod -aG {name} {user}",
        )


RECIPIENT_WARN_DAYS = 30  # a recipient certificate ending sooner is warned about


def _recipient_checks(cfg: Config, problem: Any, warn: Any) -> None:
    """``export.recipients``: each names a readable X.509 certificate whose key can receive an
    encrypted package (else an error at its line); one expired or ending within
    RECIPIENT_WARN_DAYS is a warning (exports to that unit are refused until it is renewed).
    ``encrypt: recipient`` as a default needs at least one unit."""
    import time

    from nvr_guard.errors import InvalidInput
    from nvr_guard.export.keys import load_recipient_cert

    now = time.time()
    for unit, path in cfg.export.recipients.items():
        where = ("export", "recipients", unit)
        try:
            cert = load_recipient_cert(path)
        except InvalidInput as e:
            problem(where, False, f"export.recipients.{unit}: {e}")
            continue
        if cert.usable is not None:
            problem(where, False, f"export.recipients.{unit}: {cert.usable}")
            continue
        why = cert.problem(now)
        if why is not None:
            warn(where, f"export.recipients.{unit}: {why}; exports to {unit} are refused")
        elif cert.not_after - now < RECIPIENT_WARN_DAYS * 86400:
            days = int((cert.not_after - now) // 86400)
            warn(where, f"export.recipients.{unit}: the certificate {path} ends in {days} days")
    defaults: list[tuple[tuple[str, ...], str | None]] = [
        (("export", "encrypt"), cfg.export.encrypt)
    ]
    defaults += [
        (("sites", name, "export", "encrypt"), s.export.encrypt)
        for name, s in cfg.sites.items()
        if s.export is not None
    ]
    for key, mode in defaults:
        if mode == "recipient" and not cfg.export.recipients:
            problem(
                key,
                False,
                f"{'.'.join(key)}: recipient needs the units' certificates in "
                "export.recipients (none is configured)",
            )


def _web_checks(cfg: Config, problem: Any) -> None:
    """Plain HTTP only on loopback (behind a reverse proxy); TLS needs both halves."""
    from nvr_guard.config.types import is_loopback, listen_parts

    web = cfg.web
    if web is None:
        return
    if web.gateway_user == web.auth_user:
        problem(
            ("web", "auth_user"),
            False,
            f"web.auth_user: {web.auth_user} is also web.gateway_user; the console (which acts "
            "for people) and the password helper (whose word opens their sessions) must be "
            "different accounts, or a taken-over console could open a session for anyone",
        )
    if (web.tls_cert is None) != (web.tls_key is None):
        problem(
            ("web", "tls_cert" if web.tls_cert is None else "tls_key"),
            False,
            "web: set both tls_cert and tls_key (or neither, for plain HTTP on loopback)",
        )
        return
    host, _ = listen_parts(web.listen)
    if web.tls_cert is None and not is_loopback(host):
        problem(
            ("web", "listen"),
            False,
            f"web.listen: {web.listen} is not a loopback address, so the console needs TLS: set "
            "web.tls_cert and web.tls_key (make install-service makes a self-signed pair), or "
            "listen on 127.0.0.1 behind a TLS reverse proxy",
        )


def _people_warnings(cfg: Config, warn: Any) -> None:
    if not cfg.people.users and not cfg.people.groups:
        return  # no people at all: exports are not set up on this host, nothing half-configured
    held = {r for u in cfg.people.users.values() for r in u.roles}
    held |= {r for g in cfg.people.groups.values() for r in g.roles}
    needed: list[tuple[tuple[Any, ...], list[str]]] = [(("approval", "steps"), cfg.approval.steps)]
    for name, s in cfg.sites.items():
        if s.approval and s.approval.steps:
            needed.append((("sites", name, "approval", "steps"), s.approval.steps))
    for path, steps in needed:
        missing = [r for r in dict.fromkeys(steps) if r not in held]
        if missing:
            warn(
                path,
                f"{dotted(path)}: no user or group has role "
                f"{', '.join(repr(r) for r in missing)}; such requests cannot be approved",
            )


def _font_check(cfg: Config, problem: Any) -> None:
    """export.font must draw the watermark: Chinese coverage and every character the template
    writes (a font without them renders empty boxes in the evidence)."""
    spec = cfg.export.font
    if not spec:
        return  # the first installed font covering Chinese is chosen at export time
    from nvr_guard.errors import NvrGuardError
    from nvr_guard.export import fonts

    try:
        path = fonts.resolve_font(spec)
    except NvrGuardError as e:
        problem(("export", "font"), False, str(e))
        return
    literal = "".join(lit for lit, *_ in string.Formatter().parse(cfg.export.watermark))
    why = fonts.coverage_problem(path, literal)
    if why is not None:
        problem(("export", "font"), False, f"export.font: {why}")
