"""Audit chain: concurrent writers in separate processes keep one chain (the rest of the audit
chain's tests are in tests/unit/test_audit.py)."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.store.audit import AuditLog, read_head_file
from tests.unit.test_audit import connect

N_PROC = 4
N_EACH = 40


def _writer(path: str, worker: int, barrier: Any) -> None:
    conn = sqlite3.connect(path, timeout=120)
    log = AuditLog(conn)
    barrier.wait()  # start together so the appends really interleave
    for n in range(N_EACH):
        log.append(f"w{worker}", "hold.add", f"hold:{worker}-{n}", {"worker": worker, "n": n})
    conn.close()


@pytest.mark.slow
def test_concurrent_appends_from_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    connect(path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_PROC)
    procs = [ctx.Process(target=_writer, args=(str(path), w, barrier)) for w in range(N_PROC)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * N_PROC
    log = AuditLog(connect(path))
    rep = log.verify()
    assert rep.ok, rep.problem
    assert rep.count == N_PROC * N_EACH
    got = sorted((e.details["worker"], e.details["n"]) for e in log.entries())
    assert got == sorted((w, n) for w in range(N_PROC) for n in range(N_EACH))
    # each writer's own entries are in its order; the writers interleaved
    for w in range(N_PROC):
        ns = [e.details["n"] for e in log.entries(obj_prefix=f"hold:{w}-")]
        assert ns == list(range(N_EACH))
    assert read_head_file(tmp_path / "audit.head") == log.head()
