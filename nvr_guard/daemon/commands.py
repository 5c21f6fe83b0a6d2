"""The arguments of every control command, as one typed model per command.

The daemon validates a request's ``args`` against its command's model before any handler code
runs: a missing field, an unknown field, a value of the wrong type, an id out of range or an
oversized text is refused with exit 2 and a one-line message naming the field — never a
traceback from deep inside a handler. Handlers then receive plain values of the right types.

The CLI builds these arguments itself; the models are the fence against anyone else who speaks
the socket protocol (a script, a fuzzer, an insider with ``socat``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.functional_validators import AfterValidator

from nvr_guard.errors import InvalidInput

MAX_ID = 2**53  # what a JSON number carries exactly


def _no_nul(s: str) -> str:
    if "\x00" in s:
        raise ValueError("must not contain NUL characters")
    return s


_NoNul = AfterValidator(_no_nul)
Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
# ISO 8601 or a duration ("1h"); parsed by the handler in the site's zone
Time = Annotated[StrictStr, Field(max_length=64), _NoNul]
Short = Annotated[StrictStr, Field(max_length=256), _NoNul]
Long = Annotated[StrictStr, Field(max_length=4000), _NoNul]
PathText = Annotated[StrictStr, Field(max_length=4096), _NoNul]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class NoArgs(_Args):
    pass


class IdArgs(_Args):
    id: Id


class Recipient(_Args):
    unit: Long = ""
    person: Long = ""
    contact: Long = ""


class RequestNew(_Args):
    cameras: Long
    from_: Time = Field(alias="from")
    to: Time
    reason: Long = ""
    basis: Long = ""
    recipient: Recipient
    format: Literal["mp4", "native"] = "mp4"
    emergency: StrictBool = False


class RequestList(_Args):
    state: Short | None = None


class RequestApprove(_Args):
    id: Id
    note: Long | None = None
    as_step: Short | None = None


class IdReason(_Args):
    id: Id
    reason: Long = ""


class ExportRun(_Args):
    id: Id
    media: PathText


class Media(_Args):
    media: PathText


class MediaEnroll(_Args):
    media: PathText
    label: Long | None = None


class MediaRemove(_Args):
    media: PathText
    reason: Long = ""


class MediaWipe(_Args):
    media: PathText
    confirm: PathText = ""


class RetentionRun(_Args):
    now: Time | None = None
    dry_run: StrictBool = False


class RetentionConfirm(_Args):
    sweep: Id


class RetentionConfirmRoot(_Args):
    site: Short
    root: PathText


class HoldAdd(_Args):
    camera: Short
    from_: Time = Field(alias="from")
    to: Time
    reason: Long
    until: Time | None = None
    site: Short | None = None


class HoldList(_Args):
    all: StrictBool = False


class HoldRelease(_Args):
    id: Id
    reason: Long


class AuditShow(_Args):
    since: Time | None = None
    request: Id | None = None


#: every command the daemon serves besides the socket's own ``ping``
ARGS: dict[str, type[_Args]] = {
    "status": NoArgs,
    "reload": NoArgs,
    "request.new": RequestNew,
    "request.list": RequestList,
    "request.show": IdArgs,
    "request.approve": RequestApprove,
    "request.deny": IdReason,
    "request.cancel": IdArgs,
    "request.resolve": IdReason,
    "export.run": ExportRun,
    "export.progress": IdArgs,
    "export.form": IdArgs,
    "media.list": NoArgs,
    "media.enroll": MediaEnroll,
    "media.remove": MediaRemove,
    "media.scan": Media,
    "media.scan_progress": Media,
    "media.wipe": MediaWipe,
    "retention.run": RetentionRun,
    "retention.confirm": RetentionConfirm,
    "retention.confirm_root": RetentionConfirmRoot,
    "hold.add": HoldAdd,
    "hold.list": HoldList,
    "hold.release": HoldRelease,
    "key.show": NoArgs,
    "audit.show": AuditShow,
    "audit.verify": NoArgs,
}


def validate(cmd: str, args: Any) -> dict[str, Any]:
    """``args`` of ``cmd`` checked against its model, as a plain dict (wire names: ``from``).

    Raises InvalidInput (exit 2) with one line naming every bad field, or for an unknown command.
    """
    model = ARGS.get(cmd)
    if model is None:
        raise InvalidInput(f"unknown command {cmd!r}; the daemon knows: {', '.join(sorted(ARGS))}")
    try:
        parsed = model.model_validate(args)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "(arguments)"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        raise InvalidInput(f"{cmd}: invalid arguments: " + "; ".join(parts)[:1000]) from None
    return parsed.model_dump(by_alias=True)
