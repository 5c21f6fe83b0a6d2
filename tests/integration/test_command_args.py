"""Every control command's arguments are checked by one typed model before any handler runs:
malformed values of any field, unknown or missing fields get exit 2 and a one-line message, and
the daemon logs no traceback (issue: ``recipient: "x"`` reached an AttributeError, exit 1).

The malformed values are derived from each command's JSON schema, so a command added to
``nvr_guard.daemon.commands.ARGS`` is fuzzed without touching this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from nvr_guard.daemon.commands import ARGS, COMMANDS, validate
from nvr_guard.errors import InvalidInput
from tests.fixtures.frames import raw_call
from tests.fixtures.site import Site, poll

# one valid argument set per command (valid in form; the handler may still refuse the content)
VALID: dict[str, dict[str, Any]] = {
    "status": {},
    "reload": {},
    "request.new": {
        "cameras": "cam1",
        "from": "2026-01-01T00:00",
        "to": "2026-01-01T01:00",
        "reason": "r",
        "basis": "b",
        "recipient": {"unit": "u", "person": "p", "contact": "c"},
        "format": "mp4",
        "emergency": False,
        "encrypt": "passphrase",
    },
    "request.list": {"state": "pending"},
    "request.show": {"id": 1},
    "request.approve": {"id": 1, "note": "n", "as_step": "dept_manager", "mask": "0,0,0.1,0.1"},
    "request.deny": {"id": 1, "reason": "r"},
    "request.cancel": {"id": 1},
    "request.resolve": {"id": 1, "reason": "r"},
    "export.run": {"id": 1, "media": "/nonexistent"},
    "export.progress": {"id": 1},
    "export.form": {"id": 1},
    "export.destroy": {"id": 1, "reason": "r"},
    "view.prepare": {"id": 1},
    "view.open": {"id": 1},
    "preview.frames": {"id": 1},
    "media.list": {},
    "media.enroll": {"media": "x", "label": "l"},
    "media.remove": {"media": "x", "reason": "r"},
    "media.scan": {"media": "x"},
    "media.scan_progress": {"media": "x"},
    "media.wipe": {"media": "x", "confirm": "x"},
    "retention.run": {"now": None, "dry_run": True, "summary": True},
    "retention.plan": {
        "now": "2026-01-01T00:00",
        "site": "toll",
        "config_digest": "ab12",
        "rescan": False,
        "summary": True,
    },
    "retention.confirm": {"sweep": 1, "summary": False},
    "retention.confirm_root": {"site": "a", "root": "/srv/x"},
    "hold.add": {
        "camera": "cam1",
        "from": "2026-01-01T00:00",
        "to": "2026-01-01T01:00",
        "reason": "r",
        "until": None,
        "site": None,
    },
    "hold.list": {"all": False},
    "hold.release": {"id": 1, "reason": "r"},
    "key.show": {},
    "audit.show": {"since": "1h", "request": 1},
    "audit.verify": {},
    "auth.begin": {"user": "alice", "client": "192.0.2.1"},
    "auth.finish": {"user": "alice", "client": "192.0.2.1", "ok": False, "reason": "bad password"},
    "web.session": {},
    "web.logout": {},
    "notify.events": {"after": 0, "limit": 10},
    "notify.ack": {"upto": 0},
    "notify.report": {"seq": 1, "channel": "mail:alice", "ok": False, "error": "e"},
}


def test_every_command_has_a_model_and_a_valid_example() -> None:
    assert set(VALID) == set(ARGS)
    for cmd, args in VALID.items():
        validate(cmd, args)  # raises when the example is not valid
    # and the daemon dispatches no command that has no model: it dispatches from the table
    dispatched = set(COMMANDS)
    assert dispatched <= set(ARGS), dispatched - set(ARGS)
    assert all(issubclass(COMMANDS[c].args, BaseModel) for c in dispatched)


_JSON_KINDS = {
    "string": st.text(max_size=5),
    "integer": st.integers(-5, 5),
    "number": st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
    "boolean": st.booleans(),
    "null": st.none(),
    "array": st.lists(st.integers(), max_size=2),
    "object": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
}


def _kinds(prop: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    if "$ref" in prop:
        return [defs[prop["$ref"].rsplit("/", 1)[1]]]
    return prop.get("anyOf", [prop])


def _bad_values(prop: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values no alternative of the field's schema accepts."""
    alts = _kinds(prop, defs)
    allowed = {a.get("type") for a in alts}
    if "integer" in allowed:
        allowed.add("number")  # 1.0 would be a "number" pydantic may coerce; keep clear of it
    wrong_type = st.one_of(*[s for k, s in _JSON_KINDS.items() if k not in allowed])
    options = [wrong_type]
    for a in alts:
        if a.get("type") == "string":
            if "maxLength" in a:
                options.append(st.just("x" * (a["maxLength"] + 1)))
            if "enum" in a:
                options.append(st.text(max_size=8).filter(lambda s, e=a["enum"]: s not in e))
            else:
                options.append(st.just("a\x00b"))
        if a.get("type") == "integer":
            if "minimum" in a:
                options.append(st.integers(max_value=a["minimum"] - 1, min_value=-(2**70)))
            if "maximum" in a:
                options.append(st.integers(min_value=a["maximum"] + 1, max_value=2**70))
            options.append(st.text(alphabet="0123456789", min_size=1, max_size=3))
        if a.get("type") == "object":
            options.append(st.just({"unexpected": "field"}))
    return st.one_of(*options)


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    cmd = draw(st.sampled_from(sorted(ARGS)))
    schema = ARGS[cmd].model_json_schema(by_alias=True)
    props, defs = schema.get("properties", {}), schema.get("$defs", {})
    args = dict(VALID[cmd])
    how = draw(st.sampled_from(["bad value", "unknown field", "missing field", "not a dict"]))
    required = schema.get("required", [])
    if how == "bad value" and props:
        field = draw(st.sampled_from(sorted(props)))
        args[field] = draw(_bad_values(props[field], defs))
    elif how == "missing field" and required:
        del args[draw(st.sampled_from(required))]
    elif how == "not a dict":
        return cmd, draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=4)))
    else:
        args[draw(st.sampled_from(["x", "id2", "actor", "uid"]))] = 1
    return cmd, args


@given(malformed())
@settings(max_examples=400, deadline=None)
def test_malformed_arguments_are_refused_in_process(case: tuple[str, dict[str, Any]]) -> None:
    cmd, args = case
    with pytest.raises(InvalidInput) as info:
        validate(cmd, args)
    assert "\n" not in str(info.value) and str(info.value).startswith(cmd)


# ---- the same through a live daemon -------------------------------------------------------


class _Live:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.log_path = site.base / "daemon.log"
        self.logf = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
        )
        poll(self._ready, 60, "the daemon to answer")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            r = raw_call(self.site.socket, {"v": 1, "cmd": "ping", "args": {}})
        except OSError:
            return False
        return r is not None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.logf.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Live]:
    base = tmp_path_factory.mktemp("cmd-args")
    root = base / "rec"
    root.mkdir()
    s = Site(base, root, base / "config.yaml", base / "state", base / "run" / "c.sock")
    s.write_config(sweep_every="1h")
    d = _Live(s)
    yield d
    d.stop()


@given(case=malformed())
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_malformed_arguments_through_the_daemon_are_exit_2(
    live: _Live, case: tuple[str, dict[str, Any]]
) -> None:
    cmd, args = case
    reply = raw_call(live.site.socket, {"v": 1, "cmd": cmd, "args": args})
    assert reply is not None and reply["ok"] is False, (cmd, args, reply)
    assert reply["error"]["code"] == 2, (cmd, args, reply)
    assert "\n" not in reply["error"]["message"]


def test_the_daemon_logged_no_traceback(live: _Live) -> None:
    # after the fuzzing above (same module daemon): bad input is never an internal error
    reply = raw_call(live.site.socket, {"v": 1, "cmd": "request.new", "args": {"recipient": "x"}})
    assert reply is not None and reply["error"]["code"] == 2
    text = live.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    assert os.path.getsize(live.log_path) > 0
