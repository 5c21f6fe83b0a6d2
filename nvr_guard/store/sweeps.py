"""Sweeps: each retention run as planned, blocked, applied and confirmed, with what it meant to
delete and why (``sweep_items``), and the guards that stopped it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nvr_guard.errors import InvalidInput
from nvr_guard.model import ClockReading, Item, SweepHistory
from nvr_guard.store.db import Database

__all__ = ["SWEEP_STATES", "SweepItemRecord", "SweepRecord", "SweepStore"]

SWEEP_STATES = ("planned", "blocked", "applying", "done", "confirmed", "failed")


@dataclass(frozen=True, slots=True)
class SweepRecord:
    id: int
    started: float
    finished: float | None
    state: str
    actor: str
    dry_run: bool
    clock: ClockReading
    site_rules: dict[str, str]
    deleted: int
    bytes: int
    message: str


@dataclass(frozen=True, slots=True)
class SweepItemRecord:
    sweep_id: int
    path: bytes
    site: str
    camera: str
    action: str
    reason: str


class SweepStore(Database):
    """The ``sweeps`` and ``sweep_items`` tables (a mixin of ``Catalog``)."""

    def begin_sweep(
        self,
        *,
        started: float,
        actor: str,
        clock: ClockReading,
        site_rules: Mapping[str, str],
        dry_run: bool = False,
        state: str = "planned",
        message: str = "",
    ) -> int:
        """Record a new sweep in ``state`` with the clock and rules it runs under; its id."""
        _check_state(state)
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO sweeps (started, state, actor, dry_run, wall, boottime, boot_id, "
                "site_rules_json, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    started,
                    state,
                    actor,
                    int(dry_run),
                    clock.wall,
                    clock.boottime,
                    clock.boot_id,
                    json.dumps(dict(site_rules), sort_keys=True),
                    message,
                ),
            )
            return int(cur.lastrowid or 0)

    def record_items(self, sweep_id: int, items: Iterable[Item]) -> int:
        """Record what a sweep decided per segment (action and reason); how many."""
        n = 0

        def rows() -> Iterator[tuple[object, ...]]:  # one at a time: a backlog is 100,000s
            nonlocal n
            for i in items:
                n += 1
                s = i.segment
                yield sweep_id, s.path, s.site, s.camera, i.action.value, i.reason

        with self.transaction() as c:
            c.executemany(
                "INSERT INTO sweep_items (sweep_id, path, site, camera, action, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows(),
            )
        return n

    def set_sweep_state(
        self,
        sweep_id: int,
        state: str,
        *,
        finished: float | None = None,
        deleted: int | None = None,
        bytes_: int | None = None,
        message: str | None = None,
    ) -> None:
        """Move a sweep to ``state``, setting the given figures; InvalidInput if unknown."""
        _check_state(state)
        sets, args = ["state = ?"], [state]
        for col, val in (
            ("finished", finished),
            ("deleted", deleted),
            ("bytes", bytes_),
            ("message", message),
        ):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)  # type: ignore[arg-type]
        with self.transaction() as c:
            n = c.execute(
                f"UPDATE sweeps SET {', '.join(sets)} WHERE id = ?", [*args, sweep_id]
            ).rowcount
            if n == 0:
                raise InvalidInput(f"sweep {sweep_id} does not exist")

    def set_sweep_trips(self, sweep_id: int, trips: Sequence[Mapping[str, Any]]) -> None:
        """What stopped the sweep (guard kind, site, camera, measured value): what a
        confirmation of it may release."""
        with self.transaction() as c:
            c.execute(
                "UPDATE sweeps SET trips = ? WHERE id = ?",
                (json.dumps(list(map(dict, trips)), sort_keys=True), sweep_id),
            )

    def sweep_trips(self, sweep_id: int) -> list[dict[str, Any]]:
        """The guard trips recorded by :meth:`set_sweep_trips` ([] when none)."""
        with self.lock:
            row = self.conn.execute("SELECT trips FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        return [] if row is None else list(json.loads(row[0] or "[]"))

    def get_sweep(self, sweep_id: int) -> SweepRecord | None:
        """The sweep of that id, or None."""
        with self.lock:
            row = self.conn.execute(
                "SELECT id, started, finished, state, actor, dry_run, wall, boottime, boot_id, "
                "site_rules_json, deleted, bytes, message FROM sweeps WHERE id = ?",
                (sweep_id,),
            ).fetchone()
        if row is None:
            return None
        (
            sid,
            started,
            finished,
            state,
            actor,
            dry,
            wall,
            boot,
            boot_id,
            rules,
            deleted,
            nbytes,
            message,
        ) = row
        return SweepRecord(
            id=int(sid),
            started=float(started),
            finished=None if finished is None else float(finished),
            state=str(state),
            actor=str(actor),
            dry_run=bool(dry),
            clock=ClockReading(float(wall), float(boot), str(boot_id)),
            site_rules=dict(json.loads(rules or "{}")),
            deleted=int(deleted),
            bytes=int(nbytes),
            message=str(message),
        )

    def latest_sweep(self, states: Sequence[str] | None = None) -> SweepRecord | None:
        """The newest sweep (in one of ``states``), or None."""
        with self.lock:
            if states:
                marks = ",".join("?" * len(states))
                row = self.conn.execute(
                    f"SELECT max(id) FROM sweeps WHERE state IN ({marks})", list(states)
                ).fetchone()
            else:
                row = self.conn.execute("SELECT max(id) FROM sweeps").fetchone()
        return None if row is None or row[0] is None else self.get_sweep(int(row[0]))

    def sweep_items(self, sweep_id: int) -> list[SweepItemRecord]:
        """What a sweep decided per segment, in the order recorded."""
        with self.lock:
            cur = self.conn.execute(
                "SELECT sweep_id, path, site, camera, action, reason FROM sweep_items "
                "WHERE sweep_id = ? ORDER BY rowid",
                (sweep_id,),
            )
            return [
                SweepItemRecord(int(a), bytes(p), str(s), str(c), str(act), str(r))
                for a, p, s, c, act, r in cur
            ]

    def last_history(self) -> SweepHistory:
        """What the last applied sweep (done or confirmed) left: feeds the policy's guards."""
        rec = self.latest_sweep(("done", "confirmed"))
        if rec is None:
            return SweepHistory()
        return SweepHistory(
            last_wall=rec.clock.wall,
            last_boottime=rec.clock.boottime,
            boot_id=rec.clock.boot_id,
            site_rules=rec.site_rules,
        )

    def unfinished_sweeps(self) -> list[int]:
        """Ids of sweeps still ``applying`` or ``blocked`` without ``finished`` (cut short)."""
        with self.lock:
            return [
                int(r[0])
                for r in self.conn.execute(
                    "SELECT id FROM sweeps WHERE finished IS NULL "
                    "AND state IN ('applying', 'blocked') ORDER BY id"
                )
            ]


def _check_state(state: str) -> None:
    if state not in SWEEP_STATES:
        raise ValueError(f"unknown sweep state {state!r}; one of {', '.join(SWEEP_STATES)}")
