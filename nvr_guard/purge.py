"""Guarded deletion of recording segments (SPEC §4: what nvr-guard never deletes).

The plan was made from the catalog, some time ago; the disk may have changed since. So every file
is re-checked at the moment of deletion, through directory file descriptors so that nothing on
the way can redirect us:

- the path must lie inside its root, spelled plainly (absolute, no ``.``/``..``/empty components);
- the root is opened with ``O_NOFOLLOW`` and every directory below it with
  ``openat(parent, name, O_DIRECTORY|O_NOFOLLOW)``: a directory swapped for a symlink anywhere on
  the path fails (ELOOP/ENOTDIR) and the file is skipped — nothing outside is ever reached;
- the file itself is ``fstatat(..., AT_SYMLINK_NOFOLLOW)``-ed: a regular file, a segment extension,
  not modified within the settle time, same size and mtime as catalogued; then ``unlinkat``
  (which never follows a symlink either, so a swap between stat and unlink removes at most the
  link, never its target).

Audit trail (per (site, camera) batch of at most ``batch_size`` files):
``purge.begin`` before the first unlink (durable: no deletion without a trace), then the unlinks,
then the file system is synced and, in one transaction on the audit log's connection,
``on_deleted`` (the caller removes catalog rows) and the ``purge.receipt``. A kill -9 or power
loss at any moment therefore leaves at worst catalog rows for files that are gone (the scanner
removes those) and a ``purge.begin`` without receipt; never a receipt for a file that still exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import errno
import hashlib
import logging
import os
import stat
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nvr_guard.audit import PURGE_BEGIN, PURGE_RECEIPT, PURGE_SKIP, AuditLog
from nvr_guard.model import Segment, show_path

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

    def __init__(self, root: bytes) -> None:
        self.root = root
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
        self.root_touched = False
        self.names: list[bytes] = []
        self.fds: list[int] = []
        self.touched: list[bool] = []
        self.dirty: set[int] = set()  # fds of directories changed since the last sync
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
            self.names.append(name)
            self.fds.append(fd)
            self.touched.append(False)
        self.cur = dirpart
        self.cur_fd = self.fds[-1] if self.fds else self.root_fd
        return self.cur_fd

    def mark_deleted(self) -> None:
        if self.fds:
            if not self.touched[-1]:
                self.touched[-1] = True
                self.dirty.add(self.fds[-1])
        else:
            self.root_touched = True

    def _pop_to(self, depth: int) -> None:
        self.cur = None
        while len(self.fds) > depth:
            fd = self.fds.pop()
            name = self.names.pop()
            touched = self.touched.pop()
            self.dirty.discard(fd)
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
                self.dirty.add(parent)

    def sync(self) -> None:
        """Make this batch's unlinks durable before its receipt is written."""
        _syncfs(self.root_fd, list(self.dirty))
        self.dirty.clear()

    def close(self) -> None:
        if self.root_fd >= 0:
            self._pop_to(0)
            os.close(self.root_fd)
            self.root_fd = -1


_libc: ctypes.CDLL | None = None


def _syncfs(fd: int, dir_fds: list[int]) -> None:
    # syncfs(2) commits the whole file system's metadata in one go — one journal commit per batch
    # instead of one fsync per directory (thousands per purge); fall back to the directories.
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if _libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    for d in [fd, *dir_fds]:
        try:
            os.fsync(d)
        except OSError as exc:
            log.warning("fsync after purge failed: %s", exc)


# ---------------------------------------------------------------------------------------------
# the purge


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
) -> PurgeResult:
    """Delete ``targets`` that still pass every check; audit begin, receipts and skips.

    Per (site, camera) group, in this order, so that a large sweep pays for durability once:
    1. the group's ``purge.begin`` entries (planned count and digest per batch) in one durable
       commit — no file is unlinked without a trace;
    2. the group's unlinks, each re-checked through its directory descriptor, on a worker
       thread: the kernel's unlink and rmdir are most of the cost and release the GIL, so the
       next group is checked and begun while this one is being deleted, on two cores;
    3. when all groups are done, one ``syncfs`` per file system, so the unlinks are durable
       before any receipt says so;
    4. every batch's ``purge.receipt`` with ``on_deleted`` (the catalog rows) in one
       transaction on ``audit.conn``.
    A crash between 1 and 4 leaves begins without receipts; the next start writes a
    ``recovered`` receipt for what is gone. A callback that commits by itself is tolerated.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    result = PurgeResult()
    groups: dict[tuple[str, str], list[PurgeTarget]] = defaultdict(list)
    for t in targets:
        groups[(t.segment.site, t.segment.camera)].append(t)
    plans: list[_Group] = []
    # directory descriptors are per thread: a _DirWalker is never shared
    local = threading.local()
    lanes: list[dict[bytes, _DirWalker]] = []
    lanes_lock = threading.Lock()

    def unlink(g: _Group) -> None:
        walkers = getattr(local, "walkers", None)
        if walkers is None:
            walkers = local.walkers = {}
            with lanes_lock:
                lanes.append(walkers)
        for b in g.batches:
            b.deleted, b.sizes, _ = _apply(b.targets, walkers, now(), g.skips)

    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="nvr-guard-purge") as pool:
            running = []
            for (site, camera), group in sorted(groups.items()):
                g = _Group(site, camera, *_prepare(group))
                plans.append(g)
                if not g.ready:
                    continue
                with audit.transaction():
                    for start in range(0, len(g.ready), batch_size):
                        batch = g.ready[start : start + batch_size]
                        planned = digest_paths(os.fsencode(t.segment.path) for _, _, _, t in batch)
                        begin = audit.append_in(
                            actor,
                            PURGE_BEGIN,
                            g.obj,
                            {
                                "sweep": sweep_id,
                                "site": g.site,
                                "camera": g.camera,
                                "planned": len(batch),
                                "digest": planned,
                            },
                        )
                        g.batches.append(_Batch(batch, begin.seq, planned))
                running.append(pool.submit(unlink, g))
            for f in running:
                f.result()  # an error in a worker surfaces here (receipts: next start)
        # 3. durable before any receipt
        for walkers in lanes:
            for w in walkers.values():
                if w.root_fd >= 0:
                    w.sync()
        # 4. receipts and catalog rows
        _receipts(plans, result, audit, actor, sweep_id, on_deleted)
        _skips(plans, result, audit, actor, sweep_id)
    finally:
        for walkers in lanes:
            for w in walkers.values():
                try:
                    w.close()
                except OSError as exc:
                    log.warning("closing %s: %s", show_path(w.root), exc)
    return result


@dataclass
class _Batch:
    targets: list[tuple[bytes, bytes, bytes, PurgeTarget]]
    begin: int
    planned: str  # digest of the planned paths
    deleted: list[Segment] = field(default_factory=list)
    sizes: int = 0


@dataclass
class _Group:
    site: str
    camera: str
    ready: list[tuple[bytes, bytes, bytes, PurgeTarget]]
    skips: list[tuple[Segment, str, str]]
    batches: list[_Batch] = field(default_factory=list)

    @property
    def obj(self) -> str:
        return f"camera:{self.site}/{self.camera}"


def _prepare(
    group: list[PurgeTarget],
) -> tuple[list[tuple[bytes, bytes, bytes, PurgeTarget]], list[tuple[Segment, str, str]]]:
    """Path checks first: refused targets never reach the disk. (ready sorted, skips)"""
    skips: list[tuple[Segment, str, str]] = []  # segment, kind, reason
    roots: dict[bytes | str, bytes | None] = {}
    ready: list[tuple[bytes, bytes, bytes, PurgeTarget]] = []  # sort key, root, rel, target
    for t in group:
        root = roots.get(t.root, b"")
        if root == b"":
            root = roots[t.root] = _normalise_root(t.root)
        path = t.segment.path
        if type(path) is not bytes:
            path = os.fsencode(path)
        # the common case, tested inline (this loop sees every target): inside the root and
        # no component that starts with "." or is empty; everything else gets the full check
        if (
            root is not None
            and len(root) > 1
            and path.startswith(root)
            and path[len(root) : len(root) + 1] == b"/"
            and b"/." not in path
            and b"//" not in path
            and not path.endswith(b"/")
            and b"\0" not in path
        ):
            rel = path[len(root) + 1 :]
        else:
            try:
                if root is None:
                    raise _Skip(
                        "unsafe-root", f"root {show_path(t.root)} is not a plain absolute path"
                    )
                rel = _relative(path, root)
            except _Skip as s:
                skips.append((t.segment, s.kind, str(s)))
                continue
        # NUL never occurs in a name, so this key sorts component by component: every
        # directory's files come together and each directory is opened once
        ready.append((root + b"\0" + rel.replace(b"/", b"\0"), root, rel, t))
    ready.sort(key=lambda r: r[0])
    return ready, skips


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
        else digest_paths([s.path for s in b.deleted]),
        "begin": b.begin,
        "planned": len(b.targets),
    }


def _receipts(
    plans: list[_Group],
    result: PurgeResult,
    audit: AuditLog,
    actor: str,
    sweep_id: int | None,
    on_deleted: Callable[[list[Segment]], None],
) -> None:
    done = [(g, b) for g in plans for b in g.batches if b.deleted]
    for _, b in done:
        result.deleted.extend(b.deleted)
        result.bytes += b.sizes
    if not done:
        return
    try:
        with audit.transaction():
            seqs = []
            for g, b in done:
                on_deleted(b.deleted)
                if not audit.conn.in_transaction:
                    audit.conn.execute("BEGIN IMMEDIATE")  # the callback committed its part
                seqs.append(
                    audit.append_in(
                        actor, PURGE_RECEIPT, g.obj, _receipt_details(g, b, sweep_id)
                    ).seq
                )
    except Exception as exc:
        # the files are gone whatever the catalog says: the receipts must still be written
        # (the rows are stale now; the scanner removes them), then the failure surfaces
        for g, b in done:
            details = _receipt_details(g, b, sweep_id)
            details["catalog_error"] = str(exc)
            result.receipts.append(audit.append(actor, PURGE_RECEIPT, g.obj, details).seq)
        raise
    result.receipts.extend(seqs)


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


def _apply(
    batch: list[tuple[bytes, bytes, bytes, PurgeTarget]],
    walkers: dict[bytes, _DirWalker],
    now: float,
    skips: list[tuple[Segment, str, str]],
) -> tuple[list[Segment], int, set[bytes]]:
    """Re-check each file through its directory fd and unlink it. (deleted, bytes, roots used)

    This loop runs once per deleted file (~144,000 in the purge bench, which must stay within
    1.2x of ``find -delete``): the common path makes no Python-level calls besides the two
    syscalls, and the rare outcomes go through ``_Skip``.
    """
    deleted: list[Segment] = []
    sizes = 0
    used: set[bytes] = set()
    walker: _DirWalker | None = None
    exts_src: frozenset[str] | None = None
    exts: frozenset[bytes] = frozenset()
    # callers may build one frozenset per target; normalise each distinct set once
    ext_cache: dict[frozenset[str], frozenset[bytes]] = {}
    lstat, unlink, is_reg = os.stat, os.unlink, stat.S_ISREG
    for _, root, rel, t in batch:
        seg = t.segment
        try:
            if walker is None or walker.root != root:
                walker = walkers.get(root)
                if walker is None:
                    walker = walkers[root] = _DirWalker(root)
                used.add(root)
            if walker.root_fd < 0:
                raise _Skip(walker.failure_kind, walker.failure)
            if t.extensions is not exts_src:
                exts_src = t.extensions
                exts = ext_cache.get(exts_src) or ext_cache.setdefault(
                    exts_src, _normalise_exts(exts_src)
                )
            i = rel.rfind(b"/")
            name = rel[i + 1 :]
            k = name.rfind(b".")
            if k <= 0 or name[k:].lower() not in exts:
                ext = show_path(_extension(name)) or "no extension"
                raise _Skip("extension", f"{ext} is not a segment extension")
            dirpart = rel[:i] if i >= 0 else b""
            d = walker.cur_fd if dirpart == walker.cur else walker.enter(dirpart)
            try:
                st = lstat(name, dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                raise _Skip("vanished", "file is gone") from None
            except OSError as exc:
                raise _Skip("error", f"cannot stat: {exc.strerror}") from None
            if not is_reg(st.st_mode):
                if stat.S_ISLNK(st.st_mode):
                    raise _Skip("symlink", "is a symlink (never followed, never deleted)")
                raise _Skip("not-regular", "not a regular file")
            mtime = st.st_mtime
            if mtime > now - t.settle:
                raise _Skip("settling", "modified within the settle time (still recording)")
            if st.st_size != seg.size or not (
                -MTIME_TOLERANCE <= mtime - seg.mtime <= MTIME_TOLERANCE
                or _same_second(mtime, seg.mtime)
            ):
                raise _Skip(
                    "changed",
                    f"changed since plan (size {seg.size} -> {st.st_size}, "
                    f"mtime {seg.mtime:.3f} -> {mtime:.3f})",
                )
            try:
                unlink(name, dir_fd=d)
            except FileNotFoundError:
                raise _Skip("vanished", "file is gone") from None
            except OSError as exc:
                raise _Skip("error", f"cannot unlink: {exc.strerror}") from None
        except _Skip as s:
            skips.append((seg, s.kind, str(s)))
            continue
        walker.mark_deleted()
        deleted.append(seg)
        sizes += st.st_size
    return deleted, sizes, used


def _same_second(disk: float, catalog: float) -> bool:
    # a catalog holding whole seconds (truncated st_mtime) still identifies the same file
    return catalog == int(catalog) and int(disk) == int(catalog)


__all__ = ["PurgeResult", "PurgeTarget", "digest_paths", "purge"]
