"""Access decisions for the retrieval workflow (调取申请 -> 审批 -> 调取): pure functions.

Nothing here touches disk, clock or network: the caller passes ``now`` and the stored request and
approvals, and gets a :class:`Decision` with a one-line reason that names the object and the next
step. The daemon stores requests and approvals (``requests.py``) and audits every decision.

The states of a request::

    pending -> approved -> exported -> closed
       |          |
       +-> denied, cancelled, expired (pending past its deadline, approved past valid_for)

Stored ``pending``/``approved`` are *re-derived* from the approvals by :func:`state_of` every time
(approvals are facts, the stored state is a cache); ``exported``, ``closed``, ``denied``,
``cancelled`` and ``expired`` are final once stored.

Steps and approvals
  A step is a role. :func:`steps_for` lists them (the site's configured steps, plus ``native_role``
  once more for a native copy); a role listed twice needs two different people. An
  :class:`Approval`'s ``role`` is the step it fills (store ``Decision.step`` of
  :func:`check_approve` as given). Each person approves a request at most once, so one person
  never fills two steps.
  The after-hours approval (``duty_role``) is not a step: it is an extra approval that
  :func:`check_export` requires when the export runs outside ``hours``.

Emergency (紧急调取)
  A request filed with ``emergency`` by someone holding an emergency role may be exported at once,
  before any approval — as a watermarked ``mp4`` only, at any hour — but only "at once": within
  ``backfill_within`` of filing. After that it needs its full approvals like any other request.
  A native (unwatermarked) copy always waits for all its approvals: no unwatermarked copy leaves
  without the extra approval. Its approvals are then back-filled; an emergency export outside
  ``hours`` also needs the duty manager's approval back-filled (the regulations: at night,
  报值班负责人审批). Until the steps are complete (late approvals still count) or an admin
  resolves it, :func:`emergency_violation` reports it once ``backfill_within`` has passed since
  the request was created.

Refusals carry exit code 3 (refused by policy); malformed input (control characters, over-long text,
non-finite times) carries exit code 2.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.model import Approval, Recipient, Request
from nvr_guard.text import Duration
from nvr_guard.text import fmt_span_exact as _span
from nvr_guard.text import printable as _show

STATES = ("pending", "approved", "exported", "closed", "denied", "cancelled", "expired")
# Stored states that no later fact changes (an exported clip stays exported, whatever comes after).
FINAL_STATES = frozenset({"exported", "closed", "denied", "cancelled", "expired"})
FORMATS = ("mp4", "native", "view")
# A viewing request (调阅): its requester watches the footage in the web console, watermarked with
# their name, until the approval's validity ends; it is never exported to media or a target.
VIEW = "view"
# Admins cancel any request and resolve emergency violations; the role name is fixed (config maps
# users and groups to it) because these checks have no rules argument.
ADMIN_ROLE = "admin"
# Who reads every request besides the people it concerns: security leads run the security side,
# auditors check the record (a read-only role: audit, requests, status), admins run the host.
SEE_ALL_ROLES = frozenset({ADMIN_ROLE, "security_lead", "auditor"})
# A camera the rules do not classify needs the wider permission (fail closed).
MAX_LEVEL = 2
# Bound every free-text field: it is printed into the approval record, the audit log and the
# watermark text file; nothing a person types should be able to fill a page or a terminal.
MAX_TEXT = 500
MAX_CAMERAS = 64

APPROVE = "approve"
DENY = "deny"


@dataclass(frozen=True)
class Actor:
    """Who acts, as the daemon resolved it from SO_PEERCRED and the config's ``people``."""

    user: str
    roles: frozenset[str]
    level: int = 1  # camera permission level: 1 internal cameras, 2 also perimeter


@dataclass(frozen=True)
class Draft:
    """A request as typed by its requester, before it is checked and stored."""

    cameras: tuple[str, ...]
    start: float
    end: float
    reason: str
    basis: str
    recipient: Recipient
    # "mp4" (watermarked) | "native" (unwatermarked stream copy, evidence) | "view" (watched in the
    # console, never exported)
    format: str = "mp4"
    emergency: bool = False


@dataclass(frozen=True)
class AccessRules:
    """The approval rules of one site (global ``approval:`` config with the site's overrides)."""

    steps: tuple[str, ...] = ("dept_manager", "security_lead")
    decide_within: int = 3  # working days
    holidays: frozenset[date] = frozenset()
    valid_for: Duration = Duration(seconds=30 * 86400)
    hours: tuple[int, int] = (480, 1200)  # minutes after local midnight, [start, end)
    duty_role: str = "duty_manager"
    # A native (unwatermarked) copy needs one more distinct approver with this role: by default a
    # second security lead, so two people of the security side vouch for an evidence copy.
    native_role: str = "security_lead"
    emergency_roles: frozenset[str] = frozenset({"security_lead"})
    backfill_within: float = 86400.0
    max_range: float = 86400.0
    technician_role: str = "technician"
    # Technicians carry out exports and do not file requests: nobody exports their own request.
    requester_roles: frozenset[str] = frozenset(
        {"operator", "dept_manager", "security_lead", "admin"}
    )
    tz: tzinfo = UTC
    # Make-up working days (调休): a Saturday or Sunday listed here counts as a working day.
    workdays: frozenset[date] = frozenset()
    # Camera id -> permission level. Everyone who approves, denies or exports a request must hold
    # the level of each of its cameras, not only its requester; a camera missing here is MAX_LEVEL.
    camera_levels: Mapping[str, int] = field(default_factory=dict, hash=False)
    # An after-hours (duty) approval covers exports within this many seconds of being given: one
    # night-time approval is not a standing licence for every later night.
    after_hours_valid: float = 12 * 3600.0
    # Separation of duties: whoever approved a request does not also carry out its export.
    approver_may_export: bool = False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    exit_code: int = 0  # 3 refused by policy, 2 malformed input
    step: str | None = None  # check_approve: the step (role) this approval fills

    def raise_if_denied(self) -> None:
        """Raise the refusal (its exit code with its reason) unless the decision allows."""
        if self.allowed:
            return
        if self.exit_code == 2:
            raise InvalidInput(self.reason)
        raise PolicyRefused(self.reason)


def _ok(reason: str, step: str | None = None) -> Decision:
    return Decision(True, reason, 0, step)


def _refuse(reason: str) -> Decision:
    return Decision(False, reason, 3)


def _malformed(reason: str) -> Decision:
    return Decision(False, reason, 2)


# --- text and time helpers ---------------------------------------------------------------------


def _bad_char(s: str) -> str | None:
    """The first character not allowed in a text field, else None.

    Refused: control characters (newline, tab, escape...), format characters (bidi overrides,
    zero-width joiners: they make the record read differently from what is stored), line and
    paragraph separators, surrogates, private-use and unassigned code points. Spaces of any kind are
    allowed, so Chinese text with full-width spaces is fine.
    """
    for c in s:
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            return c
    return None


def _text_problem(what: str, value: object, hint: str) -> Decision | None:
    """Refusal for a missing, malformed or over-long text field, else None."""
    if not isinstance(value, str):
        return _malformed(f"{what} must be text")
    bad = _bad_char(value)
    if bad is not None:
        return _malformed(
            f"{what} contains a control or invisible character ({repr(bad)[1:-1]}); "
            "write it on one line in plain text"
        )
    if len(value) > MAX_TEXT:
        return _malformed(f"{what} is {len(value)} characters long; shorten it to {MAX_TEXT}")
    if not value.strip():
        return _refuse(f"{what} is empty; {hint}")
    return None


def _at(ts: float, tz: tzinfo) -> str:
    """Site-local ISO 8601, to the minute unless the seconds matter (as typed with --from/--to)."""
    t = datetime.fromtimestamp(ts, tz)
    return t.isoformat(timespec="minutes" if t.second == 0 and t.microsecond == 0 else "seconds")


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _roles_list(roles: Iterable[str]) -> str:
    """``dept_manager, 2× security_lead`` in first-seen order."""
    counts = Counter(roles)
    return ", ".join(r if n == 1 else f"{n}× {r}" for r, n in counts.items())


def _roles_text(roles: Iterable[str]) -> str:
    return ", ".join(sorted(roles)) or "(none configured)"


def _is_admin(actor: Actor) -> bool:
    return ADMIN_ROLE in actor.roles


def camera_level(camera: str, rules: AccessRules) -> int:
    return rules.camera_levels.get(camera, MAX_LEVEL)


def _above_level(request: Request, actor: Actor, rules: AccessRules) -> tuple[str, int] | None:
    """The first camera of ``request`` above ``actor``'s level, with its level; else None."""
    for cam in request.cameras:
        level = camera_level(cam, rules)
        if level > actor.level:
            return cam, level
    return None


def _level_refusal(
    request: Request, actor: Actor, rules: AccessRules, doing: str
) -> Decision | None:
    above = _above_level(request, actor, rules)
    if above is None:
        return None
    cam, level = above
    return _refuse(
        f"request {request.id} has camera {_show(cam)} at level {level}"
        f"{' (perimeter)' if level >= 2 else ''}, above {_show(actor.user)}'s level "
        f"{actor.level}: {_show(actor.user)} may not {doing} it; "
        f"ask a person with level {level}"
    )


# --- working days, hours ------------------------------------------------------------------------


def is_working_day(d: date, rules: AccessRules) -> bool:
    """Monday to Friday, minus ``holidays``, plus ``workdays`` (a date in both is a holiday)."""
    if d in rules.holidays:
        return False
    return d in rules.workdays or d.weekday() < 5


def decide_deadline(created: float, rules: AccessRules) -> float:
    """When a pending request expires: ``decide_within`` working days after ``created``.

    Counted on the site's wall calendar (``rules.tz``). Filed on a working day at wall time T, the
    deadline is T on the Nth following working day (Friday 17:00 + 3 -> Wednesday 17:00; Thursday
    10:00 + 3 with Monday a holiday -> Wednesday 10:00). Filed on a weekend or holiday, counting
    starts at 00:00 of the next working day and N whole working days must pass (Saturday + 3 ->
    Thursday 00:00). Both are "N × 24 h of working time have elapsed". ``decide_within`` 0 means
    the request expires at once unless approved in the same instant.
    """
    n = rules.decide_within
    if n <= 0:
        return created
    local = datetime.fromtimestamp(created, rules.tz)
    d = local.date()
    filed_on_working_day = is_working_day(d, rules)
    counted = 0
    # The holiday list is finite, so at most len(holidays) + 2 days per counted day are skipped.
    while counted < n:
        d += timedelta(days=1)
        if is_working_day(d, rules):
            counted += 1
    if filed_on_working_day:
        wall = local.time().replace(tzinfo=None, fold=0)
        return datetime.combine(d, wall, tzinfo=rules.tz).timestamp()
    return datetime.combine(d + timedelta(days=1), time(0), tzinfo=rules.tz).timestamp()


def outside_hours(now: float, rules: AccessRules) -> bool:
    """True when ``now`` (site-local wall time) is outside the ``hours`` window [start, end)."""
    local = datetime.fromtimestamp(now, rules.tz)
    m = local.hour * 60 + local.minute
    start, end = rules.hours
    if start <= end:
        return not (start <= m < end)
    # A window across midnight (e.g. 20:00-08:00) for a site working nights.
    return not (m >= start or m < end)


def _hours_text(rules: AccessRules) -> str:
    return f"{_hhmm(rules.hours[0])}-{_hhmm(rules.hours[1])}"


# --- steps and derived state --------------------------------------------------------------------


def steps_for(request: Request, rules: AccessRules) -> tuple[str, ...]:
    """The approval steps of a request: the configured ones, plus ``native_role`` once more for a
    native copy (a further distinct person, even when that role is already a step)."""
    if request.format == "native":
        return (*rules.steps, rules.native_role)
    return tuple(rules.steps)


def _backfill_steps(request: Request, rules: AccessRules) -> tuple[str, ...]:
    """What an exported emergency request must collect: its steps, and the duty manager when the
    export ran outside hours."""
    steps = steps_for(request, rules)
    if request.exported_at is not None and outside_hours(request.exported_at, rules):
        steps = (*steps, rules.duty_role)
    return steps


def _valid_approvals(
    request: Request, approvals: Sequence[Approval], rules: AccessRules
) -> list[Approval]:
    """Approvals that count: "approve" decisions, not by the requester, nor by its exporter unless
    ``approver_may_export``, each person's first one only (check_approve never lets these happen;
    this keeps a hand-edited catalog, or one written before the exporter was checked, from
    cheating: a back-filled approval by the exporter does not close a violation)."""
    seen: set[str] = set()
    out: list[Approval] = []
    exporter = None if rules.approver_may_export else request.exporter
    for a in sorted(approvals, key=lambda a: a.time):
        if (
            a.decision != APPROVE
            or a.approver == request.requester
            or a.approver == exporter
            or a.approver in seen
        ):
            continue
        seen.add(a.approver)
        out.append(a)
    return out


def _fill(steps: Sequence[str], approvals: Sequence[Approval]) -> tuple[list[str], float | None]:
    """(open steps, time the last needed step was filled or None while any is open)."""
    by_role: dict[str, list[float]] = {}
    for a in approvals:
        by_role.setdefault(a.role, []).append(a.time)
    need = Counter(steps)
    missing: list[str] = []
    done_at: float | None = None
    for role in dict.fromkeys(steps):  # first-seen order, for messages
        times = sorted(by_role.get(role, []))
        n = need[role]
        if len(times) < n:
            missing.extend([role] * (n - len(times)))
        elif n:
            t = times[n - 1]
            done_at = t if done_at is None else max(done_at, t)
    return missing, (None if missing else done_at)


def open_steps(
    request: Request, approvals: Sequence[Approval], rules: AccessRules
) -> tuple[str, ...]:
    """Steps still waiting for an approver (a role appears once per person still needed). For an
    exported emergency request, the duty manager is included when its export ran outside hours."""
    steps = _backfill_steps(request, rules) if request.emergency else steps_for(request, rules)
    return tuple(_fill(steps, _valid_approvals(request, approvals, rules))[0])


def approved_at(
    request: Request, approvals: Sequence[Approval], rules: AccessRules
) -> float | None:
    """When the last step of the request was approved; None while a step is open. Store this as
    ``Request.approved_at`` when the state turns approved."""
    return _fill(steps_for(request, rules), _valid_approvals(request, approvals, rules))[1]


def valid_until(
    request: Request, approvals: Sequence[Approval], rules: AccessRules
) -> float | None:
    """End of the approval's validity (``approved_at`` + ``valid_for`` on the site's calendar)."""
    at = approved_at(request, approvals, rules)
    return None if at is None else rules.valid_for.after_ts(at, rules.tz)


def _denial(approvals: Sequence[Approval]) -> Approval | None:
    return next((a for a in sorted(approvals, key=lambda a: a.time) if a.decision == DENY), None)


def state_of(
    request: Request, approvals: Sequence[Approval], now: float, rules: AccessRules
) -> str:
    """The request's state at ``now``: final stored states stay; otherwise any denial -> denied;
    all steps approved -> approved, or expired once ``valid_for`` has passed since the last step;
    steps open -> pending, or expired from the decision deadline on."""
    if request.state in FINAL_STATES:
        return request.state
    if _denial(approvals) is not None:
        return "denied"
    at = approved_at(request, approvals, rules)
    if at is not None:
        return "expired" if now >= rules.valid_for.after_ts(at, rules.tz) else "approved"
    return "expired" if now >= decide_deadline(request.created, rules) else "pending"


def _not_open(
    request: Request, state: str, approvals: Sequence[Approval], rules: AccessRules
) -> str:
    """Why a request in a final state takes no further action, with what to do instead."""
    rid = request.id
    if state == "denied":
        d = _denial(approvals)
        by = f" by {_show(d.approver)}" if d else ""
        return f"request {rid} was denied{by}; file a new request"
    if state == "cancelled":
        return f"request {rid} was cancelled; file a new request"
    if state == "expired":
        until = valid_until(request, approvals, rules)
        if until is not None:
            return (
                f"request {rid} expired: its approval was valid until {_at(until, rules.tz)} "
                f"({rules.valid_for}); file a new request"
            )
        deadline = decide_deadline(request.created, rules)
        return (
            f"request {rid} expired: no decision within {rules.decide_within} working days "
            f"(due {_at(deadline, rules.tz)}); file a new request"
        )
    if state == "exported":
        when = f" on {_at(request.exported_at, rules.tz)}" if request.exported_at else ""
        return f"request {rid} was already exported{when}; file a new request for another copy"
    return f"request {rid} is {state}; file a new request"


# --- decisions ----------------------------------------------------------------------------------


def check_new(
    draft: Draft,
    actor: Actor,
    camera_levels: Mapping[str, int],
    footage_segments: int,
    rules: AccessRules,
    now: float,
) -> Decision:
    """May ``actor`` file this request? Checks in the order a person fixes them: who, what, when."""
    if not (actor.roles & rules.requester_roles):
        return _refuse(
            f"{_show(actor.user)} may not file requests "
            f"(roles: {', '.join(sorted(actor.roles)) or 'none'}); "
            f"requests are filed by: {', '.join(sorted(rules.requester_roles))}"
        )
    if draft.emergency and not (actor.roles & rules.emergency_roles):
        return _refuse(
            f"--emergency needs one of the roles {_roles_text(rules.emergency_roles)}; "
            f"{_show(actor.user)} has none; file a normal request, or ask a person who has one"
        )

    # Required fields (a request without these is refused), then their form.
    texts = (
        ("reason", draft.reason, "say why the footage is needed (--reason)"),
        ("legal basis", draft.basis, "name the law, case or rule that allows it (--basis)"),
        ("recipient unit", draft.recipient.unit, "name the receiving organisation (--recipient)"),
        (
            "recipient person",
            draft.recipient.person,
            "name the person who receives it (--recipient)",
        ),
        (
            "recipient contact",
            draft.recipient.contact,
            "give a phone number or address (--recipient)",
        ),
    )
    if not draft.cameras:
        return _refuse("cameras: none given; name at least one camera (--camera C[,C])")
    if not isinstance(draft.format, str) or not draft.format.strip():
        return _refuse(
            "format is empty; write --format mp4 (watermarked), --format native or --format view"
        )
    for what, value, hint in texts:
        problem = _text_problem(what, value, hint)
        if problem is not None:
            return problem
    if draft.format not in FORMATS:
        return _refuse(
            f"format {_show(draft.format)!r} is not known; write --format mp4 (watermarked), "
            "--format native (unwatermarked evidence copy) or --format view (watched in the web "
            "console, never copied)"
        )

    if len(draft.cameras) > MAX_CAMERAS:
        return _malformed(f"cameras: {len(draft.cameras)} given; name at most {MAX_CAMERAS}")
    seen: set[str] = set()
    for cam in draft.cameras:
        if not isinstance(cam, str) or not cam.strip():
            return _refuse("cameras: an empty camera name; list camera ids separated by commas")
        if cam in seen:
            return _refuse(f"camera {_show(cam)} is listed twice; name each camera once")
        seen.add(cam)
        if cam not in camera_levels:
            return _refuse(
                f"camera {_show(cam)} is not known at this site; "
                "see `nvr-guard status` for the site's cameras"
            )
        level = camera_levels[cam]
        if level > actor.level:
            return _refuse(
                f"camera {_show(cam)} is level {level}"
                f"{' (perimeter)' if level >= 2 else ''}, above {_show(actor.user)}'s level "
                f"{actor.level}; remove it or ask a user with level {level} to file the request"
            )

    start, end = draft.start, draft.end
    if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in (start, end)):
        return _malformed("from/to must be finite times; write ISO 8601 times")
    if start >= end:
        return _refuse(
            f"from ({_at(start, rules.tz)}) is not before to ({_at(end, rules.tz)}); "
            "give a range that starts before it ends"
        )
    if end - start > rules.max_range:
        return _refuse(
            f"the range {_at(start, rules.tz)} .. {_at(end, rules.tz)} is "
            f"{_span(end - start)} long, over the {_span(rules.max_range)} a request may cover; "
            "split it into several requests"
        )
    if end > now:
        # Requests retrieve what was recorded; holding and exporting footage not yet recorded
        # would turn a retrieval into surveillance planning.
        return _refuse(
            f"to ({_at(end, rules.tz)}) is in the future; request footage once it is recorded"
        )
    if footage_segments <= 0:
        return _refuse(
            f"no footage of {', '.join(_show(c) for c in draft.cameras)} between "
            f"{_at(start, rules.tz)} and {_at(end, rules.tz)}; check the cameras and times "
            "(a time without an offset is site-local)"
        )
    what = "emergency request" if draft.emergency else "request"
    return _ok(f"{what} by {_show(actor.user)} for {', '.join(draft.cameras)} may be filed")


def check_approve(
    request: Request,
    approvals: Sequence[Approval],
    actor: Actor,
    rules: AccessRules,
    now: float,
    *,
    as_step: str | None = None,
    note: str = "",
) -> Decision:
    """May ``actor`` approve ``request`` now? ``Decision.step`` is the step it fills.

    The actor fills the first open step whose role they hold (configured order), else — if they
    hold ``duty_role`` and nobody gave it yet — the after-hours approval. ``as_step`` picks a
    particular one (e.g. a duty manager who is also a department manager approving after hours).
    Pending requests take step approvals; approved ones only the after-hours approval; an
    exported emergency request takes its back-filled approvals.
    """
    rid = request.id
    if not isinstance(note, str):
        return _malformed("note must be text")
    bad = _bad_char(note)
    if bad is not None:
        return _malformed(
            f"note contains a control or invisible character ({repr(bad)[1:-1]}); "
            "write it on one line"
        )
    if len(note) > MAX_TEXT:
        return _malformed(f"note is {len(note)} characters long; shorten it to {MAX_TEXT}")
    if actor.user == request.requester:
        return _refuse(
            f"{_show(actor.user)} filed request {rid} and may not approve it; "
            "another person holding the step's role must approve"
        )
    mine = [a for a in approvals if a.approver == actor.user]
    if mine:
        return _refuse(
            f"{_show(actor.user)} already decided on request {rid} (as {_show(mine[0].role)}); "
            "each step needs a different person"
        )
    if request.exporter == actor.user and not rules.approver_may_export:
        # Separation of duties in the other order: an emergency export comes before its
        # approvals, and whoever took the footage off the box does not vouch for it afterwards.
        return _refuse(
            f"{_show(actor.user)} exported request {rid} and may not also approve it "
            "(separation of duties); another person holding the step's role must approve, "
            "or set approval.approver_may_export: true"
        )
    level = _level_refusal(request, actor, rules, "approve")
    if level is not None:
        return level

    state = state_of(request, approvals, now, rules)
    backfill = request.emergency and state == "exported"
    if state not in ("pending", "approved") and not backfill:
        return _refuse(_not_open(request, state, approvals, rules))

    open_ = open_steps(request, approvals, rules)
    candidates = [r for r in dict.fromkeys(open_) if r in actor.roles]
    # an after-hours approval that no longer covers exports may be given again (by another
    # duty manager: each person decides once)
    duty_given = bool(_duty_cover(request, approvals, rules, now))
    if (
        not backfill
        and rules.duty_role in actor.roles
        and not duty_given
        and rules.duty_role not in candidates
    ):
        candidates.append(rules.duty_role)

    if as_step is not None:
        if as_step not in candidates:
            still = _roles_list(open_) or "none"
            return _refuse(
                f"{_show(actor.user)} cannot approve request {rid} as {_show(as_step)} "
                f"(open steps: {still}; {_show(actor.user)}'s roles: "
                f"{', '.join(sorted(actor.roles)) or 'none'})"
            )
        step = as_step
    elif candidates:
        step = candidates[0]
    elif not open_:
        return _refuse(
            f"request {rid} needs no further approval (all steps approved"
            f"{'' if not duty_given else ', after-hours approval given'})"
        )
    else:
        return _refuse(
            f"{_show(actor.user)} holds none of the roles request {rid} still needs "
            f"({_roles_list(open_)}); ask a person with one of them"
        )

    if step == rules.duty_role and step not in open_:
        return _ok(f"{_show(actor.user)} gives the after-hours approval on request {rid}", step)
    return _ok(f"{_show(actor.user)} approves request {rid} as {step}", step)


def check_deny(
    request: Request,
    actor: Actor,
    reason: str,
    rules: AccessRules,
    now: float,
    approvals: Sequence[Approval] = (),
) -> Decision:
    """May ``actor`` deny ``request``? Needs a reason; by a holder of one of its step roles or an
    admin, never the requester (who cancels instead). Allowed while pending or approved (an
    approval can be withdrawn until the export), and on an exported emergency request, to record
    that it will not be backed."""
    rid = request.id
    problem = _text_problem("reason", reason, "say why the request is denied (--reason)")
    if problem is not None:
        return problem
    if actor.user == request.requester:
        return _refuse(
            f"{_show(actor.user)} filed request {rid}; "
            f"withdraw it with `nvr-guard request cancel {rid}`"
        )
    steps = set(steps_for(request, rules))
    if not (actor.roles & steps) and not _is_admin(actor):
        return _refuse(
            f"{_show(actor.user)} may not deny request {rid}: that needs one of its approver roles "
            f"({', '.join(sorted(steps))}) or admin"
        )
    if not _is_admin(actor):
        level = _level_refusal(request, actor, rules, "deny")
        if level is not None:
            return level
    state = state_of(request, approvals, now, rules)
    if state not in ("pending", "approved") and not (request.emergency and state == "exported"):
        return _refuse(_not_open(request, state, approvals, rules))
    return _ok(f"{_show(actor.user)} denies request {rid}")


def check_cancel(request: Request, actor: Actor, now: float) -> Decision:
    """May ``actor`` cancel ``request``? The requester or an admin, while pending or approved.
    Pass the request with its derived state (:func:`state_of`)."""
    rid = request.id
    if actor.user != request.requester and not _is_admin(actor):
        return _refuse(
            f"only the requester ({_show(request.requester)}) or an admin may cancel "
            f"request {rid}; "
            "an approver refuses with `nvr-guard request deny`"
        )
    if request.state not in ("pending", "approved"):
        return _refuse(
            f"request {rid} is {request.state}; only a pending or approved request can be cancelled"
        )
    return _ok(f"{_show(actor.user)} cancels request {rid}")


def _duty_cover(
    request: Request, approvals: Sequence[Approval], rules: AccessRules, now: float
) -> list[Approval]:
    """After-hours approvals that cover an export at ``now``: given at most ``after_hours_valid``
    seconds earlier (and not in the future)."""
    return [
        a
        for a in _valid_approvals(request, approvals, rules)
        if a.role == rules.duty_role and 0 <= now - a.time < rules.after_hours_valid
    ]


def emergency_open(request: Request, rules: AccessRules, now: float) -> bool:
    """Is the "at once" path of an emergency request still open? Only within ``backfill_within``
    of filing: after that the emergency has become a request like any other, with its approvals
    to collect first."""
    return request.emergency and now < request.created + rules.backfill_within


def check_export(
    request: Request,
    approvals: Sequence[Approval],
    actor: Actor,
    rules: AccessRules,
    now: float,
) -> Decision:
    """May ``actor`` carry out the export of ``request`` now? One export per request.

    Checked again at the moment the package is committed, so the answer must hold then too.
    """
    rid = request.id
    if request.format == VIEW:
        # a viewing request's footage is watched where it is kept, never copied off the box
        return _refuse(
            f"request {rid} is a viewing request (调阅, --format view): its requester watches it "
            "in the web console and it is never exported to media or a target; file a request "
            "with --format mp4 for a copy"
        )
    if rules.technician_role not in actor.roles:
        return _refuse(
            f"only a {rules.technician_role} carries out exports; {_show(actor.user)} has roles: "
            f"{', '.join(sorted(actor.roles)) or 'none'}"
        )
    if actor.user == request.requester:
        # Separation of duties: whoever asked for the footage does not also take it off the box.
        return _refuse(
            f"{_show(actor.user)} filed request {rid} and may not export it; ask another technician"
        )
    if not rules.approver_may_export:
        valid = _valid_approvals(request, approvals, rules)
        mine = next((a for a in valid if a.approver == actor.user), None)
        if mine is not None:
            # ... nor does whoever vouched for it: two people must agree for footage to leave.
            return _refuse(
                f"{_show(actor.user)} approved request {rid} (as {_show(mine.role)}) and may not "
                "also export it (separation of duties); ask another technician, or set "
                "approval.approver_may_export: true"
            )
    level = _level_refusal(request, actor, rules, "export")
    if level is not None:
        return level
    if request.exported_at is not None or request.state in ("exported", "closed"):
        when = f" on {_at(request.exported_at, rules.tz)}" if request.exported_at else ""
        return _refuse(
            f"request {rid} was already exported{when}; one export per request — "
            "file a new request for another copy"
        )
    state = state_of(request, approvals, now, rules)
    if state not in ("pending", "approved"):
        return _refuse(_not_open(request, state, approvals, rules))

    if request.format == "mp4" and emergency_open(request, rules, now):
        due = request.created + rules.backfill_within
        return _ok(
            f"emergency export of request {rid}: "
            f"its approvals must be complete by {_at(due, rules.tz)}"
        )
    if state != "approved":
        missing = _roles_list(open_steps(request, approvals, rules))
        native = (
            f"; a native copy needs a further distinct {rules.native_role}"
            if request.format == "native"
            else ""
        )
        if not request.emergency:
            emergency = ""
        elif request.format != "mp4":
            emergency = "; an emergency request exports at once only as mp4"
        else:
            closed = request.created + rules.backfill_within
            emergency = (
                f"; its emergency window closed at {_at(closed, rules.tz)} "
                f"({_span(rules.backfill_within)} after filing): it needs its full approvals now"
            )
        return _refuse(f"request {rid} is not approved yet (missing: {missing}){native}{emergency}")

    if outside_hours(now, rules) and not _duty_cover(request, approvals, rules, now):
        local = datetime.fromtimestamp(now, rules.tz).strftime("%H:%M")
        valid = _valid_approvals(request, approvals, rules)
        stale = [a for a in valid if a.role == rules.duty_role]
        lapsed = (
            f" (the after-hours approval by {_show(stale[-1].approver)} on "
            f"{_at(stale[-1].time, rules.tz)} covered exports for "
            f"{_span(rules.after_hours_valid)})"
            if stale
            else ""
        )
        return _refuse(
            f"{local} is outside export hours {_hours_text(rules)}: request {rid} needs an "
            f"extra approval by a {rules.duty_role}{lapsed} "
            f"(`nvr-guard request approve {rid}` by the duty manager)"
        )
    until = valid_until(request, approvals, rules)
    tail = f", valid until {_at(until, rules.tz)}" if until is not None else ""
    return _ok(f"request {rid} is approved{tail}")


def check_view(
    request: Request, approvals: Sequence[Approval], actor: Actor, rules: AccessRules
) -> Decision:
    """May ``actor`` read ``request`` (reason, recipient and contact, approvals)?

    Its requester; anyone who decided on it; the people who may decide it (a holder of one of its
    step roles or the after-hours role) or export it (a technician; not for a viewing request,
    which is never exported), in both cases with the level of each of its cameras; and security
    leads, auditors and admins. Nobody else: a request names a person to contact and why footage
    is wanted.
    """
    rid = request.id
    if actor.user == request.requester or actor.roles & SEE_ALL_ROLES:
        return _ok(f"{_show(actor.user)} may see request {rid}")
    if any(a.approver == actor.user for a in approvals):
        return _ok(f"{_show(actor.user)} decided on request {rid}")
    concerned = {*steps_for(request, rules), rules.duty_role}
    if request.format != "view":  # a viewing request is never exported: no technician's business
        concerned.add(rules.technician_role)
    if actor.roles & concerned:
        level = _level_refusal(request, actor, rules, "see, decide or export")
        if level is not None:
            return level
        return _ok(f"{_show(actor.user)} may decide or export request {rid}")
    return not_shown(actor, rid)


def not_shown(actor: Actor, rid: int) -> Decision:
    """The refusal for a request ``actor`` may not see. Also given for an id that does not exist
    to anyone who does not see every request, so ids cannot be probed for what exists."""
    return _refuse(
        f"{_show(actor.user)} may not see request {rid}: a request is shown to its requester, "
        "the people who decide or export it, security leads, auditors and admins"
    )


def check_watch(
    request: Request,
    approvals: Sequence[Approval],
    actor: Actor,
    rules: AccessRules,
    now: float,
) -> Decision:
    """May ``actor`` watch the footage of ``request`` now (调阅)? Only its requester, only a
    viewing request, only while it is approved and within the approval's validity (the
    ``valid_until`` an export is held to), with the level of each of its cameras; outside
    ``hours`` only with a current after-hours approval, as for an export."""
    rid = request.id
    if request.format != VIEW:
        return _refuse(
            f"request {rid} is not a viewing request (format {_show(request.format)}); footage "
            "is watched only through a request filed with --format view"
        )
    if actor.user != request.requester:
        return _refuse(
            f"{_show(actor.user)} may not watch request {rid}: only its requester "
            f"({_show(request.requester)}) watches a viewing request"
        )
    level = _level_refusal(request, actor, rules, "watch")
    if level is not None:
        return level
    state = state_of(request, approvals, now, rules)
    if state == "pending":
        missing = _roles_list(open_steps(request, approvals, rules))
        return _refuse(f"request {rid} is not approved yet (missing: {missing})")
    if state != "approved":
        return _refuse(_not_open(request, state, approvals, rules))
    if outside_hours(now, rules) and not _duty_cover(request, approvals, rules, now):
        local = datetime.fromtimestamp(now, rules.tz).strftime("%H:%M")
        return _refuse(
            f"{local} is outside viewing hours {_hours_text(rules)}: request {rid} needs an "
            f"extra approval by a {rules.duty_role} "
            f"(`nvr-guard request approve {rid}` by the duty manager)"
        )
    until = valid_until(request, approvals, rules)
    tail = f" until {_at(until, rules.tz)}" if until is not None else ""
    return _ok(f"{_show(actor.user)} may watch request {rid}{tail}")


def check_preview(
    request: Request,
    approvals: Sequence[Approval],
    actor: Actor,
    rules: AccessRules,
    now: float,
) -> Decision:
    """May ``actor`` see still frames of ``request`` to decide it? Only a person who may approve
    it now (holds the role of one of its open steps, or gives the after-hours approval, and is
    not its requester), with the level of every one of its cameras."""
    d = check_approve(request, approvals, actor, rules, now)
    if not d.allowed:
        return _refuse(
            f"{_show(actor.user)} may not see previews of request {request.id}: previews are "
            f"for the people who may decide it now ({d.reason})"
        )
    return _ok(f"{_show(actor.user)} may see previews of request {request.id}")


def emergency_violation(
    request: Request, approvals: Sequence[Approval], now: float, rules: AccessRules
) -> str | None:
    """One line when an exported emergency request is not backed by its approvals
    ``backfill_within`` after it was created and no admin resolved it; else None. Late approvals
    close it (the audit log keeps when they came). A request never exported is no violation:
    no footage left the box."""
    if not request.emergency or request.resolved or request.exported_at is None:
        return None
    if now < request.created + rules.backfill_within:
        return None
    missing = open_steps(request, approvals, rules)
    denial = _denial(approvals)
    if not missing and denial is None:
        return None
    what = f"missing: {_roles_list(missing)}" if missing else ""
    if denial is not None:
        what = f"denied by {_show(denial.approver)}" + (f"; {what}" if what else "")
    return (
        f"request {request.id}: emergency export on {_at(request.exported_at, rules.tz)} "
        f"not backed by approvals within {_span(rules.backfill_within)} ({what})"
    )


def check_resolve(request: Request, actor: Actor, reason: str) -> Decision:
    """May ``actor`` resolve the emergency violation of ``request``? An admin, not the requester,
    with a reason. Whether a violation is open is :func:`emergency_violation`'s to say."""
    rid = request.id
    problem = _text_problem("reason", reason, "say why the violation is resolved (--reason)")
    if problem is not None:
        return problem
    if not _is_admin(actor):
        return _refuse(f"only an admin resolves violations; {_show(actor.user)} is not an admin")
    if actor.user == request.requester:
        return _refuse(
            f"{_show(actor.user)} filed request {rid} and may not resolve its violation; "
            "ask another admin"
        )
    if not request.emergency:
        return _refuse(f"request {rid} is not an emergency request; it has no violation to resolve")
    if request.resolved:
        return _refuse(f"request {rid}'s violation is already resolved: {_show(request.resolved)}")
    return _ok(f"{_show(actor.user)} resolves the violation of request {rid}")


# --- holds --------------------------------------------------------------------------------------


def hold_range(request: Request, margin: float) -> tuple[float, float]:
    """The recorded-time range a request holds: its range widened by ``margin`` on both sides, so
    the segments that straddle its edges are kept too."""
    return request.start - margin, request.end + margin


def hold_until(request: Request, now: float, preserve: float) -> float | None:
    """When the request's hold ends; None while it stands open-ended (pending, approved).

    Pass the request with its derived state. Denied, cancelled or expired: it ends at
    ``closed_at`` (when that was recorded) else ``now``. Exported (and closed after export):
    ``preserve`` seconds after the export, so the source stays available while the copy is
    questioned.
    """
    if request.exported_at is not None:
        return request.exported_at + preserve
    if request.state in ("pending", "approved"):
        return None
    return request.closed_at if request.closed_at is not None else now


__all__ = [
    "ADMIN_ROLE",
    "FORMATS",
    "MAX_LEVEL",
    "SEE_ALL_ROLES",
    "VIEW",
    "STATES",
    "AccessRules",
    "Actor",
    "Approval",
    "Decision",
    "Draft",
    "Recipient",
    "Request",
    "approved_at",
    "check_approve",
    "check_cancel",
    "check_deny",
    "check_export",
    "check_new",
    "check_view",
    "check_watch",
    "check_preview",
    "check_resolve",
    "camera_level",
    "decide_deadline",
    "emergency_open",
    "emergency_violation",
    "hold_range",
    "hold_until",
    "is_working_day",
    "not_shown",
    "open_steps",
    "outside_hours",
    "state_of",
    "steps_for",
    "valid_until",
]
