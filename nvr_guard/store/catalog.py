"""The SQLite catalog: segments on disk, the scanned tree, holds, sweeps (and, through audit.py,
requests.py and media.py on the same connection, the audit log and the workflow's tables).

``Catalog`` composes the stores of one database file as mixins over one :class:`~.db.Database`
(one connection, one lock, one transaction context): a hold placed and the audit entry that
records it, or a purge's row removals and its receipts, are one transaction on one connection,
which separate store objects would each have to be handed anyway. Each mixin lives in the
module of its tables (``segments.py``, ``tree.py``, ``holds.py``, ``sweeps.py``); all DDL is in
``schema.py``, connection handling and the migration runner in ``db.py``.
"""

from __future__ import annotations

from pathlib import Path

from nvr_guard.store import schema
from nvr_guard.store.db import PAGE_SIZE, migrate, write_transaction
from nvr_guard.store.holds import HoldStore, hold_roots_json, read_active_holds
from nvr_guard.store.schema import MIGRATIONS, SCHEMA_VERSION
from nvr_guard.store.segments import (
    EXPIRY_SLACK,
    ExpiryFactory,
    PackedRows,
    SegmentRow,
    SegmentStore,
    SkewReport,
    pack_rows,
    prefix_range,
    release_memory,
)
from nvr_guard.store.sweeps import SWEEP_STATES, SweepItemRecord, SweepRecord, SweepStore
from nvr_guard.store.tree import TreeStore

__all__ = [
    "EXPIRY_SLACK",
    "MIGRATIONS",
    "PAGE_SIZE",
    "SCHEMA_VERSION",
    "SWEEP_STATES",
    "Catalog",
    "PackedRows",
    "SegmentRow",
    "SkewReport",
    "SweepItemRecord",
    "SweepRecord",
    "hold_roots_json",
    "pack_rows",
    "prefix_range",
    "read_active_holds",
    "release_memory",
    "write_transaction",
]


class Catalog(SegmentStore, TreeStore, HoldStore, SweepStore):
    """The catalog database. ``Catalog(state_dir / "catalog.db", expiry=ExpiryCalc)``."""

    def __init__(
        self,
        path: Path | str,
        *,
        timeout: float = 30.0,
        read_only: bool = False,
        expiry: ExpiryFactory | None = None,
        scratch: bool = False,
    ) -> None:
        """``read_only``: for readers that must change nothing, not even by opening (`audit
        verify`, `audit show`): no migration, no re-created audit triggers, no pragma that
        writes; the file is opened with SQLite's ``mode=ro``. ``expiry``: the calculator of
        segment expiries (``retention.expiry.ExpiryCalc``), needed by every method that writes
        them. ``scratch``: see ``Database``."""
        # audit triggers this open found dropped and re-created (the engine audits that)
        self.restored_triggers: list[str] = []
        self.expiry = expiry
        super().__init__(path, timeout=timeout, read_only=read_only, scratch=scratch)
        if not read_only:
            self._migrate()

    def _migrate(self) -> None:
        with self.lock:
            migrate(self.conn, self.lock, self.path, MIGRATIONS)
            # every open re-creates the audit triggers should someone have dropped them (the
            # chain still shows what was done meanwhile); deferred: when they are there this
            # writes nothing, so a CLI opening the catalog does not wait for the daemon's lock
            self.conn.execute("BEGIN")
            try:
                self.restored_triggers = schema.missing_audit_triggers(self.conn)
                schema.ensure_audit_schema(self.conn)
            except BaseException:
                self.conn.rollback()
                raise
            self.conn.commit()
