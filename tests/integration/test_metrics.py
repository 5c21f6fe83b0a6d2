"""Prometheus metrics: figures after a sweep (textfile parsed with prometheus-client's parser), the
loopback HTTP endpoint of a real daemon, and `config check` refusing a non-loopback address."""

from __future__ import annotations

import json
import os
import socket
import stat
import urllib.request
from datetime import datetime, timedelta
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvr_guard.config import load_config
from nvr_guard.daemon.metrics import Exporter
from nvr_guard.engine import Engine
from nvr_guard.model import ClockReading
from tests.fixtures.daemon import Daemon
from tests.fixtures.site import Site, build_tree, make_config, poll, write_segment

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} missing; have {sorted(k[0] for k in samples)}"
    return samples[key]


def config_with(site: Site, metrics: str, **over: Any) -> None:
    site.config.write_text(make_config(site, **over) + f"metrics: {metrics}\n")


class FixedClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> ClockReading:
        return ClockReading(self.t, 1000.0 + self.t, "metrics-test-boot")


def test_textfile_figures_after_a_sweep(site: Site, now: datetime) -> None:
    prom = site.base / "textfile" / "nvr-guard.prom"
    prom.parent.mkdir()
    config_with(site, f"{{textfile: {prom}}}", keep="1d", fraction=0.5, min_free="0%")
    # cam1: 30 h of footage, one segment per 1.5 h, each closed a minute after it started: those
    # that ended (mtime) a day ago or more are due
    minute = timedelta(seconds=60)
    starts = [now - timedelta(hours=30) - minute + timedelta(hours=1.5 * i) for i in range(20)]
    for t in starts:
        write_segment(site.root, "cam1", t, size=1000)
    write_segment(site.root, "cam2", now - timedelta(hours=2), size=500)
    clock = FixedClock(now.timestamp())
    engine = Engine(load_config(site.config), clock=clock)
    engine.reconcile()
    out = engine.sweep()
    due = [t for t in starts if t + minute + timedelta(days=1) <= now]
    assert out.deleted == len(due) == 5
    exporter = Exporter.from_config(engine)
    assert exporter is not None
    old_umask = os.umask(0o077)  # the systemd unit's UMask
    try:
        exporter.update()
    finally:
        os.umask(old_umask)

    # readable by node_exporter (another user); no temporary file left beside it
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert [p.name for p in prom.parent.iterdir()] == ["nvr-guard.prom"]
    m = parse(prom.read_text())
    assert value(m, "nvrguard_segments", site="toll") == 20 - 5 + 1
    assert value(m, "nvrguard_segment_bytes", site="toll") == 15 * 1000 + 500
    oldest = min(t for t in starts if t not in due)
    assert value(m, "nvrguard_oldest_segment_age_seconds", site="toll") == pytest.approx(
        (now - oldest).total_seconds()
    )
    assert value(m, "nvrguard_retention_keep_seconds", site="toll") == 86400
    assert value(m, "nvrguard_oldest_segment_overdue_seconds", site="toll") == 0
    assert value(m, "nvrguard_deletions_total") == 5
    assert value(m, "nvrguard_deleted_bytes_total") == 5000
    # lateness: deleted at `now`, each one (now - end - 1d) after its expiry: 0, 1.5h .. 6h
    late = sorted((now - t - minute - timedelta(days=1)).total_seconds() for t in due)
    assert late == [0, 5400, 10800, 16200, 21600]
    assert value(m, "nvrguard_deletion_lateness_seconds_count") == 5
    assert value(m, "nvrguard_deletion_lateness_seconds_sum") == sum(late)
    assert value(m, "nvrguard_deletion_lateness_seconds_bucket", le="1") == 1
    assert value(m, "nvrguard_deletion_lateness_seconds_bucket", le="3600") == 1
    assert value(m, "nvrguard_deletion_lateness_seconds_bucket", le="21600") == 5
    assert value(m, "nvrguard_last_sweep_lateness_max_seconds") == 21600
    assert value(m, "nvrguard_guard_trips_total", kind="mass-deletion") == 0
    assert value(m, "nvrguard_sweep_blocked") == 0
    assert value(m, "nvrguard_last_sweep_timestamp_seconds") == now.timestamp()
    assert value(m, "nvrguard_audit_entries") == engine.audit.head()[0] > 0
    assert value(m, "nvrguard_audit_chain_ok") == 1
    assert value(m, "nvrguard_exports_total") == 0
    assert value(m, "nvrguard_violations") == 0
    assert value(m, "nvrguard_daemon_resident_memory_bytes") > 10_000_000
    assert value(m, "nvrguard_metrics_updated_timestamp_seconds") == now.timestamp()
    # status shows the same figures
    st = engine.status()["retention"]
    assert st["deleted"] == 5 and st["last_sweep_lateness_max"] == 21600


def test_guard_trips_requests_scans_and_exports(site: Site, now: datetime) -> None:
    config_with(site, "{listen: 127.0.0.1:9}", keep="1d", fraction=0.2, min_free="0%")
    build_tree(site.root, ["cam1"], days=3, per_day=24, now=now)  # 2 of 3 days due: trips
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    engine.reconcile()
    for _ in range(2):  # the same trip, twice: counted per stopped sweep
        out = engine.sweep()
        assert out.deleted == 0 and [t.kind for t in out.plan.trips] == ["mass-deletion"]
    assert engine.workflow is not None  # made on first use: creates the requests table
    conn = engine.catalog.conn
    with engine.catalog.transaction() as c:
        for state in ("pending", "pending", "approved"):
            c.execute(
                'INSERT INTO requests (requester, site, cameras, start, "end", reason, basis, '
                "recipient, format, state, created) VALUES "
                "('alice', 'toll', '[\"cam1\"]', 0, 1, 'r', 'b', '{}', 'mp4', ?, 0)",
                (state,),
            )
    from nvr_guard.store.media import ensure_schema

    ensure_schema(conn)
    with engine.catalog.transaction() as c:
        for result in ("clean", "clean", "infected", "failed"):
            c.execute(
                "INSERT INTO scans (media_id, target_path, started, finished, engine, "
                "engine_version, signature_version, signature_date, files, bytes, duration, "
                "result, infected_json, errors_json, listing_fingerprint, device_identity) "
                "VALUES (NULL, '/x', 0, 1, 'clamscan', '1', '1', 'd', 1, 1, 1, ?, '[]', '[]', "
                "'fp', 'id')",
                (result,),
            )
    engine.audit.append("tom", "export.done", "request:1", {})
    exporter = Exporter(engine)  # figures only, no outputs
    snap = exporter.collector.update()
    assert snap.trips == {"mass-deletion": 2} and snap.sweep_blocked
    assert snap.requests == {"pending": 2, "approved": 1}
    assert snap.scans == {"clean": 2, "infected": 1, "failed": 1}
    assert (snap.exports, snap.exports_failed) == (1, 0)
    # counted incrementally from the audit log: later entries add, earlier ones are not recounted
    engine.audit.append("tom", "export.failed", "request:2", {})
    engine.audit.append("tom", "export.done", "request:3", {})
    snap = exporter.collector.update()
    assert (snap.exports, snap.exports_failed) == (2, 1)
    from prometheus_client import generate_latest

    m = parse(generate_latest(exporter.registry).decode())
    assert value(m, "nvrguard_guard_trips_total", kind="mass-deletion") == 2
    assert value(m, "nvrguard_guard_trips_total", kind="clock-jump") == 0
    assert value(m, "nvrguard_sweep_blocked") == 1
    assert value(m, "nvrguard_requests", state="pending") == 2
    assert value(m, "nvrguard_scans", result="infected") == 1
    assert value(m, "nvrguard_exports_total") == 2
    assert value(m, "nvrguard_exports_failed_total") == 1
    assert value(m, "nvrguard_deletions_total") == 0
    # the oldest footage is past its rule and still there (the guard holds it back): visible
    assert value(m, "nvrguard_oldest_segment_overdue_seconds", site="toll") > 86400 * 0.9


def test_a_broken_textfile_path_does_not_fail_the_job(site: Site, now: datetime) -> None:
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    exporter = Exporter(engine, textfile=str(site.base / "missing-dir" / "x.prom"))
    exporter.update()  # logged, not raised
    assert exporter.collector._snapshot is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_serves_metrics_on_loopback_and_writes_the_textfile(
    site: Site, now: datetime
) -> None:
    port = free_port()
    prom = site.base / "nvr-guard.prom"
    old = write_segment(site.root, "cam1", now - timedelta(days=15, minutes=30))
    build_tree(site.root, ["cam1"], days=14, per_day=24, now=now)
    config_with(
        site, f'{{textfile: {prom}, listen: "127.0.0.1:{port}"}}', sweep_every="2s", min_free="0%"
    )
    d = Daemon(site)
    try:
        poll(lambda: not old.exists(), 30, "the expired segment to be purged")

        def deleted_in_textfile() -> bool:
            if not prom.exists():
                return False
            return value(parse(prom.read_text()), "nvrguard_deletions_total") >= 1

        poll(deleted_in_textfile, 30, "the textfile to show the deletion")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            m = parse(r.read().decode())
        assert value(m, "nvrguard_deletions_total") == 1
        assert value(m, "nvrguard_segments", site="toll") == 14 * 24
        assert value(m, "nvrguard_audit_chain_ok") == 1
        rss = value(m, "nvrguard_daemon_resident_memory_bytes")
        assert 10_000_000 < rss < 1_000_000_000
        # the endpoint is bound to loopback only
        listening = [
            c.laddr
            for c in psutil.Process(d.proc.pid).net_connections("tcp")
            if c.status == "LISTEN" and c.laddr.port == port
        ]
        assert [a.ip for a in listening] == ["127.0.0.1"]
        st = d.status()
        assert st["retention"]["deleted"] == 1
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(
    "listen, fragment",
    [
        ("0.0.0.0:9713", "0.0.0.0 is not a loopback address"),
        ("192.168.1.10:9713", "192.168.1.10 is not a loopback address"),
        ('"[::]:9713"', ":: is not a loopback address"),
        ("localhost:9713", "'localhost' is not an IP address"),
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:0", "port 0 is out of range"),
    ],
)
def test_config_check_refuses_a_non_loopback_listen_address(
    site: Site, listen: str, fragment: str
) -> None:
    site.config.write_text(make_config(site) + f"metrics:\n  listen: {listen}\n")
    line = len(site.config.read_text().splitlines())
    r = site.run("config", "check")
    assert r.returncode == 2
    assert f"{site.config}:{line}: metrics.listen: " in r.stdout + r.stderr
    assert fragment in r.stdout + r.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:9713", "127.8.9.10:80", '"[::1]:9713"'])
def test_loopback_listen_addresses_are_accepted(site: Site, listen: str) -> None:
    site.config.write_text(
        make_config(site) + f"metrics:\n  listen: {listen}\n  textfile: /run/x.prom\n"
    )
    r = site.run("--json", "config", "show")
    assert r.returncode == 0, r.stderr
    eff = json.loads(r.stdout)
    assert eff["metrics"]["listen"] == listen.strip('"')


def test_no_metrics_section_means_no_exporter(site: Site, now: datetime) -> None:
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    assert Exporter.from_config(engine) is None


def test_an_unavailable_port_is_logged_not_fatal(
    site: Site, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(load_config(site.config), clock=FixedClock(now.timestamp()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = Exporter(engine, listen=f"127.0.0.1:{port}")
        exporter.start()  # e.g. under RestrictAddressFamilies=AF_UNIX: the socket() call fails
        try:
            assert exporter.address is None
            assert "metrics endpoint 127.0.0.1:" in caplog.text
            assert exporter.collector._snapshot is not None  # figures still gathered
        finally:
            exporter.stop()
