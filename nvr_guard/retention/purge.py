"""Guarded deletion of recording segments, and what nvr-guard never deletes.

The plan was made from the catalog, some time ago; the disk may have changed since. So every file
is re-checked at the moment of deletion, through directory file descriptors so that nothing on
the way can redirect us:

- the path must lie inside its root, spelled plainly (absolute, no ``.``/``..``/empty components);
- the root is opened with ``O_NOFOLLOW`` and every directory below it with
  ``openat(parent, name, O_DIRECTORY|O_NOFOLLOW)``: a directory swapped for a symlink anywhere on
  the path fails (ELOOP/ENOTDIR) and the file is skipped — nothing outside is ever reached;
- every directory opened below the root must be on the root's mount (same ``st_dev`` and
  ``statx`` mount id) unless the site sets ``cross_mounts: true``: a disk or a bind mount of a
  tree from elsewhere mounted under a root after the plan was made is not the site's footage;
- the root must still be the directory the footage was catalogued in (file system id and inode
  of the open root, :func:`nvr_guard.mounts.dir_identity_fd`): another site's root bind-mounted
  over it after the plan is refused as a whole (``root-changed``);
- hidden names (``.x.mp4``, ``.tmp/``) are never segments (recorders' temporaries);
- the file itself is ``fstatat(..., AT_SYMLINK_NOFOLLOW)``-ed: a regular file, a segment extension,
  not modified within the settle time, same size and mtime as catalogued; then ``unlinkat``
  (which never follows a symlink either, so a swap between stat and unlink removes at most the
  link, never its target).

Audit trail (per (site, camera) batch of at most ``batch_size`` files):
``purge.begin`` before the first unlink (durable: no deletion without a trace), then the unlinks,
then, in one transaction on the audit log's connection, ``on_deleted`` (the caller removes
catalog rows), the file system sync and the ``purge.receipt``, committed together. A kill -9 or
power loss at any moment therefore leaves at worst catalog rows for files that are gone (the scanner
removes those) and a ``purge.begin`` without receipt; never a receipt for a file that still exists.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import logging
import os
import stat
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from nvr_guard.model import Segment, show_path
from nvr_guard.mounts import dir_identity_fd, mount_id, same_directory
from nvr_guard.store.audit import PURGE_BEGIN, PURGE_RECEIPT, PURGE_SKIP, AuditLog
from nvr_guard.workers import gc_paused, libc_function, worker_context, worker_start

log = logging.getLogger(__name__)

# The catalog stores st_mtime as a float; a round trip through SQLite REAL is exact, but a catalog
# or importer that rounds to milliseconds must not make every purge skip "changed since plan".
MTIME_TOLERANCE = 0.001
SKIP_EXAMPLES = 5  # paths named in a purge.skip entry; the counts cover all of them

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class PurgeTarget:
    segment: Segment
    root: bytes  # the configured root the segment was found under
    extensions: frozenset[str]  # segment extensions of the site, e.g. {".mp4", ".mkv"}
    settle: float  # seconds; a file modified more recently is still being recorded
    cross_mounts: bool = False  # the site's cross_mounts: may a directory be another mount
    # which directory the root was when the footage was catalogued (nvr_guard.mounts.dir_identity);
    # a root that is another directory now (a bind mount over it) is refused. None: not checked
    root_id: str | None = None
    # suffixes of the segment's sidecars (motionEye's b".thumb"): ``<name><suffix>`` beside it,
    # a regular file, is removed right after the segment, through the same directory fd
    sidecars: tuple[bytes, ...] = ()


@dataclass
class PurgeResult:
    deleted: list[Segment] = field(default_factory=list)
    skipped: list[tuple[Segment, str]] = field(default_factory=list)  # reason "kind: detail"
    bytes: int = 0
    receipts: list[int] = field(default_factory=list)  # audit seqs of purge.receipt entries


def digest_paths(paths: Iterable[bytes]) -> str:
    """SHA-256 (hex) of the sorted paths joined by ``\\n`` (no trailing newline), as receipts use.

    To check a receipt by hand: ``printf '%s\\n' PATHS | LC_ALL=C sort | head -c -1 | sha256sum``.
    """
    return hashlib.sha256(b"\n".join(sorted(paths))).hexdigest()


def iso_utc(t: float) -> str:
    return (
        _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


# ---------------------------------------------------------------------------------------------
# path checks


class _Skip(Exception):
    """A target refused; ``kind`` is what purge.skip counts."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _plain_components(path: bytes) -> list[bytes] | None:
    """Components of an absolute path spelled plainly; None for ``.``, ``..``, ``//`` tricks."""
    if not path.startswith(b"/") or b"\0" in path:
        return None
    parts = path[1:].split(b"/")
    if parts == [b""]:
        return []  # "/" itself
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    return parts


def _normalise_root(root: bytes | str) -> bytes | None:
    r = os.fsencode(root)
    if len(r) > 1:
        r = r.rstrip(b"/") or b"/"  # a trailing slash is harmless in a configured root
    parts = _plain_components(r)
    return None if parts is None else b"/" + b"/".join(parts)


def _relative(path: bytes, root: bytes) -> bytes:
    """``path`` below the normalised ``root`` (e.g. ``cam/2026-11-20/10/00.00.mp4``) or _Skip."""
    prefix = root if root == b"/" else root + b"/"
    if not path.startswith(prefix):
        if _plain_components(path) is None:
            raise _Skip("unsafe-path", "not a plain absolute path (.., //, relative)")
        raise _Skip("outside-root", f"not inside root {show_path(root)}")
    rel = path[len(prefix) :]
    # the common case is checked with substring tests; anything with a component starting with
    # "." (hidden names are legal, "." and ".." are not) gets the exact component check
    if (
        not rel
        or rel.startswith(b"/")
        or rel.endswith(b"/")
        or b"//" in rel
        or b"\0" in rel
        or (b"/." in b"/" + rel and _plain_components(b"/" + rel) is None)
    ):
        raise _Skip("unsafe-path", "not a plain absolute path (.., //, relative)")
    return rel


def _normalise_exts(exts: Iterable[str]) -> frozenset[bytes]:
    out = set()
    for e in exts:
        e = e.strip().lower()
        if e:
            out.add(os.fsencode(e if e.startswith(".") else "." + e))
    return frozenset(out)


def _extension(name: bytes) -> bytes:
    i = name.rfind(b".")
    return name[i:].lower() if i > 0 else b""


# ---------------------------------------------------------------------------------------------
# directory walking with cached descriptors


class _DirWalker:
    """Directory fds of one root, kept open along the current path of a sorted walk.

    Sorted paths visit each directory once, so the stack of open fds is reused by every file in
    it: one ``openat`` per directory instead of one per path component per file (the purge bench
    deletes ~144,000 files). Leaving a directory in which something was deleted tries ``rmdir``
    on it — only at depth >= 2 below the root, so a root and a camera directory always stay.
    """

    def __init__(
        self,
        root: bytes,
        fsync_each: bool = False,
        cross_mounts: bool = False,
        root_id: str | None = None,
    ) -> None:
        self.root = root
        # without syncfs(2), every changed directory is fsynced as it is left
        self.fsync_each = fsync_each
        self.failure_kind = self.failure = ""
        # O_NOFOLLOW on the root: a root replaced by a symlink must not redirect the purge
        try:
            self.root_fd = os.open(root, _DIR_FLAGS)
        except OSError as exc:
            self.root_fd = -1  # remembered, so each target of this root is refused cheaply
            self.failure_kind = (
                "symlink-on-path"
                if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                else "vanished"
                if exc.errno == errno.ENOENT
                else "error"
            )
            self.failure = f"root {show_path(root)} cannot be opened safely: {exc.strerror}"
        if self.root_fd >= 0 and root_id is not None:
            # the directory open now must be the one the plan's footage was catalogued in
            try:
                now_id = dir_identity_fd(self.root_fd)
            except OSError as exc:
                now_id = f"unknown ({exc.strerror})"
            if not same_directory(root_id, now_id):
                os.close(self.root_fd)
                self.root_fd = -1
                self.failure_kind = "root-changed"
                self.failure = (
                    f"root {show_path(root)} is another directory than when its footage was "
                    f"catalogued ({root_id} -> {now_id}: a mount over it?)"
                )
        # the file system every directory below must be on (-1: the site crosses mounts)
        self.dev = -1
        self.mnt: int | None = None
        if self.root_fd >= 0 and not cross_mounts:
            self.dev = os.fstat(self.root_fd).st_dev
            self.mnt = mount_id(self.root_fd)
        self.root_touched = False
        self.names: list[bytes] = []
        self.fds: list[int] = []
        self.touched: list[bool] = []
        self.cur: bytes | None = None  # the directory (relative) whose fd is self.cur_fd
        self.cur_fd = -1

    def enter(self, dirpart: bytes) -> int:
        """fd of root/dirpart, reusing the open prefix; raise _Skip when it cannot be reached."""
        if dirpart == self.cur:
            return self.cur_fd  # the next file in the same directory: nothing to open
        self.cur = None
        dirs = dirpart.split(b"/") if dirpart else []
        common = 0
        for have, want in zip(self.names, dirs, strict=False):
            if have != want:
                break
            common += 1
        self._pop_to(common)
        for name in dirs[common:]:
            parent = self.fds[-1] if self.fds else self.root_fd
            if name[:1] == b".":
                where = show_path(b"/".join([self.root, *self.names, name]))
                raise _Skip("hidden", f"{where} is a hidden directory (never holds segments)")
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                where = show_path(b"/".join([self.root, *self.names, name]))
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Skip(
                        "symlink-on-path", f"{where} is a symlink or not a directory"
                    ) from None
                if exc.errno == errno.ENOENT:
                    raise _Skip("vanished", f"directory {where} is gone") from None
                raise _Skip("error", f"cannot open {where}: {exc.strerror}") from None
            if self.dev >= 0 and (
                os.fstat(fd).st_dev != self.dev
                or (self.mnt is not None and mount_id(fd) != self.mnt)
            ):
                os.close(fd)
                where = show_path(b"/".join([self.root, *self.names, name]))
                raise _Skip(
                    "other-mount",
                    f"{where} is another file system (a mount point) and the site does not "
                    "cross mounts",
                )
            self.names.append(name)
            self.fds.append(fd)
            self.touched.append(False)
        self.cur = dirpart
        self.cur_fd = self.fds[-1] if self.fds else self.root_fd
        return self.cur_fd

    def mark_deleted(self) -> None:
        if self.fds:
            self.touched[-1] = True
        else:
            self.root_touched = True

    def _pop_to(self, depth: int) -> None:
        self.cur = None
        while len(self.fds) > depth:
            fd = self.fds.pop()
            name = self.names.pop()
            touched = self.touched.pop()
            if touched and self.fsync_each:
                _fsync(fd)
            os.close(fd)
            # depth of the popped directory below the root: 1 = camera level in the default
            # layout (and the first level in any layout) — never removed
            if touched and len(self.fds) + 1 >= 2:
                parent = self.fds[-1]
                try:
                    os.rmdir(name, dir_fd=parent)
                except OSError:
                    continue  # not empty (recorder wrote meanwhile, other files remain) — fine
                self.touched[-1] = True

    def leave(self) -> None:
        """Close every directory below the root, removing those emptied (not the root)."""
        self._pop_to(0)
        if self.root_fd >= 0 and self.root_touched and self.fsync_each:
            _fsync(self.root_fd)

    def close(self) -> None:
        if self.root_fd >= 0:
            self._pop_to(0)
            os.close(self.root_fd)
            self.root_fd = -1


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("fsync after purge failed: %s", exc)


def _have_syncfs() -> bool:
    return libc_function("syncfs") is not None


def _syncfs(fd: int) -> bool:
    """syncfs(2): commit the whole file system's metadata in one go — one journal commit per
    purge instead of one fsync per directory (thousands). False when the call is unavailable."""
    call = libc_function("syncfs")
    return call is not None and call(fd) == 0


def _sync_root(root: bytes) -> None:
    """Make the unlinks under ``root`` durable (the workers fsynced their directories already
    when syncfs is missing; this is the common, cheap path)."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        os.sync()  # root gone or swapped meanwhile: sync everything rather than guess
        return
    try:
        if not _syncfs(fd):
            os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# the purge

# From this many targets, the unlinks run in worker processes rather than threads: a thread's
# every stat and unlink gives up and takes back the GIL, which the main thread needs meanwhile
# for the catalog; two processes each keep a core (bench/retention.py: 144,000 files).
PROCESS_MIN = 20_000
# how much lower the worker processes' CPU priority is than the daemon's (``workers.worker_start``)
WORKER_NICE = 5

# what a worker gets per file: plain data, cheap to pickle (the exts set is shared by identity)
# (root, rel, extensions, settle, catalogued size, catalogued mtime, cross mounts, root identity)
_Item = tuple[
    bytes, bytes, frozenset[bytes], float, int, float, bool, str | None, tuple[bytes, ...]
]
# and returns per batch: (indices deleted, their bytes, [(index, kind, reason)] refused)
_Outcome = tuple[list[int], int, list[tuple[int, str, str]]]


def purge(
    targets: Sequence[PurgeTarget],
    *,
    audit: AuditLog,
    actor: str,
    sweep_id: int | None,
    now: Callable[[], float],
    on_deleted: Callable[[list[Segment]], None],
    batch_size: int = 5000,
    workers: int = 2,
    process_min: int = PROCESS_MIN,
    after_batch: Callable[[list[Segment]], dict[str, Any] | None] | None = None,
) -> PurgeResult:
    """Delete ``targets`` that still pass every check; audit begin, receipts and skips.

    Per (site, camera) group, in this order, so that a large sweep pays for durability once:
    1. the group's ``purge.begin`` entries (planned count and digest per batch) durably
       committed — no file is unlinked without a trace (the first group alone, then all others
       in one commit);
    2. the group's unlinks, each re-checked through its directory descriptor, on a worker
       (a thread; a process for ``process_min`` targets or more), while the next group is
       checked and begun;
    3. meanwhile, in one transaction on ``audit.conn`` opened once every begin is committed,
       ``on_deleted`` (the caller removes catalog rows) for each group as its unlinks finish —
       the database work of one group overlaps the unlinks of the next;
    4. when all groups are done, one ``syncfs`` per root, so the unlinks are durable before any
       receipt says so, then every batch's ``purge.receipt``, and the commit.
    A crash between 1 and 4 leaves begins without receipts; the next start writes a
    ``recovered`` receipt for what is gone. A callback that commits by itself is tolerated.
    ``after_batch`` (the recorder's own index) is called with each batch's deleted segments
    once their files are gone; what it returns is added to the batch's receipt, and it must
    not raise (if it does, the error is logged and the purge goes on).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    result = PurgeResult()
    groups: dict[tuple[str, str], list[PurgeTarget]] = defaultdict(list)
    for t in targets:
        groups[(t.segment.site, t.segment.camera)].append(t)
    plans: list[_Group] = []
    running: list[tuple[_Group, Future[list[_Outcome]]]] = []
    exts: dict[frozenset[str], frozenset[bytes]] = {}
    closer: list[threading.Thread] = []  # shuts the pool down once every task has returned
    with gc_paused():  # see gc_paused: most of a large purge's Python time otherwise
        pool, warm = _pool(workers, len(targets) >= process_min)
        try:
            ordered = sorted(groups.items())
            # the first group is begun alone so the workers start at once; the others are
            # begun together in one durable commit (one journal flush instead of one each)
            for chunk in (ordered[:1], ordered[1:]):
                begun: list[_Group] = []
                with audit.transaction():
                    for (site, camera), group in chunk:
                        g = _prepare(site, camera, group, exts)
                        plans.append(g)
                        if g.items:
                            _begin(g, audit, actor, sweep_id, batch_size)
                            begun.append(g)
                if warm is not None and begun:
                    pool, warm = _warmed(pool, warm, workers), None
                for g in begun:
                    jobs = [g.items[i : i + batch_size] for i in range(0, len(g.items), batch_size)]
                    running.append((g, pool.submit(_unlink_group, jobs, now())))

            def all_unlinked() -> None:
                # every task has returned: the workers exit while the receipts are written
                t = threading.Thread(target=pool.shutdown, name="nvr-guard-purge-close")
                t.start()
                closer.append(t)

            _finish(running, result, audit, actor, sweep_id, on_deleted, all_unlinked, after_batch)
            _skips(plans, result, audit, actor, sweep_id)
        finally:
            if closer:
                closer[0].join()
            else:
                pool.shutdown(wait=True)  # an error above: let the workers finish what they hold
    return result


def _begin(g: _Group, audit: AuditLog, actor: str, sweep_id: int | None, batch_size: int) -> None:
    """The group's ``purge.begin`` entries (planned count and digest per batch), in the
    caller's transaction."""
    for start in range(0, len(g.items), batch_size):
        end = start + batch_size
        planned = digest_paths(g.paths[start:end])
        begin = audit.append_in(
            actor,
            PURGE_BEGIN,
            g.obj,
            {
                "sweep": sweep_id,
                "site": g.site,
                "camera": g.camera,
                "planned": len(g.paths[start:end]),
                "digest": planned,
            },
        )
        g.batches.append(_Batch(g.targets[start:end], begin.seq, planned))


def _pool(workers: int, processes: bool) -> tuple[Executor, Future[int] | None]:
    """The executor of the unlinks, and for processes a first task that shows they start."""
    if processes and workers > 1:
        try:
            pool = ProcessPoolExecutor(
                workers,
                mp_context=worker_context(),
                initializer=worker_start,
                initargs=(os.getpid(), WORKER_NICE),
            )
            return pool, pool.submit(os.getpid)  # the workers start while group 1 is prepared
        except OSError as exc:
            log.warning("purge: no worker processes (%s); using threads", exc)
    return _threads(workers), None


def _warmed(pool: Executor, warm: Future[int], workers: int) -> Executor:
    """``pool`` once its first task came back; threads if the worker processes failed."""
    try:
        warm.result()
        return pool
    except (OSError, BrokenProcessPool) as exc:
        # sandbox limits, a main module that cannot be re-imported: nothing was handed over yet
        log.warning("purge: worker processes failed (%s); using threads", exc)
        pool.shutdown(wait=False)
        return _threads(workers)


def _threads(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, workers), thread_name_prefix="nvr-guard-purge")


@dataclass
class _Batch:
    targets: list[PurgeTarget]
    begin: int
    planned: str  # digest of the planned paths
    deleted: list[Segment] = field(default_factory=list)
    sizes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # from after_batch, for the receipt


@dataclass
class _Group:
    """One (site, camera) of a purge: its targets that passed the path checks, sorted by path
    (so each directory is entered once), as parallel lists."""

    site: str
    camera: str
    targets: list[PurgeTarget] = field(default_factory=list)
    paths: list[bytes] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)
    roots: set[bytes] = field(default_factory=set)
    skips: list[tuple[Segment, str, str]] = field(default_factory=list)  # segment, kind, reason
    batches: list[_Batch] = field(default_factory=list)

    @property
    def obj(self) -> str:
        return f"camera:{self.site}/{self.camera}"


def _prepare(
    site: str, camera: str, group: list[PurgeTarget], exts: dict[frozenset[str], frozenset[bytes]]
) -> _Group:
    """Path checks first: refused targets never reach the disk.

    This runs over every target of a purge (144,000 in the bench) on the thread that then
    removes catalog rows, so the common case is done in bulk: one check of all paths of a root
    at once, list comprehensions instead of a loop with branches."""
    g = _Group(site, camera)
    by_root: dict[bytes | str, list[PurgeTarget]] = defaultdict(list)
    for t in group:
        by_root[t.root].append(t)
    for raw_root, ts in by_root.items():
        root = _normalise_root(raw_root)
        paths = [os.fsencode(t.segment.path) for t in ts]
        if root is not None and _plain_under(root, paths):
            cut = len(root) + 1
            rels = [p[cut:] for p in paths]
        else:
            keep: list[int] = []
            rels = []
            for i, (path, t) in enumerate(zip(paths, ts, strict=True)):
                try:
                    if root is None:
                        raise _Skip(
                            "unsafe-root",
                            f"root {show_path(raw_root)} is not a plain absolute path",
                        )
                    rels.append(_relative(path, root))
                    keep.append(i)
                except _Skip as s:
                    g.skips.append((t.segment, s.kind, str(s)))
            if root is None or not keep:
                continue
            paths = [paths[i] for i in keep]
            ts = [ts[i] for i in keep]
        # byte order keeps every directory's files together (all paths with a common prefix
        # sort next to each other); the catalog usually hands them over in that order already
        if any(a > b for a, b in zip(paths, paths[1:], strict=False)):
            order = sorted(range(len(paths)), key=paths.__getitem__)
            paths = [paths[i] for i in order]
            rels = [rels[i] for i in order]
            ts = [ts[i] for i in order]
        # callers may build one frozenset per target: normalise each distinct set once, and
        # hand the same object on (pickled once per job)
        for t in ts:
            if t.extensions not in exts:
                exts[t.extensions] = _normalise_exts(t.extensions)
        g.items.extend(
            [
                (
                    root,
                    rel,
                    exts[t.extensions],
                    t.settle,
                    t.segment.size,
                    t.segment.mtime,
                    t.cross_mounts,
                    t.root_id,
                    t.sidecars,
                )
                for rel, t in zip(rels, ts, strict=True)
            ]
        )
        g.targets.extend(ts)
        g.paths.extend(paths)
        g.roots.add(root)
    return g


def _plain_under(root: bytes, paths: list[bytes]) -> bool:
    """Every path lies below ``root`` (not "/"), spelled plainly — the common case, tested for
    all paths at once; False sends each path through the exact check of :func:`_relative`."""
    if len(root) <= 1 or not paths:
        return False
    prefix = root + b"/"
    joined = b"\0".join(paths)
    return (
        joined.count(b"\0") == len(paths) - 1  # no NUL inside a path
        and b"/." not in joined  # no component starting with "." (may be a false alarm)
        and b"//" not in joined
        and b"/\0" not in joined
        and not joined.endswith(b"/")
        and all(p.startswith(prefix) and len(p) > len(prefix) for p in paths)
    )


def _receipt_details(g: _Group, b: _Batch, sweep_id: int | None) -> dict[str, Any]:
    starts = [s.start for s in b.deleted]
    return {
        "sweep": sweep_id,
        "site": g.site,
        "camera": g.camera,
        "count": len(b.deleted),
        "bytes": b.sizes,
        "from": iso_utc(min(starts)),
        "to": iso_utc(max(starts)),
        # all planned files deleted: the same set, so the same digest as the begin entry
        "digest": b.planned
        if len(b.deleted) == len(b.targets)
        else digest_paths([os.fsencode(s.path) for s in b.deleted]),
        "begin": b.begin,
        "planned": len(b.targets),
        **b.extra,
    }


def _collect(g: _Group, outcomes: list[_Outcome]) -> None:
    """A group's worker outcomes, mapped back onto its targets."""
    for b, (deleted, sizes, skipped) in zip(g.batches, outcomes, strict=True):
        b.deleted = [b.targets[i].segment for i in deleted]
        b.sizes = sizes
        g.skips.extend((b.targets[i].segment, kind, reason) for i, kind, reason in skipped)


def _finish(
    running: list[tuple[_Group, Future[list[_Outcome]]]],
    result: PurgeResult,
    audit: AuditLog,
    actor: str,
    sweep_id: int | None,
    on_deleted: Callable[[list[Segment]], None],
    all_unlinked: Callable[[], None] = lambda: None,
    after_batch: Callable[[list[Segment]], dict[str, Any] | None] | None = None,
) -> None:
    """Steps 3 and 4: catalog rows and receipts in one transaction, opened while the workers
    still unlink, so that removing the rows of one group overlaps the unlinks of the next.
    ``all_unlinked`` is called once every worker task has returned.

    Nothing of it is committed before every unlink is synced: a crash before the commit rolls
    the row removals back with the receipts (the next start writes ``recovered`` receipts).
    The receipts are written into the transaction while the sync runs, committed after it."""
    done: list[tuple[_Group, _Batch]] = []
    failure: BaseException | None = None
    catalog_error: Exception | None = None
    roots: set[bytes] = set().union(*(g.roots for g, _ in running))
    # the sync (a journal commit: I/O, no CPU) starts as soon as the last unlink is done and
    # runs while the rows of the last groups are removed; the receipts wait for it
    syncer: threading.Thread | None = None
    try:
        with audit.transaction():
            for g, fut in running:
                try:
                    _collect(g, fut.result())
                except BaseException as exc:  # a worker failed: no receipts (next start)
                    failure = failure or exc
                    continue
                if syncer is None and all(f.done() for _, f in running):
                    syncer = threading.Thread(
                        target=_sync_roots, args=(roots,), name="nvr-guard-purge-sync"
                    )
                    syncer.start()
                    all_unlinked()
                for b in g.batches:
                    if not b.deleted:
                        continue
                    done.append((g, b))
                    if after_batch is not None:
                        _after_batch(after_batch, b)
                    if failure is None and catalog_error is None:
                        try:
                            on_deleted(b.deleted)
                        except Exception as exc:
                            catalog_error = exc
                        audit.reopen_transaction()  # when the callback committed
            if failure is not None:
                raise failure
            if catalog_error is not None:
                raise catalog_error
            seqs = [
                audit.append_in(actor, PURGE_RECEIPT, g.obj, _receipt_details(g, b, sweep_id)).seq
                for g, b in done
            ]
            if syncer is None:
                _sync_roots(roots)
            else:
                syncer.join()  # durable before the commit makes any receipt say so
    except Exception as exc:
        if failure is not None:
            raise
        # the files are gone whatever the catalog says: the receipts must still be written
        # (the rows are stale now; the scanner removes them), then the failure surfaces
        if syncer is not None:
            syncer.join()
        _sync_roots(roots)
        for g, b in done:
            details = _receipt_details(g, b, sweep_id)
            details["catalog_error"] = str(exc)
            result.receipts.append(audit.append(actor, PURGE_RECEIPT, g.obj, details).seq)
        _tally(done, result)
        raise
    _tally(done, result)
    result.receipts.extend(seqs)


def _after_batch(hook: Callable[[list[Segment]], dict[str, Any] | None], b: _Batch) -> None:
    """The batch's files are gone: tell the recorder's index; never fails the purge."""
    try:
        b.extra = dict(hook(b.deleted) or {})
    except Exception:
        log.exception("purge: the recorder index step failed (the files are deleted)")


def _sync_roots(roots: set[bytes]) -> None:
    for root in sorted(roots):
        _sync_root(root)


def _tally(done: list[tuple[_Group, _Batch]], result: PurgeResult) -> None:
    for _, b in done:
        result.deleted.extend(b.deleted)
        result.bytes += b.sizes


def _skips(
    plans: list[_Group], result: PurgeResult, audit: AuditLog, actor: str, sweep_id: int | None
) -> None:
    for g in plans:
        if not g.skips:
            continue
        result.skipped.extend((seg, reason) for seg, _, reason in g.skips)
        kinds = Counter(kind for _, kind, _ in g.skips)
        for seg, kind, reason in g.skips[:SKIP_EXAMPLES]:
            quiet = kind in ("settling", "changed", "vanished")  # normal races with the recorder
            log.log(
                logging.INFO if quiet else logging.WARNING,
                "purge skipped %s: %s",
                show_path(seg.path),
                reason,
            )
        audit.append(
            actor,
            PURGE_SKIP,
            g.obj,
            {
                "sweep": sweep_id,
                "site": g.site,
                "camera": g.camera,
                "count": len(g.skips),
                "kinds": dict(sorted(kinds.items())),
                "examples": [
                    {"path": show_path(seg.path), "reason": reason}
                    for seg, _, reason in g.skips[:SKIP_EXAMPLES]
                ],
            },
        )


# ---------------------------------------------------------------------------------------------
# the worker side (a thread or a process: module level, plain data in and out)


def _unlink_group(jobs: list[list[_Item]], now: float) -> list[_Outcome]:
    """Re-check and unlink one group's batches; leaves each emptied date directory removed."""
    with gc_paused():
        return _unlink_jobs(jobs, now)


def _unlink_jobs(jobs: list[list[_Item]], now: float) -> list[_Outcome]:
    walkers: dict[bytes, _DirWalker] = {}
    fsync_each = not _have_syncfs()
    try:
        out = [_apply(items, walkers, now, fsync_each) for items in jobs]
        for w in walkers.values():
            w.leave()  # rmdir what was emptied, before the caller syncs
        return out
    finally:
        for w in walkers.values():
            w.close()


def _apply(
    items: list[_Item], walkers: dict[bytes, _DirWalker], now: float, fsync_each: bool = False
) -> _Outcome:
    """Re-check each file through its directory fd and unlink it.

    This loop runs once per deleted file (~144,000 in the purge bench, which must stay within
    1.2x of ``find -delete``): the common path makes no Python-level calls besides the two
    syscalls, and the rare outcomes go through ``_Skip``.
    """
    deleted: list[int] = []
    skipped: list[tuple[int, str, str]] = []
    sizes = 0
    walker: _DirWalker | None = None
    lstat, unlink, is_reg = os.stat, os.unlink, stat.S_ISREG
    for i, (root, rel, exts, settle, size, cat_mtime, cross, root_id, sidecars) in enumerate(items):
        try:
            if walker is None or walker.root != root:
                walker = walkers.get(root)
                if walker is None:
                    walker = walkers[root] = _DirWalker(root, fsync_each, cross, root_id)
            if walker.root_fd < 0:
                raise _Skip(walker.failure_kind, walker.failure)
            j = rel.rfind(b"/")
            name = rel[j + 1 :]
            k = name.rfind(b".")
            if k <= 0 or name[k:].lower() not in exts:
                ext = show_path(_extension(name)) or "no extension"
                raise _Skip("extension", f"{ext} is not a segment extension")
            if name[0] == 0x2E:
                raise _Skip("hidden", "a hidden name is a recorder's temporary, never a segment")
            dirpart = rel[:j] if j >= 0 else b""
            d = walker.cur_fd if dirpart == walker.cur else walker.enter(dirpart)
            try:
                st = lstat(name, dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                raise _Skip("vanished", "file is gone") from None
            except OSError as exc:
                raise _Skip("error", f"cannot stat: {exc.strerror}") from None
            if walker.dev >= 0 and st.st_dev != walker.dev:
                raise _Skip("other-mount", "a file mounted from another file system")
            if not is_reg(st.st_mode):
                if stat.S_ISLNK(st.st_mode):
                    raise _Skip("symlink", "is a symlink (never followed, never deleted)")
                raise _Skip("not-regular", "not a regular file")
            mtime = st.st_mtime
            if mtime > now - settle:
                raise _Skip("settling", "modified within the settle time (still recording)")
            if st.st_size != size or not (
                -MTIME_TOLERANCE <= mtime - cat_mtime <= MTIME_TOLERANCE
                or _same_second(mtime, cat_mtime)
            ):
                raise _Skip(
                    "changed",
                    f"changed since plan (size {size} -> {st.st_size}, "
                    f"mtime {cat_mtime:.3f} -> {mtime:.3f})",
                )
            try:
                unlink(name, dir_fd=d)
            except FileNotFoundError:
                raise _Skip("vanished", "file is gone") from None
            except OSError as exc:
                raise _Skip("error", f"cannot unlink: {exc.strerror}") from None
            if sidecars:
                _unlink_sidecars(name, d, sidecars)
        except _Skip as s:
            skipped.append((i, s.kind, str(s)))
            continue
        walker.mark_deleted()
        deleted.append(i)
        sizes += st.st_size
    return deleted, sizes, skipped


def _unlink_sidecars(name: bytes, d: int, suffixes: tuple[bytes, ...]) -> None:
    """Remove the sidecars of the segment ``name`` just unlinked in directory fd ``d``: regular
    files only (a symlink or directory of that name stays), a missing one is fine."""
    for suffix in suffixes:
        try:
            st = os.stat(name + suffix, dir_fd=d, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                os.unlink(name + suffix, dir_fd=d)
        except OSError:
            pass  # gone already, or not removable: a sidecar is never worth a failed purge


def _same_second(disk: float, catalog: float) -> bool:
    # a catalog holding whole seconds (truncated st_mtime) still identifies the same file
    return catalog == int(catalog) and int(disk) == int(catalog)


__all__ = ["PurgeResult", "PurgeTarget", "digest_paths", "purge"]
