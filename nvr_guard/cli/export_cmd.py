"""`nvr-guard export run|form`, `verify` and `key show`: approved exports, their offline
check, and the key that signs them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from nvr_guard.cli.base import Ctx, Group, act, daemon_call, err, out, pass_ctx, with_progress
from nvr_guard.errors import DaemonUnavailable, InvalidInput, RuntimeFailure, VerifyFailed


@click.group(cls=Group)
def export() -> None:
    """Carry out approved exports (technicians)."""


@export.command("run")
@click.argument("rid", type=int)
@click.option(
    "--media", required=True, help="an export target directory (USB media: the media gate)"
)
@click.option(
    "--slip",
    type=click.Path(dir_okay=False),
    help="with a passphrase: also write the printable passphrase slip (HTML) here, to hand over "
    "apart from the medium",
)
@pass_ctx
def export_run(c: Ctx, rid: int, media: str, slip: str | None) -> None:
    """Write the watermarked, signed export package of an approved request."""
    res = with_progress(
        c,
        lambda: daemon_call(c, "export.run", {"id": rid, "media": media}, timeout=6 * 3600),
        lambda: daemon_call(c, "export.progress", {"id": rid}, timeout=5).get("progress"),
        f"export request {rid}",
    )

    slip_path = None
    if res.get("passphrase") and slip:
        from nvr_guard.export.form import passphrase_slip_html

        html = passphrase_slip_html(res)
        try:
            fd = os.open(slip, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(html)
            slip_path = str(Path(slip).resolve())
        except OSError as e:  # the export is done: say so, and show the passphrase regardless
            err.print(f"cannot write the slip {slip}: {e.strerror or e}", markup=False)
    if slip_path is not None:
        res["slip"] = slip_path

    def human() -> None:
        out.print(f"package written: {res['package']}", markup=False)
        if res.get("archive"):
            out.print(f"sealed file: {res['archive']}", markup=False)
            out.print(f"its SHA-256: {res.get('archive_sha256')}", markup=False)
        if res.get("passphrase"):
            out.print(
                f"PASSPHRASE (shown only now, stored nowhere): {res['passphrase']}", markup=False
            )
            out.print(
                "hand it to the recipient apart from the medium (another person, phone, or "
                + (f"the slip {slip_path})" if slip_path else "a slip: export run --slip FILE)"),
                markup=False,
            )
        sealed = res.get("sealed") or {}
        if sealed.get("recipient"):
            r = sealed["recipient"]
            out.print(
                f"encrypted to {r.get('unit')} ({r.get('subject')}, certificate "
                f"{r.get('fingerprint')})",
                markup=False,
            )
        for cam, at in (res.get("native_start") or {}).items():
            out.print(
                f"{cam}: the native copy starts at the keyframe {at}, at or before the "
                "requested start (stream copy cannot cut between keyframes)",
                markup=False,
            )

    c.emit(res, human)


@export.command("destroy")
@click.argument("rid", type=int)
@click.option("--reason", required=True, help="why the package is destroyed before its time")
@pass_ctx
def export_destroy(c: Ctx, rid: int, reason: str) -> None:
    """Admin: destroy a request's package kept on an export target directory now."""
    res = daemon_call(c, "export.destroy", {"id": rid, "reason": reason})
    c.emit(
        res,
        lambda: out.print(
            f"request {rid}: {res['package']} destroyed ({res['files']} files, "
            f"{res['bytes']} bytes); receipt in the audit log",
            markup=False,
        ),
    )


@export.command("form")
@click.argument("rid", type=int)
@click.option("-o", "output", type=click.Path(dir_okay=False), help="write the HTML here")
@pass_ctx
def export_form(c: Ctx, rid: int, output: str | None) -> None:
    """Printable approval record (审批表) of a request, as HTML."""
    html = act(c, "export.form", {"id": rid}, fresh=False)["html"]
    if output:
        try:
            Path(output).write_text(html, encoding="utf-8")
        except OSError as e:  # written by the person who asked, with their own rights
            raise InvalidInput(f"cannot write {output}: {e.strerror or e}") from None
        c.emit(
            {"id": rid, "form": str(Path(output).resolve())},
            lambda: out.print(f"approval record written to {output}", markup=False),
        )
    else:
        sys.stdout.write(html)


@click.command("verify")
@click.argument("package_dir", type=click.Path(file_okay=False))
@click.option(
    "--fingerprint",
    "pin",
    metavar="SHA256:...",
    help="the recorder's key fingerprint from the paper approval record or hand-over slip",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False),
    metavar="PEM",
    help="the recorder's public key (PEM), obtained outside the package",
)
@pass_ctx
def verify(c: Ctx, package_dir: str, pin: str | None, key_file: str | None) -> None:
    """Offline check of an export package: hashes and signature (exit 4 when tampered).

    The signer is confirmed only against a fingerprint or key from outside the package: whoever
    carried the package could have re-signed it with a key of their own (exit 4 on a mismatch).
    """
    from nvr_guard.export import verify_package
    from nvr_guard.export.keys import key_file_fingerprint, parse_fingerprint

    # a pin given empty is a mistake (an unset shell variable), never "no pin"
    if pin is not None and key_file is not None:
        raise InvalidInput("give --fingerprint or --key, not both")
    expected = parse_fingerprint(pin) if pin is not None else None
    if key_file is not None:
        if not key_file.strip():
            raise InvalidInput("--key is empty: give the recorder's public key file (PEM)")
        expected = key_file_fingerprint(Path(key_file))
    if not Path(package_dir).is_dir():
        raise InvalidInput(f"{package_dir} is not a directory")
    rep = verify_package(Path(package_dir), expected_fingerprint=expected)
    data = {
        "ok": rep.ok,
        "signer_confirmed": rep.signer_confirmed,
        "package": str(Path(package_dir).resolve()),
        "fingerprint": rep.fingerprint,
        "pinned": expected,
        "problems": [{"kind": p.kind, "message": p.message} for p in rep.problems],
        "checked": list(rep.checked),
    }

    def human() -> None:
        if rep.ok and rep.signer_confirmed:
            out.print(
                f"package OK: {len(rep.checked)} files match, signed by {rep.fingerprint}, "
                "the pinned recorder key",
                markup=False,
            )
        elif rep.ok:
            out.print(
                f"package self-consistent: {len(rep.checked)} files match its manifest",
                markup=False,
            )
            out.print(
                "signature is self-consistent; the signer is NOT confirmed — compare "
                f"{rep.fingerprint} with the fingerprint on the paper record "
                "(or run again with --fingerprint SHA256:... from the paper record)",
                markup=False,
            )
        else:
            err.print(
                f"package FAILED verification: {len(rep.problems)} "
                f"problem{'s' if len(rep.problems) != 1 else ''}",
                markup=False,
            )
        for p in rep.problems:
            err.print(f"{p.kind}: {p.message}", markup=False)

    c.emit(data, human)
    if not rep.ok:
        sys.exit(VerifyFailed.exit_code)


# ---- key ------------------------------------------------------------------------------------
@click.group(cls=Group)
def key() -> None:
    """The recorder's export-signing key."""


@key.command("show")
@pass_ctx
def key_show(c: Ctx) -> None:
    """The export-signing key's fingerprint, to print on paper and give to recipients.

    Asks the daemon; without one, reads the key file (root or the daemon user) and never
    creates a key.
    """
    from nvr_guard.export.keys import key_file_fingerprint

    try:
        res = daemon_call(c, "key.show", {}, timeout=10)
    except DaemonUnavailable as e:
        path = Path(c.config.signing_key_path())
        if not path.exists() and os.access(path.parent, os.X_OK):
            raise RuntimeFailure(
                f"no export signing key at {path} yet: the daemon creates it when it starts"
            ) from None
        try:
            fp = key_file_fingerprint(path)
        except InvalidInput as e2:
            raise RuntimeFailure(f"{e2} ({e})") from None
        res = {"fingerprint": fp, "path": str(path), "algorithm": "Ed25519"}

    c.emit(
        res,
        lambda: out.print(
            f"{res['fingerprint']}  ({res['algorithm']}, {res['path']})", markup=False
        ),
    )
