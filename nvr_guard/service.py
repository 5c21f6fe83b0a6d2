"""The engine: wires config, catalog, scanner, policy, purge and audit into the operations the
daemon schedules and the CLI calls (retention plan/run/confirm, holds, status).

Decisions are made by the pure ``policy``; this module gathers their inputs (candidates from the
catalog index, holds, disk figures, sweep history, the clock) and carries out the plan through the
guarded ``purge``. Every operation that changes state is recorded in the audit chain.
"""

from __future__ import annotations

import fcntl
import grp
import json
import logging
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from nvr_guard import policy
from nvr_guard.attention import CLOCK_SKEW, Attention
from nvr_guard.audit import AuditLog
from nvr_guard.catalog import Catalog
from nvr_guard.config import Config
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.model import (
    Action,
    ClockReading,
    DiskState,
    Hold,
    Item,
    Plan,
    Segment,
    SiteRules,
    boot_clock,
    show_path,
)
from nvr_guard.purge import PurgeTarget, digest_paths, iso_utc, purge
from nvr_guard.scan import Scanner, SiteScan
from nvr_guard.times import human_bytes, iso, parse_time

log = logging.getLogger("nvr_guard.service")

# roles that may place and release manual legal holds and confirm guarded sweeps
HOLD_ROLES = frozenset({"admin", "security_lead"})
CONFIRM_ROLES = frozenset({"admin"})
# how many of the oldest segments per site are offered to the policy when the disk is short
DISK_PRESSURE_BATCH = 20_000


@dataclass(frozen=True)
class Caller:
    """Who acts: from SO_PEERCRED through the control socket, or the local user."""

    uid: int
    user: str
    groups: tuple[str, ...] = ()

    @classmethod
    def local(cls) -> Caller:
        uid = os.getuid()
        return cls.from_uid(uid)

    @classmethod
    def from_uid(cls, uid: int, gid: int | None = None) -> Caller:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid, f"uid:{uid}", ())
        gids = os.getgrouplist(pw.pw_name, pw.pw_gid if gid is None else gid)
        names = []
        for g in gids:
            try:
                names.append(grp.getgrgid(g).gr_name)
            except KeyError:
                names.append(f"gid:{g}")
        return cls(uid, pw.pw_name, tuple(sorted(set(names))))


@dataclass
class SweepOutcome:
    sweep: int | None
    plan: Plan
    deleted: int = 0
    bytes: int = 0
    skipped: list[tuple[Segment, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        items = [i.as_json() for i in self.plan.items]
        return {
            "sweep": self.sweep,
            "deleted": self.deleted,
            "bytes": self.bytes,
            "items": items,
            "trips": [
                {"kind": t.kind, "site": t.site, "camera": t.camera, "message": m}
                for t, m in zip(self.plan.trips, self.messages, strict=False)
            ],
            "alerts": list(self.plan.alerts),
            "skipped": [{"path": show_path(s.path), "reason": r} for s, r in self.skipped],
        }


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
        self.sweeps += 1
        self.last_sweep = when
        for kind in trips:
            self.trips[kind] = self.trips.get(kind, 0) + 1
        self.deleted += len(deleted)
        self.bytes += bytes_
        worst: float | None = None
        for seg in deleted:
            r = rules.get(seg.site)
            exp = policy.expiry_both(seg.start, seg.mtime, r) if r is not None else None
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


class Engine:
    """State and operations of one nvr-guard instance. Thread-safe through one lock: the daemon's
    scheduler, watcher and control threads all come through here."""

    def __init__(
        self,
        config: Config,
        clock: Callable[[], ClockReading] = boot_clock,
        db_path: Path | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        if db_path is None:
            state_dir = Path(config.state_dir)
            state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            db_path = state_dir / "catalog.db"
        self.catalog = Catalog(db_path)
        # one lock for the engine and its SQLite connection: the watcher's hints, the scheduler's
        # jobs and the control socket's commands share that connection, and a statement from one
        # thread must never land inside another thread's transaction
        self.lock = self.catalog.lock
        self.audit = AuditLog(self.catalog.conn, clock=lambda: self.clock().wall)
        self.rules: dict[str, SiteRules] = config.site_rules()
        self.scanner = Scanner(self.catalog, self.site_scans(), clock=lambda: self.clock().wall)
        self._workflow: Any = None
        self._media: Any = None
        self.stats = RetentionStats()
        # what the admin must see (status `attention`, metric, audit): see nvr_guard.attention
        self.attention = Attention(
            lambda action, obj, details: self.audit.append("nvr-guard", action, obj, details)
        )

    @property
    def media(self) -> Any:
        """The USB media gate (``nvr_guard.media.ops.MediaOps``), made on first use."""
        if self._media is None:
            from nvr_guard.media.ops import MediaOps

            self._media = MediaOps(self)
        return self._media

    @property
    def workflow(self) -> Any:
        """Requests, approvals and exports (``nvr_guard.workflow.Workflow``), made on first use."""
        if self._workflow is None:
            from nvr_guard.workflow import Workflow

            self._workflow = Workflow(self)
        return self._workflow

    # ---- configuration -------------------------------------------------------------------
    def site_scans(self) -> list[SiteScan]:
        out = []
        for name, site in self.config.sites.items():
            out.append(
                SiteScan(
                    site=name,
                    roots=[os.fsencode(str(r)) for r in site.roots],
                    layout=self.config.layout_for(name),
                    extensions=self.config.extensions_for(name),
                    rules=self.rules[name],
                )
            )
        return out

    def apply_config(self, new: Config, actor: str) -> dict[str, Any]:
        """Switch to an already validated config (SIGHUP); audit the change with both digests."""
        with self.lock:
            old = self.config
            old_rules = self.rules
            self.config = new
            self.rules = new.site_rules()
            self.scanner = Scanner(self.catalog, self.site_scans(), clock=lambda: self.clock().wall)
            changed = [
                s
                for s in self.rules
                if s not in old_rules or old_rules[s].describe() != self.rules[s].describe()
            ]
            for s in changed:
                self.catalog.recompute_expiry(s, self.rules[s])
            details = {
                "old_digest": old.digest,
                "new_digest": new.digest,
                "path": str(new.source_path),
                "changed_sites": {
                    s: {
                        "old": old_rules[s].describe() if s in old_rules else None,
                        "new": self.rules[s].describe(),
                    }
                    for s in changed
                },
            }
            self.audit.append(actor, "config.reload", str(new.source_path), details)
            return details

    # ---- identity ------------------------------------------------------------------------
    def roles_for(self, caller: Caller) -> set[str]:
        """Roles from ``people``: the user's own roles plus those of their Unix groups. root is
        an administrator of this host in any case (it could edit the state directly)."""
        roles: set[str] = set()
        people = self.config.people
        user = people.users.get(caller.user)
        if user is not None:
            roles.update(user.roles)
        for g in caller.groups:
            group = people.groups.get(g)
            if group is not None:
                roles.update(group.roles)
        if caller.uid == 0:
            roles.add("admin")
        return roles

    def require(self, caller: Caller, allowed: frozenset[str], what: str) -> None:
        if self.roles_for(caller) & allowed:
            return
        self.audit.append(
            caller.user, "access.denied", what, {"uid": caller.uid, "needs": sorted(allowed)}
        )
        raise PolicyRefused(
            f"{caller.user} may not {what}: needs role {' or '.join(sorted(allowed))} "
            f"(people: in {self.config.source_path})"
        )

    # ---- scanning ------------------------------------------------------------------------
    def reconcile(self, full: bool = True) -> Any:
        with self.lock:
            # before the scanner drops the rows of files a cut-short purge deleted: they are
            # what its receipt is written from
            self.recover_purges()
            if full:
                stats = self.scanner.reconcile()
                # one pass over the catalog: with the full reconcile (start, hourly), not a sweep
                self.report_clock_skew()
                return stats
            return self.scanner.incremental()

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
        with self.lock:
            self.scanner.hint(path)

    # ---- retention -----------------------------------------------------------------------
    def disk_states(self) -> dict[str, DiskState]:
        states: dict[str, DiskState] = {}
        for name, site in self.config.sites.items():
            worst: DiskState | None = None
            for root in site.roots:
                try:
                    u = psutil.disk_usage(str(root))
                except OSError as e:
                    log.warning("site %s: cannot read free space of %s: %s", name, root, e)
                    continue
                st = DiskState(total=u.total, free=u.free)
                if worst is None or st.free / max(st.total, 1) < worst.free / max(worst.total, 1):
                    worst = st
            if worst is not None:
                states[name] = worst
        return states

    def _candidates(
        self, now: ClockReading, site: str | None
    ) -> tuple[list[Segment], dict[str, DiskState]]:
        sites = [site] if site else list(self.rules)
        seen: set[bytes] = set()
        cands: list[Segment] = []
        for s in sites:
            for seg in self.catalog.due_segments(now.wall, s, self.rules):
                if seg.path not in seen:
                    seen.add(seg.path)
                    cands.append(seg)
        disk = self.disk_states()
        for s in sites:
            d = disk.get(s)
            if d is not None and d.bytes_to_free(self.rules[s].min_free) > 0:
                for seg in self.catalog.oldest_segments(s, DISK_PRESSURE_BATCH):
                    if seg.path not in seen:
                        seen.add(seg.path)
                        cands.append(seg)
        return cands, disk

    def plan(
        self,
        now: ClockReading | None = None,
        site: str | None = None,
        confirmed: policy.Confirmation | None = None,
    ) -> Plan:
        if site is not None and site not in self.rules:
            raise InvalidInput(f"unknown site {site!r}; sites: {', '.join(sorted(self.rules))}")
        now = now or self.clock()
        with self.lock:
            cands, disk = self._candidates(now, site)
            keys = {(s.site, s.camera) for s in cands}
            totals = self.catalog.camera_totals(keys) if keys else {}
            return policy.decide(
                cands,
                now,
                self.rules if site is None else {site: self.rules[site]},
                self.config.guard_rules(),
                self.catalog.active_holds(now.wall),
                totals,
                disk=disk,
                history=self.catalog.last_history(),
                confirmed=confirmed,
            )

    def _targets(self, items: Iterable[Item]) -> list[PurgeTarget]:
        targets = []
        for it in items:
            seg = it.segment
            site = self.config.sites[seg.site]
            root = None
            for r in site.roots:
                rb = os.fsencode(str(r)).rstrip(b"/") + b"/"
                if seg.path.startswith(rb):
                    root = rb.rstrip(b"/")
                    break
            if root is None:  # catalog row from an older config: never delete outside the roots
                log.warning(
                    "not deleting %s: outside the roots of site %s", show_path(seg.path), seg.site
                )
                continue
            targets.append(
                PurgeTarget(
                    segment=seg,
                    root=root,
                    extensions=self.config.extensions_for(seg.site),
                    settle=self.rules[seg.site].settle,
                )
            )
        return targets

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
            stale = [
                int(r[0])
                for r in self.catalog.conn.execute(
                    "SELECT id FROM sweeps WHERE finished IS NULL "
                    "AND state IN ('applying', 'blocked') ORDER BY id"
                )
            ]
            if not stale:
                return 0
            fd = self._purge_lock(wait=False)
            if fd is None:
                return 0  # a purge is running in another process: its sweeps are not stale
            try:
                return self._recover(stale, actor)
            finally:
                os.close(fd)

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
                with self.audit.transaction():
                    self._forget(gone)
                    if not self.audit.conn.in_transaction:
                        self.audit.conn.execute("BEGIN IMMEDIATE")
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
            if confirm_of is not None:
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
        """Release a sweep stopped by a guard: delete what it held back (re-checked now)."""
        self.require(caller, CONFIRM_ROLES, f"confirm sweep {sweep_id}")
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
            conf = policy.Confirmation(paths=frozenset(blocked), accept_clock=True)
            self.audit.append(
                caller.user,
                "sweep.confirm",
                f"sweep:{sweep_id}",
                {"blocked": len(blocked), "uid": caller.uid},
            )
            return self.sweep(actor=caller.user, now=now, confirmed=conf, confirm_of=sweep_id)

    # ---- holds ---------------------------------------------------------------------------
    def site_of_camera(self, camera: str) -> str | None:
        for site, cam in self.catalog.cameras():
            if cam == camera:
                return site
        return None

    def hold_add(
        self,
        caller: Caller,
        camera: str,
        start: str,
        end: str,
        reason: str,
        until: str | None = None,
    ) -> Hold:
        self.require(caller, HOLD_ROLES, "place a hold")
        reason = reason.strip()
        if not reason or any(not c.isprintable() for c in reason):
            raise InvalidInput("--reason is required and must be printable text")
        site = self.site_of_camera(camera)
        if site is None:
            if camera not in self.config.cameras:
                raise InvalidInput(
                    f"unknown camera {camera!r}: it has no footage in the catalog"
                    " and is not in `cameras:`"
                )
        tz = self.config.site_tz(site) if site else self.config.tz
        t0 = parse_time(start, tz, "--from")
        t1 = parse_time(end, tz, "--to")
        if t0 >= t1:
            raise InvalidInput(f"--from {start} is not before --to {end}")
        t_until = parse_time(until, tz, "--until") if until else None
        with self.lock:
            now = self.clock().wall
            if t_until is not None and t_until <= now:
                raise InvalidInput(f"--until {until} is already past")
            # the hold and its audit entry commit together: a kill -9 between two commits
            # would leave a hold nobody can account for
            with self.audit.transaction():
                hold = self.catalog.add_hold(
                    kind="manual",
                    site=site,
                    camera=camera,
                    start=t0,
                    end=t1,
                    until=t_until,
                    reason=reason,
                    owner=caller.user,
                    created=now,
                )
                self.audit.append_in(
                    caller.user,
                    "hold.add",
                    f"hold:{hold.id}",
                    {
                        "camera": camera,
                        "site": site,
                        "from": iso(t0, tz),
                        "to": iso(t1, tz),
                        "until": iso(t_until, tz),
                        "reason": reason,
                    },
                )
            return hold

    def hold_release(self, caller: Caller, hold_id: int, reason: str) -> Hold:
        self.require(caller, HOLD_ROLES, f"release hold {hold_id}")
        if not reason.strip():
            raise InvalidInput("--reason is required to release a hold")
        with self.lock:
            holds = {h.id: h for h in self.catalog.list_holds(include_released=True)}
            h = holds.get(hold_id)
            if h is None:
                raise InvalidInput(f"no hold {hold_id}; see `nvr-guard hold list`")
            if h.released is not None:
                raise InvalidInput(f"hold {hold_id} was already released")
            if h.kind != "manual":
                raise PolicyRefused(f"hold {hold_id} belongs to a {h.kind}; it ends with it")
            # one commit: a released hold (its footage deletable) always has its audit entry
            with self.audit.transaction():
                released = self.catalog.release_hold(
                    hold_id, caller.user, reason.strip(), now=self.clock().wall
                )
                self.audit.append_in(
                    caller.user, "hold.release", f"hold:{hold_id}", {"reason": reason.strip()}
                )
            return released

    def hold_json(self, hold_id: int) -> dict[str, Any]:
        """One hold (released or not) as ``hold list`` shows it."""
        return next(h for h in self.holds_json(include_released=True) if h["id"] == hold_id)

    def holds_json(self, include_released: bool = False) -> list[dict[str, Any]]:
        tz = self.config.tz
        out = []
        for h in self.catalog.list_holds(include_released=include_released):
            out.append(
                {
                    "id": h.id,
                    "kind": h.kind,
                    "site": h.site,
                    "camera": h.camera,
                    "from": iso(h.start, tz),
                    "to": iso(h.end, tz),
                    "until": iso(h.until, tz),
                    "reason": h.reason,
                    "owner": h.owner,
                    "created": iso(h.created, tz),
                    "released": iso(h.released, tz),
                }
            )
        return out

    # ---- status --------------------------------------------------------------------------
    def _site_stats(self, site: str) -> dict[str, Any]:
        with self.catalog.lock:
            # one pass over the site's rows (the counts need it anyway)
            count, size, oldest, newest = self.catalog.conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(start), max(start) "
                "FROM segments WHERE site = ?",
                (site,),
            ).fetchone()
        return {"count": int(count), "bytes": int(size), "oldest": oldest, "newest": newest}

    def status(self) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            disk = self.disk_states()
            sites = {}
            for name, rules in self.rules.items():
                stats = self._site_stats(name)
                d = disk.get(name)
                oldest_due = (
                    policy.expiry(stats["oldest"], rules) if stats["oldest"] is not None else None
                )
                sites[name] = {
                    "rule": rules.describe(),
                    "profile": rules.profile,
                    "segments": stats["count"],
                    "bytes": stats["bytes"],
                    "oldest": iso(stats["oldest"], rules.tz),
                    "newest": iso(stats["newest"], rules.tz),
                    # the oldest footage against its rule: past it only while held (or a guard
                    # waits for confirmation); older than one sweep interval past it is late
                    "oldest_expires": iso(oldest_due, rules.tz),
                    "oldest_past_rule": oldest_due is not None and oldest_due <= now.wall,
                    "disk_free_fraction": round(d.free / d.total, 4) if d and d.total else None,
                    "min_free": rules.min_free,
                }
            latest = self.catalog.latest_sweep()
            blocked = (
                [{"id": latest.id, "message": latest.message}]
                if latest is not None and latest.state == "blocked"
                else []
            )
            done = self.catalog.latest_sweep(("done", "confirmed", "blocked"))
            verify = self.audit.verify()
            violations = self.workflow.refresh()
            requests = [self.workflow.request_json(r) for r in self.workflow.store.all()]
            by_state: dict[str, int] = {}
            for r in requests:
                by_state[r["state"]] = by_state.get(r["state"], 0) + 1
            soon = now.wall + 3 * 86400
            open_requests = {
                "pending": [
                    {"id": r["id"], "decide_by": r.get("decide_by"), "open_steps": r["open_steps"]}
                    for r in requests
                    if r["state"] == "pending"
                ],
                # approved but unused, and their validity ends within three days
                "expiring": [
                    {"id": r["id"], "valid_until": r.get("valid_until")}
                    for r in requests
                    if r["state"] == "approved"
                    and r.get("valid_until")
                    and parse_time(r["valid_until"], self.config.tz) <= soon
                ],
                "overdue": [r["id"] for r in requests if r.get("violation")],
            }
            scans = [s.as_dict() for s in self.media.store.recent_scans(5)]
            attention = self.attention.as_json()
            return {
                "ok": verify.ok and not blocked and not violations and not attention,
                "attention": attention,
                "time": iso(now.wall, self.config.tz),
                "config": str(self.config.source_path),
                "config_digest": self.config.digest,
                "sites": sites,
                "holds": self.holds_json(),
                "blocked_sweeps": blocked,
                "last_sweep": None
                if done is None
                else {
                    "id": done.id,
                    "state": done.state,
                    "time": iso(done.started, self.config.tz),
                    "deleted": done.deleted,
                    "bytes": done.bytes,
                },
                "audit": {
                    "ok": verify.ok,
                    "entries": verify.count,
                    "problem": verify.problem or None,
                },
                "violations": violations,
                "requests": by_state,
                "open_requests": open_requests,
                "last_scans": scans,
                "retention": self.stats.as_json(),
            }


def preview(config: Config, scratch: Path, now: ClockReading, site: str | None) -> SweepOutcome:
    """`retention plan`: what a sweep under ``config`` would do, changing nothing.

    It works on a scratch copy of the state (holds, sweep history, catalog) so that previewing a new
    config (`nvr-guard --config new.yaml retention plan`) neither needs nor disturbs the running
    daemon, then reconciles the copy with the disk and re-derives every expiry from the new rules.
    """
    real = Path(config.state_dir) / "catalog.db"
    db = scratch / "preview.db"
    if real.exists() and os.access(real, os.R_OK):
        import sqlite3

        src = sqlite3.connect(f"file:{real}?mode=ro", uri=True)
        dst = sqlite3.connect(db)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
    engine = Engine(config, clock=lambda: now, db_path=db)
    for name, rules in engine.rules.items():
        engine.catalog.recompute_expiry(name, rules)
    engine.reconcile(full=True)
    return engine.sweep(actor="preview", now=now, dry_run=True, site=site)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False, default=str)
