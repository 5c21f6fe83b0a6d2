"""Reading a segment's camera and recorded start time from its path.

A site's ``layout`` is a path pattern relative to a recording root, such as
``{camera}/%Y-%m-%d/%H/%M.%S.mp4`` or Frigate's ``%Y-%m-%d/%H/{camera}/%M.%S.mp4``. ``{camera}``
may stand at any level; the date-time directives are read in the layout's timezone (Frigate writes
UTC). The file extension written in the pattern is not binding: which extensions count as segments
is the site's ``extensions`` list, so ``.mp4`` in the pattern also matches ``.mkv`` segments.

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
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

# directive -> regex; two-digit fields take exactly two ASCII digits, as recorders write them
_DIRECTIVES = {
    "Y": "[0-9]{4}",
    "m": "[0-9]{2}",
    "d": "[0-9]{2}",
    "H": "[0-9]{2}",
    "M": "[0-9]{2}",
    "S": "[0-9]{2}",
}
_TOKEN = re.compile(r"\{camera\}|%.|\{[^}]*\}?|[^{%]+", re.S)
_TRAILING_EXT = re.compile(r"\.[A-Za-z0-9]{1,8}$")

# A file name in a matched directory -> (raw camera id, recorded start), or None.
FileMatcher = Callable[[bytes], "tuple[str, float] | None"]


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
    _hour_cache: dict[tuple[int, int, int, int], float] = field(
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
    def compile(cls, pattern: str, tz: tzinfo) -> Layout:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError("layout is empty; write e.g. '{camera}/%Y-%m-%d/%H/%M.%S.mp4'")
        if pattern.startswith("/"):
            raise ValueError(f"layout {pattern!r} must be relative to the recording root")
        parts = pattern.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"layout {pattern!r} has an empty, '.' or '..' path component")
        last = parts[-1]
        m = _TRAILING_EXT.search(last)
        ext_any = m is not None and "%" not in last[m.start() :] and "{" not in last[m.start() :]
        if ext_any and m is not None:
            last = last[: m.start()]
        dir_seen: set[str] = set()
        dir_rx = _component_regex(pattern, "/".join(parts[:-1]), dir_seen)
        file_seen: set[str] = set()
        file_rx = _component_regex(pattern, last, file_seen)
        seen = dir_seen | file_seen
        if "camera" not in seen:
            raise ValueError(
                f"layout {pattern!r} has no {{camera}}; put {{camera}} where the camera id stands"
            )
        missing = [d for d in ("Y", "m", "d") if d not in seen]
        if missing:
            raise ValueError(
                f"layout {pattern!r} lacks {' '.join('%' + d for d in missing)}: the recorded date "
                "must be readable from the path (leave layout out to use the file's mtime)"
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
        )

    def parse(self, rel: str) -> tuple[str, float] | None:
        """Camera id and recorded start (epoch seconds) of a root-relative path, or None."""
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
        fullmatch = self._file_regex.fullmatch
        index = self._file_regex.groupindex
        if "camera" in bound and not self._shared and set(index) <= {"M", "S"}:
            # the usual shape: camera, date and hour from the directories, minute and second
            # (or neither) from the name; the hour's start is looked up once per directory
            try:
                base = self._hour_base(
                    int(bound["Y"]), int(bound["m"]), int(bound["d"]), int(bound.get("H") or 0)
                )
            except ValueError:  # 30 Feb, hour 25 ...: nothing in this directory matches
                return None
            camera = bound["camera"]
            dm_, ds_ = int(bound.get("M") or 0), int(bound.get("S") or 0)
            if dm_ > 59 or ds_ > 60:
                return None
            base += dm_ * 60 + ds_
            offsets = self._name_offsets
            gm, gs = index.get("M", 0), index.get("S", 0)

            def match_fast(name: bytes) -> tuple[str, float] | None:
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
                return None if off < 0 else (camera, base + off)

            return match_fast
        shared = [(k, bound[k].encode("utf-8", "surrogateescape")) for k in self._shared]

        def match_any(name: bytes) -> tuple[str, float] | None:
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

    def _hour_base(self, year: int, month: int, day: int, hour: int) -> float:
        """Epoch seconds of the start of that hour in the layout's zone (ValueError if none)."""
        key = (year, month, day, hour)
        base = self._hour_cache.get(key)
        if base is None:
            base = datetime(*key, tzinfo=self.tz).timestamp()
            if len(self._hour_cache) > 100_000:
                self._hour_cache.clear()
            self._hour_cache[key] = base
        return base

    def _value(self, g: dict[str, str]) -> tuple[str, float] | None:
        try:
            base = self._hour_base(int(g["Y"]), int(g["m"]), int(g["d"]), int(g.get("H") or 0))
            minute, second = int(g.get("M") or 0), int(g.get("S") or 0)
        except ValueError:  # 30 Feb, hour 25 ...
            return None
        if minute > 59 or second > 60:
            return None
        return g["camera"], base + minute * 60 + second


def _component_regex(pattern: str, text: str, seen: set[str]) -> str:
    """Regex for ``text`` (part of ``pattern``): named groups for the first appearance of a
    directive or ``{camera}`` in ``seen``, back-references for a repeat."""
    out: list[str] = []
    tokens = _TOKEN.findall(text)
    if "".join(tokens) != text:  # only a '%' with nothing after it is not a token
        raise ValueError(f"layout {pattern!r}: a lone '%' (write %% for a literal percent sign)")
    for tok in tokens:
        if tok == "{camera}":
            out.append("(?P=camera)" if "camera" in seen else r"(?P<camera>[^/]+)")
            seen.add("camera")
        elif tok.startswith("{"):
            raise ValueError(
                f"layout {pattern!r}: unknown placeholder {tok!r}; only {{camera}} is known"
            )
        elif tok.startswith("%"):
            d = tok[1:]
            if d == "%":
                out.append("%")
            elif d in _DIRECTIVES:
                out.append(f"(?P={d})" if d in seen else f"(?P<{d}>{_DIRECTIVES[d]})")
                seen.add(d)
            else:
                raise ValueError(
                    f"layout {pattern!r}: unsupported directive {tok!r}; use %Y %m %d %H %M %S"
                )
        else:
            out.append(re.escape(tok))
    return "".join(out)
