"""Delivery of notifications: the web service's side (the daemon has no network).

A :class:`Notifier` thread asks the daemon for events (``notify.events``, as the gateway
account), sends one e-mail per recipient with an address through ``notify.smtp`` and one signed
JSON POST per event to ``notify.webhook``, retries each failed delivery with capped exponential
back-off, reports every outcome (``notify.report``) and moves the daemon's cursor
(``notify.ack``) once every event up to it is delivered or given up. A delivery still failing
``notify.retry_for`` after its first attempt is given up: the daemon audits ``notify.failed``
and raises the attention entry ``notify_failed``. Nothing here blocks the workflow: the daemon
records decisions whether or not anyone hears of them.

Webhook signature: ``X-Nvr-Guard-Signature: sha256=<hex>``, the HMAC-SHA256 keyed with the
bytes of ``notify.webhook.secret_file`` over ``<X-Nvr-Guard-Timestamp>.<body>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import smtplib
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Protocol

from nvr_guard.config import Config

log = logging.getLogger("nvr_guard.web.notify")

SIGNATURE_HEADER = "X-Nvr-Guard-Signature"
TIMESTAMP_HEADER = "X-Nvr-Guard-Timestamp"
EVENT_HEADER = "X-Nvr-Guard-Event"
MAX_PENDING = 2000  # events held in memory; beyond it the next fetch waits


class Client(Protocol):
    """What the notifier needs of a control connection (``ControlClient``)."""

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...

    def __enter__(self) -> Client: ...

    def __exit__(self, *exc: object) -> None: ...


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Nvr-Guard-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver checks (constant-time), given the headers and the raw body."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class _Delivery:
    channel: str  # "mail:<user>" or "webhook"
    attempts: int = 0
    first: float | None = None  # monotonic time of the first attempt
    next_at: float = 0.0
    error: str = ""
    outcome: bool | None = None  # True delivered, False given up, None still trying
    reported: bool = False


@dataclass
class _Event:
    doc: dict[str, Any]
    deliveries: list[_Delivery] = field(default_factory=list)

    @property
    def seq(self) -> int:
        return int(self.doc["seq"])

    def done(self) -> bool:
        return all(d.reported for d in self.deliveries)


class Notifier:
    """The web service's delivery thread: ``start()``, ``stop()``, ``status()``."""

    def __init__(
        self,
        config: Config,
        client_factory: Callable[[], Client],
        *,
        poll_interval: float = 15.0,
        backoff: float = 10.0,
        backoff_cap: float = 600.0,
        timeout: float = 20.0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.client_factory = client_factory
        self.poll_interval = poll_interval
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        # verified TLS for STARTTLS and https webhooks (system CAs unless a context is given)
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, _Event] = {}
        self._next: int | None = None  # the audit seq to fetch after (None: the daemon's cursor)
        self._acked: int | None = None
        self._sent = 0
        self._failed = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None  # wall time
        self._last_poll: float | None = None  # wall time

    # ---- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Run the delivery loop in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (a delivery under way finishes or times out first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def poke(self) -> None:
        """Look for new events now instead of at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # never let the loop die: the next poll tries again
                self._error(f"{type(exc).__name__}: {exc}")
                log.warning("notifications: %s", exc, exc_info=not _expected(exc))
            self._wake.wait(self._sleep())
            self._wake.clear()

    def _sleep(self) -> float:
        with self._lock:
            due = [
                d.next_at
                for ev in self._pending.values()
                for d in ev.deliveries
                if d.outcome is None
            ]
        wait = self.poll_interval
        if due:
            wait = min(wait, max(0.0, min(due) - self.clock()))
        return max(0.05, wait)

    # ---- one pass ------------------------------------------------------------------------------
    def run_once(self) -> None:
        """Fetch new events, attempt what is due, report outcomes, move the cursor."""
        with self.client_factory() as client:
            self._fetch(client)
            self._attempt_due()
            self._report(client)
            self._ack(client)
        self._last_poll = time.time()

    def _fetch(self, client: Client) -> None:
        while len(self._pending) < MAX_PENDING and not self._stop.is_set():
            args: dict[str, Any] = {"limit": 100}
            if self._next is not None:
                args["after"] = self._next
            res = client.call("notify.events", args)
            if self._acked is None:
                self._acked = int(res["cursor"])
            with self._lock:
                for doc in res["events"]:
                    seq = int(doc["seq"])
                    if seq not in self._pending:
                        self._pending[seq] = _Event(doc, self._deliveries(doc))
            self._next = int(res["next"])
            if not res.get("more"):
                return

    def _deliveries(self, doc: dict[str, Any]) -> list[_Delivery]:
        notify = self.config.notify
        channels: list[str] = []
        if notify.smtp is not None:
            channels += [f"mail:{r['user']}" for r in doc["recipients"] if r.get("email")]
        if notify.webhook is not None:
            channels.append("webhook")
        done = set(doc.get("done") or ())
        return [_Delivery(ch) for ch in channels if ch not in done]

    def _attempt_due(self) -> None:
        retry_for = float(self.config.notify.retry_for.seconds)
        with self._lock:
            events = sorted(self._pending.values(), key=lambda e: e.seq)
        for ev in events:
            for d in ev.deliveries:
                if self._stop.is_set():
                    return
                now = self.clock()
                if d.outcome is not None or d.next_at > now:
                    continue
                if d.first is None:
                    d.first = now
                d.attempts += 1
                try:
                    self._deliver(ev.doc, d.channel)
                except Exception as exc:
                    d.error = _describe(exc)
                    self._error(f"{d.channel} for request {ev.doc['request']}: {d.error}")
                    now = self.clock()
                    if now - d.first >= retry_for:
                        d.outcome = False
                        log.error(
                            "notification %s (%s) given up after %d attempts: %s",
                            ev.seq,
                            d.channel,
                            d.attempts,
                            d.error,
                        )
                        with self._lock:
                            self._failed += 1
                    else:
                        delay = min(self.backoff_cap, self.backoff * 2 ** (d.attempts - 1))
                        d.next_at = now + min(delay, max(0.0, d.first + retry_for - now))
                        log.warning(
                            "notification %s (%s) failed (attempt %d), again in %.0f s: %s",
                            ev.seq,
                            d.channel,
                            d.attempts,
                            d.next_at - now,
                            d.error,
                        )
                else:
                    d.outcome = True
                    with self._lock:
                        self._sent += 1

    def _report(self, client: Client) -> None:
        with self._lock:
            events = list(self._pending.values())
        for ev in events:
            for d in ev.deliveries:
                if d.outcome is None or d.reported:
                    continue
                client.call(
                    "notify.report",
                    {"seq": ev.seq, "channel": d.channel, "ok": d.outcome, "error": d.error[:4000]},
                )
                d.reported = True

    def _ack(self, client: Client) -> None:
        if self._next is None:
            return
        with self._lock:
            open_ = [ev.seq for ev in self._pending.values() if not ev.done()]
            for seq in [s for s, ev in self._pending.items() if ev.done()]:
                del self._pending[seq]
        upto = min(open_) - 1 if open_ else self._next
        if self._acked is None or upto > self._acked:
            res = client.call("notify.ack", {"upto": upto})
            self._acked = int(res["cursor"])

    # ---- channels ------------------------------------------------------------------------------
    def _deliver(self, doc: dict[str, Any], channel: str) -> None:
        if channel == "webhook":
            self._post(doc)
            return
        user = channel.split(":", 1)[1]
        email = next((r["email"] for r in doc["recipients"] if r["user"] == user), None)
        if not email:
            raise RuntimeError(f"no address for {user}")
        self._mail(doc, str(email))

    def link(self, doc: dict[str, Any]) -> str | None:
        """The page of the event's request, when ``web.url`` says where the console is."""
        web = self.config.web
        if web is None or not web.url:
            return None
        return str(web.url).rstrip("/") + str(doc["path"])

    def _mail(self, doc: dict[str, Any], to: str) -> None:
        smtp = self.config.notify.smtp
        assert smtp is not None
        msg = EmailMessage()
        msg["From"] = smtp.sender
        msg["To"] = to
        msg["Subject"] = str(doc["subject"])
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or None)
        body = str(doc["text"])
        url = self.link(doc)
        if url:
            body += f"\n\n{url}"
        msg.set_content(body + "\n", charset="utf-8")
        with smtplib.SMTP(timeout=self.timeout) as s, _deadline(lambda: s.sock, self.timeout * 3):
            s.connect(smtp.host, smtp.port)
            s.ehlo()
            if smtp.starttls:
                s.starttls(context=self.ssl_context)
                s.ehlo()
            if smtp.username and smtp.password_file:
                password = Path(smtp.password_file).read_text().strip()
                s.login(smtp.username, password)
            s.send_message(msg)

    def webhook_body(self, doc: dict[str, Any]) -> bytes:
        """The JSON a webhook receives for an event (recipients by name only, no addresses)."""
        out = {k: v for k, v in doc.items() if k not in ("recipients", "done")}
        out["recipients"] = [r["user"] for r in doc["recipients"]]
        out["url"] = self.link(doc)
        return json.dumps(out, ensure_ascii=False, sort_keys=True).encode()

    def _post(self, doc: dict[str, Any]) -> None:
        hook = self.config.notify.webhook
        assert hook is not None
        body = self.webhook_body(doc)
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "nvr-guard",
            EVENT_HEADER: str(doc["kind"]),
            TIMESTAMP_HEADER: ts,
        }
        if hook.secret_file:
            headers[SIGNATURE_HEADER] = sign(Path(hook.secret_file).read_bytes(), ts, body)
        url = urllib.parse.urlsplit(str(hook.url))
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=self.timeout, context=self.ssl_context
            )
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=self.timeout)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        # the whole exchange within the deadline, however slowly a receiver trickles its
        # answer (a timeout per read never ends a byte every few seconds); redirects are not
        # followed (a 3xx is a failure: the body goes nowhere else); the answer's body is
        # never read
        try:
            with _deadline(lambda: conn.sock, self.timeout):
                conn.request("POST", path, body=body, headers=headers)
                status = conn.getresponse().status
        finally:
            conn.close()
        if not 200 <= status < 300:
            raise RuntimeError(f"webhook answered HTTP {status}")

    # ---- status ----------------------------------------------------------------------------
    def _error(self, message: str) -> None:
        with self._lock:
            self._last_error = message
            self._last_error_at = time.time()

    def status(self) -> dict[str, Any]:
        """How delivery stands, for the console's /status page."""
        with self._lock:
            pending = sum(
                1 for ev in self._pending.values() for d in ev.deliveries if d.outcome is None
            )
            return {
                "running": self._thread is not None and self._thread.is_alive(),
                "sent": self._sent,
                "failed": self._failed,
                "pending": pending,
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
                "last_poll": self._last_poll,
                "cursor": self._acked,
                "smtp": self.config.notify.smtp is not None,
                "webhook": self.config.notify.webhook is not None,
            }


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        text = "; ".join(f"{k}: {c} {m!r}" for k, (c, m) in exc.recipients.items())
    return f"{type(exc).__name__}: {text}"[:1000]


def _expected(exc: BaseException) -> bool:
    return getattr(exc, "exit_code", None) is not None or isinstance(exc, OSError)


@contextlib.contextmanager
def _deadline(sock_of: Callable[[], socket.socket | None], seconds: float) -> Any:
    """Cut the connection (``sock_of()``) off when the block has not finished within
    ``seconds``: its blocked read or write then fails at once, and the delivery is a failure
    (retried later) instead of holding every other notification up."""
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        sock = sock_of()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as exc:  # a cut connection fails as a read error or a truncated answer
        if fired.is_set():
            raise TimeoutError(f"no complete answer within {seconds:g} s") from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise TimeoutError(f"no complete answer within {seconds:g} s")
