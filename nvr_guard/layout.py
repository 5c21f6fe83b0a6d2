"""Reading a segment's camera and recorded start time from its path.

A site's ``layout`` is a path pattern relative to a recording root, such as
``{camera}/%Y-%m-%d/%H/%M.%S.mp4`` or Frigate's ``%Y-%m-%d/%H/{camera}/%M.%S.mp4``. ``{camera}``
may stand at any level; the date-time directives are read in the layout's timezone (Frigate writes
UTC). The file extension written in the pattern is not binding: which extensions count as segments
is the site's ``extensions`` list, so ``.mp4`` in the pattern also matches ``.mkv`` segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

# directive -> regex; two-digit fields take exactly two digits, as recorders write them
_DIRECTIVES = {
    "Y": r"\d{4}",
    "m": r"\d{2}",
    "d": r"\d{2}",
    "H": r"\d{2}",
    "M": r"\d{2}",
    "S": r"\d{2}",
}
_TOKEN = re.compile(r"\{camera\}|%.|\{[^}]*\}?|[^{%]+", re.S)
_TRAILING_EXT = re.compile(r"\.[A-Za-z0-9]{1,8}$")


@dataclass
class Layout:
    pattern: str
    tz: tzinfo
    _regex: re.Pattern[str] = field(repr=False, default=re.compile(""))
    _hour_cache: dict[tuple[int, int, int, int], float] = field(repr=False, default_factory=dict)

    @classmethod
    def compile(cls, pattern: str, tz: tzinfo) -> Layout:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError("layout is empty; write e.g. '{camera}/%Y-%m-%d/%H/%M.%S.mp4'")
        if pattern.startswith("/"):
            raise ValueError(f"layout {pattern!r} must be relative to the recording root")
        parts = pattern.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"layout {pattern!r} has an empty, '.' or '..' path component")
        body = pattern
        m = _TRAILING_EXT.search(body)
        ext_any = m is not None and "%" not in body[m.start() :] and "{" not in body[m.start() :]
        if ext_any and m is not None:
            body = body[: m.start()]
        regex: list[str] = []
        seen: set[str] = set()
        cameras = 0
        for tok in _TOKEN.findall(body):
            if tok == "{camera}":
                if cameras:
                    regex.append("(?P=camera)")
                else:
                    regex.append(r"(?P<camera>[^/]+)")
                cameras += 1
            elif tok.startswith("{"):
                raise ValueError(
                    f"layout {pattern!r}: unknown placeholder {tok!r}; only {{camera}} is known"
                )
            elif tok.startswith("%"):
                d = tok[1:]
                if d == "%":
                    regex.append("%")
                elif d in _DIRECTIVES:
                    regex.append(f"(?P={d})" if d in seen else f"(?P<{d}>{_DIRECTIVES[d]})")
                    seen.add(d)
                else:
                    raise ValueError(
                        f"layout {pattern!r}: unsupported directive {tok!r}; use %Y %m %d %H %M %S"
                    )
            else:
                regex.append(re.escape(tok))
        if not cameras:
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
            regex.append(r"\.[^/.]+")
        return cls(pattern, tz, re.compile("".join(regex), re.S))

    def parse(self, rel: str) -> tuple[str, float] | None:
        """Camera id and recorded start (epoch seconds) of a root-relative path, or None."""
        m = self._regex.fullmatch(rel)
        if m is None:
            return None
        g = m.groupdict()
        try:
            key = (int(g["Y"]), int(g["m"]), int(g["d"]), int(g.get("H") or 0))
            base = self._hour_cache.get(key)
            if base is None:
                base = datetime(*key, tzinfo=self.tz).timestamp()
                if len(self._hour_cache) > 100_000:
                    self._hour_cache.clear()
                self._hour_cache[key] = base
            minute, second = int(g.get("M") or 0), int(g.get("S") or 0)
        except ValueError:  # 30 Feb, hour 25 ...
            return None
        if minute > 59 or second > 60:
            return None
        return g["camera"], base + minute * 60 + second
