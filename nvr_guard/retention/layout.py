"""Reading a segment's camera, recorded start and (when the name carries it) end from its path.

A site's ``layout`` is a path pattern relative to a recording root, such as
``{camera}/%Y-%m-%d/%H/%M.%S.mp4`` or Frigate's ``%Y-%m-%d/%H/{camera}/%M.%S.mp4``, or a preset
name (:mod:`nvr_guard.retention.presets`). ``{camera}`` may stand at any level; the date-time
directives (``%Y %y %m %d %H %M %S``) are read in the layout's timezone (Frigate writes UTC).
Further:

- ``%s``: the start in epoch seconds; ``{epoch_ms}``: the start in epoch milliseconds. With
  either, the path's date directives must still match but the epoch is the start.
- ``{end:...}``: the end, with the same directives (``{end:%H.%M.%S}``). Fields the end does not
  name are the start's; an end of day-time only that is earlier than the start is on the next
  day (a recording across midnight). ``{duration_ms}``: end = start + that many milliseconds.
- ``*``: a whole path component (any one directory name), or within a component any text (the
  rest of a name); ``{ignore}``: any text within a component.

Local times are read in the layout's zone. A local time that does not exist (the hour skipped
when clocks go forward) is read with the offset in force before the change (02:30 on the
spring-forward day is 03:30 of the new offset); an ambiguous one (the hour repeated when clocks go
back) is read as the first of its two instants — the earlier, so a start is never later than the
footage. An end of day-time only that would come out before its start is read as the second
instant of a repeated hour before it is moved to the next day.

The file extension written in the pattern is not binding: which extensions count as segments is
the site's ``extensions`` list, so ``.mp4`` in the pattern also matches ``.mkv`` segments.

A path is matched in two steps: its directory part once per directory
(:meth:`Layout.dir_matcher`), then each file name in it against the pattern's last component
only. A cold walk of a million segments in a few thousand directories thus runs the full
date-and-camera match a few thousand times, and per file only a small match on the name bytes.
Every placeholder and directive matches within one path component, so matching component-wise is
the same as matching the whole path; a directive or ``{camera}`` written twice must read the
same text in both places.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, tzinfo

# directive -> regex; two-digit fields take exactly two ASCII digits, as recorders write them
_DIRECTIVES = {
    "Y": "[0-9]{4}",
    "y": "[0-9]{2}",
    "m": "[0-9]{2}",
    "d": "[0-9]{2}",
    "H": "[0-9]{2}",
    "M": "[0-9]{2}",
    "S": "[0-9]{2}",
    "s": "[0-9]{1,12}",
}
_TOKEN = re.compile(r"\{camera\}|%.|\{[^}]*\}?|\*|[^{%*]+", re.S)
_END_TOKEN = re.compile(r"%.|[^%]+", re.S)
_TRAILING_EXT = re.compile(r"\.[A-Za-z0-9]{1,8}$")
# the times a path may name (1900 .. 9000): outside, the name is unmatched and reported, and no
# formatting of it in any zone can overflow
MIN_TIME = -2208988800.0
MAX_TIME = 221845392000.0

MAX_WILDCARDS = 2  # '*' and {ignore} in one path component (ZoneMinder 1.38 needs two)

# any text within one path component (``*`` inside a name, ``{ignore}``)
_ANY_TEXT = "[^/]*?"
# the groups the per-directory fast path knows (camera, date and hour from the directories,
# minute and second from the name)
_FAST_DIR = frozenset({"camera", "Y", "m", "d", "H", "M", "S"})
_FAST_FILE = frozenset({"M", "S"})
# placeholder -> its group name and regex
_NUMBERS = {"{epoch_ms}": ("ems", "[0-9]{1,15}"), "{duration_ms}": ("dms", "[0-9]{1,12}")}

# A file name in a matched directory -> (raw camera id, recorded start, end or None), or None.
FileMatcher = Callable[[bytes], "tuple[str, float, float | None] | None"]


@dataclass
class Layout:
    pattern: str
    tz: tzinfo
    # the directory components of the pattern ("" when it has only a file component)
    _dir_regex: re.Pattern[str] = field(repr=False, default=re.compile(""))
    # the last component, matched against file names as bytes
    _file_regex: re.Pattern[bytes] = field(repr=False, default=re.compile(b""))
    # names the file component reads that the directory part reads too (must be equal)
    _shared: tuple[str, ...] = field(repr=False, default=())
    # the camera of every path, when the pattern has no {camera} (a root per camera: motionEye)
    camera: str | None = None
    # a recorder's files beside its segments that are never segments (presets): whole names
    # (Viseron's init.mp4), and suffixes appended to a segment's name (motionEye's .thumb)
    shared_sidecars: frozenset[bytes] = frozenset()
    suffix_sidecars: tuple[bytes, ...] = ()
    _hour_cache: dict[tuple[int, int, int, int], float | None] = field(
        repr=False, compare=False, default_factory=dict
    )
    # file name -> seconds it adds to its directory's hour (-1: no match), for the usual shape
    _name_offsets: dict[bytes, int] = field(repr=False, compare=False, default_factory=dict)

    def __getstate__(self) -> dict[str, object]:
        # sent to each of the scanner's worker processes: without the memo, which they rebuild
        state = dict(self.__dict__)
        state["_name_offsets"] = {}
        return state

    @classmethod
    def compile(cls, pattern: str, tz: tzinfo, *, camera_from_root: bool = False) -> Layout:
        """Compile ``pattern``; ``camera_from_root``: it has no ``{camera}``, the camera is the
        name of the root (:meth:`for_root` binds it)."""
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError("layout is empty; write e.g. '{camera}/%Y-%m-%d/%H/%M.%S.mp4'")
        if pattern.startswith("/"):
            raise ValueError(f"layout {pattern!r} must be relative to the recording root")
        parts = pattern.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"layout {pattern!r} has an empty, '.' or '..' path component")
        last = parts[-1]
        m = _TRAILING_EXT.search(last)
        ext_any = m is not None and not any(c in last[m.start() :] for c in "%{*")
        if ext_any and m is not None:
            last = last[: m.start()]
        dir_seen: set[str] = set()
        dir_rx = "/".join(_component_regex(pattern, p, dir_seen) for p in parts[:-1])
        file_seen: set[str] = set()
        file_rx = _component_regex(pattern, last, file_seen)
        seen = dir_seen | file_seen
        if camera_from_root:
            if "camera" in seen:
                raise ValueError(f"layout {pattern!r}: the camera is the root's name here")
        elif "camera" not in seen:
            raise ValueError(
                f"layout {pattern!r} has no {{camera}}; put {{camera}} where the camera id stands"
            )
        epoch = "s" in seen or "ems" in seen
        if "s" in seen and "ems" in seen:
            raise ValueError(f"layout {pattern!r}: %s and {{epoch_ms}} both give the start")
        missing = [d for d in ("Y", "m", "d") if d not in seen and not (d == "Y" and "y" in seen)]
        if missing and not epoch:
            raise ValueError(
                f"layout {pattern!r} lacks {' '.join('%' + d for d in missing)}: the recorded date "
                "must be readable from the path (or %s / {epoch_ms}; leave layout out to use the "
                "file's mtime)"
            )
        if "Y" in seen and "y" in seen:
            raise ValueError(f"layout {pattern!r}: %Y and %y both give the year")
        if "dms" in seen and any(k.startswith("e_") for k in seen):
            raise ValueError(
                f"layout {pattern!r}: {{end:...}} and {{duration_ms}} both give the end"
            )
        if ext_any:
            file_rx += r"\.[^/.]+"
        try:
            file_rx_b = file_rx.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ValueError(f"layout {pattern!r} is not valid text (a lone surrogate)") from None
        return cls(
            pattern,
            tz,
            re.compile(dir_rx, re.S),
            re.compile(file_rx_b, re.S),
            tuple(sorted(dir_seen & file_seen)),
            "" if camera_from_root else None,
        )

    @property
    def camera_from_root(self) -> bool:
        """The camera is the name of the root (the pattern has no ``{camera}``)."""
        return self.camera is not None

    def for_root(self, root: str | bytes) -> Layout:
        """This layout as it reads paths under ``root``: itself, or for a layout whose camera is
        the root's name, a copy with that camera."""
        if self.camera is None:
            return self
        if isinstance(root, bytes):
            root = root.decode("utf-8", "surrogateescape")
        name = root.rstrip("/").rsplit("/", 1)[-1] or "/"
        return replace(self, camera=name, _hour_cache={}, _name_offsets={})

    def is_sidecar(self, name: bytes) -> bool:
        """A file name the recorder writes beside its segments (never a segment itself)."""
        if name in self.shared_sidecars:
            return True
        return any(name.endswith(s) and len(name) > len(s) for s in self.suffix_sidecars)

    def parse(self, rel: str) -> tuple[str, float, float | None] | None:
        """Camera id, recorded start and end (None: the name has none; epoch seconds) of a
        root-relative path, or None."""
        slash = rel.rfind("/")
        if slash == 0:  # "/name": an absolute path, not one relative to the root
            return None
        match = self.dir_matcher(rel[: max(slash, 0)])
        if match is None:
            return None
        name = rel[slash + 1 :]
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # not a name the file system could have given us
            return None
        return match(raw)

    def dir_matcher(self, rel_dir: str) -> FileMatcher | None:
        """The matcher of file names directly in ``rel_dir`` (root-relative, no trailing slash;
        "" for the root itself), or None when no file there can match the layout."""
        dm = self._dir_regex.fullmatch(rel_dir)
        if dm is None:
            return None
        bound = {k: v for k, v in dm.groupdict().items() if v is not None}
        if self.camera is not None:
            if not self.camera:
                return None  # the camera is the root's name: see for_root
            bound["camera"] = self.camera
        fullmatch = self._file_regex.fullmatch
        index = self._file_regex.groupindex
        base: float | None
        if (
            "camera" in bound
            and "Y" in bound
            and not self._shared
            and set(index) <= _FAST_FILE
            and set(bound) <= _FAST_DIR
        ):
            # the usual shape: camera, date and hour from the directories, minute and second
            # (or neither) from the name; the hour's start is looked up once per directory
            try:
                base = self._hour_base(
                    int(bound["Y"]), int(bound["m"]), int(bound["d"]), int(bound.get("H") or 0)
                )
            except ValueError:  # 30 Feb, hour 25, year 0024 ...: nothing here matches
                return None
        else:
            base = None
        if base is not None:
            camera = bound["camera"]
            dm_, ds_ = int(bound.get("M") or 0), int(bound.get("S") or 0)
            if dm_ > 59 or ds_ > 60:
                return None
            base += dm_ * 60 + ds_
            offsets = self._name_offsets
            gm, gs = index.get("M", 0), index.get("S", 0)

            def match_fast(name: bytes) -> tuple[str, float, float | None] | None:
                # what the name adds to the hour's start: a million files carry a few thousand
                # distinct names ("05.00.mp4" in every hour), so each is read once
                off = offsets.get(name)
                if off is None:
                    off = -1
                    fm = fullmatch(name)
                    if fm is not None:
                        minute = int(fm[gm]) if gm else 0
                        second = int(fm[gs]) if gs else 0
                        if minute <= 59 and second <= 60:
                            off = minute * 60 + second
                    if len(offsets) > 100_000:
                        offsets.clear()
                    offsets[name] = off
                return None if off < 0 else (camera, base + off, None)

            return match_fast
        shared = [(k, bound[k].encode("utf-8", "surrogateescape")) for k in self._shared]

        def match_any(name: bytes) -> tuple[str, float, float | None] | None:
            fm = fullmatch(name)
            if fm is None:
                return None
            got = fm.groupdict()
            for k, v in shared:
                if got[k] != v:
                    return None
            values = dict(bound)
            for k, raw in got.items():
                if raw is not None and k not in values:
                    values[k] = raw.decode("utf-8", "surrogateescape")
            return self._value(values)

        return match_any

    def _hour_base(self, year: int, month: int, day: int, hour: int) -> float | None:
        """Epoch seconds of the start of that hour in the layout's zone; None when the hour is
        not 3,600 plain seconds of one offset (a DST change inside it, as at Lord Howe's
        half-hour shift). ValueError: no such hour, or one outside the years a path may name."""
        key = (year, month, day, hour)
        if key in self._hour_cache:
            return self._hour_cache[key]
        start = datetime(*key, tzinfo=self.tz).timestamp()
        if not MIN_TIME <= start <= MAX_TIME:
            raise ValueError("out of range")
        last = datetime(year, month, day, hour, 59, 59, tzinfo=self.tz).timestamp()
        base = start if last - start == 3599 else None
        if len(self._hour_cache) > 100_000:
            self._hour_cache.clear()
        self._hour_cache[key] = base
        return base

    def _value(self, g: dict[str, str]) -> tuple[str, float, float | None] | None:
        try:
            if "ems" in g:
                start = int(g["ems"]) / 1000.0
                day = None
            elif "s" in g:
                start = float(int(g["s"]))
                day = None
            else:
                day = _day(g, "")
                start = _clock(g, "", day, self.tz)
            end: float | None = None
            if "dms" in g:
                end = start + int(g["dms"]) / 1000.0
            elif "e_s" in g:
                end = float(int(g["e_s"]))
            elif any(k.startswith("e_") for k in g):
                end = self._end(g, start, day)
        except (ValueError, OverflowError):  # 30 Feb, hour 25, minute 61, year 10000 ...
            return None
        if not MIN_TIME <= start <= MAX_TIME or (end is not None and not end <= MAX_TIME):
            return None  # no recorder wrote it: unmatched (reported), never a time to act on
        return g["camera"], start, end

    def _end(self, g: dict[str, str], start: float, day: date | None) -> float:
        """The end of ``{end:...}``: fields it does not name are the start's; a day-time only
        end before the start is the second instant of a repeated hour, else the next day."""
        if day is None:  # the start came from an epoch: its local date
            day = datetime.fromtimestamp(start, self.tz).date()
        own_date = any(k in g for k in ("e_Y", "e_y", "e_m", "e_d"))
        if own_date:
            y = int(g["e_Y"]) if "e_Y" in g else 2000 + int(g["e_y"]) if "e_y" in g else day.year
            day = date(y, int(g.get("e_m") or day.month), int(g.get("e_d") or day.day))
        end = _clock(g, "e_", day, self.tz)
        if end >= start or own_date:
            return end
        later = _clock(g, "e_", day, self.tz, fold=1)
        if later >= start:
            return later
        return _clock(g, "e_", day + timedelta(days=1), self.tz)


def _day(g: dict[str, str], pre: str) -> date:
    """The date the ``pre``-fields name (ValueError: no such day)."""
    year = int(g[pre + "Y"]) if pre + "Y" in g else 2000 + int(g[pre + "y"])
    return date(year, int(g[pre + "m"]), int(g[pre + "d"]))


def _clock(g: dict[str, str], pre: str, day: date, tz: tzinfo, fold: int = 0) -> float:
    """Epoch seconds of ``day`` at the ``pre``-fields' hour, minute and second in ``tz``
    (ValueError: no such time). The time itself, not its hour's start plus minutes: an hour
    holding a DST change (Lord Howe shifts by 30 minutes) has minutes of two offsets."""
    hour, minute = int(g.get(pre + "H") or 0), int(g.get(pre + "M") or 0)
    second = int(g.get(pre + "S") or 0)
    if minute > 59 or second > 60:
        raise ValueError("no such time")
    leap, second = (1, 59) if second == 60 else (0, second)
    at = datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=tz, fold=fold)
    return at.timestamp() + leap


def _component_regex(pattern: str, text: str, seen: set[str]) -> str:
    """Regex for one path component ``text`` (of ``pattern``): named groups for the first
    appearance of a directive or placeholder in ``seen``, back-references for a repeat."""
    out: list[str] = []
    tokens = _TOKEN.findall(text)
    if "".join(tokens) != text:  # only a '%' with nothing after it is not a token
        raise ValueError(f"layout {pattern!r}: a lone '%' (write %% for a literal percent sign)")
    if sum(t in ("*", "{ignore}") for t in tokens) > MAX_WILDCARDS:
        # each one more multiplies the ways a name can be tried: four in one name took seconds
        # per file name on every walk (two: a few thousand steps for a 255-byte name)
        raise ValueError(
            f"layout {pattern!r}: {text!r} has more than {MAX_WILDCARDS} of '*' and {{ignore}}; "
            "write the text between them literally"
        )
    for tok in tokens:
        if tok == "{camera}":
            out.append("(?P=camera)" if "camera" in seen else r"(?P<camera>[^/]+)")
            seen.add("camera")
        elif tok == "*":
            out.append("[^/]+" if text == "*" else _ANY_TEXT)
        elif tok == "{ignore}":
            out.append(_ANY_TEXT)
        elif tok in _NUMBERS:
            name, rx = _NUMBERS[tok]
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{rx})")
            seen.add(name)
        elif tok.startswith("{end:") and tok.endswith("}"):
            inner = tok[5:-1]
            if not inner:
                raise ValueError(f"layout {pattern!r}: {{end:}} names no directive")
            inner_tokens = _END_TOKEN.findall(inner)
            if "".join(inner_tokens) != inner:
                raise ValueError(f"layout {pattern!r}: a lone '%' in {tok!r}")
            for t in inner_tokens:
                if not t.startswith("%") or t == "%%":
                    out.append(re.escape(t[-1] if t == "%%" else t))
                    continue
                out.append(_directive(pattern, t, seen, "e_"))
        elif tok.startswith("{"):
            raise ValueError(
                f"layout {pattern!r}: unknown placeholder {tok!r}; known: {{camera}}, "
                "{end:...}, {epoch_ms}, {duration_ms}, {ignore}"
            )
        elif tok == "%%":
            out.append("%")
        elif tok.startswith("%"):
            out.append(_directive(pattern, tok, seen, ""))
        else:
            out.append(re.escape(tok))
    return "".join(out)


def _directive(pattern: str, tok: str, seen: set[str], pre: str) -> str:
    d = tok[1:]
    if d not in _DIRECTIVES:
        raise ValueError(
            f"layout {pattern!r}: unsupported directive {tok!r}; use %Y %y %m %d %H %M %S %s"
        )
    name = pre + d
    rx = f"(?P={name})" if name in seen else f"(?P<{name}>{_DIRECTIVES[d]})"
    seen.add(name)
    return rx
