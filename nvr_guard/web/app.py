"""The console's pages: server-rendered HTML over the daemon's command table.

Every page asks the daemon, on behalf of the person whose session cookie came with the request,
exactly what the CLI would ask (``request.list``, ``request.approve``, ``audit.show`` ...); the
daemon applies its role checks and writes the audit log (``via: web``, the client's address).
What the console adds is only what a browser needs:

* the session cookie: the token the daemon issued at login, ``HttpOnly``, ``SameSite=Strict``,
  ``Secure`` (``__Host-`` prefix) unless served as plain HTTP on loopback; a cookie the daemon
  does not know is never adopted — a session exists only after a password check;
* a CSRF token on every form that changes anything (the daemon keeps it with the session; a
  POST without it is 403 before the daemon is asked to do anything);
* headers: a Content-Security-Policy that allows no script at all and styles only from the
  console's own style sheet, no framing, no referrer, no caching of pages;
* every text people wrote (reasons, notes, names) goes through Jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nvr_guard.config import Config
from nvr_guard.errors import (
    DaemonUnavailable,
    InvalidInput,
    NvrGuardError,
    PolicyRefused,
    SessionEnded,
)
from nvr_guard.web.gateway import Gateway
from nvr_guard.web.i18n import STATE_NAMES, pick, translator

log = logging.getLogger(__name__)

HERE = os.path.dirname(__file__)
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
AUDIT_ROLES = frozenset({"auditor", "security_lead", "admin"})
PAGE = 50  # requests per page
AUDIT_PAGE = 500  # audit entries shown at most
MAX_FORM = 64 * 1024
LoginFn = Callable[[str, str, str], Mapping[str, Any]]


# seconds the person of a session is known here without asking the daemon again (web.session):
# every page then makes one daemon call instead of two. Each call still carries the session,
# which the daemon checks (ended, idle, limit) before anything else, so an ended session is
# refused at its next call all the same; only the header's name and menus may be that old
ME_FRESH = 5.0
ME_KEPT = 4096  # sessions known at most (then forgotten all at once)


def _token_key(token: str) -> str:
    """How a session token is kept in memory here: its digest, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


# holds listed on the status page (the rest are counted: `nvr-guard hold list` has them all)
STATUS_HOLDS = 50


class SecurityHeaders:
    """Adds the console's security headers to every response (pages, files, errors)."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                ]
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", CSP.encode()))
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if self.tls:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass(frozen=True)
class Me:
    """The person behind this request's session."""

    token: str
    user: str
    roles: tuple[str, ...]
    level: int
    csrf: str

    @property
    def may_audit(self) -> bool:
        """May read the audit log (auditor, security_lead, admin)."""
        return bool(AUDIT_ROLES & set(self.roles))

    @property
    def is_admin(self) -> bool:
        """Holds the admin role."""
        return "admin" in self.roles


class Refused(Exception):
    """A page that ends in an error response (already rendered)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _safe_next(path: str | None) -> str:
    """A local path to return to (never another site: no scheme, no ``//``)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path[:512]


Page = Callable[..., Awaitable[Response]]


def _signed_in(page: Page) -> Page:
    """A page for the person of the request's session (else the login page or an error)."""

    @functools.wraps(page)
    async def wrapper(self: Console, request: Request, *args: Any) -> Response:
        try:
            me = await self.me(request)
        except Refused as refused:
            return refused.response
        return await page(self, request, me, *args)

    return wrapper


def _posted(page: Page) -> Page:
    """A form's target: the person's session, the form, and its CSRF token checked first."""

    @functools.wraps(page)
    async def wrapper(self: Console, request: Request, *args: Any) -> Response:
        try:
            me = await self.me(request)
            form = await self.form(request)
            self.check_csrf(request, me, form)
        except Refused as refused:
            return refused.response
        return await page(self, request, me, form, *args)

    return wrapper


class Console:
    """The web console: ``app`` is the ASGI application."""

    def __init__(
        self,
        config: Config,
        gateway: Gateway,
        login: LoginFn,
        *,
        secure: bool,
        notifier: Any = None,
    ) -> None:
        self.config = config
        self.gateway = gateway
        self.login_fn = login
        self.secure = secure
        self.notifier = notifier
        self.cookie = "__Host-nvr-guard" if secure else "nvr-guard-session"
        # sha256(token) -> (when, the person): see ``me``
        self._me: dict[str, tuple[float, Me]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")),
            autoescape=True,
        )
        routes = [
            Route("/healthz", self.healthz),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login_post, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/lang/{lang}", self.set_lang),
            Route("/", self.home),
            Route("/requests", self.requests, methods=["GET"]),
            Route("/requests", self.request_file, methods=["POST"]),
            Route("/requests/new", self.request_new),
            Route("/requests/{rid}", self.request_page),
            Route("/requests/{rid}/approve", self.approve, methods=["POST"]),
            Route("/requests/{rid}/deny", self.deny, methods=["POST"]),
            Route("/requests/{rid}/record", self.record),
            Route("/requests/{rid}/watch", self.watch),
            Route("/requests/{rid}/watch/clip", self.clip),
            Route("/audit", self.audit),
            Route("/status", self.status),
            Route("/status/confirm", self.confirm, methods=["POST"]),
            Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
        ]
        inner = Starlette(routes=routes, exception_handlers={404: self._not_found})
        self.app: ASGIApp = SecurityHeaders(inner, tls=secure)

    # ---- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def client(request: Request) -> str:
        """The person's address as the server saw it (a proxy's X-Forwarded-For is applied by
        uvicorn only for a proxy on loopback)."""
        host = request.client.host if request.client else "-"
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return "-"

    def lang(self, request: Request) -> str:
        """The page language (i18n.pick)."""
        return pick(request.headers.get("accept-language"), request.cookies.get("lang"))

    def render(
        self,
        request: Request,
        template: str,
        status: int = 200,
        me: Me | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        """A page from ``template`` in the request's language."""
        lang = self.lang(request)
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        html = self.env.get_template(template).render(
            t=translator(lang),
            lang=lang,
            me=me,
            here=_safe_next(here),
            states=list(STATE_NAMES),
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    def error(
        self, request: Request, code: int, key: str, me: Me | None = None, text: str = ""
    ) -> Response:
        """An error page: ``key``'s text, or ``text`` (a daemon's message) when given."""
        t = translator(self.lang(request))
        return self.render(
            request, "error.html", code, me, title=str(code), code=code, text=text or t(key)
        )

    async def call(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        me: Me | None = None,
        *,
        client: str = "-",
    ) -> Any:
        """``cmd`` in the daemon, for ``me`` (or as the gateway), off the event loop. A session
        the daemon says has ended is forgotten here at once (see ``me``)."""
        try:
            return await run_in_threadpool(
                self.gateway.call, cmd, args, session=me.token if me else None, client=client
            )
        except SessionEnded:
            if me is not None:
                self._me.pop(_token_key(me.token), None)
            raise
        finally:
            if cmd == "web.logout" and me is not None:
                self._me.pop(_token_key(me.token), None)

    def _clear_cookie(self, response: Response) -> Response:
        response.delete_cookie(
            self.cookie, path="/", secure=self.secure, httponly=True, samesite="strict"
        )
        return response

    def _to_login(self, request: Request, message: str | None = None) -> Response:
        target = "/login"
        nxt = _safe_next(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        if nxt not in ("/", "/login"):
            target += "?" + urlencode({"next": nxt})
        return self._clear_cookie(RedirectResponse(target, status_code=303))

    async def me(self, request: Request) -> Me:
        """The person of this request's session; raises Refused (to the login page) without one."""
        token = request.cookies.get(self.cookie)
        if not token or not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", token):
            raise Refused(self._to_login(request))
        key = _token_key(token)
        kept = self._me.get(key)
        if kept is not None and 0 <= time.monotonic() - kept[0] < ME_FRESH:
            return kept[1]
        try:
            info = await self.call(
                "web.session", None, Me(token, "", (), 0, ""), client=self.client(request)
            )
        except SessionEnded:
            raise Refused(self._to_login(request)) from None
        except DaemonUnavailable:
            raise Refused(self.error(request, 503, "unavailable")) from None
        me = Me(token, info["user"], tuple(info["roles"]), int(info["level"]), info["csrf"])
        if len(self._me) >= ME_KEPT:
            self._me.clear()
        self._me[key] = (time.monotonic(), me)
        return me

    async def form(self, request: Request) -> dict[str, Any]:
        """The POSTed form (bounded in size); raises Refused on anything else."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_FORM):
            raise Refused(PlainTextResponse("form too large", status_code=413))
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise Refused(PlainTextResponse("expected a form", status_code=415))
        try:
            data = await request.form(max_files=0, max_fields=64)
        except Exception:
            raise Refused(PlainTextResponse("unreadable form", status_code=400)) from None
        out: dict[str, Any] = {}
        for key, value in data.multi_items():
            if not isinstance(value, str):
                raise Refused(PlainTextResponse("no files here", status_code=400))
            out.setdefault(key, []).append(value)
        return {k: (v if len(v) > 1 or k == "cameras" else v[0]) for k, v in out.items()}

    def check_csrf(self, request: Request, me: Me, form: Mapping[str, Any]) -> None:
        """Refuse (403) a form without this session's CSRF token, or sent from another origin."""
        given = form.get("csrf_token")
        origin = request.headers.get("origin")
        if origin is not None and origin != "null" and not self._same_origin(request, origin):
            raise Refused(self.error(request, 403, "csrf", me))
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), me.csrf.encode()):
            raise Refused(self.error(request, 403, "csrf", me))

    @staticmethod
    def _same_origin(request: Request, origin: str) -> bool:
        host = request.headers.get("host", "")
        return origin in (f"https://{host}", f"http://{host}")

    def refusal(
        self, request: Request, exc: NvrGuardError, me: Me | None, *, hide: bool = False
    ) -> Response:
        """The page for a daemon's refusal (``hide``: a request one may not see is not found)."""
        if isinstance(exc, SessionEnded):
            return self._to_login(request)
        if isinstance(exc, DaemonUnavailable):
            return self.error(request, 503, "unavailable", me)
        if isinstance(exc, PolicyRefused):
            if hide or "may not see request" in str(exc):
                # the daemon says the same of an id that does not exist: so does the page
                return self.error(request, 404, "not_found", me)
            return self.error(request, 403, "forbidden", me, text=str(exc))
        if isinstance(exc, InvalidInput):
            if hide:
                return self.error(request, 404, "not_found", me)
            return self.error(request, 400, "error", me, text=str(exc))
        return self.error(request, 500, "error", me, text=str(exc))

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return self.error(request, 404, "not_found")

    @staticmethod
    def rid(request: Request) -> int | None:
        """The request id of the path, or None when it is not one."""
        raw = request.path_params.get("rid", "")
        if not re.fullmatch(r"[1-9][0-9]{0,15}", raw):
            return None
        return int(raw)

    def cameras(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Cameras with their names and levels (the config's; unlisted: level 2)."""
        known = self.config.cameras
        if ids is None:
            seen: dict[str, None] = {}
            for site in self.config.sites.values():
                for c in site.cameras or ():
                    if not any(ch in c for ch in "*?["):
                        seen[c] = None
            for c in known:
                seen[c] = None
            ids = sorted(seen)
        return [
            {
                "id": c,
                "name": known[c].name if c in known else None,
                "level": known[c].level if c in known else 2,
            }
            for c in ids
        ]

    # ---- pages ---------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            await self.call("ping")
        except NvrGuardError:
            return PlainTextResponse("daemon unavailable\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def set_lang(self, request: Request) -> Response:
        lang = request.path_params["lang"]
        response = RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        if lang in ("zh", "en"):
            response.set_cookie(
                "lang",
                lang,
                max_age=365 * 86400,
                path="/",
                secure=self.secure,
                httponly=True,
                samesite="strict",
            )
        return response

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/requests?waiting=me", status_code=303)

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", title=translator(self.lang(request))("login"))

    async def login_post(self, request: Request) -> Response:
        t = translator(self.lang(request))
        try:
            form = await self.form(request)
        except Refused as refused:
            return refused.response
        origin = request.headers.get("origin")
        if origin is not None and origin != "null" and not self._same_origin(request, origin):
            return self.error(request, 403, "csrf")
        user = form.get("username")
        password = form.get("password")
        if (
            not isinstance(user, str)
            or not isinstance(password, str)
            or not re.fullmatch(r"[A-Za-z0-9._@$\\-]{1,64}", user)
            or not 0 < len(password) <= 512
        ):
            return self.render(
                request, "login.html", 401, title=t("login"), message=t("login_failed"), username=""
            )
        try:
            reply = await run_in_threadpool(self.login_fn, user, password, self.client(request))
        except Exception as exc:  # the helper unreachable: say so, never a traceback
            log.warning("login: password helper unavailable: %s", exc)
            return self.render(
                request,
                "login.html",
                503,
                title=t("login"),
                message=t("login_unavailable"),
                username=user,
            )
        finally:
            del password
        if not reply.get("ok"):
            if reply.get("unavailable"):
                key, code = "login_unavailable", 503
            elif reply.get("locked") and reply.get("retry_after"):
                minutes = max(1, (int(reply["retry_after"]) + 59) // 60)
                return self.render(
                    request,
                    "login.html",
                    401,
                    title=t("login"),
                    message=t("login_locked", minutes=minutes),
                    username=user,
                )
            else:
                key, code = "login_failed", 401
            return self.render(
                request, "login.html", code, title=t("login"), message=t(key), username=user
            )
        token = str(reply["session"])
        response = RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        # a fresh cookie at every login: a session id planted before the login is never used
        response.set_cookie(
            self.cookie,
            token,
            max_age=int(reply.get("expires_in") or 900)
            + int(self.config.web.session_limit.seconds if self.config.web else 0),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )
        return response

    @_posted
    async def logout(self, request: Request, me: Me, form: dict[str, Any]) -> Response:
        with contextlib.suppress(NvrGuardError):
            await self.call("web.logout", None, me, client=self.client(request))
        return self._clear_cookie(RedirectResponse("/login", status_code=303))

    @_signed_in
    async def requests(self, request: Request, me: Me) -> Response:
        q = request.query_params
        waiting = q.get("waiting") == "me"
        state = q.get("state") or None
        if state is not None and state not in STATE_NAMES:
            return self.error(request, 400, "error", me, text=f"unknown state {state[:32]!r}")
        before = q.get("before")
        args: dict[str, Any] = {"waiting": waiting, "limit": PAGE + 1}
        if state:
            args["state"] = state
        if before:
            if not re.fullmatch(r"[1-9][0-9]{0,15}", before):
                return self.error(request, 400, "error", me, text="bad page")
            args["before"] = int(before)
        try:
            rows = await self.call("request.list", args, me, client=self.client(request))
        except NvrGuardError as exc:
            return self.refusal(request, exc, me)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        t = translator(self.lang(request))
        return self.render(
            request,
            "requests.html",
            me=me,
            title=t("waiting_me") if waiting else t("all_requests"),
            requests=rows,
            waiting=waiting,
            state=state,
            next_before=rows[-1]["id"] if more and rows else None,
        )

    def _blank_form(self) -> dict[str, Any]:
        return {
            "cameras": [],
            "from": "",
            "to": "",
            "reason": "",
            "basis": "",
            "recipient_unit": "",
            "recipient_person": "",
            "recipient_contact": "",
            "format": "view",
            "encrypt": "",
            "emergency": False,
        }

    @_signed_in
    async def request_new(self, request: Request, me: Me) -> Response:
        t = translator(self.lang(request))
        return self.render(
            request,
            "request_new.html",
            me=me,
            title=t("new_request"),
            cameras=self.cameras(),
            form=self._blank_form(),
        )

    @_posted
    async def request_file(self, request: Request, me: Me, form: dict[str, Any]) -> Response:
        t = translator(self.lang(request))
        shown = {**self._blank_form(), **{k: v for k, v in form.items() if k != "csrf_token"}}
        cams = form.get("cameras") or []
        if isinstance(cams, str):
            cams = [cams]
        shown["cameras"] = cams
        fmt = form.get("format", "mp4")
        args = {
            "cameras": ",".join(c for c in cams if isinstance(c, str)),
            "from": str(form.get("from", "")),
            "to": str(form.get("to", "")),
            "reason": str(form.get("reason", "")),
            "basis": str(form.get("basis", "")),
            "recipient": {
                "unit": str(form.get("recipient_unit", "")),
                "person": str(form.get("recipient_person", "")),
                "contact": str(form.get("recipient_contact", "")),
            },
            "format": fmt if isinstance(fmt, str) else "",
            "emergency": form.get("emergency") == "1",
        }
        encrypt = form.get("encrypt", "")
        if not isinstance(encrypt, str):
            return self.error(request, 400, "error", me)
        if encrypt:  # empty: as the site sets it
            args["encrypt"] = encrypt
        try:
            made = await self.call("request.new", args, me, client=self.client(request))
        except NvrGuardError as exc:
            if isinstance(exc, (SessionEnded, DaemonUnavailable)):
                return self.refusal(request, exc, me)
            code = 400 if isinstance(exc, InvalidInput) else 403
            return self.render(
                request,
                "request_new.html",
                code,
                me=me,
                title=t("new_request"),
                cameras=self.cameras(),
                form=shown,
                message=str(exc),
            )
        return RedirectResponse(f"/requests/{int(made['id'])}", status_code=303)

    @_signed_in
    async def request_page(self, request: Request, me: Me) -> Response:
        rid = self.rid(request)
        if rid is None:
            return self.error(request, 404, "not_found", me)
        client = self.client(request)
        try:
            r = await self.call("request.show", {"id": rid}, me, client=client)
        except NvrGuardError as exc:
            return self.refusal(request, exc, me, hide=True)
        trail = None
        if me.may_audit:
            with contextlib.suppress(NvrGuardError):
                trail = (await self.call("audit.show", {"request": rid}, me, client=client))[
                    "entries"
                ]
        previews = None
        web = self.config.web
        if web is not None and web.previews and r.get("may_decide"):
            with contextlib.suppress(NvrGuardError):
                got = await self.call("preview.frames", {"id": rid}, me, client=client)
                previews = [
                    p if isinstance(p, str) else p.get("jpeg", "") for p in got.get("frames", [])
                ]
        return self.render(
            request,
            "request.html",
            me=me,
            title=f"#{rid}",
            r=r,
            cameras=self.cameras(list(r["cameras"])),
            trail=trail,
            previews=previews,
        )

    @_posted
    async def _decide(
        self, request: Request, me: Me, form: dict[str, Any], cmd: str, field: str
    ) -> Response:
        rid = self.rid(request)
        if rid is None:
            return self.error(request, 404, "not_found", me)
        text = form.get(field, "")
        if not isinstance(text, str):
            return self.error(request, 400, "error", me)
        args: dict[str, Any] = {"id": rid, field: text}
        if cmd == "request.approve" and not text:
            args[field] = None
        mask = form.get("mask", "")
        if cmd == "request.approve" and mask:
            if not isinstance(mask, str):
                return self.error(request, 400, "error", me)
            args["mask"] = mask
        try:
            await self.call(cmd, args, me, client=self.client(request))
        except NvrGuardError as exc:
            return self.refusal(request, exc, me)
        return RedirectResponse(f"/requests/{rid}", status_code=303)

    async def approve(self, request: Request) -> Response:
        return await self._decide(request, "request.approve", "note")

    async def deny(self, request: Request) -> Response:
        return await self._decide(request, "request.deny", "reason")

    @_signed_in
    async def record(self, request: Request, me: Me) -> Response:
        rid = self.rid(request)
        if rid is None:
            return self.error(request, 404, "not_found", me)
        try:
            got = await self.call("export.form", {"id": rid}, me, client=self.client(request))
        except NvrGuardError as exc:
            return self.refusal(request, exc, me, hide=True)
        html = str(got["html"])
        # the record carries its own style block: allowed by its hash, nothing else inline
        hashes = [
            "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
            for m in re.findall(r"<style>(.*?)</style>", html, flags=re.S)
        ]
        csp = CSP.replace("style-src 'self'", "style-src 'self' " + " ".join(hashes))
        return HTMLResponse(html, headers={"content-security-policy": csp})

    @_signed_in
    async def watch(self, request: Request, me: Me) -> Response:
        rid = self.rid(request)
        if rid is None:
            return self.error(request, 404, "not_found", me)
        client = self.client(request)
        try:
            r = await self.call("request.show", {"id": rid}, me, client=client)
            prep = await self.call("view.prepare", {"id": rid}, me, client=client)
        except NvrGuardError as exc:
            return self.refusal(request, exc, me, hide=isinstance(exc, InvalidInput))
        state = prep.get("state")
        progress = prep.get("progress")
        return self.render(
            request,
            "watch.html",
            me=me,
            title=f"#{rid}",
            r=r,
            preparing=state == "preparing",
            progress=f"{round(progress * 100)}%" if isinstance(progress, (int, float)) else "",
            failed=prep.get("message") or "failed" if state == "failed" else None,
        )

    @_signed_in
    async def clip(self, request: Request, me: Me) -> Response:
        rid = self.rid(request)
        if rid is None:
            return self.error(request, 404, "not_found", me)
        # a Range request continues the same viewing; only a fresh start opens (and audits) anew
        try:
            result, fds = await run_in_threadpool(
                self.gateway.call_with_fds,
                "view.open",
                {"id": rid, "continued": _is_continuation(request.headers.get("range"))},
                session=me.token,
                client=self.client(request),
            )
        except NvrGuardError as exc:
            return self.refusal(request, exc, me)
        if not fds:
            return self.error(request, 409, "preparing", me)
        fd, rest = fds[0], fds[1:]
        for extra in rest:
            os.close(extra)
        return _serve_fd(request, fd, str(result.get("content_type", "video/mp4")))

    @_signed_in
    async def audit(self, request: Request, me: Me) -> Response:
        q = request.query_params
        f = {k: (q.get(k) or "")[:64] for k in ("since", "request", "actor", "action")}
        args: dict[str, Any] = {"limit": AUDIT_PAGE + 1}
        if f["since"]:
            args["since"] = f["since"]
        if f["request"]:
            if not re.fullmatch(r"[1-9][0-9]{0,15}", f["request"]):
                return self.error(request, 400, "error", me, text="bad request id")
            args["request"] = int(f["request"])
        for key in ("actor", "action"):
            if f[key]:
                args[key] = f[key]
        client = self.client(request)
        try:
            got = await self.call("audit.show", args, me, client=client)
            chain = await self.call("audit.verify", None, me, client=client)
        except NvrGuardError as exc:
            return self.refusal(request, exc, me)
        entries = list(reversed(got["entries"]))
        truncated = len(entries) > AUDIT_PAGE
        t = translator(self.lang(request))
        return self.render(
            request,
            "audit.html",
            me=me,
            title=t("audit"),
            f=f,
            trail=entries[:AUDIT_PAGE],
            truncated=truncated,
            chain=chain,
        )

    @_signed_in
    async def status(self, request: Request, me: Me) -> Response:
        try:
            s = await self.call(
                "status", {"holds_limit": STATUS_HOLDS}, me, client=self.client(request)
            )
        except NvrGuardError as exc:
            return self.refusal(request, exc, me)
        notifier = None
        if self.notifier is not None:
            with contextlib.suppress(Exception):
                notifier = self.notifier.status()
        t = translator(self.lang(request))
        message = request.query_params.get("confirmed")
        return self.render(
            request,
            "status.html",
            me=me,
            title=t("status"),
            s=s,
            notifier=notifier,
            message=f"#{message} ✓" if message and message.isdigit() else None,
            message_kind="ok",
        )

    @_posted
    async def confirm(self, request: Request, me: Me, form: dict[str, Any]) -> Response:
        """An admin releases a sweep the mass-deletion guard stopped, after re-entering the
        password (checked by the password helper like a login; that check's session is closed
        at once)."""
        sweep = form.get("sweep", "")
        password = form.get("password", "")
        if not isinstance(sweep, str) or not re.fullmatch(r"[1-9][0-9]{0,15}", sweep):
            return self.error(request, 400, "error", me, text="bad sweep id")
        if not isinstance(password, str) or not 0 < len(password) <= 512:
            return self.error(request, 403, "login_failed", me)
        client = self.client(request)
        try:
            reply = await run_in_threadpool(self.login_fn, me.user, password, client)
        except Exception:
            return self.error(request, 503, "login_unavailable", me)
        finally:
            del password
        if not reply.get("ok"):
            return self.error(request, 403, "login_failed", me)
        with contextlib.suppress(NvrGuardError):
            await self.call(
                "web.logout", None, Me(str(reply["session"]), "", (), 0, ""), client=client
            )
        try:
            await self.call("retention.confirm", {"sweep": int(sweep)}, me, client=client)
        except NvrGuardError as exc:
            return self.refusal(request, exc, me)
        return RedirectResponse(f"/status?confirmed={int(sweep)}", status_code=303)


def _is_continuation(range_header: str | None) -> bool:
    """True for a Range request that does not start at byte 0 (the player seeking)."""
    if not range_header:
        return False
    m = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", range_header)
    return bool(m and int(m.group(1)) > 0)


def _serve_fd(request: Request, fd: int, content_type: str) -> Response:
    """Stream the open file ``fd`` (closed afterwards), honouring one byte range."""
    try:
        size = os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise
    start, end = 0, size - 1
    status = 200
    rng = request.headers.get("range")
    if rng:
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
        if m is None or (not m.group(1) and not m.group(2)):
            os.close(fd)
            return PlainTextResponse(
                "bad range", status_code=416, headers={"content-range": f"bytes */{size}"}
            )
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            start = max(0, size - int(m.group(2)))
        if start > end or start >= size:
            os.close(fd)
            return PlainTextResponse(
                "bad range", status_code=416, headers={"content-range": f"bytes */{size}"}
            )
        status = 206

    def chunks() -> Any:
        try:
            pos = start
            while pos <= end:
                block = os.pread(fd, min(256 * 1024, end - pos + 1), pos)
                if not block:
                    break
                pos += len(block)
                yield block
        finally:
            os.close(fd)

    headers = {
        "accept-ranges": "bytes",
        "content-length": str(end - start + 1),
        # shown in the page's player, never offered as a download
        "content-disposition": "inline",
        "cache-control": "no-store",
    }
    if status == 206:
        headers["content-range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(chunks(), status_code=status, media_type=content_type, headers=headers)
