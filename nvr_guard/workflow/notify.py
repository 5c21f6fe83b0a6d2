"""Notifications: who hears what about a request, derived from the audit log.

The daemon has no network; the web service delivers (``nvr_guard.web.notify``). It asks for the
events after a cursor (an audit seq) with ``notify.events``, reports each delivery's outcome with
``notify.report`` and moves the cursor with ``notify.ack``; the cursor and the outcomes are kept
here (``store.notify``), so a restarted web service neither loses nor repeats a notification.

What is an event, from which audit entry:

* ``request.new``, and a ``request.approve`` that filled a step while another stays open:
  ``waiting``, to the people who may decide its next open step (its role by ``people.users`` or
  a Unix group in ``people.groups``, the level of each of its cameras; never its requester, nor
  anyone who already decided on it, nor its exporter unless approvers may export);
* the ``request.approve`` that filled its last step: ``approved``, to the requester;
* the first ``request.deny``: ``denied``, to the requester;
* ``request.expired``: ``expired``, to the requester;
* ``request.violation``: ``violation``, to every security lead and admin.

An event says no more than ``request show`` shows those it goes to, and less: not the reason nor
the recipient's contact (mail crosses a relay); the link leads to the page, behind a login.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nvr_guard import attention
from nvr_guard.config.models import People
from nvr_guard.errors import InvalidInput
from nvr_guard.identity import Caller
from nvr_guard.model import Approval, Request
from nvr_guard.store.audit import AuditEntry
from nvr_guard.store.notify import NotifyStore
from nvr_guard.times import iso
from nvr_guard.workflow import access
from nvr_guard.workflow.requests import Workflow

ACTIONS = (
    "request.new",
    "request.approve",
    "request.deny",
    "request.expired",
    "request.violation",
)
KINDS = ("waiting", "approved", "denied", "expired", "violation")
VIOLATION_ROLES = frozenset({"security_lead", "admin"})
MAX_EVENTS = 500

ROLE_ZH = {
    "dept_manager": "部门经理",
    "security_lead": "安全主管",
    "duty_manager": "值班经理",
    "admin": "管理员",
    "technician": "技术员",
    "operator": "操作员",
    "auditor": "审计员",
}


# ---- pure parts ---------------------------------------------------------------------------------


def address(user: str, people: People, domain: str | None) -> str | None:
    """Where ``user``'s mail goes: ``people.users.<user>.email``, else ``user@domain`` when the
    relay names a domain, else nowhere."""
    u = people.users.get(user)
    if u is not None and u.email:
        return str(u.email)
    if domain:
        return f"{user}@{domain}"
    return None


def deciders(
    request: Request,
    step: str,
    decided: Iterable[str],
    rules: access.AccessRules,
    actors: Iterable[access.Actor],
) -> list[str]:
    """Who may decide ``step`` of ``request``: holders of its role with the level of each of its
    cameras, not its requester, not who already decided, not its exporter (unless approvers may
    export). Sorted by name."""
    done = set(decided)
    need = max((access.camera_level(c, rules) for c in request.cameras), default=1)
    out = set()
    for a in actors:
        if step not in a.roles or a.level < need:
            continue
        if a.user == request.requester or a.user in done:
            continue
        if request.exporter == a.user and not rules.approver_may_export:
            continue
        out.add(a.user)
    return sorted(out)


def holders(roles: frozenset[str], actors: Iterable[access.Actor]) -> list[str]:
    """Everyone holding one of ``roles``, sorted by name."""
    return sorted({a.user for a in actors if a.roles & roles})


@dataclass(frozen=True)
class Facts:
    """What an event needs to know of its request, as it stood at the audit entry."""

    request: Request
    rules: access.AccessRules | None  # None: the site is no longer configured
    before: Sequence[Approval]  # decisions before the entry
    after: Sequence[Approval]  # decisions up to and including the entry


def classify(entry: AuditEntry, facts: Facts) -> tuple[str, str | None] | None:
    """(kind, step) of the event ``entry`` makes, or None when it makes none (an after-hours
    approval while the steps stay as they were, a second denial)."""
    r, rules = facts.request, facts.rules
    action = entry.action
    if action == "request.expired":
        return ("expired", None)
    if action == "request.violation":
        return ("violation", None)
    if action == "request.deny":
        if any(a.decision == access.DENY for a in facts.before):
            return None
        return ("denied", None)
    if rules is None:
        return None
    open_after = access.open_steps(r, facts.after, rules)
    if action == "request.new":
        return ("waiting", open_after[0]) if open_after else None
    if action == "request.approve":
        if any(a.decision == access.DENY for a in facts.after):
            return None
        open_before = access.open_steps(r, facts.before, rules)
        if len(open_after) >= len(open_before):
            return None  # no step filled (an after-hours approval)
        if open_after:
            return ("waiting", open_after[0])
        return ("approved", None)
    return None


def texts(kind: str, r: Request, step: str | None, entry: AuditEntry, tz: Any) -> tuple[str, str]:
    """(subject, text) of an event, in Chinese then English."""
    rid = r.id
    cams = ", ".join(r.cameras)
    span_zh = f"{iso(r.start, tz)} 至 {iso(r.end, tz)}"
    span_en = f"{iso(r.start, tz)} to {iso(r.end, tz)}"
    what_zh = f"调取申请 #{rid}（申请人 {r.requester}，站点 {r.site}，摄像机 {cams}，{span_zh}）"
    what_en = f"Request #{rid} by {r.requester} (site {r.site}, cameras {cams}, {span_en})"
    if kind == "waiting":
        role = step or ""
        subject = f"[nvr-guard] 调取申请 #{rid} 待您审批 / Request #{rid} awaits your decision"
        zh = f"{what_zh}等待{ROLE_ZH.get(role, role)}审批。"
        en = f"{what_en} waits for a decision as {role}."
    elif kind == "approved":
        subject = f"[nvr-guard] 调取申请 #{rid} 已批准 / Request #{rid} is approved"
        zh = f"{what_zh}已获全部审批。"
        en = f"{what_en} is approved by every step."
    elif kind == "denied":
        reason = str(entry.details.get("reason") or "")
        subject = f"[nvr-guard] 调取申请 #{rid} 被驳回 / Request #{rid} was denied"
        zh = f"{what_zh}被 {entry.actor} 驳回：{reason}"
        en = f"{what_en} was denied by {entry.actor}: {reason}"
    elif kind == "expired":
        was = str(entry.details.get("was") or "")
        subject = f"[nvr-guard] 调取申请 #{rid} 已过期 / Request #{rid} has expired"
        if was == "approved":
            zh = f"{what_zh}的批准已过有效期；如仍需要，请重新申请。"
            en = f"{what_en}: its approval is no longer valid; file a new request if needed."
        else:
            zh = f"{what_zh}未在期限内审批，已过期；如仍需要，请重新申请。"
            en = f"{what_en} was not decided in time and has expired; file a new one if needed."
    else:
        line = str(entry.details.get("violation") or "")
        subject = f"[nvr-guard] 紧急调取 #{rid} 未补齐审批 / Emergency export #{rid} not backed"
        zh = f"{what_zh}：紧急导出未在期限内补齐审批。"
        en = f"{what_en}: emergency export not backed by its approvals in time" + (
            f" ({line})" if line else "."
        )
    return subject, f"{zh}\n{en}"


# ---- the daemon's side --------------------------------------------------------------------------


def _accounts(people: People) -> list[Caller]:
    """Every host account ``people:`` may give a role: the users it names and the members of
    the groups it names (supplementary, and primary by passwd), as they are now."""
    names: set[str] = set(people.users)
    gids: dict[int, str] = {}
    for g in people.groups:
        try:
            gr = grp.getgrnam(g)
        except KeyError:
            continue
        names.update(gr.gr_mem)
        gids[gr.gr_gid] = g
    if gids:
        names.update(p.pw_name for p in pwd.getpwall() if p.pw_gid in gids)
    out = []
    for n in sorted(names):
        try:
            pw = pwd.getpwnam(n)
        except KeyError:
            continue  # named in the config, unknown to this host: nobody to act or to hear
        c = Caller.from_uid(pw.pw_uid, pw.pw_gid)
        if c.user != n:  # two names of one uid: judged by the name the config uses
            c = Caller(pw.pw_uid, n, c.groups, gid=pw.pw_gid)
        out.append(c)
    return out


class Notifications:
    """The events the web service delivers, its cursor, and what became of each delivery."""

    def __init__(self, workflow: Workflow, store: NotifyStore) -> None:
        self.workflow = workflow
        self.store = store
        self.ctx = workflow.ctx

    def actors(self) -> list[access.Actor]:
        """Every account ``people:`` gives a role, with its roles and level now."""
        out = []
        for c in _accounts(self.ctx.config.people):
            a = self.workflow.actor(c)
            if a.roles:
                out.append(a)
        return out

    def events(self, after: int | None, limit: int) -> dict[str, Any]:
        """The events after audit seq ``after`` (default: the cursor), at most ``limit``, with
        the deliveries already recorded for each (``done``) and the cursor to ask from next."""
        cursor = self.store.cursor()
        start = cursor if after is None else after
        head, _ = self.ctx.audit.head()
        entries = self.ctx.audit.after(start, head, ACTIONS, limit)
        upto = entries[-1].seq if len(entries) >= limit else head
        done: dict[int, list[str]] = {}
        for d in self.store.deliveries(start, upto):
            done.setdefault(d.seq, []).append(d.channel)
        actors: list[access.Actor] | None = None
        out = []
        for e in entries:
            if actors is None:
                actors = self.actors()
            ev = self.event(e, actors)
            if ev is not None:
                ev["done"] = done.get(e.seq, [])
                out.append(ev)
        return {
            "events": out,
            "next": max(upto, start),
            "more": len(entries) >= limit,
            "cursor": cursor,
            "head": head,
        }

    def _facts(self, entry: AuditEntry, r: Request) -> Facts:
        approvals = self.workflow.store.approvals(r.id)
        # who had decided by this entry: each person decides once per request, and each
        # decision has its entry, so the entries say which of the decisions came by then
        by_then: set[str] = set()
        for e in self.ctx.audit.entries(obj=entry.object, action="request."):
            if e.seq > entry.seq:
                break
            if e.action in ("request.approve", "request.deny"):
                by_then.add(e.actor)
        after = [a for a in approvals if a.approver in by_then]
        before = after
        if entry.action in ("request.approve", "request.deny"):
            before = [a for a in after if a.approver != entry.actor]
        rules = self.workflow.rules_of(r) if r.site in self.ctx.config.sites else None
        return Facts(r, rules, before, after)

    def event(self, entry: AuditEntry, actors: Sequence[access.Actor]) -> dict[str, Any] | None:
        """The event ``entry`` makes, with its recipients, or None."""
        obj = entry.object
        if not obj.startswith("request:"):
            return None
        try:
            r = self.workflow.store.get(int(obj.split(":", 1)[1]))
        except (InvalidInput, ValueError):
            return None
        facts = self._facts(entry, r)
        kind_step = classify(entry, facts)
        if kind_step is None:
            return None
        kind, step = kind_step
        if kind == "waiting":
            assert step is not None and facts.rules is not None
            decided = [a.approver for a in facts.after]
            users = deciders(r, step, decided, facts.rules, actors)
        elif kind == "violation":
            users = holders(VIOLATION_ROLES, actors)
        else:
            users = [r.requester]
        cfg = self.ctx.config
        smtp = cfg.notify.smtp
        domain = smtp.domain if smtp is not None else None
        tz = cfg.site_tz(r.site) if r.site in cfg.sites else cfg.tz
        subject, text = texts(kind, r, step, entry, tz)
        return {
            "seq": entry.seq,
            "kind": kind,
            "request": r.id,
            "site": r.site,
            "cameras": list(r.cameras),
            "step": step,
            "time": iso(entry.time, tz),
            "subject": subject,
            "text": text,
            "path": f"/requests/{r.id}",
            "recipients": [{"user": u, "email": address(u, cfg.people, domain)} for u in users],
        }

    def ack(self, upto: int) -> dict[str, Any]:
        """Every notification up to audit seq ``upto`` is delivered or given up: the cursor
        moves there (never back, never past the log's head)."""
        head, _ = self.ctx.audit.head()
        if upto > head:
            raise InvalidInput(f"notify.ack: upto {upto} is past the audit log's head ({head})")
        return {"cursor": self.store.advance(upto)}

    def report(self, actor: str, seq: int, channel: str, ok: bool, error: str) -> dict[str, Any]:
        """One delivery's outcome: counted; a given-up one audited (``notify.failed``) and an
        attention entry until the channel next delivers. Recorded once per (seq, channel)."""
        kind = channel.split(":", 1)[0]
        if seq <= self.store.cursor():
            return {"recorded": False}
        entry = self.ctx.audit.get(seq)
        if entry is None:
            raise InvalidInput(f"notify.report: no audit entry {seq}")
        with self.ctx.recording():
            new = self.store.record(seq, channel, ok, self.ctx.now(), error)
            if new and not ok:
                self.ctx.audit.append(
                    actor,
                    "notify.failed",
                    entry.object,
                    {"seq": seq, "channel": channel, "error": error},
                )
        if new:
            if ok:
                self.ctx.attention.clear(attention.NOTIFY_FAILED, None, kind)
            else:
                failed = self.store.counts().get((kind, False), 0)
                self.ctx.attention.raise_(
                    attention.NOTIFY_FAILED,
                    None,
                    kind,
                    f"a notification by {kind} was given up ({entry.object}, {channel}): "
                    f"{error}; check notify.{'smtp' if kind == 'mail' else 'webhook'}",
                    {"channel": channel, "seq": seq, "failed": failed},
                )
        return {"recorded": new}

    def counts(self) -> Mapping[tuple[str, bool], int]:
        """Deliveries so far by (channel kind, ok)."""
        return self.store.counts()
