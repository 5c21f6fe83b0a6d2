"""What protects a request's footage on its way out: the encryption it is exported with, the
privacy zones filled in on it, and whether a native (unmaskable) copy may be made.

The encryption of a request is fixed when it is filed, so the approvers see and approve it
(``request show`` -> ``encrypt``): the requester's ``--encrypt``, else the site's
``export.encrypt``. A request may ask for a protection at least as strong as the policy's, never
less: ``none`` is refused (exit 3) where the site encrypts by default or where a camera's level
reaches ``export.encrypt_from_level``. ``recipient`` needs the request's recipient unit to have
a certificate in ``export.recipients`` (else exit 2). At export time the mode is taken again
against the config then in force: a policy tightened since raises ``none`` to ``passphrase``
(recorded), and a recipient certificate that expired or was removed refuses the export (exit 3).

Zones: the camera's ``privacy_zones`` plus the rectangles approvers added with ``--mask`` (on
every camera of the request, or on the one named ``CAMERA:x,y,w,h``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from nvr_guard.config import Config
from nvr_guard.config.types import ENCRYPT_MODES
from nvr_guard.errors import InvalidInput
from nvr_guard.export.keys import load_recipient_cert
from nvr_guard.export.protect import Seal, new_passphrase
from nvr_guard.export.zones import Zone, parse_mask
from nvr_guard.model import Approval, Request
from nvr_guard.workflow.access import MAX_LEVEL, Decision


def site_encrypt(config: Config, site: str) -> str:
    """The site's default encryption (``sites.<id>.export.encrypt``, else ``export.encrypt``)."""
    s = config.sites.get(site)
    if s is not None and s.export is not None and s.export.encrypt is not None:
        return s.export.encrypt
    return config.export.encrypt


def required_by(config: Config, site: str, cameras: Iterable[str]) -> str | None:
    """Why this footage may only leave encrypted (None: it may leave unencrypted)."""
    default = site_encrypt(config, site)
    if default != "none":
        return f"site {site} exports encrypted (export.encrypt: {default})"
    limit = config.export.encrypt_from_level
    if limit is not None:
        for cam in cameras:
            c = config.cameras.get(cam)
            level = c.level if c is not None else MAX_LEVEL
            if level >= limit:
                return (
                    f"camera {cam} is level {level}, and cameras of level {limit} and above are "
                    "exported only encrypted (export.encrypt_from_level)"
                )
    return None


def encrypt_for_new(
    config: Config, site: str, cameras: Sequence[str], requested: str | None, unit: str
) -> tuple[str, Decision | None]:
    """The encryption a new request is filed with, or a refusal."""
    if requested is not None and requested not in ENCRYPT_MODES:
        return "", Decision(
            False,
            f"--encrypt {requested!r} is not known; write none, passphrase or recipient",
            2,
        )
    required = required_by(config, site, cameras)
    if requested is None:
        mode = site_encrypt(config, site)
        if mode == "none" and required is not None:
            mode = "passphrase"
    elif requested == "none" and required is not None:
        return "", Decision(
            False,
            f"--encrypt none refused: {required}; file it with --encrypt passphrase or "
            "--encrypt recipient",
            3,
        )
    else:
        mode = requested
    if mode == "recipient" and unit not in config.export.recipients:
        known = ", ".join(sorted(config.export.recipients)) or "none configured"
        return "", Decision(
            False,
            f"--encrypt recipient: the recipient unit {unit!r} has no certificate in "
            f"export.recipients (units: {known}); give the unit's name exactly as configured, "
            "or use --encrypt passphrase",
            2,
        )
    return mode, None


def native_refusal(config: Config, fmt: str, cameras: Iterable[str]) -> Decision | None:
    """A native copy of a camera with privacy zones, where ``export.native_with_zones: refuse``."""
    if fmt != "native" or config.export.native_with_zones != "refuse":
        return None
    zoned = [c for c in cameras if c in config.cameras and config.cameras[c].privacy_zones]
    if not zoned:
        return None
    return Decision(
        False,
        f"a native copy cannot be masked, and camera(s) {', '.join(zoned)} have privacy zones "
        "(export.native_with_zones: refuse); file it as --format mp4",
        3,
    )


def mask_zones(r: Request, a: Approval) -> dict[str, list[Zone]]:
    """The zones an approval added, per camera."""
    if not a.mask:
        return {}
    return parse_mask(a.mask, r.cameras, f"approval by {a.approver}")


def check_mask(r: Request, text: str, approver: str) -> str:
    """``--mask`` of an approval, checked against the request; returns it normalised.
    InvalidInput for a malformed mask or a native request (which cannot be masked)."""
    if r.format == "native":
        raise InvalidInput(
            f"request {r.id} is a native copy, which cannot be masked; approve it without "
            "--mask, or deny it and ask for --format mp4"
        )
    parse_mask(text, r.cameras, f"approval by {approver}")  # InvalidInput when malformed
    return ";".join(p.strip() for p in text.split(";") if p.strip())


def zones_for(config: Config, r: Request, approvals: Sequence[Approval]) -> dict[str, list[Zone]]:
    """Every zone of each camera of ``r``: the camera's own, then the approvers' masks."""
    out: dict[str, list[Zone]] = {}
    for cam in r.cameras:
        c = config.cameras.get(cam)
        if c is not None and c.privacy_zones:
            out[cam] = list(c.privacy_zones)
    for a in approvals:
        if a.decision != "approve":
            continue
        for cam, zs in mask_zones(r, a).items():
            out.setdefault(cam, []).extend(zs)
    return out


def still_protected(
    config: Config,
    r: Request,
    approvals: Sequence[Approval],
    sealed: bool,
    zones: Mapping[str, Sequence[Zone]],
) -> Decision:
    """Does an export that began sealed (or not) and with ``zones`` still meet the policy in
    force? A reload during the export may have refused native copies of zoned cameras, made
    encryption required, or added zones (the package would leave without them): it stops."""
    native = native_refusal(config, r.format, r.cameras)
    if native is not None:
        return native
    if not sealed:
        required = required_by(config, r.site, r.cameras)
        if required is not None:
            return Decision(
                False,
                f"{required} since the export began; run it again and it will be encrypted",
                3,
            )
    if r.format != "native" and zones_json(zones_for(config, r, approvals)) != zones_json(zones):
        return Decision(
            False,
            "the privacy zones of its cameras changed since the export began; run it again and "
            "they will be filled in",
            3,
        )
    return Decision(True, "")


def zones_json(zones: Mapping[str, Sequence[Zone]]) -> dict[str, list[dict[str, object]]]:
    """Zones per camera, as ``request show`` and the audit log list them."""
    return {cam: [z.json() for z in zs] for cam, zs in zones.items()}


def seal_at_export(
    config: Config, r: Request, now: float
) -> tuple[Seal | None, str | None, Decision | None]:
    """The seal of ``r``'s export under the config in force: (seal or None, a note on a mode
    raised by policy, a refusal)."""
    mode = r.encrypt or "none"
    note = None
    if mode == "none":
        required = required_by(config, r.site, r.cameras)
        if required is not None:
            mode, note = "passphrase", f"encryption raised to passphrase: {required}"
    if mode == "none":
        return None, None, None
    if mode == "passphrase":
        return Seal("passphrase", passphrase=new_passphrase()), note, None
    unit = r.recipient.unit
    path = config.export.recipients.get(unit)
    if path is None:
        return (
            None,
            None,
            Decision(
                False,
                f"export refused: request {r.id} is to be encrypted to {unit}, which no longer "
                "has a certificate in export.recipients",
                3,
            ),
        )
    try:
        cert = load_recipient_cert(path)
    except InvalidInput as e:
        return None, None, Decision(False, f"export refused: {e}", 3)
    problem = cert.problem(now)
    if problem is not None:
        return (
            None,
            None,
            Decision(
                False,
                f"export refused: the recipient unit {unit}'s {problem}; ask the unit for a "
                "current certificate and put it in export.recipients",
                3,
            ),
        )
    return Seal("recipient", cert=cert, unit=unit), note, None
