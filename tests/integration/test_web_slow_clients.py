"""Slow and many clients cannot keep people out of the console: the connection deadlines and
the per-address cap of nvr_guard/web/guard.py, on a real uvicorn server with real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from nvr_guard.web.guard import GuardedH11Protocol
from tests.fixtures.site import poll
from tests.fixtures.webconsole import free_port

pytestmark = pytest.mark.integration


async def hello(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(GuardedH11Protocol, "header_timeout", 1.0)
    monkeypatch.setattr(GuardedH11Protocol, "body_timeout", 1.0)
    monkeypatch.setattr(GuardedH11Protocol, "per_client", 20)
    port = free_port()
    app = Starlette(routes=[Route("/", hello, methods=["GET", "POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=GuardedH11Protocol,
        log_level="warning",
        limit_concurrency=500,
    )
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    poll(lambda: srv.started, 20, "the server")
    try:
        yield port
    finally:
        srv.should_exit = True
        t.join(10)


def closed(s: socket.socket) -> bool:
    """Whether the server closed ``s`` (whatever it answered first is read and dropped)."""
    s.settimeout(0.05)
    try:
        while True:
            if s.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_client_that_never_finishes_its_headers_is_cut_off(server: int) -> None:
    s = socket.create_connection(("127.0.0.1", server))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    poll(lambda: closed(s), 10, "the slow client to be cut off")
    silent = socket.create_connection(("127.0.0.1", server))
    poll(lambda: closed(silent), 10, "the silent client to be cut off")


def test_a_body_that_never_arrives_is_cut_off(server: int) -> None:
    s = socket.create_connection(("127.0.0.1", server))
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    poll(lambda: closed(s), 10, "the trickled body to be cut off")


def test_a_kept_alive_connection_must_send_its_next_request_in_time(server: int) -> None:
    s = socket.create_connection(("127.0.0.1", server))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(5)
    assert b"200 OK" in s.recv(4096)
    s.sendall(b"GET / HTT")  # then nothing
    poll(lambda: closed(s), 10, "the stalled second request to be cut off")


def test_one_address_cannot_take_every_connection(server: int) -> None:
    held = [socket.create_connection(("127.0.0.1", server)) for _ in range(20)]
    extra = socket.create_connection(("127.0.0.1", server))
    poll(lambda: closed(extra), 5, "the 21st connection from one address to be refused")
    for s in held:
        s.close()
    # the slots come back once they are closed
    poll(
        lambda: httpx.get(f"http://127.0.0.1:{server}/", timeout=2).status_code == 200,
        10,
        "a fresh request to be served",
    )


def test_people_are_served_while_slow_clients_come_and_go(server: int) -> None:
    stop = threading.Event()

    def slow() -> None:
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", server))
                s.sendall(b"GET / HTTP/1.1\r\n")
                stop.wait(0.5)
                s.close()
            except OSError:
                stop.wait(0.1)

    threads = [threading.Thread(target=slow) for _ in range(15)]
    for t in threads:
        t.start()
    try:
        ok = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = httpx.get(f"http://127.0.0.1:{server}/", timeout=5)
            ok += r.status_code == 200
        assert ok > 0
    finally:
        stop.set()
        for t in threads:
            t.join()
