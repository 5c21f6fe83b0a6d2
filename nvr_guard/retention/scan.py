"""Keeping the catalog in step with the recording roots.

Three ways in, from thorough to cheap:

- :meth:`Scanner.reconcile` — a cold walk of every root (``os.scandir`` on bytes paths, never
  following a symlink). Run at start and hourly; it is the ground truth. A million segments take
  a few seconds: the top-level directories are walked in worker processes (the walk is Python
  work between syscalls, one core does not keep up with ``find``), each worker diffs its part
  against the catalog through its own read-only connection and sends back only the changes, and
  this process writes them.
- :meth:`Scanner.incremental` — re-lists only directories whose mtime changed since the last walk
  (creating, deleting or renaming an entry changes the mtime of its directory). Cheap when
  nothing changed: one ``lstat`` per known directory.
- :meth:`Scanner.hint` — one path, after an inotify event (``retention.watch.Watcher``). Hints
  are only hints: a lost event (queue overflow, watch limit) costs latency, never correctness,
  because the rescans still run.

Symlinks are never catalogued, whether they point at a file or a directory, inside or outside the
root (the rule: nothing reached through a symlink is ever deleted, so it must not even be a
candidate). Which files count: the site's extensions (compared lower-case); camera and recorded
start from the site's layout pattern, else camera = first directory level below the root and
start = mtime. Everything else is counted as ``ignored``.

What is not walked, and why nothing of it is silent (each is an attention state, see
:mod:`nvr_guard.attention`):

- Hidden names. A file whose name starts with ``.`` (``.03.00.mp4``, ``.tmp-81.mkv``) is a
  recorder's temporary, never a segment; a hidden directory (``.tmp/``, ``.Trash-0/``,
  ``.snapshots/``) is not entered at all — recorders stage work there, desktops keep trash,
  btrfs keeps read-only snapshots of the whole root. No layout can name a hidden component (the
  config refuses one), so footage the layout matches never lives there.
- Other file systems. Each root is walked on its own file system: a directory below it that is a
  mount point (another disk, a bind mount of a tree from elsewhere — seen in the mount table even
  when ``st_dev`` is the same) is skipped and reported (``mount_skipped``), unless the site sets
  ``cross_mounts: true``.
- Segment files the layout does not match: counted per root with a few example paths
  (``unmatched``), so a wrong layout cannot keep thousands of files forever unseen.
- Unreadable directories (EACCES, EIO, ESTALE ...): skipped, reported (``unreadable``), and
  their catalogued rows kept — not being able to look is not evidence that footage is gone.
- A root that vanished, emptied while its catalog had footage, or now sits on another file
  system than last time (an unmounted disk, another disk in its place): its rows are kept, it is
  not walked, and it is reported (``root_missing``, ``root_emptied``, ``root_device_changed``)
  until it is healthy again or an admin confirms it (:meth:`Scanner.confirm_root`).
  :meth:`Scanner.unhealthy_roots` names those roots so disk pressure can leave them out.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter

from nvr_guard import attention as att
from nvr_guard.attention import Attention
from nvr_guard.model import SiteRules, show_path
from nvr_guard.mounts import dir_identity, mount_points_below, same_directory
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.layout import Layout
from nvr_guard.store.catalog import Catalog
from nvr_guard.store.segments import (
    PackedRows,
    SegmentRow,
    pack_rows,
    prefix_range,
    read_rows_between,
    release_memory,
)
from nvr_guard.workers import gc_paused, worker_context, worker_start

log = logging.getLogger(__name__)

__all__ = ["ReconcileStats", "Scanner", "SiteScan"]

# A directory whose mtime is this recent may still change within the same timestamp tick after
# we listed it (coarse kernel clock); it is stored as "unknown" (-1) so the next incremental
# pass lists it again (git's "racy index" rule).
_RACY_NS = 2_000_000_000
# Below this many catalogued segments a warm reconcile stays in-process (worker start-up costs
# more than it saves).
_POOL_MIN_ROWS = 50_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# example paths kept per root for unmatched files, and unreadable directories reported per root
_EXAMPLES = 3
_UNREADABLE_MAX = 20
# what a freshly made file system holds and still counts as an empty root
_EMPTY_ROOT_NAMES = frozenset({b"lost+found"})
# the attention kinds that take a root out of service (rows kept, not walked, no disk pressure)
_ROOT_KINDS = (att.ROOT_MISSING, att.ROOT_EMPTIED, att.ROOT_DEVICE)


@dataclass(frozen=True)
class SiteScan:
    """What the scanner needs to know about one site (a plain description, built from config)."""

    site: str
    roots: list[bytes]
    layout: Layout | None
    extensions: frozenset[str]  # lower-case, with the dot: {".mp4", ".mkv"}
    rules: SiteRules
    cross_mounts: bool = False  # walk into file systems mounted below the roots
    # ``cameras:``: the ids or globs of the cameras that are this site's; None: every camera
    cameras: tuple[str, ...] | None = None


@dataclass
class ReconcileStats:
    added: int = 0
    removed: int = 0
    updated: int = 0
    files: int = 0  # segment files seen on disk
    ignored: int = 0  # entries that are not segments (wrong place, no match, symlinks, ...)
    unmatched: int = 0  # of the ignored: segment-extension files the layout does not match
    unreadable: int = 0  # directories (or entries) that could not be read; their rows are kept
    unclaimed: int = 0  # of the ignored: segments of cameras no site claims (cameras:)
    dirs: int = 0  # directories listed
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process and the walker processes together

    def __str__(self) -> str:
        """For log lines: ``240 segment files (240 added, 0 updated, 0 removed), 0 ignored,
        305 directories in 0.1 s``; unmatched and unreadable only when there are any."""
        extra = "".join(
            f", {n:,} {what}"
            for n, what in ((self.unmatched, "unmatched"), (self.unreadable, "unreadable"))
            if n
        )
        return (
            f"{self.files:,} segment files ({self.added:,} added, {self.updated:,} updated, "
            f"{self.removed:,} removed), {self.ignored:,} ignored{extra}, {self.dirs:,} "
            f"directories in {self.seconds:.1f} s"
        )

    def add(self, other: ReconcileStats) -> None:
        self.added += other.added
        self.removed += other.removed
        self.updated += other.updated
        self.files += other.files
        self.ignored += other.ignored
        self.unmatched += other.unmatched
        self.unreadable += other.unreadable
        self.unclaimed += other.unclaimed
        self.dirs += other.dirs
        self.cpu_seconds += other.cpu_seconds

    def as_json(self) -> dict[str, float | int]:
        return {
            "added": self.added,
            "removed": self.removed,
            "updated": self.updated,
            "files": self.files,
            "ignored": self.ignored,
            "unmatched": self.unmatched,
            "unreadable": self.unreadable,
            "unclaimed": self.unclaimed,
            "dirs": self.dirs,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


# ---- the walk (runs in worker processes too: module level, picklable inputs) -----------------

# catalogued state of one path, compared with the disk: (site, camera, start, mtime, size, end)
_Known = tuple[str, str, float, float, int, float | None]
# a site's claim on the cameras of a root several sites share: (site, patterns, rules)
_Claim = tuple[str, tuple[str, ...], SiteRules]


@dataclass
class _Classifier:
    site: str
    root: bytes  # without trailing slash
    layout: Layout | None
    exts: frozenset[bytes]
    rules: SiteRules
    calc: ExpiryCalc | None = field(default=None, repr=False)
    # the sites whose ``cameras:`` split this root; None: every camera is ``site``'s
    claims: tuple[_Claim, ...] | None = None
    # camera -> the site claiming it (None: no site), as found so far
    owner_site: dict[str, str | None] = field(default_factory=dict, repr=False)
    _owners: dict[str, _Classifier | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.calc = ExpiryCalc(self.rules)
        self._cut = len(self.root) + 1
        if self.layout is not None:  # a root per camera (motionEye): the camera is its name
            self.layout = self.layout.for_root(self.root)

    def for_camera(self, camera: str) -> _Classifier | None:
        """The classifier of the site that claims ``camera`` (itself when the root is not split
        by cameras); None when no site claims it: such files are not catalogued."""
        if self.claims is None:
            return self
        if camera in self._owners:
            return self._owners[camera]
        own: _Classifier | None = None
        for site, patterns, rules in self.claims:
            if any(fnmatch.fnmatchcase(camera, p) for p in patterns):
                own = _Classifier(site, self.root, self.layout, self.exts, rules)
                break  # the config refuses claims that may overlap
        self._owners[camera] = own
        self.owner_site[camera] = own.site if own is not None else None
        return own

    def expiry(self) -> ExpiryCalc:
        """The expiry rule of the classifier's site."""
        assert self.calc is not None
        return self.calc

    def fast_expiry(self) -> tuple[bool, float, bool]:
        """(fixed, keep seconds, forever): the walk's inlined form of the expiry rule (as
        :func:`_walk` sets it up: cameras with a keep of their own take the calculator's way)."""
        keep = self.rules.keep
        own = bool(self.rules.cameras)
        return (
            keep is not None and keep.months == 0 and not own,
            float(keep.seconds) if keep is not None else 0.0,
            keep is None and not own,
        )

    def is_segment_name(self, name: bytes) -> bool:
        dot = name.rfind(b".")
        # dot > 0: a hidden name (".x.mp4", ".mp4") is a recorder's temporary, never a segment
        return dot > 0 and name[0] != 0x2E and name[dot:].lower() in self.exts

    def classify(self, path: bytes, mtime: float) -> tuple[str, float, float | None] | None:
        """(camera, start, end or None) of a segment file, or None when it does not belong in
        the catalog."""
        rel = path[self._cut :].decode("utf-8", "surrogateescape")
        if self.layout is not None:
            return self.layout.parse(rel)
        slash = rel.find("/")
        if slash <= 0:
            return None  # directly in the root: no camera directory
        return rel[:slash], mtime, None


_path_of = itemgetter(2)


@dataclass
class _Delta:
    rows: list[SegmentRow] = field(default_factory=list)
    packed: PackedRows | None = None  # the rows, as a worker process sends them
    removed: list[bytes] = field(default_factory=list)
    dirs: list[tuple[bytes, int]] = field(default_factory=list)
    stats: ReconcileStats = field(default_factory=ReconcileStats)
    unmatched: list[bytes] = field(default_factory=list)  # examples (stats.unmatched: count)
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)  # (path, why)
    mounts: list[bytes] = field(default_factory=list)  # mount points not entered
    unclaimed: dict[str, int] = field(default_factory=dict)  # camera -> files no site claims


def _camera_id(raw: str) -> str:
    """A camera id that SQLite TEXT (UTF-8) can hold: undecodable bytes of a directory name
    (kept as surrogates by the path decoding) are written as ``\\xNN``."""
    try:
        raw.encode("utf-8")
        return raw
    except UnicodeEncodeError:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _dir_mark(mtime_ns: int, racy_after_ns: int) -> int:
    return -1 if mtime_ns > racy_after_ns else mtime_ns


def _note_file(
    cls: _Classifier,
    path: bytes,
    st: os.stat_result,
    known: dict[bytes, _Known],
    delta: _Delta,
) -> None:
    mtime = st.st_mtime
    got = cls.classify(path, mtime)
    if got is None:
        delta.stats.ignored += 1
        if cls.layout is not None and cls.layout.is_sidecar(path[path.rfind(b"/") + 1 :]):
            return  # a recorder's sidecar (init.mp4): never a segment, never unmatched
        delta.stats.unmatched += 1  # only segment names come here
        if len(delta.unmatched) < _EXAMPLES:
            delta.unmatched.append(path)
        return
    camera, start, end = _camera_id(got[0]), got[1], got[2]
    own = cls.for_camera(camera)
    if own is None:  # a camera no site claims: not catalogued (a row it had is removed)
        delta.stats.ignored += 1
        delta.stats.unclaimed += 1
        delta.unclaimed[camera] = delta.unclaimed.get(camera, 0) + 1
        return
    cls = own
    size = st.st_size
    delta.stats.files += 1
    old = known.pop(path, None)
    if old is None:
        delta.stats.added += 1
    elif old == (cls.site, camera, start, mtime, size, end):
        return
    else:
        delta.stats.updated += 1
    assert cls.calc is not None
    delta.rows.append(
        (cls.site, camera, path, start, mtime, size, cls.calc(start, mtime, camera), end)
    )


def _walk(
    cls: _Classifier,
    top: bytes,
    top_mtime_ns: int,
    known: dict[bytes, _Known],
    delta: _Delta,
    racy_after_ns: int,
    trust_known: bool = True,
    dev: int = -1,
    mounts: frozenset[bytes] = frozenset(),
) -> None:
    """Walk ``top`` (a real directory below the root) and everything below it.

    ``dev`` is the root's ``st_dev`` and ``mounts`` the mount points below the root: a directory
    on another device or in ``mounts`` is not entered (``dev`` -1: the site crosses mounts).

    This loop is the cold reconcile's cost (a million files): the per-file work is inlined and
    the directory part of the relative path is decoded once per directory, not once per file.
    """
    stack = [(top, top_mtime_ns)]
    exts = cls.exts
    site = cls.site
    layout = cls.layout
    calc = cls.calc
    assert calc is not None
    # cameras with a keep of their own take the calculator's way (calc(..., camera))
    own = bool(cls.rules.cameras)
    fixed = cls.rules.keep is not None and cls.rules.keep.months == 0 and not own
    keep_s = float(cls.rules.keep.seconds) if cls.rules.keep is not None else 0.0
    forever = cls.rules.keep is None and not own
    cut = len(cls.root) + 1
    rows = delta.rows
    pop = known.pop
    cameras: dict[str, str] = {}  # raw -> storable camera id (checked once per camera)
    last_raw = last_cam = ""
    exts_exact = tuple(exts)
    # a root split by cameras: each camera's site (and its rules) is looked up when the camera
    # changes; ``owned`` answers the unchanged-file test without parsing the path
    owned = cls.owner_site if cls.claims is not None else None
    who = cls if owned is None else cls.for_camera(last_raw)
    if who is not None and who is not cls:
        site, calc = who.site, who.expiry()
        fixed, keep_s, forever = who.fast_expiry()
    unclaimed = delta.unclaimed
    fenced = dev >= 0
    unmatched_ex = delta.unmatched
    # what could not be read: its catalogued rows stay (exact paths, and subtrees)
    keep_exact: set[bytes] = set()
    keep_under: list[bytes] = []
    files = ignored = unmatched = added = updated = ndirs = nunclaimed = 0
    lstat = os.stat
    while stack:
        d, d_ns = stack.pop()
        try:
            # each entry is stat'ed relative to its directory (fstatat), as find does: through
            # the whole path the kernel looked up every component again, per file, and that
            # was most of a cold walk's time. O_NOFOLLOW: a directory swapped for a link since
            # it was listed is not followed (it is unreadable, its rows are kept)
            dfd = os.open(d, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished meanwhile: its rows stay in ``known`` and are removed
        except OSError as exc:
            # EACCES, EIO, ESTALE, ELOOP ...: unknown content, not an empty one
            delta.unreadable.append((d, exc.strerror or str(exc)))
            keep_under.append(d + b"/")
            continue
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            os.close(dfd)
            continue
        except OSError as exc:
            os.close(dfd)
            delta.unreadable.append((d, exc.strerror or str(exc)))
            keep_under.append(d + b"/")
            continue
        ndirs += 1
        delta.dirs.append((d, _dir_mark(d_ns, racy_after_ns)))
        rel_dir = d[cut:].decode("utf-8", "surrogateescape") if len(d) > cut else ""
        camera_dir = rel_dir.partition("/")[0]
        # the layout's directory part is matched here, once; per file only the name
        match = layout.dir_matcher(rel_dir) if layout is not None else None
        try:
            with it:
                for e in it:
                    try:
                        # files first: a million of them against a few thousand directories
                        if not e.is_file(follow_symlinks=False):
                            if e.is_dir(follow_symlinks=False):
                                if e.name[0] == 0x2E:
                                    ignored += 1  # hidden directory: not entered
                                    continue
                                est = lstat(e.name, dir_fd=dfd, follow_symlinks=False)
                                if fenced and (est.st_dev != dev or e.path in mounts):
                                    delta.mounts.append(e.path)  # another file system
                                    continue
                                stack.append((e.path, est.st_mtime_ns))
                            else:
                                ignored += 1  # symlink, fifo, socket, device
                            continue
                        name = e.name
                        if name[0] == 0x2E:
                            ignored += 1  # hidden: a recorder's temporary, not a segment
                            continue
                        if not name.endswith(exts_exact):  # fast path: as written in the config
                            dot = name.rfind(b".")
                            if dot <= 0 or name[dot:].lower() not in exts:
                                ignored += 1
                                continue
                        path = e.path
                        st = lstat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # gone between listing and stat
                    except OSError as exc:
                        delta.unreadable.append((e.path, exc.strerror or str(exc)))
                        keep_exact.add(e.path)
                        keep_under.append(e.path + b"/")
                        continue
                    mtime = st.st_mtime
                    old = pop(path, None)
                    if (
                        old is not None
                        and trust_known
                        and old[3] == mtime
                        and old[4] == st.st_size
                        and (old[0] == site if owned is None else owned.get(old[1]) == old[0])
                    ):
                        # unchanged file: camera and start are read from the path, which is
                        # the same, with the same layout (trust_known is off after a layout
                        # change)
                        files += 1
                        continue
                    if layout is not None:
                        got = match(name) if match is not None else None
                        if got is None:
                            ignored += 1
                            if old is not None:
                                known[path] = old  # catalogued, no longer a segment: remove it
                            if layout.is_sidecar(name):
                                continue  # a recorder's sidecar: never a segment, not unmatched
                            unmatched += 1
                            if len(unmatched_ex) < _EXAMPLES:
                                unmatched_ex.append(path)
                            continue
                        camera, start, end = got
                    elif camera_dir:
                        camera, start, end = camera_dir, mtime, None
                    else:
                        ignored += 1  # directly in the root: no camera directory
                        unmatched += 1
                        if len(unmatched_ex) < _EXAMPLES:
                            unmatched_ex.append(path)
                        continue
                    if camera == last_raw:
                        camera = last_cam
                    else:
                        last_raw = camera
                        cam = cameras.get(camera)
                        if cam is None:
                            cam = cameras[camera] = _camera_id(camera)
                        camera = last_cam = cam
                        if owned is not None:
                            who = cls.for_camera(cam)
                            if who is not None:
                                site, calc = who.site, who.expiry()
                                fixed, keep_s, forever = who.fast_expiry()
                    if who is None:
                        ignored += 1  # a camera no site claims: not catalogued
                        nunclaimed += 1
                        unclaimed[camera] = unclaimed.get(camera, 0) + 1
                        if old is not None:
                            known[path] = old  # catalogued before, claimed by none now: remove
                        continue
                    size = st.st_size
                    files += 1
                    if old is None:
                        added += 1
                    elif old == (site, camera, start, mtime, size, end):
                        continue
                    else:
                        updated += 1
                    # past the ceiling by both the path time and the mtime (ExpiryCalc's rule)
                    expires: float | None
                    if forever:
                        expires = None
                    elif fixed:
                        expires = (mtime if mtime > start else start) + keep_s
                    else:
                        expires = calc(start, mtime, camera)
                    rows.append((site, camera, path, start, mtime, size, expires, end))
        except OSError as exc:
            # the listing itself failed part way (EIO, ESTALE): what was not seen is kept
            delta.unreadable.append((d, exc.strerror or str(exc)))
            keep_under.append(d + b"/")
        finally:
            os.close(dfd)
    if keep_exact or keep_under:
        _keep_rows(known, keep_exact, keep_under)
    st_ = delta.stats
    st_.files += files
    st_.ignored += ignored
    st_.unmatched += unmatched
    st_.unclaimed += nunclaimed
    st_.added += added
    st_.updated += updated
    st_.dirs += ndirs


def _keep_rows(known: dict[bytes, _Known], exact: set[bytes], under: list[bytes]) -> None:
    """Take rows out of ``known`` (what was not seen, removed afterwards): the rows of paths
    that could not be read are kept in the catalog. One pass, however many were unreadable."""
    prefixes = tuple(under)
    for p in [p for p in known if p in exact or (prefixes and p.startswith(prefixes))]:
        del known[p]


@dataclass(frozen=True)
class _Job:
    db: str | None  # catalog file to diff against (own read-only connection); None: no rows yet
    site: str
    root: bytes
    top: bytes
    top_mtime_ns: int
    layout: Layout | None
    exts: frozenset[bytes]
    rules: SiteRules
    racy_after_ns: int
    trust_known: bool
    dev: int = -1  # the root's st_dev; -1: the site crosses mounts
    mounts: frozenset[bytes] = frozenset()  # mount points below the root, not entered
    claims: tuple[_Claim, ...] | None = None  # the sites splitting the root by cameras


def _run_job(job: _Job) -> _Delta:
    with gc_paused():
        return _walk_job(job)


def _walk_job(job: _Job) -> _Delta:
    cpu0 = time.process_time()
    cls = _Classifier(job.site, job.root, job.layout, job.exts, job.rules, claims=job.claims)
    known: dict[bytes, _Known] = {}
    if job.db is not None:
        known = read_rows_between(job.db, *prefix_range(job.top + b"/"))
    delta = _Delta()
    _walk(
        cls,
        job.top,
        job.top_mtime_ns,
        known,
        delta,
        job.racy_after_ns,
        job.trust_known,
        job.dev,
        job.mounts,
    )
    # in path order: the rows land next to each other in the catalog's path index (fewer
    # pages touched, a denser index); packed here, in parallel, rather than in the writer
    delta.rows.sort(key=_path_of)
    delta.packed = pack_rows(delta.rows)
    delta.rows = []
    delta.removed = list(known)
    delta.stats.removed = len(known)
    delta.stats.unreadable = len(delta.unreadable)
    delta.stats.cpu_seconds = time.process_time() - cpu0
    return delta


def _count_entries(top: bytes, enough: int) -> int:
    """Entries below ``top`` (no stat, no symlinks followed), counting stops at ``enough``."""
    n, stack = 0, [top]
    while stack and n < enough:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    n += 1
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return n


def _gaps(prefix: bytes, children: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Ranges below ``prefix`` (ends in /) not inside any ``prefix + child + /`` subtree."""
    lo, end = prefix_range(prefix)
    out = []
    for c in sorted(prefix + c + b"/" for c in children):
        c_lo, c_hi = prefix_range(c)
        if lo < c_lo:
            out.append((lo, c_lo))
        lo = max(lo, c_hi)
    if lo < end:
        out.append((lo, end))
    return out


# ---- the scanner ----------------------------------------------------------------------------


class Scanner:
    """Reconciles the catalog with the roots of the given sites."""

    def __init__(
        self,
        catalog: Catalog,
        sites: Sequence[SiteScan],
        clock: Callable[[], float] = time.time,
        *,
        workers: int | None = None,
        pool_min_rows: int = _POOL_MIN_ROWS,
        attention: Attention | None = None,
    ) -> None:
        self.catalog = catalog
        self.sites = list(sites)
        # the daemon's clock (injectable); the "racy directory" test below deliberately uses the
        # kernel's real clock instead, because it compares with timestamps the kernel wrote
        self.clock = clock
        # the walk is CPU-bound Python between syscalls: more processes only help up to the cores
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
        # below this many segments per root, worker processes cost more than they save
        self.pool_min_rows = pool_min_rows
        self._by_site = {s.site: s for s in self.sites}
        # root -> the sites listing it, in config order: several when they split it by cameras
        self._sharers: dict[bytes, list[SiteScan]] = {}
        for s in self.sites:
            for r in s.roots:
                sharers = self._sharers.setdefault(_norm(r), [])
                if s not in sharers:
                    sharers.append(s)
        # each root is walked once, as its first site's (its directories, its health and its
        # attention entries are that site's); each file goes to the site claiming its camera
        self._walker = {r: ss[0] for r, ss in self._sharers.items()}
        # longest first: the most specific root wins (config refuses overlaps anyway)
        self._roots = sorted(self._walker.items(), key=lambda rs: len(rs[0]), reverse=True)
        self._classifiers: dict[tuple[str, bytes], _Classifier] = {}
        # one reconcile / incremental / hint at a time; always taken after the catalog's lock
        # (see _exclusive), never before it
        self._lock = threading.Lock()
        # what the admin must see; a private registry when none is shared (tests, tools)
        self.attention = attention if attention is not None else Attention()
        # (site, root) -> (count, example paths) of segment files the layout does not match,
        # as the last full walk of the root found them
        self.unmatched: dict[tuple[str, bytes], tuple[int, list[bytes]]] = {}
        # root -> kind: roots out of service (not walked, rows kept, no disk pressure); taken
        # over from the registry, which outlives a scanner replaced by a config reload
        self._unhealthy: dict[bytes, str] = {}
        self._mounts: dict[bytes, frozenset[bytes]] = {}  # root -> mount points below it
        by_key = {(s.site, os.fsdecode(r)): r for r, s in self._roots}
        mine = (
            att.UNMATCHED,
            att.MOUNT_SKIPPED,
            att.UNREADABLE,
            att.CAMERA_UNCLAIMED,
            *_ROOT_KINDS,
        )
        for e in self.attention.entries():
            s_ = self._by_site.get(e.site or "")
            if e.kind in mine and s_ is not None:
                tops = [os.fsdecode(_norm(r)) for r in s_.roots]
                if not any(e.key == t or e.key.startswith(t + "/") for t in tops):
                    self.attention.clear(e.kind, e.site, e.key)  # a root the config dropped
                    continue
            out = by_key.get((e.site or "", e.key))
            if out is not None and (e.kind in _ROOT_KINDS or e.kind == att.UNREADABLE):
                self._unhealthy[out] = e.kind

    # -- what the engine asks ----------------------------------------------------------------

    def unhealthy_roots(self) -> set[bytes]:
        """Roots (normalised bytes paths, as configured) that are out of service: missing,
        emptied, on another file system than before, or unreadable. Their catalog rows are
        kept but describe no disk that is there now: disk pressure must leave them out."""
        return set(self._unhealthy)

    def unmatched_report(self) -> list[dict[str, object]]:
        """``[{site, root, count, examples}]`` of the roots where the last full walk found
        segment files the site's layout does not match."""
        return [
            {
                "site": site,
                "root": show_path(root),
                "count": n,
                "examples": [show_path(p) for p in ex],
            }
            for (site, root), (n, ex) in sorted(self.unmatched.items())
            if n
        ]

    def unmatched_by_site(self) -> dict[str, int]:
        out = {s.site: 0 for s in self.sites}
        for (site, _root), (n, _ex) in self.unmatched.items():
            if site in out:
                out[site] += n
        return out

    def _classifier(self, s: SiteScan, root: bytes) -> _Classifier:
        key = (s.site, root)
        c = self._classifiers.get(key)
        if c is None:
            c = self._classifiers[key] = _Classifier(
                s.site, root, s.layout, _exts(s), s.rules, claims=self._claims(root)
            )
        return c

    def _claims(self, root: bytes) -> tuple[_Claim, ...] | None:
        """The sites' claims on the cameras of ``root``; None when one site takes them all."""
        sharers = self._sharers.get(root, [])
        if len(sharers) == 1 and sharers[0].cameras is None:
            return None
        # a sharing site without cameras: (the config refuses it) claims nothing
        return tuple((s.site, tuple(s.cameras or ()), s.rules) for s in sharers)

    def _key(self, s: SiteScan) -> str:
        """The site's layout key (see :func:`_layout_key`), and a third line naming the camera
        claims on its roots when it has any: a change (a camera moved to another site by a
        reload) needs a full walk, which gives each row to its site."""
        claims = []
        for r in sorted({_norm(r) for r in s.roots}):
            c = self._claims(r)
            if c is not None:
                claims.append(r.hex() + "=" + ";".join(f"{n}:{','.join(p)}" for n, p, _ in c))
        key = _layout_key(s)
        return key + "\n" + " ".join(claims) if claims else key

    def unwalked_sites(self) -> list[str]:
        """Sites whose catalogued rows were not read the way this config reads them: never
        walked, or their layout, roots or camera claims differ from those of their last walk.
        A plan from the catalog alone would judge them on rows that are wrong or missing."""
        return [s.site for s in self.sites if self.catalog.layout_key(s.site) != self._key(s)]

    def _trusted(self, root: bytes) -> bool:
        """Rows under ``root`` may be taken as read with the current layout: every site listing
        the root was last walked with the layout it has now."""
        for x in self._sharers.get(root, []):
            stored = self.catalog.layout_key(x.site)
            if stored is None or _layout_part(stored) != _layout_part(self._key(x)):
                return False
        return True

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The catalog's lock, then the scanner's own: in that order on every path. The
        sweeper calls in holding the catalog's (the engine's) lock already while the watcher's
        worker calls :meth:`hint` without it; taking the scanner's lock first there, then the
        catalog's for the rows, deadlocked against an incremental pass holding them the other
        way round (every job and every command stuck behind the engine lock)."""
        with self.catalog.lock, self._lock:
            yield

    def reassign(self) -> set[str]:
        """Give the catalogued rows of each root split by cameras to the site that claims their
        camera now (a reload moved a camera to another site); rows of a camera no site claims
        are forgotten (never deleted). Returns the sites whose rows changed: their expiries
        must be computed again. Done at once on a reload, before any sweep, so no sweep judges
        a camera by the rules of the site it left."""
        changed: set[str] = set()
        split = [(root, w) for root, w in self._roots if self._claims(root) is not None]
        if not split:
            return changed
        with self._exclusive():
            pairs = self.catalog.cameras()  # (site, camera): one index walk
            for root, w in split:
                cls = self._classifier(w, root)
                for site, camera in pairs:
                    own = cls.for_camera(camera)
                    to = own.site if own is not None else None
                    if to == site:
                        continue
                    # rows of the pair elsewhere (another root of the site) are not touched
                    n = self.catalog.move_camera_under(root, camera, site, to)
                    if n:
                        log.info(
                            "camera %s under %s: %d rows %s",
                            camera,
                            show_path(root),
                            n,
                            f"moved from site {site} to {to}"
                            if to
                            else f"of site {site} forgotten (no site claims the camera now)",
                        )
                        changed.add(site)
                        if to is not None:
                            changed.add(to)
        return changed

    def _selected(self, site: str | None) -> list[SiteScan]:
        if site is None:
            return self.sites
        if site not in self._by_site:
            raise KeyError(f"unknown site {site!r}")
        return [self._by_site[site]]

    def _racy_after(self) -> int:
        return time.time_ns() - _RACY_NS

    # -- cold reconcile --------------------------------------------------------------------

    def reconcile(self, site: str | None = None) -> ReconcileStats:
        """Walk the roots (of one site or all) and make the catalog match them."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        total = ReconcileStats()
        with self._exclusive(), gc_paused():  # a million rows of tuples: see gc_paused
            if site is None:
                total.removed += self.catalog.remove_sites_except(s.site for s in self.sites)
                self.catalog.forget_root_fs_except(r for r, _ in self._roots)
            done: set[bytes] = set()  # roots walked (a shared root once)
            for s in self._selected(site):
                total.add(self._reconcile_site(s, done))
        release_memory()  # a long-running daemon keeps no heap from the walk
        total.seconds = time.perf_counter() - t0
        total.cpu_seconds += time.process_time() - cpu0
        log.info(
            "reconcile: %d segment files, %d added, %d updated, %d removed, %d ignored in %.1f s",
            total.files,
            total.added,
            total.updated,
            total.removed,
            total.ignored,
            total.seconds,
        )
        return total

    def _reconcile_site(self, s: SiteScan, done: set[bytes] | None = None) -> ReconcileStats:
        total = ReconcileStats()
        key = self._key(s)
        stored = self.catalog.layout_key(s.site)
        if stored is None or _roots_part(stored) != _roots_part(key):
            # roots changed (or first walk): forget what lies under none of them. Skipped
            # otherwise: it reads every row of the site (a second per million)
            total.removed += self.catalog.remove_outside(s.site, [_norm(r) for r in s.roots])
        # stored expiries first (recomputed if the rules changed), then the walk adds to them
        self.catalog.ensure_expiry(s.site, s.rules)
        for root in s.roots:
            r = _norm(root)
            if done is not None:
                if r in done:
                    continue  # a shared root, walked for another site in this pass
                done.add(r)
            # a shared root is walked as its first site's, for all of them
            total.add(self._reconcile_root(self._walker[r], r, self._trusted(r)))
        self.catalog.set_layout_key(s.site, key)
        return total

    def confirm_root(self, site: str, root: bytes | str) -> dict[str, object]:
        """An admin accepts a root out of service as it is now: on another file system (that
        one is recorded as its own), or emptied (the rows of footage no longer there are
        forgotten by a walk that accepts the empty root). A missing root's rows are forgotten;
        the root itself stays reported until it exists again or leaves the config.

        Raises KeyError for an unknown site or a path that is not one of its roots, ValueError
        for a root that needs no confirmation."""
        s = self._by_site.get(site)
        if s is None:
            raise KeyError(f"unknown site {site!r}")
        want = _norm(root)
        if want not in (_norm(r) for r in s.roots):
            raise KeyError(
                f"{show_path(want)} is not a root of site {site}; its roots: "
                f"{', '.join(show_path(_norm(r)) for r in s.roots)}"
            )
        with self._exclusive():
            kind = self._unhealthy.get(want)
            if kind is None:
                raise ValueError(
                    f"root {show_path(want)} of site {site} is in service; nothing to confirm"
                )
            if kind == att.UNREADABLE:
                raise ValueError(
                    f"root {show_path(want)} of site {site} cannot be read; nothing to confirm: "
                    "fix its permissions or the disk, the next walk takes it back"
                )
            rows = self._rows_under(want)
            s = self._walker[want]  # a shared root: its first site walks it
            if kind == att.ROOT_MISSING:
                forgotten = self.catalog.remove_under(want)
                self.unmatched.pop((s.site, want), None)
                return {"site": site, "root": show_path(want), "was": kind, "forgotten": forgotten}
            stats = self._reconcile_root(s, want, trust=True, accept=True)
            return {
                "site": site,
                "root": show_path(want),
                "was": kind,
                "forgotten": stats.removed,
                "catalogued_before": rows,
                "found": stats.files,
            }

    # -- the health of a root --------------------------------------------------------------

    def _root_out(self, s: SiteScan, root: bytes, kind: str, message: str) -> None:
        """Take ``root`` out of service: its rows stay, it is not walked, the admin is told."""
        key = os.fsdecode(root)
        for k in (*_ROOT_KINDS, att.UNREADABLE):
            if k != kind:
                self.attention.clear(k, s.site, key)
        self.attention.raise_(kind, s.site, key, message, {"root": show_path(root)})
        self._unhealthy[root] = kind

    def _root_back(self, s: SiteScan, root: bytes) -> None:
        key = os.fsdecode(root)
        if self._unhealthy.pop(root, None) is not None or any(
            e.site == s.site and e.key == key for e in self.attention.entries()
        ):
            for k in (*_ROOT_KINDS, att.UNREADABLE):
                self.attention.clear(k, s.site, key)

    def _root_health(
        self, s: SiteScan, root: bytes, accept: bool = False
    ) -> tuple[os.stat_result, list[os.DirEntry[bytes]]] | None:
        """The root's stat and entries when it is fit to walk; None (and an attention entry)
        when it is missing, unreadable, on another file system than before, or emptied while
        the catalog holds footage of it. ``accept``: an admin confirmed the root as it is now."""
        shown = show_path(root)

        def rows() -> str:  # counted only when something is wrong (a million rows: a while)
            return f"; its {self._rows_under(root)} catalogued segments are kept"

        try:
            root_st = os.lstat(root)
        except (FileNotFoundError, NotADirectoryError):
            self._root_out(
                s,
                root,
                att.ROOT_MISSING,
                f"root {shown} of site {s.site} does not exist (a disk not mounted?)"
                f"{rows()}; mount it, or confirm with "
                f"`nvr-guard retention confirm-root {s.site} {shown}`",
            )
            return None
        except OSError as exc:
            self._root_out(
                s, root, att.UNREADABLE, f"cannot read root {shown}: {exc.strerror}{rows()}"
            )
            return None
        if not stat.S_ISDIR(root_st.st_mode):
            # purge opens roots with O_NOFOLLOW and would refuse every file: cataloguing them
            # would only produce a plan that cannot be carried out
            what = "a symlink" if stat.S_ISLNK(root_st.st_mode) else "not a directory"
            self._root_out(
                s,
                root,
                att.ROOT_MISSING,
                f"root {shown} of site {s.site} is now {what}{rows()}; "
                "configure the real directory",
            )
            return None
        try:
            fs = dir_identity(root, root_st)
            entries = list(os.scandir(root))
        except OSError as exc:
            self._root_out(
                s, root, att.UNREADABLE, f"cannot read root {shown}: {exc.strerror}{rows()}"
            )
            return None
        before = self.catalog.root_fs(root)
        if accept or before is None:
            if before != fs:
                self.catalog.set_root_fs(root, s.site, fs)
        elif not same_directory(before, fs):
            if before.partition(" ino:")[0] != fs.partition(" ino:")[0]:
                what = (
                    f"is on another file system than at the last walk ({before} -> {fs}: "
                    "a disk not mounted, or another one in its place)"
                )
            else:
                # the same file system, another directory: a bind mount of another directory
                # (perhaps another site's root) over it, or the directory replaced
                what = (
                    f"is another directory than at the last walk ({before} -> {fs}: "
                    "a bind mount or another directory mounted over it?)"
                )
            self._root_out(
                s,
                root,
                att.ROOT_DEVICE,
                f"root {shown} of site {s.site} {what}{rows()}; "
                "mount the right one, or confirm the new one with "
                f"`nvr-guard retention confirm-root {s.site} {shown}`",
            )
            return None
        elif before != fs:
            # recorded by an older version (file system only): completed, nothing to report
            self.catalog.set_root_fs(root, s.site, fs)
        if not accept and not any(
            e.name[0] != 0x2E and e.name not in _EMPTY_ROOT_NAMES for e in entries
        ):
            n = self._rows_under(root) if self._any_under(root) else 0
            if n:
                self._root_out(
                    s,
                    root,
                    att.ROOT_EMPTIED,
                    f"root {shown} of site {s.site} is empty but the catalog holds {n} segments "
                    "of it (a disk not mounted, the footage moved?); they are kept; if the "
                    f"footage is really gone, confirm with "
                    f"`nvr-guard retention confirm-root {s.site} {shown}`",
                )
                return None
        self._root_back(s, root)
        return root_st, entries

    def _rows_under(self, root: bytes) -> int:
        return self.catalog.count_between(*prefix_range(root + b"/"))

    def _fence(
        self, s: SiteScan, root: bytes, root_st: os.stat_result
    ) -> tuple[int, frozenset[bytes]]:
        """(st_dev, mount points below) the walk of ``root`` stays within; (-1, {}) when the
        site crosses mounts. The mount table is read once per full walk of the root."""
        if s.cross_mounts:
            return -1, frozenset()
        mounts = frozenset(mount_points_below(root))
        self._mounts[root] = mounts
        return root_st.st_dev, mounts

    def _report(
        self,
        s: SiteScan,
        root: bytes,
        unmatched: tuple[int, list[bytes]] | None,
        unreadable: list[tuple[bytes, str]],
        mounts: list[bytes] | None,
        scope: bytes | None = None,
    ) -> None:
        """Make the attention entries of one walk the standing ones: of the whole root (a full
        walk: ``scope`` None), or of what lies below ``scope`` (an incremental re-listing)."""
        key = os.fsdecode(root)
        shown = show_path(root)
        if unmatched is not None:
            n, ex = unmatched
            self.unmatched[(s.site, root)] = (n, ex[:_EXAMPLES])
            how = f"layout {s.layout.pattern!r}" if s.layout is not None else "no layout"
            self.attention.replace(
                att.UNMATCHED,
                s.site,
                [
                    (
                        key,
                        f"{n} files with a segment extension under {shown} do not match the "
                        f"site's {how} and are never deleted, e.g. "
                        f"{', '.join(show_path(p) for p in ex[:_EXAMPLES])}; fix layout: "
                        "(check it with `nvr-guard layout test`) or move the files",
                        {"root": shown, "count": n, "examples": [show_path(p) for p in ex]},
                    )
                ]
                if n
                else [],
                keys_in_scope=lambda k: k == key,
            )
        if mounts is not None:
            self.attention.replace(
                att.MOUNT_SKIPPED,
                s.site,
                [
                    (
                        key,
                        f"{len(mounts)} mount points under {shown} are other file systems and "
                        f"were not walked (cross_mounts is off): "
                        f"{', '.join(show_path(m) for m in sorted(mounts)[:_UNREADABLE_MAX])}; "
                        "nothing there is deleted. Mount the footage as a root of its own, or "
                        "set cross_mounts: true for the site",
                        {"root": shown, "mounts": [show_path(m) for m in sorted(mounts)]},
                    )
                ]
                if mounts
                else [],
                keys_in_scope=lambda k: k == key,
            )
        under = os.fsdecode((scope if scope is not None else root) + b"/")
        top = os.fsdecode(scope if scope is not None else root)
        bad = sorted(set(unreadable))
        entries: list[tuple[str, str, dict[str, object] | None]] = [
            (
                os.fsdecode(p),
                f"cannot read {show_path(p)} ({why}); it is skipped and its catalogued "
                "segments are kept; fix its permissions or the disk",
                {"root": shown, "path": show_path(p), "error": why},
            )
            for p, why in bad[:_UNREADABLE_MAX]
        ]
        if len(bad) > _UNREADABLE_MAX:
            more: dict[str, object] = {"root": shown, "count": len(bad) - _UNREADABLE_MAX}
            entries.append(
                (
                    key + "/…",
                    f"and {len(bad) - _UNREADABLE_MAX} more unreadable paths under {shown}",
                    more,
                )
            )
        if scope is None:
            self.attention.replace(
                att.UNREADABLE,
                s.site,
                entries,
                keys_in_scope=lambda k: k != key and (k.startswith(under) or k == key + "/…"),
            )
        else:
            self.attention.replace(
                att.UNREADABLE,
                s.site,
                entries,
                keys_in_scope=lambda k: k == top or k.startswith(under),
            )

    def _report_unclaimed(
        self, s: SiteScan, root: bytes, counts: dict[str, int], full: bool
    ) -> None:
        """Attention for the cameras under ``root`` that no site claims (``camera_unclaimed``,
        one entry per camera, as the walking site's). A full walk states them all (entries of
        cameras now claimed, or gone, are cleared); a partial pass (incremental, hint) only
        adds cameras not reported yet: it has not seen the whole root."""
        key = os.fsdecode(root)
        shown = show_path(root)
        sites = [x.site for x in self._sharers.get(root, [s])]
        if len(sites) > 1:
            why = f"sites {', '.join(sites)} share this root and none of their cameras: claims it"
        else:
            why = f"site {sites[0]} lists cameras: and none of them matches it"
        standing = {e.key for e in self.attention.entries(att.CAMERA_UNCLAIMED) if e.site == s.site}
        entries = []
        for cam, n in sorted(counts.items()):
            ek = f"{key}/{cam}"
            if not full and ek in standing:
                continue
            entries.append(
                (
                    ek,
                    f"{n}{'' if full else '+'} segment files of camera {cam} under {shown} "
                    f"belong to no site: {why}; they are neither catalogued nor deleted. Add "
                    f"{cam!r} (or a glob matching it) to the cameras: of the site it belongs to "
                    f"(sites.<name>.cameras) and reload",
                    {"root": shown, "camera": cam, "count": n, "sites": sites},
                )
            )
        if not full:
            for ek, msg, det in entries:
                self.attention.raise_(att.CAMERA_UNCLAIMED, s.site, ek, msg, det)
            return
        self.attention.replace(
            att.CAMERA_UNCLAIMED,
            s.site,
            entries,
            keys_in_scope=lambda k: k.startswith(key + "/"),
        )
        for other in sites:
            if other != s.site:  # reported as another sharer's before a reload
                self.attention.replace(
                    att.CAMERA_UNCLAIMED, other, [], keys_in_scope=lambda k: k.startswith(key + "/")
                )

    # -- cold reconcile of one root --------------------------------------------------------

    def _reconcile_root(
        self, s: SiteScan, root: bytes, trust: bool = True, accept: bool = False
    ) -> ReconcileStats:
        stats = ReconcileStats()
        cls = self._classifier(s, root)
        racy = self._racy_after()
        health = self._root_health(s, root, accept)
        if health is None:
            return stats  # rows kept; the attention entry says why
        root_st, entries = health
        dev, mounts = self._fence(s, root, root_st)
        stats.dirs += 1
        tops: list[tuple[bytes, int]] = []
        root_files: list[tuple[bytes, os.stat_result]] = []
        head = _Delta()
        keep_exact: set[bytes] = set()
        keep_under: list[bytes] = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if e.name[0] == 0x2E:
                        stats.ignored += 1  # hidden directory: not entered
                        continue
                    est = e.stat(follow_symlinks=False)
                    if dev >= 0 and (est.st_dev != dev or e.path in mounts):
                        head.mounts.append(e.path)
                        continue
                    tops.append((e.path, est.st_mtime_ns))
                elif e.is_file(follow_symlinks=False) and cls.is_segment_name(e.name):
                    root_files.append((e.path, e.stat(follow_symlinks=False)))
                else:
                    stats.ignored += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                head.unreadable.append((e.path, exc.strerror or str(exc)))
                keep_exact.add(e.path)
                keep_under.append(e.path + b"/")
        prefix = root + b"/"
        names = [t[len(prefix) :] for t, _ in tops]
        existing = self.catalog.count_upto(s.site, 1) > 0 or self._any_under(root)
        # rows outside every top-level directory: files directly in the root, and subtrees of
        # top-level directories that are gone (or became symlinks) — compared or removed here
        known: dict[bytes, _Known] = {}
        if existing:
            with self.catalog.lock:
                for lo, hi in _gaps(prefix, names):
                    known.update(self.catalog.rows_between(lo, hi))
            if keep_exact:
                _keep_rows(known, keep_exact, keep_under)
        head.dirs.append((root, _dir_mark(root_st.st_mtime_ns, racy)))
        for path, st in root_files:
            _note_file(cls, path, st, known, head)
        head.removed = list(known)
        head.stats.removed = len(known)
        head.stats.unreadable = len(head.unreadable)
        found = _Delta()  # what the walk reports: unmatched, unreadable, mount points

        jobs = [
            _Job(
                str(self.catalog.path) if existing else None,
                s.site,
                root,
                top,
                ns,
                s.layout,
                cls.exts,
                s.rules,
                racy,
                trust,
                dev,
                mounts,
                cls.claims,
            )
            for top, ns in tops
        ]
        use_pool = self.workers > 1 and len(jobs) > 1
        all_dirs: list[tuple[bytes, int]] = []

        t_apply = 0.0
        t_start = time.perf_counter()

        def apply(delta: _Delta) -> None:
            nonlocal t_apply
            t = time.perf_counter()
            # into an empty table (cold start) under our write lock every path is new
            rows = delta.packed if delta.packed is not None else delta.rows
            self.catalog.apply_rows(rows, delta.removed, fresh=not existing)
            t_apply += time.perf_counter() - t
            all_dirs.extend(delta.dirs)
            stats.add(delta.stats)
            found.stats.unmatched += delta.stats.unmatched
            found.unmatched.extend(delta.unmatched[: _EXAMPLES - len(found.unmatched)])
            found.unreadable.extend(delta.unreadable)
            found.mounts.extend(delta.mounts)
            for cam, n in delta.unclaimed.items():
                found.unclaimed[cam] = found.unclaimed.get(cam, 0) + n

        with self.catalog.bulk_load() if not existing else _nullctx():
            apply(head)
            pending = list(jobs)
            if use_pool and existing:
                limit = self.pool_min_rows
                use_pool = self.catalog.count_upto(s.site, limit) >= limit
            elif use_pool:
                # nothing catalogued yet: count the entries (no stat) of one top-level directory
                # and extrapolate; a small tree is walked before worker processes could start
                need = -(-self.pool_min_rows // len(pending))  # per directory, rounded up
                use_pool = _count_entries(pending[0].top, need) >= need
            if use_pool and len(pending) > 1:
                try:
                    self._run_pool(pending, apply)
                except (OSError, concurrent.futures.process.BrokenProcessPool) as exc:
                    # no worker processes (sandbox limits, a main module that cannot be
                    # re-imported): slower, but the walk must still happen
                    log.warning(
                        "reconcile: worker processes failed (%s); walking %d directories here",
                        exc,
                        len(pending),
                    )
            for j in pending:
                d = _run_job(j)
                d.stats.cpu_seconds = 0.0  # already in this process's own figure
                apply(d)
            # directories last: if we die before this, the next incremental pass re-lists
            self.catalog.remove_dirs_below(root)
            self.catalog.set_dirs(s.site, all_dirs)
            t_walked = time.perf_counter()
        self._report(
            s, root, (found.stats.unmatched, found.unmatched), found.unreadable, found.mounts
        )
        self._report_unclaimed(s, root, found.unclaimed, full=True)
        log.debug(
            "site %s root %r: walk %.2f s (writing %.2f s of it), commit/index %.2f s, pool %s",
            s.site,
            root,
            t_walked - t_start,
            t_apply,
            time.perf_counter() - t_walked,
            use_pool,
        )
        return stats

    def _run_pool(self, pending: list[_Job], apply: Callable[[_Delta], None]) -> None:
        """Run ``pending`` in worker processes; each job applied is removed from the list.

        Interrupted (Ctrl-C, SIGTERM, an error applying a result), the jobs not started are
        dropped and the ones running are finished, then the workers end: a walk is only reading,
        and no worker is stopped half way through handing its result over."""
        workers = min(self.workers, len(pending))
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=worker_context(),
            initializer=worker_start,
            initargs=(os.getpid(),),
        )
        try:
            # one result ahead of the workers: results the writer has not taken yet are
            # held in this process (a camera's directory is ~15 MB of rows), and with every job
            # queued at once a million-segment walk piled them all up (400 MB) behind it
            ahead = workers + 1
            queue = list(pending)
            running: dict[concurrent.futures.Future[_Delta], _Job] = {}
            while queue or running:
                while queue and len(running) < ahead:
                    job = queue.pop(0)
                    running[pool.submit(_run_job, job)] = job
                done, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for fut in done:
                    job = running.pop(fut)
                    apply(fut.result())
                    pending.remove(job)
        except BaseException:
            # the directories not started are dropped; those being walked are finished (at
            # most one per worker): a worker ended while it sends its result leaves the pool's
            # reader waiting for the rest of it for ever, and the process could not exit
            with contextlib.suppress(BaseException):  # a second Ctrl-C: see cli.main
                pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _any_under(self, root: bytes) -> bool:
        return self.catalog.any_between(*prefix_range(root + b"/"))

    # -- incremental -----------------------------------------------------------------------

    def incremental(self, site: str | None = None) -> ReconcileStats:
        """Re-list only directories whose mtime changed since they were last listed."""
        t0 = time.perf_counter()
        total = ReconcileStats()
        with self._exclusive():
            done: set[bytes] = set()  # roots looked at (a shared root once)
            dirs: dict[str, dict[bytes, int]] = {}  # per walking site, its directories
            for s in self._selected(site):
                if self.catalog.layout_key(s.site) != self._key(s):
                    # never walked, or layout, roots or camera claims changed: a full walk
                    total.add(self._reconcile_site(s, done))
                    continue
                self.catalog.ensure_expiry(s.site, s.rules)
                for root in (_norm(r) for r in s.roots):
                    if root in done:
                        continue
                    done.add(root)
                    w = self._walker[root]  # a shared root: its first site walks it
                    if w.site not in dirs:
                        dirs[w.site] = self.catalog.dirs_of(w.site)
                    known_dirs = dirs[w.site]
                    if root not in known_dirs:
                        # never walked (a root added to the config): only a full walk will do
                        total.add(self._reconcile_root(w, root))
                        continue
                    total.add(self._incremental_root(w, root, known_dirs))
        total.seconds = time.perf_counter() - t0
        if total.added or total.removed or total.updated:
            log.info(
                "incremental reconcile: %d added, %d updated, %d removed in %.2f s",
                total.added,
                total.updated,
                total.removed,
                total.seconds,
            )
        return total

    def _incremental_root(
        self, s: SiteScan, root: bytes, known_dirs: dict[bytes, int]
    ) -> ReconcileStats:
        stats = ReconcileStats()
        health = self._root_health(s, root)
        if health is None:
            return stats  # rows kept; the attention entry says why
        root_st = health[0]
        if s.cross_mounts:
            dev, mounts = -1, frozenset[bytes]()
        else:
            dev = root_st.st_dev
            known_mounts = self._mounts.get(root)
            if known_mounts is None:
                known_mounts = self._mounts[root] = frozenset(mount_points_below(root))
            mounts = known_mounts
        cls = self._classifier(s, root)
        racy = self._racy_after()
        lo, hi = prefix_range(root + b"/")
        mine = sorted(p for p in known_dirs if p == root or lo <= p < hi)
        changed: list[tuple[bytes, int]] = []
        vanished: list[bytes] = []
        found = _Delta()  # unreadable paths met on the way
        for d in mine:
            if vanished and d.startswith(vanished[-1] + b"/"):
                continue  # below a directory that is gone: handled with it
            if found.unreadable and d.startswith(found.unreadable[-1][0] + b"/"):
                continue  # below a directory that cannot be read: left as catalogued
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                vanished.append(d)
                continue
            except OSError as exc:
                found.unreadable.append((d, exc.strerror or str(exc)))
                continue
            if not stat.S_ISDIR(st.st_mode):
                vanished.append(d)  # became a symlink or a file: nothing below it counts now
            elif d != root and dev >= 0 and (st.st_dev != dev or d in mounts):
                vanished.append(d)  # something mounted over it: not this root's any more
            elif st.st_mtime_ns != known_dirs[d]:
                changed.append((d, st.st_mtime_ns))
        for d in vanished:
            stats.removed += self.catalog.remove_under(d)
        for d, ns in changed:
            self._relist(cls, d, ns, known_dirs, stats, racy, found, dev, mounts)
        for p, why in found.unreadable[:_UNREADABLE_MAX]:
            self.attention.raise_(
                att.UNREADABLE,
                s.site,
                os.fsdecode(p),
                f"cannot read {show_path(p)} ({why}); it is skipped and its catalogued "
                "segments are kept; fix its permissions or the disk",
                {"root": show_path(root), "path": show_path(p), "error": why},
            )
        stats.unreadable += len(found.unreadable)
        if found.unclaimed:
            self._report_unclaimed(s, root, found.unclaimed, full=False)
        return stats

    def _relist(
        self,
        cls: _Classifier,
        d: bytes,
        d_ns: int,
        known_dirs: dict[bytes, int],
        stats: ReconcileStats,
        racy: int,
        found: _Delta,
        dev: int = -1,
        mounts: frozenset[bytes] = frozenset(),
    ) -> None:
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            stats.removed += self.catalog.remove_under(d)
            return
        except OSError as exc:
            found.unreadable.append((d, exc.strerror or str(exc)))
            return
        delta = _Delta()
        delta.stats.dirs += 1
        delta.dirs.append((d, _dir_mark(d_ns, racy)))
        subdirs: list[tuple[bytes, int]] = []
        files: list[tuple[bytes, os.stat_result]] = []
        keep_exact: set[bytes] = set()
        keep_under: list[bytes] = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if e.name[0] == 0x2E:
                        delta.stats.ignored += 1  # hidden directory: not entered
                        continue
                    est = e.stat(follow_symlinks=False)
                    if dev >= 0 and (est.st_dev != dev or e.path in mounts):
                        delta.mounts.append(e.path)
                        continue
                    subdirs.append((e.path, est.st_mtime_ns))
                elif e.is_file(follow_symlinks=False) and cls.is_segment_name(e.name):
                    files.append((e.path, e.stat(follow_symlinks=False)))
                else:
                    delta.stats.ignored += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                delta.unreadable.append((e.path, exc.strerror or str(exc)))
                keep_exact.add(e.path)
                keep_under.append(e.path + b"/")
        prefix = d + b"/"
        known: dict[bytes, _Known] = {}
        with self.catalog.lock:
            for lo, hi in _gaps(prefix, [p[len(prefix) :] for p, _ in subdirs]):
                known.update(self.catalog.rows_between(lo, hi))
        for path, st in files:
            _note_file(cls, path, st, known, delta)
        for sub, ns in subdirs:
            if sub not in known_dirs:
                # new directory: walk all of it, against whatever the catalog has below it
                with self.catalog.lock:
                    sub_known = self.catalog.rows_between(*prefix_range(sub + b"/"))
                _walk(cls, sub, ns, sub_known, delta, racy, True, dev, mounts)
                known.update(sub_known)  # left over: catalogued but not on disk
        if keep_exact or keep_under:
            _keep_rows(known, keep_exact, keep_under)
        delta.removed = list(known)
        delta.stats.removed += len(known)
        self.catalog.apply_rows(delta.rows, delta.removed)
        self.catalog.set_dirs(cls.site, delta.dirs)
        stats.add(delta.stats)
        found.unreadable.extend(delta.unreadable)
        for cam, n in delta.unclaimed.items():
            found.unclaimed[cam] = found.unclaimed.get(cam, 0) + n

    # -- hints -----------------------------------------------------------------------------

    def site_of(self, path: bytes) -> tuple[SiteScan, bytes] | None:
        """(the site that walks the root holding ``path``, that root): on a root split by
        cameras, the first of its sites; the file itself goes to the site claiming its camera."""
        for root, s in self._roots:
            if path.startswith(root + b"/"):
                return s, root
        return None

    def hint(self, path: bytes) -> str:
        """Refresh what the catalog knows about one path; returns what was done.

        ``added``/``updated``/``unchanged`` (a segment), ``removed`` (gone, or now a symlink),
        ``walked`` (a directory), ``ignored`` (not a segment, outside the roots).
        """
        path = _norm(path)
        found = self.site_of(path)
        if found is None:
            return "ignored"
        s, root = found
        cls = self._classifier(s, root)
        with self._exclusive():
            if root in self._unhealthy:
                return "ignored"  # out of service: rows kept as they are until it is back
            try:
                root_st = os.lstat(root)
                was = self.catalog.root_fs(root)
                if was is not None and not same_directory(was, dir_identity(root, root_st)):
                    # another directory over the root since its last walk (a bind mount): the
                    # next walk takes it out of service; nothing of it is catalogued meanwhile
                    return "ignored"
            except OSError:
                return "ignored"
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                n = self.catalog.remove_paths([path]) + self.catalog.remove_under(path)
                return "removed" if n else "ignored"
            except OSError:
                return "ignored"  # unreadable: the rescans report it
            dev, mounts = -1, frozenset[bytes]()
            if not s.cross_mounts:
                dev = root_st.st_dev
                mounts = self._mounts.get(root) or frozenset()
            # a symlinked directory, a hidden name or another file system anywhere between the
            # root and the path: not ours to catalog
            if (
                b"/." in path[len(root) :]
                or not _plain_below(root, path, dev, mounts)
                or (dev >= 0 and (st.st_dev != dev or path in mounts))
            ):
                n = self.catalog.remove_paths([path]) + self.catalog.remove_under(path)
                return "removed" if n else "ignored"
            if stat.S_ISDIR(st.st_mode):
                delta = _Delta()
                with self.catalog.lock:
                    known = self.catalog.rows_between(*prefix_range(path + b"/"))
                _walk(
                    cls, path, st.st_mtime_ns, known, delta, self._racy_after(), True, dev, mounts
                )
                # a hint does not prove the directory complete (events may still come), so
                # rows it did not see are left to the rescans; directory marks are not stored
                self.catalog.apply_rows(delta.rows, ())
                if delta.unclaimed:
                    self._report_unclaimed(s, root, delta.unclaimed, full=False)
                return "walked"
            if not stat.S_ISREG(st.st_mode) or not cls.is_segment_name(os.path.basename(path)):
                n = self.catalog.remove_paths([path])
                return "removed" if n else "ignored"
            known = {}
            old = self.catalog.get(path)
            if old is not None:
                known[path] = (old.site, old.camera, old.start, old.mtime, old.size, old.path_end)
            delta = _Delta()
            _note_file(cls, path, st, known, delta)
            if delta.unclaimed:
                self._report_unclaimed(s, root, delta.unclaimed, full=False)
            if delta.stats.ignored:
                n = self.catalog.remove_paths([path])
                return "removed" if n else "ignored"
            if not delta.rows:
                return "unchanged"
            self.catalog.apply_rows(delta.rows, ())
            return "added" if delta.stats.added else "updated"


class _nullctx:
    def __enter__(self) -> bool:
        return False

    def __exit__(self, *exc: object) -> None:
        return None


def _norm(path: bytes | str) -> bytes:
    p = os.fsencode(path)
    while len(p) > 1 and p.endswith(b"/"):
        p = p[:-1]
    return p


def _layout_key(s: SiteScan) -> str:
    """How a site's camera and start are read and which files are its segments (a change:
    every row is read again — a dropped extension's rows are forgotten), and from which roots
    (a change: rows under no root are forgotten). Layout and extensions, newline, roots."""
    how = "mtime" if s.layout is None else f"{s.layout.pattern}|{s.layout.tz}"
    how += "|" + ",".join(sorted(e.lower() for e in s.extensions))
    roots = b"\0".join(sorted(_norm(r) for r in s.roots)).hex()
    return f"{how}\n{roots}"


def _layout_part(key: str) -> str:
    return key.split("\n", 1)[0]


def _roots_part(key: str) -> str:
    parts = key.split("\n")  # layout, roots, and camera claims when there are any
    return parts[1] if len(parts) > 1 else ""


def _exts(s: SiteScan) -> frozenset[bytes]:
    return frozenset(os.fsencode(e.lower()) for e in s.extensions)


def _plain_below(
    root: bytes, path: bytes, dev: int = -1, mounts: frozenset[bytes] = frozenset()
) -> bool:
    """True when every directory between ``root`` and ``path`` is a real directory (on the
    root's file system ``dev`` and no mount point, unless ``dev`` is -1)."""
    rel = path[len(root) + 1 :].split(b"/")[:-1]
    cur = root
    for part in rel:
        cur = cur + b"/" + part
        try:
            st = os.lstat(cur)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        if dev >= 0 and (st.st_dev != dev or cur in mounts):
            return False
    return True
