"""Protected exports end to end, as deployed people use them: real Unix users file, approve (with
--mask) and export through the real daemon; the passphrase is shown once and stored nowhere; the
recipient's envelope opens with openssl and the unit's key; the policy refuses what it must."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import run_cli
from tests.fixtures.pki import make_unit
from tests.fixtures.site import poll
from tests.integration.test_workflow import (
    Env,
    env,
    hours_around_now,
    new_request,
    unix_users,
    write_config,
)

__all__ = ["env", "unix_users"]

pytestmark = pytest.mark.integration

UNIT = "City police, unit 2"  # the unit new_request's --recipient names


def configure(e: Env, export: str = "", cameras: str = "", site: str = "") -> None:
    """The workflow test's config with protection keys added, reloaded into the daemon."""
    old = e.ok("nvrg-alice", "status")["config_digest"]
    write_config(e.site, e.target, hours_around_now(inside=True), e.db)
    text = e.site.config.read_text()
    text = text.replace("  preset: ultrafast\n", f"  preset: ultrafast\n{export}")
    text = text.replace(
        '  lobby-1: {level: 1, name: "营业厅"}\n',
        cameras or '  lobby-1: {level: 1, name: "营业厅"}\n',
    )
    text = text.replace('    layout: "', f'{site}    layout: "', 1)
    e.site.config.write_text(text)
    check = run_cli(["--config", str(e.site.config), "config", "check"])
    assert check.returncode == 0, check.stdout + check.stderr
    assert e.proc is not None
    e.proc.send_signal(signal.SIGHUP)
    poll(lambda: e.ok("nvrg-alice", "status")["config_digest"] != old, 20, "the reload")


def approve_and_scan(e: Env, rid: int, mask: str | None = None) -> None:
    e.ok("nvrg-bob", "request", "approve", str(rid), *(["--mask", mask] if mask else []))
    e.ok("nvrg-carol", "request", "approve", str(rid))
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]


def start_export(e: Env, rid: int) -> subprocess.Popen[bytes]:
    """``export run`` as the technician, in the background."""
    import sys

    from tests.integration.test_workflow import GROUP

    return subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(e.site.config), "export", "run",
         str(rid), "--media", str(e.target)],
        user=e.uids["nvrg-tom"], group=GROUP, extra_groups=[GROUP],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def frozen_ffmpeg(e: Env) -> Any:
    """Wait for the daemon's ffmpeg of the export and freeze it (SIGSTOP) the moment it runs:
    the export is then in the middle of its encode. Returns the process (psutil)."""
    import psutil

    assert e.proc is not None
    daemon = psutil.Process(e.proc.pid)
    found: list[psutil.Process] = []

    def frozen() -> bool:
        for p in daemon.children(recursive=True):
            try:
                if p.name() == "ffmpeg":
                    p.suspend()
                    found.append(p)
                    return True
            except psutil.NoSuchProcess:
                continue
        return False

    poll(frozen, 60, "ffmpeg of the export")
    return found[0]


def test_a_passphrase_export_with_privacy_zones_as_people_run_it(env: Env, tmp_path: Path):
    e = env
    configure(
        e,
        export="  native_with_zones: refuse\n",
        cameras='  lobby-1: {level: 1, name: "营业厅", privacy_zones: [[0.6, 0.4, 0.3, 0.25]]}\n',
        site="    export: {encrypt: passphrase}\n",
    )
    # the site encrypts: a request is filed encrypted, and may not ask for less
    rid = new_request(e)
    show = e.ok("nvrg-alice", "request", "show", str(rid))
    assert show["encrypt"] == "passphrase"
    assert show["privacy_zones"] == {
        "lobby-1": [{"rect": [0.6, 0.4, 0.3, 0.25], "source": "camera"}]
    }
    assert "export.encrypt" in e.refused("nvrg-alice", "request", "new", "--camera", "lobby-1",
        "--from", show["from"], "--to", show["to"], "--reason", "r", "--basis", "b",
        "--recipient", f"{UNIT}; Wang; 010", "--encrypt", "none")  # fmt: skip
    # a native copy of a camera with zones is refused by this policy
    assert "cannot be masked" in e.refused("nvrg-alice", "request", "new", "--camera", "lobby-1",
        "--from", show["from"], "--to", show["to"], "--reason", "r", "--basis", "b",
        "--recipient", f"{UNIT}; Wang; 010", "--format", "native")  # fmt: skip

    # a mask past the frame is bad input: nothing recorded
    err = e.refused("nvrg-bob", "request", "approve", str(rid), "--mask", "0.5,0.5,0.6,0.1", code=2)
    assert "reaches past the frame" in err
    assert e.ok("nvrg-alice", "request", "show", str(rid))["approvals"] == []
    approve_and_scan(e, rid, mask="0.05,0.45,0.2,0.2")
    show = e.ok("nvrg-alice", "request", "show", str(rid))
    assert show["approvals"][0]["mask"] == "0.05,0.45,0.2,0.2"
    assert [z["source"] for z in show["privacy_zones"]["lobby-1"]] == [
        "camera",
        "approval by nvrg-bob",
    ]

    slips = tmp_path / "slips"
    slips.mkdir(mode=0o777)
    os.chmod(slips, 0o777)
    slip = slips / "slip.html"
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target), "--slip", str(slip))
    phrase = res["passphrase"]
    assert res["encrypt"] == "passphrase" and len(phrase) == 24
    pkg, archive = Path(res["package"]), Path(res["archive"])
    assert archive.parent == pkg and sorted(p.name for p in pkg.iterdir()) == sorted(
        [archive.name, "README.txt"]
    )
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == res["archive_sha256"]
    assert phrase in slip.read_text() and res["archive_sha256"] in slip.read_text()

    # stored nowhere: not in the state directory (catalog, audit, WAL), not in the daemon's log
    for f in files_under(e.site.state) + [e.site.base / "daemon.log"]:
        assert phrase.encode() not in f.read_bytes(), f
    done = [
        x for x in e.audit() if x["action"] == "export.done" and x["object"] == f"request:{rid}"
    ]
    assert done[0]["details"]["sealed"]["sha256"] == res["archive_sha256"]
    assert done[0]["details"]["sealed"]["passphrase"] == "shown once to the technician, not stored"
    assert len(done[0]["details"]["privacy_zones"]["lobby-1"]) == 2
    assert os.listdir(e.site.state / "staging") == []

    # the recipient's side: 7z with the passphrase, then the package verifies as ever
    out = tmp_path / "opened"
    got = subprocess.run(["7z", "x", f"-p{phrase}", f"-o{out}", str(archive)], capture_output=True)
    assert got.returncode == 0
    inner = next(out.iterdir())
    v = run_cli(["verify", str(inner)])
    assert v.returncode == 0, v.stdout + v.stderr
    manifest = json.loads((inner / "manifest.json").read_text())
    assert len(manifest["privacy_zones"]["lobby-1"]) == 2
    assert manifest["request"]["encrypt"] == "passphrase"

    # the paper record names the sealed file and its hash, and has the slip page to fill in
    form = e.ok("nvrg-carol", "export", "form", str(rid), "-o", str(slips / "form.html"))
    html = Path(form["form"]).read_text()
    assert res["archive_sha256"] in html and "Passphrase slip" in html and phrase not in html
    shown = e.ok("nvrg-alice", "request", "show", str(rid))
    assert shown["sealed"]["sha256"] == res["archive_sha256"] and shown["destroyed"] is None

    # the medium is scanned again before the next export: the archive this recorder sealed is
    # encrypted by design and accepted; an encrypted archive from elsewhere is not
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"
    foreign = e.target / "brought-in.7z"
    foreign.write_bytes(archive.read_bytes() + b"\0")
    r = e.nvr("nvrg-tom", "--json", "media", "scan", str(e.target))
    assert r.returncode != 0 and json.loads(r.stdout)["result"] == "error"
    assert "brought-in.7z: encrypted" in r.stdout
    foreign.unlink()


def test_a_recipient_export_opens_with_the_units_key_and_an_expired_certificate_refuses(
    env: Env, tmp_path: Path
):
    e = env
    unit = make_unit(tmp_path / "pki", "police", kind="rsa")
    for p in (tmp_path, tmp_path / "pki"):
        os.chmod(p, 0o755)
    configure(e, export=f'  recipients: {{"{UNIT}": {unit.cert}}}\n')
    rid = new_request(e, extra=("--encrypt", "recipient"))
    assert e.ok("nvrg-alice", "request", "show", str(rid))["encrypt"] == "recipient"
    # a unit without a certificate cannot be encrypted to
    show = e.ok("nvrg-alice", "request", "show", str(rid))
    err = e.refused("nvrg-alice", "request", "new", "--camera", "lobby-1", "--from", show["from"],
        "--to", show["to"], "--reason", "r", "--basis", "b", "--recipient", "Other unit; X; 1",
        "--encrypt", "recipient", code=2)  # fmt: skip
    assert "has no certificate in export.recipients" in err
    approve_and_scan(e, rid)
    res = e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    assert "passphrase" not in res and res["encrypt"] == "recipient"
    sealed = Path(res["archive"])
    assert sealed.suffix == ".p7m"
    assert res["sealed"]["recipient"]["unit"] == UNIT
    tar = tmp_path / "pkg.tar"
    dec = subprocess.run(
        ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(sealed),
         "-inkey", str(unit.key), "-recip", str(unit.cert), "-out", str(tar)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert dec.returncode == 0, dec.stderr
    out = tmp_path / "opened"
    out.mkdir()
    subprocess.run(["tar", "xf", str(tar), "-C", str(out)], check=True)
    v = run_cli(["verify", str(next(out.iterdir()))])
    assert v.returncode == 0, v.stdout + v.stderr

    # the unit's certificate has expired by the time of the next export: refused, audited
    old = make_unit(tmp_path / "old", "police-old", days=(-400, -1))
    os.chmod(tmp_path / "old", 0o755)
    configure(e, export=f'  recipients: {{"{UNIT}": {old.cert}}}\n')
    rid2 = new_request(e, extra=("--encrypt", "recipient"))
    approve_and_scan(e, rid2)
    err = e.refused("nvrg-tom", "export", "run", str(rid2), "--media", str(e.target))
    assert "expired on" in err
    denied = [
        x for x in e.audit() if x["action"] == "access.denied" and x["object"] == f"request:{rid2}"
    ]
    assert denied and "expired on" in denied[-1]["details"]["reason"]
    assert [p.name for p in e.target.iterdir()] == [Path(res["package"]).name]


def test_a_killed_protected_export_leaves_no_plaintext_after_the_restart(env: Env):
    import sys

    e = env
    configure(e, export="  encrypt: passphrase\n")
    rid = new_request(e)
    approve_and_scan(e, rid)
    assert e.proc is not None
    export = start_export(e, rid)
    staging = e.site.state / "staging"
    try:
        ffmpeg = frozen_ffmpeg(e)  # the plaintext clip is being written in staging
        assert any(staging.rglob("*")), "the package is being built in staging"
        e.proc.kill()  # kill -9 of the daemon mid-export
        e.proc.wait()
        ffmpeg.kill()  # what systemd's KillMode=control-group does to the unit's children
    finally:
        export.wait(timeout=60)
    assert export.returncode != 0
    assert any(staging.iterdir())  # left behind by the kill
    e.proc = subprocess.Popen(
        [sys.executable, "-m", "nvr_guard", "--config", str(e.site.config), "daemon"],
        stdout=open(e.site.base / "daemon2.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    poll(lambda: e.nvr("nvrg-alice", "--json", "request", "list").returncode == 0, 60, "restart")
    assert list(staging.iterdir()) == []
    assert [p.name for p in e.target.iterdir()] == []  # no package, no hidden temporary
    removed = [x for x in e.audit() if x["action"] == "export.stale_removed"]
    assert any(x["object"] == "staging" for x in removed)


def test_a_staging_directory_others_could_enter_refuses_the_export_and_releases_it(env: Env):
    e = env
    configure(e, export="  encrypt: passphrase\n")
    rid = new_request(e)
    approve_and_scan(e, rid)
    staging = e.site.state / "staging"
    staging.mkdir(mode=0o755, exist_ok=True)
    os.chmod(staging, 0o755)
    r = e.nvr("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    assert r.returncode == 1 and "mode 0700" in r.stderr and "Traceback" not in r.stderr
    assert list(e.target.iterdir()) == []
    failed = [x for x in e.audit() if x["action"] == "export.failed"]
    assert failed and "mode 0700" in failed[-1]["details"]["error"]
    os.chmod(staging, 0o700)  # fixed: the request is not stuck behind a claim
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"
    assert e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))["passphrase"]


def test_a_passphrase_export_whose_command_is_interrupted_is_not_committed(env: Env):
    e = env
    configure(e, export="  encrypt: passphrase\n")
    rid = new_request(e)
    approve_and_scan(e, rid)
    cli = start_export(e, rid)
    ffmpeg = frozen_ffmpeg(e)
    cli.send_signal(signal.SIGINT)  # the technician presses Ctrl-C
    cli.wait(timeout=30)
    ffmpeg.resume()

    def aborted() -> list[dict]:
        return [
            x
            for x in e.audit()
            if x["action"] == "export.aborted" and x["object"] == f"request:{rid}"
        ]

    poll(lambda: bool(aborted()), 60, "the export to stop")
    assert "passphrase could be shown" in aborted()[0]["details"]["reason"]
    assert e.ok("nvrg-alice", "request", "show", str(rid))["state"] == "approved"
    assert list(e.target.iterdir()) == [] and list((e.site.state / "staging").iterdir()) == []
    # nothing is stuck: run it again, and this time the passphrase is shown
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"
    assert e.ok("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))["passphrase"]
