"""Domain types shared by the pure cores (policy, access) and the adapters (stores, scan, purge).

Times are epoch seconds (float, UTC) in the hot paths: a sweep may look at a million segments, and
``datetime`` objects there cost more than the work itself. Calendar arithmetic (months, years) is
done by :class:`nvr_guard.text.Duration` in the site's timezone.
Paths are ``bytes`` (absolute, as the kernel has them): recording trees may hold names that are not
valid UTF-8, and such a name must still be catalogued, shown and, when due, deleted.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import tzinfo

from nvr_guard.text import Duration, printable


def show_path(path: bytes | str) -> str:
    """A path for humans and JSON: undecodable bytes and control characters escaped."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "backslashreplace")
    return printable(path)


@dataclass(frozen=True, slots=True)
class Segment:
    """One recording file as the catalog knows it.

    The footage it holds spans ``[start, end]``: the end is the mtime (the recorder last wrote to
    it then), or ``path_end`` when the name carries a later one (Dahua's ``14.03.20-14.08.20``,
    Nx Witness's duration; a preallocated file's mtime is before it). An mtime after the name's
    end still counts: a file uploaded later holds no more, but a camera whose clock was reset
    names fresh footage with old times, and holding more is never a loss. ``start`` is the
    date-time read from the path through the site's layout; a file without one (a site without
    ``layout``) is catalogued with ``start == mtime`` and the catalog hands it out with an
    estimated, earlier start (see
    ``Catalog.estimate_starts``), so that a hold over the middle of it still holds it. Both times
    must be past ``keep`` (and the floor) before it is deleted: a camera whose clock was reset
    writes fresh files with old names.
    """

    site: str
    camera: str
    path: bytes  # absolute
    start: float  # recorded start (from the layout pattern; else estimated, see above)
    mtime: float  # last modification = the end; a recent one means "still recording"
    size: int
    id: int | None = None
    path_end: float | None = None  # the end read from the path; None: the name carries none

    @property
    def end(self) -> float:
        """The latest of its times (start, mtime, the path's end): the end of its footage as far
        as anyone can tell, and what disk pressure orders by."""
        end = self.mtime if self.mtime > self.start else self.start
        if self.path_end is not None and self.path_end > end:
            return self.path_end
        return end

    def span(self, tolerance: float = 3600.0) -> tuple[float, float]:
        """The footage it may hold, as far as anyone can tell: ``[start, end]``, begun no later
        than its mtime less its named length (a camera whose clock runs ahead). A path time
        more than ``tolerance`` after the mtime (the camera named it in the future: 2099) says
        nothing about when it was recorded; it was written before its mtime, at a time no one
        knows, so it may hold anything up to its end."""
        if self.start > self.mtime + tolerance:
            return float("-inf"), self.end
        # a camera a few minutes ahead names its file after its mtime: the footage ended at the
        # mtime and lasted as long as the name says; without a length in the name, as long as
        # the skew allows (the tolerance), since the camera's offset is unknown
        if self.path_end is not None:
            length = self.path_end - self.start
            lo = self.mtime - (length if length > 0 else 0.0)
        elif self.start > self.mtime:
            lo = self.mtime - tolerance
        else:
            lo = self.start
        return (lo if lo < self.start else self.start), self.end


def skew_band(start: float, tolerance: float) -> tuple[float, float]:
    """Where the mtime of a segment whose start was read from its path normally lies.

    The mtime is the segment's end, so normally ``start <= mtime <= start + length``. With the
    tolerance ``t`` (``guards.max_clock_skew``) the band is ``[start - t, start + 2 t]``: up to
    ``t`` of disagreement between the camera's clock (which named the file) and the host's (which
    stamped the mtime) either way, plus a segment of up to ``t`` long. An mtime outside it is
    clock skew. Segments timed by their mtime alone have no path time and are never skewed.
    """
    return start - tolerance, start + 2.0 * tolerance


def is_skewed(start: float, mtime: float, tolerance: float) -> bool:
    if start == mtime:
        return False  # no path time (or one that agrees exactly)
    lo, hi = skew_band(start, tolerance)
    return mtime < lo or mtime > hi


@dataclass(frozen=True, slots=True)
class CameraRule:
    """``cameras.<id>: {keep, min_keep}``: a camera's own ceiling and floor (None: the site's)."""

    camera: str
    keep: Duration | None = None
    min_keep: Duration | None = None


# what a plan says of the footage of a site with ``retention: none``
UNMANAGED_REASON = "retention: none (the recorder's own retention applies)"


@dataclass(frozen=True, slots=True)
class SiteRules:
    """Retention rules of one site, resolved from profile + overrides.

    ``cameras``: the cameras with rules of their own; :meth:`for_camera` gives the rules a
    camera's footage follows. ``enforce`` False is ``retention: none``: nvr-guard deletes
    nothing there (the recorder's own retention applies), it only catalogues the footage."""

    site: str
    keep: Duration | None  # ceiling: delete once older; None = keep forever
    min_keep: Duration | None  # floor: never delete younger, whatever happens
    tz: tzinfo
    settle: float  # seconds; a file modified more recently is still being recorded
    min_free: float = 0.0  # fraction of the volume that must stay free (0 = no disk rule)
    disk_action: str = "alert"  # or "overwrite-oldest"
    profile: str | None = None
    cameras: tuple[CameraRule, ...] = ()
    enforce: bool = True
    # ``sites.<name>.cameras``: the cameras of its roots it claims (empty: all of them); part of
    # the rule text, so a reload moving a camera is named as the config change it is
    claims: tuple[str, ...] = ()
    # set on the rules :meth:`for_camera` derives: whose keep / min_keep these are
    camera: str | None = None
    camera_keep: bool = False
    camera_min_keep: bool = False

    def describe(self) -> str:
        """Short human form, used in reasons and in the config-change guard message."""
        if not self.enforce:
            return "retention=none"
        keep = str(self.keep) if self.keep else "forever"
        floor = str(self.min_keep) if self.min_keep else "none"
        out = f"keep={keep} min_keep={floor}"
        for c in self.cameras:
            if c.keep is not None:
                out += f" cameras.{c.camera}.keep={c.keep}"
            if c.min_keep is not None:
                out += f" cameras.{c.camera}.min_keep={c.min_keep}"
        if self.claims:
            out += f" claims={','.join(self.claims)}"
        return out

    @property
    def digest(self) -> str:
        return hashlib.sha256(
            f"{self.describe()} tz={self.tz} disk={self.min_free}/{self.disk_action}".encode()
        ).hexdigest()[:16]

    def camera_rule(self, camera: str) -> CameraRule | None:
        """The camera's own rule at this site, if it has one."""
        for c in self.cameras:
            if c.camera == camera:
                return c
        return None

    def for_camera(self, camera: str) -> SiteRules:
        """The rules ``camera``'s footage follows: the site's, with the camera's own keep and
        min_keep in their place where it sets them (``self`` when it sets neither)."""
        c = self.camera_rule(camera) if self.cameras else None
        if c is None:
            return self
        return SiteRules(
            site=self.site,
            keep=c.keep if c.keep is not None else self.keep,
            min_keep=c.min_keep if c.min_keep is not None else self.min_keep,
            tz=self.tz,
            settle=self.settle,
            min_free=self.min_free,
            disk_action=self.disk_action,
            profile=self.profile,
            enforce=self.enforce,
            camera=camera,
            camera_keep=c.keep is not None,
            camera_min_keep=c.min_keep is not None,
        )


@dataclass(frozen=True, slots=True)
class GuardRules:
    max_delete_fraction: float = 0.2
    max_clock_jump: float = 86400.0  # seconds
    max_clock_skew: float = 3600.0  # seconds; see skew_band


@dataclass(frozen=True, slots=True)
class Hold:
    """Footage that must not be deleted: cameras' recordings in [start, end) until ``until``."""

    id: int
    reason: str
    owner: str
    start: float  # footage range held
    end: float
    camera: str | None = None  # None: every camera of the site(s)
    site: str | None = None  # None: every site
    until: float | None = None  # None: until released
    created: float = 0.0
    released: float | None = None
    kind: str = "manual"  # manual | request | export
    # the site's roots when the hold was placed: a hold keeps protecting the footage under them
    # after the site is renamed or the root moves to another site (config changes)
    roots: tuple[bytes, ...] = ()

    def covers(self, seg: Segment, now: float, tolerance: float = 3600.0) -> bool:
        if self.released is not None and self.released <= now:
            return False
        if self.until is not None and self.until <= now:
            return False
        if self.site is not None and self.site != seg.site and not self.under_roots(seg.path):
            return False
        if self.camera is not None and self.camera != seg.camera:
            return False
        # a segment is held when the footage it holds, [start, end] with the mtime as its end,
        # overlaps the held range [start, end); for a file timed by its mtime alone the start is
        # the catalog's conservative (early) estimate, so a hold over its middle holds it too
        lo, hi = seg.span(tolerance)
        return lo < self.end and hi >= self.start

    def under_roots(self, path: bytes) -> bool:
        return any(path.startswith(r.rstrip(b"/") + b"/") for r in self.roots)

    def label(self) -> str:
        return f"hold {self.id} ({self.kind}: {self.reason}, by {self.owner})"


@dataclass(frozen=True, slots=True)
class DiskState:
    """Free space of the volume(s) holding a site's roots."""

    total: int
    free: int

    def bytes_to_free(self, min_free_fraction: float) -> int:
        need = int(self.total * min_free_fraction) - self.free
        return max(0, need)


@dataclass(frozen=True, slots=True)
class Volume:
    """One file system (``st_dev``) holding recording roots: its free space and which footage
    lies on it. Disk pressure is a property of a volume, never of a site: a site with roots on
    two file systems frees space only on the one that is short, and sites sharing a volume share
    its one shortfall."""

    name: str  # for messages: the mount point (or "site gate" for a per-site figure)
    total: int
    free: int
    # (site, root): that site's footage under the root lies here, except below a deeper member
    # root of the site (a file system mounted inside a cross_mounts root: the policy gives a
    # segment to the deepest member that contains it); root None: all of the site's
    members: tuple[tuple[str, bytes | None], ...]

    @property
    def state(self) -> DiskState:
        return DiskState(total=self.total, free=self.free)

    def sites(self) -> list[str]:
        return sorted({s for s, _ in self.members})

    def holds(self, seg: Segment) -> bool:
        """Under one of the members' roots (deeper members of other volumes not considered)."""
        for site, root in self.members:
            if site == seg.site and (root is None or seg.path.startswith(root + b"/")):
                return True
        return False


@dataclass(frozen=True, slots=True)
class SweepHistory:
    """What the last sweeps left behind; feeds the mass-deletion and clock guards."""

    last_wall: float | None = None  # wall clock of the last completed sweep
    last_boottime: float | None = None  # CLOCK_BOOTTIME then
    boot_id: str | None = None
    site_rules: dict[str, str] = field(
        default_factory=dict
    )  # site -> SiteRules.describe() last used


@dataclass(frozen=True, slots=True)
class ClockReading:
    wall: float
    boottime: float
    boot_id: str


class Action(enum.StrEnum):
    DELETE = "delete"  # deleted by this sweep
    KEEP = "keep"  # due by age but held back (hold, floor, settling)
    BLOCKED = "blocked"  # due, but a guard stopped the sweep


@dataclass(frozen=True, slots=True)
class Item:
    segment: Segment
    action: Action
    reason: str

    def as_json(self) -> dict[str, object]:
        s = self.segment
        return {
            "path": show_path(s.path),
            "site": s.site,
            "camera": s.camera,
            "recorded": s.start,
            "size": s.size,
            "action": self.action.value,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class GuardTrip:
    kind: str  # "mass-deletion" | "clock-jump"
    site: str | None
    camera: str | None
    message: str
    count: int = 0
    total: int = 0
    bytes: int = 0  # size of the deletions the guard stopped
    limit: float = 0.0  # the guard's threshold (fraction, or seconds for the clock guard)
    cause: str = ""  # likely cause, in words (policy.trip_message puts it in the message)
    measured: float = 0.0  # what tripped it: the deleted fraction, or the clock jump in seconds


@dataclass
class Plan:
    now: float
    items: list[Item] = field(default_factory=list)
    trips: list[GuardTrip] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)

    @property
    def deletions(self) -> list[Item]:
        return [i for i in self.items if i.action is Action.DELETE]

    @property
    def blocked(self) -> list[Item]:
        return [i for i in self.items if i.action is Action.BLOCKED]


def boot_clock() -> ClockReading:
    """The real clocks; everything else takes a ClockReading so tests can move time."""
    import time

    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot_id = fh.read().strip()
    except OSError:
        boot_id = "unknown"
    return ClockReading(time.time(), time.clock_gettime(time.CLOCK_BOOTTIME), boot_id)


__all__ = [
    "UNMANAGED_REASON",
    "Action",
    "CameraRule",
    "ClockReading",
    "DiskState",
    "GuardRules",
    "GuardTrip",
    "Hold",
    "Item",
    "Plan",
    "Segment",
    "SiteRules",
    "SweepHistory",
    "Volume",
    "boot_clock",
    "is_skewed",
    "show_path",
    "skew_band",
]


# ---- export requests: kept by the request store, judged by workflow.access -------------------
@dataclass(frozen=True)
class Recipient:
    """Who receives the footage (接收单位 / 接收人 / 联系方式)."""

    unit: str
    person: str
    contact: str


@dataclass(frozen=True)
class Request:
    id: int
    requester: str
    site: str
    cameras: tuple[str, ...]
    start: float
    end: float
    reason: str
    basis: str
    recipient: Recipient
    format: str
    emergency: bool
    state: str
    created: float
    approved_at: float | None = None
    exported_at: float | None = None
    closed_at: float | None = None
    resolved: str | None = None  # an admin's resolution of an emergency violation
    # Who carried out its export (or is carrying it out): never also one of its approvers unless
    # ``approver_may_export`` (an emergency export comes before its back-filled approvals).
    exporter: str | None = None
    # how its export is protected: none | passphrase | recipient (fixed when it was filed)
    encrypt: str = "none"


@dataclass(frozen=True)
class Approval:
    """One decision on a request; ``role`` is the step it fills (or ``duty_role``)."""

    approver: str
    role: str
    decision: str  # "approve" | "deny"
    note: str
    time: float
    mask: str = ""  # privacy zones the approver added ("x,y,w,h;CAM:x,y,w,h"), "" for none
