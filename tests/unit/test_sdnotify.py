"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvr_guard.daemon import sdnotify


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte sun_path limit; keep socket paths short.
    path = Path(tempfile.mkdtemp(prefix="nvrg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_systemd(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_watchdog_arrive_in_order(fake_systemd: socket.socket) -> None:
    assert sdnotify.ready()
    assert sdnotify.status("sweeping toll-station")
    assert sdnotify.watchdog()
    assert received(fake_systemd) == {"READY": "1"}
    assert received(fake_systemd) == {"STATUS": "sweeping toll-station"}
    assert received(fake_systemd) == {"WATCHDOG": "1"}


def test_ready_with_status_is_one_datagram(fake_systemd: socket.socket) -> None:
    assert sdnotify.ready("watching 4 sites")
    assert received(fake_systemd) == {"READY": "1", "STATUS": "watching 4 sites"}


def test_stopping(fake_systemd: socket.socket) -> None:
    assert sdnotify.stopping("stopping: SIGTERM")
    assert received(fake_systemd) == {"STOPPING": "1", "STATUS": "stopping: SIGTERM"}


def test_reloading_carries_monotonic_usec(fake_systemd: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = received(fake_systemd)
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_newline_in_status_cannot_forge_an_assignment(fake_systemd: socket.socket) -> None:
    assert sdnotify.status("camera gate\nREADY=1")
    assert received(fake_systemd) == {"STATUS": "camera gate READY=1"}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"nvr-guard-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.watchdog()
        assert received(sock) == {"WATCHDOG": "1"}


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234"])
def test_no_usable_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False


def test_vanished_socket_is_reported_not_raised(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone"))
    assert sdnotify.status("x") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("60000000", None, 60.0),
        ("60000000", "self", 60.0),
        ("60000000", "other", None),
        ("30000000", "self", 30.0),
        ("0", None, None),
        ("junk", None, None),
        ("60000000", "junk", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    elif pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    else:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() == expected


def test_a_manager_that_stops_reading_cannot_hold_the_daemon(
    fake_systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a datagram to a full queue blocks: each notification gives up after SEND_TIMEOUT, so a
    # status line sent while the engine's lock is held cannot wedge every job behind it
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 0.2)
    sent = dropped = 0
    t = time.monotonic()
    for _ in range(2000):  # far more than a unix datagram queue holds
        if sdnotify.status("x" * 200):
            sent += 1
        else:
            dropped += 1
            if dropped >= 3:
                break
    assert sent > 0 and dropped == 3
    assert time.monotonic() - t < 30  # returned, each drop after about 0.2 s
    assert received(fake_systemd) == {"STATUS": "x" * 200}  # what got through is intact
