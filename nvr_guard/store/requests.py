"""Storage of retrieval requests (调取申请) and their approvals, in the catalog's SQLite database.

The decisions about them are made by the pure ``access`` module; this is only where they live.
Approvals are append-only like the audit log: a decision, once given, is never edited or removed
(triggers refuse UPDATE and DELETE), so the approval record (审批表) can always be reprinted whole.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from nvr_guard.errors import InvalidInput
from nvr_guard.model import Approval, Recipient, Request
from nvr_guard.store.db import Database, changes_requests, read_state
from nvr_guard.store.schema import ensure_requests_schema

_COLS = (
    'id, requester, site, cameras, start, "end", reason, basis, recipient, format, emergency, '
    "state, created, approved_at, exported_at, closed_at, resolved, exporter, encrypt"
)


def _request(row: tuple[Any, ...]) -> Request:
    (
        rid,
        requester,
        site,
        cameras,
        start,
        end,
        reason,
        basis,
        recipient,
        fmt,
        emergency,
        state,
        created,
        approved_at,
        exported_at,
        closed_at,
        resolved,
        exporter,
        encrypt,
    ) = row
    r = json.loads(recipient)
    return Request(
        id=int(rid),
        requester=requester,
        site=site,
        cameras=tuple(json.loads(cameras)),
        start=float(start),
        end=float(end),
        reason=reason,
        basis=basis,
        recipient=Recipient(unit=r["unit"], person=r["person"], contact=r["contact"]),
        format=fmt,
        emergency=bool(emergency),
        state=state,
        created=float(created),
        approved_at=approved_at,
        exported_at=exported_at,
        closed_at=closed_at,
        resolved=resolved,
        exporter=exporter,
        encrypt=encrypt or "none",
    )


def _extra(
    package: Any, hold_id: Any, judged_by: Any, sealed: Any, destroyed: Any, copy: Any
) -> dict[str, Any]:
    return {
        "package": package,
        "hold_id": hold_id,
        "judged_by": json.loads(judged_by) if judged_by else None,
        "sealed": json.loads(sealed) if sealed else None,
        "destroyed": json.loads(destroyed) if destroyed else None,
        "copy": json.loads(copy) if copy else None,
    }


_EXTRA_COLS = "package, hold_id, judged_by, sealed, destroyed, copy"


class RequestStore:
    """Requests and approvals on the catalog's connection, under its lock and transactions."""

    def __init__(self, catalog: Database) -> None:
        self.conn = catalog.conn
        self.lock = catalog.lock
        self._txn = catalog.transaction
        self._db = catalog
        with catalog.lock:
            ensure_requests_schema(catalog.conn)

    @changes_requests
    def create(self, r: Request) -> Request:
        """Store a new request; returns it as stored (with its id)."""
        with self._txn() as c:
            cur = c.execute(
                'INSERT INTO requests (requester, site, cameras, start, "end", reason, basis, '
                "recipient, format, emergency, state, created, encrypt) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    r.requester,
                    r.site,
                    json.dumps(list(r.cameras)),
                    r.start,
                    r.end,
                    r.reason,
                    r.basis,
                    json.dumps(
                        {
                            "unit": r.recipient.unit,
                            "person": r.recipient.person,
                            "contact": r.recipient.contact,
                        },
                        ensure_ascii=False,
                    ),
                    r.format,
                    int(r.emergency),
                    r.state,
                    r.created,
                    r.encrypt,
                ),
            )
            rid = int(cur.lastrowid or 0)
        self._db.request_written(rid)
        return self.get(rid)

    def get(self, rid: int) -> Request:
        """The request; InvalidInput when there is none of that id."""
        with self.lock:
            row = self.conn.execute(f"SELECT {_COLS} FROM requests WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise InvalidInput(f"no request {rid}; see `nvr-guard request list`")
        return _request(row)

    def all(self, state: str | None = None) -> list[Request]:
        """Every request (in one state), oldest first."""
        with self.lock:
            if state:
                cur = self.conn.execute(
                    f"SELECT {_COLS} FROM requests WHERE state = ? ORDER BY id", (state,)
                )
            else:
                cur = self.conn.execute(f"SELECT {_COLS} FROM requests ORDER BY id")
            return [_request(r) for r in cur]

    def select(
        self,
        *,
        states: Collection[str] | None = None,
        emergency_exported: bool = False,
        below: int | None = None,
        ids: Collection[int] | None = None,
        newest_first: bool = False,
        limit: int | None = None,
        own_or_decided_by: str | None = None,
    ) -> list[tuple[Request, dict[str, Any]]]:
        """Requests with their package, hold and rules record (as :meth:`extra`), filtered in
        SQL: stored state among ``states`` (or exported emergency ones, with
        ``emergency_exported``), id below ``below``, id among ``ids``, filed by or decided on by
        ``own_or_decided_by``; oldest first unless ``newest_first``."""
        where: list[str] = []
        params: list[Any] = []
        if own_or_decided_by is not None:
            where.append(
                "(requester = ? OR id IN (SELECT request_id FROM approvals WHERE approver = ?))"
            )
            params.extend([own_or_decided_by, own_or_decided_by])
        if states is not None:
            alts = [f"state IN ({','.join('?' * len(states))})"] if states else []
            params.extend(states)
            if emergency_exported:
                alts.append("(state = 'exported' AND emergency = 1)")
            where.append("(" + (" OR ".join(alts) or "0") + ")")
        if below is not None:
            where.append("id < ?")
            params.append(below)
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        sql = f"SELECT {_COLS}, {_EXTRA_COLS} FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        n = len(_COLS.split(","))
        with self.lock:
            rows = self.conn.execute(sql, params).fetchall()
        return [(_request(row[:n]), _extra(*row[n:])) for row in rows]

    def counts(self) -> dict[str, int]:
        """Requests per stored state."""
        with self.lock:
            cur = self.conn.execute("SELECT state, count(*) FROM requests GROUP BY state")
            return {str(k): int(n) for k, n in cur}

    def undecided(self) -> list[tuple[int, str, str]]:
        """(id, site, state) of each open request no decision recorded the rules of
        (:func:`read_undecided`, on the catalog's connection)."""
        with self.lock:
            return [(int(i), str(site), str(st)) for i, site, st in self.conn.execute(_UNDECIDED)]

    def approvals_of(self, rids: Iterable[int]) -> dict[int, list[Approval]]:
        """The decisions given on each of ``rids`` (in the order given; [] when none)."""
        out: dict[int, list[Approval]] = {}
        ids = list(rids)
        with self.lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for rid in chunk:
                    out[rid] = []
                cur = self.conn.execute(
                    "SELECT request_id, approver, role, decision, note, time, mask FROM approvals "
                    f"WHERE request_id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                    chunk,
                )
                for rid, a, r, d, n, t, m in cur:
                    out[int(rid)].append(
                        Approval(approver=a, role=r, decision=d, note=n, time=float(t), mask=m)
                    )
        return out

    def approvals(self, rid: int) -> list[Approval]:
        """The decisions given on a request, in the order given."""
        with self.lock:
            cur = self.conn.execute(
                "SELECT approver, role, decision, note, time, mask FROM approvals "
                "WHERE request_id = ? ORDER BY id",
                (rid,),
            )
            return [
                Approval(approver=a, role=r, decision=d, note=n, time=float(t), mask=m)
                for a, r, d, n, t, m in cur
            ]

    @changes_requests
    def add_approval(self, rid: int, a: Approval) -> None:
        """Append a decision (approvals are never edited nor removed)."""
        with self._txn() as c:
            c.execute(
                "INSERT INTO approvals (request_id, approver, role, decision, note, time, mask) "
                "VALUES (?,?,?,?,?,?,?)",
                (rid, a.approver, a.role, a.decision, a.note, a.time, a.mask),
            )
        self._db.request_written(rid)

    @changes_requests
    def update(self, rid: int, **fields: Any) -> Request:
        """Change the state columns of a request; returns it as stored."""
        allowed = {
            "state",
            "approved_at",
            "exported_at",
            "closed_at",
            "resolved",
            "package",
            "hold_id",
            "judged_by",
            "exporter",
            "sealed",
            "destroyed",
            "copy",
        }
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update {sorted(bad)}")
        for k in ("judged_by", "sealed", "destroyed", "copy"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k], ensure_ascii=False)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._txn() as c:
            c.execute(f"UPDATE requests SET {sets} WHERE id = ?", [*fields.values(), rid])
        self._db.request_written(rid)
        return self.get(rid)

    def copies(self) -> list[tuple[int, dict[str, Any]]]:
        """(id, copy) of every request whose exported copy is not known destroyed."""
        with self.lock:
            cur = self.conn.execute(
                "SELECT id, copy FROM requests WHERE copy IS NOT NULL AND destroyed IS NULL "
                "ORDER BY id"
            )
            return [(int(i), json.loads(c)) for i, c in cur]

    def extra(self, rid: int) -> dict[str, Any]:
        """The package, hold and rules record of a request ({} when there is none)."""
        with self.lock:
            row = self.conn.execute(
                f"SELECT {_EXTRA_COLS} FROM requests WHERE id = ?", (rid,)
            ).fetchone()
        if not row:
            return {}
        return _extra(*row)


_UNDECIDED = (
    "SELECT id, site, state FROM requests WHERE state IN ('pending', 'approved') "
    "AND judged_by IS NULL ORDER BY id"
)


def read_undecided(path: Path | str) -> list[tuple[int, str, str]] | None:
    """(id, site, state) of each open request no decision recorded the rules of (those are
    judged by their site's rules of now), read without writing anything (``read_state``);
    None when there is no readable catalog."""

    def read(conn: sqlite3.Connection) -> list[tuple[int, str, str]] | None:
        if not conn.execute("PRAGMA table_info(requests)").fetchall():
            return None
        return [(int(i), str(site), str(state)) for i, site, state in conn.execute(_UNDECIDED)]

    return read_state(path, read)


def sealed_digests(db: Database) -> frozenset[str]:
    """The SHA-256 of every sealed file (protected export) this recorder wrote."""
    with db.lock:
        if not db.table_exists("requests"):
            return frozenset()
        cols = {row[1] for row in db.conn.execute("PRAGMA table_info(requests)")}
        if "sealed" not in cols:
            return frozenset()
        rows = db.conn.execute("SELECT sealed FROM requests WHERE sealed IS NOT NULL")
        out = set()
        for (text,) in rows:
            try:
                out.add(str(json.loads(text)["sha256"]))
            except (ValueError, KeyError, TypeError):
                continue
        return frozenset(out)


def counts_by_state(db: Database) -> dict[str, int]:
    """Requests per state ({} when the table was never created)."""
    out: dict[str, int] = {}
    with db.lock:
        if db.table_exists("requests"):
            for state, n in db.conn.execute("SELECT state, count(*) FROM requests GROUP BY state"):
                out[str(state)] = int(n)
    return out
