"""The retrieval workflow (调取): requests, approvals, holds for evidence, exports.

Adapter between the pure decisions of ``access`` (who may do what, when) and the state: requests in
the catalog database, holds that keep the requested footage from ageing out, the export engine, and
the audit chain that records every step and every refusal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo

from nvr_guard.errors import InvalidInput, NvrGuardError, PolicyRefused, RuntimeFailure
from nvr_guard.export import run_export
from nvr_guard.export.ffmpeg import stop_when
from nvr_guard.store.requests import RequestStore
from nvr_guard.text import Duration
from nvr_guard.times import iso, parse_time
from nvr_guard.workflow import access

if TYPE_CHECKING:
    from nvr_guard.engine import Engine
from nvr_guard.identity import Caller

log = logging.getLogger("nvr_guard.workflow.requests")

CLOSED = ("denied", "cancelled", "expired", "closed")
# Stored states that are a decision on the request: the rules in force then are recorded with it
# and it is judged by those from then on (a later reload does not reopen or re-close it).
DECIDED = ("approved", "denied", "cancelled", "expired")
_Paths = list[Path]  # spelled once here: inside Workflow, ``list`` is a method
# How often a running export re-checks its authority (expiry, a reload) between the immediate
# checks that a deny or cancel triggers.
RECHECK_EVERY = 0.5


@dataclass
class ExportClaim:
    """An export in flight. At most one per request, taken under the engine lock before any
    ffmpeg starts; the export commits only if its authority still holds at commit time."""

    rid: int
    caller: Caller
    target: str
    since: float
    dest: Any
    clips: list[tuple[str, list[Any]]]
    view: dict[str, Any]
    key: Any
    fingerprint: str
    head: tuple[int, str]
    stop: threading.Event = field(default_factory=threading.Event)
    why: str | None = None  # why it is being aborted
    committing: bool = False  # the engine lock is held from the commit check to the record
    last_check: float = 0.0


class _CommitGate:
    """The destination as the package builder sees it, with the authority check added to its
    commit hook: the builder calls ``before_commit`` right before the rename that makes the
    package visible, and on success the engine lock stays held until the request is recorded
    as exported, so no deny, cancel or reload can land between the check and the record."""

    def __init__(self, dest: Any, check: Callable[[], None]) -> None:
        self._dest = dest
        self._check = check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dest, name)

    def before_commit(self, tmp: Path) -> None:
        hook = getattr(self._dest, "before_commit", None)
        if hook is not None:
            hook(tmp)
        self._check()


class Workflow:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = RequestStore(engine.catalog)
        self.progress: dict[int, float] = {}
        self._export_lock = threading.Lock()
        self._claims: dict[int, ExportClaim] = {}  # under the engine lock
        # the seams of an export (tests put a fast stand-in here): the package builder, and the
        # gate that opens a destination (a scanned target directory or an enrolled medium)
        self.exporter: Callable[..., Any] = run_export
        self.open_destination: Callable[[str, Any], Any] = lambda target, tz: (
            self.engine.media.destination(target, tz)
        )

    # ---- context -------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.engine.config

    def now(self) -> float:
        return self.engine.clock().wall

    def actor(self, caller: Caller) -> access.Actor:
        user = self.config.people.users.get(caller.user)
        level = user.level if user is not None else 1
        roles = self.engine.roles_for(caller)
        if caller.uid == 0:
            level = 2
        return access.Actor(user=caller.user, roles=frozenset(roles), level=level)

    def rules(self, site: str) -> access.AccessRules:
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
    def _judged(self, r: access.Request) -> access.AccessRules:
        """The rules in force when ``r`` was decided (recorded with it), else the current ones."""
        record = self.store.extra(r.id).get("judged_by")
        if record:
            return rules_from_record(record)
        return self.rules(r.site)

    def _acting(self, r: access.Request, judged: access.AccessRules) -> access.AccessRules:
        """The rules for an act on ``r`` now (approve, deny, export, see): the request's approvals
        are judged by ``judged``; who acts is judged by the current config (roles and camera
        levels, separation of duties, after-hours cover) and, until it is exported, so are the
        export hours."""
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
        return {cam: site for site, cam in self.engine.catalog.cameras()}

    def camera_levels(self) -> dict[str, int]:
        levels = {cam: 2 for cam in self.camera_sites()}  # unclassified: the wider permission
        for cam, c in self.config.cameras.items():
            levels[cam] = c.level
        return levels

    def _refused(self, caller: Caller, what: str, decision: access.Decision) -> None:
        self.engine.audit.append(
            caller.user, "access.denied", what, {"uid": caller.uid, "reason": decision.reason}
        )
        decision.raise_if_denied()

    # ---- JSON views ----------------------------------------------------------------------------
    def request_json(
        self, r: access.Request, approvals: list[access.Approval] | None = None
    ) -> dict[str, Any]:
        tz = self.config.site_tz(r.site) if r.site in self.config.sites else self.config.tz
        approvals = self.store.approvals(r.id) if approvals is None else approvals
        rules = self._judged(r) if r.site in self.config.sites else None
        now = self.now()
        state = access.state_of(r, approvals, now, rules) if rules else r.state
        extra = self.store.extra(r.id)
        out: dict[str, Any] = {
            "id": r.id,
            "state": state,
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
            "emergency": r.emergency,
            "created": iso(r.created, tz),
            "approved_at": iso(r.approved_at, tz),
            "exported_at": iso(r.exported_at, tz),
            "package": extra.get("package"),
            # the rules it was decided by (null while undecided: the current ones apply)
            "judged_by": extra.get("judged_by"),
            "approvals": [
                {
                    "approver": a.approver,
                    "role": a.role,
                    "decision": a.decision,
                    "note": a.note,
                    "time": iso(a.time, tz),
                }
                for a in approvals
            ],
        }
        if rules is not None:
            out["steps"] = list(access.steps_for(r, rules))
            out["open_steps"] = list(access.open_steps(r, approvals, rules))
            if state == "pending":
                out["decide_by"] = iso(access.decide_deadline(r.created, rules), tz)
            until = access.valid_until(r, approvals, rules)
            out["valid_until"] = iso(until, tz) if until else None
            out["violation"] = access.emergency_violation(r, approvals, now, rules)
            if r.resolved:
                out["resolved"] = r.resolved
        return out

    # ---- requests ------------------------------------------------------------------------------
    def new(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
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
        with self.engine.recording():
            footage = sum(len(self.engine.catalog.segments_of(site, c, start, end)) for c in known)
            d = access.check_new(draft, actor, self.camera_levels(), footage, rules, now)
            if not d.allowed:
                self._refused(caller, "request:new", d)
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
                )
            )
            h0, h1 = access.hold_range(r, float(self.config.export.hold_margin.seconds))
            for cam in r.cameras:
                self.engine.catalog.add_hold(
                    kind="request",
                    site=site,
                    camera=cam,
                    start=h0,
                    end=h1,
                    reason=f"request {r.id}: {r.reason}",
                    owner=caller.user,
                    created=now,
                    request_id=r.id,
                    roots=self.engine.roots_of(site),
                )
            view = self.request_json(r, [])
            self.engine.audit.append(caller.user, "request.new", f"request:{r.id}", view)
            return view

    def _load(self, rid: int) -> tuple[access.Request, list[access.Approval], access.AccessRules]:
        """The request, its approvals and the rules it is judged by."""
        r = self.store.get(rid)
        if r.exported_at is not None and r.exporter is None:
            # exported before the exporter was stored with the request: its export.done says
            done = None
            for e in self.engine.audit.entries(obj=f"request:{rid}", action="export.done"):
                done = e
            if done is not None:
                r = dataclasses.replace(r, exporter=done.actor)
        approvals = self.store.approvals(rid)
        return r, approvals, self._judged(r)

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
        with self.engine.recording():  # the new state and its entry commit together
            self.store.update(r.id, **fields)
            if state in CLOSED:
                self._end_holds(r.id, now)
            if state == "expired":
                self.engine.audit.append(
                    "nvr-guard", "request.expired", f"request:{r.id}", {"was": r.state}
                )

    def _end_holds(self, rid: int, until: float) -> None:
        self.engine.catalog.shorten_request_holds(rid, until)

    def refresh(self) -> list[str]:
        """Periodic: expire what is due, report emergency violations (each audited when it opens,
        and again when it reopens or changes), stop exports whose authority lapsed."""
        with self.engine.lock:  # it settles and records: never beside another thread
            violations = []
            for r in self.store.all():
                if r.state in CLOSED:
                    continue
                r2, approvals, rules = self._current(r.id)
                v = access.emergency_violation(r2, approvals, self.now(), rules)
                if v:
                    violations.append(v)
                    last = None
                    for e in self.engine.audit.entries(obj=f"request:{r.id}", action="request."):
                        if e.action in ("request.violation", "request.approve", "request.resolve"):
                            last = e
                    if (
                        last is None
                        or last.action != "request.violation"
                        or (last.details.get("violation") != v)
                    ):
                        log.warning("%s", v)
                        self.engine.audit.append(
                            "nvr-guard", "request.violation", f"request:{r.id}", {"violation": v}
                        )
            for rid in list(self._claims):
                self._recheck_claim(rid)
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
        except InvalidInput:
            if actor.roles & access.SEE_ALL_ROLES:
                raise
            self._refused(caller, f"request:{rid}", access.not_shown(actor, rid))
            raise  # not reached: _refused raises
        d = access.check_view(r, approvals, actor, self._acting(r, rules))
        if not d.allowed:
            self._refused(caller, f"request:{rid}", d)
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

    def progress_of(self, caller: Caller, rid: int) -> float | None:
        """The running export's progress of request ``rid``, to those who may see the request
        (the same refusal as ``request show`` otherwise: ids cannot be probed)."""
        with self.engine.recording():
            self._visible(caller, rid)
        return self.progress.get(rid)

    def list(self, caller: Caller, state: str | None) -> list[dict[str, Any]]:
        """The requests ``caller`` may see (the others are left out, not refused)."""
        if state and state not in access.STATES:
            raise InvalidInput(f"unknown state {state!r}; one of {', '.join(access.STATES)}")
        actor = self.actor(caller)
        with self.engine.recording():
            self.refresh()
            views = []
            for r in self.store.all():
                approvals = self.store.approvals(r.id)
                if r.site in self.config.sites:
                    seen = access.check_view(r, approvals, actor, self._acting(r, self._judged(r)))
                    if not seen.allowed:
                        continue
                elif not actor.roles & access.SEE_ALL_ROLES:
                    continue
                views.append(self.request_json(r, approvals))
        return [v for v in views if not state or v["state"] == state]

    def show(self, caller: Caller, rid: int) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, _ = self._visible(caller, rid)
            return self.request_json(r, approvals)

    def approve(
        self, caller: Caller, rid: int, note: str, as_step: str | None = None
    ) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._visible(caller, rid)
            now = self.now()
            claim = self._claims.get(rid)
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
            a = access.Approval(
                approver=caller.user, role=d.step or "", decision="approve", note=note, time=now
            )
            self.store.add_approval(rid, a)
            self.engine.audit.append(
                caller.user, "request.approve", f"request:{rid}", {"step": a.role, "note": note}
            )
            r, approvals, rules = self._current(rid)
            self._recheck_claim(rid)  # an approver may not be its exporter
            return self.request_json(r, approvals)

    def deny(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._visible(caller, rid)
            now = self.now()
            acting = self._acting(r, rules)
            d = access.check_deny(r, self.actor(caller), reason, acting, now, approvals)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            roles = self.actor(caller).roles
            role = next((s for s in access.steps_for(r, rules) if s in roles), "admin")
            self.store.add_approval(rid, access.Approval(caller.user, role, "deny", reason, now))
            self.engine.audit.append(
                caller.user, "request.deny", f"request:{rid}", {"reason": reason}
            )
            r, approvals, rules = self._current(rid)
            self._recheck_claim(rid)
            return self.request_json(r, approvals)

    def cancel(self, caller: Caller, rid: int) -> dict[str, Any]:
        with self.engine.recording():
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
            self.engine.audit.append(caller.user, "request.cancel", f"request:{rid}", {})
            self._recheck_claim(rid)
            r, approvals, rules = self._load(rid)
            return self.request_json(r, approvals)

    def resolve(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._visible(caller, rid)
            if not access.emergency_violation(r, approvals, self.now(), rules):
                raise InvalidInput(f"request {rid} has no open violation to resolve")
            d = access.check_resolve(r, self.actor(caller), reason)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            self.store.update(rid, resolved=f"{caller.user}: {reason}")
            self.engine.audit.append(
                caller.user, "request.resolve", f"request:{rid}", {"reason": reason}
            )
            r, approvals, rules = self._load(rid)
            return self.request_json(r, approvals)

    # ---- export --------------------------------------------------------------------------------
    def signing_key(self) -> tuple[Any, str]:
        """The key to sign this export with, checked again at every load: its file (opened
        without following a link: owner, mode) and every directory of its real path; and it
        must be the key whose fingerprint the daemon put on record at its start (status,
        `key show`, the paper records printed since). Anything else refuses the export (exit 3)
        and raises the signing_key attention."""
        from nvr_guard.attention import SIGNING_KEY
        from nvr_guard.export import load_or_create_key
        from nvr_guard.export.keys import key_location_problem

        key_path = Path(self.config.signing_key_path())
        started_with = self.engine.key_fingerprint

        def refuse(why: str) -> NoReturn:
            self.engine.attention.raise_(
                SIGNING_KEY, None, str(key_path), f"export signing key unusable: {why}"
            )
            raise PolicyRefused(f"export refused: the export signing key {why}")

        why = key_location_problem(key_path, {0, os.geteuid()})
        if why is not None:
            refuse(why)
        existed = key_path.exists()
        try:
            key, fp = load_or_create_key(Path(self.config.state_dir), key_path)
        except RuntimeFailure as e:
            refuse(str(e).removeprefix("export signing key "))
        if started_with is not None and fp != started_with:
            refuse(
                f"{key_path} is now {fp}, not {started_with} that the daemon started with and "
                "put on record: someone replaced it; investigate, then restart the daemon to "
                "take a new key deliberately"
            )
        if not existed or not any(
            True for _ in self.engine.audit.entries(action="export.key", obj=fp)
        ):
            self.engine.audit.append(
                "nvr-guard", "export.key", fp, {"path": str(key_path), "created": not existed}
            )
        return key, fp

    def _export_check(self, rid: int, caller: Caller) -> access.Decision:
        """May ``caller`` export request ``rid`` now? Under the engine lock."""
        r, approvals, rules = self._current(rid)
        acting = self._acting(r, rules)
        return access.check_export(r, approvals, self.actor(caller), acting, self.now())

    def export(
        self, caller: Caller, rid: int, target: str, progress: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        """Export request ``rid`` onto ``target``: claim, build, commit (see :meth:`export_begin`
        and :meth:`export_finish`)."""
        claim = self.export_begin(caller, rid, target)
        return self.export_finish(claim, progress)

    def export_begin(self, caller: Caller, rid: int, target: str) -> ExportClaim:
        """Check ``caller`` may export ``rid`` onto ``target`` and claim the request's export,
        in one step under the engine lock: a second export of the same request is refused (exit
        3) until this one has committed or failed."""
        with self.engine.recording():
            r, approvals, rules = self._visible(caller, rid)
            busy = self._claims.get(rid)
            if busy is not None:
                self._refused(
                    caller,
                    f"request:{rid}",
                    access.Decision(
                        False,
                        f"request {rid} is being exported by {busy.caller.user} onto "
                        f"{busy.target} (since {iso(busy.since, rules.tz)}); one export per "
                        "request — wait for it to finish",
                        3,
                    ),
                )
            d = self._export_check(rid, caller)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            try:
                dest = self.open_destination(target, self.config.site_tz(r.site))
            except NvrGuardError as e:
                self.engine.audit.append(
                    caller.user,
                    "export.refused",
                    f"request:{rid}",
                    {"target": target, "reason": str(e)},
                )
                raise
            try:
                from nvr_guard.export import SourceSegment

                clips = []
                for cam in r.cameras:
                    segs = self.engine.catalog.segments_of(r.site, cam, r.start, r.end)
                    clips.append(
                        (cam, [SourceSegment(Path(os.fsdecode(s.path)), s.start) for s in segs])
                    )
                if not any(segs for _, segs in clips):
                    self._refused(
                        caller,
                        f"request:{rid}",
                        access.Decision(
                            False, f"request {rid}: no footage left in its range to export", 3
                        ),
                    )
                view = self.request_json(r, approvals)
                view["judged_by"] = rules_record(
                    self._acting(r, rules), r, self.now(), self.config.digest
                )
                key, fp = self.signing_key()
                head = self.engine.audit.head()
            except BaseException:
                close = getattr(dest, "close", None)
                if close is not None:
                    close()
                raise
            self.engine.audit.append(
                caller.user,
                "export.begin",
                f"request:{rid}",
                {"target": str(dest.path), "fingerprint": fp},
            )
            claim = ExportClaim(
                rid=rid,
                caller=caller,
                target=target,
                since=self.now(),
                dest=dest,
                clips=clips,
                view=view,
                key=key,
                fingerprint=fp,
                head=head,
            )
            self._claims[rid] = claim
            return claim

    def export_finish(
        self, claim: ExportClaim, progress: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        """Build the package outside the engine lock, then commit it only if the export's
        authority still holds; a deny, cancel, expiry or reload that takes it away stops ffmpeg
        and removes the partial package (``export.aborted``, exit 3)."""
        from nvr_guard.export import ExportJob
        from nvr_guard.export.fonts import resolve_font

        rid, caller = claim.rid, claim.caller
        view = claim.view
        r = self.store.get(rid)
        job = ExportJob(
            request=view,
            approvals=view["approvals"],
            technician=caller.user,
            start=r.start,
            end=r.end,
            tz=self.config.site_tz(r.site),
            watermark_template=self.config.export.watermark,
            font=resolve_font(self.config.export.font),
            crf=self.config.export.crf,
            preset=self.config.export.preset,
            timeout=float(self.config.export.timeout.seconds),
        )

        def on_progress(f: float) -> None:
            self.progress[rid] = f
            if progress is not None:
                progress(f)

        gate = _CommitGate(claim.dest, lambda: self._commit_check(claim))
        try:
            # one export at a time: two encodes on a 2-core recorder would starve the recording
            with self._export_lock, claim.dest:
                self.remove_stale_exports([Path(claim.dest.path)])
                with stop_when(lambda: self._stop_reason(claim)):
                    pkg = self.exporter(
                        claim.clips,
                        job,
                        gate,
                        claim.key,
                        audit_head=claim.head,
                        progress=on_progress,
                    )
        except BaseException as e:
            self._release(claim)
            self.progress.pop(rid, None)
            with self.engine.lock:
                if self._claims.get(rid) is claim:
                    del self._claims[rid]
                if claim.why is not None:
                    self.engine.audit.append(
                        caller.user,
                        "export.aborted",
                        f"request:{rid}",
                        {"reason": claim.why, "target": claim.target, "error": str(e)},
                    )
                    raise PolicyRefused(
                        f"export of request {rid} aborted: {claim.why}; "
                        f"nothing was left on {claim.target}"
                    ) from None
                self.engine.audit.append(
                    caller.user,
                    "export.refused" if isinstance(e, PolicyRefused) else "export.failed",
                    f"request:{rid}",
                    {"error": str(e), "target": claim.target},
                )
            raise
        if not claim.committing:
            # The builder returned without calling the commit hook (a package writer that lost
            # it): check now, and take back what it wrote rather than let it stand unchecked.
            log.error("export of request %s: the package was committed without the check", rid)
            try:
                self._commit_check(claim)
            except PolicyRefused:
                shutil.rmtree(pkg.path, ignore_errors=True)
                self.progress.pop(rid, None)
                with self.engine.lock:
                    if self._claims.get(rid) is claim:
                        del self._claims[rid]
                    self.engine.audit.append(
                        caller.user,
                        "export.aborted",
                        f"request:{rid}",
                        {"reason": claim.why, "target": claim.target, "package": str(pkg.path)},
                    )
                raise PolicyRefused(
                    f"export of request {rid} aborted: {claim.why}; the package was removed"
                ) from None
        # the commit check passed and its lock is still held: record before anyone else acts
        try:
            with self.engine.recording():  # the state change and its entry, together
                now = self.now()
                r, _, rules = self._load(rid)
                self.store.update(
                    rid,
                    state="exported",
                    exported_at=now,
                    exporter=caller.user,
                    package=str(pkg.path),
                    judged_by=rules_record(self._acting(r, rules), r, now, self.config.digest),
                )
                self.engine.catalog.set_request_holds_until(
                    rid, now + float(self.config.export.preserve.seconds)
                )
                self.engine.audit.append(
                    caller.user,
                    "export.done",
                    f"request:{rid}",
                    {
                        "package": str(pkg.path),
                        "files": pkg.sha256s,
                        "fingerprint": claim.fingerprint,
                    },
                )
                self.progress[rid] = 1.0
                starts = {
                    c["camera"]: c["native_start"]
                    for c in (getattr(pkg, "manifest", None) or {}).get("clips", [])
                    if c.get("native_start")
                }
                return {
                    "id": rid,
                    "package": str(pkg.path),
                    "files": pkg.sha256s,
                    "fingerprint": claim.fingerprint,
                    **({"native_start": starts} if starts else {}),
                }
        finally:
            if self._claims.get(rid) is claim:
                del self._claims[rid]
            self._release(claim)

    def _commit_check(self, claim: ExportClaim) -> None:
        """At the commit point: take the engine lock and keep it (until :meth:`export_finish`
        has recorded the export) if the export is still allowed; else abort."""
        self.engine.lock.acquire()
        claim.committing = True
        try:
            d = self._export_check(claim.rid, claim.caller)
        except BaseException:
            self._release(claim)
            raise
        # authority lost at any check during the export ends it, even if a later reload would
        # give it back: what ran without authority is not committed
        if claim.stop.is_set() or not d.allowed:
            claim.why = claim.why if claim.stop.is_set() and claim.why else d.reason
            claim.stop.set()
            self._release(claim)
            raise PolicyRefused(claim.why)

    def _release(self, claim: ExportClaim) -> None:
        if claim.committing:
            claim.committing = False
            self.engine.lock.release()

    def _recheck_claim(self, rid: int) -> None:
        """Under the engine lock, after anything that may take an export's authority away."""
        claim = self._claims.get(rid)
        if claim is None or claim.committing or claim.stop.is_set():
            return
        d = self._export_check(rid, claim.caller)
        if not d.allowed:
            claim.why = d.reason
            claim.stop.set()

    def _stop_reason(self, claim: ExportClaim) -> str | None:
        """Polled by the running ffmpeg: why it must stop, else None. Between the immediate
        checks after a deny or cancel, re-checks the authority every RECHECK_EVERY seconds (an
        approval expiring, a reload), never waiting for the engine lock."""
        if claim.stop.is_set():
            return claim.why or "the export was stopped"
        t = time.monotonic()
        if t - claim.last_check < RECHECK_EVERY:
            return None
        claim.last_check = t
        if not self.engine.lock.acquire(blocking=False):
            return None
        try:
            self._recheck_claim(claim.rid)
        finally:
            self.engine.lock.release()
        return claim.why if claim.stop.is_set() else None

    def remove_stale_exports(self, targets: _Paths | None = None) -> _Paths:
        """Remove the hidden ``.NVRG-*.tmp`` directories an export killed mid-way (kill -9,
        power loss) left at the top of ``targets`` (default: ``export.targets``), and audit it.

        Only one export runs at a time and none has begun when this is called (daemon start,
        or under the export lock), so every such directory is a leftover that nobody must
        mistake for evidence. A symlink of that name is not followed, only reported.
        """
        if targets is None:
            targets = [Path(t) for t in self.config.export.targets]
        removed: _Paths = []
        for target in targets:
            try:
                names = os.listdir(target)
            except OSError as e:
                log.warning("export target %s: cannot list it: %s", target, e)
                continue
            for name in names:
                if not (name.startswith(".NVRG-") and name.endswith(".tmp")):
                    continue
                path = Path(target) / name
                try:
                    if not stat.S_ISDIR(os.lstat(path).st_mode):
                        log.warning("export target %s: %s is not a directory; left", target, name)
                        continue
                    shutil.rmtree(path)
                except OSError as e:
                    log.warning("cannot remove the interrupted export %s: %s", path, e)
                    continue
                removed.append(path)
                log.warning("removed %s, left by an interrupted export", path)
                with self.engine.recording():
                    self.engine.audit.append(
                        "nvr-guard", "export.stale_removed", f"target:{target}", {"path": str(path)}
                    )
        return removed

    def form(self, caller: Caller, rid: int) -> str:
        from nvr_guard.export import approval_record_html

        view = self.show(caller, rid)
        signer = self.engine.key_fingerprint or self.engine.ensure_signing_key()
        return approval_record_html(view, view["approvals"], None, signer=signer)


# ---- the rules in a request's record ----------------------------------------------------------
def rules_record(
    rules: access.AccessRules, r: access.Request, now: float, digest: str
) -> dict[str, Any]:
    """The rules ``r`` is decided by, as stored with it and shown in its record: enough to judge
    it again exactly as then, and to read what applied."""
    h0, h1 = rules.hours
    return {
        "decided": iso(now, rules.tz),
        "config_digest": digest,
        "steps": list(rules.steps),
        "decide_within": rules.decide_within,
        "holidays": sorted(d.isoformat() for d in rules.holidays),
        "workdays": sorted(d.isoformat() for d in rules.workdays),
        "valid_for": str(rules.valid_for),
        "hours": f"{h0 // 60:02d}:{h0 % 60:02d}-{h1 // 60:02d}:{h1 % 60:02d}",
        "timezone": str(rules.tz),
        "after_hours_role": rules.duty_role,
        "after_hours_valid": rules.after_hours_valid,
        "native_role": rules.native_role,
        "emergency_roles": sorted(rules.emergency_roles),
        "backfill_within": rules.backfill_within,
        "max_range": rules.max_range,
        "technician_role": rules.technician_role,
        "requester_roles": sorted(rules.requester_roles),
        "approver_may_export": rules.approver_may_export,
        "camera_levels": {c: access.camera_level(c, rules) for c in r.cameras},
    }


def rules_from_record(d: dict[str, Any]) -> access.AccessRules:
    def minutes(hhmm: str) -> int:
        h, m = hhmm.split(":")
        return int(h) * 60 + int(m)

    a, b = d["hours"].split("-")
    return access.AccessRules(
        steps=tuple(d["steps"]),
        decide_within=int(d["decide_within"]),
        holidays=frozenset(date.fromisoformat(x) for x in d["holidays"]),
        workdays=frozenset(date.fromisoformat(x) for x in d["workdays"]),
        valid_for=Duration.parse(d["valid_for"]),
        hours=(minutes(a), minutes(b)),
        tz=ZoneInfo(d["timezone"]),
        duty_role=d["after_hours_role"],
        after_hours_valid=float(d["after_hours_valid"]),
        native_role=d["native_role"],
        emergency_roles=frozenset(d["emergency_roles"]),
        backfill_within=float(d["backfill_within"]),
        max_range=float(d["max_range"]),
        technician_role=d["technician_role"],
        requester_roles=frozenset(d["requester_roles"]),
        approver_may_export=bool(d["approver_may_export"]),
        camera_levels=dict(d["camera_levels"]),
    )
