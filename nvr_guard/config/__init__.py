"""The config file: strict YAML -> pydantic models, every error reported as ``FILE:LINE: message``.

Why so strict (house style, after fail2ban's silent fall-backs and Frigate's config incidents):
a retention daemon that guesses deletes footage. So:

- The YAML is read by :class:`StrictLoader`, which builds *no* implicit types. YAML 1.1 (what
  PyYAML implements) turns ``keep: no`` into ``False``, ``level: 010`` into octal 8 and ``1:30``
  into 90; every plain scalar here stays text and the field's own validator converts it
  explicitly (a decimal int without leading zeros, ``true``/``false``, a duration ...), refusing
  the YAML 1.1 readings with a message that says what the admin most likely meant.
- Duplicate keys (silently "last one wins" in PyYAML) and aliases are refused.
- The line of every key and value is remembered, so each pydantic error is mapped back to the
  line it is about; all errors are collected, not just the first.
- Checks that need more than one field (``keep`` < ``min_keep``, overlapping roots, a layout in its
  timezone, roots on disk) run after the field checks, on every site that passed them, so one
  ``config check`` run lists everything to fix.

Public API: :func:`load_config`, :func:`check_config`, :class:`Config`.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import posixpath
import re
import string
import types
import typing
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Union
from zoneinfo import ZoneInfo, available_timezones

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
)
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nvr_guard.durations import Duration
from nvr_guard.errors import ConfigError
from nvr_guard.model import GuardRules, SiteRules
from nvr_guard.mounts import Mount, fs_location, mount_points_below, mounts
from nvr_guard.retention.layout import Layout

Problem = tuple[str, int, str]  # (file, line, message); line 0 = the file as a whole

DURATION_HINT = "write a number and a unit: 90min, 24h, 15d, 2w, 6mo, 1y"


# ---- built-in retention profiles (from the regulations) ------------------------------------
@dataclass(frozen=True)
class Profile:
    keep: Duration
    min_keep: Duration | None
    source: str


PROFILES: dict[str, Profile] = {
    "highway": Profile(
        Duration.parse("15d"), None, "highway toll monitoring: 15-day playback window"
    ),
    "residential": Profile(
        Duration.parse("30d"), Duration.parse("30d"), "residential compounds: 30 days minimum"
    ),
    "general": Profile(Duration.parse("6mo"), None, "generic custody rules: up to 6 months"),
    "school": Profile(Duration.parse("1y"), None, "school monitoring: 1 year, then delete"),
}

DEFAULT_EXTENSIONS = (".mp4", ".mkv", ".ts", ".avi", ".h264", ".h265", ".dav")
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
DEFAULT_WATERMARK = (
    "调取 request {request} · {camera} · 申请 {requester} · 审批 {approvers}"
    " · 导出 {technician} {exported}"
)
# The rule: an approved request is valid for at most 30 days, then must be re-applied for.
MAX_VALID_FOR = Duration.parse("30d")


# ---- YAML: no implicit types, lines remembered, duplicates refused ----------------------------
class _Plain(str):
    """An unquoted scalar: the only kind a YAML 1.1 reader would turn into a bool or a number."""

    __slots__ = ()


_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class _Where:
    key_line: int  # line of the key (or of the item, in a list)
    value_line: int
    scalar: bool  # a scalar value points at its own line; a block mapping/list at its key


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that resolves only ``null``; everything else plain is text (see module doc).

    Use :meth:`load_tracked` instead of ``yaml.load``: it returns the data and the line map and
    collects soft problems (duplicate keys, aliases, explicit tags) rather than stopping at one.
    """

    # Only the empty value, ``~`` and ``null`` are resolved (so ``keep:`` means "not set"). No bool,
    # int, float or timestamp resolvers: this is what makes ``no``/``010``/``1:30`` stay text.
    yaml_implicit_resolvers = {}

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.problems: list[Problem] = []
        self.lines: dict[Path_, _Where] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # Aliases would let one node stand at many paths (and a few nested ones blow up into
        # millions of entries); configs here are short enough to write out.
        if self.check_event(AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]
            self.problems.append(
                (
                    self.source,
                    event.start_mark.line + 1,
                    f"alias *{event.anchor} is not supported; write the value out in full",
                )
            )
            return ScalarNode(_NULL_TAG, "", event.start_mark, event.end_mark)
        return super().compose_node(parent, index)

    def load_tracked(self) -> tuple[Any, bool]:
        """(data, empty) of the single document; raises yaml.YAMLError on a syntax error."""
        try:
            node = self.get_single_node()
        finally:
            self.dispose()
        if node is None:
            return None, True
        self.lines[()] = _Where(node.start_mark.line + 1, node.start_mark.line + 1, False)
        return self._data(node, ()), False

    def _data(self, node: Node, path: Path_) -> Any:
        line = node.start_mark.line + 1
        if isinstance(node, ScalarNode):
            if node.tag == _NULL_TAG:
                return None
            if node.tag != _STR_TAG:
                self._problem(path, line, f"explicit tag {node.tag!r} is not supported; remove it")
                return None
            return _Plain(node.value) if node.style is None else str(node.value)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ_TAG:
                self._problem(path, line, f"explicit tag {node.tag!r} is not supported; remove it")
            items: list[Any] = []
            for i, item in enumerate(node.value):
                il = item.start_mark.line + 1
                self.lines[path + (i,)] = _Where(il, il, isinstance(item, ScalarNode))
                items.append(self._data(item, path + (i,)))
            return items
        if isinstance(node, MappingNode):
            if node.tag != _MAP_TAG:
                self._problem(path, line, f"explicit tag {node.tag!r} is not supported; remove it")
            out: dict[str, Any] = {}
            first: dict[str, int] = {}
            for knode, vnode in node.value:
                kl = knode.start_mark.line + 1
                if not isinstance(knode, ScalarNode) or knode.tag not in (_STR_TAG, _NULL_TAG):
                    self._problem(path, kl, "a key must be a plain word, not a list or mapping")
                    continue
                if knode.tag == _NULL_TAG or not knode.value:
                    self._problem(path, kl, "empty key; write a name before the ':'")
                    continue
                key = str(knode.value)
                if key in first:
                    # PyYAML would silently keep the last value: an admin editing the first one
                    # would see no effect, or, worse, a forgotten second `keep:` would win.
                    self._problem(
                        path + (key,),
                        kl,
                        f"duplicate key (first at line {first[key]}); keep only one",
                    )
                    continue
                first[key] = kl
                sub = path + (key,)
                self.lines[sub] = _Where(
                    kl, vnode.start_mark.line + 1, isinstance(vnode, ScalarNode)
                )
                out[key] = self._data(vnode, sub)
            return out
        raise TypeError(f"unexpected YAML node {node!r}")  # pragma: no cover - composer invariant

    def _problem(self, path: Path_, line: int, msg: str) -> None:
        self.problems.append((self.source, line, f"{_dotted(path)}: {msg}" if path else msg))


StrictLoader.add_implicit_resolver(
    _NULL_TAG, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


def _dotted(path: Path_ | tuple[Any, ...]) -> str:
    out = ""
    for el in path:
        if isinstance(el, int):
            out += f"[{el}]"
        else:
            out += ("." if out else "") + str(el)
    # a key may hold a newline or an escape sequence: messages stay one line, inert in a terminal
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)


# ---- value types: explicit conversions, messages that say what to write --------------------
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n", "true", "false"}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_UNIX_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}\$?")
_EXT = re.compile(r"\.[A-Za-z0-9_-]{1,15}")
_DEC_INT = re.compile(r"[-+]?[0-9]+")
_DEC_NUM = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_WORKING_DAYS = re.compile(r"([0-9]+)\s+working\s+days?", re.I)


def _desc(v: object) -> str:
    """How an input looks to the admin who wrote it."""
    if v is None:
        return "an empty value"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(str(v))
    return repr(v)


def _need_text(v: object, what: str) -> str:
    if isinstance(v, str):
        return str(v)
    if v is None:
        raise ValueError(f"empty value; {what}")
    raise ValueError(f"expected {what}, got {_desc(v)}")


def _text(v: object) -> str:
    s = _need_text(v, "text")
    if isinstance(v, _Plain) and s.lower() in _YAML11_BOOLS:
        raise ValueError(
            f"{s!r} would be read as a boolean by YAML 1.1 tools; "
            "put it in quotes if you mean the text"
        )
    if any(not c.isprintable() for c in s):
        raise ValueError(f"{s!r} contains control characters")
    return s


def _template(v: object) -> str:
    """The watermark template: text whose ``{field}`` braces must pair up, else every export
    would be refused at export time instead of the config at load time."""
    s = _text(v)
    try:
        list(string.Formatter().parse(s))
    except ValueError as e:
        raise ValueError(
            f"{e}; write fields as {{request}} and a literal brace as {{{{ or }}}}"
        ) from None
    return s


def _bool(v: object) -> bool:
    if isinstance(v, bool):
        return v
    s = _need_text(v, "true or false")
    if s.lower() == "true":
        return True
    if s.lower() == "false":
        return False
    if s.lower() in _YAML11_BOOLS:
        raise ValueError(f"{s!r} is ambiguous (a YAML 1.1 boolean); write true or false")
    raise ValueError(f"expected true or false, got {_desc(v)}")


def _int(v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    s = _need_text(v, "a whole number").strip()
    if not _DEC_INT.fullmatch(s):
        raise ValueError(f"expected a whole number, got {_desc(v)}")
    digits = s.lstrip("+-")
    if len(digits) > 1 and digits.startswith("0"):
        octal = (
            f" (YAML 1.1 reads it as octal {int(digits, 8)})"
            if set(digits) <= set("01234567")
            else ""
        )
        raise ValueError(f"{s!r} has a leading zero{octal}; write the number without leading zeros")
    return int(s)


def _int_between(lo: int, hi: int, hint: str = "") -> Any:
    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range; {hint or f'write a number from {lo} to {hi}'}")
        return v

    return check


def _fraction(v: object) -> float:
    """A share of something: ``0.2``, ``20%``; refuses anything outside 0..1 (0%..100%)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = float(v)
        text = repr(v)
    else:
        text = _need_text(v, "a fraction such as 0.2 or a percentage such as 20%").strip()
        pct = text.endswith("%")
        num = text[:-1].strip() if pct else text
        if not _DEC_NUM.fullmatch(num):
            raise ValueError(
                f"expected a fraction such as 0.2 or a percentage such as 20%, got {_desc(v)}"
            )
        f = float(num) / 100 if pct else float(num)
    if not 0.0 <= f <= 1.0:
        raise ValueError(
            f"{text} is not between 0 and 1; "
            "write a fraction such as 0.2 or a percentage such as 20%"
        )
    return f


def _duration(v: object, bare_minutes: bool = True) -> Duration:
    if isinstance(v, Duration):
        return v
    if isinstance(v, _Plain) and v.lower() in _YAML11_BOOLS:
        raise ValueError(
            f"{str(v)!r} is not a duration (YAML 1.1 would read it as a boolean); {DURATION_HINT}"
        )
    s = _need_text(v, f"a duration; {DURATION_HINT}")
    if re.fullmatch(r"[0-9]+(:[0-9]+)+", s.strip()):
        raise ValueError(f"{s!r} is not a duration (YAML 1.1 reads it as base-60); {DURATION_HINT}")
    d = Duration.parse(s, bare_minutes)  # its ValueError already names the format
    if d.is_zero:
        raise ValueError(f"{s!r} is zero; {DURATION_HINT}")
    return d


def _retention_duration(v: object) -> Duration:
    # `keep: 6m` is six months to whoever wrote it: read as minutes it would delete half a
    # year of footage at the next sweep. In retention keys minutes are written `min`.
    return _duration(v, bare_minutes=False)


def _fixed(d: Duration) -> Duration:
    # Intervals and timeouts need a fixed length; a month is 28-31 days depending on when.
    if d.months:
        raise ValueError(
            f"{fmt_duration(d)} uses months or years; write a fixed length such as 30d, 24h or 15m"
        )
    return d


def _zone(v: object) -> str:
    s = _need_text(v, "a timezone name such as Asia/Shanghai or UTC").strip()
    try:
        if s.startswith("/") or ".." in s.split("/"):
            raise ValueError
        ZoneInfo(s)
    except (ValueError, KeyError, OSError):
        close = difflib.get_close_matches(s, sorted(available_timezones()), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(
            f"unknown timezone {s!r}; {hint}use an IANA name such as Asia/Shanghai or UTC"
        ) from None
    return s


def _abs_path(v: object) -> str:
    s = _need_text(v, "an absolute path such as /srv/recordings")
    if not s.startswith("/"):
        raise ValueError(f"{s!r} is a relative path; write an absolute path (starting with /)")
    if any(c == "\0" or not c.isprintable() for c in s):
        raise ValueError(f"{s!r} contains control characters")
    if ".." in s.split("/"):
        raise ValueError(f"{s!r} contains '..'; write the path without it")
    return posixpath.normpath(s) if s != "//" else "/"


def _matching(rx: re.Pattern[str], what: str) -> Any:
    def check(v: object) -> str:
        s = _need_text(v, what)
        if not rx.fullmatch(s):
            raise ValueError(f"{s!r} is not a valid {what}")
        return s

    return check


def _one_of(*choices: str) -> Any:
    def check(v: object) -> str:
        s = _need_text(v, "one of: " + ", ".join(choices))
        if s not in choices:
            close = difflib.get_close_matches(s, choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{s!r} is not one of: {', '.join(choices)}{hint}")
        return s

    return check


def _profile(v: object) -> str:
    s = _need_text(v, "a profile name")
    if s not in PROFILES:
        close = difflib.get_close_matches(s, list(PROFILES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown profile {s!r}; {hint}profiles: {', '.join(PROFILES)}")
    return s


def _extension(v: object) -> str:
    s = _need_text(v, "a file extension such as .mp4")
    if not s.startswith("."):
        raise ValueError(f"extension {s!r} must start with '.', e.g. .{s}")
    if not _EXT.fullmatch(s):
        raise ValueError(f"{s!r} is not a file extension; write e.g. .mp4")
    return s


def _unique_extensions(v: list[str]) -> list[str]:
    seen: set[str] = set()
    for e in v:
        if e.lower() in seen:
            raise ValueError(f"{e!r} is listed twice (extensions match regardless of case)")
        seen.add(e.lower())
    if not v:
        raise ValueError("no extensions; list the segment file extensions, e.g. [.mp4, .mkv]")
    return v


def _non_empty(what: str) -> Any:
    def check(v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError(f"empty list; {what}")
        return v

    return check


def _hours(v: object) -> str:
    s = _need_text(v, 'a time window such as "08:00-20:00"').strip()
    m = _HOURS.fullmatch(s)
    ok = m is not None
    if m is not None:
        h0, m0, h1, m1 = (int(x) for x in m.groups())
        ok = h0 < 24 and m0 < 60 and m1 < 60 and (h1 < 24 or (h1, m1) == (24, 0))
        ok = ok and (h0, m0) < (h1, m1)
    if not ok:
        raise ValueError(
            f"{s!r} is not a time window; "
            'write HH:MM-HH:MM with the start first, e.g. "08:00-20:00"'
        )
    return s


def _decide_within(v: object) -> int:
    """Working days: ``3 working days`` or ``3``."""
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        s = _need_text(v, "a number of working days, e.g. 3 working days").strip()
        m = _WORKING_DAYS.fullmatch(s)
        if m:
            n = int(m.group(1))
        else:
            try:
                n = _int(s)
            except ValueError:
                raise ValueError(
                    f"{s!r} is not a number of working days; write e.g. 3 working days"
                ) from None
    if n < 1:
        raise ValueError(f"{n} working days is too short; write at least 1 working day")
    return n


def _dates(v: object) -> list[date]:
    """Dates ``2026-10-01`` or inclusive ranges ``2026-10-01..2026-10-07`` (a holiday week)."""
    if not isinstance(v, list):
        raise ValueError(
            f"expected a list of dates such as [2026-10-01, 2026-10-02..2026-10-07], got {_desc(v)}"
        )
    out: list[date] = []
    for item in v:
        s = _need_text(item, "a date such as 2026-10-01").strip()
        ends = s.split("..")
        try:
            if len(ends) > 2 or not all(_DATE.fullmatch(e.strip()) for e in ends):
                raise ValueError
            first, last = (date.fromisoformat(e.strip()) for e in (ends[0], ends[-1]))
        except ValueError:
            raise ValueError(
                f"{s!r} is not a date; write YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD"
            ) from None
        if last < first or (last - first).days > 366:
            raise ValueError(f"{s!r}: the range must run forwards and span at most a year")
        out.extend(first + timedelta(days=i) for i in range((last - first).days + 1))
    return sorted(set(out))


def _sites_present(v: object) -> object:
    if v is None or v == {}:
        raise ValueError("no sites; add at least one site with roots: and profile: or keep:")
    return v


def fmt_duration(d: Duration, minute: str = "m") -> str:
    """A duration as an admin writes it: ``30d`` rather than Duration.__str__'s ``4w2d``.
    ``minute="min"`` for retention keys, which refuse a bare ``m``."""
    y, mo = divmod(d.months, 12)
    out = (f"{y}y" if y else "") + (f"{mo}mo" if mo else "")
    rest = d.seconds
    for unit, size in (("d", 86400), ("h", 3600), (minute, 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            out += f"{n}{unit}"
    return out or "0s"


_dur_ser = PlainSerializer(fmt_duration, return_type=str)
_dates_ser = PlainSerializer(lambda v: [x.isoformat() for x in v], return_type=list[str])
Dur = typing.Annotated[Duration, PlainValidator(_duration), _dur_ser]
# keep, min_keep, legal_min_keep: a bare `m` is refused (did you mean months?)
RetentionDur = typing.Annotated[
    Duration,
    PlainValidator(_retention_duration),
    PlainSerializer(lambda d: fmt_duration(d, "min"), return_type=str),
]
FixedDur = typing.Annotated[Duration, PlainValidator(_duration), AfterValidator(_fixed), _dur_ser]
Text = typing.Annotated[str, BeforeValidator(_text)]
Bool = typing.Annotated[bool, PlainValidator(_bool)]
Fraction = typing.Annotated[float, PlainValidator(_fraction)]
Level = typing.Annotated[
    int,
    PlainValidator(_int),
    AfterValidator(_int_between(1, 2, "write 1 (internal cameras) or 2 (also perimeter)")),
]
Crf = typing.Annotated[int, PlainValidator(_int), AfterValidator(_int_between(0, 51))]
Zone = typing.Annotated[str, BeforeValidator(_zone)]
AbsPath = typing.Annotated[str, BeforeValidator(_abs_path)]
SiteId = typing.Annotated[
    str, BeforeValidator(_matching(_ID, "site id (letters, digits, '.', '_', '-'; at most 64)"))
]
CameraId = typing.Annotated[
    str, BeforeValidator(_matching(_ID, "camera id (letters, digits, '.', '_', '-'; at most 64)"))
]
Role = typing.Annotated[
    str, BeforeValidator(_matching(_ROLE, "role name (a letter, then letters, digits, '_', '-')"))
]
UnixName = typing.Annotated[str, BeforeValidator(_matching(_UNIX_NAME, "user or group name"))]
ProfileName = typing.Annotated[str, BeforeValidator(_profile)]
Extension = typing.Annotated[str, BeforeValidator(_extension)]
Hours = typing.Annotated[str, BeforeValidator(_hours)]


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Guards(_Strict):
    max_delete_fraction: Fraction = 0.2
    max_clock_jump: FixedDur = Duration.parse("1d")
    # a segment whose path time and mtime disagree by more than this is reported (clock_skew);
    # see policy.skew for the exact band
    max_clock_skew: FixedDur = Duration.parse("1h")


class Disk(_Strict):
    min_free: Fraction = 0.1
    action: typing.Annotated[str, BeforeValidator(_one_of("alert", "overwrite-oldest"))] = "alert"


class SiteApproval(_Strict):
    """Per-site overrides of the approval rules (unset = the global ``approval:`` value)."""

    steps: (
        typing.Annotated[list[Role], AfterValidator(_non_empty("list at least one approver role"))]
        | None
    ) = None
    hours: Hours | None = None


class Site(_Strict):
    profile: ProfileName | None = None
    keep: RetentionDur | None = None  # ceiling; overrides the profile's
    min_keep: RetentionDur | None = None  # floor; overrides the profile's
    roots: typing.Annotated[
        list[AbsPath], AfterValidator(_non_empty("list the recording directories"))
    ]
    layout: Text | None = None
    layout_timezone: Zone | None = None
    timezone: Zone | None = None
    extensions: typing.Annotated[list[Extension], AfterValidator(_unique_extensions)] = Field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS)
    )
    approval: SiteApproval | None = None
    # false: the scanner and the purge stay on each root's file system; a directory mounted
    # below a root (a bind mount, another disk) is skipped and reported (mount_skipped)
    cross_mounts: Bool = False


class Camera(_Strict):
    # Unlisted level = 2: a camera nobody classified needs the wider permission (fail closed).
    level: Level = 2
    name: Text | None = None


class User(_Strict):
    roles: list[Role] = Field(default_factory=list)
    level: Level = 1  # least privilege: internal cameras only unless raised


class Group(_Strict):
    roles: list[Role] = Field(default_factory=list)


class People(_Strict):
    users: dict[UnixName, User] = Field(default_factory=dict)
    groups: dict[UnixName, Group] = Field(default_factory=dict)


class Emergency(_Strict):
    roles: list[Role] = Field(default_factory=list)  # nobody, unless the admin names a role
    backfill_within: FixedDur = Duration.parse("24h")


def _valid_for(d: Duration) -> Duration:
    if d.approx_seconds() > MAX_VALID_FOR.approx_seconds():
        raise ValueError(
            f"{fmt_duration(d)} is longer than the 30 days an approval may stay valid; "
            "write at most 30d"
        )
    return d


class Approval(_Strict):
    steps: typing.Annotated[
        list[Role], AfterValidator(_non_empty("list at least one approver role"))
    ] = Field(default_factory=lambda: ["dept_manager", "security_lead"])
    decide_within: typing.Annotated[int, PlainValidator(_decide_within)] = 3
    valid_for: typing.Annotated[
        Duration, PlainValidator(_duration), AfterValidator(_valid_for), _dur_ser
    ] = Duration.parse("30d")
    hours: Hours = "08:00-20:00"
    after_hours_role: Role = "duty_manager"
    # how long an after-hours approval covers exports after it was given
    after_hours_valid: FixedDur = Duration.parse("12h")
    # separation of duties: whoever approved a request may not also export it unless this is true
    approver_may_export: Bool = False
    emergency: Emergency = Field(default_factory=Emergency)
    max_range: FixedDur = Duration.parse("24h")
    holidays: typing.Annotated[list[date], PlainValidator(_dates), _dates_ser] = Field(
        default_factory=list
    )
    workdays: typing.Annotated[list[date], PlainValidator(_dates), _dates_ser] = Field(
        default_factory=list
    )

    def hours_window(self) -> tuple[int, int]:
        """(start, end) in minutes after local midnight."""
        return _window(self.hours)


def _window(hours: str) -> tuple[int, int]:
    h0, m0, h1, m1 = (int(x) for x in _HOURS.fullmatch(hours).groups())  # type: ignore[union-attr]
    return h0 * 60 + m0, h1 * 60 + m1


class Export(_Strict):
    targets: list[AbsPath] = Field(default_factory=list)
    watermark: typing.Annotated[str, BeforeValidator(_template)] = DEFAULT_WATERMARK
    font: Text | None = None  # a font file path or a fontconfig family; None = find a CJK font
    crf: Crf = 23
    preset: typing.Annotated[str, BeforeValidator(_one_of(*X264_PRESETS))] = "medium"
    signing_key: AbsPath | None = None  # None = <state_dir>/export-key.pem
    # a request's footage stays held this long after its export (complaints, second copies)
    preserve: FixedDur = Duration.parse("30d")
    # the held range extends this far on both sides of the requested one (camera clock skew)
    hold_margin: FixedDur = Duration.parse("10m")
    timeout: FixedDur = Duration.parse("1h")  # per clip; a longer ffmpeg run is stopped


class Media(_Strict):
    scanner: typing.Annotated[str, BeforeValidator(_one_of("auto", "clamd", "clamscan"))] = "auto"
    scan_max_age: FixedDur = Duration.parse("15m")
    require_enrolled: Bool = True
    # local ClamAV signature directory for clamscan (default: freshclam's DatabaseDirectory);
    # air-gapped recorders point it at the copied daily/main .cvd files
    database: AbsPath | None = None
    clamd_socket: AbsPath | None = None  # default: LocalSocket from /etc/clamav/clamd.conf
    clamd_config: AbsPath | None = None  # default: /etc/clamav/clamd.conf
    sysfs_root: AbsPath = "/sys"  # where removable devices are read from (a testing aid)
    reserve: typing.Annotated[int, PlainValidator(_int)] = 64 * 2**20  # bytes left free on media
    # "wipe": `media wipe` may format a medium (mkfs.vfat) instead of scanning old contents
    prepare: typing.Annotated[str, BeforeValidator(_one_of("scan", "wipe"))] = "scan"


def _listen(v: object) -> str:
    """``HOST:PORT`` of the metrics endpoint, on a loopback address only: the figures (cameras,
    requests, violations) are not for the network. A literal address, not a name, because what
    ``localhost`` resolves to is up to the resolver at start time."""
    s = _need_text(v, "an address such as 127.0.0.1:9713").strip()
    m = re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", s)
    if m is None:
        raise ValueError(
            f"{s!r} is not HOST:PORT; write a loopback address and a port, "
            "e.g. 127.0.0.1:9713 or [::1]:9713"
        )
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (names are not resolved); write e.g. 127.0.0.1:{port}"
        ) from None
    if not addr.is_loopback:
        raise ValueError(
            f"{host} is not a loopback address: metrics are served on this host only; "
            "write 127.0.0.1:9713, or use metrics.textfile with node_exporter"
        )
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range; write a port from 1 to 65535")
    return s


class Metrics(_Strict):
    """Prometheus metrics: a node_exporter textfile and/or an HTTP endpoint on loopback."""

    textfile: AbsPath | None = None  # rewritten atomically after each sweep, rescan, request check
    listen: typing.Annotated[str, BeforeValidator(_listen)] | None = None


class Config(_Strict):
    state_dir: AbsPath = "/var/lib/nvr-guard"
    timezone: Zone = "Asia/Shanghai"
    settle: FixedDur = Duration.parse("2m")
    socket: AbsPath = "/run/nvr-guard/control.sock"
    socket_group: UnixName = "nvr-guard"
    sweep_every: FixedDur = Duration.parse("5m")
    rescan_every: FixedDur = Duration.parse("1h")
    # declared legal minimum; `config check` warns below it
    legal_min_keep: RetentionDur | None = None
    guards: Guards = Field(default_factory=Guards)
    disk: Disk = Field(default_factory=Disk)
    sites: typing.Annotated[dict[SiteId, Site], BeforeValidator(_sites_present)]
    cameras: dict[CameraId, Camera] = Field(default_factory=dict)
    people: People = Field(default_factory=People)
    approval: Approval = Field(default_factory=Approval)
    export: Export = Field(default_factory=Export)
    media: Media = Field(default_factory=Media)
    metrics: Metrics = Field(default_factory=Metrics)

    _source_path: Path = PrivateAttr(default=Path("<memory>"))
    _digest: str = PrivateAttr(default="")
    _warnings: list[Problem] = PrivateAttr(default_factory=list)
    _layouts: dict[str, Layout | None] = PrivateAttr(default_factory=dict)
    _lines: dict[Path_, _Where] = PrivateAttr(default_factory=dict)

    @property
    def source_path(self) -> Path:
        return self._source_path

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the file's bytes: what the audit log records on load and reload."""
        return self._digest

    def line_of(self, path: tuple[Any, ...]) -> int:
        """The line of a key in the file (``("sites", "gate")``), for checks made after loading
        (those that need the state: a reload that would orphan a hold)."""
        return _Lines(self._lines).at(path, True)

    @property
    def warnings(self) -> list[Problem]:
        """What ``config check`` warns about; the daemon logs these on load."""
        return list(self._warnings)

    @cached_property
    def tz(self) -> ZoneInfo:
        """The default timezone (top-level ``timezone``)."""
        return ZoneInfo(self.timezone)

    def site_tz(self, site: str) -> ZoneInfo:
        """The site's own zone: where its months and years are counted and its hours apply."""
        return ZoneInfo(self.sites[site].timezone or self.timezone)

    def resolved_keep(self, site: str) -> tuple[Duration | None, Duration | None]:
        """(keep, min_keep) after profile + overrides; the override wins."""
        return _resolve(self.sites[site])

    def site_rules(self) -> dict[str, SiteRules]:
        out: dict[str, SiteRules] = {}
        for name, s in self.sites.items():
            keep, min_keep = _resolve(s)
            out[name] = SiteRules(
                site=name,
                keep=keep,
                min_keep=min_keep,
                tz=self.site_tz(name),
                settle=float(self.settle.seconds),
                min_free=self.disk.min_free,
                disk_action=self.disk.action,
                profile=s.profile,
            )
        return out

    def guard_rules(self) -> GuardRules:
        return GuardRules(
            max_delete_fraction=self.guards.max_delete_fraction,
            max_clock_jump=float(self.guards.max_clock_jump.seconds),
            max_clock_skew=float(self.guards.max_clock_skew.seconds),
        )

    def layout_timezone(self, site: str) -> ZoneInfo:
        s = self.sites[site]
        return ZoneInfo(s.layout_timezone) if s.layout_timezone else self.site_tz(site)

    def layout_for(self, site: str) -> Layout | None:
        """The site's compiled path pattern (dates read in ``layout_timezone``), or None: mtime."""
        if site not in self._layouts:
            pattern = self.sites[site].layout
            self._layouts[site] = (
                Layout.compile(pattern, self.layout_timezone(site)) if pattern else None
            )
        return self._layouts[site]

    def extensions_for(self, site: str) -> frozenset[str]:
        """Lower-case; compare with the lower-cased suffix of a file name."""
        return frozenset(e.lower() for e in self.sites[site].extensions)

    def approval_for(self, site: str) -> tuple[list[str], str]:
        """(steps, hours) of a site: its own override, else the global ones."""
        own = self.sites[site].approval
        steps = own.steps if own and own.steps is not None else self.approval.steps
        hours = own.hours if own and own.hours is not None else self.approval.hours
        return list(steps), hours

    def signing_key_path(self) -> str:
        return self.export.signing_key or posixpath.join(self.state_dir, "export-key.pem")

    def effective(self) -> dict[str, Any]:
        """The config as the daemon applies it: defaults filled in, profiles resolved, durations as
        strings. Plain JSON/YAML types only; fed back in as a config it gives the same result."""
        data = self.model_dump(mode="json")
        data["approval"]["decide_within"] = f"{self.approval.decide_within} working days"
        data["guards"]["max_delete_fraction"] = _pct(self.guards.max_delete_fraction)
        data["disk"]["min_free"] = _pct(self.disk.min_free)
        data["export"]["signing_key"] = self.signing_key_path()
        for name, site in data["sites"].items():
            keep, min_keep = self.resolved_keep(name)
            site["keep"] = fmt_duration(keep, "min") if keep else None
            site["min_keep"] = fmt_duration(min_keep, "min") if min_keep else None
            site["timezone"] = self.sites[name].timezone or self.timezone
            site["layout_timezone"] = (
                (self.sites[name].layout_timezone or site["timezone"]) if site["layout"] else None
            )
            steps, hours = self.approval_for(name)
            site["approval"] = {"steps": steps, "hours": hours}
        return data


def _pct(f: float) -> str:
    return f"{round(f * 100, 6):g}%"


def _resolve(s: Site) -> tuple[Duration | None, Duration | None]:
    p = PROFILES.get(s.profile) if s.profile else None
    keep = s.keep if s.keep is not None else (p.keep if p else None)
    min_keep = s.min_keep if s.min_keep is not None else (p.min_keep if p else None)
    return keep, min_keep


# ---- mapping pydantic errors back to lines ----------------------------------------------------
def _unwrap(t: Any) -> Any:
    while True:
        origin = typing.get_origin(t)
        if origin is typing.Annotated:
            t = typing.get_args(t)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            t = args[0] if len(args) == 1 else t
            if len(args) != 1:
                return t
        else:
            return t


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping that holds ``loc[-1]`` (for "did you mean")."""
    t: Any = Config
    for el in loc[:-1]:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            f = t.model_fields.get(str(el))
            if f is None:
                return []
            t = f.annotation
        elif typing.get_origin(t) in (dict, list):
            t = typing.get_args(t)[-1]
        else:
            return []
    t = _unwrap(t)
    return list(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else []


class _Lines:
    def __init__(self, lines: dict[Path_, _Where]) -> None:
        self.lines = lines

    def at(self, path: tuple[Any, ...], key: bool = False) -> int:
        """Line of ``path``: its value (scalars) or key; else the nearest enclosing key."""
        p = tuple(path)
        if p in self.lines:
            w = self.lines[p]
            return w.value_line if (w.scalar and not key) else w.key_line
        while p:
            p = p[:-1]
            if p in self.lines:
                return self.lines[p].key_line
        return 1


_MISSING_HINTS = {
    "roots": "; list the site's recording directories, e.g. roots: [/srv/recordings/gate]",
    "sites": "; add a sites: section with at least one site (see config/example.yaml)",
}


def _message(err: Any) -> tuple[tuple[Any, ...], bool, str]:
    """(path, about_the_key, one-line message) of one pydantic error."""
    loc = tuple(err["loc"])
    kind = err["type"]
    if "[key]" in loc:  # an invalid mapping key (site id, user name): pydantic marks it so
        i = loc.index("[key]")
        path = loc[:i]
        msg = err["msg"].removeprefix("Value error, ")
        return path, True, f"{_dotted(path)}: {msg}"
    path = loc
    where = _dotted(path)
    if kind == "extra_forbidden":
        known = _known_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return path, True, f"{where}: unknown key; {hint}known keys here: {', '.join(known)}"
    if kind == "missing":
        hint = _MISSING_HINTS.get(str(loc[-1]), "")
        return path, True, f"{where}: required key missing{hint}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return (
            path,
            False,
            f"{where}: expected a mapping (key: value lines), got {_desc(err['input'])}",
        )
    if kind in ("list_type", "tuple_type", "set_type"):
        return path, False, f"{where}: expected a list such as [a, b], got {_desc(err['input'])}"
    if kind == "string_type":
        return path, False, f"{where}: expected text, got {_desc(err['input'])}"
    msg = err["msg"].removeprefix("Value error, ")
    return path, False, f"{where}: {msg}"


# ---- checks that span fields, and the entry points ----------------------------------------------
def _site_checks(
    name: str, site: Site, zone: str, legal_min: Duration | None, problem: Any, warn: Any
) -> None:
    base = ("sites", name)
    if site.profile is None and site.keep is None:
        problem(
            base,
            True,
            f"sites.{name}: set profile: ({', '.join(PROFILES)}) or keep: (e.g. 30d); "
            "without either there is no retention rule",
        )
        return
    keep, min_keep = _resolve(site)
    if (
        keep is not None
        and min_keep is not None
        and keep.approx_seconds() < min_keep.approx_seconds()
    ):
        # Point at whichever of the two the admin wrote (both, if both: keep is the usual slip).
        key = "keep" if site.keep is not None else "min_keep"

        def origin(k: str, v: Duration) -> str:
            own = getattr(site, k) is not None
            return f"{k} {fmt_duration(v)}" + ("" if own else f" (from profile {site.profile})")

        problem(
            base + (key,),
            False,
            f"sites.{name}.{key}: {origin('keep', keep)} is shorter than "
            f"{origin('min_keep', min_keep)}; "
            "the ceiling must not be below the floor",
        )
    if legal_min is not None and keep is not None:
        where = base + ("keep",) if site.keep is not None else (base + ("profile",))
        if keep.approx_seconds() < legal_min.approx_seconds():
            warn(
                where,
                f"sites.{name}: keep {fmt_duration(keep)} is below the legal minimum "
                f"legal_min_keep {fmt_duration(legal_min)}; "
                "footage would be deleted earlier than the law requires",
            )
        elif min_keep is None or min_keep.approx_seconds() < legal_min.approx_seconds():
            warn(
                base + ("min_keep",) if site.min_keep is not None else base,
                f"sites.{name}: floor min_keep {fmt_duration(min_keep) if min_keep else 'none'} "
                f"is below legal_min_keep {fmt_duration(legal_min)}; "
                "disk pressure could delete younger footage: "
                f"set min_keep: {fmt_duration(legal_min)}",
            )
    if site.layout is None and site.layout_timezone is not None:
        warn(
            base + ("layout_timezone",),
            f"sites.{name}.layout_timezone: has no effect without layout:",
        )
    if site.layout is not None:
        tz = ZoneInfo(site.layout_timezone or site.timezone or zone)
        try:
            Layout.compile(site.layout, tz)
        except ValueError as e:
            problem(base + ("layout",), False, f"sites.{name}.layout: {e}")
        else:
            if any(part.startswith(".") for part in site.layout.split("/")):
                problem(
                    base + ("layout",),
                    False,
                    f"sites.{name}.layout: a path component starts with '.'; hidden files and "
                    "directories are never segments (recorders write their temporaries so)",
                )


def _root_checks(sites: list[tuple[str, Site]], lines: _Lines, problem: Any) -> None:
    """Roots exist, are not symlinks, and no two of them share footage.

    Two roots share footage when one is the other, or lies inside it, *on the file system*: a
    bind mount (``mount --bind /srv/school /srv/highway``) makes a second name for a directory
    that ``realpath`` cannot see through, and a school root (1 y) configured again as a highway
    root (15 d) would lose its footage after 15 days. So identity is (st_dev, st_ino), and
    nesting is judged by where each root lies inside its file system (the mount table's device
    and path). A site with ``cross_mounts: true`` also owns the trees mounted below its roots."""
    table = mounts()
    # (site, index, root, (st_dev, st_ino), regions: [(device, path in fs)])
    seen: list[tuple[str, int, str, tuple[int, int], list[tuple[str, bytes]]]] = []
    entries = [(n, i, r, s.cross_mounts) for n, s in sites for i, r in enumerate(s.roots)]
    # report each conflict at the later line, naming the earlier root
    entries.sort(key=lambda e: lines.at(("sites", e[0], "roots", e[1])))
    for name, i, root, cross in entries:
        path = ("sites", name, "roots", i)
        where = _dotted(path)
        if root == "/":
            problem(path, False, f"{where}: the whole file system cannot be a recording root")
            continue
        if os.path.islink(root.rstrip("/") or "/"):
            # the purge opens a root with O_NOFOLLOW (a symlink swapped in must not redirect
            # deletions), so a symlinked root could never be purged; refused here, by name,
            # rather than footage silently kept forever
            problem(
                path,
                False,
                f"{where}: {root} is a symlink (to {os.readlink(root.rstrip('/'))}); "
                f"write the directory itself ({os.path.realpath(root)}): nvr-guard never "
                "follows a symlink to find or delete footage",
            )
        if not os.path.isdir(root):
            what = "is not a directory" if os.path.exists(root) else "does not exist"
            problem(
                path,
                False,
                f"{where}: {root} {what}; "
                "create it or fix the path (roots must be existing directories)",
            )
            continue
        st = os.stat(root)
        ident = (st.st_dev, st.st_ino)
        here = fs_location(root, table)
        regions = [here if here is not None else ("path", os.fsencode(os.path.realpath(root)))]
        if cross:
            regions += [(m.device, m.fs_root) for m in _mounts_below(root, table)]
        for oname, oi, oroot, oident, oregions in seen:
            other = _dotted(("sites", oname, "roots", oi))
            if ident == oident:
                problem(
                    path,
                    False,
                    f"{where}: {root} is the same directory as {other} ({oroot}); "
                    "each root belongs to one site, once",
                )
                break
            nest = _nesting(regions, oregions)
            if nest:
                inner, outer = (root, oroot) if nest == "inner" else (oroot, root)
                problem(
                    path,
                    False,
                    f"{where}: {root} overlaps {other} ({oroot}): {inner} is inside {outer} "
                    "(on the file system: bind mounts and symlinks count); "
                    "roots must not nest, or one site's rule would delete another's footage",
                )
                break
        seen.append((name, i, root, ident, regions))


def _mounts_below(root: str, table: list[Mount]) -> list[Mount]:
    below = mount_points_below(os.fsencode(root), table)
    real = os.fsencode(os.path.realpath(root)).rstrip(b"/")
    spelled = {real + p[len(os.fsencode(root)) :] for p in below}
    return [m for m in table if m.mount_point in spelled]


def _nesting(mine: list[tuple[str, bytes]], theirs: list[tuple[str, bytes]]) -> str:
    """ "inner" when one of ``mine`` lies in one of ``theirs``, "outer" for the reverse, else ""."""

    def under(a: bytes, b: bytes) -> bool:
        return a == b or b == b"/" or a.startswith(b.rstrip(b"/") + b"/")

    for dev, p in mine:
        for odev, op in theirs:
            if dev != odev:
                continue
            if under(p, op):
                return "inner"
            if under(op, p):
                return "outer"
    return ""


DAEMON_USER = "nvr-guard"  # the systemd unit's User= (systemd/nvr-guard.service)


def _daemon_uid(cfg: Config) -> tuple[int, str]:
    """(uid, name) of the user the daemon runs as, as far as a config check can tell: the owner
    of ``state_dir`` (the daemon creates it, systemd's StateDirectory= hands it to User=); before
    it exists, the ``nvr-guard`` system user; without one, whoever runs the check."""
    import pwd

    try:
        uid = os.stat(cfg.state_dir).st_uid
    except OSError:
        try:
            pw = pwd.getpwnam(DAEMON_USER)
            return pw.pw_uid, pw.pw_name
        except KeyError:
            uid = os.geteuid()
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, f"uid {uid}"


def _signing_key_checks(cfg: Config, problem: Any) -> None:
    """A configured ``export.signing_key`` must be the daemon's alone: a file owned by the daemon
    user (0600, not a link) in directories that only it or root can write. Whoever can replace
    the key, or the directory entry that names it, can sign forged packages with the recorder's
    name — or swap in their own key before the fingerprint is put on record."""
    import stat

    path = cfg.export.signing_key
    if not path:
        return
    where = ("export", "signing_key")
    uid, user = _daemon_uid(cfg)
    trusted = {0, uid}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        problem(where, False, f"export.signing_key: cannot inspect {path}: {e.strerror}")
        return
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            problem(where, False, f"export.signing_key: {path} is a symbolic link; name the file")
            return
        if not stat.S_ISREG(st.st_mode):
            problem(where, False, f"export.signing_key: {path} is not a regular file")
            return
        if st.st_uid != uid:
            problem(
                where,
                False,
                f"export.signing_key: {path} is owned by uid {st.st_uid}, not by the daemon "
                f"user {user}; chown {user} {path}",
            )
        if st.st_mode & 0o077:
            problem(
                where,
                False,
                f"export.signing_key: {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"it must be 0600 (chmod 600 {path})",
            )
    d = os.path.dirname(path)
    while True:
        try:
            dst = os.stat(d)
        except FileNotFoundError:
            if os.path.normpath(d) == os.path.normpath(cfg.state_dir):
                d = os.path.dirname(d)  # the daemon creates it (0750) at its first start
                continue
            problem(
                where,
                False,
                f"export.signing_key: directory {d} does not exist; create it owned by {user} "
                "with mode 0700",
            )
            return
        except OSError as e:
            problem(where, False, f"export.signing_key: cannot inspect {d}: {e.strerror}")
            return
        # a sticky world-writable directory (/tmp) lets nobody else rename our entry in it
        others_write = dst.st_mode & 0o022 and not (
            d != os.path.dirname(path) and dst.st_mode & stat.S_ISVTX
        )
        if dst.st_uid not in trusted or others_write:
            who = (
                f"owned by uid {dst.st_uid}"
                if dst.st_uid not in trusted
                else f"writable by group or others (mode {stat.S_IMODE(dst.st_mode):04o})"
            )
            problem(
                where,
                False,
                f"export.signing_key: directory {d} is {who}: someone other than "
                f"{'root' if user == 'root' else user + ' or root'} could replace the key; keep "
                "it in a directory only they can write",
            )
            return
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    # the same for the real path (links resolved) and the links on the way: a link into a
    # directory another user owns lets them swap the key under the running daemon
    from nvr_guard.export.keys import key_location_problem

    why = key_location_problem(path, trusted)
    if why is not None:
        problem(where, False, f"export.signing_key: {why}")


def _people_warnings(cfg: Config, warn: Any) -> None:
    if not cfg.people.users and not cfg.people.groups:
        return  # no people at all: exports are not set up on this host, nothing half-configured
    held = {r for u in cfg.people.users.values() for r in u.roles}
    held |= {r for g in cfg.people.groups.values() for r in g.roles}
    needed: list[tuple[tuple[Any, ...], list[str]]] = [(("approval", "steps"), cfg.approval.steps)]
    for name, s in cfg.sites.items():
        if s.approval and s.approval.steps:
            needed.append((("sites", name, "approval", "steps"), s.approval.steps))
    for path, steps in needed:
        missing = [r for r in dict.fromkeys(steps) if r not in held]
        if missing:
            warn(
                path,
                f"{_dotted(path)}: no user or group has role "
                f"{', '.join(repr(r) for r in missing)}; such requests cannot be approved",
            )


def _font_check(cfg: Config, problem: Any) -> None:
    """export.font must draw the watermark: Chinese coverage and every character the template
    writes (a font without them renders empty boxes in the evidence)."""
    spec = cfg.export.font
    if not spec:
        return  # the first installed font covering Chinese is chosen at export time
    from nvr_guard.errors import NvrGuardError
    from nvr_guard.export import fonts

    try:
        path = fonts.resolve_font(spec)
    except NvrGuardError as e:
        problem(("export", "font"), False, str(e))
        return
    literal = "".join(lit for lit, *_ in string.Formatter().parse(cfg.export.watermark))
    why = fonts.coverage_problem(path, literal)
    if why is not None:
        problem(("export", "font"), False, f"export.font: {why}")


def _check_data(
    raw: Any, lines: _Lines, source: str
) -> tuple[Config | None, list[Problem], list[Problem]]:
    errors: list[Problem] = []
    warnings: list[Problem] = []

    def problem(path: tuple[Any, ...], key: bool, msg: str) -> None:
        errors.append((source, lines.at(path, key), msg))

    def warn(path: tuple[Any, ...], msg: str) -> None:
        warnings.append((source, lines.at(path, True), msg))

    cfg: Config | None = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            path, key, msg = _message(err)
            problem(path, key, msg)

    # Cross-field checks on whatever validated: the whole config, or else each site on its own,
    # so a typo in one section does not hide a root conflict in another.
    if cfg is not None:
        sites = list(cfg.sites.items())
        zone, legal_min = cfg.timezone, cfg.legal_min_keep
    else:
        sites = []
        raw_sites = raw.get("sites") if isinstance(raw, dict) else None
        for name, rs in (raw_sites or {}).items() if isinstance(raw_sites, dict) else ():
            try:
                if _ID.fullmatch(name):
                    sites.append((name, Site.model_validate(rs)))
            except ValidationError:
                pass
        zone, legal_min = "UTC", None
        try:
            zone = _zone(raw.get("timezone", "Asia/Shanghai"))
            lm = raw.get("legal_min_keep")
            legal_min = _retention_duration(lm) if lm is not None else None
        except (ValueError, AttributeError):
            pass
    for name, site in sites:
        _site_checks(name, site, zone, legal_min, problem, warn)
    _root_checks(sites, lines, problem)
    if cfg is not None:
        _people_warnings(cfg, warn)
        _font_check(cfg, problem)
        _signing_key_checks(cfg, problem)
        for i, t in enumerate(cfg.export.targets):
            if not os.path.isdir(t):
                warn(
                    ("export", "targets", i),
                    f"export.targets[{i}]: {t} is not an existing directory (yet)",
                )

    errors.sort(key=lambda p: p[1])
    warnings.sort(key=lambda p: p[1])
    return (cfg if not errors else None), errors, warnings


def parse_config(data: bytes, source: str) -> tuple[Config | None, list[Problem], list[Problem]]:
    """Validate config bytes; ``source`` names the file in messages. See :func:`check_config`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return (
            None,
            [
                (
                    source,
                    line,
                    f"not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8",
                )
            ],
            [],
        )
    try:
        loader = StrictLoader(text, source)
    except yaml.reader.ReaderError as e:
        # PyYAML checks the whole text for control characters up front, before any mark exists
        line = text[: e.position].count("\n") + 1
        return (
            None,
            [(source, line, f"character U+{e.character:04X} is not allowed in YAML; remove it")],
            [],
        )
    try:
        raw, empty = loader.load_tracked()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(x for x in (e.context, e.problem) if x)
        return None, [(source, line, f"YAML syntax error: {what}")], []
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML parse error is marked
        return None, [(source, 1, f"YAML error: {e}")], []
    except RecursionError:
        # PyYAML parses nested collections recursively: ``[[[[...`` thousands deep
        return (
            None,
            [(source, loader.line + 1, "nested too deeply; a config needs a few levels")],
            [],
        )
    if empty:
        return None, [(source, 1, "the file is empty; it needs at least a sites: section")], []
    if not isinstance(raw, dict):
        return (
            None,
            [
                (
                    source,
                    1,
                    "the top level must be a mapping of keys (state_dir:, sites:, ...), "
                    f"got {_desc(raw)}",
                )
            ],
            [],
        )
    cfg, errors, warnings = _check_data(raw, _Lines(loader.lines), source)
    errors = sorted(loader.problems + errors, key=lambda p: p[1])
    if errors:
        return None, errors, warnings
    assert cfg is not None
    cfg._digest = hashlib.sha256(data).hexdigest()
    cfg._warnings = warnings
    cfg._lines = loader.lines
    return cfg, [], warnings


def check_config(
    path: str | os.PathLike[str],
) -> tuple[Config | None, list[Problem], list[Problem]]:
    """(config or None, errors, warnings) for ``nvr-guard config check``; never raises."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return (
            None,
            [
                (
                    source,
                    0,
                    "no such file; create it (see config/example.yaml) or pass --config PATH",
                )
            ],
            [],
        )
    except IsADirectoryError:
        return None, [(source, 0, "is a directory; pass the config file itself")], []
    except OSError as e:
        return None, [(source, 0, f"cannot read: {e.strerror or e}")], []
    cfg, errors, warnings = parse_config(data, source)
    if cfg is not None:
        cfg._source_path = Path(os.path.abspath(path))
    return cfg, errors, warnings


def load_config(path: str | os.PathLike[str]) -> Config:
    """The validated config; raises :class:`ConfigError` with every (file, line, message)."""
    cfg, errors, _warnings = check_config(path)
    if cfg is None:
        raise ConfigError(errors)
    return cfg


__all__ = [
    "PROFILES",
    "Config",
    "Profile",
    "StrictLoader",
    "check_config",
    "load_config",
    "parse_config",
]
