"""The request/approval workflow as tables: each row is a situation and the decision it must get."""

from __future__ import annotations

import ast
import dataclasses
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.workflow import access
from nvr_guard.workflow.access import (
    AccessRules,
    Actor,
    Approval,
    Decision,
    Draft,
    Recipient,
    Request,
    check_approve,
    check_cancel,
    check_deny,
    check_export,
    check_new,
    check_preview,
    check_resolve,
    check_watch,
    decide_deadline,
    emergency_violation,
    hold_range,
    hold_until,
    open_steps,
    outside_hours,
    state_of,
    steps_for,
)

SH = ZoneInfo("Asia/Shanghai")
DAY = 86400.0
HOUR = 3600.0
CAMERAS = {"lobby-01": 1, "atm-02": 1, "street-03": 2}
RULES = AccessRules(tz=SH, camera_levels=CAMERAS)


def ts(text: str) -> float:
    """Site-local wall time (Asia/Shanghai) -> epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=SH).timestamp()


# 2026-11-20 is a Friday.
FRI_17 = ts("2026-11-20T17:00")
RECORDED = ts("2026-11-20T09:00")

ALICE = Actor("alice", frozenset({"operator"}), 1)  # requester, level 1
CAROL = Actor("carol", frozenset({"operator"}), 2)  # requester, level 2
BOB = Actor("bob", frozenset({"dept_manager"}))
SAM = Actor("sam", frozenset({"security_lead"}), 2)
SUE = Actor("sue", frozenset({"security_lead"}))
DAN = Actor("dan", frozenset({"duty_manager"}))
TOM = Actor("tom", frozenset({"technician"}))
ROOT = Actor("root", frozenset({"admin"}), 2)


def draft(**kw: Any) -> Draft:
    base = Draft(
        cameras=("lobby-01",),
        start=RECORDED,
        end=RECORDED + 600,
        reason="theft at counter 3",
        basis="公安机关调取证据通知书 2026-118",
        recipient=Recipient("城东派出所", "王警官", "+86 21 5555 0100"),
    )
    return dataclasses.replace(base, **kw)


def recipient(**kw: str) -> Recipient:
    return dataclasses.replace(draft().recipient, **kw)


def request(**kw: Any) -> Request:
    base = Request(
        id=12,
        requester="alice",
        site="lobby",
        cameras=("lobby-01",),
        start=RECORDED,
        end=RECORDED + 600,
        reason="theft at counter 3",
        basis="公安机关调取证据通知书 2026-118",
        recipient=draft().recipient,
        format="mp4",
        emergency=False,
        state="pending",
        created=FRI_17,
    )
    return dataclasses.replace(base, **kw)


def ok(who: str, role: str, t: float) -> Approval:
    return Approval(who, role, "approve", "", t)


def no(who: str, role: str, t: float, note: str = "not needed") -> Approval:
    return Approval(who, role, "deny", note, t)


# Both steps approved by Monday 10:00.
MON_10 = ts("2026-11-23T10:00")
BOTH = (ok("bob", "dept_manager", MON_10 - HOUR), ok("sam", "security_lead", MON_10))


def refused(d: Decision, *words: str) -> None:
    """A refusal by policy: exit 3, one non-empty line naming what it is about."""
    assert not d.allowed, d
    assert d.exit_code == 3, d
    assert d.reason.strip() and "\n" not in d.reason, d
    for w in words:
        assert w in d.reason, (w, d.reason)


def allowed(d: Decision) -> None:
    assert d.allowed, d.reason
    assert d.exit_code == 0


# --- filing a request ---------------------------------------------------------------------------

NOW = ts("2026-11-20T17:00")


@pytest.mark.parametrize(
    ("name", "d", "actor", "segments", "words"),
    [
        ("no cameras", draft(cameras=()), ALICE, 3, ["camera"]),
        ("empty reason", draft(reason="  "), ALICE, 3, ["reason", "--reason"]),
        ("empty basis", draft(basis=""), ALICE, 3, ["legal basis", "--basis"]),
        ("empty unit", draft(recipient=recipient(unit="")), ALICE, 3, ["recipient unit"]),
        ("empty person", draft(recipient=recipient(person="")), ALICE, 3, ["recipient person"]),
        ("empty contact", draft(recipient=recipient(contact="")), ALICE, 3, ["recipient contact"]),
        ("empty format", draft(format=""), ALICE, 3, ["format", "mp4"]),
        ("unknown format", draft(format="avi"), ALICE, 3, ["avi", "native"]),
        ("unknown camera", draft(cameras=("gate-09",)), ALICE, 3, ["gate-09", "not known"]),
        ("camera twice", draft(cameras=("atm-02", "atm-02")), ALICE, 3, ["atm-02", "twice"]),
        (
            "level 1 asks level 2",
            draft(cameras=("lobby-01", "street-03")),
            ALICE,
            3,
            ["street-03", "level 2", "alice", "level 1"],
        ),
        ("from = to", draft(end=RECORDED), ALICE, 3, ["from", "before"]),
        ("from > to", draft(end=RECORDED - 60), ALICE, 3, ["from", "before"]),
        ("range too long", draft(start=NOW - DAY - 1, end=NOW), ALICE, 3, ["24 h", "split"]),
        ("future", draft(end=NOW + 60), ALICE, 3, ["future"]),
        ("no footage", draft(), ALICE, 0, ["no footage", "lobby-01"]),
        ("technician files", draft(), TOM, 3, ["tom", "may not file"]),
        ("duty manager files", draft(), DAN, 3, ["dan"]),
        ("emergency w/o role", draft(emergency=True), ALICE, 3, ["--emergency", "security_lead"]),
    ],
)
def test_new_request_refused(
    name: str, d: Draft, actor: Actor, segments: int, words: list[str]
) -> None:
    refused(check_new(d, actor, CAMERAS, segments, RULES, NOW), *words)


@pytest.mark.parametrize(
    ("d", "actor"),
    [
        (draft(), ALICE),
        (draft(cameras=("lobby-01", "street-03")), CAROL),  # level 2 may ask level 1 and 2
        (draft(start=NOW - DAY, end=NOW), CAROL),  # exactly the maximum range
        (draft(end=NOW), ALICE),  # up to now
        (draft(format="native"), ALICE),
        (draft(emergency=True), SAM),
        (draft(reason="门口　有人闯入"), ALICE),  # full-width space is text, not a control char
    ],
)
def test_new_request_allowed(d: Draft, actor: Actor) -> None:
    allowed(check_new(d, actor, CAMERAS, 5, RULES, NOW))


@pytest.mark.parametrize(
    ("d", "words"),
    [
        (draft(reason="line one\nline two"), ["reason", "one line"]),
        (draft(basis="ok\x1b[31m red"), ["legal basis"]),
        (draft(reason="tab\there"), ["reason"]),
        (draft(recipient=recipient(person="evil\u202eesrever")), ["recipient person"]),
        (draft(reason="x" * 501), ["reason", "501", "500"]),
        (draft(start=float("nan")), ["finite"]),
    ],
)
def test_new_request_malformed_is_exit_2(d: Draft, words: list[str]) -> None:
    dec = check_new(d, ALICE, CAMERAS, 5, RULES, NOW)
    assert not dec.allowed and dec.exit_code == 2
    assert "\n" not in dec.reason
    for w in words:
        assert w in dec.reason
    with pytest.raises(InvalidInput) as err:
        dec.raise_if_denied()
    assert err.value.exit_code == 2


def test_raise_if_denied_maps_to_policy_refused() -> None:
    dec = check_new(draft(), TOM, CAMERAS, 5, RULES, NOW)
    with pytest.raises(PolicyRefused) as err:
        dec.raise_if_denied()
    assert err.value.exit_code == 3 and str(err.value) == dec.reason
    check_new(draft(), ALICE, CAMERAS, 5, RULES, NOW).raise_if_denied()  # allowed: no exception


# --- approving ----------------------------------------------------------------------------------

SAT_10 = ts("2026-11-21T10:00")


@pytest.mark.parametrize(
    ("name", "req", "approvals", "actor", "now", "words"),
    [
        ("self-approval", request(requester="bob"), (), BOB, SAT_10, ["bob", "may not approve"]),
        (
            "same person twice",
            request(),
            (ok("sam", "security_lead", SAT_10),),
            SAM,
            SAT_10 + 60,
            ["sam", "already", "different person"],
        ),
        ("role mismatch", request(), (), TOM, SAT_10, ["tom", "dept_manager", "security_lead"]),
        (
            "role already filled",
            request(),
            (ok("sam", "security_lead", SAT_10),),
            SUE,
            SAT_10 + 60,
            ["sue", "dept_manager"],
        ),
        (
            "denied",
            request(),
            (no("sue", "security_lead", SAT_10),),
            BOB,
            SAT_10 + 60,
            ["denied", "sue"],
        ),
        ("cancelled", request(state="cancelled"), (), BOB, SAT_10, ["cancelled"]),
        ("past deadline", request(), (), BOB, ts("2026-11-25T17:00"), ["expired", "3 working"]),
        (
            "approved, not duty",
            request(),
            BOTH,
            SUE,
            MON_10 + 60,
            ["no further approval"],
        ),
        ("exported", request(state="exported", exported_at=MON_10), BOTH, DAN, MON_10, ["export"]),
        ("duty by requester", request(requester="dan"), (), DAN, SAT_10, ["dan", "may not"]),
        ("as a step not held", request(), (), BOB, SAT_10, ["security_lead"]),
    ],
)
def test_approve_refused(
    name: str,
    req: Request,
    approvals: tuple[Approval, ...],
    actor: Actor,
    now: float,
    words: list[str],
) -> None:
    as_step = "security_lead" if name == "as a step not held" else None
    refused(check_approve(req, approvals, actor, RULES, now, as_step=as_step), *words)


@pytest.mark.parametrize(
    ("req", "approvals", "actor", "step"),
    [
        (request(), (), BOB, "dept_manager"),
        (request(), (ok("bob", "dept_manager", SAT_10),), SAM, "security_lead"),
        (request(), (), DAN, "duty_manager"),  # after-hours approval while pending
        (request(), BOTH, DAN, "duty_manager"),  # ... or once approved
        (request(format="native"), BOTH, SUE, "security_lead"),  # the native copy's extra step
        # an exported emergency request takes back-filled approvals
        (
            request(requester="sam", emergency=True, state="exported", exported_at=FRI_17),
            (),
            BOB,
            "dept_manager",
        ),
    ],
)
def test_approve_fills_step(
    req: Request, approvals: tuple[Approval, ...], actor: Actor, step: str
) -> None:
    d = check_approve(req, approvals, actor, RULES, MON_10 + 60)
    allowed(d)
    assert d.step == step


def test_duty_manager_who_is_also_a_step_role_picks_the_after_hours_approval() -> None:
    both = Actor("dora", frozenset({"dept_manager", "duty_manager"}))
    assert check_approve(request(), (), both, RULES, SAT_10).step == "dept_manager"
    d = check_approve(request(), (), both, RULES, SAT_10, as_step="duty_manager")
    assert d.allowed and d.step == "duty_manager"


# --- decision deadline in working days ----------------------------------------------------------

HOLIDAY_MON = AccessRules(tz=SH, camera_levels=CAMERAS, holidays=frozenset({date(2026, 11, 30)}))
MAKEUP_SAT = AccessRules(tz=SH, camera_levels=CAMERAS, workdays=frozenset({date(2026, 11, 21)}))


@pytest.mark.parametrize(
    ("created", "rules", "deadline"),
    [
        ("2026-11-20T17:00", RULES, "2026-11-25T17:00"),  # Fri -> Wed across the weekend
        ("2026-11-24T10:00", RULES, "2026-11-27T10:00"),  # Tue -> Fri
        ("2026-11-21T10:00", RULES, "2026-11-26T00:00"),  # filed Sat: Mon, Tue, Wed -> Thu 00:00
        ("2026-11-27T17:00", HOLIDAY_MON, "2026-12-03T17:00"),  # Fri, Mon holiday -> Thu
        ("2026-11-30T09:00", HOLIDAY_MON, "2026-12-04T00:00"),  # filed on the holiday
        ("2026-11-20T17:00", MAKEUP_SAT, "2026-11-24T17:00"),  # make-up Saturday counts
        (
            "2026-11-20T17:00",
            AccessRules(tz=SH, camera_levels=CAMERAS, decide_within=1),
            "2026-11-23T17:00",
        ),
    ],
)
def test_decide_deadline(created: str, rules: AccessRules, deadline: str) -> None:
    assert decide_deadline(ts(created), rules) == ts(deadline)


@pytest.mark.parametrize(
    ("rules", "deadline"),
    [
        (RULES, "2026-11-25T17:00"),
        (
            AccessRules(tz=SH, camera_levels=CAMERAS, holidays=frozenset({date(2026, 11, 24)})),
            "2026-11-26T17:00",
        ),
    ],
)
@pytest.mark.parametrize(("offset", "state"), [(-1, "pending"), (0, "expired"), (1, "expired")])
def test_pending_request_expires_after_working_days(
    rules: AccessRules, deadline: str, offset: float, state: str
) -> None:
    req = request(created=FRI_17)
    now = ts(deadline) + offset
    assert state_of(req, (), now, rules) == state
    d = check_approve(req, (), BOB, rules, now)
    if state == "pending":
        allowed(d)
    else:
        refused(d, "expired", "file a new request")


# --- validity and export ------------------------------------------------------------------------

APPROVED_AT = MON_10
WED_11 = ts("2026-11-25T11:00")


@pytest.mark.parametrize(
    ("now", "state"),
    [
        (APPROVED_AT + 30 * DAY - 1, "approved"),
        (APPROVED_AT + 30 * DAY, "expired"),
        (APPROVED_AT + 31 * DAY, "expired"),
    ],
)
def test_approval_valid_for_30_days(now: float, state: str) -> None:
    # 10:00 + 30 d is 10:00 local, inside hours: only validity decides.
    assert state_of(request(), BOTH, now, RULES) == state
    d = check_export(request(), BOTH, TOM, RULES, now)
    if state == "approved":
        allowed(d)
    else:
        refused(d, "expired", "valid until", "file a new request")


@pytest.mark.parametrize(
    ("local", "outside"),
    [
        ("2026-11-25T07:59:59", True),
        ("2026-11-25T08:00", False),
        ("2026-11-25T19:59:59", False),
        ("2026-11-25T20:00", True),
        ("2026-11-25T23:30", True),
        ("2026-11-26T00:00", True),
    ],
)
def test_outside_hours_boundaries(local: str, outside: bool) -> None:
    assert outside_hours(ts(local), RULES) is outside


def test_hours_across_midnight() -> None:
    night = AccessRules(tz=SH, hours=(20 * 60, 8 * 60))
    assert not outside_hours(ts("2026-11-25T23:00"), night)
    assert outside_hours(ts("2026-11-25T12:00"), night)


DUTY = ok("dan", "duty_manager", ts("2026-11-25T20:30"))


@pytest.mark.parametrize(
    ("approvals", "now", "ok_"),
    [
        (BOTH, ts("2026-11-25T21:00"), False),  # outside hours, no duty manager
        ((*BOTH, DUTY), ts("2026-11-25T21:00"), True),
        (BOTH, ts("2026-11-26T07:00"), False),
        ((*BOTH, DUTY), ts("2026-11-26T07:00"), True),  # 10 h 30 min later: still covered
        (BOTH, WED_11, True),  # inside hours: no duty approval needed
        # a duty approval by the requester does not count
        ((*BOTH, ok("alice", "duty_manager", MON_10)), ts("2026-11-25T21:00"), False),
    ],
)
def test_export_outside_hours_needs_duty_manager(
    approvals: tuple[Approval, ...], now: float, ok_: bool
) -> None:
    d = check_export(request(), approvals, TOM, RULES, now)
    if ok_:
        allowed(d)
    else:
        refused(d, "outside export hours 08:00-20:00", "duty_manager", "request 12")


@pytest.mark.parametrize(
    ("given", "now", "ok_"),
    [
        # an approval given in office hours days earlier is no licence for tonight
        ("2026-11-23T11:00", "2026-11-25T21:00", False),
        ("2026-11-25T09:00", "2026-11-25T20:59", True),  # 11 h 59 min
        ("2026-11-25T09:00", "2026-11-25T21:00", False),  # 12 h: over
        ("2026-11-25T09:00", "2026-11-25T21:01", False),
        ("2026-11-25T21:30", "2026-11-25T21:00", False),  # not yet given
    ],
)
def test_after_hours_approval_covers_exports_for_after_hours_valid(
    given: str, now: str, ok_: bool
) -> None:
    approvals = (*BOTH, ok("dan", "duty_manager", ts(given)))
    d = check_export(request(), approvals, TOM, RULES, ts(now))
    if ok_:
        allowed(d)
    else:
        refused(d, "outside export hours", "duty_manager")
    # the window is a setting
    longer = dataclasses.replace(RULES, after_hours_valid=3 * DAY)
    assert check_export(request(), approvals, TOM, longer, ts(now)).allowed == (given < now)


def test_a_lapsed_after_hours_approval_may_be_given_again_by_another_duty_manager() -> None:
    approvals = (*BOTH, ok("dan", "duty_manager", ts("2026-11-23T11:00")))
    now = ts("2026-11-25T21:00")
    d = check_approve(request(), approvals, Actor("dave", frozenset({"duty_manager"})), RULES, now)
    assert d.allowed and d.step == "duty_manager"
    allowed(check_export(request(), (*approvals, ok("dave", d.step, now)), TOM, RULES, now + 60))


@pytest.mark.parametrize(
    ("rules", "actor", "ok_"),
    [
        (RULES, Actor("tom2", frozenset({"technician", "dept_manager"})), True),
        (RULES, Actor("bob", frozenset({"technician", "dept_manager"})), False),  # approved it
        (RULES, Actor("sam", frozenset({"technician", "security_lead"}), 2), False),
        (
            dataclasses.replace(RULES, approver_may_export=True),
            Actor("bob", frozenset({"technician"})),
            True,
        ),
        # the requester never exports, whatever the setting
        (
            dataclasses.replace(RULES, approver_may_export=True),
            Actor("alice", frozenset({"technician"})),
            False,
        ),
    ],
)
def test_separation_of_duties(rules: AccessRules, actor: Actor, ok_: bool) -> None:
    d = check_export(request(), BOTH, actor, rules, WED_11)
    if ok_:
        allowed(d)
    else:
        refused(d, actor.user)
        assert "separation" in d.reason or "filed" in d.reason


STREET = request(requester="carol", cameras=("lobby-01", "street-03"))


@pytest.mark.parametrize(
    ("check", "actor"),
    [
        (lambda a: check_approve(STREET, (), a, RULES, WED_11), BOB),
        (lambda a: check_deny(STREET, a, "no", RULES, WED_11), BOB),
        (lambda a: check_export(STREET, BOTH, a, RULES, WED_11), TOM),
        (lambda a: access.check_view(STREET, (), a, RULES), TOM),
    ],
)
def test_every_actor_needs_the_level_of_every_camera(check: Any, actor: Actor) -> None:
    refused(check(actor), "street-03", "level 2", actor.user, "level 1")
    raised = dataclasses.replace(actor, level=2)
    allowed(check(raised))


def test_a_camera_the_rules_do_not_classify_needs_level_2() -> None:
    odd = request(cameras=("roof-09",))
    refused(check_approve(odd, (), BOB, RULES, WED_11), "roof-09", "level 2")


@pytest.mark.parametrize(
    ("actor", "ok_"),
    [
        (ALICE, True),  # requester
        (BOB, True),  # may decide (dept_manager, level 1 camera)
        (DAN, True),  # may give the after-hours approval
        (TOM, True),  # may export
        (SUE, True),  # security lead
        (Actor("aud", frozenset({"auditor"})), True),
        (ROOT, True),
        (Actor("olga", frozenset({"operator"}), 2), False),  # another operator
        (Actor("nora", frozenset()), False),
    ],
)
def test_who_may_see_a_request(actor: Actor, ok_: bool) -> None:
    d = access.check_view(request(), (), actor, RULES)
    if ok_:
        allowed(d)
    else:
        refused(d, actor.user, "may not see request 12")


def test_emergency_at_once_only_within_its_window() -> None:
    rules = dataclasses.replace(RULES, backfill_within=60.0)
    allowed(check_export(EMERGENCY, (), TOM, rules, MON_10 + 59))
    refused(
        check_export(EMERGENCY, (), TOM, rules, MON_10 + 60),
        "not approved",
        "emergency window closed",
    )
    refused(check_export(EMERGENCY, (), TOM, rules, MON_10 + 65), "emergency window closed")
    # with its full approvals it exports like any other request
    full = (ok("bob", "dept_manager", MON_10 + HOUR), ok("sue", "security_lead", MON_10 + HOUR))
    allowed(check_export(EMERGENCY, full, TOM, rules, WED_11))


@pytest.mark.parametrize(
    ("req", "approvals", "actor", "words"),
    [
        (request(), BOTH, BOB, ["technician", "bob"]),
        (request(requester="tom"), BOTH, TOM, ["tom", "another technician"]),
        (request(), (ok("bob", "dept_manager", MON_10),), TOM, ["not approved", "security_lead"]),
        (request(), (), TOM, ["not approved", "dept_manager, security_lead"]),
        (
            request(state="exported", exported_at=MON_10 + HOUR),
            BOTH,
            TOM,
            ["already exported", "one export per request"],
        ),
        (request(exported_at=MON_10 + HOUR), BOTH, TOM, ["already exported"]),
        (request(state="closed"), BOTH, TOM, ["already exported"]),
        (request(state="cancelled"), BOTH, TOM, ["cancelled"]),
        (request(), (*BOTH, no("sue", "security_lead", MON_10 + 1)), TOM, ["denied", "sue"]),
    ],
)
def test_export_refused(
    req: Request, approvals: tuple[Approval, ...], actor: Actor, words: list[str]
) -> None:
    refused(check_export(req, approvals, actor, RULES, WED_11), *words)


# --- native copy --------------------------------------------------------------------------------

NATIVE = request(format="native")


def test_native_copy_needs_a_further_distinct_approver() -> None:
    assert steps_for(NATIVE, RULES) == ("dept_manager", "security_lead", "security_lead")
    assert steps_for(request(), RULES) == ("dept_manager", "security_lead")
    # two steps approved: enough for mp4, not for native
    assert state_of(NATIVE, BOTH, WED_11, RULES) == "pending"
    assert open_steps(NATIVE, BOTH, RULES) == ("security_lead",)
    refused(check_export(NATIVE, BOTH, TOM, RULES, WED_11), "native copy", "security_lead")
    # the same security lead cannot fill the extra step
    refused(check_approve(NATIVE, BOTH, SAM, RULES, WED_11), "sam", "already")
    d = check_approve(NATIVE, BOTH, SUE, RULES, WED_11)
    assert d.allowed and d.step == "security_lead"
    full = (*BOTH, ok("sue", d.step, WED_11))
    assert state_of(NATIVE, full, WED_11 + 60, RULES) == "approved"
    allowed(check_export(NATIVE, full, TOM, RULES, WED_11 + 60))


def test_native_role_is_configurable() -> None:
    rules = AccessRules(tz=SH, native_role="evidence_officer", camera_levels=CAMERAS)
    assert steps_for(NATIVE, rules)[-1] == "evidence_officer"
    eve = Actor("eve", frozenset({"evidence_officer"}))
    d = check_approve(NATIVE, BOTH, eve, rules, WED_11)
    assert d.allowed and d.step == "evidence_officer"


# --- emergency ----------------------------------------------------------------------------------

EMERGENCY = request(requester="sam", emergency=True, created=MON_10)
EXPORTED = dataclasses.replace(EMERGENCY, state="exported", exported_at=MON_10 + 300)
BACKFILL = (ok("bob", "dept_manager", MON_10 + 2 * HOUR), ok("sue", "security_lead", MON_10 + DAY))


def test_emergency_exports_at_once_and_at_any_hour() -> None:
    allowed(check_export(EMERGENCY, (), TOM, RULES, MON_10 + 60))
    allowed(
        check_export(
            dataclasses.replace(EMERGENCY, created=ts("2026-11-23T23:00")),
            (),
            TOM,
            RULES,
            ts("2026-11-23T23:05"),
        )
    )
    # a native copy never leaves without its approvals, emergency or not
    refused(
        check_export(dataclasses.replace(EMERGENCY, format="native"), (), TOM, RULES, MON_10),
        "not approved",
        "only as mp4",
    )


@pytest.mark.parametrize(
    ("req", "approvals", "now", "expected"),
    [
        (EXPORTED, (), MON_10 + DAY - 1, None),  # still within 24 h
        (
            EXPORTED,
            (),
            MON_10 + DAY,
            "request 12: emergency export on 2026-11-23T10:05+08:00 not backed by approvals "
            "within 24 h (missing: dept_manager, security_lead)",
        ),
        (
            EXPORTED,
            BACKFILL[:1],
            MON_10 + 2 * DAY,
            "request 12: emergency export on 2026-11-23T10:05+08:00 not backed by approvals "
            "within 24 h (missing: security_lead)",
        ),
        (EXPORTED, BACKFILL, MON_10 + 2 * DAY, None),  # back-filled in time
        # overdue, then back-filled late: the violation closes
        (
            EXPORTED,
            (BACKFILL[0], ok("sue", "security_lead", MON_10 + 30 * HOUR)),
            MON_10 + 31 * HOUR,
            None,
        ),
        (
            dataclasses.replace(EXPORTED, resolved="police case 118, form on file"),
            (),
            MON_10 + 2 * DAY,
            None,
        ),
        (EMERGENCY, (), MON_10 + 2 * DAY, None),  # never exported: nothing left the box
        (dataclasses.replace(EXPORTED, emergency=False), (), MON_10 + 2 * DAY, None),
        (
            EXPORTED,
            (no("bob", "dept_manager", MON_10 + HOUR),),
            MON_10 + DAY,
            "request 12: emergency export on 2026-11-23T10:05+08:00 not backed by approvals "
            "within 24 h (denied by bob; missing: dept_manager, security_lead)",
        ),
        (
            dataclasses.replace(EXPORTED, exported_at=ts("2026-11-23T22:00")),
            BACKFILL,
            MON_10 + 2 * DAY,
            "request 12: emergency export on 2026-11-23T22:00+08:00 not backed by approvals "
            "within 24 h (missing: duty_manager)",
        ),
    ],
)
def test_emergency_violation(
    req: Request, approvals: tuple[Approval, ...], now: float, expected: str | None
) -> None:
    assert emergency_violation(req, approvals, now, RULES) == expected


def test_emergency_backfill_and_resolution_flow() -> None:
    # the back-filling approvers are accepted on the exported request; the requester is not
    refused(check_approve(EXPORTED, (), SAM, RULES, MON_10 + HOUR), "sam")
    d = check_approve(EXPORTED, (), BOB, RULES, MON_10 + HOUR)
    assert d.allowed and d.step == "dept_manager"
    # only an admin, not the requester, with a reason resolves a violation
    refused(check_resolve(EXPORTED, BOB, "ok"), "admin")
    refused(check_resolve(EXPORTED, ROOT, " "), "reason")
    refused(check_resolve(dataclasses.replace(EXPORTED, requester="root"), ROOT, "ok"), "another")
    refused(check_resolve(request(), ROOT, "ok"), "not an emergency")
    refused(check_resolve(dataclasses.replace(EXPORTED, resolved="done"), ROOT, "ok"), "already")
    allowed(check_resolve(EXPORTED, ROOT, "police case 118, paper form signed"))


def test_the_exporter_of_an_emergency_request_may_not_back_fill_its_approval() -> None:
    # tess exported it at once, then tries to approve it in each step she holds a role for
    tess = Actor("tess", frozenset({"technician", "dept_manager", "security_lead", "duty_manager"}))
    night = dataclasses.replace(EXPORTED, exported_at=ts("2026-11-23T22:00"), exporter="tess")
    for req in (dataclasses.replace(EXPORTED, exporter="tess"), night):
        refused(check_approve(req, (), tess, RULES, MON_10 + HOUR), "tess", "exported")
        for step in ("dept_manager", "security_lead", "duty_manager"):
            refused(check_approve(req, BACKFILL, tess, RULES, MON_10 + HOUR, as_step=step), "tess")
    # another technician's export leaves her free to approve
    other = dataclasses.replace(EXPORTED, exporter="tom")
    assert check_approve(other, (), tess, RULES, MON_10 + HOUR).step == "dept_manager"
    # a site that lets approvers export lets the exporter approve; the requester never
    may = dataclasses.replace(RULES, approver_may_export=True)
    mine = dataclasses.replace(EXPORTED, exporter="tess")
    allowed(check_approve(mine, (), tess, may, MON_10 + HOUR))
    sam_tech = Actor("sam", frozenset({"technician", "security_lead"}), 2)
    refused(check_approve(dataclasses.replace(EXPORTED, exporter="sam"), (), sam_tech, may, MON_10))


def test_an_approval_by_the_exporter_does_not_close_the_violation() -> None:
    # written before the exporter was checked (or by hand): it does not count
    req = dataclasses.replace(EXPORTED, exporter="bob")
    v = emergency_violation(req, BACKFILL, MON_10 + 2 * DAY, RULES)
    assert v is not None and "missing: dept_manager" in v
    assert open_steps(req, BACKFILL, RULES) == ("dept_manager",)
    may = dataclasses.replace(RULES, approver_may_export=True)
    assert emergency_violation(req, BACKFILL, MON_10 + 2 * DAY, may) is None


# --- deny and cancel ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "actor", "reason", "words"),
    [
        (request(), BOB, "", ["reason", "--reason"]),
        (request(), BOB, "   ", ["reason"]),
        (request(), TOM, "no", ["tom", "approver roles"]),
        (request(), DAN, "no", ["dan"]),
        (request(requester="bob"), BOB, "no", ["request cancel"]),
        (request(state="cancelled"), BOB, "no", ["cancelled"]),
        (request(state="exported", exported_at=MON_10), BOB, "no", ["exported"]),
    ],
)
def test_deny_refused(req: Request, actor: Actor, reason: str, words: list[str]) -> None:
    refused(check_deny(req, actor, reason, RULES, MON_10), *words)


@pytest.mark.parametrize("actor", [BOB, SAM, ROOT])
def test_deny_with_reason_makes_the_request_denied(actor: Actor) -> None:
    allowed(check_deny(request(), actor, "no legal basis given", RULES, MON_10))
    denial = (no(actor.user, "security_lead", MON_10, "no legal basis given"),)
    assert state_of(request(), denial, MON_10 + 1, RULES) == "denied"
    assert state_of(request(), (*BOTH, *denial), MON_10 + 1, RULES) == "denied"


@pytest.mark.parametrize(
    ("req", "actor", "ok_"),
    [
        (request(), ALICE, True),
        (request(state="approved"), ALICE, True),
        (request(), ROOT, True),
        (request(), BOB, False),
        (request(), TOM, False),
        (request(state="exported"), ALICE, False),
        (request(state="denied"), ALICE, False),
        (request(state="expired"), ROOT, False),
    ],
)
def test_cancel(req: Request, actor: Actor, ok_: bool) -> None:
    d = check_cancel(req, actor, MON_10)
    if ok_:
        allowed(d)
    else:
        refused(d)


# --- derived state and holds --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "approvals", "now", "state"),
    [
        (request(), (), MON_10, "pending"),
        (request(), BOTH, MON_10, "approved"),
        (request(state="approved"), BOTH, MON_10, "approved"),
        (request(state="cancelled"), BOTH, MON_10, "cancelled"),
        (request(state="exported"), BOTH, MON_10 + 60 * DAY, "exported"),
        (request(state="closed"), (), MON_10, "closed"),
        # approvals in before the deadline stay approved after it
        (request(), BOTH, ts("2026-11-26T10:00"), "approved"),
    ],
)
def test_state_of(req: Request, approvals: tuple[Approval, ...], now: float, state: str) -> None:
    assert state in access.STATES
    assert state_of(req, approvals, now, RULES) == state


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        (request(), None),
        (request(state="approved"), None),
        (request(state="denied", closed_at=MON_10), MON_10),
        (request(state="cancelled"), WED_11),  # no closing time recorded: ends now
        (request(state="expired", closed_at=MON_10 + 1), MON_10 + 1),
        (request(state="exported", exported_at=MON_10), MON_10 + 90 * DAY),
        (request(state="closed", exported_at=MON_10, closed_at=MON_10 + DAY), MON_10 + 90 * DAY),
    ],
)
def test_hold_until(req: Request, expected: float | None) -> None:
    assert hold_until(req, WED_11, 90 * DAY) == expected


def test_hold_range_adds_margin_both_sides() -> None:
    assert hold_range(request(), 300) == (RECORDED - 300, RECORDED + 900)


def test_access_is_pure() -> None:
    """access.py imports nothing that can touch disk, clock or network."""
    tree = ast.parse(Path(access.__file__).read_text())
    names = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert names <= {
        "__future__",
        "math",
        "unicodedata",
        "collections",
        "collections.abc",
        "dataclasses",
        "datetime",
        "nvr_guard.text",
        "nvr_guard.model",  # pure domain types (Request, Recipient, Approval)
        "nvr_guard.errors",
    }, names


# --- viewing (调阅) and previews ----------------------------------------------------------------


def test_a_view_request_may_be_filed_and_is_never_exported() -> None:
    allowed(check_new(draft(format="view"), ALICE, CAMERAS, 3, RULES, NOW))
    view = request(format="view")
    assert steps_for(view, RULES) == steps_for(request(), RULES)
    refused(check_export(view, BOTH, TOM, RULES, WED_11), "viewing request", "never exported")


@pytest.mark.parametrize(
    ("actor", "req", "approvals", "now", "words"),
    [
        (ALICE, request(format="mp4"), BOTH, WED_11, ["not a viewing request"]),
        (SAM, request(format="view"), BOTH, WED_11, ["only its requester"]),
        (ROOT, request(format="view"), BOTH, WED_11, ["only its requester"]),
        (ALICE, request(format="view"), BOTH[:1], WED_11, ["not approved", "security_lead"]),
        (ALICE, request(format="view"), BOTH, APPROVED_AT + 30 * DAY, ["expired", "valid until"]),
        (ALICE, request(format="view", state="cancelled"), BOTH, WED_11, ["cancelled"]),
        (ALICE, request(format="view"), BOTH, ts("2026-11-25T21:00"), ["viewing hours"]),
        (
            ALICE,
            request(format="view", cameras=("street-03",)),
            BOTH,
            WED_11,
            ["level 2", "watch"],
        ),
    ],
)
def test_watch_refused(
    actor: Actor, req: Request, approvals: tuple[Approval, ...], now: float, words: list[str]
) -> None:
    refused(check_watch(req, approvals, actor, RULES, now), *words)


def test_the_requester_watches_until_the_validity_ends() -> None:
    view = request(format="view")
    allowed(check_watch(view, BOTH, ALICE, RULES, WED_11))
    allowed(check_watch(view, BOTH, ALICE, RULES, APPROVED_AT + 30 * DAY - 1))
    refused(check_watch(view, BOTH, ALICE, RULES, APPROVED_AT + 30 * DAY), "expired")
    # after hours with the duty manager's approval
    night = ts("2026-11-25T21:00")
    allowed(
        check_watch(view, (*BOTH, ok("dan", "duty_manager", night - HOUR)), ALICE, RULES, night)
    )


def test_previews_only_for_those_who_may_decide_now() -> None:
    pending = request()
    allowed(check_preview(pending, (), BOB, RULES, NOW))
    allowed(check_preview(pending, (), SAM, RULES, NOW))
    refused(check_preview(pending, (), ALICE, RULES, NOW), "previews")  # the requester
    refused(check_preview(pending, (), TOM, RULES, NOW), "previews")
    refused(check_preview(pending, BOTH[:1], BOB, RULES, NOW), "already decided")
    street = request(cameras=("street-03",))
    refused(check_preview(street, (), SUE, RULES, NOW), "level 2")
    allowed(check_preview(street, (), SAM, RULES, NOW))


def test_a_technician_is_not_shown_viewing_requests() -> None:
    # a viewing request is never exported: its reason and contact are not a technician's business
    from nvr_guard.workflow.access import check_view

    refused(check_view(request(format="view"), BOTH, TOM, RULES), "may not see request 12")
    allowed(check_view(request(format="mp4"), BOTH, TOM, RULES))
