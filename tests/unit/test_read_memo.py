"""Answers about requests and holds reused between writes (``Engine.read_memo``), and a status
answered while a sweep holds the engine lock: what people see must never be older than the
last change of a request, an approval or a hold, and never older than a few seconds."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nvr_guard.config import load_config
from nvr_guard.daemon.commands import Context, dispatch
from nvr_guard.engine import STATUS_BUSY_WAIT, STATUS_FRESH, Engine
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.identity import Caller
from nvr_guard.model import ClockReading
from tests.fixtures.site import Site, make_config, write_segment

ALICE, BOB, CAROL = Caller(60001, "alice"), Caller(60002, "bob"), Caller(60003, "carol")


class SetClock:
    def __init__(self) -> None:
        self.wall = datetime.now(UTC).timestamp()

    def __call__(self) -> ClockReading:
        return ClockReading(wall=self.wall, boottime=self.wall, boot_id="b")


@pytest.fixture
def clock() -> SetClock:
    return SetClock()


@pytest.fixture
def engine(site: Site, clock: SetClock) -> Iterator[Engine]:
    text = make_config(site).replace(
        "  users: {root: {roles: [admin]}}\n",
        "  users:\n"
        "    root: {roles: [admin]}\n"
        "    alice: {roles: [operator], level: 2}\n"
        "    bob: {roles: [dept_manager], level: 2}\n"
        "    carol: {roles: [security_lead], level: 2}\n"
        "    dave: {roles: [operator], level: 2}\n"
        "approval:\n"
        "  steps: [dept_manager, security_lead]\n"
        '  hours: "00:00-23:59"\n',
    )
    site.config.write_text(text)
    now = datetime.now(UTC).replace(microsecond=0)
    for m in range(1, 4):
        write_segment(site.root, "cam1", now - timedelta(hours=2, minutes=m))
    e = Engine(load_config(str(site.config)), clock=clock)
    e.reconcile(full=True)
    yield e
    e.catalog.close()


def _new(engine: Engine) -> int:
    now = datetime.now(UTC)
    req = dispatch(
        Context(engine),
        ALICE,
        "request.new",
        {
            "cameras": "cam1",
            "from": (now - timedelta(hours=2, minutes=4)).isoformat(),
            "to": (now - timedelta(hours=2)).isoformat(),
            "reason": "a fight at the gate",
            "basis": "police request 9",
            "recipient": {"unit": "City police", "person": "Officer Li", "contact": "010"},
        },
    )
    return int(req["id"])


def _call(engine: Engine, who: Caller, cmd: str, **args: Any) -> Any:
    return dispatch(Context(engine), who, cmd, args)


def test_a_decision_shows_at_once_in_every_kept_answer(engine: Engine) -> None:
    rid = _new(engine)
    waiting = _call(engine, BOB, "request.list", waiting=True, limit=50)
    assert [r["id"] for r in waiting] == [rid]
    assert _call(engine, BOB, "request.show", id=rid)["may_decide"] is True
    assert [r["id"] for r in _call(engine, BOB, "status")["open_requests"]["pending"]] == [rid]
    # the same questions again: the same answers, not computed again (a lookup, no lock)
    assert _call(engine, BOB, "request.list", waiting=True, limit=50) is waiting
    _call(engine, BOB, "request.approve", id=rid, note="ok")
    # bob's step is done: nothing waits for him any more, in any answer he gets
    assert _call(engine, BOB, "request.list", waiting=True, limit=50) == []
    assert _call(engine, BOB, "request.show", id=rid)["may_decide"] is False
    assert [r["id"] for r in _call(engine, CAROL, "request.list", waiting=True, limit=50)] == [rid]
    _call(engine, CAROL, "request.approve", id=rid, note="ok")
    assert _call(engine, BOB, "request.show", id=rid)["state"] == "approved"
    assert _call(engine, BOB, "status")["open_requests"]["pending"] == []


def test_a_hold_placed_shows_in_the_next_status(engine: Engine) -> None:
    before = _call(engine, Caller(0, "root"), "status")["holds"]
    now = datetime.now(UTC)
    _call(
        engine,
        Caller(0, "root"),
        "hold.add",
        camera="cam1",
        **{
            "from": (now - timedelta(hours=3)).isoformat(),
            "to": (now - timedelta(hours=1)).isoformat(),
        },
        reason="case 12",
    )
    after = _call(engine, Caller(0, "root"), "status")["holds"]
    assert len(after) == len(before) + 1


def test_answers_are_made_again_when_time_alone_has_passed(engine: Engine, clock: SetClock) -> None:
    rid = _new(engine)
    first = _call(engine, BOB, "request.show", id=rid)
    assert _call(engine, BOB, "request.show", id=rid) is first
    clock.wall += STATUS_FRESH  # as old as an answer may be: made again
    again = _call(engine, BOB, "request.show", id=rid)
    assert again is not first and again == first
    # the approval deadline passed meanwhile: the state said is the state now
    clock.wall += 30 * 86400
    assert _call(engine, BOB, "request.show", id=rid)["state"] != "pending"


def test_a_refusal_is_never_kept_each_one_is_recorded(engine: Engine) -> None:
    rid = _new(engine)
    dave = Caller(60004, "dave")  # another operator: alice's request is not his to see
    for _ in range(2):
        with pytest.raises(PolicyRefused):
            _call(engine, dave, "request.show", id=rid)
    assert len([e for e in engine.audit.entries() if e.actor == "dave"]) == 2


def test_status_while_a_sweep_holds_the_lock_is_the_last_one_said_to_be_so(
    engine: Engine,
) -> None:
    made = _call(engine, BOB, "status")
    listed = _call(engine, BOB, "request.list", limit=50)
    holding, release = threading.Event(), threading.Event()

    def long_sweep() -> None:
        with engine._doing("a retention sweep (by root)"), engine.lock:
            holding.set()
            release.wait(30)

    t = threading.Thread(target=long_sweep, daemon=True)
    t.start()
    try:
        assert holding.wait(10)
        st = _call(engine, BOB, "status")
        assert st["busy"]["doing"] == "a retention sweep (by root)"
        assert st["busy"]["status_from"] == made["time"]
        assert st["sites"] == made["sites"]
        # the requests people browse are answered from what was kept, without the lock
        got: list[Any] = []
        asking = threading.Thread(
            target=lambda: got.append(_call(engine, BOB, "request.list", limit=50)), daemon=True
        )
        asking.start()
        asking.join(10)
        assert got == [listed], "request.list waited for the lock the sweep holds"
    finally:
        release.set()
        t.join(10)
    assert "busy" not in _call(engine, BOB, "status")


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    return th, out


def _holding(engine: Engine, what: str | None) -> tuple[threading.Event, threading.Thread]:
    """A thread holding the engine lock (as a sweep, with ``what``; else as any command) until
    the event returned is set."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        if what is None:
            with engine.lock:
                holding.set()
                release.wait(30)
        else:
            with engine._doing(what):
                holding.set()
                release.wait(30)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert holding.wait(10)
    return release, t


def _waits_for_the_lock(release: threading.Event, holder: threading.Thread, ask: Any) -> Any:
    """``ask()`` on a thread of its own: still waiting while ``holder`` holds the engine lock,
    answered once it lets go (``release``); its answer."""
    asking, got = _in_thread(ask)
    asking.join(max(1.0, STATUS_BUSY_WAIT * 20))  # many looks at whether a sweep holds it
    try:
        assert asking.is_alive() and got == [], "answered while the lock was held"
    finally:
        release.set()
        holder.join(10)
    asking.join(10)
    assert got, "not answered once the lock was free"
    return got[0]


def test_an_answer_past_its_time_is_given_while_a_sweep_holds_the_lock(
    engine: Engine, clock: SetClock
) -> None:
    rid = _new(engine)
    shown = _call(engine, BOB, "request.show", id=rid)
    clock.wall += STATUS_FRESH + 1  # would be made again, but the engine is busy
    release, holder = _holding(engine, "a retention sweep (by root)")
    asking, got = _in_thread(lambda: _call(engine, BOB, "request.show", id=rid))
    asking.join(10)
    if got != [shown]:
        release.set()
    assert got == [shown], "the kept answer was not given while the lock was held"
    # a question never answered before is answered from the workflow's index, which no write
    # made out of date: at once, as it is answered once the lock is free
    asking, got = _in_thread(lambda: _call(engine, CAROL, "request.show", id=rid))
    asking.join(10)
    if not got:
        release.set()
    assert got and got[0]["id"] == rid
    # a refusal must be recorded: it waits for the lock
    dave = Caller(60004, "dave")

    def refused() -> str:
        try:
            _call(engine, dave, "request.show", id=rid)
        except PolicyRefused as exc:
            return str(exc)
        return "shown"

    assert _waits_for_the_lock(release, holder, refused) != "shown"
    assert [e.action for e in engine.audit.entries() if e.actor == "dave"] == ["access.denied"]
    assert _call(engine, CAROL, "request.show", id=rid) == got[0]


def test_status_lists_as_many_holds_as_asked_and_says_how_many_there_are(
    engine: Engine,
) -> None:
    root = Caller(0, "root")
    now = datetime.now(UTC)
    for i in range(3):
        _call(
            engine,
            root,
            "hold.add",
            camera="cam1",
            reason=f"case {i}",
            **{
                "from": (now - timedelta(hours=3)).isoformat(),
                "to": (now - timedelta(hours=1)).isoformat(),
            },
        )
    whole = _call(engine, root, "status")
    assert whole["holds_total"] == len(whole["holds"]) == 3
    some = _call(engine, root, "status", holds_limit=2)
    assert some["holds_total"] == 3 and some["holds"] == whole["holds"][:2]
    # the kept status is not cut for the next one who asks for all of it
    assert len(_call(engine, root, "status")["holds"]) == 3
    for bad in (-1, "2", 1.5):
        with pytest.raises(InvalidInput, match="holds_limit"):
            _call(engine, root, "status", holds_limit=bad)


def test_status_counts_new_footage_and_a_sweep_at_once_and_not_other_writes(
    engine: Engine, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Caller(0, "root")
    before = _call(engine, root, "status")["sites"]["toll"]["segments"]
    now = datetime.now(UTC)
    old = write_segment(site.root, "cam1", now - timedelta(days=20))  # past keep=15d
    for m in range(6):
        write_segment(site.root, "cam1", now - timedelta(minutes=30 + m))
    engine.reconcile(full=False)
    assert _call(engine, root, "status")["sites"]["toll"]["segments"] == before + 7
    assert engine.sweep(actor="root").deleted == 1 and not old.exists()
    assert _call(engine, root, "status")["sites"]["toll"]["segments"] == before + 6
    # an audit entry (any write but segment rows) does not make it count the rows again
    counted: list[str] = []
    real = engine.catalog.site_stats
    monkeypatch.setattr(engine.catalog, "site_stats", lambda s: counted.append(s) or real(s))
    engine.audit.append("root", "note", "test", {})
    assert _call(engine, root, "status")["sites"]["toll"]["segments"] == before + 6
    assert counted == []


def test_a_status_kept_from_before_a_decision_says_the_decision_during_a_sweep(
    engine: Engine,
) -> None:
    rid = _new(engine)
    other = _new(engine)
    root = Caller(0, "root")
    assert [r["id"] for r in _call(engine, BOB, "status")["open_requests"]["pending"]] == [
        rid,
        other,
    ]
    holds = len(_call(engine, root, "status")["holds"])
    _call(engine, ALICE, "request.cancel", id=rid)  # after bob's status was made
    hold = _call(  # and root's
        engine,
        root,
        "hold.add",
        camera="cam1",
        **{"from": "2026-01-01T00:00:00", "to": "2026-01-01T01:00:00"},
        reason="case 12",
    )
    # the sweep makes what status says of requests and holds for everyone as it begins: the
    # status kept from before is given at once, with the requests and holds of now
    release, holder = _holding(engine, "a retention sweep (by root)")
    try:
        st, st_root = _call(engine, BOB, "status"), _call(engine, root, "status")
    finally:
        release.set()
        holder.join(10)
    assert [r["id"] for r in st["open_requests"]["pending"]] == [other]
    assert st["requests"]["cancelled"] == 1 and st["busy"]["doing"].startswith("a retention")
    assert len(st_root["holds"]) == holds + 1 and hold["id"] in [h["id"] for h in st_root["holds"]]
    after = _call(engine, BOB, "status")
    assert "busy" not in after
    for key in ("open_requests", "requests", "holds", "violations", "violations_not_shown"):
        assert st[key] == after[key], key


def test_a_status_kept_from_before_a_decision_is_not_given_when_none_is_made_since(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _new(engine)
    assert [r["id"] for r in _call(engine, BOB, "status")["open_requests"]["pending"]] == [rid]
    _call(engine, ALICE, "request.cancel", id=rid)  # after bob's status was made
    monkeypatch.setattr(engine, "prepare_status", lambda: None)  # as if it could not be made
    release, holder = _holding(engine, "a retention sweep (by root)")
    # not the status from before the cancel: it waits, then says what stands now
    st = _waits_for_the_lock(release, holder, lambda: _call(engine, BOB, "status"))
    assert st["open_requests"]["pending"] == [] and "busy" not in st


def test_a_status_given_during_a_sweep_has_the_attention_entries_of_now(
    engine: Engine,
) -> None:
    root = Caller(0, "root")
    assert _call(engine, root, "status")["ok"] is True
    engine.attention.raise_("root_missing", "toll", "/srv/x", "root /srv/x is missing")
    release, holder = _holding(engine, "a retention sweep (by root)")
    try:
        st = _call(engine, root, "status")
    finally:
        release.set()
        holder.join(10)
    assert st["busy"]["doing"] == "a retention sweep (by root)"
    assert st["ok"] is False and [a["kind"] for a in st["attention"]] == ["root_missing"]


def test_an_answer_past_its_time_waits_behind_anything_but_a_sweep(
    engine: Engine, clock: SetClock
) -> None:
    rid = _new(engine)
    _call(engine, BOB, "status")
    clock.wall += STATUS_FRESH + 1
    release, holder = _holding(engine, None)  # an ordinary command, not a sweep
    # a request is read from the workflow's index meanwhile (no write since: it is current)
    assert _call(engine, BOB, "request.show", id=rid)["id"] == rid
    status = _waits_for_the_lock(release, holder, lambda: _call(engine, BOB, "status"))
    assert [r["id"] for r in status["open_requests"]["pending"]] == [rid]


def test_what_is_kept_is_bounded_by_the_requests_in_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nvr_guard.engine as engine_module

    for _ in range(4):
        _new(engine)
    monkeypatch.setattr(engine_module, "MEMO_WEIGHT", 6)
    monkeypatch.setattr(engine_module, "MEMO_ONE_MAX", 3)
    for before in range(100, 140):  # 40 different questions, 3 requests in each answer
        assert len(_call(engine, BOB, "request.list", limit=3, before=before)) == 3
        assert engine._memo_weight <= 6
    assert sum(v[2] for v in engine._read_memo.values()) == engine._memo_weight
    # an answer heavier than MEMO_ONE_MAX is made and given, never kept
    everything = _call(engine, BOB, "request.list")
    assert len(everything) == 4
    assert all(v[1] is not everything for v in engine._read_memo.values())


def test_a_list_read_for_ones_own_requests_only_shows_what_the_full_walk_shows(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # people whose roles show nobody else's requests get a list read in SQL for their own (and
    # those they decided on); it must be exactly what checking every request gives
    from nvr_guard.model import Approval

    rids = [_new(engine) for _ in range(3)]
    wf = engine.workflow
    dave = Caller(60004, "dave")
    # dave decided on one of alice's requests once (when he held a step's role)
    wf.store.add_approval(rids[1], Approval("dave", "dept_manager", "approve", "", 1.0))
    people = [ALICE, BOB, CAROL, dave, Caller(0, "root")]
    narrowed = {p.user: wf._only_own(wf.actor(p), wf.index.current()) for p in people}
    assert narrowed == {"alice": "alice", "bob": None, "carol": None, "dave": "dave", "root": None}
    args = [(None, False, 50, None), (None, True, 50, None), ("pending", False, None, None)]
    fast = {(p.user, a): [r["id"] for r in wf.list(p, *a)] for p in people for a in args}
    monkeypatch.setattr(type(wf), "_only_own", lambda self, actor, snap: None)
    walked = {(p.user, a): [r["id"] for r in wf.list(p, *a)] for p in people for a in args}
    assert fast == walked
    assert fast[("dave", (None, False, 50, None))] == [rids[1]]
    assert sorted(fast[("alice", (None, False, 50, None))]) == rids


# ---- every request parsed once (workflow.index) --------------------------------------------


def _same_snapshots(engine: Engine) -> None:
    """The index as kept (read again where it changed) is the index read whole."""
    from nvr_guard.workflow.index import RequestIndex

    wf = engine.workflow
    kept = wf.index.current()
    whole = RequestIndex(wf.ctx.catalog, wf.store, lambda: wf.config, wf._judge, wf.memo).current()
    assert kept.ids == whole.ids and kept.open_ids == whole.open_ids
    for rid, e in whole.entries.items():
        k = kept.entries[rid]
        assert (k.r, k.extra, k.approvals, k.judged, k.acting, k.deciders, k.people) == (
            e.r,
            e.extra,
            e.approvals,
            e.judged,
            e.acting,
            e.deciders,
            e.people,
        ), rid


def test_the_index_read_where_it_changed_is_the_index_read_whole(
    engine: Engine, clock: SetClock
) -> None:
    wf = engine.workflow
    rids = [_new(engine) for _ in range(4)]
    _same_snapshots(engine)
    first = wf.index.current()
    assert wf.index.current() is first  # nothing written: the same snapshot
    _call(engine, BOB, "request.approve", id=rids[0], note="ok")
    _same_snapshots(engine)
    assert wf.index.current() is not first
    assert wf.index.current().entries[rids[0]].deciders != first.entries[rids[0]].deciders
    _call(engine, CAROL, "request.approve", id=rids[0], note="ok")
    _call(engine, BOB, "request.deny", id=rids[1], reason="not enough basis")
    _call(engine, ALICE, "request.cancel", id=rids[2])
    _same_snapshots(engine)
    seen = {rid: e.r.state for rid, e in wf.index.current().entries.items()}
    states = ["approved", "denied", "cancelled", "pending"]
    assert seen == dict(zip(rids, states, strict=True))
    # time alone settles the open ones (expired): written by refresh, so read again
    clock.wall += 60 * 86400
    wf.refresh()
    _same_snapshots(engine)
    assert {e.r.state for e in wf.index.current().entries.values()} >= {"expired"}
    assert wf.index.current().open_ids == ()


def test_an_index_whose_writes_the_log_no_longer_holds_is_read_whole(engine: Engine) -> None:
    import collections

    wf = engine.workflow
    rids = [_new(engine) for _ in range(2)]
    before = wf.index.current()
    engine.catalog._request_log = collections.deque(engine.catalog._request_log, maxlen=1)
    _call(engine, BOB, "request.approve", id=rids[0], note="ok")  # one write: the approval
    assert engine.catalog.requests_written_since(before.version) == {rids[0]}
    _call(engine, BOB, "request.approve", id=rids[1], note="ok")
    assert engine.catalog.requests_written_since(before.version) is None
    _same_snapshots(engine)
    assert [wf.index.current().entries[r].approvals[0].approver for r in rids] == ["bob", "bob"]


def test_a_snapshot_made_inside_a_transaction_is_not_kept(engine: Engine) -> None:
    wf = engine.workflow
    rid = _new(engine)
    wf.index.current()

    class Undo(Exception):
        pass

    with pytest.raises(Undo), engine.catalog.transaction():
        wf.store.update(rid, state="cancelled")
        # what this transaction sees, for this one question
        assert wf.index.current().entries[rid].r.state == "cancelled"
        raise Undo
    assert wf.index.current().entries[rid].r.state == "pending"
    _same_snapshots(engine)


def test_a_waiting_list_leaves_out_only_what_no_one_of_those_roles_may_decide(
    engine: Engine,
) -> None:
    # the waiting list skips requests none of whose open steps (nor the after-hours role) the
    # person holds, without judging them: it must list exactly what judging every one lists
    from nvr_guard.workflow import access

    rids = [_new(engine) for _ in range(5)]
    _call(engine, BOB, "request.approve", id=rids[0], note="ok")
    _call(engine, BOB, "request.approve", id=rids[1], note="ok")
    _call(engine, CAROL, "request.approve", id=rids[1], note="ok")
    _call(engine, BOB, "request.deny", id=rids[2], reason="no")
    wf = engine.workflow
    erin = Caller(60005, "erin")  # the after-hours role: may add to any open request
    engine.config.people.users["erin"] = engine.config.people.users["bob"].model_copy(
        update={"roles": ["duty_manager"]}
    )
    engine.config.people.users["frank"] = engine.config.people.users["bob"].model_copy(
        update={"roles": ["dept_manager", "security_lead"]}
    )
    frank = Caller(60006, "frank")
    now = wf.now()
    snap = wf.index.current()
    for who in (ALICE, BOB, CAROL, erin, frank, Caller(0, "root")):
        actor = wf.actor(who)
        judged = sorted(
            (
                rid
                for rid, e in snap.entries.items()
                if e.acting is not None
                and e.r.state in ("pending", "approved")
                and access.check_view(e.r, e.approvals, actor, e.acting).allowed
                and access.check_approve(e.r, e.approvals, actor, e.acting, now).allowed
            ),
            reverse=True,
        )
        assert [r["id"] for r in wf.list(who, None, waiting=True, limit=50)] == judged, who
    assert [r["id"] for r in wf.list(frank, None, waiting=True, limit=50)] == [
        rids[4],
        rids[3],
        rids[0],
    ]


def test_the_audit_log_is_read_beside_a_transaction_and_shows_what_was_committed(
    engine: Engine,
) -> None:
    rid = _new(engine)
    auditor = Caller(0, "root")
    before = _call(engine, auditor, "audit.show", request=rid)["entries"]
    assert [e["action"] for e in before] == ["request.new"]
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def write() -> None:
        # a long transaction on the shared connection, as a purge's receipts
        with engine.lock, engine.audit.recording():
            engine.audit.append("root", "request.note", f"request:{rid}", {"note": "pending"})
            holding.set()
            release.wait(30)
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    assert holding.wait(10)
    try:
        asking, got = _in_thread(lambda: _call(engine, auditor, "audit.show", request=rid))
        asking.join(10)
        assert got, "audit.show waited for the transaction"
        assert [e["action"] for e in got[0]["entries"]] == ["request.new"]  # not uncommitted
    finally:
        release.set()
        t.join(10)
    assert done.is_set()
    after = _call(engine, auditor, "audit.show", request=rid)["entries"]
    assert [e["action"] for e in after] == ["request.new", "request.note"]


def test_a_status_during_a_sweep_for_someone_who_never_asked_is_their_own(
    engine: Engine,
) -> None:
    rid = _new(engine)
    dave = Caller(60004, "dave")  # another operator: alice's request is not his to see
    _call(engine, BOB, "status")  # only bob asked before the sweep
    release, holder = _holding(engine, "a retention sweep (by root)")
    try:
        during = {who.user: _call(engine, who, "status") for who in (ALICE, dave)}
    finally:
        release.set()
        holder.join(10)
    assert [r["id"] for r in during["alice"]["open_requests"]["pending"]] == [rid]
    assert during["dave"]["open_requests"]["pending"] == []
    for who in (ALICE, dave):
        st, after = during[who.user], _call(engine, who, "status")
        assert st["busy"]["doing"] == "a retention sweep (by root)" and "busy" not in after
        for key in ("open_requests", "requests", "holds", "holds_not_shown", "violations"):
            assert st[key] == after[key], (who.user, key)


def test_an_answer_made_during_a_reload_is_not_kept_as_the_new_configs(
    engine: Engine, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a list or a request is answered without the engine lock from the workflow's copy of the
    # requests: one made while a reload is under way is the old config's, and must not be
    # given after it as the new one's (here bob, level 1, loses sight of a level-2 camera)
    text = site.config.read_text().replace(
        "    bob: {roles: [dept_manager], level: 2}\n",
        "    bob: {roles: [dept_manager], level: 1}\n",
    )
    assert "level: 1" in text
    site.config.write_text(text + "cameras:\n  cam1: {name: Gate, level: 1}\n")
    engine.apply_config(load_config(str(site.config)), "root")
    rid = _new(engine)
    assert [r["id"] for r in _call(engine, BOB, "request.list", limit=50)] == [rid]
    site.config.write_text(text + "cameras:\n  cam1: {name: Gate, level: 2}\n")
    new = load_config(str(site.config))
    inside, go = threading.Event(), threading.Event()
    real = engine.hold_problems

    def slow(config: Any) -> Any:  # a reload that checks many holds: it takes a while
        out = real(config)
        inside.set()
        go.wait(10)
        return out

    monkeypatch.setattr(engine, "hold_problems", slow)
    reload = threading.Thread(target=engine.apply_config, args=(new, "root"), daemon=True)
    reload.start()
    try:
        assert inside.wait(10)
        # still the old config in force: bob sees it, answered without waiting
        assert [r["id"] for r in _call(engine, BOB, "request.list", limit=50)] == [rid]
        assert _call(engine, BOB, "request.show", id=rid)["id"] == rid
    finally:
        go.set()
        reload.join(10)
    assert engine.config.cameras["cam1"].level == 2
    assert _call(engine, BOB, "request.list", limit=50) == []
    with pytest.raises(PolicyRefused):
        _call(engine, BOB, "request.show", id=rid)
    assert [e.action for e in engine.audit.entries() if e.actor == "bob"][-1] == "access.denied"


def test_requests_of_a_site_gone_from_the_config_do_not_stop_the_others(
    engine: Engine, site: Site, clock: SetClock
) -> None:
    # a site renamed with the same roots (its holds still find their footage): a reload or
    # `config check` refuses it while a request on it was never decided; a daemon started on
    # such a config (edited while it was stopped) judges everyone else's requests as before
    from nvr_guard.cli.config_cmd import _state_problems
    from nvr_guard.errors import ConfigError

    root = Caller(0, "root")
    undecided = _new(engine)
    decided = _new(engine)
    _call(engine, BOB, "request.approve", id=decided, note="ok")
    _call(engine, CAROL, "request.approve", id=decided, note="ok")
    text = site.config.read_text()
    assert "\n  toll:\n" in text
    site.config.write_text(text.replace("\n  toll:\n", "\n  toll2:\n"))
    renamed = load_config(str(site.config))
    why = f"request {undecided} (pending) is on site toll, which this config no longer has"
    with pytest.raises(ConfigError, match=re.escape(why)):
        engine.apply_config(renamed, "root")
    assert list(engine.config.sites) == ["toll"]  # the old one stays in force
    assert [why in m for _, _, m in _state_problems(renamed)] == [True]
    engine.catalog.close()
    started = Engine(renamed, clock=clock)
    try:
        started.workflow.refresh()  # judges the others, passes over the one it cannot judge

        def call(who: Caller, cmd: str, **args: Any) -> Any:
            return dispatch(Context(started), who, cmd, args)

        listed = {r["id"]: r["state"] for r in call(root, "request.list")}
        assert listed == {undecided: "pending", decided: "approved"}
        assert call(root, "status")["requests"]["pending"] == 1
        assert call(root, "request.show", id=decided)["state"] == "approved"
        # the one that cannot be judged says why to who sees every request (exit 3)
        with pytest.raises(PolicyRefused, match="no longer has"):
            call(root, "request.show", id=undecided)
        # and to its requester as any request not shown (nothing of the config), audited
        with pytest.raises(PolicyRefused) as refused:
            call(ALICE, "request.show", id=undecided)
        assert "toll" not in str(refused.value)
        assert [e.action for e in started.audit.entries() if e.actor == "alice"][-1] == (
            "access.denied"
        )
        assert call(ALICE, "request.list") == []  # only those who see every request
    finally:
        started.catalog.close()
