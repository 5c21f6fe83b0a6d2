"""Who hears what about a request (nvr_guard.workflow.notify's pure parts), and the webhook
signature a receiver checks."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.config.models import People
from nvr_guard.model import Approval, Recipient, Request
from nvr_guard.store.audit import AuditEntry
from nvr_guard.web.notify import sign, verify
from nvr_guard.workflow.access import AccessRules, Actor
from nvr_guard.workflow.notify import Facts, address, classify, deciders, holders, texts

SH = ZoneInfo("Asia/Shanghai")
T = 1_800_000_000.0
RULES = AccessRules(tz=SH, camera_levels={"lobby": 1, "street": 2})

ALICE = Actor("alice", frozenset({"operator"}), 2)
BOB = Actor("bob", frozenset({"dept_manager"}), 2)
DORA = Actor("dora", frozenset({"dept_manager"}), 1)  # level 1: not for a street camera
BEA = Actor("bea", frozenset({"dept_manager", "operator"}), 2)
CAROL = Actor("carol", frozenset({"security_lead"}), 2)
ADM = Actor("adm", frozenset({"admin"}), 2)
TOM = Actor("tom", frozenset({"technician"}), 2)
EVERYONE = (ALICE, BOB, DORA, BEA, CAROL, ADM, TOM)


def request(cameras: tuple[str, ...] = ("street",), **kw: Any) -> Request:
    base: dict[str, Any] = dict(
        id=7,
        requester="alice",
        site="bank",
        cameras=cameras,
        start=T - 3600,
        end=T - 3000,
        reason="robbery",
        basis="case 1",
        recipient=Recipient("PSB", "Wang", "110"),
        format="mp4",
        emergency=False,
        state="pending",
        created=T,
    )
    base.update(kw)
    return Request(**base)


def entry(action: str, actor: str = "x", **details: Any) -> AuditEntry:
    return AuditEntry(9, T + 60, actor, action, "request:7", details, "", "")


def ok(who: str, role: str, t: float = T + 10) -> Approval:
    return Approval(who, role, "approve", "", t)


def test_deciders_hold_the_step_and_every_camera_level_and_never_the_requester() -> None:
    r = request()
    assert deciders(r, "dept_manager", [], RULES, EVERYONE) == ["bea", "bob"]
    # a lobby camera is level 1: dora may decide it
    assert deciders(request(("lobby",)), "dept_manager", [], RULES, EVERYONE) == [
        "bea",
        "bob",
        "dora",
    ]
    # a requester holding the step's role does not decide on their own request
    assert deciders(request(requester="bea"), "dept_manager", [], RULES, EVERYONE) == ["bob"]
    # who already decided is not asked again (each step needs another person)
    assert deciders(r, "dept_manager", ["bob"], RULES, EVERYONE) == ["bea"]
    # an exporter does not approve (separation of duties) unless the rules allow it
    assert deciders(r, "dept_manager", [], RULES, EVERYONE) == ["bea", "bob"]
    assert deciders(request(exporter="bob"), "dept_manager", [], RULES, EVERYONE) == ["bea"]
    assert deciders(r, "security_lead", [], RULES, EVERYONE) == ["carol"]
    assert deciders(r, "duty_manager", [], RULES, EVERYONE) == []


def test_violations_go_to_security_leads_and_admins() -> None:
    assert holders(frozenset({"security_lead", "admin"}), EVERYONE) == ["adm", "carol"]


def test_address_is_the_configured_one_else_the_relay_domain_else_none() -> None:
    people = People.model_validate(
        {"users": {"bob": {"roles": ["dept_manager"], "email": "bob@example.org"}}}
    )
    assert address("bob", people, "corp.example") == "bob@example.org"
    assert address("bea", people, "corp.example") == "bea@corp.example"
    assert address("bea", people, None) is None


NO = Approval("bob", "dept_manager", "deny", "no", T)


@pytest.mark.parametrize(
    ("action", "before", "after", "details", "want"),
    [
        ("request.new", [], [], {}, ("waiting", "dept_manager")),
        # step 1 filled: the next open step waits
        ("request.approve", [], [ok("bob", "dept_manager")], {}, ("waiting", "security_lead")),
        # the last step filled: approved
        (
            "request.approve",
            [ok("bob", "dept_manager")],
            [ok("bob", "dept_manager"), ok("carol", "security_lead")],
            {},
            ("approved", None),
        ),
        # an after-hours approval fills no step: no event
        (
            "request.approve",
            [ok("bob", "dept_manager")],
            [ok("bob", "dept_manager"), ok("dan", "duty_manager")],
            {},
            None,
        ),
        ("request.deny", [], [NO], {}, ("denied", None)),
        # a second denial (of an exported emergency request) tells the requester nothing new
        (
            "request.deny",
            [NO],
            [NO],
            {},
            None,
        ),
        ("request.expired", [], [], {"was": "pending"}, ("expired", None)),
        ("request.violation", [], [], {"violation": "request 7: ..."}, ("violation", None)),
    ],
)  # fmt: skip
def test_which_entries_make_which_events(
    action: str,
    before: list[Approval],
    after: list[Approval],
    details: dict[str, Any],
    want: tuple[str, str | None] | None,
) -> None:
    e = entry(action, **details)
    assert classify(e, Facts(request(), RULES, before, after)) == want


def test_a_native_copy_waits_for_a_second_security_lead() -> None:
    r = request(format="native")
    both = [ok("bob", "dept_manager"), ok("carol", "security_lead")]
    facts = Facts(r, RULES, both[:1], both)
    assert classify(entry("request.approve"), facts) == ("waiting", "security_lead")


@pytest.mark.parametrize("kind", ["waiting", "approved", "denied", "expired", "violation"])
def test_texts_are_in_chinese_and_english_and_name_the_request_not_its_reason(kind: str) -> None:
    r = request()
    subject, text = texts(kind, r, "dept_manager", entry("x", reason="no case"), SH)
    assert "#7" in subject and "/" in subject
    zh, en = text.split("\n")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh)
    assert "request" in en.lower()
    # what a mail crossing a relay must not carry: the reason, the recipient's contact
    assert "robbery" not in text and "110" not in text and "Wang" not in text


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"kind":"waiting","seq":3}'
    want = "sha256=" + hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", "1700000000", body) == want
    assert verify(b"s3cret", "1700000000", body, want)
    assert not verify(b"s3cret", "1700000001", body, want)  # a replayed body, another time
    assert not verify(b"other", "1700000000", body, want)
