"""Chain of custody: a recipient tells a re-signed forgery from the recorder's package by a
fingerprint that reaches them on paper; verify refuses what is not a plain package; the audit log
never forgets a truncation and never loses an entry to concurrent callers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nvr_guard.export import (
    DirectoryDestination,
    ExportJob,
    SourceSegment,
    approval_record_html,
    fingerprint,
    load_or_create_key,
    public_pem,
    run_export,
)
from nvr_guard.export.package import manifest_bytes
from tests.fixtures.cli import run_cli
from tests.fixtures.daemon import Daemon
from tests.fixtures.site import Site, poll, write_segment

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
T0 = 1763600000.0


def nvr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(args, timeout=timeout)


# ---- a real package ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(package directory, state directory holding the recorder's key): one real export."""
    base = tmp_path_factory.mktemp("custody")
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi",
            "-i", "testsrc2=size=160x120:rate=25", "-t", "4",
            "-c:v", "libx264", "-preset", "ultrafast", "-g", "25",
            str(base / "seg.mp4"),
        ],
        check=True,
    )  # fmt: skip
    state = base / "state"
    key, _ = load_or_create_key(state)
    (base / "usb").mkdir()
    job = ExportJob(
        request={
            "id": 7,
            "requester": "alice",
            "site": "bank",
            "cameras": ["lobby-1"],
            "from": "a",
            "to": "b",
            "reason": "robbery",
            "basis": "law",
            "recipient": {"unit": "PSB", "person": "Wang", "contact": "1"},
            "format": "mp4",
            "emergency": False,
        },
        approvals=[{"approver": "bob", "role": "manager", "decision": "approve"}],
        technician="tom",
        start=T0 + 0.5,
        end=T0 + 3.5,
        tz=ZoneInfo("Asia/Shanghai"),
        watermark_template="NVRG {request} {camera}",
        font=FONT,
        preset="ultrafast",
    )
    pkg = run_export(
        [("lobby-1", [SourceSegment(base / "seg.mp4", T0)])],
        job,
        DirectoryDestination(base / "usb"),
        key,
        audit_head=(3, "a" * 64),
    )
    return pkg.path, state


@pytest.fixture
def copy(made: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / made[0].name
    shutil.copytree(made[0], dst)
    return dst


def real_fingerprint(made: tuple[Path, Path]) -> str:
    return load_or_create_key(made[1])[1]


def resign_forgery(pkg: Path) -> str:
    """What a courier can do: another clip, the manifest edited to match, signed with a new
    key whose public half replaces signer.pub. Returns the forger's fingerprint."""
    clip = next(pkg.glob("*.mp4"))
    clip.write_bytes(clip.read_bytes()[:-4096] + b"\0" * 4096)  # "another" clip
    m = json.loads((pkg / "manifest.json").read_bytes())
    digest = subprocess.run(
        ["sha256sum", str(clip)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    m["files"][clip.name]["sha256"] = digest
    m["clips"][0]["sha256"] = digest
    forger = Ed25519PrivateKey.generate()
    m["signer"]["fingerprint"] = fingerprint(forger.public_key())
    body = manifest_bytes(m)
    (pkg / "manifest.json").write_bytes(body)
    (pkg / "manifest.sig").write_bytes(forger.sign(body))
    (pkg / "signer.pub").write_bytes(public_pem(forger.public_key()))
    return fingerprint(forger.public_key())


def test_resigned_forgery_is_not_confirmed_and_fails_against_the_pin(
    copy: Path, made: tuple[Path, Path], tmp_path: Path
) -> None:
    real = real_fingerprint(made)
    forged = resign_forgery(copy)

    # unpinned: self-consistent, but the output says the signer is not confirmed
    r = nvr("verify", str(copy))
    assert r.returncode == 0, r.stderr
    assert "the signer is NOT confirmed" in r.stdout
    assert f"compare {forged} with the fingerprint on the paper record" in r.stdout
    j = json.loads(nvr("--json", "verify", str(copy)).stdout)
    assert j["ok"] is True and j["signer_confirmed"] is False and j["fingerprint"] == forged

    # pinned to the recorder's fingerprint (from paper) or its public key: exit 4
    r = nvr("verify", str(copy), "--fingerprint", real)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "key-mismatch" in r.stderr and real in r.stderr and forged in r.stderr
    pub = tmp_path / "recorder.pub"
    pub.write_bytes(public_pem(load_or_create_key(made[1])[0].public_key()))
    j = json.loads(nvr("--json", "verify", str(copy), "--key", str(pub)).stdout)
    assert j["ok"] is False and j["signer_confirmed"] is False
    assert [p["kind"] for p in j["problems"]] == ["key-mismatch"]


def test_genuine_package_is_confirmed_only_with_a_pin(
    made: tuple[Path, Path], tmp_path: Path
) -> None:
    pkg, state = made
    real = real_fingerprint(made)
    j = json.loads(nvr("--json", "verify", str(pkg)).stdout)
    assert j["ok"] is True and j["signer_confirmed"] is False
    r = nvr("--json", "verify", str(pkg), "--fingerprint", f"  {real}= ")  # as typed from paper
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["signer_confirmed"] is True
    r = nvr("verify", str(pkg), "--key", str(state / "export-key.pem"))  # a private PEM works too
    assert r.returncode == 0 and "the pinned recorder key" in r.stdout, r.stderr
    # a pin that is not a fingerprint is a usage error, not a verdict
    r = nvr("verify", str(pkg), "--fingerprint", "SHA256:short")
    assert r.returncode == 2 and "not a key fingerprint" in r.stderr
    r = nvr("verify", str(pkg), "--fingerprint", real, "--key", str(state / "export-key.pem"))
    assert r.returncode == 2


@pytest.mark.parametrize("option", ["--fingerprint", "--key"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_pin_is_a_usage_error_not_no_pin(
    made: tuple[Path, Path], option: str, value: str
) -> None:
    """`--fingerprint "$FP"` with FP unset must not quietly verify without a pin."""
    r = nvr("--json", "verify", str(made[0]), option, value)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert option in r.stderr


def test_a_signed_manifest_naming_a_file_with_a_nul_byte_is_a_verdict_not_a_crash(
    copy: Path, made: tuple[Path, Path]
) -> None:
    """The manifest is signed, but by whoever made the package: a name no file can have is a
    failed check with its rule (exit 4), even signed by the recorder's own key."""
    m = json.loads((copy / "manifest.json").read_bytes())
    m["files"]["a\x00b.mp4"] = {"sha256": "0" * 64, "size": 1}
    key = load_or_create_key(made[1])[0]
    body = manifest_bytes(m)
    (copy / "manifest.json").write_bytes(body)
    (copy / "manifest.sig").write_bytes(key.sign(body))
    r = nvr("--json", "verify", str(copy), "--fingerprint", real_fingerprint(made))
    assert r.returncode == 4, r.stdout + r.stderr
    j = json.loads(r.stdout)
    assert [p["kind"] for p in j["problems"]] == ["manifest-changed"]
    assert "bad file name 'a\\x00b.mp4'" in j["problems"][0]["message"]
    r = nvr("verify", str(copy))
    assert r.returncode == 4 and "Traceback" not in r.stderr and "manifest-changed" in r.stderr


def test_verify_txt_sends_the_recipient_to_the_paper_record(made: tuple[Path, Path]) -> None:
    text = (made[0] / "VERIFY.txt").read_text()
    assert "--fingerprint SHA256:<fingerprint from the paper record>" in text
    step_b = text[text.index("b) the signer key") : text.index("c) every file")]
    assert "must equal the fingerprint on" in step_b and "paper record" in step_b
    assert "proves\n      nothing" in step_b  # the fingerprint in the same file is worthless


def test_paper_record_carries_the_fingerprint_and_a_hand_over_slip() -> None:
    fp = "SHA256:" + "A" * 43
    blank = approval_record_html({"id": 3, "recipient": {}}, [], None, signer=fp)
    assert blank.count(fp) >= 3  # export section, slip, the verify command
    assert "Hand-over slip" in blank and "移交单" in blank
    assert f"--fingerprint {fp}" in blank


# ---- verify refuses what is not a plain package ----------------------------------------------
def test_a_fifo_in_place_of_the_clip_is_refused_not_waited_on(copy: Path) -> None:
    clip = next(copy.glob("*.mp4"))
    clip.unlink()
    os.mkfifo(clip)
    r = nvr("--json", "verify", str(copy), timeout=30)  # the old check blocked here for ever
    assert r.returncode == 4
    kinds = [p["kind"] for p in json.loads(r.stdout)["problems"]]
    assert kinds == ["not-regular"]
    assert "FIFO" in json.loads(r.stdout)["problems"][0]["message"]


def test_a_symlink_in_the_package_is_refused(copy: Path, tmp_path: Path) -> None:
    """A link to an identical file outside would pass a hash check that follows it."""
    clip = next(copy.glob("*.mp4"))
    outside = tmp_path / "elsewhere.mp4"
    shutil.copyfile(clip, outside)
    clip.unlink()
    clip.symlink_to(outside)
    r = nvr("verify", str(copy))
    assert r.returncode == 4
    assert f"not-regular: not a regular file: {clip.name} is a symbolic link" in r.stderr
    (copy / "extra-dir").mkdir()
    r = nvr("--json", "verify", str(copy))
    problems = json.loads(r.stdout)["problems"]
    assert sorted(p["kind"] for p in problems) == ["not-regular", "not-regular"]


def test_the_directory_must_carry_the_signed_package_name(copy: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "NVRG-999-20250101T000000Z"
    copy.rename(renamed)
    r = nvr("verify", str(renamed))
    assert r.returncode == 4
    assert "name-mismatch" in r.stderr and copy.name in r.stderr
    renamed.rename(copy)
    assert nvr("verify", str(copy)).returncode == 0


# ---- the daemon publishes the fingerprint before any export ----------------------------------
@pytest.fixture
def daemon(site: Site) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_fingerprint_is_on_record_at_key_creation_status_key_show_and_form(
    site: Site, daemon: list[Daemon]
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    for i in range(3):
        write_segment(site.root, "cam-1", now - timedelta(hours=2, minutes=-i))
    assert not (site.state / "export-key.pem").exists()
    daemon.append(Daemon(site))
    fp = load_or_create_key(site.state)[1]
    assert site.json("status")["export_key"]["fingerprint"] == fp
    assert site.json("key", "show")["fingerprint"] == fp
    assert fp in site.run("status").stdout
    # the creation is in the audit log, before (without) any export
    entries = site.json("audit", "show")["entries"]
    created = [e for e in entries if e["action"] == "export.key"]
    assert [(e["object"], e["details"]["created"]) for e in created] == [(fp, True)]
    assert not any(e["action"].startswith("export.") and e["action"] != "export.key"
                   for e in entries)  # fmt: skip
    # the paper record printed before the export carries it, with the hand-over slip
    t0, t1 = (now - timedelta(hours=h) for h in (3, 1))
    rid = site.json(
        "request", "new", "--camera", "cam-1", "--from", t0.isoformat(), "--to", t1.isoformat(),
        "--reason", "theft", "--basis", "law", "--recipient", "PSB; Wang; 110",
    )["id"]  # fmt: skip
    form = site.run("export", "form", str(rid))
    assert form.returncode == 0, form.stderr
    assert f"--fingerprint {fp}" in form.stdout and "Hand-over slip" in form.stdout
    daemon[0].stop()
    # without a daemon, root reads it from the key file; a restart does not audit it again
    assert site.json("key", "show")["fingerprint"] == fp
    daemon.append(Daemon(site))
    entries = site.json("audit", "show")["entries"]
    assert len([e for e in entries if e["action"] == "export.key"]) == 1


# ---- the audit log's anchor (audit.head) -----------------------------------------------------
def truncate(db: Path, n: int) -> None:
    """What root can do: drop the triggers, delete the newest ``n`` entries, put them back."""
    conn = sqlite3.connect(db, timeout=30)
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq > (SELECT max(seq) FROM audit) - ?", (n,))
    conn.commit()
    conn.close()
    from nvr_guard.store.catalog import Catalog

    Catalog(db).close()  # the next open re-creates the triggers


def test_a_brand_new_log_is_fine_and_its_first_append_anchors_first(tmp_path: Path) -> None:
    from nvr_guard.store.audit import GENESIS, AuditLog, read_head_file
    from nvr_guard.store.catalog import Catalog

    cat = Catalog(tmp_path / "catalog.db")
    log = AuditLog(cat.conn)
    rep = log.verify()
    assert rep.ok and rep.warnings == () and not (tmp_path / "audit.head").exists()
    # a crash after the anchor is written and before the first entry commits
    with pytest.raises(KeyboardInterrupt), log.transaction():
        log.append_in("nvr-guard", "daemon.start", "daemon", {})
        raise KeyboardInterrupt
    assert read_head_file(tmp_path / "audit.head") == (0, GENESIS)
    assert log.verify().ok
    # a crash after the commit, before the head update: the genesis anchor still matches
    e = log.append("nvr-guard", "daemon.start", "daemon", {})
    (tmp_path / "audit.head").write_text(f"0 {GENESIS}\n")
    rep = log.verify()
    assert rep.ok and any("behind the log" in w for w in rep.warnings)
    log.append("nvr-guard", "daemon.stop", "daemon", {})
    assert read_head_file(tmp_path / "audit.head") == (2, log.head()[1]) and e.seq == 1


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda head: head.unlink(), "missing while the log holds"),
        (lambda head: head.write_text("garbage\n"), "unreadable"),
        (lambda head: head.write_text(f"2 {'0' * 64}\n"), "the log was rewritten"),
    ],
    ids=["deleted", "garbled", "other-hash"],
)
def test_audit_verify_fails_on_a_missing_or_inconsistent_head(
    site: Site, damage: object, words: str
) -> None:
    from nvr_guard.store.audit import AuditLog
    from nvr_guard.store.catalog import Catalog

    site.state.mkdir()
    cat = Catalog(site.state / "catalog.db")
    log = AuditLog(cat.conn)
    for i in range(3):
        log.append("root", "hold.add", f"hold:{i}", {})
    cat.close()
    assert site.run("audit", "verify").returncode == 0
    damage(site.state / "audit.head")  # type: ignore[operator]
    r = site.run("audit", "verify")
    assert r.returncode == 4, r.stdout + r.stderr
    assert words in r.stderr and "audit reanchor --accept-head 3" in r.stderr


def test_audit_verify_prints_its_warnings(site: Site) -> None:
    from nvr_guard.store.audit import AuditLog
    from nvr_guard.store.catalog import Catalog

    site.state.mkdir()
    cat = Catalog(site.state / "catalog.db")
    log = AuditLog(cat.conn)
    log.append("root", "hold.add", "hold:1", {})
    seq, h = log.head()
    log.append("root", "hold.add", "hold:2", {})
    cat.close()
    (site.state / "audit.head").write_text(f"{seq} {h}\n")  # as a crash leaves it
    r = site.run("--json", "audit", "verify")
    assert r.returncode == 0 and any(
        "behind the log" in w for w in json.loads(r.stdout)["warnings"]
    )
    r = site.run("audit", "verify")
    assert r.returncode == 0 and "warning: head file" in r.stderr


def _triggers(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    finally:
        conn.close()


def test_audit_verify_reports_dropped_triggers_and_leaves_them_dropped(site: Site) -> None:
    """Dropped append-only triggers are tamper evidence: `audit verify` opens the catalog
    read-only (it re-created them before, and said nothing), warns and exits 4; the daemon's
    engine re-creates them at its start and says so in the log."""
    from nvr_guard.config import load_config
    from nvr_guard.engine import Engine
    from nvr_guard.store.audit import AuditLog
    from nvr_guard.store.catalog import Catalog

    site.state.mkdir()
    db = site.state / "catalog.db"
    cat = Catalog(db)
    log = AuditLog(cat.conn)
    for i in range(3):
        log.append("root", "hold.add", f"hold:{i}", {})
    cat.close()
    assert site.run("audit", "verify").returncode == 0
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    r = site.run("--json", "audit", "verify")
    assert r.returncode == 4, r.stdout + r.stderr
    j = json.loads(r.stdout)
    assert j["ok"] is False and j["missing_triggers"] == ["audit_no_update", "audit_no_delete"]
    assert any("append-only triggers missing" in w for w in j["warnings"])
    r = site.run("audit", "verify")
    assert r.returncode == 4 and "triggers dropped (audit_no_update, audit_no_delete)" in r.stderr
    assert site.run("audit", "show").returncode == 0
    assert not {"audit_no_update", "audit_no_delete"} & _triggers(db)  # still gone
    assert db.read_bytes() == before  # nothing written by the checks
    # the daemon's engine puts them back, and records that it did
    engine = Engine(load_config(site.config))
    engine.catalog.close()
    assert {"audit_no_update", "audit_no_delete"} <= _triggers(db)
    entries = site.json("audit", "show")["entries"]
    restored = [e for e in entries if e["action"] == "audit.triggers_restored"]
    assert [e["details"]["triggers"] for e in restored] == [["audit_no_update", "audit_no_delete"]]
    assert site.run("audit", "verify").returncode == 0


def test_audit_show_shows_rows_root_edited_flagged_without_crashing(site: Site) -> None:
    from nvr_guard.store.audit import AuditLog
    from nvr_guard.store.catalog import Catalog

    site.state.mkdir()
    db = site.state / "catalog.db"
    cat = Catalog(db)
    log = AuditLog(cat.conn)
    for i in range(5):
        log.append("root", "hold.add", f"hold:{i}", {"i": i})
    cat.close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET time = 'abc' WHERE seq = 2")
    conn.execute("UPDATE audit SET time = 1e400 WHERE seq = 3")
    conn.execute("UPDATE audit SET actor = x'ff00' WHERE seq = 4")
    conn.execute("UPDATE audit SET details = '[1' WHERE seq = 5")
    conn.commit()
    conn.close()
    r = site.run("--json", "audit", "show")
    assert r.returncode == 4, r.stdout + r.stderr
    rows = {e["seq"]: e for e in json.loads(r.stdout)["entries"]}
    assert [rows[n]["malformed"] for n in range(1, 6)] == [
        [],
        ["time"],
        ["time"],
        ["actor"],
        ["details"],
    ]
    assert rows[2]["time"] == "'abc'" and rows[4]["actor"] == "0xff00"
    assert rows[1]["actor"] == "root" and rows[1]["time"].startswith("20")
    r = site.run("audit", "show")
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert "MALFORMED" in r.stdout and "entries 2, 3, 4, 5" in r.stderr
    assert site.run("audit", "verify").returncode == 4


def test_a_truncation_is_not_forgotten_after_the_next_append(
    site: Site, daemon: list[Daemon]
) -> None:
    from nvr_guard.config import load_config
    from nvr_guard.daemon.metrics import Exporter
    from nvr_guard.engine import Engine

    now = datetime.now(UTC).replace(microsecond=0)
    write_segment(site.root, "cam-1", now - timedelta(hours=2))
    daemon.append(Daemon(site))
    t0, t1 = (now - timedelta(hours=h) for h in (3, 1))

    def hold(reason: str) -> subprocess.CompletedProcess[str]:
        return site.run(
            "hold", "add", "--camera", "cam-1", "--from", t0.isoformat(), "--to", t1.isoformat(),
            "--reason", reason,
        )  # fmt: skip

    for i in range(4):
        assert hold(f"case {i}").returncode == 0
    head_before = (site.state / "audit.head").read_text()
    holds_before = len(site.json("hold", "list")["holds"])
    truncate(site.state / "catalog.db", 3)

    # the daemon refuses to append past the head it cannot match: the change is refused whole
    r = hold("after the truncation")
    assert r.returncode == 4 and "log truncated" in r.stderr, r.stderr
    assert len(site.json("hold", "list")["holds"]) == holds_before
    r = site.run(
        "request", "new", "--camera", "cam-1", "--from", t0.isoformat(), "--to", t1.isoformat(),
        "--reason", "theft", "--basis", "law", "--recipient", "PSB; Wang; 110",
    )  # fmt: skip
    assert r.returncode == 4, r.stderr  # the request and its holds roll back with the entry
    assert site.json("request", "list")["requests"] == []
    assert len(site.json("hold", "list")["holds"]) == holds_before
    assert (site.state / "audit.head").read_text() == head_before  # not adopted
    st = site.json("status")
    assert st["ok"] is False
    assert [a["kind"] for a in st["attention"]] == ["audit_head"]
    assert site.run("audit", "verify").returncode == 4
    # a reload the log could not record is refused; the daemon keeps running
    daemon[0].proc.send_signal(signal.SIGHUP)
    log_file = site.base / "daemon.log"
    poll(lambda: "reload refused (old config stays)" in log_file.read_text(), 30, "the refusal")
    assert daemon[0].ready()

    # the metric counts it (an engine on the same state, as the daemon's exporter does)
    engine = Engine(load_config(site.config))
    snap = Exporter(engine).collector.update()
    assert snap.attention.get("audit_head") == 1
    engine.catalog.close()

    # the admin investigates and re-anchors deliberately; the incident stays on record
    db_head = json.loads(site.run("--json", "audit", "verify").stdout)["head"]["seq"]
    r = site.run("audit", "reanchor", "--accept-head", str(db_head + 1), "--reason", "x")
    assert r.returncode == 2  # not the head that was looked at
    r = site.run("audit", "reanchor", "--accept-head", str(db_head), "--reason", "root removed 3")
    assert r.returncode == 0, r.stderr
    # the running daemon accepts appends again at once, and clears its attention entry
    assert hold("after the re-anchor").returncode == 0
    r = site.run("audit", "verify")
    assert r.returncode == 0, r.stderr
    assert "re-anchored at entry" in r.stdout and "root removed 3" in r.stdout
    entries = site.json("audit", "show")["entries"]
    re_entry = next(e for e in entries if e["action"] == "audit.reanchor")
    assert re_entry["details"]["previous_head_file"] == head_before.strip()
    # the reload refused during the incident still stands (the config it refused was never
    # applied) until the admin reloads again; then nothing needs attention any more
    kinds = [a["kind"] for a in site.json("status")["attention"]]
    assert kinds == ["reload_refused"], kinds
    assert site.run("reload").returncode == 0
    assert poll(lambda: site.json("status")["attention"] == [], 20, "attention to clear")
    daemon[0].stop()
    assert daemon[0].proc.returncode == 0


# ---- the signing key's path is the daemon's alone ----------------------------------------------
def with_key_path(site: Site, key: Path) -> int:
    """Configure export.signing_key; the config line it is on."""
    text = site.config.read_text() + f"export:\n  signing_key: {key}\n"
    site.config.write_text(text)
    return text.splitlines().index(f"  signing_key: {key}") + 1


def link_into_foreign_dir(d: Path, k: Path) -> None:
    """``d`` becomes a root-owned link to a root-owned 0700 directory inside one that uid 65534
    owns: that user can rename the key's directory away and put their own in its place."""
    foreign = d.parent / "foreign"
    foreign.mkdir()
    (foreign / "k").mkdir(mode=0o700)
    load_or_create_key(foreign / "k", foreign / "k" / k.name)
    os.chown(foreign, 65534, 65534)
    d.rmdir()
    d.symlink_to(foreign / "k")


def foreign_link(d: Path, k: Path) -> None:
    """``d`` becomes a link owned by uid 65534 to a private root-owned directory."""
    real = d.parent / "real-keys"
    real.mkdir(mode=0o700)
    load_or_create_key(real, real / k.name)
    d.rmdir()
    d.symlink_to(real)
    os.lchown(d, 65534, 65534)


@pytest.mark.parametrize(
    "arrange, words",
    [
        (lambda d, k: d.chmod(0o777), "writable by group or others (mode 0777)"),
        (lambda d, k: d.chmod(0o770), "writable by group or others (mode 0770)"),
        (lambda d, k: os.chown(d, 65534, 65534), "is owned by uid 65534"),
        (lambda d, k: os.chown(load_or_create_key(d, k) and k, 65534, 0), "not by the daemon user"),
        (lambda d, k: (load_or_create_key(d, d / "real.pem"), k.symlink_to(d / "real.pem")),
         "is a symbolic link"),
        (lambda d, k: load_or_create_key(d, k) and k.chmod(0o640), "it must be 0600"),
        (lambda d, k: d.rmdir(), "does not exist"),
        (lambda d, k: link_into_foreign_dir(d, k), "(the real path of"),
        (lambda d, k: foreign_link(d, k), "owned by uid 65534: its owner could point it"),
    ],
    ids=["dir-0777", "dir-group-writable", "dir-other-owner", "file-other-owner", "symlink",
         "file-0640", "no-dir", "link-into-foreign-dir", "foreign-link"],
)  # fmt: skip
def test_config_check_refuses_a_signing_key_others_could_replace(
    site: Site, arrange: object, words: str
) -> None:
    keys = site.base / "keys"
    keys.mkdir(mode=0o700)
    key = keys / "signing.pem"
    line = with_key_path(site, key)
    assert site.run("config", "check").returncode == 0  # a private directory: fine
    arrange(keys, key)  # type: ignore[operator]
    r = site.run("config", "check")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{site.config}:{line}: export.signing_key: " in r.stderr and words in r.stderr
    # the daemon refuses to start on it as well
    d = subprocess.run(
        [sys.executable, "-m", "nvr_guard", "--config", str(site.config), "daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert d.returncode == 2 and words in d.stderr


def test_a_private_signing_key_path_is_accepted_and_used(site: Site, daemon: list[Daemon]) -> None:
    keys = site.base / "keys"
    keys.mkdir(mode=0o700)
    _, fp = load_or_create_key(keys, keys / "signing.pem")
    with_key_path(site, keys / "signing.pem")
    assert site.run("config", "check").returncode == 0
    daemon.append(Daemon(site))
    assert site.json("key", "show")["fingerprint"] == fp


@pytest.mark.parametrize("change", ["key-replaced", "dir-opened-up"])
def test_the_key_is_checked_again_at_every_export(site: Site, change: str) -> None:
    """A key swapped, or its directory opened to others, after the daemon put its fingerprint
    on record: the next export is refused (exit 3) with the signing_key attention, and nothing
    is signed with the other key."""
    from nvr_guard.config import load_config
    from nvr_guard.engine import Engine
    from nvr_guard.errors import PolicyRefused

    keys = site.base / "keys"
    keys.mkdir(mode=0o700)
    key = keys / "signing.pem"
    _, fp = load_or_create_key(keys, key)
    with_key_path(site, key)
    assert site.run("config", "check").returncode == 0
    engine = Engine(load_config(site.config))
    try:
        assert engine.ensure_signing_key() == fp
        assert engine.workflow.signing_key()[1] == fp  # as started: fine
        if change == "key-replaced":
            key.unlink()
            _, other = load_or_create_key(keys, key)
            assert other != fp
        else:
            keys.chmod(0o777)
        with pytest.raises(PolicyRefused) as e:
            engine.workflow.signing_key()
        assert e.value.exit_code == 3
        assert [a.kind for a in engine.attention.entries()] == ["signing_key"]
        assert engine.key_fingerprint == fp  # what status and key show say is unchanged
    finally:
        engine.catalog.close()


# ---- concurrent callers lose no audit entry --------------------------------------------------
FLOOD_USER, FLOOD_GROUP = "nvrg-cx-flood", "nvrg-cx"
FLOOD_SCRIPT = """
import json, sys
from nvr_guard.wire import call
from nvr_guard.errors import PolicyRefused
refused, other = 0, []
for _ in range(int(sys.argv[2])):
    try:
        call(sys.argv[1], "request.list", {}, timeout=60)
        other.append("answered")
    except PolicyRefused:
        refused += 1
    except Exception as e:
        other.append(f"{type(e).__name__}: {e}")
print(json.dumps({"refused": refused, "other": other}))
"""


@pytest.fixture
def flood_user() -> Iterator[int]:
    import grp
    import pwd

    made_group = made_user = False
    try:
        grp.getgrnam(FLOOD_GROUP)
    except KeyError:
        subprocess.run(["groupadd", FLOOD_GROUP], check=True)
        made_group = True
    try:
        pwd.getpwnam(FLOOD_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "-M", "-N", "-g", FLOOD_GROUP, "-s", "/usr/sbin/nologin", FLOOD_USER],
            check=True,
        )
        made_user = True
    yield pwd.getpwnam(FLOOD_USER).pw_uid
    if made_user:
        subprocess.run(["userdel", FLOOD_USER], check=False)
    if made_group:
        subprocess.run(["groupdel", FLOOD_GROUP], check=False)


def test_concurrent_callers_lose_no_audit_entry(
    site: Site, daemon: list[Daemon], flood_user: int
) -> None:
    """A user the config does not know floods refused calls while root files requests: every
    committed request (and its holds) has its request.new entry, every refusal its
    access.denied entry, and no legitimate call fails."""
    import grp
    import tempfile
    import threading

    from nvr_guard.wire import call

    for p in [site.base, *site.base.parents]:  # the flooder must reach the socket
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    site.config.write_text(
        site.config.read_text().replace("socket_group: root", f"socket_group: {FLOOD_GROUP}")
    )
    now = datetime.now(UTC).replace(microsecond=0)
    for i in range(3):
        write_segment(site.root, f"cam-{i}", now - timedelta(hours=2))
    daemon.append(Daemon(site))
    t0, t1 = ((now - timedelta(hours=h)).isoformat() for h in (3, 1))

    floods = [
        subprocess.Popen(
            [sys.executable, "-c", FLOOD_SCRIPT, str(site.socket), "250"],
            stdout=subprocess.PIPE,
            text=True,
            user=flood_user,
            group=grp.getgrnam(FLOOD_GROUP).gr_gid,
        )
        for _ in range(2)
    ]
    filed: list[int] = []
    failures: list[str] = []

    def file_requests(cam: str) -> None:
        for n in range(12):
            try:
                r = call(site.socket, "request.new", {
                    "cameras": cam, "from": t0, "to": t1, "reason": f"case {cam}/{n}",
                    "basis": "law", "recipient": {"unit": "PSB", "person": "W", "contact": "1"},
                    "format": "mp4", "emergency": False,
                }, timeout=60)  # fmt: skip
                filed.append(int(r["id"]))
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=file_requests, args=(f"cam-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    results = [json.loads(f.communicate(timeout=300)[0]) for f in floods]

    assert failures == [], failures  # no "internal error" for legitimate callers
    assert [r["other"] for r in results] == [[], []]
    refusals = sum(r["refused"] for r in results)
    assert refusals == 500

    entries = site.json("audit", "show")["entries"]
    new_entries = sorted(
        int(e["object"].split(":")[1]) for e in entries if e["action"] == "request.new"
    )
    listed = sorted(r["id"] for r in site.json("request", "list")["requests"])
    assert sorted(filed) == listed == new_entries  # every committed request has its entry
    conn = sqlite3.connect(f"file:{site.state / 'catalog.db'}?mode=ro", uri=True)
    held = {r[0] for r in conn.execute("SELECT request_id FROM holds WHERE kind = 'request'")}
    conn.close()
    assert held == set(new_entries)  # no hold of a request whose filing is not on record
    # every refusal is on record: the first 20 of the minute singly, the rest as a count that
    # the daemon writes when the minute ends or, at the latest, when it stops
    daemon[0].stop()
    entries = site.json("audit", "show")["entries"]
    denied = [e for e in entries if e["action"] == "access.denied" and e["actor"] == FLOOD_USER]
    suppressed = sum(
        e["details"]["suppressed"]
        for e in entries
        if e["action"] == "control.refusals_suppressed" and e["actor"] == FLOOD_USER
    )
    assert len(denied) + suppressed == refusals, (len(denied), suppressed)
    assert len(denied) <= 2 * 20  # rate-limited: the flood did not flood the log
    assert site.run("audit", "verify").returncode == 0


def test_status_reports_an_old_entry_rewritten_within_the_full_verification_interval(
    site: Site,
) -> None:
    # status verifies the entries appended since its last call, and walks the whole chain
    # when the last walk is AUDIT_FULL_EVERY old: an old entry rewritten behind the daemon's
    # back (triggers dropped and put back) is reported by then
    from nvr_guard.config import load_config
    from nvr_guard.engine import AUDIT_FULL_EVERY, Engine
    from nvr_guard.model import ClockReading

    t = [datetime.now(UTC).timestamp()]
    engine = Engine(load_config(site.config), clock=lambda: ClockReading(t[0], 1000.0, "boot"))
    try:
        for i in range(4):
            engine.audit.append("root", "hold.add", f"hold:{i}", {"i": i})
        st = engine.status()
        assert st["ok"] is True and st["audit"]["ok"] is True
        walked = st["audit"]["verified_full"]
        assert walked is not None and st["audit"]["full_every"] == AUDIT_FULL_EVERY
        conn = sqlite3.connect(site.state / "catalog.db")
        trigger = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'audit_no_update'"
        ).fetchone()[0]
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("""UPDATE audit SET details = '{"i":99}' WHERE seq = 2""")
        conn.execute(trigger)
        conn.commit()
        conn.close()
        start = t[0]
        seen = None
        while t[0] - start <= AUDIT_FULL_EVERY:  # the deadline: one interval of its clock
            engine.audit.append("root", "hold.add", "hold:next", {})
            st = engine.status()
            if not st["audit"]["ok"]:
                seen = t[0] - start
                break
            assert st["audit"]["verified_full"] == walked  # no walk before it is due
            t[0] += 30.0
        assert seen is not None, "status never reported the rewritten entry"
        assert st["ok"] is False
        assert st["audit"]["problem"] == "entry 2 was altered (content does not match its hash)"
        assert st["audit"]["verified_full"] != walked
        assert site.run("audit", "verify").returncode == 4  # audit verify: always the walk
    finally:
        engine.catalog.close()
