"""The config's value types: each field's explicit conversion from the text the admin wrote.

The YAML reader (``loader.py``) hands over every plain scalar as text; the types here decide what
it means, and refuse what a YAML 1.1 tool would have read differently (``no`` as false, ``010`` as
octal 8, ``1:30`` as 90) with a message that says what the admin most likely meant and what to
write instead. A guess here would be a retention rule nobody wrote.

The ``Annotated`` aliases at the end (``RetentionDur``, ``FixedDur``, ``AbsPath``, ``Role`` ...) are
what ``models.py`` declares its fields with; pydantic runs the converter and reports its
``ValueError`` at the value's line.
"""

from __future__ import annotations

import difflib
import ipaddress
import posixpath
import re
import string
import typing
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, PlainValidator

from nvr_guard.config.loader import Plain, describe
from nvr_guard.config.profiles import MAX_VALID_FOR, PROFILES
from nvr_guard.errors import InvalidInput
from nvr_guard.export.zones import Zone as PrivacyZone
from nvr_guard.export.zones import zones_from
from nvr_guard.text import DURATION_HINT, Duration, fmt_duration, parse_fraction

_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n", "true", "false"}
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_UNIX_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}\$?")
_EXT = re.compile(r"\.[A-Za-z0-9_-]{1,15}")
_DEC_INT = re.compile(r"[-+]?[0-9]+")
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_WORKING_DAYS = re.compile(r"([0-9]+)\s+working\s+days?", re.I)


def need_text(v: object, what: str) -> str:
    """``v`` as text, else a ValueError that names ``what`` was expected."""
    if isinstance(v, str):
        return str(v)
    if v is None:
        raise ValueError(f"empty value; {what}")
    raise ValueError(f"expected {what}, got {describe(v)}")


def _text(v: object) -> str:
    s = need_text(v, "text")
    if isinstance(v, Plain) and s.lower() in _YAML11_BOOLS:
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
    s = need_text(v, "true or false")
    if s.lower() == "true":
        return True
    if s.lower() == "false":
        return False
    if s.lower() in _YAML11_BOOLS:
        raise ValueError(f"{s!r} is ambiguous (a YAML 1.1 boolean); write true or false")
    raise ValueError(f"expected true or false, got {describe(v)}")


def _int(v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    s = need_text(v, "a whole number").strip()
    if not _DEC_INT.fullmatch(s):
        raise ValueError(f"expected a whole number, got {describe(v)}")
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
        return parse_fraction(v)
    return parse_fraction(need_text(v, "a fraction such as 0.2 or a percentage such as 20%"))


def _duration(v: object, bare_minutes: bool = True) -> Duration:
    if isinstance(v, Duration):
        return v
    if isinstance(v, Plain) and v.lower() in _YAML11_BOOLS:
        raise ValueError(
            f"{str(v)!r} is not a duration (YAML 1.1 would read it as a boolean); {DURATION_HINT}"
        )
    s = need_text(v, f"a duration; {DURATION_HINT}")
    if re.fullmatch(r"[0-9]+(:[0-9]+)+", s.strip()):
        raise ValueError(f"{s!r} is not a duration (YAML 1.1 reads it as base-60); {DURATION_HINT}")
    d = Duration.parse(s, bare_minutes)  # its ValueError already names the format
    if d.is_zero:
        raise ValueError(f"{s!r} is zero; {DURATION_HINT}")
    return d


def retention_duration(v: object) -> Duration:
    """A duration for ``keep``/``min_keep``/``legal_min_keep``: a bare ``m`` is refused."""
    # `keep: 6m` is six months to whoever wrote it: read as minutes it would delete half a
    # year of footage at the next sweep. In retention keys minutes are written `min`.
    d = _duration(v, bare_minutes=False)
    if d.months * 30.4375 * 86400 + d.seconds > MAX_RETENTION_MONTHS * 30.4375 * 86400:
        # past any date a calendar here can write: it crashed every expiry computation
        raise ValueError(
            f"{fmt_duration(d, 'min')} is longer than 100 years; keep footage forever by "
            "leaving keep out"
        )
    return d


MAX_RETENTION_MONTHS = 1200  # 100 years


def _fixed(d: Duration) -> Duration:
    # Intervals and timeouts need a fixed length; a month is 28-31 days depending on when.
    if d.months:
        raise ValueError(
            f"{fmt_duration(d)} uses months or years; write a fixed length such as 30d, 24h or 15m"
        )
    return d


def as_zone(v: object) -> str:
    """An IANA timezone name that exists here, else the closest name as a hint."""
    s = need_text(v, "a timezone name such as Asia/Shanghai or UTC").strip()
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
    s = need_text(v, "an absolute path such as /srv/recordings")
    if not s.startswith("/"):
        raise ValueError(f"{s!r} is a relative path; write an absolute path (starting with /)")
    if any(c == "\0" or not c.isprintable() for c in s):
        raise ValueError(f"{s!r} contains control characters")
    if ".." in s.split("/"):
        raise ValueError(f"{s!r} contains '..'; write the path without it")
    return posixpath.normpath(s) if s != "//" else "/"


def _matching(rx: re.Pattern[str], what: str) -> Any:
    def check(v: object) -> str:
        s = need_text(v, what)
        if not rx.fullmatch(s):
            raise ValueError(f"{s!r} is not a valid {what}")
        return s

    return check


def one_of(*choices: str) -> Any:
    """A validator accepting exactly one of ``choices`` (with a "did you mean")."""

    def check(v: object) -> str:
        s = need_text(v, "one of: " + ", ".join(choices))
        if s not in choices:
            close = difflib.get_close_matches(s, choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{s!r} is not one of: {', '.join(choices)}{hint}")
        return s

    return check


def _profile(v: object) -> str:
    s = need_text(v, "a profile name")
    if s not in PROFILES:
        close = difflib.get_close_matches(s, list(PROFILES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown profile {s!r}; {hint}profiles: {', '.join(PROFILES)}")
    return s


def _extension(v: object) -> str:
    s = need_text(v, "a file extension such as .mp4")
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


def _camera_pattern(v: object) -> str:
    s = need_text(v, "a camera id or a glob such as front* or ch0?")
    if not s.strip():
        raise ValueError("empty camera pattern; write a camera id or a glob such as front*")
    if "/" in s:
        raise ValueError(f"{s!r} contains '/'; a pattern matches one camera id, never a path")
    if any(c == "\0" or not c.isprintable() for c in s):
        raise ValueError(f"{s!r} contains control characters")
    return s


def non_empty(what: str) -> Any:
    """A validator refusing an empty list; ``what`` says what to list."""

    def check(v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError(f"empty list; {what}")
        return v

    return check


def _hours(v: object) -> str:
    s = need_text(v, 'a time window such as "08:00-20:00"').strip()
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
        s = need_text(v, "a number of working days, e.g. 3 working days").strip()
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
            "expected a list of dates such as [2026-10-01, 2026-10-02..2026-10-07], "
            f"got {describe(v)}"
        )
    out: list[date] = []
    for item in v:
        s = need_text(item, "a date such as 2026-10-01").strip()
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


def sites_present(v: object) -> object:
    """The ``sites:`` section, refused when missing or empty."""
    if v is None or v == {}:
        raise ValueError("no sites; add at least one site with roots: and profile: or keep:")
    return v


def _valid_for(d: Duration) -> Duration:
    if d.approx_seconds() > MAX_VALID_FOR.approx_seconds():
        raise ValueError(
            f"{fmt_duration(d)} is longer than the 30 days an approval may stay valid; "
            "write at most 30d"
        )
    return d


def hours_window(hours: str) -> tuple[int, int]:
    """(start, end) of an ``HH:MM-HH:MM`` window checked by :data:`Hours`, in minutes after
    midnight."""
    h0, m0, h1, m1 = (int(x) for x in _HOURS.fullmatch(hours).groups())  # type: ignore[union-attr]
    return h0 * 60 + m0, h1 * 60 + m1


def _listen(v: object) -> str:
    """``HOST:PORT`` of the metrics endpoint, on a loopback address only: the figures (cameras,
    requests, violations) are not for the network. A literal address, not a name, because what
    ``localhost`` resolves to is up to the resolver at start time."""
    s = need_text(v, "an address such as 127.0.0.1:9713").strip()
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


def _web_listen(v: object) -> str:
    """``HOST:PORT`` the web console listens on: a literal address (any, loopback or one of the
    host's), since names are resolved by whoever reads them at start time. Whether plain HTTP
    is allowed there is checked with the TLS keys (:class:`~nvr_guard.config.models.Web`)."""
    s = need_text(v, "an address such as 0.0.0.0:8443").strip()
    m = re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", s)
    if m is None:
        raise ValueError(f"{s!r} is not HOST:PORT; write e.g. 0.0.0.0:8443 or 127.0.0.1:8080")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (names are not resolved); write e.g. 0.0.0.0:{port}"
        ) from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range; write a port from 1 to 65535")
    return s


def listen_parts(listen: str) -> tuple[str, int]:
    """(host, port) of a ``HOST:PORT`` checked by :data:`Listen` or :data:`WebListen`."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    return ipaddress.ip_address(host).is_loopback


def _http_url(v: object) -> str:
    """An http(s) URL (webhooks, the console's address in notifications)."""
    s = need_text(v, "a URL such as https://nvr.example/").strip()
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s]*)?", s):
        raise ValueError(f"{s!r} is not an http:// or https:// URL")
    return s


def _email(v: object) -> str:
    s = need_text(v, "an e-mail address").strip()
    if not re.fullmatch(r"[^@\s<>\"',;]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", s) or len(s) > 254:
        raise ValueError(f"{s!r} is not an e-mail address (name@example.org)")
    return s


def _hostname(v: object) -> str:
    s = need_text(v, "a host name or address").strip()
    if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", s):
        raise ValueError(f"{s!r} is not a host name or IP address")
    return s


def _privacy_zones(v: object) -> list[PrivacyZone]:
    if not isinstance(v, list):
        raise ValueError(
            "privacy_zones is a list of zones: [x, y, w, h] or [[x, y], [x, y], [x, y], ...] "
            "(fractions of the frame)"
        )
    try:
        return zones_from(v, "zone")
    except InvalidInput as e:
        raise ValueError(str(e)) from None


ENCRYPT_MODES = ("none", "passphrase", "recipient")

_dur_ser = PlainSerializer(fmt_duration, return_type=str)
_dates_ser = PlainSerializer(lambda v: [x.isoformat() for x in v], return_type=list[str])
# keep, min_keep, legal_min_keep: a bare `m` is refused (did you mean months?)
RetentionDur = typing.Annotated[
    Duration,
    PlainValidator(retention_duration),
    PlainSerializer(lambda d: fmt_duration(d, "min"), return_type=str),
]
FixedDur = typing.Annotated[Duration, PlainValidator(_duration), AfterValidator(_fixed), _dur_ser]
Text = typing.Annotated[str, BeforeValidator(_text)]
PrivacyZones = typing.Annotated[
    list[PrivacyZone],
    PlainValidator(_privacy_zones),
    PlainSerializer(lambda zs: [{k: v for k, v in z.json().items() if k != "source"} for z in zs]),
]
EncryptMode = typing.Annotated[str, BeforeValidator(one_of(*ENCRYPT_MODES))]
Bool = typing.Annotated[bool, PlainValidator(_bool)]
Fraction = typing.Annotated[float, PlainValidator(_fraction)]
Level = typing.Annotated[
    int,
    PlainValidator(_int),
    AfterValidator(_int_between(1, 2, "write 1 (internal cameras) or 2 (also perimeter)")),
]
Crf = typing.Annotated[int, PlainValidator(_int), AfterValidator(_int_between(0, 51))]
Zone = typing.Annotated[str, BeforeValidator(as_zone)]
AbsPath = typing.Annotated[str, BeforeValidator(_abs_path)]
SiteId = typing.Annotated[
    str, BeforeValidator(_matching(ID_RE, "site id (letters, digits, '.', '_', '-'; at most 64)"))
]
CameraId = typing.Annotated[
    str,
    BeforeValidator(_matching(ID_RE, "camera id (letters, digits, '.', '_', '-'; at most 64)")),
]
Role = typing.Annotated[
    str, BeforeValidator(_matching(_ROLE, "role name (a letter, then letters, digits, '_', '-')"))
]
UnixName = typing.Annotated[str, BeforeValidator(_matching(_UNIX_NAME, "user or group name"))]
ProfileName = typing.Annotated[str, BeforeValidator(_profile)]
Extension = typing.Annotated[str, BeforeValidator(_extension)]
Hours = typing.Annotated[str, BeforeValidator(_hours)]

# field types of more than one model, or long enough to read better with a name
Steps = typing.Annotated[list[Role], AfterValidator(non_empty("list at least one approver role"))]
Roots = typing.Annotated[list[AbsPath], AfterValidator(non_empty("list the recording directories"))]
Extensions = typing.Annotated[list[Extension], AfterValidator(_unique_extensions)]
# sites.<name>.cameras: camera ids or fnmatch globs (case-sensitive) selecting cameras in the roots
CameraPatterns = typing.Annotated[
    list[typing.Annotated[str, BeforeValidator(_camera_pattern)]],
    AfterValidator(non_empty("list camera ids or globs, or leave cameras: out (every camera)")),
]
ValidFor = typing.Annotated[
    Duration, PlainValidator(_duration), AfterValidator(_valid_for), _dur_ser
]
WorkingDays = typing.Annotated[int, PlainValidator(_decide_within)]
Dates = typing.Annotated[list[date], PlainValidator(_dates), _dates_ser]
Template = typing.Annotated[str, BeforeValidator(_template)]
Listen = typing.Annotated[str, BeforeValidator(_listen)]
WebListen = typing.Annotated[str, BeforeValidator(_web_listen)]
HttpUrl = typing.Annotated[str, BeforeValidator(_http_url)]
Email = typing.Annotated[str, BeforeValidator(_email)]
HostName = typing.Annotated[str, BeforeValidator(_hostname)]
Port = typing.Annotated[int, PlainValidator(_int), AfterValidator(_int_between(1, 65535))]
Failures = typing.Annotated[int, PlainValidator(_int), AfterValidator(_int_between(1, 1000))]
WholeNumber = typing.Annotated[int, PlainValidator(_int)]
