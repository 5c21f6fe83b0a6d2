"""Every request read and parsed once, for the reads that judge thousands of them.

A list, the console's pages and ``status`` judge each request they may show against the person
asking (``access.check_view``, ``check_approve``): with 10,000 requests, reading their rows,
approvals and recorded rules from the database again for every page cost tens of milliseconds
a page. :class:`RequestIndex` keeps them parsed (:class:`Entry`), with what is the same for
everyone and at any time: the rules each is judged and acted on by, the roles that could decide
it, who filed or decided it, its JSON as far as it does not depend on the time.

It is read again only where it changed: the request store notes each request or approval row
it writes (``Database.request_written``), and a snapshot is made again from those rows; a new
config makes it again whole. A snapshot is never changed once made (a new one replaces it), so
a thread may read one without the engine lock while another makes the next.

What is true at a time (a state: pending turns expired at its deadline; whether someone may
decide now) is not kept: the callers judge the entries at their own ``now``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from nvr_guard.config import Config
from nvr_guard.store.db import Database
from nvr_guard.store.requests import RequestStore
from nvr_guard.workflow import access

# a request as read -> the request as judged (its exporter filled in), the rules it is judged
# by and those it is acted on by (None, None: its site is gone)
Judge = Callable[
    [access.Request, dict[str, Any]],
    tuple[access.Request, access.AccessRules | None, access.AccessRules | None],
]

# stored states whose state may still change with time (see ``requests.OPEN``)
OPEN = ("pending", "approved")
# people whose right to see it an entry keeps (each a dict item; more are judged each time)
SEEN_PEOPLE = 64


class Busy(Exception):
    """The index must be brought up to date, and someone holds the engine lock (a sweep):
    asked not to wait for it (``Workflow.list``, ``show`` with ``wait=False``)."""


@dataclass(eq=False)
class Entry:
    """One request as read: its row, extras (package, hold, recorded rules) and approvals; the
    rules it is judged by (``Workflow._judged``) and acted on by (``_acting``), None when its
    site is gone from the config."""

    r: access.Request
    extra: dict[str, Any]
    approvals: list[access.Approval]
    judged: access.AccessRules | None
    acting: access.AccessRules | None
    # the roles that could approve it as things stand: its open steps and the after-hours role
    # (``check_approve`` lets no one else); empty when its site is gone
    deciders: frozenset[str]
    # who filed it or decided on it (``RequestStore.select``'s ``own_or_decided_by``)
    people: frozenset[str]
    # ``Workflow.request_json``'s parts that do not depend on the time, made on first use
    # (two threads may both make it: the same value)
    static: tuple[dict[str, Any], dict[str, Any]] | None = field(default=None)
    # ``check_view``'s answer per person asked (it does not depend on the time)
    seen: dict[access.Actor, bool] = field(default_factory=dict)

    def may_see(self, actor: access.Actor) -> bool:
        """``access.check_view`` of this request for ``actor`` (False when its site is gone:
        only those who see every request see it), kept for the first SEEN_PEOPLE asking."""
        got = self.seen.get(actor)
        if got is None:
            if self.acting is None:
                got = bool(actor.roles & access.SEE_ALL_ROLES)
            else:
                got = access.check_view(self.r, self.approvals, actor, self.acting).allowed
            if len(self.seen) < SEEN_PEOPLE:
                self.seen[actor] = got
        return got

    @property
    def flagged(self) -> bool:
        """An exported emergency request: its violation may still open or close."""
        return self.r.state == "exported" and self.r.emergency


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Every request at ``version`` of the request rows, under ``config``."""

    version: int
    config: Config
    entries: Mapping[int, Entry]
    # ids oldest first; those whose stored state is open, or exported in an emergency
    ids: tuple[int, ...]
    open_ids: tuple[int, ...]
    # what is worked out once from all of it (``recorded_roles``, the workflow's own)
    memo: dict[str, Any] = field(default_factory=dict)

    def recorded_roles(self) -> frozenset[str]:
        """Every role named as a step, the native-copy step or the after-hours role in the
        rules recorded with decided requests (``judged_by``; ``RequestStore.recorded_roles``)."""
        got = self.memo.get("recorded_roles")
        if got is None:
            roles: set[str] = set()
            for e in self.entries.values():
                rec = e.extra.get("judged_by")
                if rec:
                    roles.update(str(x) for x in rec.get("steps") or ())
                    roles.update(
                        str(x) for x in (rec.get("native_role"), rec.get("after_hours_role")) if x
                    )
            got = self.memo["recorded_roles"] = frozenset(roles)
        return got

    def select(
        self,
        *,
        states: Collection[str] | None = None,
        emergency_exported: bool = False,
        below: int | None = None,
        newest_first: bool = False,
        own_or_decided_by: str | None = None,
    ) -> Iterator[Entry]:
        """The entries ``RequestStore.select`` reads with the same filters, in the same order."""
        ids = self.ids
        if states is not None and set(states) <= set(OPEN):
            ids = self.open_ids  # a superset of what matches
        order = reversed(ids) if newest_first else iter(ids)
        entries = self.entries
        for rid in order:
            if below is not None and rid >= below:
                continue
            e = entries[rid]
            if own_or_decided_by is not None and own_or_decided_by not in e.people:
                continue
            if states is not None and not (
                e.r.state in states or (emergency_exported and e.flagged)
            ):
                continue
            yield e


class RequestIndex:
    """The snapshot of every request in ``store`` (see the module): ``config`` gives the
    config in force, ``judge`` the rules of a request, within ``memo`` (the workflow's: the
    rules of a site made once while it lasts)."""

    def __init__(
        self,
        db: Database,
        store: RequestStore,
        config: Callable[[], Config],
        judge: Judge,
        memo: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.db = db
        self.store = store
        self.config = config
        self.judge = judge
        self.memo = memo
        self._snap: Snapshot | None = None

    def fresh(self) -> Snapshot | None:
        """The snapshot when no request row was written since and the config is the same;
        else None. Needs no lock."""
        s = self._snap
        if s is not None and s.version == self.db.request_rows and s.config is self.config():
            return s
        return None

    def current(self) -> Snapshot:
        """The snapshot as the database stands, read again where it changed. Under the engine
        lock (the database is read). Inside an open transaction, what it wrote may still be
        rolled back: a snapshot made then is used once and not kept."""
        s = self.fresh()
        if s is not None:
            return s
        db = self.db
        with db.lock:  # the rows, and the version they are at, read without a write between
            s = self.fresh()
            if s is not None:
                return s
            version = db.request_rows
            config = self.config()
            old = self._snap
            changed = None
            if old is not None and old.config is config:
                changed = db.requests_written_since(old.version)
            if old is None or changed is None:
                new = self._make(version, config, None, None)
            else:
                new = self._make(version, config, old, changed)
            if not db.conn.in_transaction:
                self._snap = new
            return new

    def _make(
        self,
        version: int,
        config: Config,
        old: Snapshot | None,
        changed: set[int] | None,
    ) -> Snapshot:
        store = self.store
        with self.memo():
            if old is None or changed is None:
                rows = store.select()
                entries: dict[int, Entry] = {}
            else:
                ids = sorted(changed)
                rows = [
                    row
                    for i in range(0, len(ids), 10_000)  # SQLite's limit on parameters
                    for row in store.select(ids=ids[i : i + 10_000])
                ]
                entries = dict(old.entries)
                for rid in ids:  # requests are never removed; a missing one is gone anyway
                    entries.pop(rid, None)
            apps = store.approvals_of(r.id for r, _ in rows)
            for r0, extra in rows:
                approvals = apps[r0.id]
                r, judged, acting = self.judge(r0, extra)
                deciders: frozenset[str] = frozenset()
                if acting is not None:
                    deciders = frozenset(
                        {*access.open_steps(r, approvals, acting), acting.duty_role}
                    )
                people = frozenset({r.requester, *(a.approver for a in approvals)})
                entries[r.id] = Entry(r, extra, approvals, judged, acting, deciders, people)
        ids_sorted = tuple(sorted(entries))
        open_ids = tuple(
            rid for rid in ids_sorted if entries[rid].r.state in OPEN or entries[rid].flagged
        )
        return Snapshot(version, config, entries, ids_sorted, open_ids)
