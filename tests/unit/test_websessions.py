"""The daemon's table of web sessions and login failures, on an injected clock."""

from __future__ import annotations

import pytest

from nvr_guard.daemon.websessions import WebSessions


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> WebSessions:
    return WebSessions(idle=900, limit=3600, max_failures=3, lockout=600, clock=clock)


def test_a_session_is_found_by_its_token_only(table: WebSessions) -> None:
    token, s = table.open("alice", "192.0.2.1")
    assert table.resolve(token) is s
    assert table.resolve(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert s.sid != token and len(s.sid) == 64
    assert table.get(s.sid) is s


def test_tokens_and_csrf_tokens_are_distinct_and_long(table: WebSessions) -> None:
    seen = set()
    for _ in range(200):
        token, s = table.open("alice", "192.0.2.1")
        assert len(token) >= 43 and len(s.csrf) >= 43
        seen.update((token, s.csrf))
    assert len(seen) == 400


def test_idle_timeout_and_activity(table: WebSessions, clock: Clock) -> None:
    token, _ = table.open("alice", "192.0.2.1")
    clock.t += 899
    assert table.resolve(token) is not None  # activity restarts the idle timer
    clock.t += 899
    assert table.resolve(token) is not None
    clock.t += 901
    assert table.resolve(token) is None
    assert table.resolve(token) is None  # gone for good


def test_absolute_limit_however_active(table: WebSessions, clock: Clock) -> None:
    token, _ = table.open("alice", "192.0.2.1")
    for _ in range(7):
        clock.t += 500
        assert table.resolve(token) is not None
    clock.t += 200  # 3700 s after opening
    assert table.resolve(token) is None


def test_looking_without_touching_does_not_extend(table: WebSessions, clock: Clock) -> None:
    token, s = table.open("alice", "192.0.2.1")
    clock.t += 800
    assert table.get(s.sid) is not None
    clock.t += 200
    assert table.get(s.sid) is None


def test_close_ends_only_that_session(table: WebSessions) -> None:
    a, _ = table.open("alice", "192.0.2.1")
    b, _ = table.open("bob", "192.0.2.2")
    assert table.close(a) is not None
    assert table.resolve(a) is None and table.resolve(b) is not None
    assert table.close(a) is None


def test_lockout_by_name_from_every_address(table: WebSessions, clock: Clock) -> None:
    assert table.failed("alice", "192.0.2.1") is False
    assert table.failed("alice", "192.0.2.2") is False
    assert table.failed("alice", "192.0.2.3") is True
    what, left = table.locked("alice", "198.51.100.9") or ("", 0.0)
    assert what == "user" and 0 < left <= 600
    assert table.locked("bob", "198.51.100.9") is None
    clock.t += 601
    assert table.locked("alice", "198.51.100.9") is None


def test_lockout_by_address_for_every_name(table: WebSessions) -> None:
    for name in ("root", "admin", "guest"):
        table.failed(name, "192.0.2.1")
    assert table.locked("carol", "192.0.2.1") == ("client", pytest.approx(600))
    assert table.locked("carol", "192.0.2.2") is None


def test_failures_older_than_the_window_start_again(table: WebSessions, clock: Clock) -> None:
    table.failed("alice", "192.0.2.1")
    table.failed("alice", "192.0.2.1")
    clock.t += 601
    assert table.failed("alice", "192.0.2.1") is False  # the old two no longer count


def test_success_clears_the_counts(table: WebSessions) -> None:
    table.failed("alice", "192.0.2.1")
    table.failed("alice", "192.0.2.1")
    table.succeeded("alice", "192.0.2.1")
    assert table.failed("alice", "192.0.2.1") is False


def test_new_limits_apply_to_open_sessions(table: WebSessions, clock: Clock) -> None:
    token, _ = table.open("alice", "192.0.2.1")
    table.configure(idle=60, limit=3600, max_failures=3, lockout=600)
    clock.t += 61
    assert table.resolve(token) is None
