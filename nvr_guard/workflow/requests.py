"""The retrieval workflow (调取): requests, approvals, holds for evidence, exports.

Adapter between the pure decisions of ``access`` (who may do what, when) and the state: requests in
the catalog database, holds that keep the requested footage from ageing out, the export engine, and
the audit chain that records every step and every refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nvr_guard.config import Config
from nvr_guard.context import Context
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.identity import Caller
from nvr_guard.store.requests import RequestStore
from nvr_guard.times import iso, parse_time
from nvr_guard.workflow import access, index, protection
from nvr_guard.workflow.copies import Copies
from nvr_guard.workflow.export_job import ExportClaim, ExportJobs
from nvr_guard.workflow.record import rules_from_record, rules_record
from nvr_guard.workflow.viewing import Viewings

log = logging.getLogger("nvr_guard.workflow.requests")

CLOSED = ("denied", "cancelled", "expired", "closed")
# Stored states that are a decision on the request: the rules in force then are recorded with it
# and it is judged by those from then on (a later reload does not reopen or re-close it).
DECIDED = ("approved", "denied", "cancelled", "expired")
# Stored states whose state may still change with time (expire, be denied): the others are final,
# and only an exported emergency request still changes (its violation) — see ``refresh``.
OPEN = ("pending", "approved")
# ``refresh`` again within this many seconds (engine clock) only after something was recorded
REFRESH_AGAIN = 1.0
_Paths = list[Path]  # spelled once here: inside Workflow, ``list`` is a method
_Views = list[dict[str, Any]]


class Workflow:
    """Requests, approvals and exports on the instance's context: every act is judged by
    ``access`` and recorded in the audit chain."""

    def __init__(self, ctx: Context, open_destination: Callable[[str, Any], Any]) -> None:
        """``open_destination(target, tz)`` opens the gate in front of an export (the media
        gate's ``destination``: a scanned target directory or an enrolled medium)."""
        self.ctx = ctx
        self.store = RequestStore(ctx.catalog)
        self.exports = ExportJobs(self, open_destination)
        self.viewings = Viewings(self)
        self.copies = Copies(self)
        # every request parsed once, read again where it changed (``index``)
        self.index = index.RequestIndex(
            ctx.catalog, self.store, lambda: self.config, self._judge, self.memo
        )
        # per-thread memo of ``rules`` while one list/refresh/status call runs (``_memo``)
        self._local = threading.local()
        # (config, audit head) -> engine time and violations of the last ``refresh``
        self._last_refresh: tuple[tuple[int, int], float, list[str]] | None = None
        # requests refresh could not judge (their site is gone), each logged once
        self._unjudged: set[int] = set()

    # ---- the export's seams and progress (``workflow.export_job``) ------------------------------
    @property
    def progress(self) -> dict[int, float]:
        """Running exports' progress (0..1) by request id."""
        return self.exports.progress

    @property
    def exporter(self) -> Callable[..., Any]:
        """The package builder (tests put a fast stand-in here)."""
        return self.exports.exporter

    @exporter.setter
    def exporter(self, fn: Callable[..., Any]) -> None:
        self.exports.exporter = fn

    @property
    def open_destination(self) -> Callable[[str, Any], Any]:
        """The gate that opens an export's destination (tests put a stand-in here)."""
        return self.exports.open_destination

    @open_destination.setter
    def open_destination(self, fn: Callable[[str, Any], Any]) -> None:
        self.exports.open_destination = fn

    # ---- context -------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The config in force."""
        return self.ctx.config

    def now(self) -> float:
        """The instance clock's wall time."""
        return self.ctx.clock().wall

    def actor(self, caller: Caller) -> access.Actor:
        """``caller`` as ``access`` judges it: roles from the config, and clearance level."""
        user = self.config.people.users.get(caller.user)
        level = user.level if user is not None else 1
        roles = self.ctx.roles_for(caller)
        if caller.uid == 0:
            level = 2
        return access.Actor(user=caller.user, roles=frozenset(roles), level=level)

    @contextlib.contextmanager
    def memo(self) -> Iterator[None]:
        """Within this block (this thread only), ``rules(site)`` is computed once per site: a
        call that judges thousands of requests asks for the same rules thousands of times."""
        if getattr(self._local, "rules", None) is not None:
            yield
            return
        self._local.rules = {}
        try:
            yield
        finally:
            self._local.rules = None

    def rules(self, site: str) -> access.AccessRules:
        """The approval rules of ``site`` under the config in force."""
        memo: dict[tuple[int, str], access.AccessRules] | None = getattr(self._local, "rules", None)
        if memo is None:
            return self._rules(site)
        key = (id(self.config), site)
        got = memo.get(key)
        if got is None:
            got = memo[key] = self._rules(site)
        return got

    def _rules(self, site: str) -> access.AccessRules:
        ap = self.config.approval
        steps, hours = self.config.approval_for(site)
        h0, h1 = (int(a) * 60 + int(b) for a, b in (x.split(":") for x in hours.split("-")))
        return access.AccessRules(
            steps=tuple(steps),
            decide_within=ap.decide_within,
            holidays=frozenset(ap.holidays),
            workdays=frozenset(ap.workdays),
            valid_for=ap.valid_for,
            hours=(h0, h1),
            duty_role=ap.after_hours_role,
            emergency_roles=frozenset(ap.emergency.roles),
            backfill_within=float(ap.emergency.backfill_within.seconds),
            max_range=float(ap.max_range.seconds),
            tz=self.config.site_tz(site),
            camera_levels=self.camera_levels(),
            after_hours_valid=float(ap.after_hours_valid.seconds),
            approver_may_export=bool(ap.approver_may_export),
        )

    # ---- the rules a request is judged by ------------------------------------------------------
    def _judged(self, r: access.Request, extra: dict[str, Any] | None = None) -> access.AccessRules:
        """The rules in force when ``r`` was decided (recorded with it), else the current ones
        (``extra``: the request's stored extras, when already read)."""
        record = (self.store.extra(r.id) if extra is None else extra).get("judged_by")
        if record:
            return rules_from_record(record)
        if r.site not in self.config.sites:
            # never decided, and its site's approval rules are gone with the site
            raise PolicyRefused(
                f"request {r.id} is on site {r.site}, which the config in force no longer has, "
                "and no decision on it recorded the rules it is judged by: put the site back "
                "in the config to decide, cancel or export it"
            )
        return self.rules(r.site)

    def _judge(
        self, r: access.Request, extra: dict[str, Any]
    ) -> tuple[access.Request, access.AccessRules | None, access.AccessRules | None]:
        """``r`` for the index: with its exporter, the rules it is judged by and those it is
        acted on by (None, None when its site is gone)."""
        r = self.with_exporter(r)
        if r.site not in self.config.sites:
            return r, None, None
        judged = self._judged(r, extra)
        return r, judged, self._acting(r, judged)

    def rules_of(self, r: access.Request) -> access.AccessRules:
        """The rules ``r`` is judged by: those recorded when it was decided, else the current."""
        return self._judged(r)

    def _acting(self, r: access.Request, judged: access.AccessRules) -> access.AccessRules:
        """The rules for an act on ``r`` now (approve, deny, export, see): the request's approvals
        are judged by ``judged``; who acts is judged by the current config (roles and camera
        levels, separation of duties, after-hours cover) and, until it is exported, so are the
        export hours."""
        if r.site not in self.config.sites:
            # its site is gone: the site's hours with it; who acts is judged as everywhere
            ap = self.config.approval
            return dataclasses.replace(
                judged,
                camera_levels=self.camera_levels(),
                after_hours_valid=float(ap.after_hours_valid.seconds),
                approver_may_export=bool(ap.approver_may_export),
            )
        cur = self.rules(r.site)
        over: dict[str, Any] = {
            "camera_levels": cur.camera_levels,
            "technician_role": cur.technician_role,
            "after_hours_valid": cur.after_hours_valid,
            "approver_may_export": cur.approver_may_export,
        }
        if r.exported_at is None:
            over["hours"] = cur.hours
        return dataclasses.replace(judged, **over)

    def _record_rules(self, r: access.Request, rules: access.AccessRules, now: float) -> None:
        self.store.update(r.id, judged_by=rules_record(rules, r, now, self.config.digest))

    def camera_sites(self) -> dict[str, str]:
        """Each catalogued camera's site."""
        return {cam: site for site, cam in self.ctx.catalog.cameras()}

    def camera_levels(self) -> dict[str, int]:
        """Each camera's clearance level (from ``cameras:``; unclassified ones need level 2)."""
        levels = {cam: 2 for cam in self.camera_sites()}  # unclassified: the wider permission
        for cam, c in self.config.cameras.items():
            levels[cam] = c.level
        return levels

    def _refused(self, caller: Caller, what: str, decision: access.Decision) -> None:
        self.ctx.audit.append(
            caller.user, "access.denied", what, {"uid": caller.uid, "reason": decision.reason}
        )
        decision.raise_if_denied()

    # ---- JSON views ----------------------------------------------------------------------------
    def request_json(
        self,
        r: access.Request,
        approvals: list[access.Approval] | None = None,
        extra: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """One request as ``request show`` prints it, with its state brought up to date
        (``extra``, ``now``: its stored extras and the time, when the caller has them)."""
        approvals = self.store.approvals(r.id) if approvals is None else approvals
        extra = self.store.extra(r.id) if extra is None else extra
        rules = self._judged(r, extra) if r.site in self.config.sites else None
        parts = self._static_json(r, approvals, extra, rules)
        return self._timed_json(r, approvals, rules, parts, self.now() if now is None else now)

    def _entry_json(self, e: index.Entry, now: float) -> dict[str, Any]:
        """``request_json`` of an index entry: the parts that do not change with the time are
        made once per entry."""
        parts = e.static
        if parts is None:
            parts = e.static = self._static_json(e.r, e.approvals, e.extra, e.judged)
        return self._timed_json(e.r, e.approvals, e.judged, parts, now)

    def _static_json(
        self,
        r: access.Request,
        approvals: list[access.Approval],
        extra: dict[str, Any],
        rules: access.AccessRules | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``request_json`` without what depends on the time (``state``, ``decide_by``,
        ``violation``): the keys before ``decide_by``, and those after it."""
        tz = self.config.site_tz(r.site) if rules is not None else self.config.tz
        head: dict[str, Any] = {
            "id": r.id,
            "state": None,
            "requester": r.requester,
            "site": r.site,
            "cameras": list(r.cameras),
            "from": iso(r.start, tz),
            "to": iso(r.end, tz),
            "reason": r.reason,
            "basis": r.basis,
            "recipient": {
                "unit": r.recipient.unit,
                "person": r.recipient.person,
                "contact": r.recipient.contact,
            },
            "format": r.format,
            "encrypt": r.encrypt,
            "emergency": r.emergency,
            "created": iso(r.created, tz),
            "approved_at": iso(r.approved_at, tz),
            "exported_at": iso(r.exported_at, tz),
            "package": extra.get("package"),
            # a protected export's sealed file (mode, file, sha256, size, recipient)
            "sealed": extra.get("sealed"),
            # whether its copy is known destroyed, how and when (null: not known)
            "destroyed": extra.get("destroyed"),
            # the rules it was decided by (null while undecided: the current ones apply)
            "judged_by": extra.get("judged_by"),
            "approvals": [
                {
                    "approver": a.approver,
                    "role": a.role,
                    "decision": a.decision,
                    "note": a.note,
                    "time": iso(a.time, tz),
                    **({"mask": a.mask} if a.mask else {}),
                }
                for a in approvals
            ],
            "privacy_zones": protection.zones_json(protection.zones_for(self.config, r, approvals)),
        }
        tail: dict[str, Any] = {}
        if rules is not None:
            head["steps"] = list(access.steps_for(r, rules))
            head["open_steps"] = list(access.open_steps(r, approvals, rules))
            until = access.valid_until(r, approvals, rules)
            tail["valid_until"] = iso(until, tz) if until else None
            tail["violation"] = None
            if r.resolved:
                tail["resolved"] = r.resolved
        return head, tail

    def _timed_json(
        self,
        r: access.Request,
        approvals: list[access.Approval],
        rules: access.AccessRules | None,
        parts: tuple[dict[str, Any], dict[str, Any]],
        now: float,
    ) -> dict[str, Any]:
        """``parts`` (``_static_json``) as of ``now``: a new dict each time."""
        out = dict(parts[0])
        if rules is None:
            out["state"] = r.state
            return out
        out["state"] = state = access.state_of(r, approvals, now, rules)
        if state == "pending":
            out["decide_by"] = iso(
                access.decide_deadline(r.created, rules), self.config.site_tz(r.site)
            )
        out.update(parts[1])
        out["violation"] = access.emergency_violation(r, approvals, now, rules)
        return out

    def request_brief(self, e: index.Entry, now: float) -> dict[str, Any]:
        """What ``status`` lists of a request (an index entry): of ``request_json``, its id,
        up-to-date state, open steps, deadline, validity and violation."""
        if e.judged is None:
            return {"id": e.r.id, "state": e.r.state, "open_steps": []}  # no rules to judge by
        view = self._entry_json(e, now)
        keys = ("id", "state", "open_steps", "decide_by", "valid_until", "violation")
        return {k: view[k] for k in keys if k in view}

    # ---- requests ------------------------------------------------------------------------------
    def new(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        """File a request; its footage is held from now on (audited)."""
        cameras = tuple(c.strip() for c in str(args.get("cameras", "")).split(",") if c.strip())
        sites = self.camera_sites()
        known = {c for c in cameras if c in sites}
        site_set = {sites[c] for c in known}
        if len(site_set) > 1:
            raise PolicyRefused(
                f"cameras {', '.join(cameras)} belong to different sites "
                f"({', '.join(sorted(site_set))}); file one request per site"
            )
        site = next(iter(site_set)) if site_set else next(iter(self.config.sites))
        tz = self.config.site_tz(site)
        start = parse_time(str(args["from"]), tz, "--from", now=self.now())
        end = parse_time(str(args["to"]), tz, "--to", now=self.now())
        rec = args.get("recipient") or {}
        draft = access.Draft(
            cameras=cameras,
            start=start,
            end=end,
            reason=str(args.get("reason") or ""),
            basis=str(args.get("basis") or ""),
            recipient=access.Recipient(
                unit=str(rec.get("unit") or ""),
                person=str(rec.get("person") or ""),
                contact=str(rec.get("contact") or ""),
            ),
            format=str(args.get("format") or "mp4"),
            emergency=bool(args.get("emergency")),
        )
        actor = self.actor(caller)
        rules = self.rules(site)
        now = self.now()
        with self.ctx.recording():
            footage = sum(len(self.ctx.catalog.segments_of(site, c, start, end)) for c in known)
            d = access.check_new(draft, actor, self.camera_levels(), footage, rules, now)
            if not d.allowed:
                self._refused(caller, "request:new", d)
            encrypt = self._encrypt_for_new(caller, site, draft, args.get("encrypt"))
            r = self.store.create(
                access.Request(
                    id=0,
                    requester=caller.user,
                    site=site,
                    cameras=draft.cameras,
                    start=start,
                    end=end,
                    reason=draft.reason,
                    basis=draft.basis,
                    recipient=draft.recipient,
                    format=draft.format,
                    emergency=draft.emergency,
                    state="pending",
                    created=now,
                    encrypt=encrypt,
                )
            )
            h0, h1 = access.hold_range(r, float(self.config.export.hold_margin.seconds))
            for cam in r.cameras:
                self.ctx.catalog.add_hold(
                    kind="request",
                    site=site,
                    camera=cam,
                    start=h0,
                    end=h1,
                    reason=f"request {r.id}: {r.reason}",
                    owner=caller.user,
                    created=now,
                    request_id=r.id,
                    roots=self.ctx.roots_of(site),
                )
            view = self.request_json(r, [])
            self.ctx.audit.append(caller.user, "request.new", f"request:{r.id}", view)
            return view

    def _encrypt_for_new(
        self, caller: Caller, site: str, draft: access.Draft, requested: Any
    ) -> str:
        """The encryption a new request is filed with (``protection``); refusals audited."""
        if draft.format == "view":
            if requested not in (None, "none"):
                self._refused(
                    caller,
                    "request:new",
                    access.Decision(
                        False,
                        "--encrypt: a viewing request (--format view) is watched in the console "
                        "and never exported; leave --encrypt out",
                        2,
                    ),
                )
            return "none"
        native = protection.native_refusal(self.config, draft.format, draft.cameras)
        if native is not None:
            self._refused(caller, "request:new", native)
        mode, refusal = protection.encrypt_for_new(
            self.config,
            site,
            draft.cameras,
            None if requested is None else str(requested),
            draft.recipient.unit,
        )
        if refusal is not None:
            self._refused(caller, "request:new", refusal)
        return mode

    def _load(self, rid: int) -> tuple[access.Request, list[access.Approval], access.AccessRules]:
        """The request, its approvals and the rules it is judged by."""
        r = self.with_exporter(self.store.get(rid))
        approvals = self.store.approvals(rid)
        return r, approvals, self._judged(r)

    def with_exporter(self, r: access.Request) -> access.Request:
        """``r`` with its exporter: one exported before the exporter was stored with the
        request has it from its ``export.done`` entry (separation of duties needs it)."""
        if r.exported_at is None or r.exporter is not None:
            return r
        done = None
        for e in self.ctx.audit.entries(obj=f"request:{r.id}", action="export.done"):
            done = e
        return r if done is None else dataclasses.replace(r, exporter=done.actor)

    def _current(
        self, rid: int
    ) -> tuple[access.Request, list[access.Approval], access.AccessRules]:
        """The request with its state brought up to date (expiry is a matter of time)."""
        r, approvals, rules = self._load(rid)
        self._settle(r, approvals, rules)
        r, approvals, rules = self._load(rid)
        return r, approvals, rules

    def _settle(
        self, r: access.Request, approvals: list[access.Approval], rules: access.AccessRules
    ) -> None:
        now = self.now()
        state = access.state_of(r, approvals, now, rules)
        if state == r.state:
            return
        fields: dict[str, Any] = {"state": state}
        if state == "approved" and r.approved_at is None:
            fields["approved_at"] = access.approved_at(r, approvals, rules)
        if state in CLOSED and r.closed_at is None:
            fields["closed_at"] = now
        if state in DECIDED and not self.store.extra(r.id).get("judged_by"):
            fields["judged_by"] = rules_record(rules, r, now, self.config.digest)
        with self.ctx.recording():  # the new state and its entry commit together
            self.store.update(r.id, **fields)
            if state in CLOSED:
                self._end_holds(r.id, now)
            if state == "expired":
                self.ctx.audit.append(
                    "nvr-guard", "request.expired", f"request:{r.id}", {"was": r.state}
                )

    def _end_holds(self, rid: int, until: float) -> None:
        self.ctx.catalog.shorten_request_holds(rid, until)

    def refresh(self) -> list[str]:
        """Periodic: expire what is due, report emergency violations (each audited when it opens,
        and again when it reopens or changes), stop exports whose authority lapsed."""
        with self.ctx.lock, self.memo():  # it settles and records: never beside another thread
            now = self.now()
            done = self._last_refresh
            if (
                done is not None
                and done[0] == (id(self.config), self.ctx.audit.head()[0])
                and 0 <= now - done[1] < REFRESH_AGAIN
            ):
                # nothing recorded since the last pass (every change of a request is), the same
                # config, and under a second later: only time could have changed a state, and
                # what the views show is computed at their own time anyway
                for rid in list(self.exports.claims):
                    self.exports.recheck(rid)
                return list(done[2])
            violations = []
            # final states stay as they are; of those, only an exported emergency request can
            # have (or close) a violation: the others need no look at all
            for ent in self.index.current().select(states=OPEN, emergency_exported=True):
                r = ent.r
                try:
                    rules = ent.judged if ent.judged is not None else self._judged(r, ent.extra)
                except PolicyRefused as exc:
                    # its site is gone: nothing to judge it by; the others are judged on
                    if r.id not in self._unjudged:
                        self._unjudged.add(r.id)
                        log.warning("%s", exc)
                    continue
                if r.exported_at is None:
                    # never exported: no violation, only a state that time may have changed
                    if access.state_of(r, ent.approvals, now, rules) != r.state:
                        self._settle(r, ent.approvals, rules)
                    continue
                r2, approvals, rules = self._current(r.id)
                v = access.emergency_violation(r2, approvals, self.now(), rules)
                if v:
                    violations.append(v)
                    last = None
                    for e in self.ctx.audit.entries(obj=f"request:{r.id}", action="request."):
                        if e.action in ("request.violation", "request.approve", "request.resolve"):
                            last = e
                    if (
                        last is None
                        or last.action != "request.violation"
                        or (last.details.get("violation") != v)
                    ):
                        log.warning("%s", v)
                        self.ctx.audit.append(
                            "nvr-guard", "request.violation", f"request:{r.id}", {"violation": v}
                        )
            for rid in list(self.exports.claims):
                self.exports.recheck(rid)
            self.viewings.expire()  # a clip goes when its approval's validity ends
            self._last_refresh = ((id(self.config), self.ctx.audit.head()[0]), now, violations)
            return violations

    def _visible(
        self, caller: Caller, rid: int
    ) -> tuple[access.Request, list[access.Approval], access.AccessRules]:
        """The request brought up to date, if ``caller`` may see it; else refused (exit 3) and
        audited. An id that does not exist is refused the same way to anyone who does not see
        every request."""
        actor = self.actor(caller)
        try:
            r, approvals, rules = self._current(rid)
        except (InvalidInput, PolicyRefused):
            # no such request, or one that cannot be judged (its site is gone): said as it is
            # to those who see every request; to anyone else, as any request not shown
            if actor.roles & access.SEE_ALL_ROLES:
                raise
            self._refused(caller, f"request:{rid}", access.not_shown(actor, rid))
            raise  # not reached: _refused raises
        d = access.check_view(r, approvals, actor, self._acting(r, rules))
        if not d.allowed:
            # on record with the real reason; told what an id that does not exist tells, so
            # the refusal (of show, approve, deny, watch...) says nothing of what it holds
            self.ctx.audit.append(
                caller.user,
                "access.denied",
                f"request:{rid}",
                {"uid": caller.uid, "reason": d.reason},
            )
            access.not_shown(actor, rid).raise_if_denied()
        return r, approvals, rules

    def may_view(self, caller: Caller, rid: int | None) -> bool:
        """Would ``request show`` show request ``rid`` to ``caller``? Asked without auditing by the
        views that only mention a request (holds, status), to decide whether they name it. None
        (a hold that does not name its request) and an id that does not exist: only to those who
        see every request."""
        actor = self.actor(caller)
        if actor.roles & access.SEE_ALL_ROLES:
            return True
        if rid is None:
            return False
        try:
            r = self.store.get(rid)
        except InvalidInput:
            return False
        if r.site not in self.config.sites:
            return False
        approvals = self.store.approvals(rid)
        return access.check_view(r, approvals, actor, self._acting(r, self._judged(r))).allowed

    def _snapshot(self, wait: bool = True) -> index.Snapshot:
        """The index for a read: brought up to date (``refresh`` first) when the engine lock is
        free; as it is when a sweep holds the lock and no request row was written since;
        else after waiting for the lock (``wait=False``: ``index.Busy`` instead)."""
        if self.ctx.lock.acquire(blocking=False):
            try:
                self.refresh()
                return self.index.current()
            finally:
                self.ctx.lock.release()
        snap = self.index.fresh()
        if snap is not None:
            return snap
        if not wait:
            raise index.Busy
        with self.ctx.lock:
            self.refresh()
            return self.index.current()

    def _only_own(self, actor: access.Actor, snap: index.Snapshot) -> str | None:
        """``actor``'s name when no role of theirs shows them anyone else's request: then all
        they may see is what they filed or decided on (``access.check_view``), and a list is
        read for those alone (an operator's list walked every request before); else None.

        The roles that show others' requests: those who see all, and for any request the roles
        of its steps, its native-copy step and after-hours role (as recorded when it was
        decided, or as configured now) and the technician role of now."""
        if actor.roles & access.SEE_ALL_ROLES:
            return None
        seeing = snap.memo.get("seeing")
        if seeing is None:
            roles = set(snap.recorded_roles())
            for site in snap.config.sites:
                r = self.rules(site)
                roles.update((*r.steps, r.native_role, r.duty_role, r.technician_role))
            seeing = snap.memo["seeing"] = frozenset(roles)
        return None if actor.roles & seeing else actor.user

    def may_view_many(self, caller: Caller, rids: Sequence[int | None]) -> set[int | None]:
        """Those of ``rids`` that :meth:`may_view` would show to ``caller``, read in one go."""
        if self.actor(caller).roles & access.SEE_ALL_ROLES:
            return set(rids)  # nothing to read
        seen = self.visible_in(caller, self.viewers_basis(r for r in rids if r is not None))
        return set(rids) if seen is None else set(seen)

    def viewers_basis(self, rids: Iterable[int]) -> dict[int, index.Entry]:
        """What deciding who may see each of ``rids`` needs, read once for many people: the
        request, its approvals and the rules it is acted on by, as the index holds them. See
        :meth:`visible_in`."""
        entries = self.index.current().entries
        return {rid: entries[rid] for rid in rids if rid in entries}

    def visible_in(self, caller: Caller, basis: dict[int, index.Entry]) -> set[int] | None:
        """Those of ``basis`` that :meth:`may_view_many` shows ``caller`` (None: every
        request, for who sees all of them). Each answer is kept with the entry it judged
        (``Entry.seen``: the same at any time)."""
        actor = self.actor(caller)
        if actor.roles & access.SEE_ALL_ROLES:
            return None
        return {rid for rid, e in basis.items() if e.may_see(actor)}

    def progress_of(self, caller: Caller, rid: int) -> float | None:
        """The running export's progress of request ``rid``, to those who may see the request
        (the same refusal as ``request show`` otherwise: ids cannot be probed)."""
        with self.ctx.recording():
            self._visible(caller, rid)
        return self.progress.get(rid)

    def list(
        self,
        caller: Caller,
        state: str | None,
        waiting: bool = False,
        limit: int | None = None,
        before: int | None = None,
        *,
        wait: bool = True,
    ) -> list[dict[str, Any]]:
        """The requests ``caller`` may see (the others are left out, not refused), newest first
        when ``limit`` or ``before`` page through them; ``waiting``: only those ``caller`` may
        decide now (``may_decide``). Read from the index, without the engine lock unless it
        must be brought up to date (``wait=False``: ``index.Busy`` when that lock is held)."""
        if state and state not in access.STATES:
            raise InvalidInput(f"unknown state {state!r}; one of {', '.join(access.STATES)}")
        actor = self.actor(caller)
        paged = limit is not None or before is not None
        # stored states a request shown must have: a final state stays; a pending or approved
        # one may have turned expired or denied (``access.state_of``), nothing else
        states: tuple[str, ...] | None = None
        flagged = False
        if waiting:  # one decides only on open requests, or backfills an emergency export
            states, flagged = OPEN, True
        if state:
            want = (state,) if state not in ("expired", "denied", *OPEN) else (state, *OPEN)
            states = want if states is None else tuple(x for x in states if x in want)
            flagged = flagged and state == "exported"
        snap = self._snapshot(wait)
        with self.memo():
            now = self.now()
            views: list[dict[str, Any]] = []
            for e in snap.select(
                states=states,
                emergency_exported=flagged,
                below=before,
                newest_first=paged,
                own_or_decided_by=self._only_own(actor, snap),
            ):
                r, approvals = e.r, e.approvals
                if waiting and not actor.roles & e.deciders:
                    continue  # check_approve would refuse: none of the roles it still needs
                if not e.may_see(actor):
                    continue
                if e.judged is not None and e.acting is not None:
                    current = access.state_of(r, approvals, now, e.judged)
                    may = access.check_approve(r, approvals, actor, e.acting, now).allowed
                else:
                    current, may = r.state, False
                if state and current != state:
                    continue
                if waiting and not may:
                    continue
                # the JSON only for what is shown
                view = self._entry_json(e, now)
                view["may_decide"] = may
                views.append(view)
                if limit is not None and len(views) >= limit:
                    break
            return views

    def overview(self) -> tuple[dict[str, int], _Views]:
        """Requests per state (every request), and the ones that may still need someone — open
        (pending, approved) or exported in an emergency — with what ``status`` lists of them
        (``request_brief``), every one of them: status filters them per person
        (:meth:`visible_in`). For ``status``, after ``refresh``."""
        with self.memo():
            now = self.now()
            by_state = {k: n for k, n in self.store.counts().items() if k not in OPEN}
            views = []
            for e in self.index.current().select(states=OPEN, emergency_exported=True):
                view = self.request_brief(e, now)
                if e.r.state in OPEN:  # a final state was counted as stored
                    by_state[view["state"]] = by_state.get(view["state"], 0) + 1
                views.append(view)
            return by_state, views

    def _may_decide(
        self, r: access.Request, approvals: Sequence[access.Approval], actor: access.Actor
    ) -> bool:
        """Would ``actor``'s approval of ``r`` be taken now? (Asked, not recorded.)"""
        if r.site not in self.config.sites:
            return False
        rules = self._acting(r, self._judged(r))
        return access.check_approve(r, approvals, actor, rules, self.now()).allowed

    def show(self, caller: Caller, rid: int, *, wait: bool = True) -> dict[str, Any]:
        """Request ``rid``, if ``caller`` may see it (``may_decide``: whether ``caller`` could
        approve or deny it now). From the index, without the engine lock (a sweep may hold it
        for seconds), when it is shown and its stored state is its state now (nothing to settle
        and record); else, and for a refusal (recorded), under the lock (``wait=False``:
        ``index.Busy`` when it is held)."""
        e = self._snapshot(wait).entries.get(rid)
        if e is not None and e.judged is not None and e.acting is not None:
            actor = self.actor(caller)
            now = self.now()
            if e.may_see(actor) and access.state_of(e.r, e.approvals, now, e.judged) == e.r.state:
                view = self._entry_json(e, now)
                view["may_decide"] = access.check_approve(
                    e.r, e.approvals, actor, e.acting, now
                ).allowed
                return view
        if wait:
            return self._show_locked(caller, rid)
        if not self.ctx.lock.acquire(blocking=False):
            raise index.Busy
        try:
            return self._show_locked(caller, rid)
        finally:
            self.ctx.lock.release()

    def _show_locked(self, caller: Caller, rid: int) -> dict[str, Any]:
        with self.ctx.recording():
            r, approvals, _ = self._visible(caller, rid)
            view = self.request_json(r, approvals)
            view["may_decide"] = self._may_decide(r, approvals, self.actor(caller))
            return view

    def approve(
        self,
        caller: Caller,
        rid: int,
        note: str,
        as_step: str | None = None,
        mask: str | None = None,
    ) -> dict[str, Any]:
        """Approve one step of request ``rid`` (audited; refused and audited if not allowed),
        adding the privacy zones of ``mask`` to its export (``protection.check_mask``)."""
        with self.ctx.recording():
            r, approvals, rules = self._visible(caller, rid)
            now = self.now()
            claim = self.exports.claims.get(rid)
            if claim is not None and r.exporter is None:
                # an export under way: its technician is already the exporter
                r = dataclasses.replace(r, exporter=claim.caller.user)
            d = access.check_approve(
                r,
                approvals,
                self.actor(caller),
                self._acting(r, rules),
                now,
                as_step=as_step,
                note=note,
            )
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            zones = protection.check_mask(r, mask, caller.user) if mask else ""
            a = access.Approval(
                approver=caller.user,
                role=d.step or "",
                decision="approve",
                note=note,
                time=now,
                mask=zones,
            )
            self.store.add_approval(rid, a)
            self.ctx.audit.append(
                caller.user,
                "request.approve",
                f"request:{rid}",
                {"step": a.role, "note": note, **({"mask": zones} if zones else {})},
            )
            r, approvals, rules = self._current(rid)
            self.exports.recheck(rid)  # an approver may not be its exporter
            return self.request_json(r, approvals)

    def deny(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        """Deny request ``rid`` with a reason; a running export of it stops."""
        with self.ctx.recording():
            r, approvals, rules = self._visible(caller, rid)
            now = self.now()
            acting = self._acting(r, rules)
            d = access.check_deny(r, self.actor(caller), reason, acting, now, approvals)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            roles = self.actor(caller).roles
            role = next((s for s in access.steps_for(r, rules) if s in roles), "admin")
            self.store.add_approval(rid, access.Approval(caller.user, role, "deny", reason, now))
            self.ctx.audit.append(caller.user, "request.deny", f"request:{rid}", {"reason": reason})
            r, approvals, rules = self._current(rid)
            self.exports.recheck(rid)
            self.viewings.expire(rid)
            return self.request_json(r, approvals)

    def cancel(self, caller: Caller, rid: int) -> dict[str, Any]:
        """Cancel request ``rid``; its holds end and a running export of it stops."""
        with self.ctx.recording():
            r, approvals, rules = self._visible(caller, rid)
            now = self.now()
            d = access.check_cancel(r, self.actor(caller), now)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            fields: dict[str, Any] = {"state": "cancelled", "closed_at": now}
            if not self.store.extra(rid).get("judged_by"):
                fields["judged_by"] = rules_record(rules, r, now, self.config.digest)
            self.store.update(rid, **fields)
            self._end_holds(rid, now)
            self.ctx.audit.append(caller.user, "request.cancel", f"request:{rid}", {})
            self.exports.recheck(rid)
            self.viewings.expire(rid)
            r, approvals, rules = self._load(rid)
            return self.request_json(r, approvals)

    def resolve(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        """Close an emergency request's open violation with a reason."""
        with self.ctx.recording():
            r, approvals, rules = self._visible(caller, rid)
            if not access.emergency_violation(r, approvals, self.now(), rules):
                raise InvalidInput(f"request {rid} has no open violation to resolve")
            d = access.check_resolve(r, self.actor(caller), reason)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            self.store.update(rid, resolved=f"{caller.user}: {reason}")
            self.ctx.audit.append(
                caller.user, "request.resolve", f"request:{rid}", {"reason": reason}
            )
            r, approvals, rules = self._load(rid)
            return self.request_json(r, approvals)

    # ---- export (``workflow.export_job``) ------------------------------------------------------
    def signing_key(self) -> tuple[Any, str]:
        """The key to sign an export with, checked again at every load (see ``ExportJobs``)."""
        return self.exports.signing_key()

    def export(
        self,
        caller: Caller,
        rid: int,
        target: str,
        progress: Callable[[float], None] | None = None,
        caller_gone: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Export request ``rid`` onto ``target``: claim, build, commit (``caller_gone``: see
        ``ExportJobs.export_finish``)."""
        return self.exports.export(caller, rid, target, progress, caller_gone)

    def export_begin(self, caller: Caller, rid: int, target: str) -> ExportClaim:
        """Check ``caller`` may export ``rid`` onto ``target`` and claim the request's export."""
        return self.exports.export_begin(caller, rid, target)

    def export_finish(
        self, claim: ExportClaim, progress: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        """Build the claimed package, then commit it only if the export's authority holds."""
        return self.exports.export_finish(claim, progress)

    def remove_stale_exports(self, targets: _Paths | None = None) -> _Paths:
        """Remove (and audit) what exports killed mid-way left in the export targets."""
        return self.exports.remove_stale_exports(targets)

    def form(self, caller: Caller, rid: int) -> str:
        """The printable approval record of request ``rid`` (HTML), naming the signing key."""
        from nvr_guard.export import approval_record_html

        view = self.show(caller, rid)
        signer = self.ctx.key_fingerprint or self.ctx.ensure_signing_key()
        return approval_record_html(view, view["approvals"], None, signer=signer)
