"""The command table run in-process: the access rules that every way in shares (the daemon's
socket, the CLI's local mode for root, a future gateway), and the one ``Caller`` type.

Through a real daemon the same rules are covered by test_hostile, test_authority and
test_retention_cli; these tests pin the table itself, fast and without a subprocess.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from nvr_guard.config import load_config
from nvr_guard.daemon.commands import COMMANDS, Context, dispatch
from nvr_guard.engine import Engine
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.identity import Caller
from tests.fixtures.site import Site, make_config, write_segment

NOBODY_UID = 54321  # no passwd entry on the test host
AUDITOR = Caller(10_001, "aud")


@pytest.fixture
def engine(site: Site) -> Iterator[Engine]:
    text = make_config(site).replace(
        "  users: {root: {roles: [admin]}}\n",
        "  users: {root: {roles: [admin]}, aud: {roles: [auditor]}, op: {roles: [operator]}}\n",
    )
    site.config.write_text(text)
    e = Engine(load_config(str(site.config)))
    yield e
    e.catalog.close()


def _denials(engine: Engine) -> list[Any]:
    return list(engine.audit.entries(action="access.denied"))


def test_every_command_has_a_handler_with_a_docstring() -> None:
    for name, command in COMMANDS.items():
        assert command.name == name
        doc = (command.handler.__doc__ or "").strip()
        assert doc, f"{name}: handler {command.handler.__name__} has no docstring"


def test_a_caller_without_a_role_is_refused_and_recorded(engine: Engine) -> None:
    stranger = Caller(NOBODY_UID, f"uid:{NOBODY_UID}")
    with pytest.raises(PolicyRefused) as info:
        dispatch(Context(engine), stranger, "hold.list", {"all": False})
    assert str(info.value) == (
        f"uid:{NOBODY_UID} (uid {NOBODY_UID}) has no role in {engine.config.source_path}; "
        "an admin adds people under `people:`"
    )
    [entry] = _denials(engine)
    assert (entry.actor, entry.object, entry.details) == (
        f"uid:{NOBODY_UID}",
        "hold.list",
        {"uid": NOBODY_UID},
    )


def test_status_and_key_show_need_no_role(engine: Engine) -> None:
    stranger = Caller(NOBODY_UID, f"uid:{NOBODY_UID}")
    st = dispatch(
        Context(engine, started=0.0, last_error=lambda: "sweep: disk gone"), stranger, "status", {}
    )
    assert st["daemon"]["last_error"] == "sweep: disk gone" and st["ok"] is False
    key = dispatch(Context(engine), stranger, "key.show", {})
    assert key["fingerprint"].startswith("SHA256:")
    assert _denials(engine) == []


def test_bad_input_is_refused_before_any_access_check(engine: Engine) -> None:
    stranger = Caller(NOBODY_UID, f"uid:{NOBODY_UID}")
    with pytest.raises(InvalidInput, match="unknown command 'hold.frob'"):
        dispatch(Context(engine), stranger, "hold.frob", {})
    with pytest.raises(InvalidInput, match=r"^hold.release: invalid arguments: id: "):
        dispatch(Context(engine), stranger, "hold.release", {"id": "1", "reason": "r"})
    assert _denials(engine) == []  # exit 2, nothing on record as an access attempt


def test_a_role_the_table_names_is_checked_and_recorded(engine: Engine) -> None:
    with pytest.raises(PolicyRefused, match="aud may not run a retention sweep"):
        dispatch(Context(engine), AUDITOR, "retention.run", {"dry_run": True})
    [entry] = _denials(engine)
    assert entry.object == "run a retention sweep" and entry.details["needs"] == ["admin"]
    # the auditor's own commands are served
    assert "entries" in dispatch(Context(engine), AUDITOR, "audit.show", {"since": "1h"})


def test_now_is_refused_through_the_daemon_even_for_root_and_allowed_locally(
    engine: Engine,
) -> None:
    root = Caller(0, "root")
    args = {"now": "2h", "dry_run": False}
    with pytest.raises(PolicyRefused, match="always runs at the real time"):
        dispatch(Context(engine), root, "retention.run", args)
    [entry] = _denials(engine)
    assert entry.object == "retention.run" and entry.details["now"] == "2h"
    assert engine.catalog.conn.execute("SELECT count(*) FROM sweeps").fetchone()[0] == 0
    # root acting locally (no daemon) previews the future with the same handler
    res = dispatch(Context(engine, local=True), root, "retention.run", args)
    assert res["sweep"] is not None
    assert engine.catalog.conn.execute("SELECT count(*) FROM sweeps").fetchone()[0] == 1


def test_retention_plan_is_served_by_role_at_any_now_and_changes_nothing(
    engine: Engine, site: Site, now: datetime
) -> None:
    due = write_segment(site.root, "cam1", now - timedelta(days=20))
    for i in range(5):  # enough young footage to keep the plan under the mass-deletion guard
        write_segment(site.root, "cam1", now - timedelta(days=1, minutes=i))
    engine.reconcile(full=True)
    sweeps = "SELECT count(*) FROM sweeps"
    operator = Caller(10_002, "op")
    with pytest.raises(PolicyRefused, match="op may not see the retention plan"):
        dispatch(Context(engine), operator, "retention.plan", {})
    [entry] = _denials(engine)
    assert entry.details["needs"] == ["admin", "auditor", "security_lead"]
    # an auditor previews, through the daemon, a time the daemon's own sweeps never see
    ahead = (now + timedelta(days=1)).isoformat()
    plan = dispatch(Context(engine), AUDITOR, "retention.plan", {"now": ahead})
    assert [i["path"] for i in plan["items"] if i["action"] == "delete"] == [str(due)]
    assert plan["deleted"] == 0 and plan["sweep"] is None
    assert due.exists() and engine.catalog.conn.execute(sweeps).fetchone()[0] == 0
    # a plan is of the config in force: another file's digest is refused, not answered
    with pytest.raises(InvalidInput, match="not the one in force"):
        dispatch(Context(engine), AUDITOR, "retention.plan", {"config_digest": "0" * 64})
    mine = {"config_digest": engine.config.digest, "site": "toll"}
    assert dispatch(Context(engine), AUDITOR, "retention.plan", mine)["items"]
    with pytest.raises(InvalidInput, match="unknown site 'gate'"):
        dispatch(Context(engine), AUDITOR, "retention.plan", {"site": "gate"})


def test_root_plans_locally_without_an_engine(site: Site, now: datetime) -> None:
    # `retention plan` run by root: the handler on the config alone (no daemon, no state lock)
    due = write_segment(site.root, "cam1", now - timedelta(days=20))
    ctx = Context(None, local=True, config=load_config(str(site.config)))
    plan = dispatch(ctx, Caller(0, "root"), "retention.plan", {})
    # the only footage, so the first-sweep guard holds it: judged all the same
    assert [(i["path"], i["action"]) for i in plan["items"]] == [(str(due), "blocked")]
    assert due.exists() and not (site.state / "catalog.db").exists()


def test_reload_runs_for_the_daemons_own_uid_without_a_role(engine: Engine) -> None:
    actors: list[str] = []

    def reload(actor: str) -> dict[str, Any]:
        actors.append(actor)
        return {"applied": True}

    ctx = Context(engine, reload=reload, service_uid=4242)
    assert dispatch(ctx, Caller(4242, "nvr-guard"), "reload", {}) == {"applied": True}
    assert actors == ["nvr-guard"]
    with pytest.raises(PolicyRefused, match="has no role"):
        dispatch(ctx, Caller(4243, "someone"), "reload", {})
    with pytest.raises(PolicyRefused, match="aud may not reload the config"):
        dispatch(ctx, AUDITOR, "reload", {})
    assert actors == ["nvr-guard"]


# ---- the one Caller type ------------------------------------------------------------------------


def test_a_uid_without_an_account_is_named_by_number_and_has_no_groups() -> None:
    with pytest.raises(KeyError):
        pwd.getpwuid(NOBODY_UID)
    c = Caller.from_ids(pid=1, uid=NOBODY_UID, gid=0)  # even with a named gid (root's)
    assert (c.user, c.name, c.groups) == (f"uid:{NOBODY_UID}", f"uid:{NOBODY_UID}", frozenset())
    assert c.describe() == f"uid:{NOBODY_UID} (uid {NOBODY_UID}, pid 1)"


def test_groups_are_names_and_nameless_gids_are_left_out() -> None:
    nameless = 54322
    with pytest.raises(KeyError):
        grp.getgrgid(nameless)
    assert "root" in Caller.from_ids(pid=1, uid=0, gid=0).groups
    # connected with a gid that has no name: its groups are the named ones among root's
    c = Caller.from_ids(pid=1, uid=0, gid=nameless)
    named = set()
    for g in os.getgrouplist("root", nameless):
        try:
            named.add(grp.getgrgid(g).gr_name)
        except KeyError:
            pass
    assert c.groups == named
    assert not any(g.startswith("gid:") or g == str(nameless) for g in c.groups)
    assert Caller.from_uid(0, nameless).groups == c.groups


def test_the_local_user_and_hand_made_callers() -> None:
    me = Caller.local()
    assert me.uid == os.getuid() and me.user == pwd.getpwuid(os.getuid()).pw_name
    assert grp.getgrgid(pwd.getpwuid(os.getuid()).pw_gid).gr_name in me.groups
    # made by hand with a tuple (as tests and tools do): one type of groups inside
    assert Caller(10_000, "tom", ("b", "a")).groups == frozenset({"a", "b"})
