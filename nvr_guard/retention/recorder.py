"""Keeping the recorder's own index in step with the files a purge deleted.

A purge hands over each batch's deleted segments once their files are gone (see
:func:`nvr_guard.retention.purge.purge`, ``after_batch``). For a site with a ``recorder:`` (today:
Frigate), the rows of exactly those files are removed from the recorder's database: the host path
below the site's root is mapped to the path as the recorder stores it (``recordings:``, the root
as Frigate in Docker sees it, e.g. ``/media/frigate/recordings``; by default the host path).

The files never wait for this: a database that is missing, locked past ``busy_timeout`` or shaped
differently leaves its rows, and the paths are kept (in memory, at most :data:`MAX_PENDING` per
database) to be retried with the next batch; an attention entry ``recorder_index`` names the
database, the reason and the rows left, and clears after a batch that reached the database. Rows
of files that exist (kept because held, young, changed) are never named: only deleted files are
handed over, and a retried path whose file is back is dropped from the list.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from nvr_guard.attention import RECORDER_INDEX, Attention
from nvr_guard.config import Config
from nvr_guard.config.models import Recorder
from nvr_guard.model import Segment, show_path
from nvr_guard.store.recorder_index import ERROR, SLOW, IndexOutcome, remove_frigate_rows

log = logging.getLogger(__name__)


def sweep_budget(busy_timeout: float) -> float:
    """Seconds one sweep may spend in one recorder database, over all its batches."""
    return max(2 * busy_timeout, 5.0)


MAX_PENDING = 100_000  # paths kept per database for a retry; older ones are left to the recorder


@dataclass
class _State:
    """What the last batch found at one database."""

    sites: set[str] = field(default_factory=set)
    reason: str | None = None
    detail: str = ""
    dropped: int = 0  # paths no longer retried (the pending list was full)


class RecorderIndexes:
    """The recorders' indexes of one instance: the purge hook and the attention it reports."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pending: dict[str, list[tuple[bytes, str]]] = {}  # database -> (host, db path)
        self._states: dict[str, _State] = {}
        # databases that failed since the last report (one sweep): later batches of the sweep
        # do not try them again, so a locked or slow database costs one busy_timeout per sweep,
        # not one per (site, camera) batch, while the daemon's lock is held
        self._failed: set[str] = set()
        # seconds spent in each database since the last report: a sweep gives a database
        # :func:`sweep_budget` in all, so a trigger that stays just under busy_timeout per
        # call cannot stall the sweep once per camera
        self._spent: dict[str, float] = {}

    def configure(self, config: Config) -> None:
        """Take a new config (a reload); rows pending for a database still configured stay."""
        self.config = config
        dbs = {r.database for s in config.sites if (r := config.recorder_for(s)) is not None}
        for db in list(self._pending):
            if db not in dbs:
                del self._pending[db]
        for db in list(self._states):
            if db not in dbs:
                self._states[db].reason = None  # its entry clears at the next report

    def after_batch(self, deleted: list[Segment]) -> dict[str, Any] | None:
        """Remove the index rows of ``deleted`` (files already gone); what the batch's receipt
        gains: ``index_rows`` removed, and on failure ``index_left`` and ``index_error``."""
        todo: dict[str, tuple[Recorder, list[tuple[bytes, str]], set[str]]] = {}
        for seg in deleted:
            rec = self.config.recorder_for(seg.site)
            if rec is None:
                continue
            mapped = self._db_path(seg, rec)
            if mapped is None:
                continue
            entry = todo.setdefault(rec.database, (rec, [], set()))
            entry[1].append((seg.path, mapped))
            entry[2].add(seg.site)
        if not todo:
            return None
        out: dict[str, Any] = {"index_rows": 0}
        for db, (rec, items, sites) in todo.items():
            # a retried path whose file exists again is not ours to remove any more
            earlier = [(h, p) for h, p in self._pending.pop(db, []) if not os.path.lexists(h)]
            batch = earlier + items
            timeout = float(rec.busy_timeout.seconds)
            left_s = sweep_budget(timeout) - self._spent.get(db, 0.0)
            if db in self._failed:
                state = self._states[db]
                res = IndexOutcome(0, 0, state.reason or ERROR, state.detail)
            elif left_s <= 0:
                res = IndexOutcome(0, 0, SLOW, "this sweep's time for the database is used up")
            else:
                t0 = time.monotonic()
                res = remove_frigate_rows(
                    db, [p for _, p in batch], busy_timeout=min(timeout, left_s)
                )
                self._spent[db] = self._spent.get(db, 0.0) + time.monotonic() - t0
            out["index_rows"] += res.removed
            state = self._states.setdefault(db, _State())
            state.sites |= sites
            if res.reason is None:
                state.reason, state.detail, state.dropped = None, "", 0
                continue
            self._failed.add(db)
            left = batch[res.done :]
            if len(left) > MAX_PENDING:
                state.dropped += len(left) - MAX_PENDING
                left = left[-MAX_PENDING:]
            self._pending[db] = left
            state.reason, state.detail = res.reason, res.detail
            out["index_left"] = out.get("index_left", 0) + len(left)
            out["index_error"] = f"{db}: {res.reason}"
            log.warning(
                "recorder index %s: %s (%s); %d rows left, retried with the next batch",
                show_path(db),
                res.reason,
                res.detail,
                len(left),
            )
        return out

    def report(self, attention: Attention) -> None:
        """Raise or clear the ``recorder_index`` entry of each database the batches reached;
        the next batches try every database again."""
        self._failed.clear()
        self._spent.clear()
        for db, state in list(self._states.items()):
            if state.reason is None:
                attention.clear(RECORDER_INDEX, None, db)
                del self._states[db]
                continue
            left = len(self._pending.get(db, ()))
            why = {
                "missing": "does not exist",
                "locked": "stayed locked past the busy timeout",
                "schema": "is not shaped as expected",
                "slow": "took longer than the busy timeout (its own triggers?) and was stopped",
                "not_file": "is not a regular file",
            }.get(state.reason, "could not be written")
            message = (
                f"recorder database {db} {why} ({state.detail}): {left} rows of deleted files "
                "are left in it (retried with the next sweep's purge); the files were deleted "
                "on time"
            )
            if state.dropped:
                message += f"; {state.dropped} more are no longer retried"
            for site in sorted(state.sites):
                attention.raise_(
                    RECORDER_INDEX,
                    site,
                    db,
                    message,
                    {"database": db, "reason": state.reason, "rows_left": left},
                )

    def _db_path(self, seg: Segment, rec: Recorder) -> str | None:
        """The segment's path as the recorder stores it; None when it cannot be said."""
        site = self.config.sites.get(seg.site)
        if site is None:
            return None
        root = None
        for r in site.roots:
            rb = os.fsencode(str(r)).rstrip(b"/")
            if seg.path.startswith(rb + b"/") and (root is None or len(rb) > len(root)):
                root = rb
        if root is None:
            return None
        try:
            rel = seg.path[len(root) + 1 :].decode()  # Frigate writes ASCII names only
        except UnicodeDecodeError:
            return None
        base = rec.recordings if rec.recordings is not None else os.fsdecode(root)
        return base.rstrip("/") + "/" + rel


__all__ = ["MAX_PENDING", "RecorderIndexes"]
