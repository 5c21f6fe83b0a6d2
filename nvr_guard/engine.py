"""The engine: wires config, catalog, scanner, policy, purge and audit into the operations the
daemon schedules and the CLI calls (retention plan/run/confirm, holds, status).

Decisions are made by the pure ``policy``; this module gathers their inputs (candidates from the
catalog index, holds, disk figures, sweep history, the clock) and carries out the plan through the
guarded ``purge``. Every operation that changes state is recorded in the audit chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from nvr_guard import mounts
from nvr_guard.attention import AUDIT_HEAD, CLOCK_SKEW, SIGNING_KEY, Attention
from nvr_guard.config import Config
from nvr_guard.errors import ConfigError, InvalidInput, PolicyRefused, RuntimeFailure
from nvr_guard.identity import Caller
from nvr_guard.model import (
    Action,
    ClockReading,
    DiskState,
    Hold,
    Item,
    Plan,
    Segment,
    SiteRules,
    Volume,
    boot_clock,
    show_path,
)
from nvr_guard.retention import policy
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.purge import PurgeTarget, digest_paths, iso_utc, purge
from nvr_guard.retention.scan import Scanner, SiteScan
from nvr_guard.store.audit import AuditHeadMismatch, AuditLog
from nvr_guard.store.catalog import Catalog
from nvr_guard.store.db import copy_database
from nvr_guard.text import human_bytes
from nvr_guard.times import iso, parse_time

log = logging.getLogger("nvr_guard.engine")

# roles that may place and release manual legal holds and confirm guarded sweeps
HOLD_ROLES = frozenset({"admin", "security_lead"})
# Who reads the audit log (it names every request's reason and recipient contact): auditors check
# the record, security leads run the security side, admins run the host.
AUDIT_ROLES = frozenset({"auditor", "security_lead", "admin"})
CONFIRM_ROLES = frozenset({"admin"})
# how many of the oldest segments per site and volume are offered to the policy when the
# volume is short
DISK_PRESSURE_BATCH = 20_000


def root_bytes(root: str | os.PathLike[str]) -> bytes:
    """A configured root as the catalog's paths begin with it (no trailing slash)."""
    return os.fsencode(str(root)).rstrip(b"/") or b"/"


def site_roots(config: Config) -> dict[str, list[bytes]]:
    return {name: [root_bytes(r) for r in site.roots] for name, site in config.sites.items()}


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


def hold_problems(config: Config, holds: Iterable[Hold]) -> list[tuple[str, int, str]]:
    """(file, line, message) for each active hold that ``config`` would leave protecting no
    footage: its site is gone and none of the roots it was placed on is a root any more.

    Such a config is refused (reload, ``config check``): a hold that still shows as active while
    its footage is deleted is worse than no hold at all."""
    roots = {r for rs in site_roots(config).values() for r in rs}
    line = config.line_of(("sites",))
    out = []
    for h in holds:
        if h.site is None or h.site in config.sites or roots.intersection(h.roots):
            continue
        release = (
            f"release it first (`nvr-guard hold release {h.id} --reason ...`)"
            if h.kind == "manual"
            else f"close its {h.kind} first"
        )
        where = ", ".join(os.fsdecode(r) for r in h.roots) or "unknown roots"
        out.append(
            (
                str(config.source_path),
                line,
                f"sites: hold {h.id} ({h.kind}: {h.reason}) protects camera "
                f"{h.camera or '*'} of site {h.site} ({where}), which this config no longer "
                f"has; keep the site or one of those roots, or {release}",
            )
        )
    return out


@dataclass
class SweepOutcome:
    sweep: int | None
    plan: Plan
    deleted: int = 0
    bytes: int = 0
    skipped: list[tuple[Segment, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    # a preview's findings of the walk: [{site, root, count, examples}] and attention entries
    unmatched: list[dict[str, Any]] | None = None
    attention: list[dict[str, Any]] | None = None

    def as_json(self) -> dict[str, Any]:
        items = [i.as_json() for i in self.plan.items]
        extra: dict[str, Any] = {}
        if self.unmatched is not None:
            extra["unmatched"] = self.unmatched
        if self.attention is not None:
            extra["attention"] = self.attention
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
        } | extra


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
        anchored: bool = True,
    ) -> None:
        """``anchored=False`` for a scratch copy of the state (``preview``), whose audit log
        has no head file of its own."""
        self.clock = clock
        self.config = config
        if db_path is None:
            state_dir = Path(config.state_dir)
            state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            db_path = state_dir / "catalog.db"
        self.catalog = Catalog(db_path, expiry=ExpiryCalc)
        # one lock for the engine and its SQLite connection: the watcher's hints, the scheduler's
        # jobs and the control socket's commands share that connection, and a statement from one
        # thread must never land inside another thread's transaction
        self.lock = self.catalog.lock
        # the same lock: an append and the change it records are one transaction on the
        # shared connection (see Catalog); the anchor state becomes an attention entry
        self.audit = AuditLog(
            self.catalog.conn,
            clock=lambda: self.clock().wall,
            head_path=AuditLog._AUTO if anchored else None,
            lock=self.catalog.lock,
            on_anchor=self._on_anchor,
        )
        self.rules: dict[str, SiteRules] = config.site_rules()
        # what the admin must see (status `attention`, metric, audit): see nvr_guard.attention
        self.attention = Attention(
            lambda action, obj, details: self.audit.append("nvr-guard", action, obj, details)
        )
        self.scanner = Scanner(
            self.catalog,
            self.site_scans(),
            clock=lambda: self.clock().wall,
            attention=self.attention,
        )
        self._workflow: Any = None
        self._media: Any = None
        self.stats = RetentionStats()
        # holds placed without their roots (the workflow's, or before holds recorded them)
        self.catalog.fill_hold_roots(site_roots(config))
        self.key_fingerprint: str | None = None  # the export signing key's, once loaded
        self.audit.check_anchor()
        self._record_restored_triggers()

    def _record_restored_triggers(self) -> None:
        """Opening the catalog re-created append-only triggers someone had dropped: say so in
        the log itself (the dropping is tamper evidence; its repair must not hide it)."""
        restored = self.catalog.restored_triggers
        if not restored:
            return
        log.warning("audit log: re-created dropped append-only triggers %s", ", ".join(restored))
        try:
            with self.lock:
                self.audit.append(
                    "nvr-guard",
                    "audit.triggers_restored",
                    "audit",
                    {
                        "triggers": list(restored),
                        "note": "someone dropped them; `nvr-guard audit verify` shows whether "
                        "entries were changed meanwhile",
                    },
                )
        except AuditHeadMismatch as e:
            log.error("could not record the re-created audit triggers: %s", e)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """The engine lock and one audit transaction (``AuditLog.recording``): for operations
        that change state and record it — both commit together, or neither does."""
        with self.lock, self.audit.recording():
            yield

    def _on_anchor(self, problem: str | None) -> None:
        if problem is None:
            self.attention.clear(AUDIT_HEAD)
            return
        self.attention.raise_(
            AUDIT_HEAD,
            None,
            "audit.head",
            f"audit log refuses appends (no audited change can happen): {problem}. "
            "Investigate, then `nvr-guard audit verify` and `nvr-guard audit reanchor`",
        )

    # ---- export signing key --------------------------------------------------------------
    def ensure_signing_key(self) -> str | None:
        """Load (or create, once) the export signing key; its fingerprint, or None on failure.

        Done at daemon start, not at the first export: the fingerprint must be on record (audit
        log, status, `key show`, the paper approval record) before any package exists, because
        it is the only thing that tells a recipient a re-signed forgery from the recorder's own
        package. The creation is audited with the fingerprint; a key that cannot be used is an
        attention state (exports fail, retention goes on).
        """
        from nvr_guard.errors import NvrGuardError
        from nvr_guard.export.keys import key_location_problem, load_or_create_key

        path = Path(self.config.signing_key_path())
        try:
            why = key_location_problem(path, {0, os.geteuid()})
            if why is not None:
                raise RuntimeFailure(why)
            existed = path.exists()
            _, fp = load_or_create_key(Path(self.config.state_dir), path)
        except (NvrGuardError, OSError) as e:
            self.attention.raise_(SIGNING_KEY, None, str(path), f"export signing key unusable: {e}")
            return None
        self.attention.clear(SIGNING_KEY)
        with self.lock:
            recorded = any(True for _ in self.audit.entries(action="export.key", obj=fp))
            try:
                if not existed or not recorded:
                    self.audit.append(
                        "nvr-guard", "export.key", fp, {"path": str(path), "created": not existed}
                    )
            except AuditHeadMismatch as e:  # recorded (created: false) at the next start
                log.error("export key %s not recorded in the audit log: %s", fp, e)
        if not existed:
            log.warning("created the export signing key %s, fingerprint %s", path, fp)
        self.key_fingerprint = fp
        return fp

    def signing_key_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.key_fingerprint,
            "path": self.config.signing_key_path(),
            "algorithm": "Ed25519",
        }

    @property
    def media(self) -> Any:
        """The USB media gate (``nvr_guard.media.ops.MediaOps``), made on first use."""
        if self._media is None:
            from nvr_guard.media.ops import MediaOps

            self._media = MediaOps(self)
        return self._media

    @property
    def workflow(self) -> Any:
        """Requests, approvals and exports (a ``Workflow``), made on first use."""
        if self._workflow is None:
            from nvr_guard.workflow.requests import Workflow

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
                    cross_mounts=site.cross_mounts,
                )
            )
        return out

    def roots_of(self, site: str) -> list[bytes]:
        """The site's roots, as a hold placed on it records them."""
        return site_roots(self.config)[site]

    def hold_problems(self, config: Config) -> list[tuple[str, int, str]]:
        """What ``config`` would do to the active holds (see :func:`hold_problems`)."""
        with self.lock:
            # holds placed since the last fill (the workflow's) learn the roots of their site
            # under the config in force, before it is compared with the new one
            self.catalog.fill_hold_roots(site_roots(self.config))
            return hold_problems(config, self.catalog.active_holds(self.clock().wall))

    def apply_config(self, new: Config, actor: str) -> dict[str, Any]:
        """Switch to an already validated config (SIGHUP); audit the change with both digests.
        Refused (:class:`ConfigError`, nothing changes) when it would orphan an active hold."""
        with self.lock:
            problems = self.hold_problems(new)
            if problems:
                raise ConfigError(problems)
            old = self.config
            old_rules = self.rules
            self.catalog.forget_root_devices_except(
                r for rs in site_roots(new).values() for r in rs
            )
            self.config = new
            self.rules = new.site_rules()
            self.scanner = Scanner(
                self.catalog,
                self.site_scans(),
                clock=lambda: self.clock().wall,
                attention=self.attention,
            )
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
        with self.lock:
            self.scanner.hint(path)

    def confirm_root(self, caller: Caller, site: str, root: str) -> dict[str, Any]:
        """An admin accepts a root that went out of service (another file system, emptied,
        missing) as it is now; see :meth:`Scanner.confirm_root`. Audited."""
        self.require(caller, CONFIRM_ROLES, f"confirm root {root} of site {site}")
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
                if s not in sites:
                    continue
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
        """``excluded``: roots left out of disk pressure (default :meth:`excluded_roots`)."""
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
                    cross_mounts=site.cross_mounts,
                    root_id=walked.get(root),
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

    # ---- holds ---------------------------------------------------------------------------
    def resolve_camera(self, camera: str, site: str | None = None) -> tuple[str, str]:
        """(site, camera) of ``--camera C [--site S]`` or ``--camera S/C``.

        A camera id is only unique within a site: two sites may both have a ``ch01``. An id
        found at more than one site is refused with the sites named, never given to the first
        one in alphabetical order (the hold would protect the wrong footage)."""
        if "/" in camera:
            own_site, _, camera = camera.partition("/")
            if site is not None and site != own_site:
                raise InvalidInput(
                    f"--camera {own_site + '/' + camera!r} and --site {site!r} disagree"
                )
            site = own_site
        sites = sorted(self.config.sites)
        if site is not None:
            if site not in self.config.sites:
                raise InvalidInput(f"unknown site {site!r}; sites: {', '.join(sites)}")
            if not self.catalog.has_camera(site, camera) and camera not in self.config.cameras:
                raise InvalidInput(
                    f"unknown camera {camera!r} at site {site}: it has no footage there in the "
                    "catalog and is not in `cameras:`"
                )
            return site, camera
        found = [s for s in sites if self.catalog.has_camera(s, camera)]
        if len(found) == 1:
            return found[0], camera
        if len(found) > 1:
            raise InvalidInput(
                f"camera {camera!r} is at sites {', '.join(found)}; say which with --site SITE "
                f"(or --camera SITE/{camera})"
            )
        if camera not in self.config.cameras:
            raise InvalidInput(
                f"unknown camera {camera!r}: it has no footage in the catalog"
                " and is not in `cameras:`"
            )
        if len(sites) == 1:
            return sites[0], camera
        raise InvalidInput(
            f"camera {camera!r} has no footage yet and sites {', '.join(sites)} are configured; "
            f"say which with --site SITE (or --camera SITE/{camera})"
        )

    def hold_add(
        self,
        caller: Caller,
        camera: str,
        start: str,
        end: str,
        reason: str,
        until: str | None = None,
        site: str | None = None,
    ) -> Hold:
        self.require(caller, HOLD_ROLES, "place a hold")
        reason = reason.strip()
        if not reason or any(not c.isprintable() for c in reason):
            raise InvalidInput("--reason is required and must be printable text")
        site, camera = self.resolve_camera(camera, site)
        tz = self.config.site_tz(site) if site else self.config.tz
        wall = self.clock().wall
        t0 = parse_time(start, tz, "--from", now=wall)
        t1 = parse_time(end, tz, "--to", now=wall)
        if t0 >= t1:
            raise InvalidInput(f"--from {start} is not before --to {end}")
        t_until = parse_time(until, tz, "--until", now=wall) if until else None
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
                    roots=self.roots_of(site),
                )
                self.audit.append_in(
                    caller.user,
                    "hold.add",
                    f"hold:{hold.id}",
                    {
                        "camera": camera,
                        "site": site,
                        "roots": [show_path(r) for r in hold.roots],
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
                    "roots": [show_path(r) for r in h.roots],
                }
            )
        return out

    def holds_view(self, caller: Caller | None, include_released: bool = False) -> dict[str, Any]:
        """The holds as ``caller`` may see them (None: everything, for root acting locally).

        Manual holds are shown in full to every caller (admins and security leads place them,
        their reasons say why footage outlives its rule). A request's hold names the request, its
        reason, requester, camera and range: shown only to those who may see that request
        (``Workflow.may_view``, the rule of ``request show``); the others learn only how many
        requests hold footage on a site (``holds_not_shown``)."""
        holds = self.holds_json(include_released)
        if caller is None:
            return {"holds": holds, "holds_not_shown": []}
        of_request = self.catalog.hold_requests()
        seen: dict[int | None, bool] = {}
        shown: list[dict[str, Any]] = []
        hidden: dict[str, set[int | None]] = {}
        for h in holds:
            if h["id"] in of_request:
                rid = of_request[h["id"]]
                if rid not in seen:
                    seen[rid] = self.workflow.may_view(caller, rid)
                if not seen[rid]:
                    hidden.setdefault(h["site"] or "*", set()).add(rid if rid else -h["id"])
                    continue
            shown.append(h)
        return {
            "holds": shown,
            "holds_not_shown": [
                {"site": site, "requests": len(rids)} for site, rids in sorted(hidden.items())
            ],
        }

    # ---- status --------------------------------------------------------------------------
    def _site_stats(self, site: str) -> dict[str, Any]:
        # one pass over the site's rows (the counts need it anyway)
        count, size, oldest, newest = self.catalog.site_stats(site)
        return {"count": count, "bytes": size, "oldest": oldest, "newest": newest}

    def status(self, caller: Caller | None = None) -> dict[str, Any]:
        """Health for ``caller`` (None: everything, for root acting locally): holds, violations
        and open requests name only the requests ``caller`` may see; the others are counted."""
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
            try:
                violations = self.workflow.refresh()
            except AuditHeadMismatch:  # status must answer; attention audit_head says why
                violations = []
            requests = [self.workflow.request_json(r) for r in self.workflow.store.all()]
            by_state: dict[str, int] = {}
            for r in requests:
                by_state[r["state"]] = by_state.get(r["state"], 0) + 1
            holds = self.holds_view(caller)
            all_violations = violations
            if caller is not None:
                # counts stay whole (by_state, ok); what names a request is for its viewers
                requests = [r for r in requests if self.workflow.may_view(caller, r["id"])]
                mine = {f"request {r['id']}" for r in requests}  # a violation's first words
                violations = [v for v in violations if v.split(":", 1)[0] in mine]
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
                "ok": verify.ok and not blocked and not all_violations and not attention,
                "attention": attention,
                "time": iso(now.wall, self.config.tz),
                "config": str(self.config.source_path),
                "config_digest": self.config.digest,
                "sites": sites,
                "holds": holds["holds"],
                "holds_not_shown": holds["holds_not_shown"],
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
                "violations_not_shown": len(all_violations) - len(violations),
                "requests": by_state,
                "open_requests": open_requests,
                "last_scans": scans,
                "retention": self.stats.as_json(),
                # the recipient of a package compares this with `verify --fingerprint`
                "export_key": self.signing_key_json(),
            }


# ---- the audit log, as `audit show` and `audit verify` report it --------------------------------
def audit_row(e: Any, tz: Any, iso: Any) -> dict[str, Any]:
    """One entry for `audit show`, whatever a row edited by hand holds (text in the time, a
    number too large for a date, bytes for a name): shown as it is and listed in
    ``malformed``, never a crash."""
    bad: list[str] = []

    def text(field: str, v: Any) -> Any:
        if isinstance(v, str) or (v is None and field == "object"):
            return v
        bad.append(field)
        if isinstance(v, bytes):
            return "0x" + v.hex()
        return repr(v)

    when: Any
    try:
        if isinstance(e.time, bool) or not isinstance(e.time, int | float):
            raise TypeError
        when = iso(e.time, tz)
    except (TypeError, ValueError, OverflowError, OSError):
        bad.append("time")
        when = ("0x" + e.time.hex()) if isinstance(e.time, bytes) else repr(e.time)
    seq = e.seq
    if isinstance(seq, bool) or not isinstance(seq, int):
        bad.append("seq")
        seq = repr(seq)
    details = e.details
    if "_unparsable" in details or "_value" in details:
        bad.append("details")
        details = {k: (v if isinstance(v, str | int | float | list | dict) or v is None
                       else repr(v)) for k, v in details.items()}  # fmt: skip
    return {
        "seq": seq,
        "time": when,
        "actor": text("actor", e.actor),
        "action": text("action", e.action),
        "object": text("object", e.object),
        "details": details,
        "hash": text("hash", e.hash),
        "malformed": bad,
    }


def audit_show_json(
    log_: AuditLog, tz: Any, since: float | None, request: int | None
) -> dict[str, Any]:
    """Entries, oldest first, from ``since``; only those about request ``request`` if given."""
    entries = log_.entries(since=since, obj=None if request is None else f"request:{request}")
    return {"entries": [audit_row(e, tz, iso) for e in entries]}


def audit_verify_json(log_: AuditLog) -> dict[str, Any]:
    """The chain checked against itself and its head file."""
    rep = log_.verify()
    triggers = list(rep.missing_triggers)
    return {
        "ok": rep.ok and not triggers,
        "missing_triggers": triggers,
        "entries": rep.count,
        "first_bad": rep.first_bad,
        "problem": rep.problem or None,
        "head": {"seq": rep.head[0], "hash": rep.head[1]},
        "warnings": list(rep.warnings),
        "reanchored": [
            {"seq": e.seq, "actor": e.actor, "reason": e.details.get("reason"), "time": e.time}
            for e in log_.entries(action="audit.reanchor")
        ],
        "anchor_problem": log_.anchor_problem(),
    }


# ---- who holds the state ------------------------------------------------------------------------
STATE_LOCK = "state.lock"


class StateLock:
    """A flock on ``state_dir/state.lock``: who may act on the state right now.

    The daemon holds it exclusively for its whole life; a root command acting locally (no daemon
    answered) holds it shared while it acts. So a local command acts only when no daemon holds the
    state at all, never because the daemon was busy or slow to answer, and a daemon never starts
    under a local command (or a second daemon) that is changing the state. The kernel drops the
    lock with its holder, kill -9 included. ``retention plan`` works on a scratch copy and needs
    no lock.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_LOCK
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            flags = os.O_CREAT | os.O_CLOEXEC
            try:
                self._fd = os.open(self.path, os.O_RDWR | flags, 0o644)
            except PermissionError:  # made by another user: a flock needs no write access
                self._fd = os.open(self.path, os.O_RDONLY | flags)
        return self._fd

    def _try(self, how: int) -> bool:
        try:
            fcntl.flock(self._open(), how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def try_shared(self) -> bool:
        """For a local command: False when a daemon holds the state."""
        return self._try(fcntl.LOCK_SH)

    def holder(self) -> str:
        """What the daemon wrote into the lock file (its pid), for messages."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "another process"

    def acquire_for_daemon(self, wait: float, waiting: Callable[[], None]) -> None:
        """Hold the state exclusively. Refuses at once when another daemon holds it; waits up to
        ``wait`` seconds for local commands (shared holders) to finish, calling ``waiting`` once
        when it has to wait."""
        if not self.try_shared():  # an exclusive holder: another daemon
            self.close()
            raise RuntimeFailure(
                f"another nvr-guard daemon ({self.holder()}) holds {self.state_dir}; "
                "one daemon per state_dir (check `systemctl status nvr-guard`)"
            )
        deadline = time.monotonic() + wait
        told = False
        while not self._try(fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeFailure(
                    f"{self.state_dir} is still in use by a local nvr-guard command or another "
                    f"daemon after {wait:g} s; not starting (see `fuser -v {self.path}`)"
                )
            if not told:
                waiting()
                told = True
            time.sleep(0.1)
        try:
            fd = self._open()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # opened read-only: the pid only makes messages nicer
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def preview(config: Config, scratch: Path, now: ClockReading, site: str | None) -> SweepOutcome:
    """`retention plan`: what a sweep under ``config`` would do, changing nothing.

    It works on a scratch copy of the state (holds, sweep history, catalog) so that previewing a new
    config (`nvr-guard --config new.yaml retention plan`) neither needs nor disturbs the running
    daemon, then reconciles the copy with the disk and re-derives every expiry from the new rules.
    """
    real = Path(config.state_dir) / "catalog.db"
    db = scratch / "preview.db"
    if real.exists() and os.access(real, os.R_OK):
        copy_database(real, db)
    engine = Engine(config, clock=lambda: now, db_path=db, anchored=False)
    for name, rules in engine.rules.items():
        engine.catalog.recompute_expiry(name, rules)
    engine.reconcile(full=True)
    out = engine.sweep(actor="preview", now=now, dry_run=True, site=site)
    out.unmatched = [
        u for u in engine.scanner.unmatched_report() if site is None or u["site"] == site
    ]
    out.attention = [
        a for a in engine.attention.as_json() if site is None or a["site"] in (site, None)
    ]
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False, default=str)
