"""What the operations below the engine may use of it: the narrow context.

The workflow (requests, approvals, exports), the media gate and the retention operations each need
the same few things of a running instance — the config in force, the clock, the one lock, the
audit chain, the catalog, the attention registry, who holds which role, and the export signing
key — and nothing else. Before this module they were handed the whole ``Engine`` and imported it,
which tied every one of them to everything the engine wires together (an import cycle, and no way
to tell from a signature what an operation touches). The engine builds one :class:`Context` and
passes it down; it stays the only owner of what changes on a reload (it sets ``config`` here, so
every holder of the context sees the new one at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from nvr_guard.attention import SIGNING_KEY, Attention
from nvr_guard.config import Config
from nvr_guard.errors import NvrGuardError, PolicyRefused, RuntimeFailure
from nvr_guard.identity import Caller
from nvr_guard.model import ClockReading
from nvr_guard.store.audit import AuditHeadMismatch, AuditLog
from nvr_guard.store.catalog import Catalog

log = logging.getLogger(__name__)

Clock = Callable[[], ClockReading]


def root_bytes(root: str | os.PathLike[str]) -> bytes:
    """A configured root as the catalog's paths begin with it (no trailing slash)."""
    return os.fsencode(str(root)).rstrip(b"/") or b"/"


def site_roots(config: Config) -> dict[str, list[bytes]]:
    """Per site, its configured roots as the catalog's paths begin with them."""
    return {name: [root_bytes(r) for r in site.roots] for name, site in config.sites.items()}


class Context:
    """The config, clock, lock, stores, audit, attention, roles and signing key of one instance.

    ``lock`` is the catalog's: one lock for the SQLite connection that the watcher's hints, the
    scheduler's jobs and the control socket's commands share, so a statement from one thread
    never lands inside another thread's transaction.
    """

    def __init__(
        self,
        config: Config,
        clock: Clock,
        catalog: Catalog,
        audit: AuditLog,
        attention: Attention,
    ) -> None:
        self.config = config
        self.clock = clock
        self.catalog = catalog
        self.lock = catalog.lock
        self.audit = audit
        self.attention = attention
        self.key_fingerprint: str | None = None  # the export signing key's, once loaded

    def now(self) -> float:
        """The wall time of the instance's clock."""
        return self.clock().wall

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """The lock and one audit transaction (``AuditLog.recording``): for operations that
        change state and record it — both commit together, or neither does."""
        with self.lock, self.audit.recording():
            yield

    def roots_of(self, site: str) -> list[bytes]:
        """The site's roots, as a hold placed on it records them."""
        return site_roots(self.config)[site]

    # ---- who holds which role -------------------------------------------------------------
    def roles_for(self, caller: Caller) -> set[str]:
        """Roles from ``people``: the user's own roles plus those of their Unix groups. root is
        an administrator of this host in any case (it could edit the state directly)."""
        roles: set[str] = set()
        people = self.config.people
        user = people.users.get(caller.user)
        if user is not None:
            roles.update(user.roles)
        for g in caller.groups:
            group = people.groups.get(g)
            if group is not None:
                roles.update(group.roles)
        if caller.uid == 0:
            roles.add("admin")
        return roles

    def require(self, caller: Caller, allowed: frozenset[str], what: str) -> None:
        """Refuse (audited, exit 3) unless ``caller`` holds one of the ``allowed`` roles."""
        if self.roles_for(caller) & allowed:
            return
        self.audit.append(
            caller.user, "access.denied", what, {"uid": caller.uid, "needs": sorted(allowed)}
        )
        raise PolicyRefused(
            f"{caller.user} may not {what}: needs role {' or '.join(sorted(allowed))} "
            f"(people: in {self.config.source_path})"
        )

    # ---- export signing key ---------------------------------------------------------------
    def ensure_signing_key(self) -> str | None:
        """Load (or create, once) the export signing key; its fingerprint, or None on failure.

        Done at daemon start, not at the first export: the fingerprint must be on record (audit
        log, status, `key show`, the paper approval record) before any package exists, because
        it is the only thing that tells a recipient a re-signed forgery from the recorder's own
        package. The creation is audited with the fingerprint; a key that cannot be used is an
        attention state (exports fail, retention goes on).
        """
        # imported here: the CLI's read commands start without loading the crypto library
        from nvr_guard.export.keys import key_location_problem, load_or_create_key

        path = Path(self.config.signing_key_path())
        try:
            why = key_location_problem(path, {0, os.geteuid()})
            if why is not None:
                raise RuntimeFailure(why)
            existed = path.exists()
            _, fp = load_or_create_key(Path(self.config.state_dir), path)
        except (NvrGuardError, OSError) as e:
            self.attention.raise_(SIGNING_KEY, None, str(path), f"export signing key unusable: {e}")
            return None
        self.attention.clear(SIGNING_KEY)
        with self.lock:
            recorded = any(True for _ in self.audit.entries(action="export.key", obj=fp))
            try:
                if not existed or not recorded:
                    self.audit.append(
                        "nvr-guard", "export.key", fp, {"path": str(path), "created": not existed}
                    )
            except AuditHeadMismatch as e:  # recorded (created: false) at the next start
                log.error("export key %s not recorded in the audit log: %s", fp, e)
        if not existed:
            log.warning("created the export signing key %s, fingerprint %s", path, fp)
        self.key_fingerprint = fp
        return fp
