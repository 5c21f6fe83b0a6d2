"""Where notifications stand (migration 10): the delivery cursor, each delivery's outcome after
it, and the totals per channel.

The web service delivers; the daemon keeps the record, so a restarted web service resumes at the
cursor, skips what it already delivered, and a failure is recorded once however often it is
reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvr_guard.store.db import Database


@dataclass(frozen=True, slots=True)
class Delivery:
    seq: int
    channel: str  # "mail:<user>" or "webhook"
    ok: bool
    time: float
    error: str


class NotifyStore:
    """The notification tables on the catalog's connection, under its lock and transactions."""

    def __init__(self, catalog: Database) -> None:
        self.conn = catalog.conn
        self.lock = catalog.lock
        self._txn = catalog.transaction

    def cursor(self) -> int:
        """The audit seq up to which every notification is delivered or given up (0: none)."""
        with self.lock:
            row = self.conn.execute("SELECT seq FROM notify_cursor WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def advance(self, upto: int) -> int:
        """Move the cursor forward to ``upto`` (never back) and forget the deliveries it passed;
        returns the cursor as stored."""
        with self._txn() as c:
            row = c.execute("SELECT seq FROM notify_cursor WHERE id = 1").fetchone()
            cur = int(row[0]) if row else 0
            if upto <= cur:
                return cur
            c.execute(
                "INSERT INTO notify_cursor (id, seq) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq",
                (upto,),
            )
            c.execute("DELETE FROM notify_deliveries WHERE seq <= ?", (upto,))
        return upto

    def deliveries(self, after: int, upto: int) -> list[Delivery]:
        """The outcomes recorded for events with ``after < seq <= upto``."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT seq, channel, ok, time, error FROM notify_deliveries "
                "WHERE seq > ? AND seq <= ? ORDER BY seq, channel",
                (after, upto),
            ).fetchall()
        return [Delivery(int(s), str(ch), bool(ok), float(t), str(e)) for s, ch, ok, t, e in rows]

    def record(self, seq: int, channel: str, ok: bool, time: float, error: str) -> bool:
        """Record one delivery's outcome and count it under its channel kind; False (nothing
        changed) when that delivery already has one."""
        kind = channel.split(":", 1)[0]
        with self._txn() as c:
            seen = c.execute(
                "SELECT 1 FROM notify_deliveries WHERE seq = ? AND channel = ?", (seq, channel)
            ).fetchone()
            if seen:
                return False
            c.execute(
                "INSERT INTO notify_deliveries (seq, channel, ok, time, error) VALUES (?,?,?,?,?)",
                (seq, channel, int(ok), time, error),
            )
            c.execute(
                "INSERT INTO notify_counts (channel, ok, n) VALUES (?, ?, 1) "
                "ON CONFLICT (channel, ok) DO UPDATE SET n = n + 1",
                (kind, int(ok)),
            )
        return True

    def counts(self) -> dict[tuple[str, bool], int]:
        """Deliveries so far by (channel kind, ok)."""
        out: dict[tuple[str, bool], int] = {}
        with self.lock:
            for ch, ok, n in self.conn.execute("SELECT channel, ok, n FROM notify_counts"):
                out[(str(ch), bool(ok))] = int(n)
        return out
