"""Holds: time ranges of footage that no sweep may delete while they stand (a manual hold, or
the hold a request keeps on the footage it asks for)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nvr_guard.errors import InvalidInput
from nvr_guard.model import Hold
from nvr_guard.store.db import Database, changes_requests, read_state

__all__ = ["HoldStore", "hold_roots_json", "read_active_holds"]

_HOLD_COLS = 'id, kind, site, camera, start, "end", until, reason, owner, created, released, roots'


def hold_roots_json(roots: Iterable[bytes]) -> str:
    """The stored form of a hold's roots (a JSON list of paths)."""
    return json.dumps([os.fsdecode(r) for r in roots])


def _hold_roots(text: str | None) -> tuple[bytes, ...]:
    if not text:
        return ()
    return tuple(os.fsencode(str(r)) for r in json.loads(text))


def _hold(row: Sequence[Any]) -> Hold:
    hid, kind, site, camera, start, end, until, reason, owner, created, released, roots = row
    return Hold(
        id=int(hid),
        reason=str(reason),
        owner=str(owner),
        start=float(start),
        end=float(end),
        camera=None if camera is None else str(camera),
        site=None if site is None else str(site),
        until=None if until is None else float(until),
        created=float(created),
        released=None if released is None else float(released),
        kind=str(kind),
        roots=_hold_roots(roots),
    )


class HoldStore(Database):
    """The ``holds`` table (a mixin of ``Catalog``)."""

    @changes_requests
    def add_hold(
        self,
        *,
        start: float,
        end: float,
        reason: str,
        owner: str,
        created: float,
        kind: str = "manual",
        site: str | None = None,
        camera: str | None = None,
        until: float | None = None,
        request_id: int | None = None,
        roots: Sequence[bytes] | None = None,
    ) -> Hold:
        """Place a hold; InvalidInput without an end after its start or without a reason."""
        if not end > start:
            raise InvalidInput("a hold needs an end after its start")
        if not reason.strip():
            raise InvalidInput("a hold needs a reason")
        with self.transaction() as c:
            cur = c.execute(
                'INSERT INTO holds (kind, site, camera, start, "end", until, reason, owner, '
                "created, request_id, roots) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    site,
                    camera,
                    start,
                    end,
                    until,
                    reason,
                    owner,
                    created,
                    request_id,
                    None if roots is None else hold_roots_json(roots),
                ),
            )
            hid = int(cur.lastrowid or 0)
        hold = self.get_hold(hid)
        assert hold is not None
        return hold

    def get_hold(self, hold_id: int) -> Hold | None:
        """The hold of that id (released or not), or None."""
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_HOLD_COLS} FROM holds WHERE id = ?", (hold_id,)
            ).fetchone()
        return _hold(row) if row else None

    @changes_requests
    def release_hold(self, hold_id: int, by: str, reason: str, now: float | None = None) -> Hold:
        """Release a standing hold, recording who and why; InvalidInput if it is not standing."""
        when = time.time() if now is None else now
        with self.transaction() as c:
            row = c.execute("SELECT released FROM holds WHERE id = ?", (hold_id,)).fetchone()
            if row is None:
                raise InvalidInput(f"hold {hold_id} does not exist; see `nvr-guard hold list`")
            if row[0] is not None:
                raise InvalidInput(f"hold {hold_id} is already released")
            c.execute(
                "UPDATE holds SET released = ?, released_by = ?, release_reason = ? WHERE id = ?",
                (when, by, reason, hold_id),
            )
        hold = self.get_hold(hold_id)
        assert hold is not None
        return hold

    def active_holds(self, now: float) -> list[Hold]:
        """The holds that protect footage at ``now`` (not released, not past ``until``)."""
        with self.lock:
            cur = self.conn.execute(
                f"SELECT {_HOLD_COLS} FROM holds WHERE released IS NULL "
                "AND (until IS NULL OR until > ?) ORDER BY id",
                (now,),
            )
            return [_hold(r) for r in cur]

    def hold_requests(self) -> dict[int, int | None]:
        """Hold id -> the request it keeps footage for, for every hold that is not manual (None:
        a request hold that does not name its request)."""
        with self.lock:
            cur = self.conn.execute("SELECT id, request_id FROM holds WHERE kind != 'manual'")
            return {int(h): None if r is None else int(r) for h, r in cur}

    def list_holds(self, include_released: bool = False) -> list[Hold]:
        """Every unreleased hold (and the released ones), oldest first."""
        where = "" if include_released else "WHERE released IS NULL"
        with self.lock:
            cur = self.conn.execute(f"SELECT {_HOLD_COLS} FROM holds {where} ORDER BY id")
            return [_hold(r) for r in cur]

    @changes_requests
    def fill_hold_roots(self, roots_by_site: Mapping[str, Sequence[bytes]]) -> int:
        """Give unreleased holds that do not name their roots yet (placed by the workflow, or
        before holds recorded them) the roots their site has now."""
        with self.lock:
            missing = self.conn.execute(
                "SELECT 1 FROM holds WHERE roots IS NULL AND released IS NULL LIMIT 1"
            ).fetchone()
        if missing is None:
            return 0  # the usual case: no write transaction for nothing
        n = 0
        with self.transaction() as c:
            for site, roots in roots_by_site.items():
                n += c.execute(
                    "UPDATE holds SET roots = ? WHERE roots IS NULL AND site = ? "
                    "AND released IS NULL",
                    (hold_roots_json(roots), site),
                ).rowcount
        return n

    def hold_release_info(self, hold_id: int) -> tuple[str | None, str | None]:
        """(released_by, release_reason) of a hold."""
        with self.lock:
            row = self.conn.execute(
                "SELECT released_by, release_reason FROM holds WHERE id = ?", (hold_id,)
            ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    @changes_requests
    def shorten_request_holds(self, request_id: int, until: float) -> None:
        """Make the open holds of a request end at ``until`` at the latest (never later)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE holds SET until = ? WHERE request_id = ? AND released IS NULL "
                "AND kind != 'manual' AND (until IS NULL OR until > ?)",
                (until, request_id, until),
            )

    @changes_requests
    def set_request_holds_until(self, request_id: int, until: float) -> None:
        """Make the open holds of a request end at ``until`` (earlier or later)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE holds SET until = ? WHERE request_id = ? AND released IS NULL "
                "AND kind != 'manual'",
                (until, request_id),
            )

    def holds_naming_any(self, now: float) -> dict[int, list[int]]:
        """Request id -> the active manual holds naming it (:meth:`holds_naming` of all)."""
        out: dict[int, list[int]] = {}
        with self.lock:
            cur = self.conn.execute(
                "SELECT request_id, id FROM holds WHERE request_id IS NOT NULL "
                "AND kind = 'manual' AND released IS NULL AND (until IS NULL OR until > ?) "
                "ORDER BY id",
                (now,),
            )
            for rid, hid in cur:
                out.setdefault(int(rid), []).append(int(hid))
        return out

    def holds_naming(self, request_id: int, now: float) -> list[int]:
        """The active manual holds placed on a request's export (``hold add --request``): its
        copy on an export target is kept while one of them holds."""
        with self.lock:
            cur = self.conn.execute(
                "SELECT id FROM holds WHERE request_id = ? AND kind = 'manual' "
                "AND released IS NULL AND (until IS NULL OR until > ?) ORDER BY id",
                (request_id, now),
            )
            return [int(i) for (i,) in cur]


def read_active_holds(path: Path | str, now: float) -> list[Hold] | None:
    """The active holds of a catalog, read without writing anything (``read_state``: ``config
    check`` as any user who may read the state); None when there is no readable catalog."""

    def read(conn: sqlite3.Connection) -> list[Hold] | None:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(holds)")}
        if not cols:
            return None
        # a catalog from before holds kept their roots reads as holds without roots
        sel = _HOLD_COLS if "roots" in cols else _HOLD_COLS.replace(", roots", ", NULL")
        cur = conn.execute(
            f"SELECT {sel} FROM holds WHERE released IS NULL "
            "AND (until IS NULL OR until > ?) ORDER BY id",
            (now,),
        )
        return [_hold(r) for r in cur]

    return read_state(path, read)
