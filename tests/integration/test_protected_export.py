"""Protected exports round-trip with the standard tools: a passphrase 7z archive opened with `7z`,
a CMS envelope opened with `openssl cms -decrypt` and the unit's key; the package inside verifies.
Wrong passphrases and keys, and truncated files, fail with the tools' own errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.errors import InvalidInput, RuntimeFailure
from nvr_guard.export import run_export, verify_package
from nvr_guard.export.keys import load_recipient_cert
from nvr_guard.export.protect import (
    PASSPHRASE_ALPHABET,
    README,
    Seal,
    new_passphrase,
    remove_stale_staging,
    run_sealed_export,
    staging_dir,
)
from tests.fixtures.pki import make_unit
from tests.integration.test_export import T0, dest_dir, footage, job, key, segs

__all__ = ["footage", "key"]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def export_sealed(footage: dict[str, list[Path]], tmp_path: Path, key: Any, seal: Seal) -> Any:
    state = tmp_path / "nvrg-state"
    state.mkdir(exist_ok=True)
    pkg = run_sealed_export(
        [("lobby-1", segs(footage["audio"]))],
        job(T0 + 2, T0 + 12, request={"encrypt": seal.mode}),
        dest_dir(tmp_path),
        key,
        seal=seal,
        staging=staging_dir(state),
        audit_head=(7, "h" * 64),
    )
    assert os.listdir(state / "staging") == []  # no plaintext left on the recorder
    return pkg


def test_a_passphrase_is_100_bits_in_groups_that_can_be_read_aloud() -> None:
    seen = {new_passphrase() for _ in range(200)}
    assert len(seen) == 200
    for p in seen:
        groups = p.split("-")
        assert [len(g) for g in groups] == [4] * 5
        assert set("".join(groups)) <= set(PASSPHRASE_ALPHABET)
    assert len(PASSPHRASE_ALPHABET) ** 20 >= 2**100


def test_a_passphrase_archive_opens_with_7z_and_the_package_inside_verifies(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    phrase = new_passphrase()
    pkg = export_sealed(footage, tmp_path, key, Seal("passphrase", passphrase=phrase))
    archive = pkg.path / pkg.sealed["file"]
    assert sorted(os.listdir(pkg.path)) == sorted([archive.name, README])
    assert archive.name == pkg.path.name + ".7z"
    assert pkg.sealed["sha256"] == sha256(archive) == pkg.sha256s[archive.name]
    assert phrase not in (pkg.path / README).read_text()
    assert pkg.sealed["sha256"] in (pkg.path / README).read_text()
    # nothing readable on the medium: not the clip, not even the file names
    assert not list(pkg.path.rglob("*.mp4"))
    listing = run(["7z", "l", "-p", str(archive)], stdin=subprocess.DEVNULL)
    assert "manifest.json" not in listing.stdout
    # the standard tool opens it with the passphrase
    out = tmp_path / "opened"
    got = run(["7z", "x", f"-p{phrase}", f"-o{out}", str(archive)])
    assert got.returncode == 0, got.stdout + got.stderr
    inner = out / pkg.sealed["package"]
    result = verify_package(inner)
    assert result.ok, result
    assert (inner / "manifest.json").exists() and len(list(inner.glob("*.mp4"))) == 1
    # a wrong passphrase: 7z's own error, non-zero
    bad = run(["7z", "t", "-pWRONG-WRONG-WRONG-WRONG-WRON", str(archive)])
    assert bad.returncode != 0
    assert "Wrong password" in bad.stdout + bad.stderr
    # a truncated archive (a copy cut short) is detected
    cut = tmp_path / "cut.7z"
    data = archive.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    trunc = run(["7z", "t", f"-p{phrase}", str(cut)])
    assert trunc.returncode != 0
    assert sha256(cut) != pkg.sealed["sha256"]


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_a_recipient_envelope_opens_with_openssl_and_the_units_key(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, kind: str
) -> None:
    unit = make_unit(tmp_path / "pki", "pudong-police", kind=kind)
    cert = load_recipient_cert(unit.cert)
    pkg = export_sealed(footage, tmp_path, key, Seal("recipient", cert=cert, unit="pudong-police"))
    sealed = pkg.path / pkg.sealed["file"]
    assert sealed.suffix == ".p7m"
    assert pkg.sealed["recipient"]["fingerprint"] == cert.fingerprint
    # the fingerprint is the one openssl prints for the certificate
    fp = run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(unit.cert)])
    assert fp.stdout.strip().split("=", 1)[1] == cert.fingerprint
    assert cert.fingerprint in (pkg.path / README).read_text()
    tar = tmp_path / "pkg.tar"
    got = run(
        ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(sealed),
         "-inkey", str(unit.key), "-recip", str(unit.cert), "-out", str(tar)]
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    out = tmp_path / "opened"
    out.mkdir()
    assert run(["tar", "xf", str(tar), "-C", str(out)]).returncode == 0
    assert verify_package(out / pkg.sealed["package"]).ok
    # another unit's key cannot open it
    other = make_unit(tmp_path / "pki2", "other-unit", kind=kind)
    wrong = run(
        ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(sealed),
         "-inkey", str(other.key), "-recip", str(other.cert), "-out", str(tmp_path / "x.tar")]
    )  # fmt: skip
    assert wrong.returncode != 0 and "rror" in wrong.stderr
    # truncated: openssl fails to read it
    cut = tmp_path / "cut.p7m"
    cut.write_bytes(sealed.read_bytes()[: sealed.stat().st_size // 2])
    trunc = run(
        ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(cut),
         "-inkey", str(unit.key), "-recip", str(unit.cert), "-out", str(tmp_path / "y.tar")]
    )  # fmt: skip
    assert trunc.returncode != 0


def test_certificates_that_cannot_receive_a_package_say_why(tmp_path: Path) -> None:
    import time

    now = time.time()
    expired = load_recipient_cert(make_unit(tmp_path / "a", "old", days=(-400, -30)).cert)
    assert "expired on" in (expired.problem(now) or "")
    future = load_recipient_cert(make_unit(tmp_path / "b", "new", days=(10, 400)).cert)
    assert "not valid before" in (future.problem(now) or "")
    signing = load_recipient_cert(make_unit(tmp_path / "c", "sig", key_usage="sign").cert)
    assert "key usage does not allow encryption" in (signing.problem(now) or "")
    ed = load_recipient_cert(make_unit(tmp_path / "d", "ed", kind="ed25519").cert)
    assert "RSA or EC certificate" in (ed.problem(now) or "")
    plain = load_recipient_cert(make_unit(tmp_path / "e", "plain", key_usage=None).cert)
    assert plain.problem(now) is None
    pss = tmp_path / "pss.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa-pss", "-pkeyopt", "rsa_keygen_bits:2048",
         "-nodes", "-keyout", str(tmp_path / "pss-key.pem"), "-out", str(pss), "-days", "30",
         "-subj", "/CN=pss unit"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert "RSA-PSS" in (load_recipient_cert(pss).problem(now) or "")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(InvalidInput, match="not a PEM X.509 certificate"):
        load_recipient_cert(tmp_path / "junk.pem")
    with pytest.raises(InvalidInput, match="cannot read"):
        load_recipient_cert(tmp_path / "missing.pem")


def test_a_failed_protected_export_leaves_nothing_on_the_medium_or_the_recorder(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    state = tmp_path / "nvrg-state"
    state.mkdir()
    dest = dest_dir(tmp_path)

    def stop(f: float) -> None:
        if f > 0.2:
            raise RuntimeFailure("stopped by the test")

    with pytest.raises(RuntimeFailure, match="stopped by the test"):
        run_sealed_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 2, T0 + 22),
            dest,
            key,
            seal=Seal("passphrase", passphrase=new_passphrase()),
            staging=staging_dir(state),
            audit_head=(1, "h"),
            progress=stop,
        )
    assert os.listdir(dest.path) == []
    assert os.listdir(state / "staging") == []


def test_a_seal_that_fails_leaves_nothing_either(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvr_guard.export import protect

    monkeypatch.setattr(protect, "OPENSSL", "false")  # openssl exits 1 without a word
    state = tmp_path / "nvrg-state"
    state.mkdir()
    dest = dest_dir(tmp_path)
    cert = load_recipient_cert(make_unit(tmp_path / "pki", "unit").cert)
    with pytest.raises(RuntimeFailure, match="openssl cms could not encrypt the package"):
        run_sealed_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 2, T0 + 6),
            dest,
            key,
            seal=Seal("recipient", cert=cert, unit="unit"),
            staging=staging_dir(state),
            audit_head=(1, "h"),
        )
    assert os.listdir(dest.path) == []
    assert os.listdir(state / "staging") == []


def test_what_a_killed_export_left_in_staging_is_removed(tmp_path: Path) -> None:
    state = tmp_path / "nvrg-state"
    state.mkdir()
    staging = staging_dir(state)
    left = staging / "export-abc123"
    left.mkdir()
    (left / "clip.mp4").write_bytes(b"footage")
    assert remove_stale_staging(state) == [left]
    assert os.listdir(staging) == []
    os.chmod(staging, 0o755)
    with pytest.raises(RuntimeFailure, match="mode 0700"):
        staging_dir(state)


def test_an_unprotected_export_is_unchanged(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any
) -> None:
    pkg = run_export(
        [("lobby-1", segs(footage["audio"]))], job(T0 + 2, T0 + 6), dest_dir(tmp_path), key,
        audit_head=(1, "h"),
    )  # fmt: skip
    assert pkg.sealed is None and (pkg.path / "manifest.json").exists()


def test_too_little_room_to_stage_refuses_before_anything_is_written(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvr_guard.errors import PolicyRefused
    from nvr_guard.export import protect

    monkeypatch.setattr(protect, "STAGING_RESERVE", 2**60)  # more than any disk has free
    state = tmp_path / "nvrg-state"
    state.mkdir()
    dest = dest_dir(tmp_path)
    with pytest.raises(PolicyRefused, match="built on the recorder before it is sealed"):
        run_sealed_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 2, T0 + 6),
            dest,
            key,
            seal=Seal("passphrase", passphrase=new_passphrase()),
            staging=staging_dir(state),
            audit_head=(1, "h"),
        )
    assert os.listdir(dest.path) == [] and os.listdir(state / "staging") == []


def test_a_full_medium_is_refused_before_the_encode_not_after(
    footage: dict[str, list[Path]], tmp_path: Path, key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvr_guard.errors import PolicyRefused
    from nvr_guard.export import DirectoryDestination
    from nvr_guard.export import ffmpeg as ff

    encodes: list[object] = []
    real = ff.run_ffmpeg
    monkeypatch.setattr(ff, "run_ffmpeg", lambda *a, **kw: encodes.append(a) or real(*a, **kw))
    state = tmp_path / "nvrg-state"
    state.mkdir()
    medium = tmp_path / "medium"
    medium.mkdir()
    full = DirectoryDestination(medium, reserve=2**60)  # no medium has this much room
    with pytest.raises(PolicyRefused, match="MiB free"):
        run_sealed_export(
            [("lobby-1", segs(footage["audio"]))],
            job(T0 + 2, T0 + 6),
            full,
            key,
            seal=Seal("passphrase", passphrase=new_passphrase()),
            staging=staging_dir(state),
            audit_head=(1, "h"),
        )
    assert encodes == [] and os.listdir(medium) == [] and os.listdir(state / "staging") == []
