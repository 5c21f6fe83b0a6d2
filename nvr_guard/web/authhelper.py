"""The password check of the web console (``nvr-guard web-auth``): one login per connection.

The web process never sees a password hash and cannot open a session by itself: it hands the
person's name, password and address to this helper over a Unix socket, and the helper (its own
account, ``web.auth_user``, in group ``shadow`` so that pam_unix reads ``/etc/shadow``) asks the
daemon whether the name or address is locked, runs PAM, and tells the daemon the verdict; only
then does the daemon open a session, whose token goes back to the web process.

Wire format, both ways: a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one
object (as on the control socket). The request is ``{"user", "password", "client"}``, at most
``MAX_FRAME`` bytes, complete within ``READ_WITHIN`` seconds. One request per connection; one
reply, then the helper closes:

* ``{"ok": true, "session", "csrf", "user", "expires_in"}`` — logged in;
* ``{"ok": false, "locked": bool, "message"}`` — wrong name or password (``locked``: this failure
  locked the name or the address), or PAM refused the account;
* ``{"ok": false, "locked": true, "retry_after": N, "message"}`` — locked: refused before PAM ran,
  so a locked name answers a right password exactly as a wrong one;
* ``{"ok": false, "message"}`` — the daemon refused (e.g. no role in ``people:``);
* ``{"ok": false, "unavailable": true, "message"}`` — the daemon could not be asked;
* ``{"ok": false, "invalid": true, "message"}`` — a malformed request (exit 2).

The password is never logged or put in a reply or an error message. It is held in a bytearray and
a C buffer that are overwritten once PAM has answered; the ``str`` the JSON parser makes cannot
be overwritten (Python strings are immutable), so the process ends soon after (``Accept=yes``:
one process per login; ``--listen`` forks one per connection as well).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvr_guard.errors import DaemonUnavailable, NvrGuardError
from nvr_guard.wire import ControlClient

log = logging.getLogger(__name__)

SERVICE = "nvr-guard"  # the PAM service: /etc/pam.d/nvr-guard
MAX_FRAME = 4096
READ_WITHIN = 10.0  # seconds for the whole request frame
MAX_PASSWORD = 1024  # bytes (UTF-8)
DAEMON_TIMEOUT = 20.0
# the daemon's LoginName: Unix names and directory names (user@realm, DOMAIN\\user)
_USER = re.compile(r"[A-Za-z0-9._@$\\-]{1,64}")
_HEADER = struct.Struct(">I")
_WRONG = "wrong user name or password"

# exit codes of one connection (the CLI's contract: 2 invalid input, 3 refused, 1 failure)
EXIT_OK = 0  # the person got a verdict (logged in, wrong password, locked)
EXIT_FAILURE = 1  # the daemon could not be asked
EXIT_INVALID = 2  # a malformed request
EXIT_REFUSED = 3  # the daemon refused a step (no role; the helper is not web.auth_user)


class BadRequest(Exception):
    """The request frame is malformed; ``str()`` is the one-line reason (never the password)."""


@dataclass
class LoginRequest:
    """One login attempt; ``password`` is overwritten by :meth:`wipe`."""

    user: str
    client: str
    password: bytearray

    def wipe(self) -> None:
        """Overwrite the password's bytes."""
        for i in range(len(self.password)):
            self.password[i] = 0
        del self.password[:]


# ---- framing -----------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, buf: bytearray, n: int, deadline: float) -> None:
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(f"the request did not arrive within {READ_WITHIN:g} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise BadRequest(f"the request did not arrive within {READ_WITHIN:g} s") from None
        if not chunk:
            raise BadRequest("the connection closed before the request was complete")
        buf += chunk


def read_frame(
    sock: socket.socket, limit: int = MAX_FRAME, within: float = READ_WITHIN
) -> bytearray:
    """One frame's body; BadRequest when it is larger than ``limit`` or late."""
    deadline = time.monotonic() + within
    head = bytearray()
    _recv_exact(sock, head, _HEADER.size, deadline)
    (length,) = _HEADER.unpack(head)
    if length > limit:
        raise BadRequest(f"request of {length} bytes; at most {limit} are accepted")
    body = bytearray()
    _recv_exact(sock, body, length, deadline)
    return body


def encode_frame(obj: dict[str, Any]) -> bytes:
    """``obj`` as one frame."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEADER.pack(len(body)) + body


def parse_request(body: bytearray) -> LoginRequest:
    """The login request in ``body`` (which is overwritten); BadRequest when malformed."""
    try:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request is not a UTF-8 JSON object") from None
    finally:
        for i in range(len(body)):
            body[i] = 0
    if not isinstance(doc, dict):
        raise BadRequest("the request is not a JSON object")
    keys = set(doc)
    if keys != {"user", "password", "client"}:
        missing = sorted({"user", "password", "client"} - keys)
        extra = sorted(k[:32] for k in keys - {"user", "password", "client"})
        raise BadRequest(
            "the request needs exactly user, password and client"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unknown: {', '.join(extra)}" if extra else "")
        )
    user, client, password = doc["user"], doc["client"], doc.pop("password")
    del doc
    if not isinstance(password, str):
        raise BadRequest("password: not a string")
    secret = bytearray(password.encode("utf-8", "surrogatepass"))
    del password
    try:
        if not secret:
            raise BadRequest("password: empty")
        if len(secret) > MAX_PASSWORD:
            raise BadRequest(f"password: longer than {MAX_PASSWORD} bytes")
        if 0 in secret:
            raise BadRequest("password: contains a NUL character")
        if not isinstance(user, str) or not _USER.fullmatch(user):
            raise BadRequest("user: 1-64 characters of letters, digits and . _ @ $ \\ - expected")
        if not isinstance(client, str) or len(client) > 64:
            raise BadRequest("client: an IP address expected")
        try:
            addr = ipaddress.ip_address(client)
        except ValueError:
            raise BadRequest("client: an IP address expected") from None
    except BadRequest:
        LoginRequest("", "", secret).wipe()
        raise
    return LoginRequest(user, str(addr), secret)


# ---- PAM -----------------------------------------------------------------------------------------
# Linux-PAM through ctypes. python-pam's authenticate() sets no PAM_RHOST before
# pam_authenticate, always calls pam_setcred, and keeps the password as immutable bytes; this
# conversation answers one hidden prompt from a buffer that is overwritten afterwards.

PAM_SUCCESS = 0
PAM_BUF_ERR = 5
PAM_CONV_ERR = 19
PAM_RHOST = 4
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
PAM_PROMPT_ECHO_OFF = 1


class _PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _PamResponse(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_ConvFunc = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_PamMessage)),
    ctypes.POINTER(ctypes.POINTER(_PamResponse)),
    ctypes.c_void_p,
)


class _PamConv(ctypes.Structure):
    _fields_ = [("conv", _ConvFunc), ("appdata_ptr", ctypes.c_void_p)]


class _Libs:
    """libpam and libc, loaded on first use."""

    _loaded: tuple[Any, Any] | None = None

    @classmethod
    def get(cls) -> tuple[Any, Any]:
        if cls._loaded is None:
            pam = ctypes.CDLL(ctypes.util.find_library("pam") or "libpam.so.0")
            libc = ctypes.CDLL(None)
            libc.calloc.restype = ctypes.c_void_p
            libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
            libc.free.restype = None
            libc.free.argtypes = [ctypes.c_void_p]
            pam.pam_start.restype = ctypes.c_int
            pam.pam_start.argtypes = [
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.POINTER(_PamConv),
                ctypes.POINTER(ctypes.c_void_p),
            ]
            for name in ("pam_authenticate", "pam_acct_mgmt", "pam_end"):
                getattr(pam, name).restype = ctypes.c_int
                getattr(pam, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
            pam.pam_set_item.restype = ctypes.c_int
            pam.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            pam.pam_strerror.restype = ctypes.c_char_p
            pam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
            cls._loaded = (pam, libc)
        return cls._loaded


@dataclass
class PamVerdict:
    """What PAM said: ``ok``; ``stage`` (``auth`` or ``account``) and its reason when not."""

    ok: bool
    stage: str
    reason: str


def pam_check(req: LoginRequest, service: str = SERVICE) -> PamVerdict:
    """Run PAM ``service`` for ``req``: authenticate, then account management."""
    pam, libc = _Libs.get()
    secret = ctypes.create_string_buffer(bytes(req.password), len(req.password) + 1)
    answered = [False]

    def conv(n: int, msgs: Any, resp_out: Any, _data: Any) -> int:
        if n <= 0 or n > 32:
            return PAM_CONV_ERR
        addr = libc.calloc(n, ctypes.sizeof(_PamResponse))
        if not addr:
            return PAM_BUF_ERR
        resp = ctypes.cast(addr, ctypes.POINTER(_PamResponse))
        for i in range(n):
            if msgs[i].contents.msg_style != PAM_PROMPT_ECHO_OFF:
                continue  # information and errors need no answer; a visible prompt gets none
            if answered[0]:
                # a second hidden prompt (a one-time code, say): this helper has one secret only
                for j in range(i):
                    if resp[j].resp:
                        libc.free(resp[j].resp)
                libc.free(addr)
                return PAM_CONV_ERR
            size = len(req.password) + 1
            buf = libc.calloc(size, 1)
            if not buf:
                libc.free(addr)
                return PAM_BUF_ERR
            ctypes.memmove(buf, secret, size - 1)
            resp[i].resp = buf  # PAM's modules overwrite and free it
            answered[0] = True
        resp_out[0] = resp
        return PAM_SUCCESS

    callback = _ConvFunc(conv)
    conversation = _PamConv(callback, None)
    handle = ctypes.c_void_p()
    try:
        rc = pam.pam_start(
            service.encode(), req.user.encode(), ctypes.byref(conversation), ctypes.byref(handle)
        )
        if rc != PAM_SUCCESS or not handle:
            return PamVerdict(False, "start", f"pam_start failed ({rc})")
        stage = "auth"
        try:
            # who asked from where: pam_faillock, pam_access and the journal see the address
            pam.pam_set_item(handle, PAM_RHOST, ctypes.c_char_p(req.client.encode()))
            flags = PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK
            rc = pam.pam_authenticate(handle, flags)
            if rc == PAM_SUCCESS:
                stage = "account"
                rc = pam.pam_acct_mgmt(handle, flags)
            reason = (pam.pam_strerror(handle, rc) or b"").decode("utf-8", "replace")
            return PamVerdict(rc == PAM_SUCCESS, stage, reason)
        finally:
            pam.pam_end(handle, rc)
    finally:
        ctypes.memset(secret, 0, len(secret))


# ---- one connection ------------------------------------------------------------------------------

Checker = Callable[[LoginRequest], PamVerdict]


def login(
    req: LoginRequest, control_socket: Path, check: Checker = pam_check
) -> tuple[dict[str, Any], int]:
    """The reply to one well-formed request and the exit code: asks the daemon, runs PAM."""
    who = f"{req.user} from {req.client}"
    started = time.monotonic()
    try:
        # one short connection per question: none is held open while PAM runs (a PAM check
        # takes seconds; held connections of many guesses filled the helper's slots at the
        # daemon and turned everyone else's login away)
        with ControlClient(control_socket, DAEMON_TIMEOUT) as daemon:
            begin = daemon.call("auth.begin", {"user": req.user, "client": req.client})
        if not begin.get("allowed"):
            req.wipe()
            log.warning("login of %s refused unchecked: locked", who)
            return {
                "ok": False,
                "locked": True,
                "retry_after": int(begin.get("retry_after") or 1),
                "message": str(begin.get("message") or "too many failed logins"),
            }, EXIT_OK
        try:
            verdict = check(req)
        finally:
            req.wipe()
        reason = verdict.reason if verdict.ok else f"{verdict.stage}: {verdict.reason}"
        with ControlClient(control_socket, DAEMON_TIMEOUT) as daemon:
            done = daemon.call(
                "auth.finish",
                {"user": req.user, "client": req.client, "ok": verdict.ok, "reason": reason[:200]},
            )
    except DaemonUnavailable as e:
        log.error("login of %s: the daemon cannot be asked: %s", who, e)
        return {"ok": False, "unavailable": True, "message": f"login is unavailable: {e}"}, (
            EXIT_FAILURE
        )
    except NvrGuardError as e:
        # the daemon refused a right password (no role in people:): the person is told what
        # a wrong password tells, as late as a wrong password is told, so the login page does
        # not confirm the passwords of the host's other accounts (the reason is on record)
        log.warning("login of %s refused by the daemon: %s", who, e)
        _pad(started)
        code = EXIT_REFUSED if e.exit_code == EXIT_REFUSED else EXIT_FAILURE
        return {"ok": False, "message": _WRONG}, code
    finally:
        req.wipe()
    if verdict.ok and done.get("ok"):
        log.info("login of %s: session opened", who)
        return {
            "ok": True,
            "session": done["session"],
            "csrf": done["csrf"],
            "user": done["user"],
            "expires_in": done["expires_in"],
        }, EXIT_OK
    log.warning("login of %s failed (%s)", who, reason)
    # an account PAM refuses after a right password (expired, locked by the admin) is told no
    # more than a wrong password is: the reason is in the daemon's record (auth.failed)
    _pad(started)
    return {"ok": False, "locked": bool(done.get("locked")), "message": _WRONG}, EXIT_OK


#: a refusal is never answered sooner than this after the request (pam_unix's own delay after
#: a wrong password): how fast the answer comes must not tell a right password from a wrong one
FAIL_TIME = 2.0


def _pad(started: float) -> None:
    left = FAIL_TIME - (time.monotonic() - started)
    if left > 0:
        time.sleep(left)


def serve(sock: socket.socket, control_socket: Path, check: Checker = pam_check) -> int:
    """Serve one connection: read the request, reply, close; the exit code."""
    try:
        try:
            req = parse_request(read_frame(sock))
        except BadRequest as e:
            log.warning("web-auth: refused a malformed request: %s", e)
            _reply(sock, {"ok": False, "invalid": True, "message": str(e)})
            return EXIT_INVALID
        reply, code = login(req, control_socket, check)
        _reply(sock, reply)
        return code
    except Exception as e:  # never a traceback to the peer: one line, then the log has it
        log.exception("web-auth: internal error")
        _reply(sock, {"ok": False, "message": f"internal error ({type(e).__name__})"})
        return EXIT_FAILURE
    finally:
        sock.close()


def _reply(sock: socket.socket, obj: dict[str, Any]) -> None:
    try:
        sock.settimeout(READ_WITHIN)
        sock.sendall(encode_frame(obj))
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:  # the peer left, or stopped reading
        log.info("web-auth: the reply could not be sent: %s", e)
        return
    # what the peer sent beyond the request (the rest of an oversized one) is read and dropped
    # before closing: closing with unread data resets the connection, and the peer could lose
    # the reply
    deadline = time.monotonic() + 1.0
    dropped = 0
    try:
        while dropped < 1 << 20 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            dropped += len(chunk)
    except OSError:
        pass
