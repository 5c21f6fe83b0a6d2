"""Every control command, defined once: its name, its typed arguments, who may run it, and
its handler.

The daemon serves the socket from this table (``dispatch``), the CLI's local mode (root acting
on the state while no daemon runs) runs the same handlers in-process, and a gateway for another
transport can reuse it: the rules of a command live in one place, not in one if-chain per caller.

Arguments: a request's ``args`` are validated against the command's model before any handler
code runs: a missing field, an unknown field, a value of the wrong type, an id out of range or
an oversized text is refused with exit 2 and a one-line message naming the field — never a
traceback from deep inside a handler. Handlers then receive the model, values of the right
types. The CLI builds these arguments itself; the models are the fence against anyone else who
speaks the socket protocol (a script, a fuzzer, an insider with ``socat``).

Access, checked by ``dispatch`` in this order:

* ``service_account`` commands (``reload``) run for the daemon's own uid without a role:
  systemd's ExecReload= runs ``nvr-guard reload`` as the service user, which owns the state
  anyway and is named nowhere in ``people:``;
* everything not ``public`` (``status``, ``key.show``) needs some role: a caller the config
  does not know is refused, and the attempt is on record (``access.denied``);
* ``refuse``: a refusal that depends on the arguments and comes before the role check
  (``retention.run --now`` through the daemon);
* ``roles``: the roles the command needs, checked here with ``what`` as the audit object;
  commands without ``roles`` have theirs checked by the engine, workflow or media gate they call
  (holds: admin or security_lead; requests: the approval rules; media: the media roles).
"""

from __future__ import annotations

import os
import pwd
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.functional_validators import AfterValidator

from nvr_guard.config import Config
from nvr_guard.daemon.control import WithFds
from nvr_guard.daemon.websessions import WebSessions
from nvr_guard.engine import (
    AUDIT_ROLES,
    Engine,
    audit_show_json,
    audit_verify_json,
    describe_plan,
    preview,
)
from nvr_guard.errors import (
    ConfigMismatch,
    DaemonUnavailable,
    InvalidInput,
    PolicyRefused,
    RuntimeFailure,
    SessionEnded,
)
from nvr_guard.identity import Caller
from nvr_guard.store.audit import AuditLog, acting_via
from nvr_guard.times import clock_at, parse_time

# who may run a sweep or reload the config (root counts as admin)
SWEEP_ROLES = frozenset({"admin"})
RELOAD_ROLES = frozenset({"admin"})
# who may see what a sweep would delete (every path it judges, held footage and why)
PLAN_ROLES = frozenset({"admin", "security_lead", "auditor"})

MAX_ID = 2**53  # what a JSON number carries exactly


def _no_nul(s: str) -> str:
    if "\x00" in s:
        raise ValueError("must not contain NUL characters")
    return s


_NoNul = AfterValidator(_no_nul)
Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
# ISO 8601 or a duration ("1h"); parsed by the handler in the site's zone
Time = Annotated[StrictStr, Field(max_length=64), _NoNul]
Short = Annotated[StrictStr, Field(max_length=256), _NoNul]
Long = Annotated[StrictStr, Field(max_length=4000), _NoNul]
PathText = Annotated[StrictStr, Field(max_length=4096), _NoNul]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class NoArgs(_Args):
    pass


class StatusArgs(_Args):
    # the console shows the first few holds (a status of thousands is 0.7 MB to send and draw)
    holds_limit: Annotated[StrictInt, Field(ge=0, le=1_000_000)] | None = None


class IdArgs(_Args):
    id: Id


class ViewOpen(_Args):
    id: Id
    continued: StrictBool = False  # a seek of a viewing already started (no new view.start)


class Recipient(_Args):
    unit: Long = ""
    person: Long = ""
    contact: Long = ""


class RequestNew(_Args):
    cameras: Long
    from_: Time = Field(alias="from")
    to: Time
    reason: Long = ""
    basis: Long = ""
    recipient: Recipient
    format: Literal["mp4", "native", "view"] = "mp4"
    emergency: StrictBool = False
    encrypt: Literal["none", "passphrase", "recipient"] | None = None  # None: the site's


class RequestList(_Args):
    state: Short | None = None
    waiting: StrictBool = False  # only what the caller may decide now
    limit: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = None
    before: Id | None = None  # paging: ids below this one (newest first)


class RequestApprove(_Args):
    id: Id
    note: Long | None = None
    as_step: Short | None = None
    mask: Long | None = None  # privacy zones to add: "x,y,w,h[;CAMERA:x,y,w,h...]"


class IdReason(_Args):
    id: Id
    reason: Long = ""


class ExportRun(_Args):
    id: Id
    media: PathText


class Media(_Args):
    media: PathText


class MediaEnroll(_Args):
    media: PathText
    label: Long | None = None


class MediaRemove(_Args):
    media: PathText
    reason: Long = ""


class MediaWipe(_Args):
    media: PathText
    confirm: PathText = ""


class RetentionRun(_Args):
    now: Time | None = None
    dry_run: StrictBool = False
    # only the per-camera summary, not every segment (a person's view of a large backlog)
    summary: StrictBool = False


class RetentionPlan(_Args):
    now: Time | None = None
    site: Short | None = None
    # the digest of the config file the caller read: a plan is of the config in force, and a
    # caller previewing another file must not be shown the daemon's plan under its name
    config_digest: Short | None = None
    # true: walk the roots again (on a scratch copy of the catalog); false: plan from the catalog
    # (the daemon's, or root's local copy of it); unset: the daemon plans from its catalog, root
    # without one walks
    rescan: StrictBool | None = None
    # only the per-camera summary, not every segment (a person's view of a large backlog)
    summary: StrictBool = False


class RetentionConfirm(_Args):
    sweep: Id
    summary: StrictBool = False


class RetentionConfirmRoot(_Args):
    site: Short
    root: PathText


class HoldAdd(_Args):
    camera: Short | None = None
    from_: Time | None = Field(default=None, alias="from")
    to: Time | None = None
    request: Id | None = None  # hold the request's footage and exported package instead
    reason: Long
    until: Time | None = None
    site: Short | None = None


class HoldList(_Args):
    all: StrictBool = False


class HoldRelease(_Args):
    id: Id
    reason: Long


class AuditShow(_Args):
    since: Time | None = None
    request: Id | None = None
    actor: Short | None = None
    action: Short | None = None  # "request." matches the family
    limit: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None  # the newest N


# a login name as PAM may know it: Unix names, and directory names (user@realm, DOMAIN\\user)
LoginName = Annotated[
    StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@$\\-]+$")
]
ClientAddr = Annotated[
    StrictStr, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z.:%_\[\]-]+$")
]


class AuthBegin(_Args):
    user: LoginName
    client: ClientAddr


class AuthFinish(_Args):
    user: LoginName
    client: ClientAddr
    ok: StrictBool
    reason: Short = ""


class NotifyEvents(_Args):
    after: Annotated[StrictInt, Field(ge=0, le=MAX_ID)] | None = None  # None: the cursor
    limit: Annotated[StrictInt, Field(ge=1, le=500)] = 100


class NotifyAck(_Args):
    upto: Annotated[StrictInt, Field(ge=0, le=MAX_ID)]


class NotifyReport(_Args):
    seq: Id
    # "webhook", or "mail:<user>" (one mail per recipient)
    channel: Annotated[
        StrictStr, Field(max_length=80, pattern=r"^(webhook|mail:[A-Za-z0-9._@$\\-]+)$")
    ]
    ok: StrictBool
    error: Long = ""


# ---- the context a handler runs in ------------------------------------------------------------


def _no_error() -> str | None:
    return None


class Context:
    """What a command handler may use: the engine, and the hooks of whoever serves the command.

    The daemon gives its ``reload`` and its health (``started``, ``last_error``); the CLI's local
    mode gives an engine on the state and ``local=True`` (root, no daemon: ``--now`` is allowed
    there); root reading the audit log without a daemon gives only that log (``of_audit_log``),
    since opening the state for writing would repair dropped triggers, themselves evidence.
    """

    def __init__(
        self,
        engine: Engine | None,
        *,
        local: bool = False,
        reload: Callable[[str], dict[str, Any]] | None = None,
        started: float | None = None,
        last_error: Callable[[], str | None] = _no_error,
        audit_log: AuditLog | None = None,
        config: Config | None = None,
        service_uid: int | None = None,
        web: WebSessions | None = None,
    ) -> None:
        self._engine = engine
        self.web = web  # the console's sessions (the daemon's; None elsewhere)
        # the account the daemon runs as (``service_account`` commands): this process's own
        self.service_uid = os.getuid() if service_uid is None else service_uid
        self.local = local
        self.reload = reload
        self.started = started
        self.last_error = last_error
        self._audit_log = audit_log
        self._config = config

    @classmethod
    def of_audit_log(cls, log_: AuditLog, config: Config) -> Context:
        """Only the audit log (read-only) of ``config``'s state, for root without a daemon."""
        return cls(None, local=True, audit_log=log_, config=config)

    @property
    def engine(self) -> Engine:
        """The engine; a command that needs it is refused where there is none."""
        if self._engine is None:
            raise DaemonUnavailable("this command needs the daemon (or root acting on the state)")
        return self._engine

    @property
    def config(self) -> Config:
        """The config in force (the engine's follows reloads)."""
        if self._engine is not None:
            return self._engine.config
        assert self._config is not None
        return self._config

    @property
    def audit(self) -> AuditLog:
        """The audit log."""
        if self._audit_log is not None:
            return self._audit_log
        return self.engine.audit

    @property
    def audit_reader(self) -> AuditLog:
        """The audit log for reading (``Engine.audit_reader``; without an engine, the log)."""
        if self._audit_log is not None:
            return self._audit_log
        return self.engine.audit_reader

    @property
    def tz(self) -> tzinfo:
        """The zone times without an offset are read in."""
        return self.config.tz

    def wall(self) -> float:
        """The engine's wall clock (the real time without an engine)."""
        return self._engine.clock().wall if self._engine is not None else time.time()

    def is_peer(self, caller: Caller, kind: str) -> bool:
        """True when ``caller`` connected as the web console's ``kind`` account (``gateway``:
        web.gateway_user, ``auth``: web.auth_user) itself, not on anyone's behalf. Never while
        both are the same account: the process that acts for people must not also be the one
        whose word opens their sessions."""
        web = self.config.web
        if web is None or caller.via is not None:
            return False
        uids: dict[str, int | None] = {}
        for key, name in (("gateway", web.gateway_user), ("auth", web.auth_user)):
            try:
                uids[key] = pwd.getpwnam(name).pw_uid
            except KeyError:
                uids[key] = None
        if uids["gateway"] is not None and uids["gateway"] == uids["auth"]:
            return False
        return uids[kind] is not None and caller.uid == uids[kind]

    def sessions(self) -> WebSessions:
        """The console's sessions; refused where the web console is not configured."""
        if self.web is None or self.config.web is None:
            raise PolicyRefused(
                "the web console is not configured: add a web: section to the config and reload"
            )
        return self.web

    def roles_for(self, caller: Caller) -> set[str]:
        """The caller's roles (``people:``); root is admin. Without an engine only root acts."""
        if self._engine is not None:
            return self._engine.roles_for(caller)
        return {"admin"} if caller.uid == 0 else set()

    def require(self, caller: Caller, allowed: frozenset[str], what: str) -> None:
        """Refuse (exit 3, on record where the log takes appends) unless ``caller`` holds one of
        ``allowed``."""
        if self._engine is not None:
            self._engine.require(caller, allowed, what)
        elif not self.roles_for(caller) & allowed:
            raise PolicyRefused(f"{caller.user} may not {what}: only root acts without the daemon")


# ---- the table --------------------------------------------------------------------------------

Handler = Callable[[Context, Caller, Any], Any]
Refusal = Callable[[Context, Caller, Any], None]


@dataclass(frozen=True, slots=True)
class Command:
    """One control command: see the module docstring for the order of the access checks."""

    name: str
    args: type[_Args]
    handler: Handler
    roles: frozenset[str] | None = None  # checked by dispatch; None: by what the handler calls
    what: str = ""  # the audit object of a role refusal ("run a retention sweep")
    public: bool = False  # served to anyone who reaches the socket
    service_account: bool = False  # the daemon's own uid runs it without a role
    # served only to the web console's accounts, without a role: "auth" (the password helper),
    # "gateway" (the web process itself), "session" (the gateway acting for a logged-in person)
    peer: Literal["auth", "gateway", "session"] | None = None
    refuse: Refusal | None = None  # a refusal checked before the roles


# ---- handlers ---------------------------------------------------------------------------------


def status(ctx: Context, caller: Caller, a: StatusArgs) -> Any:
    """Health as ``caller`` may see it (request details only to their viewers), with the
    daemon's own health when a daemon serves it; ``holds_limit``: the first so many holds
    (``holds_total`` says how many there are)."""
    st: dict[str, Any] = ctx.engine.status(caller)
    st["holds_total"] = len(st["holds"])
    if a.holds_limit is not None:
        st["holds"] = st["holds"][: a.holds_limit]
    if ctx.started is not None:
        last_error = ctx.last_error()
        st["daemon"] = {
            "pid": os.getpid(),
            "uptime": round(time.time() - ctx.started, 1),
            "last_error": last_error,
        }
        if last_error:
            st["ok"] = False
    return st


def reload(ctx: Context, caller: Caller, a: NoArgs) -> Any:
    """Validate and apply the config file (the daemon's reload; nothing to reload without one)."""
    if ctx.reload is None:
        raise DaemonUnavailable("reload: no daemon runs, so there is no config in force to reload")
    return ctx.reload(caller.user)


def request_new(ctx: Context, caller: Caller, a: RequestNew) -> Any:
    """File a retrieval request; its footage is held at once."""
    return ctx.engine.workflow.new(caller, a.model_dump(by_alias=True))


def request_list(ctx: Context, caller: Caller, a: RequestList) -> Any:
    """The requests ``caller`` may see (``Engine.read_memo``: no lock when asked again)."""
    wf = ctx.engine.workflow
    return ctx.engine.read_memo(
        ("request.list", wf.actor(caller), a.state, a.waiting, a.limit, a.before),
        lambda wait: wf.list(caller, a.state, a.waiting, a.limit, a.before, wait=wait),
        weight=len,
        locked=False,  # read from the workflow's index: the lock only to bring it up to date
    )


def request_show(ctx: Context, caller: Caller, a: IdArgs) -> Any:
    """One request with its approvals, to those who may see it (``Engine.read_memo``; a
    refusal is never kept: each one is audited)."""
    wf = ctx.engine.workflow
    return ctx.engine.read_memo(
        ("request.show", wf.actor(caller), a.id),
        lambda wait: wf.show(caller, a.id, wait=wait),
        locked=False,  # as request_list; a refusal, recorded, takes the lock
    )


def request_approve(ctx: Context, caller: Caller, a: RequestApprove) -> Any:
    """Approve the next step ``caller`` holds a role for (or ``as_step``)."""
    return ctx.engine.workflow.approve(caller, a.id, a.note or "", a.as_step, a.mask)


def request_deny(ctx: Context, caller: Caller, a: IdReason) -> Any:
    """Deny a request, with its reason."""
    return ctx.engine.workflow.deny(caller, a.id, a.reason or "")


def request_cancel(ctx: Context, caller: Caller, a: IdArgs) -> Any:
    """Withdraw a request (its requester or an admin)."""
    return ctx.engine.workflow.cancel(caller, a.id)


def request_resolve(ctx: Context, caller: Caller, a: IdReason) -> Any:
    """Resolve an emergency export's violation, with a reason (admin)."""
    return ctx.engine.workflow.resolve(caller, a.id, a.reason or "")


def export_run(ctx: Context, caller: Caller, a: ExportRun) -> Any:
    """Write the package of an approved request onto an export target."""
    from nvr_guard.daemon.control import caller_hung_up

    # a passphrase exists only in the reply: a caller who is gone before the commit stops it
    return ctx.engine.workflow.export(caller, a.id, a.media, caller_gone=caller_hung_up)


def export_progress(ctx: Context, caller: Caller, a: IdArgs) -> Any:
    """A running export's progress, to those who may see the request (ids cannot be probed)."""
    return {"progress": ctx.engine.workflow.progress_of(caller, a.id)}


def export_destroy(ctx: Context, caller: Caller, a: IdReason) -> Any:
    """Destroy the package of a request kept on an export target directory (admin)."""
    return ctx.engine.workflow.copies.destroy(caller, a.id, a.reason or "")


def export_form(ctx: Context, caller: Caller, a: IdArgs) -> Any:
    """The printable approval record of a request, as HTML."""
    return {"html": ctx.engine.workflow.form(caller, a.id)}


def media_list(ctx: Context, caller: Caller, a: NoArgs) -> Any:
    """Attached media and export target directories."""
    return ctx.engine.media.list(caller)


def media_enroll(ctx: Context, caller: Caller, a: MediaEnroll) -> Any:
    """Allow exports onto a medium."""
    return ctx.engine.media.enroll(caller, a.media, a.label or "")


def media_remove(ctx: Context, caller: Caller, a: MediaRemove) -> Any:
    """Withdraw a medium's enrolment."""
    return ctx.engine.media.remove(caller, a.media, a.reason or "")


def media_scan(ctx: Context, caller: Caller, a: Media) -> Any:
    """Scan a medium or an export target directory with ClamAV."""
    return ctx.engine.media.scan(caller, a.media)


def media_scan_progress(ctx: Context, caller: Caller, a: Media) -> Any:
    """A running scan's progress (files done, files in all)."""
    return {"progress": ctx.engine.media.progress.get(a.media)}


def media_wipe(ctx: Context, caller: Caller, a: MediaWipe) -> Any:
    """Format an unmounted medium instead of scanning it."""
    res = ctx.engine.media.wipe(caller, a.media, a.confirm or "")
    # the copies exported onto it are known destroyed now, recorded against their requests
    res["copies_destroyed"] = ctx.engine.workflow.copies.wiped(caller, res["id"])
    return res


def refuse_fake_now(ctx: Context, caller: Caller, a: RetentionRun) -> None:
    """A sweep through the daemon runs at the real time: ``--now`` is for root without one.

    With a fake clock, anyone could step ``now`` forward under the clock guard and delete
    footage under its floor or its hold, or set it back and make the next real sweep trip the
    guard."""
    if a.now is None or ctx.local:
        return
    ctx.audit.append(
        caller.user,
        "access.denied",
        "retention.run",
        {"uid": caller.uid, "now": a.now, "why": "--now through the daemon"},
    )
    raise PolicyRefused(
        "retention run --now: a sweep through the daemon always runs at the real "
        "time; preview another time with `nvr-guard retention plan --now T`"
    )


def retention_run(ctx: Context, caller: Caller, a: RetentionRun) -> Any:
    """One sweep now (at ``now`` only for root acting locally), after an incremental rescan."""
    engine = ctx.engine
    now = None if a.now is None else clock_at(a.now, engine.config.tz)
    if not ctx.local:  # locally, the CLI has just brought the catalog up to date
        engine.reconcile(full=False)
    return engine.sweep(actor=caller.user, now=now, dry_run=a.dry_run).as_json(items=not a.summary)


_PREVIEWS = threading.Lock()


def retention_plan(ctx: Context, caller: Caller, a: RetentionPlan) -> Any:
    """What a sweep would delete and why, at ``now`` if given; deletes nothing.

    Through the daemon: planned from its catalog (kept current by the watcher, brought up to
    date by an incremental pass first) exactly as a sweep plans, reading only the due rows; a
    dry run writes nothing, so ``--now`` is harmless here (neither the sweep history nor the
    clock guard sees it). With ``rescan`` (and for root without a daemon), on a scratch copy of
    the state walked again against the disk (see ``engine.preview``); root's preview of
    another config file is a copy planned without the walk (``rescan`` false, locally).
    """
    cfg = ctx.config
    if a.config_digest is not None and a.config_digest != cfg.digest:
        raise ConfigMismatch(
            f"retention plan: the config file you read is not the one in force "
            f"({cfg.source_path}, {cfg.digest[:12]}); the daemon plans only under its own "
            "config: reload it first, or have root preview the other file "
            "(`sudo nvr-guard --config FILE retention plan`)"
        )
    if a.site is not None and a.site not in cfg.sites:
        # before the scan: a typo must not cost a full walk of every root
        raise InvalidInput(f"unknown site {a.site!r}; sites: {', '.join(sorted(cfg.sites))}")
    now = clock_at(a.now, cfg.tz)
    if ctx.local or a.rescan:
        rescan = a.rescan is not False
        # one at a time: each copies the catalog and walks every root (two cores, a million
        # files); a second caller waits its turn instead of doubling the load
        with _PREVIEWS, tempfile.TemporaryDirectory(prefix="nvr-guard-plan-") as tmp:
            out, how = preview(cfg, Path(tmp), now, a.site, rescan=rescan)
    else:
        engine = ctx.engine
        engine.reconcile(full=False)
        out = engine.sweep(actor="plan", now=now, dry_run=True, site=a.site)
        how = describe_plan(engine, out, a.site, "catalog")
    res: dict[str, Any] = out.as_json(items=not a.summary) | how
    res["deleted"] = 0
    return res


def retention_confirm(ctx: Context, caller: Caller, a: RetentionConfirm) -> Any:
    """Release a sweep a guard stopped (admin)."""
    return ctx.engine.confirm(a.sweep, caller).as_json(items=not a.summary)


def retention_confirm_root(ctx: Context, caller: Caller, a: RetentionConfirmRoot) -> Any:
    """Accept a root out of service as it is now (admin)."""
    return ctx.engine.confirm_root(caller, a.site, a.root)


def hold_add(ctx: Context, caller: Caller, a: HoldAdd) -> Any:
    """Place a manual hold on a camera's footage in a time range (admin, security_lead)."""
    engine = ctx.engine
    if a.request is not None:
        if a.camera is not None or a.from_ is not None or a.to is not None:
            raise InvalidInput(
                "hold add --request ID holds the request's own cameras and range; "
                "leave out --camera, --from and --to"
            )
        holds = engine.hold_request(caller, a.request, a.reason, a.until)
        return {**engine.hold_json(holds[0].id), "holds": [h.id for h in holds]}
    if a.camera is None or a.from_ is None or a.to is None:
        raise InvalidInput("hold add needs --camera, --from and --to (or --request ID)")
    h = engine.hold_add(caller, a.camera, a.from_, a.to, a.reason, a.until, site=a.site)
    return engine.hold_json(h.id)


def hold_list(ctx: Context, caller: Caller, a: HoldList) -> Any:
    """The holds as ``caller`` may see them."""
    return ctx.engine.holds_view(caller, a.all)


def hold_release(ctx: Context, caller: Caller, a: HoldRelease) -> Any:
    """End a manual hold, with a reason (admin, security_lead)."""
    engine = ctx.engine
    h = engine.hold_release(caller, a.id, a.reason)
    return engine.hold_json(h.id)


def key_show(ctx: Context, caller: Caller, a: NoArgs) -> Any:
    """The export signing key's fingerprint: public, it is printed on paper for anyone to
    compare."""
    engine = ctx.engine
    if not engine.key_fingerprint and engine.ensure_signing_key() is None:
        raise RuntimeFailure(
            f"the export signing key {engine.config.signing_key_path()} is unusable; "
            "see `nvr-guard status` (attention signing_key)"
        )
    return engine.signing_key_json()


def audit_show(ctx: Context, caller: Caller, a: AuditShow) -> Any:
    """Audit entries, oldest first, from ``since``, about one request if given."""
    t0 = None if a.since is None else parse_time(a.since, ctx.tz, "--since", now=ctx.wall())
    # on a connection of its own: what was committed, not waiting for a sweep's lock
    return audit_show_json(
        ctx.audit_reader,
        ctx.tz,
        t0,
        a.request,
        actor=a.actor,
        action=a.action,
        limit=a.limit,
    )


def audit_verify(ctx: Context, caller: Caller, a: NoArgs) -> Any:
    """The hash chain checked against itself and its head file."""
    return audit_verify_json(ctx.audit)


def view_prepare(ctx: Context, caller: Caller, a: IdArgs) -> Any:
    """Start preparing the viewing clip of a view request for its requester; its state."""
    return ctx.engine.workflow.viewings.prepare(caller, a.id)


def view_open(ctx: Context, caller: Caller, a: ViewOpen) -> Any:
    """The ready viewing clip: its facts, and an open read-only descriptor of it passed over
    the socket (none while it is not ready)."""
    result, fd = ctx.engine.workflow.viewings.open(caller, a.id, a.continued)
    return result if fd is None else WithFds(result, [fd])


def preview_frames(ctx: Context, caller: Caller, a: IdArgs) -> Any:
    """Three watermarked still frames per camera for a person who may decide the request."""
    return ctx.engine.workflow.viewings.previews(caller, a.id)


_LOGIN = "web-login"  # the audit actor of a login attempt: the name tried is not yet anyone


def auth_begin(ctx: Context, caller: Caller, a: AuthBegin) -> Any:
    """Before the password check: refused unchecked while the name or the address is locked."""
    locked = ctx.sessions().locked(a.user, a.client)
    if locked is None:
        return {"allowed": True}
    what, left = locked
    count = ctx.sessions().refusal_to_record(a.user, a.client)
    if count is not None:  # at most one entry a minute per name and address, with the count
        ctx.audit.append(
            _LOGIN,
            "auth.locked",
            a.user,
            {
                "client": a.client,
                "via": "web",
                "locked": what,
                "retry_after": round(left),
                "refused": count,
            },
        )
    return {
        "allowed": False,
        "retry_after": int(left) + 1,
        "message": "too many failed logins; try again later",
    }


def auth_finish(ctx: Context, caller: Caller, a: AuthFinish) -> Any:
    """After the password check: count a failure, or open the person's session."""
    web = ctx.sessions()
    if not a.ok:
        locked = web.failed(a.user, a.client)
        ctx.audit.append(
            _LOGIN,
            "auth.failed",
            a.user,
            {"client": a.client, "via": "web", "reason": a.reason, "locked": locked},
        )
        return {"ok": False, "locked": locked}
    try:
        person = Caller.acting_for(a.user, "web", a.client, "")
    except KeyError:
        # PAM said yes for a name the host's user database does not resolve (a module that
        # authenticates without an account): no uid, no groups, no roles
        person = None
    if person is None or not ctx.roles_for(person):
        web.failed(a.user, a.client)
        ctx.audit.append(
            _LOGIN,
            "access.denied",
            a.user,
            {"client": a.client, "via": "web", "reason": "no role in people:"},
        )
        raise PolicyRefused(
            f"{a.user} has no role in {ctx.config.source_path}; an admin adds people under people:"
        )
    web.succeeded(a.user, a.client)
    token, session = web.open(person.user, a.client)
    ctx.audit.append(
        person.user,
        "web.login",
        "web",
        {"client": a.client, "via": "web", "session": session.sid[:16]},
    )
    return {
        "ok": True,
        "session": token,
        "csrf": session.csrf,
        "user": person.user,
        "expires_in": round(web.expires_in(session)),
    }


def web_session(ctx: Context, caller: Caller, a: NoArgs) -> Any:
    """The person behind the gateway's session: name, roles, level, CSRF token, time left."""
    web = ctx.sessions()
    session = web.get(caller.session or "")
    if session is None:
        raise SessionEnded("session ended; log in again")
    return {
        "user": caller.user,
        "roles": sorted(ctx.roles_for(caller)),
        "level": ctx.engine.workflow.actor(caller).level,
        "csrf": session.csrf,
        "session": session.sid[:16],
        "expires_in": round(web.expires_in(session)),
    }


def web_logout(ctx: Context, caller: Caller, a: NoArgs) -> Any:
    """End the session the gateway acts through."""
    web = ctx.sessions()
    session = web.close_digest(caller.session or "")
    if session is not None:
        ctx.audit.append(caller.user, "web.logout", "web", {"session": session.sid[:16]})
    return {"ok": True}


def notify_events(ctx: Context, caller: Caller, a: NotifyEvents) -> Any:
    """The notifications after audit seq ``after`` (default: the delivery cursor), each with its
    recipients and the deliveries already recorded, and the seq to ask from next."""
    return ctx.engine.notifications.events(a.after, a.limit)


def notify_ack(ctx: Context, caller: Caller, a: NotifyAck) -> Any:
    """Every notification up to ``upto`` is delivered or given up: the cursor moves there."""
    return ctx.engine.notifications.ack(a.upto)


def notify_report(ctx: Context, caller: Caller, a: NotifyReport) -> Any:
    """One delivery's outcome (counted; given up: audited once, attention notify_failed)."""
    return ctx.engine.notifications.report(caller.user, a.seq, a.channel, a.ok, a.error)


#: every command the daemon serves besides the socket's own ``ping``
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("status", StatusArgs, status, public=True),
        Command(
            "reload",
            NoArgs,
            reload,
            roles=RELOAD_ROLES,
            what="reload the config",
            service_account=True,
        ),
        Command("request.new", RequestNew, request_new),
        Command("request.list", RequestList, request_list),
        Command("request.show", IdArgs, request_show),
        Command("request.approve", RequestApprove, request_approve),
        Command("request.deny", IdReason, request_deny),
        Command("request.cancel", IdArgs, request_cancel),
        Command("request.resolve", IdReason, request_resolve),
        Command("export.run", ExportRun, export_run),
        Command("export.progress", IdArgs, export_progress),
        Command("export.form", IdArgs, export_form),
        Command("export.destroy", IdReason, export_destroy),
        Command("view.prepare", IdArgs, view_prepare),
        Command("view.open", ViewOpen, view_open),
        Command("preview.frames", IdArgs, preview_frames),
        Command("media.list", NoArgs, media_list),
        Command("media.enroll", MediaEnroll, media_enroll),
        Command("media.remove", MediaRemove, media_remove),
        Command("media.scan", Media, media_scan),
        Command("media.scan_progress", Media, media_scan_progress),
        Command("media.wipe", MediaWipe, media_wipe),
        Command(
            "retention.run",
            RetentionRun,
            retention_run,
            roles=SWEEP_ROLES,
            what="run a retention sweep",
            refuse=refuse_fake_now,
        ),
        Command(
            "retention.plan",
            RetentionPlan,
            retention_plan,
            roles=PLAN_ROLES,
            what="see the retention plan",
        ),
        Command("retention.confirm", RetentionConfirm, retention_confirm),
        Command("retention.confirm_root", RetentionConfirmRoot, retention_confirm_root),
        Command("hold.add", HoldAdd, hold_add),
        Command("hold.list", HoldList, hold_list),
        Command("hold.release", HoldRelease, hold_release),
        Command("key.show", NoArgs, key_show, public=True),
        Command("audit.show", AuditShow, audit_show, roles=AUDIT_ROLES, what="read the audit log"),
        Command(
            "audit.verify", NoArgs, audit_verify, roles=AUDIT_ROLES, what="verify the audit log"
        ),
        Command("auth.begin", AuthBegin, auth_begin, peer="auth"),
        Command("auth.finish", AuthFinish, auth_finish, peer="auth"),
        Command("web.session", NoArgs, web_session, peer="session"),
        Command("web.logout", NoArgs, web_logout, peer="session"),
        Command("notify.events", NotifyEvents, notify_events, peer="gateway"),
        Command("notify.ack", NotifyAck, notify_ack, peer="gateway"),
        Command("notify.report", NotifyReport, notify_report, peer="gateway"),
    )
}

#: the argument model of every command
ARGS: dict[str, type[_Args]] = {name: c.args for name, c in COMMANDS.items()}


def parse(cmd: str, args: Any) -> _Args:
    """``args`` of ``cmd`` checked against its model.

    Raises InvalidInput (exit 2) with one line naming every bad field, or for an unknown command.
    """
    model = ARGS.get(cmd)
    if model is None:
        raise InvalidInput(f"unknown command {cmd!r}; the daemon knows: {', '.join(sorted(ARGS))}")
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "(arguments)"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        raise InvalidInput(f"{cmd}: invalid arguments: " + "; ".join(parts)[:1000]) from None


def validate(cmd: str, args: Any) -> dict[str, Any]:
    """``args`` of ``cmd`` checked against its model, as a plain dict (wire names: ``from``)."""
    return parse(cmd, args).model_dump(by_alias=True)


def dispatch(ctx: Context, caller: Caller, cmd: str, args: Any) -> Any:
    """Run ``cmd`` for ``caller``: arguments validated, access checked (module docstring), then
    its handler. Unknown command or bad arguments: InvalidInput (exit 2) before anything else."""
    parsed = parse(cmd, args)
    command = COMMANDS[cmd]
    with acting_via(caller.via, caller.client):
        return _dispatch(ctx, caller, command, parsed)


def _dispatch(ctx: Context, caller: Caller, command: Command, parsed: _Args) -> Any:
    cmd = command.name
    if command.peer is not None:
        if command.peer == "session":
            allowed = caller.via == "web" and caller.session is not None
        else:
            allowed = ctx.is_peer(caller, command.peer)
        if not allowed:
            ctx.audit.append(caller.user, "access.denied", cmd, {"uid": caller.uid})
            raise PolicyRefused(f"{cmd!r} is served to the web console's own accounts only")
        return command.handler(ctx, caller, parsed)
    if command.service_account and caller.uid == ctx.service_uid:
        return command.handler(ctx, caller, parsed)
    if not command.public and not ctx.roles_for(caller):
        # someone the config does not know: refused, and the attempt is on record
        ctx.audit.append(caller.user, "access.denied", cmd, {"uid": caller.uid})
        raise PolicyRefused(
            f"{caller.user} (uid {caller.uid}) has no role in {ctx.config.source_path}; "
            "an admin adds people under `people:`"
        )
    if command.refuse is not None:
        command.refuse(ctx, caller, parsed)
    if command.roles is not None:
        ctx.require(caller, command.roles, command.what)
    return command.handler(ctx, caller, parsed)
