"""The request -> approval -> export workflow against a small independent model.

Hypothesis drives the real ``Workflow`` (real SQLite catalog, real audit chain, the engine's
injected clock) with several people and roles, interleaving file / approve / deny / cancel /
show / clock advance (expiry) / reload / export-start / export-commit steps. The package builder
is a stand-in at its seam (``Workflow.exporter``) that writes a directory and calls the
destination's commit hook exactly where the real one does, so a step costs milliseconds instead of
an ffmpeg run; test_authority.py exports with real ffmpeg and real processes.

After every step (and the periodic ``refresh`` the daemon runs) the model says what must hold:
an export commits only if, at commit time and at every check since it began, the request was
approved by distinct eligible people holding its cameras' levels, within validity and hours
rules, or was an emergency within its window; one export per request; every refusal is audited;
the audit chain verifies; each request's state is the model's.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from nvr_guard.errors import PolicyRefused
from nvr_guard.identity import Caller
from nvr_guard.model import ClockReading
from tests.fixtures.site import write_segment

SH = ZoneInfo("Asia/Shanghai")
MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
MONDAY_9 = datetime(2026, 11, 23, 9, 0, tzinfo=SH).timestamp()  # a Monday
SATURDAY = datetime(2026, 11, 28, 0, 0, tzinfo=SH).timestamp()  # the clock stays before this
RECORDED = datetime(2026, 11, 23, 7, 0, tzinfo=SH).timestamp()
VALID_FOR = 2 * DAY
BACKFILL = 2 * HOUR

# name -> (roles, level)
PEOPLE: dict[str, tuple[tuple[str, ...], int]] = {
    "alice": (("operator",), 1),
    "olga": (("operator",), 2),
    "carol": (("security_lead",), 2),
    "sid": (("security_lead",), 1),
    "bob": (("dept_manager",), 1),
    "bea": (("dept_manager",), 2),
    "dan": (("duty_manager",), 1),
    "duke": (("duty_manager",), 2),
    "tom": (("technician",), 1),
    "tia": (("technician",), 2),
    "tess": (("technician", "dept_manager"), 2),
    "aud": (("auditor",), 1),
    "adm": (("admin",), 2),
}
REQUESTERS = ("alice", "olga", "carol", "bob")
DECIDERS = ("carol", "sid", "bob", "bea", "dan", "duke", "tess", "adm")
TECHNICIANS = ("tom", "tia", "tess", "bob")
SEE_ALL = {"admin", "security_lead", "auditor"}


@dataclass(frozen=True)
class Variant:
    """One config the 'reload' step may switch to."""

    hours: tuple[int, int] = (8 * 60, 20 * 60)
    steps: tuple[str, ...] = ("dept_manager", "security_lead")
    cam1_level: int = 1
    approver_may_export: bool = False
    after_hours_valid: float = 12 * HOUR

    def yaml(self, base: Path) -> str:
        users = "\n".join(
            f"    {n}: {{roles: [{', '.join(r)}], level: {lv}}}" for n, (r, lv) in PEOPLE.items()
        )
        (a, b) = self.hours
        h = f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}"
        return f"""state_dir: {base / "state"}
timezone: Asia/Shanghai
socket: {base / "c.sock"}
sites:
  bank:
    profile: general
    roots: [{base / "rec"}]
    layout: "{{camera}}/%Y-%m-%d/%H/%M.%S.mp4"
cameras:
  cam-1: {{level: {self.cam1_level}}}
  cam-2: {{level: 2}}
people:
  users:
{users}
approval:
  steps: [{", ".join(self.steps)}]
  valid_for: 2d
  hours: "{h}"
  after_hours_valid: {int(self.after_hours_valid)}s
  approver_may_export: {"true" if self.approver_may_export else "false"}
  emergency: {{roles: [security_lead], backfill_within: 2h}}
export:
  preset: ultrafast
"""

    def level(self, cam: str) -> int:
        return self.cam1_level if cam == "cam-1" else 2

    def outside_hours(self, now: float) -> bool:
        t = datetime.fromtimestamp(now, SH)
        m = t.hour * 60 + t.minute
        return not (self.hours[0] <= m < self.hours[1])


VARIANTS = [
    Variant(hours=h, steps=s, cam1_level=lv, approver_may_export=may, after_hours_valid=ah)
    for h in ((8 * 60, 20 * 60), (10 * 60, 16 * 60))
    for s in (("dept_manager", "security_lead"), ("dept_manager",))
    for lv in (1, 2)
    for may in (False, True)
    for ah in (12 * HOUR, 1 * HOUR)
]


@dataclass
class MRequest:
    """The model's view of one request."""

    rid: int
    requester: str
    cameras: tuple[str, ...]
    emergency: bool
    created: float
    state: str = "pending"
    approvals: list[tuple[str, str, float]] = field(default_factory=list)  # who, role, when
    decided: set[str] = field(default_factory=set)  # approved or denied
    approved_at: float | None = None
    exports: int = 0

    def deadline(self) -> float:
        # 3 working days: Monday -> Thursday, Tuesday -> Friday; later filings fall after the
        # Saturday the clock never reaches
        wd = datetime.fromtimestamp(self.created, SH).weekday()
        return self.created + 3 * DAY if wd in (0, 1) else float("inf")


@dataclass
class MClaim:
    rid: int
    who: str
    claim: Any
    doomed: bool = False


def roles(who: str) -> set[str]:
    return set(PEOPLE[who][0])


def level(who: str) -> int:
    return PEOPLE[who][1]


class FakeDestination:
    """A directory export target with the hooks the real gate has (context, commit check)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> FakeDestination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def check_before_write(self, bytes_needed: int) -> None:
        pass

    def describe(self) -> Mapping[str, Any]:
        return {"kind": "directory", "path": str(self.path), "scan": None}


_names = itertools.count()


def fake_exporter(
    clips: Any, job: Any, dest: Any, key: Any, *, audit_head: Any, progress: Any = None
) -> Any:
    """Writes a package directory the way run_export does: a hidden temporary, the commit hook,
    the rename; any failure removes the temporary."""
    name = f"NVRG-{job.request['id']}-{next(_names)}"
    tmp = dest.path / f".{name}.tmp"
    tmp.mkdir()
    try:
        (tmp / "manifest.json").write_text(str(job.request["id"]))
        dest.before_commit(tmp)
        os.rename(tmp, dest.path / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SimpleNamespace(path=dest.path / name, sha256s={})


class WorkflowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="nvrg-model-"))
        root = self.base / "rec"
        for cam in ("cam-1", "cam-2"):
            for i in range(3):
                t = datetime.fromtimestamp(RECORDED + i * 60, SH)
                write_segment(root, cam, t)
        self.configs: dict[Variant, Any] = {}
        self.variant = VARIANTS[0]
        self.now = MONDAY_9
        self.engine = Engine(
            self._config(self.variant), clock=lambda: ClockReading(self.now, self.now, "model")
        )
        self.engine.reconcile(full=True)
        self.wf = self.engine.workflow
        self.targets = [self.base / "t1", self.base / "t2"]
        for t in self.targets:
            t.mkdir()
        self.wf.exporter = fake_exporter
        self.wf.open_destination = lambda target, tz: FakeDestination(Path(target))
        self.requests: dict[int, MRequest] = {}
        self.claims: list[MClaim] = []

    def teardown(self) -> None:
        self.engine.catalog.conn.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def _config(self, v: Variant) -> Any:
        if v not in self.configs:
            path = self.base / f"config-{len(self.configs)}.yaml"
            path.write_text(v.yaml(self.base))
            self.configs[v] = load_config(str(path))
        return self.configs[v]

    # ---- calling the workflow: every refusal must leave an audit entry -------------------------
    def call(self, who: str, fn: Any, *args: Any) -> tuple[bool, Any]:
        head = self.engine.audit.head()[0]
        try:
            return True, fn(Caller(10_000, who, ()), *args)
        except PolicyRefused as e:
            new = list(self.engine.audit.entries(after_seq=head))
            assert any(
                x.actor == who and x.action in ("access.denied", "export.refused", "export.aborted")
                for x in new
            ), f"refusal not audited: {who}: {e}"
            return False, e

    # ---- the model -----------------------------------------------------------------------------
    def settle(self) -> None:
        """What the rules make of each request at ``now`` under the current config."""
        v = self.variant
        for m in self.requests.values():
            if m.state == "pending":
                need = list(v.steps)
                done: float | None = None
                for role in dict.fromkeys(need):
                    times = sorted(t for _, r, t in m.approvals if r == role)
                    if len(times) < need.count(role):
                        done = None
                        break
                    t = times[need.count(role) - 1]
                    done = t if done is None else max(done, t)
                if done is not None:
                    m.state, m.approved_at = "approved", done
                elif self.now >= m.deadline():
                    m.state = "expired"
            if m.state == "approved":
                assert m.approved_at is not None
                if self.now >= m.approved_at + VALID_FOR:
                    m.state = "expired"

    def may_export(self, m: MRequest, who: str) -> bool:
        v = self.variant
        if m.state not in ("pending", "approved") or "technician" not in roles(who):
            return False
        if who == m.requester or any(level(who) < v.level(c) for c in m.cameras):
            return False
        if not v.approver_may_export and any(a == who for a, _, _ in m.approvals):
            return False
        if m.emergency and self.now < m.created + BACKFILL:
            return True
        if m.state != "approved":
            return False
        if v.outside_hours(self.now):
            return any(
                r == "duty_manager" and 0 <= self.now - t < v.after_hours_valid
                for _, r, t in m.approvals
            )
        return True

    def may_see(self, m: MRequest, who: str) -> bool:
        if who == m.requester or roles(who) & SEE_ALL or who in m.decided:
            return True
        concerned = {*self.variant.steps, "duty_manager", "technician"}
        if roles(who) & concerned:
            return all(level(who) >= self.variant.level(c) for c in m.cameras)
        return False

    # ---- steps ---------------------------------------------------------------------------------
    @initialize(
        who=st.sampled_from(REQUESTERS),
        cams=st.sampled_from([("cam-1",), ("cam-2",), ("cam-1", "cam-2")]),
        night=st.booleans(),
    )
    def an_approved_request(self, who: str, cams: tuple[str, ...], night: bool) -> None:
        """Every run starts with a request that has its approvals, ready to be exported."""
        self.file(who, cams, emergency=False)
        if self.requests:
            self.approve_every_step(_Fixed(max(self.requests)), night)

    @rule(
        who=st.sampled_from(REQUESTERS),
        cams=st.sampled_from([("cam-1",), ("cam-2",), ("cam-1", "cam-2")]),
        emergency=st.booleans(),
    )
    def file(self, who: str, cams: tuple[str, ...], emergency: bool) -> None:
        args = {
            "cameras": ",".join(cams),
            "from": datetime.fromtimestamp(RECORDED, SH).isoformat(),
            "to": datetime.fromtimestamp(RECORDED + 120, SH).isoformat(),
            "reason": "incident",
            "basis": "case 1",
            "recipient": {"unit": "police", "person": "Wang", "contact": "110"},
            "emergency": emergency,
        }
        ok, res = self.call(who, self.wf.new, args)
        expect = all(level(who) >= self.variant.level(c) for c in cams) and (
            not emergency or "security_lead" in roles(who)
        )
        assert ok == expect, (who, cams, emergency, res)
        if ok:
            rid = int(res["id"])
            self.requests[rid] = MRequest(rid, who, cams, emergency, self.now)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), who=st.sampled_from(DECIDERS))
    def approve(self, data: st.DataObject, who: str) -> None:
        m = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        before = m.state
        ok, res = self.call(who, self.wf.approve, m.rid, "")
        if not ok:
            return
        # whoever the workflow let approve was eligible: another person, once, with the role
        # of the step and the level of every camera, on a request still open (or back-filling)
        a = res["approvals"][-1]
        assert a["approver"] == who and a["decision"] == "approve"
        assert who != m.requester and who not in m.decided
        assert a["role"] in roles(who)
        assert all(level(who) >= self.variant.level(c) for c in m.cameras)
        assert before in ("pending", "approved") or (m.emergency and before == "exported")
        m.decided.add(who)
        m.approvals.append((who, a["role"], self.now))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), night=st.booleans())
    def approve_every_step(self, data: st.DataObject, night: bool) -> None:
        """Each open step (and, with ``night``, the after-hours approval) by one person who may
        give it, so that plenty of requests reach their exports."""
        m = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        wanted = [*self.variant.steps, *(("duty_manager",) if night else ())]
        for role in wanted:
            for who in DECIDERS:
                if role in roles(who) and who not in m.decided and who != m.requester:
                    if all(level(who) >= self.variant.level(c) for c in m.cameras):
                        self.approve(_Fixed(m.rid), who)
                        break

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), who=st.sampled_from(DECIDERS))
    def deny(self, data: st.DataObject, who: str) -> None:
        m = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        ok, _ = self.call(who, self.wf.deny, m.rid, "not justified")
        if ok:
            # a denial may withdraw the same person's earlier approval (until the export)
            assert who != m.requester
            assert m.state in ("pending", "approved") or (m.emergency and m.state == "exported")
            m.decided.add(who)
            if m.state != "exported":
                m.state = "denied"

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), who=st.sampled_from(("alice", "olga", "carol", "bob", "adm", "tom")))
    def cancel(self, data: st.DataObject, who: str) -> None:
        m = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        ok, _ = self.call(who, self.wf.cancel, m.rid)
        expect = (who == m.requester or who == "adm") and m.state in ("pending", "approved")
        assert ok == expect
        if ok:
            m.state = "cancelled"

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), who=st.sampled_from(sorted(PEOPLE)))
    def show(self, data: st.DataObject, who: str) -> None:
        m = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        ok, res = self.call(who, self.wf.show, m.rid)
        assert ok == self.may_see(m, who), (who, m, res)
        listed = {v["id"] for v in self.wf.list(Caller(10_000, who, ()), None)}
        assert listed == {r.rid for r in self.requests.values() if self.may_see(r, who)}

    @rule(who=st.sampled_from(("alice", "tom", "bob")), rid=st.integers(900, 999))
    def probe_missing_id(self, who: str, rid: int) -> None:
        # an id that does not exist looks like one the caller may not see
        ok, res = self.call(who, self.wf.show, rid)
        assert not ok and "may not see" in str(res)

    @rule(step=st.sampled_from([MIN, 30 * MIN, 2 * HOUR, 7 * HOUR, 13 * HOUR, DAY, VALID_FOR]))
    def advance(self, step: float) -> None:
        self.now = min(self.now + step, SATURDAY - 1)

    @rule(i=st.integers(0, len(VARIANTS) - 1))
    def reload(self, i: int) -> None:
        v = self.variant = VARIANTS[i]
        self.engine.apply_config(self._config(v), "model")

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), who=st.sampled_from(TECHNICIANS), dest=st.sampled_from([0, 1]))
    def export_start(self, data: st.DataObject, who: str, dest: int) -> None:
        m = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        busy = any(c.rid == m.rid for c in self.claims)
        ok, res = self.call(who, self.wf.export_begin, m.rid, str(self.targets[dest]))
        assert ok == (not busy and self.may_export(m, who)), (who, m, res)
        if busy and not ok and self.may_export(m, who):
            assert "being exported" in str(res)
        event("export started" if ok else "export refused at start")
        if ok:
            self.claims.append(MClaim(m.rid, who, res))

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def export_commit(self, data: st.DataObject) -> None:
        c = self.claims.pop(data.draw(st.integers(0, len(self.claims) - 1)))
        m = self.requests[c.rid]
        expect = not c.doomed and self.may_export(m, c.who)
        head = self.engine.audit.head()[0]
        try:
            out = self.wf.export_finish(c.claim)
        except PolicyRefused as e:
            assert not expect, f"export of {m} by {c.who} refused: {e}"
            event("export aborted at commit")
            new = [x.action for x in self.engine.audit.entries(after_seq=head)]
            assert "export.aborted" in new
            assert not [p for p in Path(c.claim.dest.path).iterdir() if p.name.startswith(".")]
            return
        assert expect, f"export of {m} by {c.who} committed without authority"
        event("export committed" + (" (emergency, unapproved)" if m.state == "pending" else ""))
        assert Path(out["package"]).is_dir()
        m.exports += 1
        m.state = "exported"

    # ---- after every step --------------------------------------------------------------------
    @invariant()
    def agrees_with_the_model(self) -> None:
        self.wf.refresh()  # the daemon's periodic job: expiry, violations, running exports
        self.settle()
        for c in self.claims:
            m = self.requests[c.rid]
            if not self.may_export(m, c.who):
                c.doomed = True
        for rid, m in self.requests.items():
            shown = self.wf.show(Caller(10_000, "adm", ()), rid)
            assert shown["state"] == m.state, (m, shown["state"], shown["approvals"])
            done = list(self.engine.audit.entries(action="export.done", obj=f"request:{rid}"))
            assert len(done) == m.exports <= 1
        packages = [p for t in self.targets for p in t.iterdir() if not p.name.startswith(".")]
        assert len(packages) == sum(m.exports for m in self.requests.values())
        assert self.engine.audit.verify().ok


WorkflowMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("NVRG_MODEL_EXAMPLES", "60")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWorkflowModel = WorkflowMachine.TestCase


def test_model_catches_an_export_that_ignores_a_deny(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is not a tautology: with the commit check taken out (the old behaviour), the
    scripted run deny-during-export is caught."""
    monkeypatch.setattr(f"{__name__}.event", lambda _: None)  # outside a hypothesis run
    m = WorkflowMachine()
    try:
        monkeypatch.setattr(m.wf.exports, "_commit_check", lambda claim: None)
        m.file(who="alice", cams=("cam-1",), emergency=False)
        rid = next(iter(m.requests))
        data = _Fixed(rid)
        m.approve(data, "bob")
        m.approve(data, "carol")
        m.agrees_with_the_model()
        m.export_start(data, "tom", 0)
        m.deny(data, "bea")
        m.agrees_with_the_model()
        with pytest.raises(AssertionError, match="without authority"):
            m.export_commit(_Fixed(0))
    finally:
        m.teardown()


class _Fixed:
    """A stand-in for st.data() that always draws the given value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any) -> Any:
        return self.value


def test_a_builder_that_skips_the_commit_hook_is_still_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fail closed if the package writer ever stops calling ``before_commit``: the workflow
    checks after the fact and removes the package."""
    monkeypatch.setattr(f"{__name__}.event", lambda _: None)
    m = WorkflowMachine()

    def no_hook(clips: Any, job: Any, dest: Any, key: Any, **kw: Any) -> Any:
        final = dest.path / f"NVRG-{job.request['id']}-unchecked"
        final.mkdir()
        return SimpleNamespace(path=final, sha256s={})

    try:
        m.wf.exporter = no_hook
        m.file(who="alice", cams=("cam-1",), emergency=False)
        rid = next(iter(m.requests))
        m.approve(_Fixed(rid), "bob")
        m.approve(_Fixed(rid), "carol")
        claim = m.wf.export_begin(Caller(10_000, "tom", ()), rid, str(m.targets[0]))
        m.wf.deny(Caller(10_000, "bea", ()), rid, "withdrawn")
        with pytest.raises(PolicyRefused, match="aborted"):
            m.wf.export_finish(claim)
        assert list(m.targets[0].iterdir()) == []
        assert [e.action for e in m.engine.audit.entries(action="export.aborted")]
    finally:
        m.teardown()
