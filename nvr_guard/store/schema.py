"""Every table, index and trigger of the catalog database, and the migrations that made them.

All DDL of the project lives here, so what the database holds is read in one place and no store
module needs another to create its tables (the requests and media stores used to be imported by
the catalog for their DDL while importing the catalog for its transactions).

Rules for editing:

- ``MIGRATIONS`` is append-only: migration i brings ``user_version`` from i-1 to i, and state
  directories at every older version must open. A change to the schema is a new migration.
- SQLite keeps the text of each ``CREATE`` statement in ``sqlite_master`` as written, so the
  strings below are never re-indented or reworded: a database made by this code and one made by
  an older release hold the same schema, byte for byte.
- The workflow tables (audit, requests, approvals, media, scans) are created with
  ``IF NOT EXISTS`` by migration 3 and again by their stores when opened on a bare connection
  (tests, tools); their ``ensure_*`` functions here are what both run.
"""

from __future__ import annotations

import sqlite3

from nvr_guard.store.db import Migration, execute_ddl

__all__ = [
    "AUDIT_TRIGGERS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SEGMENT_INDEXES",
    "add_scans_content_column",
    "create_segment_indexes",
    "drop_segment_indexes",
    "ensure_audit_schema",
    "ensure_media_schema",
    "ensure_requests_schema",
    "missing_audit_triggers",
]

# ---------------------------------------------------------------------------------------------
# the audit log (store/audit.py)

_AUDIT_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        object TEXT NOT NULL,
        details TEXT NOT NULL,
        prev TEXT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_time ON audit(time)",
    "CREATE INDEX IF NOT EXISTS audit_object ON audit(object)",
    # RAISE(ABORT) undoes the statement and leaves the caller's transaction open: the offending
    # statement fails loudly, nothing else the caller did is lost.
    """
    CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused'); END
    """,
)
AUDIT_TRIGGERS = ("audit_no_update", "audit_no_delete")


def ensure_audit_schema(conn: sqlite3.Connection) -> None:
    """Create the audit table, its indexes and the append-only triggers (idempotent).

    Runs inside the caller's transaction when one is open (the catalog's migrations), else in
    its own.
    """
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _AUDIT_SCHEMA:
            conn.execute(stmt)
    except BaseException:
        if own:
            conn.rollback()
        raise
    if own:
        conn.commit()


def missing_audit_triggers(conn: sqlite3.Connection) -> list[str]:
    """The append-only triggers missing from an existing audit table ([] when there is no
    table yet: a new log gets its triggers with it, nothing was dropped)."""
    tables = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'"
    ).fetchone()
    if tables is None:
        return []
    present = {
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'"
        )
    }
    return [t for t in AUDIT_TRIGGERS if t not in present]


# ---------------------------------------------------------------------------------------------
# requests and approvals (store/requests.py): approvals are append-only like the audit log

_REQUESTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    requester TEXT NOT NULL,
    site TEXT NOT NULL,
    cameras TEXT NOT NULL,          -- JSON list
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    reason TEXT NOT NULL,
    basis TEXT NOT NULL,
    recipient TEXT NOT NULL,        -- JSON {unit, person, contact}
    format TEXT NOT NULL,
    emergency INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    approved_at REAL,
    exported_at REAL,
    closed_at REAL,
    resolved TEXT,
    package TEXT,
    hold_id INTEGER,
    judged_by TEXT,                 -- JSON: the rules in force when it was decided
    exporter TEXT,                  -- who carried out its export
    encrypt TEXT,                   -- none | passphrase | recipient (NULL: none, older rows)
    sealed TEXT,                    -- JSON: the sealed file of a protected export
    destroyed TEXT,                 -- JSON: how its copy was known destroyed (when, by, how)
    copy TEXT                       -- JSON: where its exported copy went (target or medium)
);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY,
    request_id INTEGER NOT NULL REFERENCES requests(id),
    approver TEXT NOT NULL,
    role TEXT NOT NULL,
    decision TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL,
    mask TEXT NOT NULL DEFAULT ''   -- privacy zones the approver added (request approve --mask)
);
CREATE INDEX IF NOT EXISTS approvals_request ON approvals(request_id);
CREATE TRIGGER IF NOT EXISTS approvals_no_update BEFORE UPDATE ON approvals
    BEGIN SELECT RAISE(ABORT, 'approvals are append-only'); END;
CREATE TRIGGER IF NOT EXISTS approvals_no_delete BEFORE DELETE ON approvals
    BEGIN SELECT RAISE(ABORT, 'approvals are append-only'); END;
"""


def ensure_requests_schema(conn: sqlite3.Connection) -> None:
    """Create the requests and approvals tables (idempotent; commits an open transaction) and
    give tables of older catalogs the columns added since."""
    conn.executescript(_REQUESTS_SCHEMA)
    # a catalog from before judged_by: add the column (NULL = not decided yet)
    cols = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    if "judged_by" not in cols:
        conn.execute("ALTER TABLE requests ADD COLUMN judged_by TEXT")
    if "exporter" not in cols:
        # a catalog from before the exporter was recorded: NULL (the workflow reads it from the
        # request's export.done audit entry)
        conn.execute("ALTER TABLE requests ADD COLUMN exporter TEXT")
    for col in ("encrypt", "sealed", "destroyed", "copy"):  # protected exports (NULL: none)
        if col not in cols:
            conn.execute(f"ALTER TABLE requests ADD COLUMN {col} TEXT")
    if "mask" not in {row[1] for row in conn.execute("PRAGMA table_info(approvals)")}:
        conn.execute("ALTER TABLE approvals ADD COLUMN mask TEXT NOT NULL DEFAULT ''")


# ---------------------------------------------------------------------------------------------
# enrolled media and scan records (store/media.py): scan records are append-only

_MEDIA_SCHEMA = """
CREATE TABLE IF NOT EXISTS media (
    id TEXT PRIMARY KEY,
    serial TEXT NOT NULL,
    fs_uuid TEXT NOT NULL,
    label TEXT NOT NULL,
    vendor TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    enrolled_by TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    removed_by TEXT,
    removed_at REAL
);
CREATE TABLE IF NOT EXISTS scans (
    id INTEGER PRIMARY KEY,
    media_id TEXT,                  -- NULL for a directory from export.targets
    target_path TEXT NOT NULL,      -- what was scanned (the mount point, or the directory)
    started REAL NOT NULL,
    finished REAL NOT NULL,
    engine TEXT NOT NULL,
    engine_version TEXT NOT NULL,
    signature_version TEXT NOT NULL,
    signature_date TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    duration REAL NOT NULL,
    result TEXT NOT NULL,           -- only 'clean' lets a write through
    infected_json TEXT NOT NULL,    -- JSON list of {path, signature}
    errors_json TEXT NOT NULL,      -- JSON list of strings
    listing_fingerprint TEXT NOT NULL,
    device_identity TEXT NOT NULL,
    content_digest TEXT NOT NULL DEFAULT ''  -- '' (older scans): not usable for an export
);
CREATE INDEX IF NOT EXISTS scans_media ON scans(media_id);
CREATE INDEX IF NOT EXISTS scans_target ON scans(target_path);
CREATE TRIGGER IF NOT EXISTS scans_no_update BEFORE UPDATE ON scans
    BEGIN SELECT RAISE(ABORT, 'scan records are append-only'); END;
"""

_SCANS_CONTENT_COLUMN = "ALTER TABLE scans ADD COLUMN content_digest TEXT NOT NULL DEFAULT ''"


def ensure_media_schema(conn: sqlite3.Connection) -> None:
    """Create the media and scans tables (idempotent; commits an open transaction)."""
    conn.executescript(_MEDIA_SCHEMA)


def add_scans_content_column(conn: sqlite3.Connection) -> None:
    """Give a scans table made before content digests its column (catalog migration 5; empty:
    such scans no longer let an export through, the medium is scanned again). Idempotent: the
    tables of a new catalog already have it (migration 3 runs the current media schema)."""
    cols = {row[1] for row in conn.execute("PRAGMA table_info(scans)")}
    if "content_digest" not in cols:
        conn.execute(_SCANS_CONTENT_COLUMN)


# ---------------------------------------------------------------------------------------------
# the catalog's migrations (segments, the scanned tree, holds, sweeps; the workflow's tables
# come with migration 3)


def _migration_1(conn: sqlite3.Connection) -> None:
    # (site, camera, start) rather than (site, camera): it answers the per-camera counts of the
    # mass-deletion guard just as well (index prefix) and also the time-range lookups of holds
    # and exports, for one index maintained instead of two.
    for stmt in (
        """CREATE TABLE segments (
            id INTEGER PRIMARY KEY,
            site TEXT NOT NULL,
            camera TEXT NOT NULL,
            path BLOB NOT NULL UNIQUE,
            start REAL NOT NULL,
            mtime REAL NOT NULL,
            size INTEGER NOT NULL,
            expires_at REAL
        )""",
        "CREATE INDEX segments_expires ON segments(expires_at)",
        "CREATE INDEX segments_site_start ON segments(site, start)",
        "CREATE INDEX segments_site_camera ON segments(site, camera, start)",
        # which rules the expires_at column of a site was computed with (SiteRules.digest)
        "CREATE TABLE expiry_rules (site TEXT PRIMARY KEY, digest TEXT NOT NULL)",
        """CREATE TABLE dirs (
            path BLOB PRIMARY KEY,
            site TEXT NOT NULL,
            mtime_ns INTEGER NOT NULL
        )""",
        "CREATE INDEX dirs_site ON dirs(site)",
        """CREATE TABLE holds (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL DEFAULT 'manual',
            site TEXT,
            camera TEXT,
            start REAL NOT NULL,
            "end" REAL NOT NULL,
            until REAL,
            reason TEXT NOT NULL,
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            released REAL,
            released_by TEXT,
            release_reason TEXT,
            request_id INTEGER
        )""",
        "CREATE INDEX holds_open ON holds(released)",
        """CREATE TABLE sweeps (
            id INTEGER PRIMARY KEY,
            started REAL NOT NULL,
            finished REAL,
            state TEXT NOT NULL CHECK (state IN
                ('planned', 'blocked', 'applying', 'done', 'confirmed', 'failed')),
            actor TEXT NOT NULL,
            dry_run INTEGER NOT NULL DEFAULT 0,
            wall REAL NOT NULL,
            boottime REAL NOT NULL,
            boot_id TEXT NOT NULL,
            site_rules_json TEXT NOT NULL DEFAULT '{}',
            deleted INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX sweeps_state ON sweeps(state, id)",
        """CREATE TABLE sweep_items (
            sweep_id INTEGER NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
            path BLOB NOT NULL,
            site TEXT NOT NULL,
            camera TEXT NOT NULL,
            action TEXT NOT NULL,
            reason TEXT NOT NULL
        )""",
        "CREATE INDEX sweep_items_sweep ON sweep_items(sweep_id)",
    ):
        conn.execute(stmt)


def _migration_2(conn: sqlite3.Connection) -> None:
    # how each site's camera/start were read (layout pattern and zone, or mtime mode): a
    # reconcile trusts catalogued rows of unchanged files only while this is unchanged
    conn.execute("CREATE TABLE site_layouts (site TEXT PRIMARY KEY, layout TEXT NOT NULL)")


def _migration_3(conn: sqlite3.Connection) -> None:
    # the workflow's tables: the audit log, requests and approvals, enrolled media and scans
    # (``IF NOT EXISTS`` throughout, so catalogs that got these tables before they were a
    # numbered migration pass through unchanged)
    ensure_audit_schema(conn)
    execute_ddl(conn, _REQUESTS_SCHEMA)
    execute_ddl(conn, _MEDIA_SCHEMA)


def _migration_4(conn: sqlite3.Connection) -> None:
    # (site, start) answered "the oldest footage of a site" (disk pressure) and a status line;
    # (site, camera, start) answers both, one camera at a time (Catalog.oldest_segments), and
    # one index less is about half a second less of every cold load of a million segments
    conn.execute("DROP INDEX IF EXISTS segments_site_start")


def _migration_5(conn: sqlite3.Connection) -> None:
    # scans are bound to what the files hold, not only to their names, sizes and mtimes
    add_scans_content_column(conn)


def _migration_6(conn: sqlite3.Connection) -> None:
    # holds.roots: the roots (JSON list of paths) of the hold's site when it was placed, so a
    # hold keeps protecting its footage when the site is renamed or the root moves elsewhere.
    # sweeps.trips: the guards that stopped a sweep and what they measured (JSON), so
    # ``retention confirm`` releases exactly what the admin was shown.
    # root_devices: the file system (st_dev) each root was on at the last reconcile, and that
    # file system's mount point; a root on another device now (its mount is gone) is no part of
    # any volume's disk pressure.
    for stmt in (
        "ALTER TABLE holds ADD COLUMN roots TEXT",
        "ALTER TABLE sweeps ADD COLUMN trips TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE root_devices (
            root BLOB PRIMARY KEY,
            site TEXT NOT NULL,
            dev INTEGER NOT NULL,
            mount BLOB NOT NULL,
            seen REAL NOT NULL
        )""",
    ):
        conn.execute(stmt)


def _migration_7(conn: sqlite3.Connection) -> None:
    # which file system each root was on when last walked: a root that now sits on another one
    # (its disk not mounted, another disk in its place) is not walked until it is back or an
    # admin confirms (IF NOT EXISTS: safe to renumber when migrations of branches are merged)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS root_fs (root BLOB PRIMARY KEY, site TEXT NOT NULL, "
        "fs TEXT NOT NULL)"
    )


def _migration_8(conn: sqlite3.Connection) -> None:
    # expires_at was computed from the path time alone; it now needs both the path time and the
    # mtime past ``keep``. The rules are not known here: forgetting which rules each site's
    # column was computed with makes the next ensure_expiry (every reconcile and sweep does one,
    # before reading the column) recompute it. Until then nothing is deleted that was not
    # already due by the old column, and the policy checks both times in any case.
    conn.execute("DELETE FROM expiry_rules")


def _migration_9(conn: sqlite3.Connection) -> None:
    # the end a segment's name carries (Dahua's start-end, Nx Witness's duration); NULL: none,
    # the mtime is the end. Existing rows come from layouts that could not name an end (NULL is
    # right for them); a new layout makes the next reconcile read every path again. Idempotent,
    # so it is safe to renumber when migrations of branches are merged.
    cols = {row[1] for row in conn.execute("PRAGMA table_info(segments)")}
    if "end" not in cols:
        conn.execute('ALTER TABLE segments ADD COLUMN "end" REAL')


def _migration_10(conn: sqlite3.Connection) -> None:
    # notifications (issue 17): the audit seq up to which the web service has delivered (or
    # given up) every notification, the outcome of each delivery after it (so a restarted web
    # service sends nothing twice and a failure is recorded once), and the totals per channel
    # for the metrics. IF NOT EXISTS: safe to renumber when migrations of branches are merged.
    for stmt in (
        "CREATE TABLE IF NOT EXISTS notify_cursor (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "seq INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS notify_deliveries (seq INTEGER NOT NULL, "
        "channel TEXT NOT NULL, ok INTEGER NOT NULL, time REAL NOT NULL, "
        "error TEXT NOT NULL DEFAULT '', PRIMARY KEY (seq, channel))",
        "CREATE TABLE IF NOT EXISTS notify_counts (channel TEXT NOT NULL, ok INTEGER NOT NULL, "
        "n INTEGER NOT NULL, PRIMARY KEY (channel, ok))",
    ):
        conn.execute(stmt)


# Ordered: migration i brings the schema from user_version i-1 to i. Append, never edit.
MIGRATIONS: list[Migration] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
]
SCHEMA_VERSION = len(MIGRATIONS)

# secondary indexes of segments, dropped and rebuilt around a bulk load into an empty table
# (building an index from sorted data is several times cheaper than a million B-tree inserts)
SEGMENT_INDEXES = {
    "segments_expires": "CREATE INDEX segments_expires ON segments(expires_at)",
    "segments_site_camera": "CREATE INDEX segments_site_camera ON segments(site, camera, start)",
}


def drop_segment_indexes(conn: sqlite3.Connection) -> None:
    """Drop the secondary indexes of segments (inside the caller's bulk-load transaction)."""
    for name in SEGMENT_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")


def create_segment_indexes(conn: sqlite3.Connection) -> None:
    """Build the secondary indexes of segments again (the end of a bulk load)."""
    for sql in SEGMENT_INDEXES.values():
        conn.execute(sql)
