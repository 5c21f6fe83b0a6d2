"""What the scanner remembers of the recording tree between reconciles: each directory's mtime
(an incremental reconcile re-lists only those that changed), how each site's paths were read
(its layout), and which file system and device each root was on (a root whose disk is not
mounted is not mistaken for an emptied one).
"""

from __future__ import annotations

from collections.abc import Iterable

from nvr_guard.store.db import Database
from nvr_guard.store.segments import prefix_range

__all__ = ["TreeStore"]


class TreeStore(Database):
    """The ``dirs``, ``site_layouts``, ``root_fs`` and ``root_devices`` tables (a mixin of
    ``Catalog``)."""

    # -- directories (incremental reconcile) -----------------------------------------------

    def dirs_of(self, site: str) -> dict[bytes, int]:
        """directory -> mtime_ns recorded when it was last listed, for a site."""
        with self.lock:
            cur = self.conn.execute("SELECT path, mtime_ns FROM dirs WHERE site = ?", (site,))
            return {bytes(p): int(m) for p, m in cur}

    def set_dirs(self, site: str, items: Iterable[tuple[bytes, int]]) -> None:
        """Record (directory, mtime_ns) pairs of a site as listed now."""
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO dirs (path, site, mtime_ns) VALUES (?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET site = excluded.site, "
                "mtime_ns = excluded.mtime_ns",
                ((p, site, m) for p, m in items),
            )

    def remove_dirs(self, paths: Iterable[bytes]) -> None:
        """Forget these directories (listed again at the next reconcile)."""
        with self.transaction() as c:
            c.executemany("DELETE FROM dirs WHERE path = ?", ((p,) for p in paths))

    def remove_dirs_below(self, root: bytes) -> None:
        """Forget ``root`` and every directory below it (its walk then records them anew)."""
        lo, hi = prefix_range(root + b"/")
        with self.transaction() as c:
            c.execute("DELETE FROM dirs WHERE path = ? OR (path >= ? AND path < ?)", (root, lo, hi))

    # -- layouts and roots -----------------------------------------------------------------

    def layout_key(self, site: str) -> str | None:
        """How the site's paths were read at the last reconcile, or None."""
        with self.lock:
            row = self.conn.execute(
                "SELECT layout FROM site_layouts WHERE site = ?", (site,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_layout_key(self, site: str, key: str) -> None:
        """Record how the site's paths are read now."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO site_layouts (site, layout) VALUES (?, ?) "
                "ON CONFLICT(site) DO UPDATE SET layout = excluded.layout",
                (site, key),
            )

    def root_fs(self, root: bytes) -> str | None:
        """Which directory ``root`` was when last walked (nvr_guard.mounts.dir_identity; a record
        of an older version holds only the file system: nvr_guard.mounts.fs_identity)."""
        with self.lock:
            row = self.conn.execute("SELECT fs FROM root_fs WHERE root = ?", (root,)).fetchone()
        return None if row is None else str(row[0])

    def set_root_fs(self, root: bytes, site: str, fs: str) -> None:
        """Record which directory (file system) ``root`` of ``site`` is now."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO root_fs (root, site, fs) VALUES (?, ?, ?) "
                "ON CONFLICT(root) DO UPDATE SET site = excluded.site, fs = excluded.fs",
                (root, site, fs),
            )

    def root_fs_all(self) -> dict[bytes, str]:
        """:meth:`root_fs` of every recorded root."""
        with self.lock:
            rows = self.conn.execute("SELECT root, fs FROM root_fs").fetchall()
        return {bytes(r): str(f) for r, f in rows}

    def forget_root_fs_except(self, roots: Iterable[bytes]) -> None:
        """Forget the file systems of roots no longer configured."""
        keep = sorted(set(roots))
        marks = ",".join("?" * len(keep)) or "NULL"
        with self.transaction() as c:
            c.execute(f"DELETE FROM root_fs WHERE root NOT IN ({marks})", keep)

    def root_devices(self) -> dict[bytes, tuple[int, bytes]]:
        """root -> (st_dev, mount point of that file system) recorded at a reconcile."""
        with self.lock:
            cur = self.conn.execute("SELECT root, dev, mount FROM root_devices")
            return {bytes(r): (int(d), bytes(m)) for r, d, m in cur}

    def set_root_devices(self, rows: Iterable[tuple[bytes, str, int, bytes]], seen: float) -> None:
        """(root, site, st_dev, mount point) rows."""
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO root_devices (root, site, dev, mount, seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(root) DO UPDATE SET site = excluded.site, dev = excluded.dev, "
                "mount = excluded.mount, seen = excluded.seen",
                ((r, s, d, m, seen) for r, s, d, m in rows),
            )

    def forget_root_devices_except(self, roots: Iterable[bytes]) -> None:
        """Forget the devices of roots no longer configured."""
        keep = sorted(set(roots))
        marks = ",".join("?" * len(keep)) or "NULL"
        with self.transaction() as c:
            c.execute(f"DELETE FROM root_devices WHERE root NOT IN ({marks})", keep)
