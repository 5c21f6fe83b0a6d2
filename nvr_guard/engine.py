"""The engine: the composition root of one nvr-guard instance.

It builds the parts from the config — the catalog and its stores, the audit chain, the attention
registry, the narrow :class:`~nvr_guard.context.Context` they share, the retention
:class:`~nvr_guard.retention.sweeper.Sweeper` (plan, sweep, confirm, recovery, scanning) and
:class:`~nvr_guard.retention.holds.Holds`, the workflow and the media gate — and is what the
daemon schedules and the CLI calls. Its operations are one-line delegations to the part that
owns them, so a caller needs one object and a reader finds each rule in its own module; what is
left here is what spans the parts: switching to a new config, and ``status``.

The parts below never import the engine: they receive the context (see ``nvr_guard.context``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from nvr_guard.attention import AUDIT_HEAD, Attention
from nvr_guard.auditview import AUDIT_ROLES, audit_row, audit_show_json, audit_verify_json
from nvr_guard.config import Config
from nvr_guard.context import Clock, Context, root_bytes, site_roots
from nvr_guard.errors import ConfigError, InvalidInput
from nvr_guard.identity import Caller
from nvr_guard.model import (
    UNMANAGED_REASON,
    ClockReading,
    DiskState,
    Hold,
    Plan,
    SiteRules,
    Volume,
    boot_clock,
)
from nvr_guard.retention import policy
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.holds import HOLD_ROLES, Holds, hold_problems, shown_holds
from nvr_guard.retention.scan import ReconcileStats, Scanner, SiteScan
from nvr_guard.retention.sweeper import (
    CONFIRM_ROLES,
    DISK_PRESSURE_BATCH,
    LATENESS_BUCKETS,
    RetentionStats,
    Sweeper,
    SweepOutcome,
)
from nvr_guard.statelock import STATE_LOCK, StateLock
from nvr_guard.store.audit import AuditHeadMismatch, AuditLog, ChainWatch
from nvr_guard.store.catalog import Catalog
from nvr_guard.store.db import copy_database
from nvr_guard.times import iso, parse_time
from nvr_guard.workflow import index as workflow_index

if TYPE_CHECKING:
    from nvr_guard.media.ops import MediaOps
    from nvr_guard.workflow.notify import Notifications
    from nvr_guard.workflow.requests import Workflow

# the names callers import from here (the daemon, the CLI, the metrics, tests) since before the
# operations moved to their own modules
__all__ = [
    "AUDIT_ROLES",
    "CONFIRM_ROLES",
    "DISK_PRESSURE_BATCH",
    "HOLD_ROLES",
    "LATENESS_BUCKETS",
    "STATE_LOCK",
    "Engine",
    "RetentionStats",
    "StateLock",
    "SweepOutcome",
    "audit_row",
    "audit_show_json",
    "audit_verify_json",
    "hold_problems",
    "preview",
    "request_problems",
    "root_bytes",
    "site_roots",
]

log = logging.getLogger("nvr_guard.engine")

# seconds between two full walks of the audit chain for status and the metrics (a walk is
# O(entries): 0.5 s at 32,000); the entries appended in between are verified at every status
AUDIT_FULL_EVERY = 300.0

# answers about requests and holds (status, request list, request show) are reused until a
# request, approval or hold is written, the config changes, or they are this many seconds old
# (states that change by time alone: a deadline or a validity passing); 50 people on the
# console ask for them many times a second, at 0.1-0.5 s a status with thousands of requests
STATUS_FRESH = 5.0
READ_MEMO_SIZE = 4096  # status documents kept at most (one per person)
# requests and holds (list entries) kept in answers at most, about 2 KB each: the oldest go first
MEMO_WEIGHT = 50_000
MEMO_ONE_MAX = 2_000  # an answer with more is made each time, never kept
# while a status (or another kept answer) waits for the engine lock, it looks this often
# whether a sweep or a rescan holds it (``_doing``: then it answers with the last one made);
# and how old that one may be (nothing it says of requests changed since)
STATUS_BUSY_WAIT = 0.05
# ... once the sweep or rescan has run this long (a shorter one is waited for)
STATUS_BUSY_GRACE = 0.5
STALE_WHILE_BUSY = 60.0
# seconds a whole status document is given again while nothing was written to the catalog
STATUS_DOC_FRESH = 2.0

_T = TypeVar("_T")
_SHARED = itertools.count(1)  # stamps of status' answers for everyone (_Shared)


class Engine:
    """State and operations of one nvr-guard instance. Thread-safe through one lock: the daemon's
    scheduler, watcher and control threads all come through here."""

    def __init__(
        self,
        config: Config,
        clock: Clock = boot_clock,
        db_path: Path | None = None,
        anchored: bool = True,
    ) -> None:
        """``anchored=False`` for a scratch copy of the state (``preview``), whose audit log
        has no head file of its own and whose database is never synced (``Database``)."""
        if db_path is None:
            state_dir = Path(config.state_dir)
            state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            db_path = state_dir / "catalog.db"
        self.catalog = Catalog(db_path, expiry=ExpiryCalc, scratch=not anchored)
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
        # the chain as status and the metrics report it: new entries at every check, the whole
        # chain every AUDIT_FULL_EVERY seconds (the daemon's scheduler; `audit verify`: always)
        self.chain = ChainWatch(
            self.audit, full_every=AUDIT_FULL_EVERY, now=lambda: self.clock().wall
        )
        # what the admin must see (status `attention`, metric, audit): see nvr_guard.attention
        self.attention = Attention(
            lambda action, obj, details: self.audit.append("nvr-guard", action, obj, details)
        )
        self.ctx = Context(config, clock, self.catalog, self.audit, self.attention)
        self.sweeper = Sweeper(self.ctx)
        self.holds = Holds(self.ctx, lambda caller, rids: self.workflow.may_view_many(caller, rids))
        self._workflow: Workflow | None = None
        self._audit_reader: AuditLog | None = None
        # kept answers (read_memo; looked up without the engine lock, changed under its own)
        self._read_memo: dict[tuple[Any, ...], tuple[tuple[float, float], Any, int]] = {}
        self._memo_weight = 0  # requests and holds in what _read_memo keeps
        self._read_memo_lock = threading.Lock()  # taken last, around the dict only
        # per person (Actor; None: root): the last status made, with what it was made at
        # ((config serial, catalog writes, requests generation)) and when; see status
        self._status_doc: dict[Any, tuple[tuple[int, int, int], tuple[float, float], Any]] = {}
        # the last of them made, for anyone
        self._status_last: tuple[tuple[int, int, int], tuple[float, float], Any] | None = None
        self._busy: tuple[str, float] | None = None  # what holds the lock for long, since when
        self._busy_since = 0.0  # the same start, by the monotonic clock (_long_busy)
        # moved on by every apply_config: what kept answers were made under (an object's id may
        # be reused by the next config)
        self._config_serial = 0
        self._totals_memo: tuple[tuple[Any, ...], dict[str, _SiteTotals]] | None = None
        self._notifications: Notifications | None = None
        self._media: MediaOps | None = None
        # holds placed without their roots (the workflow's, or before holds recorded them)
        self.catalog.fill_hold_roots(site_roots(config))
        self.audit.check_anchor()
        self._record_restored_triggers()

    @property
    def audit_reader(self) -> AuditLog:
        """The audit log for reading only, on a connection of its own (``Database.reader``):
        what was committed, without waiting for the engine lock a sweep holds for seconds; the
        shared log where there is no such connection (a database in memory)."""
        got = self._audit_reader
        if got is None:
            reader = self.catalog.reader()
            if reader is None:
                return self.audit
            got = self._audit_reader = AuditLog(
                reader[0], clock=lambda: self.clock().wall, head_path=None, lock=reader[1]
            )
        return got

    # ---- what the parts share (the context), readable where it always was ------------------
    @property
    def config(self) -> Config:
        """The config in force (a reload replaces it for every part at once)."""
        return self.ctx.config

    @property
    def clock(self) -> Clock:
        """The instance's one clock."""
        return self.ctx.clock

    @property
    def key_fingerprint(self) -> str | None:
        """The export signing key's fingerprint, once loaded."""
        return self.ctx.key_fingerprint

    @property
    def rules(self) -> dict[str, SiteRules]:
        """Each site's retention rules under the config in force."""
        return self.sweeper.rules

    @property
    def scanner(self) -> Scanner:
        """The scanner over the roots of the config in force."""
        return self.sweeper.scanner

    @property
    def stats(self) -> RetentionStats:
        """What the sweeps did since start (status, metrics)."""
        return self.sweeper.stats

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

    def recording(self) -> contextlib.AbstractContextManager[None]:
        """The engine lock and one audit transaction: a change and its record commit together."""
        return self.ctx.recording()

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
        """Load (or create, once) the export signing key; its fingerprint, or None on failure."""
        return self.ctx.ensure_signing_key()

    def signing_key_json(self) -> dict[str, Any]:
        """The export signing key as `key show` and `status` report it."""
        return {
            "fingerprint": self.key_fingerprint,
            "path": self.config.signing_key_path(),
            "algorithm": "Ed25519",
        }

    @property
    def media(self) -> MediaOps:
        """The USB media gate, made on first use."""
        if self._media is None:
            # imported on first use: a retention command need not load the media and export stack
            from nvr_guard.media.ops import MediaOps

            self._media = MediaOps(self.ctx)
        return self._media

    @property
    def workflow(self) -> Workflow:
        """Requests, approvals and exports, made on first use (it creates the requests tables)."""
        if self._workflow is None:
            from nvr_guard.workflow.requests import Workflow

            self._workflow = Workflow(
                self.ctx, open_destination=lambda target, tz: self.media.destination(target, tz)
            )
        return self._workflow

    @property
    def notifications(self) -> Notifications:
        """The events the web service delivers, its cursor and outcomes (made on first use)."""
        if self._notifications is None:
            from nvr_guard.store.notify import NotifyStore
            from nvr_guard.workflow.notify import Notifications

            self._notifications = Notifications(self.workflow, NotifyStore(self.catalog))
        return self._notifications

    # ---- configuration -------------------------------------------------------------------
    def site_scans(self) -> list[SiteScan]:
        """What the scanner (and the watcher) walk under the config in force."""
        return self.sweeper.site_scans()

    def roots_of(self, site: str) -> list[bytes]:
        """The site's roots, as a hold placed on it records them."""
        return self.ctx.roots_of(site)

    def hold_problems(self, config: Config) -> list[tuple[str, int, str]]:
        """What ``config`` would do to the active holds (see :func:`hold_problems`) and to the
        undecided requests (:func:`request_problems`): a reload refuses it."""
        with self.lock:
            undecided = self.workflow.store.undecided()
        return self.holds.hold_problems(config) + request_problems(config, undecided)

    def apply_config(self, new: Config, actor: str) -> dict[str, Any]:
        """Switch to an already validated config (SIGHUP); audit the change with both digests.
        Refused (:class:`ConfigError`, nothing changes) when it would orphan an active hold."""
        with self.lock:
            self._config_serial += 1  # kept answers: none made before is given after
            problems = self.hold_problems(new)
            if problems:
                raise ConfigError(problems)
            old = self.config
            old_rules = self.rules
            self.catalog.forget_root_devices_except(
                r for rs in site_roots(new).values() for r in rs
            )
            self.ctx.config = new
            # again, once the new one is in force: an answer made meanwhile without the lock
            # (a list, a request: from the workflow's copy of the requests) may have been made
            # under the old one, and must not be kept as the new one's
            self._config_serial += 1
            done: list[str] = []
            try:
                self.sweeper.configure(new)
                changed = [
                    s
                    for s in self.rules
                    if s not in old_rules or old_rules[s].describe() != self.rules[s].describe()
                ]
                for s in changed:
                    self.catalog.recompute_expiry(s, self.rules[s])
                    done.append(s)
            except (ValueError, OverflowError, OSError) as exc:
                # a config that validated but cannot be applied is refused whole: the old one
                # stays in force, expiries included (it had half-applied and stopped retention)
                self.ctx.config = old
                self._config_serial += 1
                self.sweeper.configure(old)
                for s in done:
                    if s in old_rules:
                        self.catalog.recompute_expiry(s, old_rules[s])
                raise ConfigError(
                    [(str(new.source_path), 0, f"cannot be applied: {exc}; the old config stays")]
                ) from None
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
        """Roles from ``people`` (see :meth:`Context.roles_for`)."""
        return self.ctx.roles_for(caller)

    def require(self, caller: Caller, allowed: frozenset[str], what: str) -> None:
        """Refuse (audited, exit 3) unless ``caller`` holds one of the ``allowed`` roles."""
        self.ctx.require(caller, allowed, what)

    # ---- retention (nvr_guard.retention.sweeper) ---------------------------------------------
    def reconcile(self, full: bool = True) -> ReconcileStats:
        """Bring the catalog in step with the roots (full walk, or what changed)."""
        with self._doing("a full rescan of the recordings" if full else "a rescan of what changed"):
            return self.sweeper.reconcile(full)

    def report_clock_skew(self) -> None:
        """Cameras whose path times and file times disagree become attention entries."""
        self.sweeper.report_clock_skew()

    def hint(self, path: bytes) -> None:
        """One path the watcher saw change."""
        self.sweeper.hint(path)

    def confirm_root(self, caller: Caller, site: str, root: str) -> dict[str, Any]:
        """An admin accepts a root that went out of service as it is now. Audited."""
        return self.sweeper.confirm_root(caller, site, root)

    def excluded_roots(self) -> set[bytes]:
        """Roots whose footage counts on no volume (missing, another file system)."""
        return self.sweeper.excluded_roots()

    def disk_volumes(self, excluded: set[bytes] | None = None) -> list[Volume]:
        """The file systems holding the roots in service, with their free space."""
        return self.sweeper.disk_volumes(excluded)

    def disk_states(self, volumes: Sequence[Volume] | None = None) -> dict[str, DiskState]:
        """Per site, the fullest of the volumes its roots are on."""
        return self.sweeper.disk_states(volumes)

    def plan(
        self,
        now: ClockReading | None = None,
        site: str | None = None,
        confirmed: policy.Confirmation | None = None,
        excluded: set[bytes] | None = None,
    ) -> Plan:
        """What a sweep would do now, as the policy decides it."""
        return self.sweeper.plan(now, site, confirmed, excluded)

    def recover_purges(self, actor: str = "nvr-guard") -> int:
        """Write the receipts of purge batches cut short; how many files they name."""
        return self.sweeper.recover_purges(actor)

    def sweep(
        self,
        actor: str = "nvr-guard",
        now: ClockReading | None = None,
        dry_run: bool = False,
        site: str | None = None,
        confirmed: policy.Confirmation | None = None,
        confirm_of: int | None = None,
    ) -> SweepOutcome:
        """Plan and carry out one sweep (``dry_run``: only plan)."""
        if dry_run:
            return self.sweeper.sweep(actor, now, dry_run, site, confirmed, confirm_of)
        with self._doing(f"a retention sweep (by {actor})"):
            return self.sweeper.sweep(actor, now, dry_run, site, confirmed, confirm_of)

    def confirm(
        self, sweep_id: int, caller: Caller, now: ClockReading | None = None
    ) -> SweepOutcome:
        """Release a sweep stopped by a guard: delete what it held back (re-checked now)."""
        with self._doing(f"the confirmed sweep {sweep_id} (by {caller.user})"):
            return self.sweeper.confirm(sweep_id, caller, now)

    # ---- holds (nvr_guard.retention.holds) -------------------------------------------------
    def resolve_camera(self, camera: str, site: str | None = None) -> tuple[str, str]:
        """(site, camera) of ``--camera C [--site S]`` or ``--camera S/C``."""
        return self.holds.resolve_camera(camera, site)

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
        """Place a manual hold (admin or security lead), audited in the same commit."""
        return self.holds.hold_add(caller, camera, start, end, reason, until, site)

    def hold_request(
        self, caller: Caller, rid: int, reason: str, until: str | None = None
    ) -> list[Hold]:
        """``hold add --request ID``: a manual hold on each camera of the request's range that
        names the request, so its exported package on a target directory is kept too."""
        r = self.workflow.store.get(rid)
        if not self.workflow.may_view(caller, rid):
            raise InvalidInput(f"no request {rid}; see `nvr-guard request list`")
        tz = self.config.site_tz(r.site) if r.site in self.config.sites else self.config.tz
        return [
            self.holds.hold_add(
                caller,
                cam,
                str(iso(r.start, tz)),
                str(iso(r.end, tz)),
                reason,
                until,
                r.site,
                request_id=rid,
            )
            for cam in r.cameras
        ]

    def hold_release(self, caller: Caller, hold_id: int, reason: str) -> Hold:
        """Release a manual hold, audited in the same commit."""
        return self.holds.hold_release(caller, hold_id, reason)

    def hold_json(self, hold_id: int) -> dict[str, Any]:
        """One hold (released or not) as ``hold list`` shows it."""
        return self.holds.hold_json(hold_id)

    def holds_json(self, include_released: bool = False) -> list[dict[str, Any]]:
        """Every hold (active, or all) as ``hold list`` shows it, unfiltered."""
        return self.holds.holds_json(include_released)

    def holds_view(self, caller: Caller | None, include_released: bool = False) -> dict[str, Any]:
        """The holds as ``caller`` may see them (None: everything, for root acting locally)."""
        return self.holds.holds_view(caller, include_released)

    # ---- status --------------------------------------------------------------------------
    def _site_totals(self) -> dict[str, _SiteTotals]:
        """Per site: segments, bytes, oldest and newest start, and the earliest stored expiry
        (None: no footage). One pass over every segment row (0.2 s at 1M), so counted again
        only when a segment row was written since (``segments_generation``: a new file, a
        deletion, a rescan's changes) or the config was reloaded; not at every write to the
        catalog (a delivered notification or an audit entry made it count several times a
        second under load)."""
        key = (self._config_serial, self.catalog.segments_generation)
        memo = self._totals_memo
        if memo is not None and memo[0] == key:
            return memo[1]
        out: dict[str, _SiteTotals] = {}
        for name, rules in self.rules.items():
            # one pass over the site's rows (the counts need it anyway)
            count, size, oldest, newest = self.catalog.site_stats(name)
            due = policy.expiry(oldest, rules) if oldest is not None else None
            if rules.cameras and due is not None:
                # the oldest footage may be a camera's that keeps longer: the earliest
                # stored expiry (each under its camera's rule) is the one to be past
                due = self.catalog.next_expiry(name)
            out[name] = _SiteTotals(count, size, oldest, newest, due)
        self._totals_memo = (key, out)
        return out

    def read_memo(
        self,
        key: tuple[Any, ...],
        compute: Callable[..., _T],
        weight: Callable[[_T], int] = lambda _: 1,
        *,
        locked: bool = True,
    ) -> _T:
        """``compute()``'s answer for ``key`` (a command, who asks, its arguments), reused while
        no request, approval or hold was written since (``requests_generation``), the config is
        the same (``_config_serial``), and for STATUS_FRESH seconds at most (states that change
        by time alone).

        Looked up without the engine lock: people browsing the console are answered from it
        while a sweep holds the lock for seconds, and nothing it answers about can change
        meanwhile (every such write takes the lock, and moves the generation once it is done).
        The generation is read before computing: a write that lands meanwhile files the answer
        under a generation already gone, never new rows' answer under an old one.

        An answer to make again waits for the lock; once a sweep or a rescan has held it for
        STATUS_BUSY_GRACE (``_long_busy``; looked at every STATUS_BUSY_WAIT), the answer kept is
        given if nothing was
        written or reloaded since and it is under STALE_WHILE_BUSY old. What is kept is bounded
        by the number of requests it holds of its own (``weight``: a list's length; status'
        parts only point into one shared answer), MEMO_WEIGHT in all, the oldest dropped
        first; an answer heavier than MEMO_ONE_MAX is never kept.

        ``locked=False``: ``compute(wait)`` takes the lock itself when it needs it (a list or a
        request read from the workflow's index needs it only to bring the index up to date);
        asked first not to wait (``index.Busy``), then the answer kept is given as above."""
        at = (time.monotonic(), self.clock().wall)
        full = (self._config_serial, self.catalog.requests_generation, *key)
        hit = self._read_memo.get(full)
        if hit is not None and _fresh(hit[0], at, STATUS_FRESH):
            return cast(_T, hit[1])
        # a sweep or a rescan holds the engine: an older answer, if nothing it speaks of was
        # written since, rather than a page waiting for seconds
        stale = (
            hit is not None
            and full[:2] == (self._config_serial, self.catalog.requests_generation)
            and 0 <= time.monotonic() - hit[0][0] < STALE_WHILE_BUSY
        )
        if not locked:
            try:
                value = compute(False)
            except workflow_index.Busy:
                if hit is not None and stale and self._long_busy():
                    return cast(_T, hit[1])
                value = compute(True)
        else:
            while not self.lock.acquire(timeout=STATUS_BUSY_WAIT):
                if hit is not None and stale and self._long_busy():
                    return cast(_T, hit[1])
            try:
                value = compute()
            finally:
                self.lock.release()
        w = max(1, weight(value))
        if w > MEMO_ONE_MAX:
            return value
        with self._read_memo_lock:
            memo = self._read_memo
            if any(k[:2] != full[:2] for k in memo):
                # another generation or config: what was kept can never be asked for again
                memo = self._read_memo = {k: v for k, v in memo.items() if k[:2] == full[:2]}
                self._memo_weight = sum(v[2] for v in memo.values())
            old = memo.pop(full, None)
            if old is not None:
                self._memo_weight -= old[2]
            memo[full] = (at, value, w)
            self._memo_weight += w
            while self._memo_weight > MEMO_WEIGHT and len(memo) > 1:
                _, dropped = next(iter(memo.items()))
                del memo[next(iter(memo))]
                self._memo_weight -= dropped[2]
        return value

    def _requests_part(self, caller: Caller | None) -> _RequestsPart:
        """What status lists of requests, holds and violations for ``caller``: the open
        requests, the holds and what deciding visibility needs are read once for everyone
        (``read_memo``), then kept per person filtered by what they may see."""
        wf = self.workflow

        def everyone() -> _Shared:
            try:
                violations = wf.refresh()
            except AuditHeadMismatch:  # status must answer; attention audit_head says why
                violations = []
            # counts stay whole (by_state, ok); what names a request is for its viewers
            by_state, briefs = wf.overview()
            holds = self.holds.holds_json()
            of_request = self.catalog.hold_requests()
            rids = {b["id"] for b in briefs} | {r for r in of_request.values() if r is not None}
            basis = wf.viewers_basis(rids)
            # the end of each approval's validity as a time, read once for everyone
            until = {
                b["id"]: parse_time(b["valid_until"], self.config.tz)
                for b in briefs
                if b["state"] == "approved" and b.get("valid_until")
            }
            return _Shared(
                next(_SHARED), violations, by_state, briefs, holds, of_request, basis, until
            )

        return self._person_part(self.read_memo(("status",), everyone), caller)

    def _person_part(self, shared: _Shared, caller: Caller | None) -> _RequestsPart:
        """``shared`` as ``caller`` sees it, kept per person, filed under the shared answer it
        was made from (never older than that one). No lock: who may see what is judged from
        the workflow's index."""
        if caller is None:
            return self._part_for(shared, None)
        wf = self.workflow
        return self.read_memo(
            ("status", shared.stamp, wf.actor(caller)),
            lambda wait: self._part_for(shared, wf.visible_in(caller, shared.basis)),
            locked=False,
        )

    def _part_now(self, caller: Caller | None) -> _RequestsPart | None:
        """``_requests_part`` without the engine lock, from what status says for everyone as
        nothing about requests and holds was written since (None when there is none): who
        may see what is judged from the workflow's index, which needs no lock."""
        shared = self._read_memo.get(
            (self._config_serial, self.catalog.requests_generation, "status")
        )
        if shared is None or not 0 <= time.monotonic() - shared[0][0] < STALE_WHILE_BUSY:
            return None
        return self._person_part(shared[1], caller)

    def prepare_status(self) -> None:
        """What status says of requests and holds for everyone, made now if a write made it
        out of date: before a long operation under the engine lock (``_doing``), so that status
        can answer with the requests and holds of now meanwhile (``_part_now``). Only where a
        status was asked before: nobody waits for one elsewhere (a preview's scratch engine, at
        its own ``--now``, must not settle requests on the way)."""
        if self._status_last is not None:
            self._requests_part(None)

    def _part_for(self, shared: _Shared, visible: set[int] | None) -> _RequestsPart:
        """``shared`` as someone who may see the requests ``visible`` (None: all) sees it."""
        if visible is None:
            requests, violations = shared.briefs, shared.violations
        else:
            requests = [b for b in shared.briefs if b["id"] in visible]
            mine = {f"request {r['id']}" for r in requests}  # a violation's first words
            violations = [v for v in shared.violations if v.split(":", 1)[0] in mine]
        seen: set[int | None] | None = None if visible is None else set(visible)
        holds = shown_holds(shared.holds, shared.of_request, seen)
        open_requests = _open_requests(requests, self.clock().wall, shared.until)
        return _RequestsPart(
            shared.by_state, requests, holds, violations, len(shared.violations), open_requests
        )

    @contextlib.contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        """A long operation under the engine lock, named for a status that cannot wait for it
        (once it holds the lock: not while it waits for someone else's)."""
        with self.lock:
            outer = self._busy
            if outer is None:
                self._busy = (what, self.clock().wall)
                self._busy_since = time.monotonic()
                try:
                    self.prepare_status()
                except Exception:  # status waits instead; the operation goes on
                    log.exception("status could not be prepared before %s", what)
            try:
                yield
            finally:
                if outer is None:
                    self._busy = None

    def status(self, caller: Caller | None = None) -> dict[str, Any]:
        """Health for ``caller`` (None: everything, for root acting locally): holds, violations
        and open requests name only the requests ``caller`` may see; the others are counted.

        Once a sweep or a rescan has held the engine lock for STATUS_BUSY_GRACE (``_long_busy``;
        looked at every STATUS_BUSY_WAIT while it waits for the lock), the last status made is
        answered,
        with ``busy`` saying what runs since when and when that status was made, and the
        requests and holds as they stand (``nvr-guard status`` would time out behind a long
        purge, and the console's pages with it); with none made yet, it waits."""
        actor = None if caller is None else self.workflow.actor(caller)
        # the same document again while nothing was written to the catalog (a new segment, a
        # sweep, an audit entry, an attention entry: each is a write), for STATUS_DOC_FRESH
        # seconds (the free space and the time it states move on by themselves); without the
        # lock, as read_memo
        key = (
            self._config_serial,
            self.catalog.conn.total_changes,
            self.catalog.requests_generation,
        )
        at = (time.monotonic(), self.clock().wall)
        kept = self._status_doc.get(actor)
        if kept is not None and kept[0] == key and _fresh(kept[1], at, STATUS_DOC_FRESH):
            return self._noting_busy(kept[2])
        while not self.lock.acquire(timeout=STATUS_BUSY_WAIT):
            if self._long_busy():
                busy = self._status_while_busy(actor, caller)
                if busy is not None:
                    return busy
        try:
            doc = self._status(caller)
            if len(self._status_doc) >= READ_MEMO_SIZE:
                self._status_doc.clear()
            self._status_doc[actor] = self._status_last = (key, at, doc)
            return dict(doc)  # the caller may add to it (the daemon's health): not to the kept one
        finally:
            self.lock.release()

    def _long_busy(self) -> bool:
        """A sweep or a rescan holds the engine lock (``_doing``), for STATUS_BUSY_GRACE
        already: what waits for the lock is given what was kept rather than wait longer (a
        shorter one, as most rescans are, is waited for: its answer is then of now)."""
        return self._busy is not None and time.monotonic() - self._busy_since >= STATUS_BUSY_GRACE

    def _status_while_busy(self, actor: Any, caller: Caller | None) -> dict[str, Any] | None:
        """A sweep or a rescan holds the engine: the last status made for this person, if the
        config is the same and it is under a minute old, with the attention entries as they
        stand now (``_noting_busy``), and its requests and holds as they stand now: the same
        as then if none was written since, else what status says of them for everyone made
        since (the operation makes it as it begins: ``prepare_status``). Someone else's
        status says the same of the sites, sweeps, audit and attention: it is given, with this
        person's requests and holds, to one who asked none before. None: nothing to give."""
        own = self._status_doc.get(actor)
        kept = own or self._status_last
        if kept is None or kept[0][0] != self._config_serial:
            return None
        if not 0 <= time.monotonic() - kept[1][0] < STALE_WHILE_BUSY:
            return None
        if kept is own and kept[0][2] == self.catalog.requests_generation:
            return self._noting_busy(kept[2])
        part = self._part_now(caller)
        if part is None:
            return None
        doc = _with_requests_part(kept[2], part)
        if kept is not own and "export_copies" in doc:
            sees = caller is None or bool(self.workflow.actor(caller).roles & COPIES_ROLES)
            doc["export_copies"] = _copies_view(doc["export_copies"], sees)
        return self._noting_busy(doc)

    def _noting_busy(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A copy of a status made earlier, with ``busy`` while a long operation runs: its
        attention entries (and ``ok``) as they stand now, for nothing the admin must see is
        hidden behind the sweep."""
        busy = self._busy
        if busy is None:
            return dict(doc)
        attention = self.attention.as_json()
        audit_ok = bool((doc.get("audit") or {}).get("ok", True))
        violations = len(doc.get("violations") or []) + int(doc.get("violations_not_shown") or 0)
        return {
            **doc,
            "attention": attention,
            "ok": audit_ok and not doc.get("blocked_sweeps") and not violations and not attention,
            "busy": {
                "doing": busy[0],
                "since": iso(busy[1], self.config.tz),
                "status_from": doc["time"],
            },
        }

    def _status(self, caller: Caller | None) -> dict[str, Any]:
        with self.lock, self.workflow.memo():
            now = self.clock()
            disk = self.disk_states()
            totals = self._site_totals()
            sites = {}
            for name, rules in self.rules.items():
                t = totals[name]
                d = disk.get(name)
                oldest_due = t.oldest_due
                sites[name] = {
                    "rule": rules.describe(),
                    "profile": rules.profile,
                    "segments": t.count,
                    "bytes": t.bytes,
                    "oldest": iso(t.oldest, rules.tz),
                    "newest": iso(t.newest, rules.tz),
                    # the oldest footage against its rule: past it only while held (or a guard
                    # waits for confirmation); older than one sweep interval past it is late
                    "oldest_expires": iso(oldest_due, rules.tz),
                    "oldest_past_rule": oldest_due is not None and oldest_due <= now.wall,
                    "disk_free_fraction": round(d.free / d.total, 4) if d and d.total else None,
                    "min_free": rules.min_free,
                }
            latest = self.catalog.latest_sweep()
            blocked = (
                [{"id": latest.id, "message": policy.name_sweep(latest.message, latest.id)}]
                if latest is not None and latest.state == "blocked"
                else []
            )
            done = self.catalog.latest_sweep(("done", "confirmed", "blocked"))
            verify = self.chain.check()
            part = self._requests_part(caller)
            by_state, holds = part.by_state, part.holds
            violations = part.violations
            open_requests = part.open_requests
            scans = [s.as_dict() for s in self.media.store.recent_scans(5)]
            attention = self.attention.as_json()
            return {
                "ok": verify.ok and not blocked and not part.violations_all and not attention,
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
                    # entries appended since the last check are verified at every status;
                    # the whole chain when this is full_every old
                    "verified_full": iso(self.chain.full_at, self.config.tz),
                    "full_every": self.chain.full_every,
                },
                "violations": violations,
                "violations_not_shown": part.violations_all - len(violations),
                "requests": by_state,
                "open_requests": open_requests,
                "last_scans": scans,
                "retention": self.stats.as_json(),
                # the recipient of a package compares this with `verify --fingerprint`
                "export_key": self.signing_key_json(),
                # exported packages on export targets and when they are destroyed
                "export_copies": _copies_view(
                    self.workflow.copies.status_part(now.wall),
                    caller is None or bool(self.workflow.actor(caller).roles & COPIES_ROLES),
                ),
            }


def request_problems(
    config: Config, undecided: Iterable[tuple[int, str, str]]
) -> list[tuple[str, int, str]]:
    """(file, line, message) for each open request that no decision recorded the rules of
    (``undecided``: id, site, state) whose site ``config`` no longer has: it is judged by its
    site's approval rules of now, and there would be none (it could not be decided, cancelled
    nor exported until the site is back). Such a config is refused (reload, ``config check``)."""
    line = config.line_of(("sites",))
    return [
        (
            str(config.source_path),
            line,
            f"sites: request {rid} ({state}) is on site {site}, which this config no longer "
            f"has, and no decision on it recorded its approval rules; keep the site, or decide "
            f"or cancel it first (`nvr-guard request cancel {rid}`)",
        )
        for rid, site, state in undecided
        if site not in config.sites
    ]


def preview(
    config: Config, scratch: Path, now: ClockReading, site: str | None, rescan: bool = True
) -> tuple[SweepOutcome, dict[str, Any]]:
    """`retention plan` under ``config``, on a scratch copy of the state, changing nothing:
    the outcome, and how it was made (``basis``, ``walked``: see :func:`describe_plan`).

    The copy (holds, sweep history, catalog) lets a new config be previewed (`nvr-guard
    --config new.yaml retention plan`) without needing or disturbing the running daemon; every
    expiry is re-derived from the config's rules. ``rescan``: the copy is also reconciled with
    the disk (a walk of every root: what runs without a daemon, whose catalog may be stale);
    otherwise only sites whose rows were read under another layout, roots or camera claims
    (:meth:`Scanner.unwalked_sites`) are walked, and the rest is planned from the catalog as
    the daemon keeps it. It composes a whole scratch engine, so it lives with the composition
    root, not in the sweeper.
    """
    real = Path(config.state_dir) / "catalog.db"
    db = scratch / "preview.db"
    if real.exists() and os.access(real, os.R_OK):
        copy_database(real, db)
    engine = Engine(config, clock=lambda: now, db_path=db, anchored=False)
    walked: list[str] = []
    if rescan:
        for name, rules in engine.rules.items():
            engine.catalog.recompute_expiry(name, rules)
        engine.reconcile(full=True)
        walked = sorted(engine.rules)
    else:
        for name in engine.scanner.unwalked_sites():
            engine.scanner.reconcile(name)
            walked.append(name)
        for name, rules in engine.rules.items():
            engine.catalog.ensure_expiry(name, rules)  # recomputed where the rules differ
    out = engine.sweep(actor="preview", now=now, dry_run=True, site=site)
    return out, describe_plan(engine, out, site, "rescan" if rescan else "snapshot", walked)


def describe_plan(
    engine: Engine, out: SweepOutcome, site: str | None, basis: str, walked: Sequence[str] = ()
) -> dict[str, Any]:
    """What `retention plan` adds to a dry run's outcome: the files the layouts do not match,
    the attention entries, the sites under ``retention: none``, and what the plan was made
    from: ``basis`` is ``catalog`` (the daemon's own, kept current by its watcher and walks),
    ``snapshot`` (a copy of it, expiries under the previewed config) or ``rescan`` (a copy
    walked again against the disk); ``walked``: the sites whose roots were walked for it;
    ``timezones``: each site's zone, for showing its times site-local."""
    out.unmatched = [
        u for u in engine.scanner.unmatched_report() if site is None or u["site"] == site
    ]
    out.attention = [
        a
        for a in engine.attention.as_json()
        # a shared root's entries stand as its first site's, and name every sharing site
        if site is None or a["site"] in (site, None) or site in (a.get("sites") or ())
    ]
    out.unmanaged = []
    for name, rules in engine.rules.items():
        if not rules.enforce and site in (None, name):
            count, size, _oldest, _newest = engine.catalog.site_stats(name)
            out.unmanaged.append(
                {"site": name, "segments": count, "bytes": size, "reason": UNMANAGED_REASON}
            )
    zones = {
        name: engine.config.sites[name].timezone or engine.config.timezone for name in engine.rules
    }
    return {"basis": basis, "walked": list(walked), "timezones": zones}


def _fresh(made: tuple[float, float], now: tuple[float, float], seconds: float) -> bool:
    """Made (monotonic clock, engine clock) under ``seconds`` ago by both clocks: the engine's
    may be set (a test, ``--now``), and the wall clock may jump."""
    return all(0 <= b - a < seconds for a, b in zip(made, now, strict=True))


@dataclasses.dataclass(frozen=True)
class _SiteTotals:
    count: int
    bytes: int
    oldest: float | None
    newest: float | None
    oldest_due: float | None  # the earliest expiry of the site's stored footage


@dataclasses.dataclass(frozen=True)
class _Shared:
    """What status says of requests and holds before it is filtered for who asks."""

    stamp: int  # which one (_SHARED)
    violations: list[str]
    by_state: dict[str, int]
    briefs: list[dict[str, Any]]  # every open request (request_brief)
    holds: list[dict[str, Any]]  # every active hold (holds_json)
    of_request: dict[int, int | None]  # hold id -> its request
    basis: dict[int, Any]  # request id -> what deciding who may see it needs (viewers_basis)
    until: dict[int, float]  # an approved one's id -> the end of its validity


@dataclasses.dataclass(frozen=True)
class _RequestsPart:
    by_state: dict[str, int]
    requests: list[dict[str, Any]]  # the open ones the caller may see (request_brief)
    holds: dict[str, Any]  # holds_view
    violations: list[str]  # those the caller may see
    violations_all: int  # how many there are
    open_requests: dict[str, list[Any]]  # status' open_requests


# who sees which packages are due for destruction in status (others see the counts)
COPIES_ROLES = frozenset({"admin", "auditor", "security_lead", "technician"})


def _copies_view(copies: dict[str, Any], sees_items: bool) -> dict[str, Any]:
    """Status' ``export_copies`` for one who may (or may not) see the packages listed."""
    if sees_items:
        return copies
    items = copies.get("items") or []
    return {**copies, "items": [], "items_not_shown": len(items) + copies["items_not_shown"]}


def _with_requests_part(doc: dict[str, Any], part: _RequestsPart) -> dict[str, Any]:
    """A status ``doc`` with what ``part`` says of requests, holds and violations instead."""
    return {
        **doc,
        "holds": part.holds["holds"],
        "holds_not_shown": part.holds["holds_not_shown"],
        "violations": part.violations,
        "violations_not_shown": part.violations_all - len(part.violations),
        "requests": part.by_state,
        "open_requests": part.open_requests,
    }


def _open_requests(
    requests: list[dict[str, Any]], now: float, until: dict[int, float]
) -> dict[str, list[Any]]:
    """Status' ``open_requests`` of the briefs ``requests`` (those the caller may see;
    ``until``: the end of each approved one's validity)."""
    soon = now + 3 * 86400
    return {
        "pending": [
            {"id": r["id"], "decide_by": r.get("decide_by"), "open_steps": r["open_steps"]}
            for r in requests
            if r["state"] == "pending"
        ],
        # approved but unused, and their validity ends within three days
        "expiring": [
            {"id": r["id"], "valid_until": r.get("valid_until")}
            for r in requests
            if r["state"] == "approved" and r["id"] in until and until[r["id"]] <= soon
        ],
        "overdue": [r["id"] for r in requests if r.get("violation")],
    }
