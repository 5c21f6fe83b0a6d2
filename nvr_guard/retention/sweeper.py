"""Retention as it is carried out: plan, sweep, confirm, and the recovery of a cut-short purge.

The pure ``policy`` decides; this module gathers what it decides on — candidates that are due from
the catalog index, and under disk pressure the oldest footage of only the volume that is short;
the holds; the volumes and their free space (leaving out roots that are missing or now on another
file system, whose footage is not where the catalog says); the sweep history for the clock guard —
and carries the plan out through the guarded ``purge``, with every step in the audit chain. It also
keeps the catalog in step with the roots (reconcile, hints) because a purge cut short must be
recovered before the scanner forgets the rows of the files it deleted.

It lives apart from the engine so that a reader finds "where are deletions carried out" by path,
and so that it depends only on the narrow :class:`~nvr_guard.context.Context`, not on the
workflow or the media gate.
"""

from __future__ import annotations

import fcntl
import fnmatch
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from nvr_guard import mounts
from nvr_guard.attention import CLOCK_SKEW, Attention
from nvr_guard.config import Config
from nvr_guard.context import Clock, Context, site_roots
from nvr_guard.errors import InvalidInput
from nvr_guard.identity import Caller
from nvr_guard.model import (
    Action,
    ClockReading,
    DiskState,
    Item,
    Plan,
    Segment,
    SiteRules,
    Volume,
    show_path,
)
from nvr_guard.retention import policy
from nvr_guard.retention.purge import PurgeTarget, digest_paths, iso_utc, purge
from nvr_guard.retention.recorder import RecorderIndexes
from nvr_guard.retention.scan import ReconcileStats, Scanner, SiteScan
from nvr_guard.store.audit import AuditLog
from nvr_guard.store.catalog import Catalog
from nvr_guard.text import human_bytes
from nvr_guard.times import iso

log = logging.getLogger(__name__)

# who may confirm a sweep a guard stopped, or a root that went out of service
CONFIRM_ROLES = frozenset({"admin"})
# how many of the oldest segments per site and volume are offered to the policy when the
# volume is short
DISK_PRESSURE_BATCH = 20_000


def _mount_point(path: bytes) -> bytes:
    """The mount point of the file system ``path`` is on (for messages)."""
    try:
        dev = os.stat(path).st_dev
        while path != b"/":
            parent = os.path.dirname(path)
            if os.stat(parent).st_dev != dev:
                break
            path = parent
    except OSError:
        pass
    return path


@dataclass
class SweepOutcome:
    """What one sweep (or a dry run, or a preview) did or would do."""

    sweep: int | None
    plan: Plan
    deleted: int = 0
    bytes: int = 0
    skipped: list[tuple[Segment, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    # a preview's findings of the walk: [{site, root, count, examples}] and attention entries
    unmatched: list[dict[str, Any]] | None = None
    attention: list[dict[str, Any]] | None = None
    # a preview's sites under ``retention: none``: [{site, segments, bytes, reason}]
    unmanaged: list[dict[str, Any]] | None = None

    def as_json(self, items: bool = True) -> dict[str, Any]:
        """The outcome as `retention run --json` and `retention plan --json` print it.

        ``items=False``: ``items`` left empty and ``summary`` given instead (one row per site
        and camera, see :func:`summarize`) with ``items_omitted``: what a person's summary
        needs, without sending every segment of a large backlog through the socket."""
        extra: dict[str, Any] = {}
        if items:
            listed = [i.as_json() for i in self.plan.items]
        else:
            listed = []
            extra["summary"] = summarize(
                self.plan.items,
                done=self.sweep is not None,
                skipped={seg.path for seg, _ in self.skipped},
            )
            extra["items_omitted"] = len(self.plan.items)
        if self.unmatched is not None:
            extra["unmatched"] = self.unmatched
        if self.attention is not None:
            extra["attention"] = self.attention
        if self.unmanaged is not None:
            extra["unmanaged"] = self.unmanaged
        return {
            "sweep": self.sweep,
            "deleted": self.deleted,
            "bytes": self.bytes,
            "items": listed,
            "trips": [
                {"kind": t.kind, "site": t.site, "camera": t.camera, "message": m}
                for t, m in zip(self.plan.trips, self.messages, strict=False)
            ],
            "alerts": list(self.plan.alerts),
            "skipped": [{"path": show_path(s.path), "reason": r} for s, r in self.skipped],
        } | extra


def held_back_kind(reason: str) -> str:
    """``held`` / ``settling`` / ``floor`` ...: the rule a reason names first (every reason the
    policy gives starts with it: "held: hold 3 (...)", "settling: modified 40 s ago ...")."""
    head = reason.split(":", 1)[0].strip()
    return head if head and len(head) <= 24 and " " not in head else "other"


def summarize(
    items: Iterable[Item | dict[str, Any]],
    done: bool = False,
    skipped: Collection[bytes | str] = (),
) -> list[dict[str, Any]]:
    """One row per (site, camera), sorted: ``due`` (count, ``bytes``, ``first``/``last``
    recorded start), ``blocked`` (stopped by a guard) and ``kept`` (count per rule that holds
    them back, most first). In a plan what a guard stopped is still due (a confirmation deletes
    it) and also counted as blocked; after a sweep (``done``) it is only blocked, and what the
    purge ``skipped`` (paths: it was found changed, moved or no segment any more) is counted as
    kept (``skipped``), not deleted.

    Items are the policy's, or their JSON (a result read back from the daemon)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for it in items:
        if isinstance(it, dict):
            site, camera, action = str(it["site"]), str(it["camera"]), str(it["action"])
            reason, size, start = str(it["reason"]), int(it.get("size") or 0), it.get("recorded")
            path: bytes | str = str(it["path"])
        else:
            seg = it.segment
            site, camera, action = seg.site, seg.camera, it.action.value
            reason, size, start = it.reason, seg.size, seg.start
            path = seg.path
        if done and action == "delete" and skipped and path in skipped:
            action, reason = "keep", "skipped"
        row = rows.get((site, camera))
        if row is None:
            row = rows[(site, camera)] = {
                "site": site,
                "camera": camera,
                "due": 0,
                "bytes": 0,
                "first": None,
                "last": None,
                "blocked": 0,
                "kept": Counter(),
            }
        if action == "blocked":
            row["blocked"] += 1
        if action == "delete" or (action == "blocked" and not done):
            row["due"] += 1
            row["bytes"] += size
            if start is not None:
                t = float(start)
                row["first"] = t if row["first"] is None else min(row["first"], t)
                row["last"] = t if row["last"] is None else max(row["last"], t)
        elif action == "keep":
            row["kept"][held_back_kind(reason)] += 1
    out = []
    for key in sorted(rows):
        row = rows[key]
        row["kept"] = dict(row["kept"].most_common())
        out.append(row)
    return out


# upper bounds (seconds) of the deletion-lateness histogram: a healthy daemon stays within one
# sweep interval (default 5 min); hours mean holds released late or a daemon that was down
LATENESS_BUCKETS = (1.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0)


@dataclass
class RetentionStats:
    """What the engine counts while it runs, for ``status`` and the metrics (process lifetime;
    Prometheus counters are expected to restart from zero with the daemon).

    Lateness is how long after its expiry (``policy.expiry_both``) a segment was actually deleted,
    measured with the engine clock when the purge finished. Segments deleted before their expiry
    (disk pressure) are counted as ``early`` and kept out of the lateness figures.
    """

    deleted: int = 0
    bytes: int = 0
    early: int = 0
    sweeps: int = 0
    trips: dict[str, int] = field(default_factory=dict)  # guard kind -> sweeps it stopped
    last_sweep: float | None = None  # engine wall clock of the last (non-dry) sweep
    last_lateness_max: float | None = None  # of the last sweep that deleted past expiry
    lateness_max: float = 0.0
    lateness_sum: float = 0.0
    lateness_count: int = 0
    # per bucket of LATENESS_BUCKETS (not cumulative), plus one for larger values
    lateness_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENESS_BUCKETS) + 1))

    def note_sweep(
        self,
        when: float,
        deleted: list[Segment],
        bytes_: int,
        rules: dict[str, SiteRules],
        trips: Iterable[str] = (),
    ) -> None:
        """Count one finished sweep: its deletions, their lateness, the guards that tripped."""
        self.sweeps += 1
        self.last_sweep = when
        for kind in trips:
            self.trips[kind] = self.trips.get(kind, 0) + 1
        self.deleted += len(deleted)
        self.bytes += bytes_
        worst: float | None = None
        for seg in deleted:
            r = rules.get(seg.site)
            exp = (
                policy.expiry_both(seg.start, seg.mtime, r.for_camera(seg.camera))
                if r is not None
                else None
            )
            if exp is None or exp > when:
                self.early += 1
                continue
            late = when - exp
            worst = late if worst is None else max(worst, late)
            self.lateness_sum += late
            self.lateness_count += 1
            self.lateness_max = max(self.lateness_max, late)
            i = 0
            while i < len(LATENESS_BUCKETS) and late > LATENESS_BUCKETS[i]:
                i += 1
            self.lateness_buckets[i] += 1
        if worst is not None:
            self.last_lateness_max = worst

    def as_json(self) -> dict[str, Any]:
        """The counts as ``status`` reports them under ``retention``."""
        return {
            "sweeps": self.sweeps,
            "deleted": self.deleted,
            "bytes": self.bytes,
            "deleted_early": self.early,
            "guard_trips": dict(self.trips),
            "last_sweep_lateness_max": None
            if self.last_lateness_max is None
            else round(self.last_lateness_max, 1),
            "lateness_max": round(self.lateness_max, 1),
            "lateness_mean": round(self.lateness_sum / self.lateness_count, 1)
            if self.lateness_count
            else None,
        }


class Sweeper:
    """The retention operations of one instance, on its context. Each public method takes the
    context's lock itself; the engine delegates to them unchanged."""

    def __init__(self, ctx: Context, stats: RetentionStats | None = None) -> None:
        self.ctx = ctx
        self.stats = stats if stats is not None else RetentionStats()
        self.rules: dict[str, SiteRules] = {}
        self.indexes = RecorderIndexes(ctx.config)  # the recorders' own databases
        self.configure(ctx.config)

    # ---- the context, as the operations below read it ------------------------------------
    @property
    def config(self) -> Config:
        """The config in force."""
        return self.ctx.config

    @property
    def catalog(self) -> Catalog:
        """The catalog (segments, holds, sweeps)."""
        return self.ctx.catalog

    @property
    def audit(self) -> AuditLog:
        """The audit chain."""
        return self.ctx.audit

    @property
    def attention(self) -> Attention:
        """The attention registry."""
        return self.ctx.attention

    @property
    def clock(self) -> Clock:
        """The instance's clock."""
        return self.ctx.clock

    @property
    def lock(self) -> threading.RLock:
        """The instance's one lock."""
        return self.ctx.lock

    def configure(self, config: Config) -> None:
        """Take the rules and the roots of ``config`` (at start and on a reload): a new scanner
        over the new roots; the catalog and the sweep history stay."""
        self.rules = config.site_rules()
        self.indexes.configure(config)
        self.scanner = Scanner(
            self.catalog,
            self.site_scans(config),
            clock=lambda: self.clock().wall,
            attention=self.attention,
        )
        # a camera a reload gave to another site of a shared root: its rows follow it now,
        # judged by their new site's rules from the next sweep on
        for site in sorted(self.scanner.reassign()):
            if site in self.rules:
                self.catalog.recompute_expiry(site, self.rules[site])

    def site_scans(self, config: Config | None = None) -> list[SiteScan]:
        """What the scanner walks: each site's roots, layout, extensions and rules."""
        config = self.config if config is None else config
        out = []
        for name, site in config.sites.items():
            out.append(
                SiteScan(
                    site=name,
                    roots=[os.fsencode(str(r)) for r in site.roots],
                    layout=config.layout_for(name),
                    extensions=config.extensions_for(name),
                    rules=self.rules[name],
                    cross_mounts=site.cross_mounts,
                    cameras=tuple(site.cameras) if site.cameras is not None else None,
                )
            )
        return out

    # ---- scanning ------------------------------------------------------------------------
    def reconcile(self, full: bool = True) -> ReconcileStats:
        """Bring the catalog in step with the roots: a full walk (start, hourly) or only the
        directories that changed; purges cut short are recovered first."""
        with self.lock:
            # before the scanner drops the rows of files a cut-short purge deleted: they are
            # what its receipt is written from
            self.recover_purges()
            if full:
                out = self.scanner.reconcile()
                # one pass over the catalog: with the full reconcile (start, hourly), not a sweep
                self.report_clock_skew()
            else:
                out = self.scanner.incremental()
            self._note_root_devices()
            return out

    def _note_root_devices(self) -> None:
        """Remember which file system each root in service is on, and where it is mounted.

        The scanner decides whether a root is in service (``Scanner.unhealthy_roots``: missing,
        emptied, unreadable, or on another file system than at its last walk until an admin
        confirms it) and reports it as an attention state; only roots it walked are recorded
        here. Between a mount change and the next pass, :meth:`excluded_roots` still leaves a
        root whose device differs from this record out of disk pressure.
        """
        out = self.scanner.unhealthy_roots()
        rows: list[tuple[bytes, str, int, bytes]] = []
        for site, roots in site_roots(self.config).items():
            for rb in roots:
                if rb in out:
                    continue
                try:
                    st = os.lstat(rb)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    rows.append((rb, site, st.st_dev, _mount_point(rb)))
        if rows:
            self.catalog.set_root_devices(rows, self.clock().wall)

    def report_clock_skew(self) -> None:
        """Cameras whose path times and mtimes disagree beyond ``guards.max_clock_skew`` become
        ``clock_skew`` attention entries (one per camera, with the segment that disagrees most);
        cameras that agree again are cleared. Their footage is safe either way (both times
        must be past keep), but a camera with a wrong clock names footage at the wrong time and
        a name in the future keeps it past its ceiling."""
        tol = self.config.guard_rules().max_clock_skew
        tol_txt = str(self.config.guards.max_clock_skew)
        by_site: dict[str, list[Any]] = {}
        for r in self.catalog.clock_skew(tol):
            by_site.setdefault(r.site, []).append(r)
        for site, rules in self.rules.items():
            entries = []
            for r in by_site.get(site, []):
                named, modified = iso(r.start, rules.tz), iso(r.mtime, rules.tz)
                effect = (
                    "names in the future keep their files past keep until the name says so"
                    if r.start > r.mtime
                    else "such files are kept until their mtime is past keep too"
                )
                entries.append(
                    (
                        r.camera,
                        f"camera {r.camera}: {r.count:,} segment(s) whose path time and mtime "
                        f"disagree by more than max_clock_skew={tol_txt}, e.g. "
                        f"{show_path(r.path)} is named {named} but was modified {modified}; "
                        f"{effect}. Check the camera's clock (NTP) and the recorder's",
                        {
                            "camera": r.camera,
                            "count": r.count,
                            "example": show_path(r.path),
                            "path_time": named,
                            "mtime": modified,
                        },
                    )
                )
            self.attention.replace(CLOCK_SKEW, site, entries)

    def hint(self, path: bytes) -> None:
        """One path the watcher saw change: catalogue or forget it now."""
        with self.lock:
            self.scanner.hint(path)

    def confirm_root(self, caller: Caller, site: str, root: str) -> dict[str, Any]:
        """An admin accepts a root that went out of service (another file system, emptied,
        missing) as it is now; see :meth:`Scanner.confirm_root`. Audited."""
        self.ctx.require(caller, CONFIRM_ROLES, f"confirm root {root} of site {site}")
        with self.lock:
            try:
                res = self.scanner.confirm_root(site, os.fsencode(root))
            except KeyError as e:
                raise InvalidInput(str(e.args[0]) if e.args else str(e)) from None
            except ValueError as e:
                raise InvalidInput(str(e)) from None
            self.audit.append(
                caller.user,
                "root.confirm",
                f"root:{site}:{res['root']}",
                {**res, "uid": caller.uid},
            )
            return res

    # ---- retention -----------------------------------------------------------------------
    def excluded_roots(self) -> set[bytes]:
        """Roots whose footage counts on no volume: missing, or on another file system than the
        one recorded at the last reconcile (a mount that is gone leaves its mount point on the
        parent file system; that is not where the footage is)."""
        recorded = self.catalog.root_devices()
        walked = self.catalog.root_fs_all()
        out: set[bytes] = set()
        for roots in site_roots(self.config).values():
            for rb in roots:
                try:
                    st = os.lstat(rb)
                except OSError:
                    out.add(rb)
                    continue
                old = recorded.get(rb)
                if not stat.S_ISDIR(st.st_mode) or old is None or old[0] != st.st_dev:
                    out.add(rb)
                    continue
                # the same device but another directory (a bind mount over the root since the
                # last walk): its catalogued footage is not what is there now
                was = walked.get(rb)
                if was is not None:
                    try:
                        if not mounts.same_directory(was, mounts.dir_identity(rb, st)):
                            out.add(rb)
                    except OSError:
                        out.add(rb)
        # and what the scanner found out of service: emptied, unreadable, another file system
        return out | self.scanner.unhealthy_roots()

    def disk_volumes(self, excluded: set[bytes] | None = None) -> list[Volume]:
        """The file systems (by ``st_dev``) holding the roots that are not ``excluded`` (by
        default :meth:`excluded_roots`), with their free space and the footage on each."""
        if excluded is None:
            excluded = self.excluded_roots()
        members: dict[int, list[tuple[str, bytes | None]]] = {}
        table = mounts.mounts()
        for name, roots in site_roots(self.config).items():
            cross = self.config.sites[name].cross_mounts
            for rb in roots:
                if rb in excluded:
                    continue
                try:
                    dev = os.lstat(rb).st_dev
                except OSError as e:
                    log.warning("site %s: cannot stat root %s: %s", name, show_path(rb), e)
                    continue
                members.setdefault(dev, []).append((name, rb))
                if not cross:
                    continue  # the scanner never catalogues footage below a mount point there
                # every file system mounted below the root is a volume of its own: its footage
                # is the site's but not on the root's volume (the policy gives a segment to the
                # deepest member containing it)
                for mp in sorted(mounts.mount_points_below(rb, table)):
                    try:
                        st = os.lstat(mp)
                    except OSError:
                        continue  # hidden under a later mount, or gone
                    if stat.S_ISDIR(st.st_mode):
                        members.setdefault(st.st_dev, []).append((name, mp))
        out: list[Volume] = []
        for mem in members.values():
            first = mem[0][1]
            assert first is not None
            try:
                u = psutil.disk_usage(os.fsdecode(first))
            except OSError as e:
                log.warning("cannot read free space of %s: %s", show_path(first), e)
                continue
            name = show_path(_mount_point(first))
            out.append(Volume(name, u.total, u.free, tuple(mem)))
        return out

    def disk_states(self, volumes: Sequence[Volume] | None = None) -> dict[str, DiskState]:
        """Per site, the fullest of the volumes its roots are on (for status and alerts)."""
        states: dict[str, DiskState] = {}
        for v in self.disk_volumes() if volumes is None else volumes:
            st = v.state
            for name in v.sites():
                worst = states.get(name)
                if worst is None or st.free / max(st.total, 1) < worst.free / max(worst.total, 1):
                    states[name] = st
        return states

    def _candidates(
        self, now: ClockReading, site: str | None, excluded: set[bytes] | None = None
    ) -> tuple[list[Segment], list[Volume]]:
        sites = [site] if site else list(self.rules)
        seen: set[bytes] = set()
        cands: list[Segment] = []
        for s in sites:
            for seg in self.catalog.due_segments(now.wall, s, self.rules):
                if seg.path not in seen:
                    seen.add(seg.path)
                    cands.append(seg)
        volumes = self.disk_volumes(excluded)
        for v in volumes:
            fractions = [self.rules[s].min_free for s in v.sites() if s in self.rules]
            min_free = max(fractions, default=0.0)
            if not min_free or not v.state.bytes_to_free(min_free):
                continue
            # only footage on the volume that is short: another file system of the same site
            # has space of its own, and deleting there frees nothing here
            for s in v.sites():
                if s not in sites or not self.rules[s].enforce:
                    continue  # (retention: none: nothing of it is ever deleted)
                under = [r for m, r in v.members if m == s and r is not None]
                # below a root, what another volume's member holds is not on this volume
                elsewhere = [r for w in volumes if w is not v for m, r in w.members if m == s and r]
                not_under = {r: [o for o in elsewhere if o.startswith(r + b"/")] for r in under}
                for seg in self.catalog.oldest_segments(
                    s, DISK_PRESSURE_BATCH, under=under, not_under=not_under
                ):
                    if seg.path not in seen:
                        seen.add(seg.path)
                        cands.append(seg)
        return cands, volumes

    def plan(
        self,
        now: ClockReading | None = None,
        site: str | None = None,
        confirmed: policy.Confirmation | None = None,
        excluded: set[bytes] | None = None,
    ) -> Plan:
        """What a sweep would do now, as the policy decides it.

        ``excluded``: roots left out of disk pressure (default :meth:`excluded_roots`)."""
        if site is not None and site not in self.rules:
            raise InvalidInput(f"unknown site {site!r}; sites: {', '.join(sorted(self.rules))}")
        now = now or self.clock()
        with self.lock:
            cands, volumes = self._candidates(now, site, excluded)
            keys = {(s.site, s.camera) for s in cands}
            totals = self.catalog.camera_totals(keys) if keys else {}
            return policy.decide(
                cands,
                now,
                self.rules if site is None else {site: self.rules[site]},
                self.config.guard_rules(),
                self.catalog.active_holds(now.wall),
                totals,
                history=self.catalog.last_history(),
                confirmed=confirmed,
                volumes=volumes,
            )

    def _targets(self, items: Iterable[Item]) -> list[PurgeTarget]:
        targets = []
        # which directory each root was when its footage was catalogued: the purge refuses a
        # root that is another directory now (a bind mount over it since)
        walked = self.catalog.root_fs_all()
        # per site, made once: a backlog is a hundred thousand targets, and a set of extensions
        # made for each of them alone took 150 MB
        per_site: dict[str, tuple[list[bytes], frozenset[str], float, tuple[bytes, ...]]] = {}
        for it in items:
            seg = it.segment
            site = self.config.sites[seg.site]
            if site.retention == "none":  # the policy keeps all of it; never reach the purge
                log.warning(
                    "not deleting %s: site %s has retention: none", show_path(seg.path), seg.site
                )
                continue
            known = per_site.get(seg.site)
            if known is None:
                known = per_site[seg.site] = (
                    [os.fsencode(str(r)).rstrip(b"/") + b"/" for r in site.roots],
                    self.config.extensions_for(seg.site),
                    self.rules[seg.site].settle,
                    self._sidecars(seg.site),
                )
            roots, extensions, settle, sidecars = known
            root = None
            for rb in roots:
                if seg.path.startswith(rb):
                    root = rb.rstrip(b"/")
                    break
            if root is None:  # catalog row from an older config: never delete outside the roots
                log.warning(
                    "not deleting %s: outside the roots of site %s", show_path(seg.path), seg.site
                )
                continue
            if site.cameras is not None and not any(
                fnmatch.fnmatchcase(seg.camera, p) for p in site.cameras
            ):
                # a row the scanner has not re-assigned yet: never by another site's rule
                log.warning(
                    "not deleting %s: camera %s is not one of site %s's cameras",
                    show_path(seg.path),
                    seg.camera,
                    seg.site,
                )
                continue
            targets.append(
                PurgeTarget(
                    segment=seg,
                    root=root,
                    extensions=extensions,
                    settle=settle,
                    cross_mounts=site.cross_mounts,
                    root_id=walked.get(root),
                    sidecars=sidecars,
                )
            )
        return targets

    def _sidecars(self, site: str) -> tuple[bytes, ...]:
        """Suffixes of the files the purge removes with a segment of the site (its preset's:
        motionEye's ``.thumb``)."""
        layout = self.config.layout_for(site)
        return layout.suffix_sidecars if layout is not None else ()

    def _purge_lock(self, wait: bool) -> int | None:
        """An exclusive flock on ``purge.lock`` next to the catalog, held while a sweep purges:
        it tells recovery in another process (a local CLI run) that a purge is live, not cut
        short. The kernel drops it when its holder dies, kill -9 included. None: not obtained."""
        path = Path(self.catalog.path).parent / "purge.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def recover_purges(self, actor: str = "nvr-guard") -> int:
        """Write the receipts of purge batches cut short between their unlinks and their receipt
        (kill -9, power loss, a full ``state_dir``); returns how many files they name.

        Such a sweep is still ``applying`` (or ``blocked``) without ``finished``. A batch without
        receipt deleted those of its planned paths (``sweep_items``) whose catalog row is still
        there but whose file is gone: a receipt marked ``recovered`` names them, and their rows go
        in the same transaction. Nothing happens while another process holds the purge lock.
        """
        with self.lock:
            stale = self.catalog.unfinished_sweeps()
            if not stale:
                return 0
            fd = self._purge_lock(wait=False)
            if fd is None:
                return 0  # a purge is running in another process: its sweeps are not stale
            try:
                return self._recover(stale, actor)
            finally:
                os.close(fd)
                self.indexes.report(self.attention)

    def _recover(self, stale: list[int], actor: str) -> int:
        begins: dict[int, Any] = {}
        receipted: set[int] = set()
        for e in self.audit.entries(action="purge."):
            if e.details.get("sweep") not in stale:
                continue
            if e.action == "purge.begin":
                begins[e.seq] = e
            elif e.action == "purge.receipt":
                receipted.add(int(e.details.get("begin", 0)))
        total = 0
        for sid in stale:
            claimed: set[bytes] = set()
            items = [i for i in self.catalog.sweep_items(sid) if i.action == Action.DELETE.value]
            for seq in sorted(s for s, e in begins.items() if e.details.get("sweep") == sid):
                if seq in receipted:
                    continue
                d = begins[seq].details
                gone: list[Segment] = []
                for i in items:
                    if i.site != d.get("site") or i.camera != d.get("camera") or i.path in claimed:
                        continue
                    seg = self.catalog.get(i.path)
                    if seg is not None and not os.path.lexists(i.path):
                        gone.append(seg)
                        claimed.add(i.path)
                if not gone:
                    continue  # the batch was cut short before its first unlink
                starts = [g.start for g in gone]
                index = self.indexes.after_batch(gone) or {}  # the recorder's rows of them too
                with self.audit.transaction():
                    self._forget(gone)
                    self.audit.reopen_transaction()
                    self.audit.append_in(
                        actor,
                        "purge.receipt",
                        begins[seq].object,
                        {
                            "sweep": sid,
                            "site": d.get("site"),
                            "camera": d.get("camera"),
                            "count": len(gone),
                            "bytes": sum(g.size for g in gone),
                            "from": iso_utc(min(starts)),
                            "to": iso_utc(max(starts)),
                            "digest": digest_paths([g.path for g in gone]),
                            "begin": seq,
                            "planned": d.get("planned"),
                            "recovered": True,
                            **index,
                        },
                    )
                total += len(gone)
                log.warning(
                    "sweep %d was cut short after deleting %d files of %s/%s; their receipt is "
                    "written now",
                    sid,
                    len(gone),
                    d.get("site"),
                    d.get("camera"),
                )
            sw = self.catalog.get_sweep(sid)
            self.catalog.set_sweep_state(
                sid,
                "blocked" if sw is not None and sw.state == "blocked" else "failed",
                finished=self.clock().wall,
                message=(sw.message if sw is not None and sw.message else "")
                or "cut short (the process died); receipts recovered at the next start",
            )
        return total

    def _forget(self, segs: list[Segment]) -> None:
        self.catalog.remove_segments(segs)

    def sweep(
        self,
        actor: str = "nvr-guard",
        now: ClockReading | None = None,
        dry_run: bool = False,
        site: str | None = None,
        confirmed: policy.Confirmation | None = None,
        confirm_of: int | None = None,
    ) -> SweepOutcome:
        """Plan and carry out one sweep (``dry_run``: only plan); recorded as a sweep with its
        items, trips and alerts, and every deletion in the audit chain."""
        now = now or self.clock()
        with self.lock:
            if not dry_run:
                self.recover_purges(actor)  # a sweep cut short leaves its receipts to write
            plan = self.plan(now, site=site, confirmed=confirmed)
            if dry_run:
                return SweepOutcome(
                    None, plan, messages=[policy.trip_message(t, None) for t in plan.trips]
                )
            deletions = plan.deletions
            rules_now = {s: r.describe() for s, r in self.rules.items()}
            if not plan.items and not plan.trips and not plan.alerts:
                # nothing due: remember the sweep (the clock guard measures from it), cheaply
                sid = self.catalog.begin_sweep(
                    started=now.wall, actor=actor, clock=now, site_rules=rules_now, state="done"
                )
                self.stats.note_sweep(now.wall, [], 0, self.rules)
                return SweepOutcome(sid, plan)
            previous = self.catalog.latest_sweep()
            sweep_id = self.catalog.begin_sweep(
                started=now.wall,
                actor=actor,
                clock=now,
                site_rules=rules_now,
                state="blocked" if plan.trips else "applying",
            )
            self.catalog.record_items(sweep_id, plan.items)
            if plan.trips:
                self.catalog.set_sweep_trips(
                    sweep_id,
                    [
                        {
                            "kind": t.kind,
                            "site": t.site,
                            "camera": t.camera,
                            "count": t.count,
                            "measured": t.measured,
                        }
                        for t in plan.trips
                    ],
                )
            messages = [policy.trip_message(t, sweep_id) for t in plan.trips]
            # the same trip repeats every sweep until an admin confirms: audit it once
            summary = "\n".join(policy.trip_message(t, None) for t in plan.trips)
            repeated = (
                previous is not None and previous.state == "blocked" and previous.message == summary
            )
            for t, m in zip(plan.trips, messages, strict=True):
                if repeated:
                    log.debug("%s", m)
                    continue
                log.warning("%s", m)
                self.audit.append(
                    actor,
                    "sweep.blocked",
                    f"sweep:{sweep_id}",
                    {
                        "kind": t.kind,
                        "site": t.site,
                        "camera": t.camera,
                        "count": t.count,
                        "total": t.total,
                        "message": m,
                    },
                )
            for a in plan.alerts:
                log.warning("%s", a)
                if not repeated:
                    self.audit.append(actor, "disk.alert", f"sweep:{sweep_id}", {"message": a})
            lock = self._purge_lock(wait=True)
            assert lock is not None  # a blocking flock returns only once it holds the lock
            try:
                result = purge(
                    self._targets(deletions),
                    audit=self.audit,
                    actor=actor,
                    sweep_id=sweep_id,
                    now=lambda: self.clock().wall,
                    on_deleted=self._forget,
                    after_batch=self.indexes.after_batch,
                )
                self.catalog.set_sweep_state(
                    sweep_id,
                    "blocked" if plan.trips else "done",
                    finished=self.clock().wall,
                    deleted=len(result.deleted),
                    bytes_=result.bytes,
                    message=summary,
                )
            finally:
                os.close(lock)
                self.indexes.report(self.attention)
            if confirm_of is not None and not plan.trips:
                # blocked again (a guard tripped since): the old sweep stays unconfirmed, and
                # the new one says what changed
                self.catalog.set_sweep_state(confirm_of, "confirmed")
            self.stats.note_sweep(
                self.clock().wall,
                result.deleted,
                result.bytes,
                self.rules,
                trips=[t.kind for t in plan.trips],
            )
            if result.deleted:
                log.info(
                    "sweep %d: deleted %d segments (%s)%s",
                    sweep_id,
                    len(result.deleted),
                    human_bytes(result.bytes),
                    f", {len(plan.blocked)} held back by a guard" if plan.blocked else "",
                )
            return SweepOutcome(
                sweep_id,
                plan,
                deleted=len(result.deleted),
                bytes=result.bytes,
                skipped=list(result.skipped),
                messages=messages,
            )

    def confirm(
        self, sweep_id: int, caller: Caller, now: ClockReading | None = None
    ) -> SweepOutcome:
        """Release a sweep stopped by a guard: delete what it held back (re-checked now).

        The release is exactly what the admin was shown: the plan is made again with the held
        back paths exempt from the mass-deletion guard, and the clock guard accepting the jump
        that sweep measured (only if the clock guard was among its trips). Anything beyond that
        — a later clock jump, more deletions than the guards let through — blocks the whole
        confirmation again, as a new blocked sweep to review."""
        self.ctx.require(caller, CONFIRM_ROLES, f"confirm sweep {sweep_id}")
        with self.lock:
            sw = self.catalog.get_sweep(sweep_id)
            if sw is None:
                raise InvalidInput(
                    f"no sweep {sweep_id}; see `nvr-guard status` for blocked sweeps"
                )
            if sw.state != "blocked":
                raise InvalidInput(
                    f"sweep {sweep_id} is {sw.state}, not blocked: nothing to confirm"
                )
            blocked = [
                i.path
                for i in self.catalog.sweep_items(sweep_id)
                if i.action == Action.BLOCKED.value
            ]
            # sweeps blocked before their trips were stored accept no clock jump: a clock trip
            # then blocks again, as a sweep that records what it showed
            jumps = [
                float(t.get("measured") or 0.0)
                for t in self.catalog.sweep_trips(sweep_id)
                if t.get("kind") == "clock-jump"
            ]
            conf = policy.Confirmation(
                paths=frozenset(blocked),
                accept_clock=bool(jumps),
                clock_jump=max(jumps) if jumps else None,
                whole=True,
                since=sw.clock,
            )
            self.audit.append(
                caller.user,
                "sweep.confirm",
                f"sweep:{sweep_id}",
                {"blocked": len(blocked), "uid": caller.uid, "clock_jump": conf.clock_jump},
            )
            return self.sweep(actor=caller.user, now=now, confirmed=conf, confirm_of=sweep_id)
