"""The web console over HTTP, as deployed: real Unix accounts with real passwords log in through
the password helper (PAM), the console runs as its own user and acts through the daemon's
control socket. What a browser or an attacker with curl can do, and what ends up on record."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.site import poll, write_segment
from tests.fixtures.webconsole import Console, console, csrf_of, password_of, start_of_footage

pytestmark = pytest.mark.integration

P = "wh17"
ALICE, DAVE = f"{P}-alice", f"{P}-dave"  # operators
BOB = f"{P}-bob"  # dept_manager
CAROL = f"{P}-carol"  # security_lead
AUDREY = f"{P}-audrey"  # auditor
EVE = f"{P}-eve"  # an account the config gives no role
LOCKED = f"{P}-lou"  # locked out by the lockout test
ADMIN = f"{P}-adm"  # admin
# a second site whose first sweep would delete all its footage: the guard stops it
YARD = """  yard:
    keep: 1h
    roots: [{base}/yard]
    layout: "{{camera}}/%Y-%m-%d/%H/%M.%S.mp4"
    cameras: [cam9]
"""
XSS = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


@pytest.fixture(scope="module")
def web() -> Iterator[Console]:
    people = {
        ALICE: ["operator"],
        DAVE: ["operator"],
        BOB: ["dept_manager", "operator"],
        CAROL: ["security_lead"],
        AUDREY: ["auditor"],
        LOCKED: ["operator"],
        ADMIN: ["admin"],
    }

    def yard(base: Path) -> None:
        for i in range(5):
            write_segment(base / "yard", "cam9", datetime.now(UTC) - timedelta(hours=3, minutes=i))

    with console(
        P,
        people,
        extra="  max_failures: 3\n  lockout: 10min\n",
        strangers=(EVE,),
        sites=YARD,
        prepare=yard,
    ) as c:
        yield c


def file_request(c: Console, who: httpx.Client, **over: str) -> int:
    """File a request through the form; its id."""
    start = start_of_footage(c)
    page = who.get("/requests/new")
    assert page.status_code == 200
    form = {
        "csrf_token": csrf_of(page.text),
        "cameras": "cam1",
        "from": (start + timedelta(minutes=1)).isoformat(),
        "to": (start + timedelta(minutes=3)).isoformat(),
        "reason": "theft at the north gate",
        "basis": "police case 2026-118",
        "recipient_unit": "District PSB",
        "recipient_person": "Officer Li",
        "recipient_contact": "110",
        "format": "mp4",
        **over,
    }
    r = who.post("/requests", data=form)
    assert r.status_code == 303, r.text[:2000]
    m = re.fullmatch(r"/requests/(\d+)", r.headers["location"])
    assert m, r.headers["location"]
    return int(m.group(1))


def shown(c: Console, rid: int) -> dict[str, Any]:
    r = c.cli(None, "--json", "request", "show", str(rid))
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def entries(c: Console, action: str, **match: Any) -> list[dict[str, Any]]:
    out = []
    for e in c.audit():
        if e["action"] != action:
            continue
        if all(
            (e.get(k) if k in ("actor", "object") else e["details"].get(k)) == v
            for k, v in match.items()
        ):
            out.append(e)
    return out


def test_healthz_and_login_page(web: Console) -> None:
    c = web.client()
    assert c.get("/healthz").text.strip() == "ok"
    r = c.get("/login")
    assert r.status_code == 200
    assert 'name="username"' in r.text and 'name="password"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src" not in csp and "default-src 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"


def test_pages_need_a_session(web: Console) -> None:
    c = web.client()
    for path in ("/requests", "/requests?waiting=me", "/requests/new", "/audit", "/status"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path


def test_wrong_password_is_401_and_on_record(web: Console) -> None:
    c = web.client()
    r = c.post("/login", data={"username": ALICE, "password": "not-her-password"})
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    failed = entries(web, "auth.failed", object=ALICE)
    assert failed and failed[-1]["details"]["client"] == "127.0.0.1"
    assert failed[-1]["actor"] == "web-login"
    assert not re.search(r"not-her-password", json.dumps(web.audit()))


def test_login_sets_a_strict_cookie_and_is_on_record(web: Console) -> None:
    c = web.client()
    r = c.post("/login", data={"username": ALICE, "password": password_of(ALICE)})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert entries(web, "web.login", actor=ALICE)
    page = c.get("/requests?waiting=me")
    assert page.status_code == 200 and ALICE in page.text


def test_a_planted_session_id_is_never_adopted(web: Console) -> None:
    c = web.client()
    planted = "A" * 43
    c.cookies.set("nvr-guard-session", planted, domain="127.0.0.1")
    assert c.get("/requests").status_code == 303  # not a session
    r = c.post("/login", data={"username": DAVE, "password": password_of(DAVE)})
    assert r.status_code == 303
    assert c.cookies.get("nvr-guard-session", domain="127.0.0.1") not in (None, planted)


def login_message(r: httpx.Response) -> str:
    found = re.findall(r'id="message"[^>]*>([^<]*)', r.text)
    return found[0] if found else ""


def test_an_account_without_a_role_cannot_log_in_nor_learn_its_password_is_right(
    web: Console,
) -> None:
    c = web.client()
    wrong = c.post("/login", data={"username": EVE, "password": "not-it"})
    right = c.post("/login", data={"username": EVE, "password": password_of(EVE)})
    assert right.status_code == wrong.status_code == 401
    assert "set-cookie" not in right.headers
    assert login_message(right) == login_message(wrong) != ""
    assert entries(web, "access.denied", object=EVE)


def test_file_approve_in_two_steps_on_record_with_the_address(web: Console) -> None:
    alice, bob, carol = web.browser(ALICE), web.browser(BOB), web.browser(CAROL)
    rid = file_request(web, alice)
    assert shown(web, rid)["requester"] == ALICE
    waiting = bob.get("/requests?waiting=me").text
    assert f"/requests/{rid}" in waiting
    # alice (operator) is not asked
    assert f'/requests/{rid}"' not in alice.get("/requests?waiting=me").text
    page = bob.get(f"/requests/{rid}")
    assert page.status_code == 200 and 'id="approve"' in page.text
    r = bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf_of(page.text), "note": "ok"})
    assert r.status_code == 303
    page = carol.get(f"/requests/{rid}")
    r = carol.post(f"/requests/{rid}/approve", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 303
    assert shown(web, rid)["state"] == "approved"
    approvals = entries(web, "request.approve", object=f"request:{rid}")
    assert [e["actor"] for e in approvals] == [BOB, CAROL]
    assert all(e["details"]["via"] == "web" for e in approvals)
    assert all(e["details"]["client"] == "127.0.0.1" for e in approvals)
    made = entries(web, "request.new")
    assert made and made[-1]["actor"] == ALICE and made[-1]["details"]["via"] == "web"
    record = alice.get(f"/requests/{rid}/record")
    assert (
        record.status_code == 200 and "审批表" in record.text and "Approval Record" in record.text
    )
    assert "'sha256-" in record.headers["content-security-policy"]


def test_an_approver_adds_a_mask_and_a_requester_asks_for_encryption_in_the_console(
    web: Console,
) -> None:
    alice, bob = web.browser(ALICE), web.browser(BOB)
    rid = file_request(web, alice, encrypt="passphrase")
    assert shown(web, rid)["encrypt"] == "passphrase"
    page = bob.get(f"/requests/{rid}")
    assert 'id="mask"' in page.text and 'id="encrypt"' in page.text
    # a bad mask is refused and changes nothing
    r = bob.post(
        f"/requests/{rid}/approve", data={"csrf_token": csrf_of(page.text), "mask": "0.9,0,0.5,1"}
    )
    assert r.status_code in (400, 403) and "reaches past the frame" in r.text
    assert shown(web, rid)["approvals"] == []
    r = bob.post(
        f"/requests/{rid}/approve",
        data={"csrf_token": csrf_of(page.text), "mask": "0.1,0.1,0.2,0.2"},
    )
    assert r.status_code == 303
    s = shown(web, rid)
    assert s["approvals"][0]["mask"] == "0.1,0.1,0.2,0.2"
    assert s["privacy_zones"]["cam1"][0]["source"] == f"approval by {BOB}"
    assert "approval by" in bob.get(f"/requests/{rid}").text
    # an unknown protection is bad input, shown on the form
    start = start_of_footage(web)
    page = alice.get("/requests/new")
    r = alice.post(
        "/requests",
        data={
            "csrf_token": csrf_of(page.text), "cameras": "cam1",
            "from": (start + timedelta(minutes=1)).isoformat(),
            "to": (start + timedelta(minutes=3)).isoformat(), "reason": "r", "basis": "b",
            "recipient_unit": "u", "recipient_person": "p", "recipient_contact": "c",
            "format": "mp4", "encrypt": "rot13",
        },
    )  # fmt: skip
    assert r.status_code == 400


def test_self_approval_is_refused(web: Console) -> None:
    bob = web.browser(BOB)
    rid = file_request(web, bob)
    page = bob.get(f"/requests/{rid}")
    assert 'id="approve"' not in page.text  # not offered
    r = bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 403
    assert shown(web, rid)["approvals"] == []


def test_deny_with_a_reason(web: Console) -> None:
    alice, bob = web.browser(ALICE), web.browser(BOB)
    rid = file_request(web, alice)
    page = bob.get(f"/requests/{rid}")
    r = bob.post(f"/requests/{rid}/deny", data={"csrf_token": csrf_of(page.text), "reason": ""})
    assert r.status_code in (400, 403)
    assert shown(web, rid)["state"] == "pending"
    r = bob.post(
        f"/requests/{rid}/deny", data={"csrf_token": csrf_of(page.text), "reason": "no basis"}
    )
    assert r.status_code == 303
    s = shown(web, rid)
    assert s["state"] == "denied" and s["approvals"][-1]["note"] == "no basis"


@pytest.mark.parametrize("token", [None, "", "wrong-token-0123456789abcdef"])
def test_a_post_without_the_csrf_token_is_403_and_changes_nothing(
    web: Console, token: str | None
) -> None:
    alice, bob = web.browser(ALICE), web.browser(BOB)
    rid = file_request(web, alice)
    before = len(web.audit())
    data = {"note": "x"} if token is None else {"note": "x", "csrf_token": token}
    assert bob.post(f"/requests/{rid}/approve", data=data).status_code == 403
    data = {"reason": "x"} if token is None else {"reason": "x", "csrf_token": token}
    assert bob.post(f"/requests/{rid}/deny", data=data).status_code == 403
    assert shown(web, rid)["approvals"] == []
    # nothing reached the daemon's command: no approval, no refusal either
    assert not [e for e in web.audit()[before:] if e["action"].startswith("request.")]


def test_another_sessions_csrf_token_is_refused(web: Console) -> None:
    alice, bob, carol = web.browser(ALICE), web.browser(BOB), web.browser(CAROL)
    rid = file_request(web, alice)
    carols_token = csrf_of(carol.get(f"/requests/{rid}").text)
    r = bob.post(f"/requests/{rid}/approve", data={"csrf_token": carols_token})
    assert r.status_code == 403
    assert shown(web, rid)["approvals"] == []


def test_a_post_from_another_origin_is_refused(web: Console) -> None:
    alice, bob = web.browser(ALICE), web.browser(BOB)
    rid = file_request(web, alice)
    token = csrf_of(bob.get(f"/requests/{rid}").text)
    r = bob.post(
        f"/requests/{rid}/approve",
        data={"csrf_token": token},
        headers={"origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert shown(web, rid)["approvals"] == []


def test_user_text_is_rendered_inert_everywhere(web: Console) -> None:
    alice, bob, audrey = web.browser(ALICE), web.browser(BOB), web.browser(AUDREY)
    rid = file_request(
        web,
        alice,
        reason=XSS,
        basis=XSS,
        recipient_unit=XSS,
        recipient_person=XSS,
        recipient_contact=XSS,
    )
    page = bob.get(f"/requests/{rid}")
    bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf_of(page.text), "note": XSS})
    for who, path in (
        (bob, f"/requests/{rid}"),
        (alice, "/requests"),
        (alice, f"/requests/{rid}/record"),
        (audrey, f"/audit?request={rid}"),
        (audrey, f"/requests/{rid}"),
    ):
        text = who.get(path).text
        assert "<script>alert(1)" not in text, path
        assert "<img src=x" not in text, path
        assert "&lt;script&gt;" in text or "&lt;script>" in text or "\\u003cscript" in text, path


def test_logout_ends_the_session_for_whoever_holds_the_cookie(web: Console) -> None:
    alice = web.browser(ALICE)
    stolen = alice.cookies.get("nvr-guard-session")
    page = alice.get("/requests")
    r = alice.post("/logout", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 303
    thief = web.client()
    thief.cookies.set("nvr-guard-session", stolen or "", domain="127.0.0.1")
    assert thief.get("/requests").status_code == 303
    # the console knows a session's person for a few seconds without asking the daemon: not
    # past its logout, not even for a page that asks the daemon nothing else
    thief2 = web.client()
    thief2.cookies.set("nvr-guard-session", stolen or "", domain="127.0.0.1")
    assert thief2.get("/requests/new").status_code == 303
    assert entries(web, "web.logout", actor=ALICE)


def test_one_persons_logout_leaves_anothers_session(web: Console) -> None:
    alice, dave = web.browser(ALICE), web.browser(DAVE)
    alice.post("/logout", data={"csrf_token": csrf_of(alice.get("/requests").text)})
    assert dave.get("/requests").status_code == 200


def test_a_request_one_may_not_see_is_not_found_and_on_record(web: Console) -> None:
    alice, dave = web.browser(ALICE), web.browser(DAVE)
    rid = file_request(web, dave)
    r = alice.get(f"/requests/{rid}")
    assert r.status_code == 404
    assert "theft" not in r.text
    denied = [e for e in entries(web, "access.denied", actor=ALICE) if str(rid) in e["object"]]
    assert denied and denied[-1]["details"]["via"] == "web"
    assert alice.get("/requests/999999").status_code == 404
    assert alice.get("/requests/abc").status_code == 404
    # deciding or watching it tells no more than a request that does not exist
    token = csrf_of(alice.get("/requests").text)
    for path in (f"/requests/{rid}/approve", f"/requests/{rid}/deny"):
        hidden = alice.post(path, data={"csrf_token": token, "note": "x", "reason": "x"})
        missing = alice.post(
            path.replace(str(rid), "999999"), data={"csrf_token": token, "note": "x", "reason": "x"}
        )
        assert hidden.status_code == missing.status_code == 404, path
    for path in (f"/requests/{rid}/watch", f"/requests/{rid}/watch/clip"):
        assert alice.get(path).status_code == 404, path


def test_the_audit_page_is_for_auditors(web: Console) -> None:
    audrey, alice = web.browser(AUDREY), web.browser(ALICE)
    r = audrey.get("/audit")
    assert r.status_code == 200 and 'id="chain"' in r.text and "web.login" in r.text
    assert alice.get("/audit").status_code == 403


def test_status_page(web: Console) -> None:
    r = web.browser(CAROL).get("/status")
    assert r.status_code == 200 and "gate" in r.text


def blocked(c: Console) -> list[dict[str, Any]]:
    r = c.cli(None, "--json", "status")
    return list(json.loads(r.stdout)["blocked_sweeps"])


def test_an_admin_confirms_a_stopped_sweep_after_reentering_the_password(web: Console) -> None:
    poll(lambda: blocked(web), 60, "the guard to stop the yard's first sweep")
    sweep = blocked(web)[0]["id"]
    admin, carol = web.browser(ADMIN), web.browser(CAROL)
    page = admin.get("/status")
    assert page.status_code == 200 and f'id="blocked-{sweep}"' in page.text
    assert 'name="password"' not in carol.get("/status").text  # only admins are offered it
    token = csrf_of(page.text)
    r = admin.post("/status/confirm", data={"csrf_token": token, "sweep": str(sweep)})
    assert r.status_code == 403 and blocked(web)
    r = admin.post(
        "/status/confirm", data={"csrf_token": token, "sweep": str(sweep), "password": "nope"}
    )
    assert r.status_code == 403 and blocked(web)
    r = carol.post(
        "/status/confirm",
        data={
            "csrf_token": csrf_of(carol.get("/status").text),
            "sweep": str(sweep),
            "password": password_of(CAROL),
        },
    )
    assert r.status_code == 403 and blocked(web)
    r = admin.post(
        "/status/confirm",
        data={"csrf_token": token, "sweep": str(sweep), "password": password_of(ADMIN)},
    )
    assert r.status_code == 303, r.text[:500]
    confirmed = entries(web, "sweep.confirm", actor=ADMIN)
    assert confirmed and confirmed[-1]["details"]["via"] == "web"
    assert admin.get("/status").status_code == 200  # the session lives on


def test_a_refused_web_action_is_on_record_as_the_persons(web: Console) -> None:
    alice = web.browser(ALICE)
    page = alice.get("/requests/new")
    r = alice.post(
        "/requests",
        data={
            "csrf_token": csrf_of(page.text),
            "cameras": "cam1",
            "from": "not-a-time-XYZ",
            "to": "1h",
            "reason": "r",
            "basis": "b",
            "recipient_unit": "u",
            "recipient_person": "p",
            "recipient_contact": "c",
            "format": "mp4",
        },
    )
    assert r.status_code == 400
    refused = [e for e in entries(web, "control.refused", actor=ALICE) if "XYZ" in json.dumps(e)]
    assert refused, "the refusal is not on record as alice's"
    assert refused[-1]["details"]["via"] == "web"
    assert refused[-1]["details"]["client"] == "127.0.0.1"


def test_guessing_from_one_address_does_not_keep_others_from_logging_in(web: Console) -> None:
    import threading

    stop = threading.Event()
    tries: list[int] = []

    def guess() -> None:
        c = web.client()
        while not stop.is_set():
            c.post(
                "/login",
                data={"username": f"{P}-nobody", "password": "guess"},
                headers={"x-forwarded-for": "203.0.113.66"},
            )
            tries.append(1)

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        # well past the lockout: most guesses are now refused unchecked, many at once
        poll(lambda: len(tries) >= 60, 120, "60 guesses")
        for _ in range(3):
            assert web.browser(DAVE).get("/requests").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    # refusals of a locked login are summed up, not one entry each
    locked = [e for e in entries(web, "auth.locked") if e["details"]["client"] == "203.0.113.66"]
    assert 1 <= len(locked) <= 3, len(locked)


def test_lockout_after_max_failures_even_for_the_right_password(web: Console) -> None:
    c = web.client()
    away = {"x-forwarded-for": "192.0.2.7"}
    for _ in range(3):
        r = c.post("/login", data={"username": LOCKED, "password": "guess"}, headers=away)
        assert r.status_code == 401
    r = c.post("/login", data={"username": LOCKED, "password": password_of(LOCKED)}, headers=away)
    assert r.status_code == 401
    assert entries(web, "auth.locked", object=LOCKED)
    # the name is locked from every address
    r = c.post("/login", data={"username": LOCKED, "password": password_of(LOCKED)})
    assert r.status_code == 401
    # other people are not
    assert web.browser(DAVE).get("/requests").status_code == 200


def test_an_address_guessing_many_names_is_locked_out(web: Console) -> None:
    c = web.client()
    away = {"x-forwarded-for": "192.0.2.8"}
    for name in ("root", "admin", "nobody"):
        c.post("/login", data={"username": name, "password": "guess"}, headers=away)
    r = c.post("/login", data={"username": DAVE, "password": password_of(DAVE)}, headers=away)
    assert r.status_code == 401
    locked = entries(web, "auth.locked", object=DAVE)
    assert locked and locked[-1]["details"]["client"] == "192.0.2.8"
    assert web.browser(DAVE).get("/requests").status_code == 200  # from elsewhere


def test_healthz_is_503_when_the_daemon_is_gone(web: Console) -> None:
    from tests.fixtures.webconsole import stop

    stop(web, "daemon")
    assert web.client().get("/healthz").status_code == 503
    page = web.client().get("/login")
    assert page.status_code == 200
