"""The retrieval workflow (调取): requests, approvals, holds for evidence, exports.

Adapter between the pure decisions of ``access`` (who may do what, when) and the state: requests in
the catalog database, holds that keep the requested footage from ageing out, the export engine, and
the audit chain that records every step and every refusal.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvr_guard import access
from nvr_guard.errors import InvalidInput, NvrGuardError, PolicyRefused
from nvr_guard.requests import RequestStore
from nvr_guard.times import iso, parse_time

if TYPE_CHECKING:
    from nvr_guard.service import Caller, Engine

log = logging.getLogger("nvr_guard.workflow")

CLOSED = ("denied", "cancelled", "expired", "closed")
_Paths = list[Path]  # spelled once here: inside Workflow, ``list`` is a method


class Workflow:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = RequestStore(engine.catalog)
        self.progress: dict[int, float] = {}
        self._export_lock = threading.Lock()

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
        )

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
        rules = self.rules(r.site) if r.site in self.config.sites else None
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
        start = parse_time(str(args["from"]), tz, "--from")
        end = parse_time(str(args["to"]), tz, "--to")
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
                )
            view = self.request_json(r, [])
            self.engine.audit.append(caller.user, "request.new", f"request:{r.id}", view)
            return view

    def _load(self, rid: int) -> tuple[access.Request, list[access.Approval], access.AccessRules]:
        r = self.store.get(rid)
        approvals = self.store.approvals(rid)
        rules = self.rules(r.site)
        return r, approvals, rules

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
        with self.engine.recording():  # the new state and its entry commit together
            self.store.update(r.id, **fields)
            if state in CLOSED:
                self._end_holds(r.id, now)
            if state == "expired":
                self.engine.audit.append(
                    "nvr-guard", "request.expired", f"request:{r.id}", {"was": r.state}
                )

    def _end_holds(self, rid: int, until: float) -> None:
        with self.engine.catalog.transaction() as c:
            c.execute(
                "UPDATE holds SET until = ? WHERE request_id = ? AND released IS NULL "
                "AND (until IS NULL OR until > ?)",
                (until, rid, until),
            )

    def refresh(self) -> list[str]:
        """Periodic: expire what is due, report emergency violations (each audited once)."""
        violations = []
        for r in self.store.all():
            if r.state in CLOSED:
                continue
            r2, approvals, rules = self._current(r.id)
            v = access.emergency_violation(r2, approvals, self.now(), rules)
            if v:
                violations.append(v)
                seen = any(
                    True
                    for _ in self.engine.audit.entries(
                        action="request.violation", obj=f"request:{r.id}"
                    )
                )
                if not seen:
                    log.warning("%s", v)
                    self.engine.audit.append(
                        "nvr-guard", "request.violation", f"request:{r.id}", {"violation": v}
                    )
        return violations

    def list(self, state: str | None) -> list[dict[str, Any]]:
        if state and state not in access.STATES:
            raise InvalidInput(f"unknown state {state!r}; one of {', '.join(access.STATES)}")
        with self.engine.recording():
            self.refresh()
            views = [self.request_json(r) for r in self.store.all()]
        return [v for v in views if not state or v["state"] == state]

    def show(self, rid: int) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, _ = self._current(rid)
            return self.request_json(r, approvals)

    def approve(
        self, caller: Caller, rid: int, note: str, as_step: str | None = None
    ) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._current(rid)
            now = self.now()
            d = access.check_approve(
                r, approvals, self.actor(caller), rules, now, as_step=as_step, note=note
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
            return self.request_json(r, approvals)

    def deny(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._current(rid)
            now = self.now()
            d = access.check_deny(r, self.actor(caller), reason, rules, now, approvals)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            roles = self.actor(caller).roles
            role = next((s for s in access.steps_for(r, rules) if s in roles), "admin")
            self.store.add_approval(rid, access.Approval(caller.user, role, "deny", reason, now))
            self.engine.audit.append(
                caller.user, "request.deny", f"request:{rid}", {"reason": reason}
            )
            r, approvals, rules = self._current(rid)
            return self.request_json(r, approvals)

    def cancel(self, caller: Caller, rid: int) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._current(rid)
            now = self.now()
            d = access.check_cancel(r, self.actor(caller), now)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            self.store.update(rid, state="cancelled", closed_at=now)
            self._end_holds(rid, now)
            self.engine.audit.append(caller.user, "request.cancel", f"request:{rid}", {})
            r, approvals, rules = self._load(rid)
            return self.request_json(r, approvals)

    def resolve(self, caller: Caller, rid: int, reason: str) -> dict[str, Any]:
        with self.engine.recording():
            r, approvals, rules = self._current(rid)
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
        from nvr_guard.export import load_or_create_key

        key_path = Path(self.config.signing_key_path())
        existed = key_path.exists()
        key, fp = load_or_create_key(Path(self.config.state_dir), key_path)
        if not existed or not any(
            True for _ in self.engine.audit.entries(action="export.key", obj=fp)
        ):
            self.engine.audit.append(
                "nvr-guard", "export.key", fp, {"path": str(key_path), "created": not existed}
            )
        return key, fp

    def export(
        self, caller: Caller, rid: int, target: str, progress: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        from nvr_guard.export import ExportJob, SourceSegment, run_export
        from nvr_guard.export.fonts import resolve_font

        with self.engine.recording():
            r, approvals, rules = self._current(rid)
            now = self.now()
            d = access.check_export(r, approvals, self.actor(caller), rules, now)
            if not d.allowed:
                self._refused(caller, f"request:{rid}", d)
            try:
                dest = self.engine.media.destination(target, self.config.site_tz(r.site))
            except NvrGuardError as e:
                self.engine.audit.append(
                    caller.user,
                    "export.refused",
                    f"request:{rid}",
                    {"target": target, "reason": str(e)},
                )
                raise
            clips = []
            for cam in r.cameras:
                segs = self.engine.catalog.segments_of(r.site, cam, r.start, r.end)
                clips.append(
                    (cam, [SourceSegment(Path(os.fsdecode(s.path)), s.start) for s in segs])
                )
            if not any(segs for _, segs in clips):
                raise PolicyRefused(f"request {rid}: no footage left in its range to export")
            view = self.request_json(r, approvals)
            key, fp = self.signing_key()
            head = self.engine.audit.head()
            self.engine.audit.append(
                caller.user,
                "export.begin",
                f"request:{rid}",
                {"target": dest.path, "fingerprint": fp},
            )
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

        # one export at a time: two encodes on a 2-core recorder would starve the recording
        with self._export_lock, dest:
            self.remove_stale_exports([Path(dest.path)])
            try:
                pkg = run_export(clips, job, dest, key, audit_head=head, progress=on_progress)
            except Exception as e:
                self.progress.pop(rid, None)
                with self.engine.recording():
                    self.engine.audit.append(
                        caller.user,
                        "export.refused" if isinstance(e, PolicyRefused) else "export.failed",
                        f"request:{rid}",
                        {"error": str(e), "target": target},
                    )
                raise
        with self.engine.recording():
            now = self.now()
            self.store.update(rid, state="exported", exported_at=now, package=str(pkg.path))
            with self.engine.catalog.transaction() as c:
                c.execute(
                    "UPDATE holds SET until = ? WHERE request_id = ? AND released IS NULL",
                    (now + float(self.config.export.preserve.seconds), rid),
                )
            self.engine.audit.append(
                caller.user,
                "export.done",
                f"request:{rid}",
                {"package": str(pkg.path), "files": pkg.sha256s, "fingerprint": fp},
            )
            self.progress[rid] = 1.0
            return {"id": rid, "package": str(pkg.path), "files": pkg.sha256s, "fingerprint": fp}

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

    def form(self, rid: int) -> str:
        from nvr_guard.export import approval_record_html

        view = self.show(rid)
        signer = self.engine.key_fingerprint or self.engine.ensure_signing_key()
        return approval_record_html(view, view["approvals"], None, signer=signer)
