"""notify.* in the command table: served to the web gateway's own account only (not to an admin,
not to a person acting through the console), arguments fenced, the cursor only forward."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nvr_guard.config import load_config
from nvr_guard.daemon.commands import Context, dispatch
from nvr_guard.engine import Engine
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.identity import Caller
from tests.fixtures.site import Site, make_config

ADMIN = Caller(10_002, "adm")
GATEWAY = Caller(0, "root")  # web.gateway_user: root in this config


@pytest.fixture
def engine(site: Site) -> Iterator[Engine]:
    text = make_config(site).replace(
        "  users: {root: {roles: [admin]}}\n",
        "  users: {root: {roles: [admin]}, adm: {roles: [admin]}}\n",
    )
    text += "web: {listen: '127.0.0.1:8443', gateway_user: root}\n"
    site.config.write_text(text)
    e = Engine(load_config(str(site.config)))
    yield e
    e.catalog.close()


@pytest.mark.parametrize(
    ("cmd", "args"),
    [
        ("notify.events", {}),
        ("notify.ack", {"upto": 0}),
        ("notify.report", {"seq": 1, "channel": "webhook", "ok": True}),
    ],
)
def test_only_the_gateway_itself_is_served(engine: Engine, cmd: str, args: dict) -> None:
    person = Caller(0, "root", via="web", client="127.0.0.1", session="abc")
    for caller in (ADMIN, person):
        with pytest.raises(PolicyRefused, match="web console's own accounts"):
            dispatch(Context(engine), caller, cmd, args)
    denied = [e.actor for e in engine.audit.entries(action="access.denied")]
    assert denied == ["adm", "root"]


def test_the_cursor_moves_forward_only_and_not_past_the_head(engine: Engine) -> None:
    ctx = Context(engine)
    engine.audit.append("x", "daemon.start", "daemon", {})
    head, _ = engine.audit.head()
    res = dispatch(ctx, GATEWAY, "notify.events", {})
    assert (res["events"], res["next"], res["cursor"], res["more"]) == ([], head, 0, False)
    assert dispatch(ctx, GATEWAY, "notify.ack", {"upto": head}) == {"cursor": head}
    assert dispatch(ctx, GATEWAY, "notify.ack", {"upto": 0}) == {"cursor": head}
    with pytest.raises(InvalidInput, match="past the audit log's head"):
        dispatch(ctx, GATEWAY, "notify.ack", {"upto": head + 5})
    assert dispatch(ctx, GATEWAY, "notify.events", {})["cursor"] == head
    # an outcome at or before the cursor is stale: not recorded
    res = dispatch(ctx, GATEWAY, "notify.report", {"seq": head, "channel": "webhook", "ok": False})
    assert res == {"recorded": False}
    assert list(engine.audit.entries(action="notify.failed")) == []


@pytest.mark.parametrize(
    "args",
    [
        {"seq": 1, "channel": "sms", "ok": True},
        {"seq": 1, "channel": "mail:a b", "ok": True},
        {"seq": 0, "channel": "webhook", "ok": True},
        {"seq": 1, "channel": "webhook", "ok": "yes"},
    ],
)
def test_report_arguments_are_fenced(engine: Engine, args: dict) -> None:
    with pytest.raises(InvalidInput, match="notify.report: invalid arguments"):
        dispatch(Context(engine), GATEWAY, "notify.report", args)
