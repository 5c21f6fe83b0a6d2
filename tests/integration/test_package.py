"""The signed package: openssl verifies it as VERIFY.txt says, verify_package names each kind of
tampering, the signing key is private and reused, the approval record escapes user text."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nvr_guard.errors import RuntimeFailure
from nvr_guard.export import (
    DirectoryDestination,
    ExportJob,
    SourceSegment,
    approval_record_html,
    fingerprint,
    load_or_create_key,
    public_pem,
    run_export,
    verify_package,
)

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
T0 = 1763600000.0


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real package (two 4-second segments, a 5-second export), made once."""
    base = tmp_path_factory.mktemp("pkg")
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine",
            "-t",
            "8",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-c:a",
            "aac",
            "-f",
            "segment",
            "-segment_time",
            "4",
            "-reset_timestamps",
            "1",
            str(base / "seg%02d.mp4"),
        ],
        check=True,
    )
    segments = [SourceSegment(base / f"seg0{i}.mp4", T0 + 4 * i) for i in range(2)]
    key, _ = load_or_create_key(base / "state")
    (base / "usb").mkdir()
    job = ExportJob(
        request={
            "id": 5,
            "requester": "alice",
            "site": "bank",
            "cameras": ["lobby-1"],
            "from": "a",
            "to": "b",
            "reason": "<script>alert(1)</script> & 抢劫",
            "basis": "law",
            "recipient": {"unit": "PSB", "person": "Wang", "contact": "1"},
            "format": "mp4",
            "emergency": False,
        },
        approvals=[
            {
                "approver": "bob",
                "role": "manager",
                "decision": "approve",
                "note": "<b>ok</b>",
                "time": "2025-11-20T09:00:00+08:00",
            }
        ],
        technician="tom",
        start=T0 + 1.5,
        end=T0 + 6.5,
        tz=ZoneInfo("Asia/Shanghai"),
        watermark_template="NVRG {request} {camera} {requester}",
        font=FONT,
        preset="ultrafast",
    )
    pkg = run_export(
        [("lobby-1", segments)],
        job,
        DirectoryDestination(base / "usb"),
        key,
        audit_head=(12, "f" * 64),
    )
    return pkg.path


@pytest.fixture
def copy(package: Path, tmp_path: Path) -> Path:
    dst = tmp_path / package.name
    shutil.copytree(package, dst)
    return dst


def clip_of(pkg: Path) -> Path:
    return next(pkg.glob("*.mp4"))


def test_package_layout(package: Path) -> None:
    names = sorted(os.listdir(package))
    assert names == sorted(
        [
            "VERIFY.txt",
            "approval-record.html",
            "manifest.json",
            "manifest.sig",
            "signer.pub",
            "lobby-1_20251120T085321+0800_20251120T085326+0800.mp4",
        ]
    )
    m = json.loads((package / "manifest.json").read_bytes())
    for field in (
        "request",
        "approvals",
        "cameras",
        "time_range",
        "gaps",
        "clips",
        "files",
        "ffmpeg_version",
        "destination",
        "audit_head",
        "signer",
        "nvr_guard",
    ):
        assert field in m, field
    clip = m["clips"][0]
    assert [len(s["sha256"]) for s in clip["sources"]] == [64, 64]
    assert clip["sha256"] == m["files"][clip["file"]]["sha256"]
    assert clip["ffmpeg"]["argv"][0] == "ffmpeg"
    assert m["audit_head"] == {"seq": 12, "hash": "f" * 64}
    assert not list(package.parent.glob(".NVRG-*"))  # the temporary name is gone


def _verify_commands(pkg: Path) -> list[str]:
    text = (pkg / "VERIFY.txt").read_text().replace("\\\n", "")  # join continued lines
    return [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip().startswith(("openssl pkeyutl", 'echo "SHA256', "for f in", "sed -n"))
    ]


@pytest.mark.integration
def test_openssl_commands_from_verify_txt(package: Path) -> None:
    cmds = _verify_commands(package)
    assert len(cmds) == 4
    assert cmds[0] == (
        "openssl pkeyutl -verify -pubin -inkey signer.pub -rawin "
        "-in manifest.json -sigfile manifest.sig"
    )
    ok = subprocess.run(shlex.split(cmds[0]), cwd=package, capture_output=True, text=True)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout
    fp = subprocess.run(cmds[1], shell=True, cwd=package, capture_output=True, text=True)
    manifest = json.loads((package / "manifest.json").read_bytes())
    assert fp.stdout.strip() == manifest["signer"]["fingerprint"]
    sums = subprocess.run(cmds[2], shell=True, cwd=package, capture_output=True, text=True)
    lines = sums.stdout.splitlines()
    assert sorted(lines) == sorted(f"{n}: OK" for n in manifest["files"]), sums
    listed = subprocess.run(cmds[3], shell=True, cwd=package, capture_output=True, text=True)
    names = [ln.strip().removesuffix(": {").strip('"') for ln in listed.stdout.splitlines()]
    assert sorted(names) == sorted(manifest["files"])


@pytest.mark.integration
def test_openssl_procedure_rejects_a_swapped_clip_with_an_edited_verify_txt(copy: Path) -> None:
    """The clip swapped and its hash replaced in the (unsigned) VERIFY.txt: steps a and b still
    pass, and step c, which checks against the signed manifest.json, names the clip."""
    clip = clip_of(copy)
    old = hashlib.sha256(clip.read_bytes()).hexdigest()
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    clip.write_bytes(bytes(data))
    new = hashlib.sha256(bytes(data)).hexdigest()
    text = (copy / "VERIFY.txt").read_text()
    assert old in text
    (copy / "VERIFY.txt").write_text(text.replace(old, new))
    cmds = _verify_commands(copy)
    sig = subprocess.run(shlex.split(cmds[0]), cwd=copy, capture_output=True, text=True)
    assert sig.returncode == 0 and "Signature Verified Successfully" in sig.stdout
    sums = subprocess.run(cmds[2], shell=True, cwd=copy, capture_output=True, text=True)
    assert f"{clip.name}: FAILED" in sums.stdout.splitlines(), sums.stdout
    assert "approval-record.html: OK" in sums.stdout.splitlines()
    # the check the old VERIFY.txt documented (its own hash lines) would have passed
    old_way = subprocess.run(
        "grep -E '^[0-9a-f]{64}  ' VERIFY.txt | sha256sum -c",
        shell=True,
        cwd=copy,
        capture_output=True,
        text=True,
    )
    assert old_way.returncode == 0


@pytest.mark.integration
def test_openssl_rejects_an_edited_manifest(copy: Path) -> None:
    body = (copy / "manifest.json").read_bytes()
    (copy / "manifest.json").write_bytes(body.replace(b'"tom"', b'"mallory"', 1))
    cmd = _verify_commands(copy)[0]
    bad = subprocess.run(shlex.split(cmd), cwd=copy, capture_output=True, text=True)
    assert bad.returncode != 0 and "Signature Verification Failure" in bad.stdout


def _flip_clip_byte(pkg: Path) -> None:
    clip = clip_of(pkg)
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    clip.write_bytes(bytes(data))


def _edit_manifest(pkg: Path) -> None:
    p = pkg / "manifest.json"
    p.write_bytes(p.read_bytes().replace(b'"technician": "tom"', b'"technician": "eve"'))


def _swap_key_and_resign(pkg: Path) -> None:
    """Someone re-signs an edited manifest with their own key and ships their public key."""
    other = Ed25519PrivateKey.generate()
    _edit_manifest(pkg)
    (pkg / "manifest.sig").write_bytes(other.sign((pkg / "manifest.json").read_bytes()))
    (pkg / "signer.pub").write_bytes(public_pem(other.public_key()))


def _swap_key_only(pkg: Path) -> None:
    (pkg / "signer.pub").write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))


def _forge_signature(pkg: Path) -> None:
    (pkg / "manifest.sig").write_bytes(Ed25519PrivateKey.generate().sign(b"x"))


def _delete_clip(pkg: Path) -> None:
    clip_of(pkg).unlink()


def _add_file(pkg: Path) -> None:
    (pkg / "notes.txt").write_text("added later")


def _edit_record(pkg: Path) -> None:
    p = pkg / "approval-record.html"
    p.write_text(p.read_text().replace("bob", "eve"))


@pytest.mark.parametrize(
    "tamper, kinds, words",
    [
        (_flip_clip_byte, ["clip-changed"], "clip changed: lobby-1_"),
        (_edit_manifest, ["manifest-changed"], "manifest changed: manifest.sig does not match"),
        (_swap_key_and_resign, ["key-mismatch"], "key mismatch: signer.pub is SHA256:"),
        (_swap_key_only, ["key-mismatch"], "the public key was replaced"),
        (_forge_signature, ["manifest-changed"], "manifest changed"),
        (_delete_clip, ["missing-file"], "missing file: lobby-1_"),
        (_add_file, ["extra-file"], "extra file: notes.txt"),
        (_edit_record, ["file-changed"], "file changed: approval-record.html"),
    ],
)
def test_verify_names_what_is_wrong(
    copy: Path, tamper: Callable[[Path], None], kinds: list[str], words: str
) -> None:
    assert verify_package(copy).ok
    tamper(copy)
    result = verify_package(copy)
    assert not result.ok
    assert [p.kind for p in result.problems] == kinds
    assert words in result.problems[0].message


def test_verify_against_the_audited_fingerprint(copy: Path, package: Path) -> None:
    """A package re-signed wholesale (new key, manifest naming it) is consistent in itself; the
    fingerprint from the audit log is what catches it."""
    real = json.loads((package / "manifest.json").read_bytes())["signer"]["fingerprint"]
    other = Ed25519PrivateKey.generate()
    m = json.loads((copy / "manifest.json").read_bytes())
    m["signer"]["fingerprint"] = fingerprint(other.public_key())
    body = json.dumps(m).encode()
    (copy / "manifest.json").write_bytes(body)
    (copy / "manifest.sig").write_bytes(other.sign(body))
    (copy / "signer.pub").write_bytes(public_pem(other.public_key()))
    assert verify_package(copy).ok  # self-consistent …
    result = verify_package(copy, expected_fingerprint=real)
    assert [p.kind for p in result.problems] == ["key-mismatch"]
    assert real in result.problems[0].message


@pytest.mark.parametrize(
    "damage, kind",
    [
        (lambda p: (p / "manifest.json").write_bytes(b"{not json"), "manifest-changed"),
        (lambda p: (p / "signer.pub").write_bytes(b"junk"), "key-mismatch"),
        (lambda p: (p / "manifest.sig").unlink(), "missing-file"),
    ],
)
def test_verify_never_raises_on_damaged_packages(
    copy: Path, damage: Callable[[Path], Any], kind: str
) -> None:
    damage(copy)
    result = verify_package(copy)
    assert kind in [p.kind for p in result.problems]


def test_verify_of_a_missing_directory(tmp_path: Path) -> None:
    result = verify_package(tmp_path / "nope")
    assert not result.ok and "is not a directory" in result.messages()[0]


def test_key_is_0600_created_once_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key1, fp1 = load_or_create_key(state)
    path = state / "export-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key2, fp2 = load_or_create_key(state)
    assert fp1 == fp2 and re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fp1)
    assert key2.sign(b"m") == key1.sign(b"m")  # Ed25519 is deterministic: same key
    assert os.listdir(state) == ["export-key.pem"]


def test_key_path_override_and_loose_mode_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    _, fp = load_or_create_key(tmp_path, key_path=path)
    assert path.exists() and load_or_create_key(tmp_path, key_path=path)[1] == fp
    path.chmod(0o640)
    with pytest.raises(RuntimeFailure, match="must be 0600"):
        load_or_create_key(tmp_path, key_path=path)


def test_approval_record_escapes_user_text(package: Path) -> None:
    page = (package / "approval-record.html").read_text()
    assert "<script>" not in page and "<b>ok</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; 抢劫" in page
    assert "调阅监控录像审批表" in page and "Approval Record" in page
    manifest = json.loads((package / "manifest.json").read_bytes())
    assert manifest["clips"][0]["sha256"] in page  # hashes printed for the paper record


def test_blank_form_before_export() -> None:
    page = approval_record_html(
        {"id": 3, "requester": 'a"lice', "recipient": {"unit": "<u>"}, "format": "native"},
        [],
        None,
    )
    assert "&lt;u&gt;" in page and "a&quot;lice" in page
    assert "导出技术人员<br>Technician" in page and "native evidence copy" in page
