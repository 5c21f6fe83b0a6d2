"""Prometheus metrics of a running engine: a node_exporter textfile and/or a loopback HTTP endpoint.

The figures are gathered by :meth:`EngineCollector.update`, which the daemon calls after its sweep,
rescan and request jobs (never from a scrape: a scrape must not wait for the engine lock while a
sweep of a million segments holds it). A scrape or a textfile write serialises the last snapshot.

Sources: the catalog (segments, bytes and oldest footage per site, last sweep), the engine's
:class:`~nvr_guard.engine.RetentionStats` (deletions, lateness, guard trips since start), the
request and scan tables when they exist, and the audit log (length, chain check, exports). The
audit chain is walked at most every ``verify_every`` seconds: it is O(entries), the rest is cheap.

Under the hardened systemd unit (``PrivateNetwork=yes``) the HTTP endpoint lives in the unit's own
network namespace and nothing outside can reach it: use ``metrics.textfile`` there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nvr_guard import attention
from nvr_guard.engine import LATENESS_BUCKETS, Engine
from nvr_guard.retention import policy
from nvr_guard.store import media as media_store
from nvr_guard.store import requests as requests_store

log = logging.getLogger("nvr_guard.daemon.metrics")

PREFIX = "nvrguard_"
ATTENTION_KINDS = (
    attention.UNMATCHED,
    attention.CLOCK_SKEW,
    attention.ROOT_MISSING,
    attention.ROOT_EMPTIED,
    attention.ROOT_DEVICE,
    attention.UNREADABLE,
    attention.RELOAD_REFUSED,
    attention.MOUNT_SKIPPED,
    attention.SIGNING_KEY,
    attention.AUDIT_HEAD,
    attention.CAMERA_UNCLAIMED,
    attention.RECORDER_INDEX,
    attention.NOTIFY_FAILED,
    attention.EXPORT_COPY,
)
# audit actions counted into metrics (incrementally, by sequence number)
_EXPORT_DONE = "export.done"
_EXPORT_FAILED = "export.failed"


@dataclass
class SiteFigures:
    segments: int
    bytes: int
    oldest_age: float | None  # seconds; None without footage
    keep: float  # seconds the oldest segment is kept (+inf: kept forever)
    overdue: float  # seconds the oldest segment is past its expiry (0: not due)
    unmatched: int = 0  # segment-extension files the layout does not match (last full walk)


@dataclass
class Snapshot:
    """Everything one scrape shows, taken at ``time`` (engine clock)."""

    time: float
    sites: dict[str, SiteFigures] = field(default_factory=dict)
    deleted: int = 0
    bytes_deleted: int = 0
    deleted_early: int = 0
    lateness_buckets: list[int] = field(default_factory=list)
    lateness_sum: float = 0.0
    last_lateness_max: float | None = None
    trips: dict[str, int] = field(default_factory=dict)
    sweep_blocked: bool = False
    last_sweep: float | None = None
    requests: dict[str, int] = field(default_factory=dict)
    exports: int = 0
    exports_failed: int = 0
    scans: dict[str, int] = field(default_factory=dict)
    violations: int | None = None
    audit_entries: int = 0
    audit_ok: bool | None = None
    audit_verified: float | None = None
    rss: int = 0
    attention: dict[str, int] = field(default_factory=dict)
    # notifications the web service delivered / gave up, by channel kind (mail, webhook)
    notifications: dict[tuple[str, bool], int] = field(default_factory=dict)


class EngineCollector(Collector):
    """A prometheus-client collector over one :class:`Engine`; register it in a registry."""

    def __init__(self, engine: Engine, verify_every: float = 300.0) -> None:
        self.engine = engine
        self.verify_every = verify_every
        self._snapshot: Snapshot | None = None
        self._snap_lock = threading.Lock()
        # audit-derived counters: scanned once in full, then only the entries after _audit_seq
        self._audit_seq = 0
        self._exports = 0
        self._exports_failed = 0
        self._verified_at: float | None = None  # monotonic
        self._verified_wall: float | None = None
        self._audit_ok: bool | None = None
        self._process = psutil.Process()

    # ---- gathering -------------------------------------------------------------------------
    def update(self) -> Snapshot:
        """Read the engine's figures now (takes the engine lock briefly) and keep them."""
        engine = self.engine
        with engine.lock:
            now = engine.clock().wall
            snap = Snapshot(time=now)
            self._sites(snap, now)
            st = engine.stats
            snap.deleted, snap.bytes_deleted, snap.deleted_early = st.deleted, st.bytes, st.early
            snap.lateness_buckets = list(st.lateness_buckets)
            snap.lateness_sum = st.lateness_sum
            snap.last_lateness_max = st.last_lateness_max
            snap.trips = dict(st.trips)
            latest = engine.catalog.latest_sweep()
            snap.sweep_blocked = latest is not None and latest.state == "blocked"
            done = engine.catalog.latest_sweep(("done", "confirmed", "blocked"))
            snap.last_sweep = done.started if done is not None else None
            self._tables(snap)
            self._audit(snap)
            snap.violations = self._violations()
            snap.attention = engine.attention.counts()
        snap.rss = self._process.memory_info().rss
        with self._snap_lock:
            self._snapshot = snap
        return snap

    def _sites(self, snap: Snapshot, now: float) -> None:
        found = self.engine.catalog.site_totals()
        unmatched = self.engine.scanner.unmatched_by_site()
        for name, rules in self.engine.rules.items():
            count, size, oldest = found.get(name, (0, 0, None))
            age = keep = None
            overdue = 0.0
            if oldest is not None:
                age = max(0.0, now - float(oldest))
                exp = policy.expiry(float(oldest), rules)
                if rules.cameras and exp is not None:
                    # cameras with rules of their own: the earliest stored expiry, each under
                    # its camera's rule (the oldest footage may be a camera's that keeps longer)
                    exp = self.engine.catalog.next_expiry(name)
                # the oldest segment's own keep: exact for calendar rules (6mo from *this* start),
                # so age > keep exactly when the oldest footage is past its expiry
                keep = float("inf") if exp is None else exp - float(oldest)
                overdue = 0.0 if exp is None else max(0.0, now - exp)
            elif rules.keep is not None:
                keep = rules.keep.after_ts(now, rules.tz) - now
            snap.sites[name] = SiteFigures(
                segments=count,
                bytes=size,
                oldest_age=age,
                keep=float("inf") if keep is None else keep,
                overdue=overdue,
                unmatched=unmatched.get(name, 0),
            )

    def _tables(self, snap: Snapshot) -> None:
        """Requests by state and scans by result: tables other parts create when first used."""
        cat = self.engine.catalog
        with cat.lock:
            snap.requests.update(requests_store.counts_by_state(cat))
            snap.scans.update(media_store.scan_counts_by_result(cat))
        snap.notifications.update(self.engine.notifications.counts())

    def _audit(self, snap: Snapshot) -> None:
        audit = self.engine.audit
        seq, _head = audit.head()
        snap.audit_entries = seq
        with self.engine.catalog.lock:
            counts = audit.action_counts(self._audit_seq, seq, (_EXPORT_DONE, _EXPORT_FAILED))
            for action, n in counts.items():
                if action == _EXPORT_DONE:
                    self._exports += n
                else:
                    self._exports_failed += n
        self._audit_seq = seq
        snap.exports, snap.exports_failed = self._exports, self._exports_failed
        mono = time.monotonic()
        if self._verified_at is None or mono - self._verified_at >= self.verify_every:
            report = self.engine.chain.check(full=True)  # status reuses this walk
            self._audit_ok = report.ok
            self._verified_at = mono
            self._verified_wall = snap.time
            if not report.ok:
                log.error("audit chain check failed: %s", report.problem)
        snap.audit_ok = self._audit_ok
        snap.audit_verified = self._verified_wall

    def _violations(self) -> int | None:
        """Open emergency-access violations (``workflow.refresh``, as the requests job runs it)."""
        try:
            return len(self.engine.workflow.refresh())
        except Exception as e:  # a broken workflow must not take the other figures with it
            log.warning("metrics: cannot list violations: %s", e)
            return None

    # ---- exposition --------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """The metrics of the last snapshot (the Prometheus client calls this per scrape)."""
        with self._snap_lock:
            snap = self._snapshot
        if snap is None:
            return
        yield from _families(snap)


def _families(s: Snapshot) -> Iterator[Metric]:
    p = PREFIX
    g = GaugeMetricFamily(p + "segments", "Segments in the catalog", labels=["site"])
    b = GaugeMetricFamily(p + "segment_bytes", "Bytes of catalogued segments", labels=["site"])
    age = GaugeMetricFamily(
        p + "oldest_segment_age_seconds",
        "Age of the oldest catalogued segment (by recorded start)",
        labels=["site"],
    )
    keep = GaugeMetricFamily(
        p + "retention_keep_seconds",
        "How long the site keeps its oldest segment (ceiling; +Inf = forever)",
        labels=["site"],
    )
    over = GaugeMetricFamily(
        p + "oldest_segment_overdue_seconds",
        "How far the oldest segment is past its expiry (0 = not due)",
        labels=["site"],
    )
    unm = GaugeMetricFamily(
        p + "unmatched_files",
        "Files with a segment extension the site's layout does not match (never deleted)",
        labels=["site"],
    )
    for name, f in sorted(s.sites.items()):
        unm.add_metric([name], f.unmatched)
        g.add_metric([name], f.segments)
        b.add_metric([name], f.bytes)
        keep.add_metric([name], f.keep)
        over.add_metric([name], f.overdue)
        if f.oldest_age is not None:
            age.add_metric([name], f.oldest_age)
    yield from (g, b, age, keep, over, unm)

    att = GaugeMetricFamily(
        p + "attention",
        "Attention entries standing now, by kind (status is not ok while any stands)",
        labels=["kind"],
    )
    for kind in sorted(set(ATTENTION_KINDS) | set(s.attention)):
        att.add_metric([kind], s.attention.get(kind, 0))
    yield att

    yield CounterMetricFamily(
        p + "deletions", "Segments deleted by sweeps since the daemon started", value=s.deleted
    )
    yield CounterMetricFamily(
        p + "deleted_bytes",
        "Bytes deleted by sweeps since the daemon started",
        value=s.bytes_deleted,
    )
    yield CounterMetricFamily(
        p + "deletions_early",
        "Segments deleted before their expiry (disk pressure)",
        value=s.deleted_early,
    )
    cum = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip((*LATENESS_BUCKETS, float("inf")), s.lateness_buckets, strict=True):
        cum += n
        buckets.append(("+Inf" if bound == float("inf") else _num(bound), cum))
    yield HistogramMetricFamily(
        p + "deletion_lateness_seconds",
        "How long after its expiry each segment was deleted",
        buckets=buckets,
        sum_value=s.lateness_sum,
    )
    if s.last_lateness_max is not None:
        yield GaugeMetricFamily(
            p + "last_sweep_lateness_max_seconds",
            "Largest deletion lateness of the last sweep that deleted expired footage",
            value=s.last_lateness_max,
        )
    trips = CounterMetricFamily(
        p + "guard_trips", "Sweeps stopped by a guard since the daemon started", labels=["kind"]
    )
    for kind in sorted({"mass-deletion", "clock-jump", *s.trips}):
        trips.add_metric([kind], s.trips.get(kind, 0))
    yield trips
    yield GaugeMetricFamily(
        p + "sweep_blocked",
        "1 while the latest sweep waits for `retention confirm`",
        value=int(s.sweep_blocked),
    )
    if s.last_sweep is not None:
        yield GaugeMetricFamily(
            p + "last_sweep_timestamp_seconds", "When the last sweep ran", value=s.last_sweep
        )
    req = GaugeMetricFamily(p + "requests", "Retrieval requests by state", labels=["state"])
    for state, n in sorted(s.requests.items()):
        req.add_metric([state], n)
    yield req
    yield CounterMetricFamily(p + "exports", "Exports completed (audit log)", value=s.exports)
    yield CounterMetricFamily(
        p + "exports_failed", "Exports that failed (audit log)", value=s.exports_failed
    )
    sent = CounterMetricFamily(
        p + "notifications_sent",
        "Notifications the web service delivered, by channel (mail, webhook)",
        labels=["channel"],
    )
    failed = CounterMetricFamily(
        p + "notifications_failed",
        "Notifications given up after notify.retry_for, by channel (mail, webhook)",
        labels=["channel"],
    )
    for channel in ("mail", "webhook"):
        sent.add_metric([channel], s.notifications.get((channel, True), 0))
        failed.add_metric([channel], s.notifications.get((channel, False), 0))
    yield sent
    yield failed
    scans = GaugeMetricFamily(
        p + "scans", "Malware scans of export media by result", labels=["result"]
    )
    for result, n in sorted(s.scans.items()):
        scans.add_metric([result], n)
    yield scans
    if s.violations is not None:
        yield GaugeMetricFamily(
            p + "violations", "Open emergency-access violations", value=s.violations
        )
    yield GaugeMetricFamily(p + "audit_entries", "Entries in the audit log", value=s.audit_entries)
    if s.audit_ok is not None:
        yield GaugeMetricFamily(
            p + "audit_chain_ok", "1 when the audit hash chain verified", value=int(s.audit_ok)
        )
    if s.audit_verified is not None:
        yield GaugeMetricFamily(
            p + "audit_verified_timestamp_seconds",
            "When the audit chain was last verified",
            value=s.audit_verified,
        )
    yield GaugeMetricFamily(
        p + "daemon_resident_memory_bytes", "Resident set size of the daemon", value=s.rss
    )
    yield GaugeMetricFamily(
        p + "metrics_updated_timestamp_seconds",
        "When these figures were gathered (a stale textfile means a stopped daemon)",
        value=s.time,
    )


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a validated ``metrics.listen`` (``127.0.0.1:9713``, ``[::1]:9713``)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Exporter:
    """The daemon's metrics: a collector, plus the textfile and HTTP outputs the config asks for."""

    def __init__(
        self,
        engine: Engine,
        textfile: str | None = None,
        listen: str | None = None,
        verify_every: float = 300.0,
    ) -> None:
        self.collector = EngineCollector(engine, verify_every=verify_every)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.textfile = textfile
        self.listen = listen
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None  # where the HTTP endpoint listens
        # the scheduler runs jobs in a thread pool: one update and one textfile write at a time
        self._update_lock = threading.Lock()

    @classmethod
    def from_config(cls, engine: Engine) -> Exporter | None:
        """The exporter the config asks for, or None when it asks for no metrics."""
        m = engine.config.metrics
        if m.textfile is None and m.listen is None:
            return None
        return cls(engine, textfile=m.textfile, listen=m.listen)

    def start(self) -> None:
        """First snapshot, then the HTTP endpoint (if configured). An address in use is logged,
        not fatal: retention must not stop because a metrics port is taken."""
        self.update()
        if self.listen is None:
            return
        from prometheus_client import start_http_server

        host, port = parse_listen(self.listen)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.error("metrics endpoint %s unavailable: %s", self.listen, e)
            return
        self.address = self._server.server_address[:2]
        log.info("metrics on http://%s/metrics", self.listen)

    def update(self) -> None:
        """Gather the figures and rewrite the textfile; failures are logged, never raised."""
        with self._update_lock:
            self._update()

    def _update(self) -> None:
        try:
            self.collector.update()
        except Exception as e:  # metrics are informative: a failure must not fail the job
            log.warning("metrics update failed: %s", e, exc_info=True)
            return
        if self.textfile is not None:
            try:
                self.write_textfile(self.textfile)
            except OSError as e:
                log.warning("cannot write metrics textfile %s: %s", self.textfile, e)

    def write_textfile(self, path: str) -> None:
        """Write beside the file and rename over it, so node_exporter never reads half a file.
        The mode is set on the temporary file before the rename: the unit's UMask=0077 would
        otherwise leave the file unreadable to node_exporter (another user) for a moment."""
        data = generate_latest(self.registry)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)

    def stop(self) -> None:
        """Stop the HTTP endpoint, if one runs."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
