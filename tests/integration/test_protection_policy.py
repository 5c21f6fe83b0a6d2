"""The protection policy holds at the moment an export commits, not only when it began: a reload
during the export that requires encryption, refuses native copies of zoned cameras or adds
zones stops it (export.aborted, exit 3, nothing left). The real Workflow on an injected clock
(tests/integration/test_copies.py's lab); the package builder is its stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvr_guard.config import load_config
from nvr_guard.errors import PolicyRefused
from nvr_guard.identity import Caller
from tests.integration.test_copies import ALICE, TOM, Lab, lab

__all__ = ["lab"]


def reload(lab: Lab, old: str, new: str) -> None:
    cfg = Path(lab.engine.config.source_path)
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))
    lab.engine.apply_config(load_config(str(cfg)), "test")


def commit_after(lab: Lab, rid: int, change: tuple[str, str]) -> str:
    claim = lab.wf.export_begin(TOM, rid, str(lab.target))
    reload(lab, *change)
    with pytest.raises(PolicyRefused) as e:
        lab.wf.export_finish(claim)
    assert list(lab.target.iterdir()) == []
    [aborted] = [x for x in lab.audit("export.aborted") if x.object == f"request:{rid}"]
    assert lab.wf.show(ALICE, rid)["state"] == "approved"
    return str(e.value) + " | " + aborted.details["reason"]


def test_encryption_required_during_the_export_stops_a_plain_package(lab: Lab):
    rid = lab.approved()
    why = commit_after(
        lab, rid, ("  target_keep: 30d\n", "  target_keep: 30d\n  encrypt: passphrase\n")
    )
    assert "export.encrypt: passphrase" in why and "it will be encrypted" in why
    # run again: sealed this time
    got = lab.wf.export(TOM, rid, str(lab.target))
    assert got["encrypt"] == "passphrase"  # sealed (the stand-in builder writes no archive)


def test_zones_added_during_the_export_stop_it(lab: Lab):
    rid = lab.approved()
    why = commit_after(
        lab,
        rid,
        ("  cam-1: {level: 1}\n", "  cam-1: {level: 1, privacy_zones: [[0, 0, 0.5, 0.5]]}\n"),
    )
    assert "privacy zones of its cameras changed" in why


def test_native_copies_of_zoned_cameras_refused_at_export_too(lab: Lab):
    reload(lab, "    adm: {roles: [admin], level: 2}\n",
           "    adm: {roles: [admin], level: 2}\n    sam: {roles: [security_lead]}\n")  # fmt: skip
    rid = lab.approved("native", Caller(10_006, "sam", ()))
    reload(lab, "  cam-1: {level: 1}\n", "  cam-1: {level: 1, privacy_zones: [[0, 0, 0.5, 0.5]]}\n")
    reload(lab, "  target_keep: 30d\n", "  target_keep: 30d\n  native_with_zones: refuse\n")
    with pytest.raises(PolicyRefused, match="cannot be masked"):
        lab.wf.export(TOM, rid, str(lab.target))
    assert list(lab.target.iterdir()) == []
    assert any(x.object == f"request:{rid}" for x in lab.audit("access.denied"))
