"""sd_notify(3) without libsystemd: tell systemd we are ready, alive, reloading or stopping.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a filesystem path, or an abstract name written with a leading ``@``).
When the variable is unset (run by hand, in tests, under another supervisor) every call is a
no-op, so the daemon never needs to know whether systemd is watching.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of "@".
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd also accepts vsock addresses ("vsock:CID:PORT"); a plain NVR host never gets one,
    # and guessing would send our state somewhere unexpected, so ignore anything else.
    return None


def _format(fields: dict[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            # A newline would start a new assignment: STATUS text from a file name must not be
            # able to forge READY=1 or MAINPID=.
            text = text.replace("\n", " ")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


#: seconds a notification may wait for room in the manager's queue before it is dropped
SEND_TIMEOUT = 2.0


def notify(**fields: object) -> bool:
    """Send ``KEY=VALUE`` assignments to systemd; ``notify(READY=1, STATUS="up")``.

    Returns True when a datagram was sent, False when there is no notify socket or sending
    failed. A failure is logged, never raised: losing a status line must not stop the daemon.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or not fields:
        return False
    address = _address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", raw)
        return False
    payload = _format(fields)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # bounded: a datagram to a full queue blocks, and a notifier that stopped reading
            # (a hung manager, a test harness) must not hold the thread that reports — with the
            # engine's lock, every job and command behind it
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1 (Type=notify: systemd considers the start finished only now)."""
    if status_text is None:
        return notify(READY=1)
    return notify(READY=1, STATUS=status_text)


def status(text: str) -> bool:
    """Free-form status line shown by ``systemctl status``."""
    return notify(STATUS=text)


def watchdog() -> bool:
    """WATCHDOG=1: keep-alive ping; must arrive within WatchdogSec or systemd restarts us."""
    return notify(WATCHDOG=1)


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: a clean shutdown has begun (no watchdog kill while we finish up)."""
    if status_text is None:
        return notify(STOPPING=1)
    return notify(STOPPING=1, STATUS=status_text)


def reloading(status_text: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC, as systemd >= 253 expects for Type=notify-reload.

    Older systemd ignores MONOTONIC_USEC; sending it always keeps one code path. The caller
    sends ``ready()`` again once the new config is in force (or the old one kept).
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    if status_text is None:
        return notify(RELOADING=1, MONOTONIC_USEC=usec)
    return notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status_text)


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds if systemd asked *this* process for pings, else None.

    WATCHDOG_PID guards against a child inheriting the environment and believing it must ping.
    Callers should ping at about half the interval.
    """
    raw_usec = os.environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = os.environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000
