"""Segment expiries in bulk: the retention rule behind the catalog's ``expires_at`` column.

The catalog stores each segment's expiry so a sweep reads only the due rows; computing it is a
retention rule, so it lives here and the catalog is handed it
(``Catalog(path, expiry=ExpiryCalc)``) rather than importing retention.
"""

from __future__ import annotations

from nvr_guard.model import SiteRules
from nvr_guard.retention import policy

__all__ = ["ExpiryCalc"]


class ExpiryCalc:
    """``policy.expiry(start, rules)`` for many starts, fast; with an mtime,
    ``policy.expiry_both(start, mtime, rules)`` (the later of the two expiries).

    Fixed-length durations are a single addition in the policy already. Calendar durations (6mo,
    1y) need a timezone conversion per call (microseconds each: seconds for a million segments),
    so the expiry of each UTC hour is computed once and the starts within it are shifted from it.
    That is only done where it is exact: when the hour's start and end expire exactly one hour
    apart (no DST change or month-end clamp inside the hour); otherwise every start is computed.

    A camera with a keep of its own (``cameras.<id>.keep``) gets a calculator of its own,
    made when its first segment is seen.
    """

    __slots__ = ("rules", "_expiry", "_fixed", "_hours", "_by_camera")

    def __init__(self, rules: SiteRules) -> None:
        self.rules = rules
        self._by_camera: dict[str, ExpiryCalc] = {}
        self._expiry = policy.expiry
        keep = rules.keep
        self._fixed: float | None = None
        if keep is not None and keep.months == 0:
            self._fixed = float(keep.seconds)
        self._hours: dict[int, float | None] = {}

    def __call__(
        self, start: float, mtime: float | None = None, camera: str | None = None
    ) -> float | None:
        """The expiry by ``start`` alone, or past the ceiling by both ``start`` and ``mtime``;
        under ``camera``'s own rule where it has one."""
        if camera is not None and self.rules.cameras:
            sub = self._by_camera.get(camera)
            if sub is None:
                own = self.rules.for_camera(camera)
                sub = self._by_camera[camera] = self if own is self.rules else ExpiryCalc(own)
            if sub is not self:
                return sub(start, mtime)
        if self.rules.keep is None:
            return None
        if self._fixed is not None:
            if mtime is not None and mtime > start:
                return mtime + self._fixed
            return start + self._fixed
        a = self._one(start)
        if mtime is None or mtime == start:
            return a
        b = self._one(mtime)
        return a if a > b else b

    def _one(self, start: float) -> float:
        hour = int(start // 3600)
        base = self._hours.get(hour, -1.0)
        if base == -1.0:
            b0 = hour * 3600.0
            e0 = self._expiry(b0, self.rules)
            e1 = self._expiry(b0 + 3600.0, self.rules)
            base = e0 if (e0 is not None and e1 is not None and e1 - e0 == 3600.0) else None
            if len(self._hours) > 200_000:
                self._hours.clear()
            self._hours[hour] = base
        if base is None:
            e = self._expiry(start, self.rules)
            assert e is not None
            return e
        return base + (start - hour * 3600.0)
