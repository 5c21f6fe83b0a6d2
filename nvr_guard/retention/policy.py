"""Retention policy: which segments a sweep deletes, which it holds back, and why.

Pure: everything comes in as arguments (segments, a clock reading, rules, holds, disk figures, the
history of earlier sweeps) and a :class:`~nvr_guard.model.Plan` goes out. Nothing here touches the
disk, the clock or the network, so ``retention plan`` shows exactly what ``retention run`` would do,
and the tests can put "now" anywhere.

Every segment the plan deletes or holds back carries a reason that names the rule and its values
(borg's ``prune --list`` habit): an operator reading a receipt must be able to tell *which* rule
removed a recording without reading code.

Precedence, strongest first:

1. a hold (request, export, manual legal hold) — never deleted while it stands;
2. settling — a file modified within ``settle`` is still being recorded;
3. the floor (``min_keep``) — never deleted younger, not even under disk pressure, unless the admin
   explicitly chose ``disk.action: overwrite-oldest``;
4. the ceiling (``keep``) and disk pressure — delete.

A camera with a rule of its own (``cameras.<id>: {keep, min_keep}``) is decided under it, and its
reasons say so ("expired: camera keep=90d", "floor: camera min_keep=30d"). A site under
``retention: none`` has nothing deleted at all: whatever of it is handed over is kept, with that
reason.

Age is measured from both of a segment's times, its start (read from the path) and its mtime (its
end): it is past the ceiling or the floor only when both are. A camera whose clock was reset names
fresh files ``2000-01-01/…``; their mtime keeps them. A name in the future (``2099-…``) keeps its
file by the path time; both cases are reported as clock skew (``model.skew_band``), not decided
here.

Then two guards may stop deletions that the rules allow: the mass-deletion guard (per camera) and
the clock guard (all of them). Both stop the sweep until an admin confirms (``retention confirm``).
"""

from __future__ import annotations

import calendar
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo

from nvr_guard.model import (
    UNMANAGED_REASON,
    Action,
    ClockReading,
    DiskState,
    GuardRules,
    GuardTrip,
    Hold,
    Item,
    Plan,
    Segment,
    SiteRules,
    SweepHistory,
    Volume,
    is_skewed,
)
from nvr_guard.text import Duration, human_bytes
from nvr_guard.text import fmt_limit as _dur
from nvr_guard.text import fmt_percent as _pct
from nvr_guard.text import fmt_span as _span

__all__ = [
    "Confirmation",
    "candidate_cutoff",
    "decide",
    "expiry",
    "expiry_both",
    "floor_until",
    "trip_message",
]

DAY = 86400.0
# Starts this close to a computed boundary are decided by the exact calendar arithmetic: the
# boundary is computed in float seconds while Duration.after_ts works in whole microseconds.
_EPS = 0.01
# A backward step of the wall clock smaller than this is ordinary NTP discipline, not news.
_BACKWARD_ALERT = 60.0


@dataclass(frozen=True)
class Confirmation:
    """What an admin released with ``retention confirm``: these deletions pass the mass-deletion
    guard, and with ``accept_clock`` the clock guard too (the admin checked the clock).

    ``clock_jump``: the forward jump (seconds) the admin was shown; with it only a jump up to that
    plus the guard's own tolerance is accepted, so a jump that happens after the blocked sweep
    still trips. ``whole``: the release holds only as shown — if anything beyond it trips a guard
    (more deletions, another jump), nothing at all is deleted and the sweep blocks again.
    """

    paths: frozenset[bytes] = frozenset()
    accept_clock: bool = False
    clock_jump: float | None = None
    whole: bool = False
    # the blocked sweep's own clock reading: the wall clock may since have moved only as much as
    # the boot clock (plus CONFIRM_SLACK), else the jump is not the one the admin was shown
    since: ClockReading | None = None


# what a confirmed clock jump may have grown by between the blocked sweep and its confirmation
# (NTP slews, the seconds between reading the two clocks); more is a new jump the admin never saw
CONFIRM_SLACK = 300.0


# ---- single-segment answers ----------------------------------------------------------------


def expiry(start: float, rules: SiteRules) -> float | None:
    """When a segment recorded at ``start`` reaches the ceiling (None: kept forever)."""
    if rules.keep is None:
        return None
    return rules.keep.after_ts(start, rules.tz)


def expiry_both(start: float, mtime: float, rules: SiteRules) -> float | None:
    """When a segment is past the ceiling by both its path time and its mtime (None: never).

    Not ``expiry(max(start, mtime))``: month-end clamping makes a calendar expiry non-monotone
    (31 Aug + 6mo is 28 Feb, as is 30 Aug + 6mo), so each time is taken through the calendar.
    """
    a = expiry(start, rules)
    if a is None or mtime == start:
        return a
    b = expiry(mtime, rules)
    assert b is not None
    return a if a > b else b


def floor_until(start: float, rules: SiteRules) -> float | None:
    """Before this instant the segment is under its floor and is never deleted (None: no floor)."""
    if rules.min_keep is None:
        return None
    return rules.min_keep.after_ts(start, rules.tz)


def candidate_cutoff(now: float, rules: SiteRules) -> float | None:
    """An epoch such that every segment that is due by age at ``now`` has ``start <= cutoff``.

    Generous: a few segments at or just before the cutoff may still turn out not to be due (the
    month-end clamping of calendar durations makes "due" not a plain prefix of the start times);
    :func:`decide` makes the exact decision. None: nothing is ever due by age at this site.
    """
    if rules.keep is None:
        return None
    return _DueTest(rules.keep, rules.tz, now).hi


# ---- "has this duration elapsed since start?" for many starts --------------------------------


class _DueTest:
    """Answers ``dur.after_ts(start, tz) <= now`` for many starts at a few microseconds each.

    Fixed-length durations are one addition. Calendar durations (months, years) would need a
    timezone conversion per segment; instead the boundary is found once: every start ``<= lo`` is
    due, every start ``> hi`` is not, and only the starts in between get the exact arithmetic.

    Why not one exact boundary: month-end clamping makes "due" non-monotone in the start. With
    ``keep: 6mo`` and now = 28 Feb 12:00, 30 Aug 23:00 expires 28 Feb 23:00 (not due) while
    31 Aug 01:00 expires 28 Feb 01:00 (due). So on the last day of a month the band (lo, hi] spans
    the clamped days; on every other day it is a few milliseconds wide.
    """

    __slots__ = ("dur", "tz", "now", "fixed", "secs", "lo", "hi")

    def __init__(self, dur: Duration, tz: tzinfo, now: float) -> None:
        self.dur, self.tz, self.now = dur, tz, now
        self.fixed = dur.months == 0
        self.secs = float(dur.seconds)
        if self.fixed:
            # after_ts is exactly ``start + seconds``; __call__ uses that very expression
            self.lo = self.hi = now - self.secs + _EPS
        else:
            self.lo, self.hi = _calendar_bounds(dur, tz, now)

    def __call__(self, start: float) -> bool:
        if self.fixed:
            return start + self.secs <= self.now
        if start <= self.lo:
            return True
        if start > self.hi:
            return False
        return self.dur.after_ts(start, self.tz) <= self.now


_NAIVE_EPOCH = datetime(1970, 1, 1)


def _wall(seconds: float) -> datetime:
    """Naive wall-clock seconds (epoch + offset) -> naive datetime."""
    return _NAIVE_EPOCH + timedelta(seconds=seconds)


def _wall_seconds(dt: datetime) -> float:
    return (dt - _NAIVE_EPOCH).total_seconds()


def _offset(ts: float, tz: tzinfo) -> float:
    off = datetime.fromtimestamp(ts, UTC).astimezone(tz).utcoffset()
    return off.total_seconds() if off is not None else 0.0


def _constant_offset(tz: tzinfo, lo: float, hi: float) -> float | None:
    """The zone's UTC offset if it is the same all over [lo, hi] (sampled every 30 min: real zones
    never change offset twice within half an hour), else None."""
    first = _offset(lo, tz)
    t = lo + 1800.0
    while t < hi:
        if _offset(t, tz) != first:
            return None
        t += 1800.0
    return first if _offset(hi, tz) == first else None


def _months_back(year: int, month: int, n: int) -> tuple[int, int]:
    y, m0 = divmod(month - 1 - n, 12)
    return year + y, m0 + 1


def _calendar_bounds(dur: Duration, tz: tzinfo, now: float) -> tuple[float, float]:
    """(lo, hi) for a calendar duration; see :class:`_DueTest`.

    Duration.after adds the months on the site's wall calendar (clamping the day), converts back
    to UTC, then adds the fixed seconds. So a start s is due iff A(W(s)) <= Tw, where W is the wall
    time of s, A the month addition and Tw the wall time of ``now - seconds``. Where the zone's
    offset is constant around both the start side and the expiry side (every DST-free zone, and a
    DST zone away from its transitions) that inequality is solved on the wall calendar exactly.
    Near a transition the band is simply widened and the exact arithmetic decides.
    """
    n = dur.months
    target = now - dur.seconds  # g(s) <= target, g = the month part of after_ts
    o_t = _offset(target, tz)
    tw = _wall(target + o_t)
    y0, m0 = _months_back(tw.year, tw.month, n)
    last0 = calendar.monthrange(y0, m0)[1]
    last_t = calendar.monthrange(tw.year, tw.month)[1]
    tod = timedelta(
        hours=tw.hour, minutes=tw.minute, seconds=tw.second, microseconds=tw.microsecond
    )
    d = tw.day
    if d > last0:
        # e.g. 31 Mar - 1mo: every day of February maps to a day before 31 Mar -> the whole month
        # is due and nothing after it
        ny, nm = (y0 + 1, 1) if m0 == 12 else (y0, m0 + 1)
        lo_w = hi_w = _wall_seconds(datetime(ny, nm, 1)) - 1e-6
    elif d < last_t or d == last0:
        # a plain prefix: due iff wall <= (y0, m0, d, tod)
        lo_w = hi_w = _wall_seconds(datetime(y0, m0, d) + tod)
    else:
        # the target is on its month's last day and the source month is longer: days d..last0
        # of the source month all clamp onto day d, each due up to time-of-day ``tod``
        lo_w = _wall_seconds(datetime(y0, m0, d) + tod)
        hi_w = _wall_seconds(datetime(y0, m0, last0) + tod)

    approx = lo_w - o_t
    # Far from the boundary, the month addition's own spread (clamping: at most 3 days) plus any
    # offset change of a real zone (at most a day, e.g. Samoa 2011) cannot flip the answer, so it
    # suffices that the offset is constant near the boundary on both sides.
    o_src = _constant_offset(tz, approx - 10 * DAY, hi_w - o_t + 10 * DAY)
    o_dst = _constant_offset(tz, target - 3 * DAY, target + 3 * DAY)
    if o_src is None or o_dst is None:
        # a DST change or zone redefinition nearby: let the exact arithmetic decide a week around
        return approx - 7 * DAY, hi_w - o_t + 7 * DAY
    # Tw used the expiry side's offset (o_t == o_dst here); the start side converts with its own
    return lo_w - o_src - _EPS, hi_w - o_src + _EPS


# ---- formatting ------------------------------------------------------------------------------


def _local(ts: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


_UNSEEN: tuple[int, str] = (0, "")


class _LocalTime:
    """:func:`_local` for many instants of one zone, several times faster.

    A sweep may explain 150,000 deletions, each with its site-local recording time; a datetime
    per segment would cost as much as the rest of the decision. The zone's offset is looked up
    once per UTC hour (and used only when it is the same at both ends of that hour), the date
    text once per local day; the rest is integer arithmetic.
    """

    __slots__ = ("tz", "hours", "dates")

    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self.hours: dict[int, tuple[int, str] | None] = {}  # UTC hour -> (offset s, "+08:00")
        self.dates: dict[int, str] = {}  # local day number -> "2026-11-01"

    def _hour(self, hour: int) -> tuple[int, str] | None:
        first = datetime.fromtimestamp(hour * 3600, self.tz)
        last = datetime.fromtimestamp(hour * 3600 + 3599, self.tz)
        off = first.utcoffset()
        if off is None or off != last.utcoffset() or off.total_seconds() % 60:
            found = None  # a change of offset inside this hour: take the slow, exact path
        else:
            secs = int(off.total_seconds())
            found = (secs, first.isoformat()[19:])  # "+08:00" / "+00:00" as isoformat writes it
        self.hours[hour] = found
        return found

    def __call__(self, ts: float) -> str:
        whole = int(ts // 1)
        hour = whole // 3600
        known = self.hours.get(hour, _UNSEEN)
        if known is _UNSEEN:
            known = self._hour(hour)
        if known is None or whole != ts and abs(ts - round(ts)) < 1e-6:
            # (microsecond rounding near a whole second: let datetime decide the digit)
            return _local(ts, self.tz)
        off, suffix = known
        day, sec = divmod(whole + off, 86400)
        date = self.dates.get(day)
        if date is None:
            date = self.dates[day] = (_NAIVE_EPOCH + timedelta(days=day)).date().isoformat()
        return date + _HHMM[sec // 60] + _SS[sec % 60] + suffix


_HHMM = [f"T{h:02}:{m:02}:" for h in range(24) for m in range(60)]
_SS = [f"{s:02}" for s in range(60)]


def _n(count: int, noun: str = "segment") -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _rules_tokens(text: str) -> dict[str, str] | None:
    """``keep=30d min_keep=none`` -> {"keep": "30d", "min_keep": "none"}, durations normalised so
    that a history written as 2w1d and rules written as 15d compare equal. None: not that form."""
    out: dict[str, str] = {}
    for tok in text.split():
        key, sep, value = tok.partition("=")
        if not sep:
            return None
        try:
            value = _dur(Duration.parse(value))
        except ValueError:
            pass
        out[key] = value
    return out


def _rules_change(old: str, new: str) -> str | None:
    """What changed between two ``SiteRules.describe()`` texts, as ``keep 30d -> 15d``; None when
    they say the same."""
    o, n = _rules_tokens(old), _rules_tokens(new)
    if o is None or n is None:
        return None if old == new else f"{old} -> {new}"
    parts = [
        f"{k} {o.get(k, 'unset')} -> {n.get(k, 'unset')}"
        for k in list(o) + [k for k in n if k not in o]
        if o.get(k) != n.get(k)
    ]
    return ", ".join(parts) or None


# ---- the sweep decision ----------------------------------------------------------------------


@dataclass
class _Site:
    """Everything about one site that is the same for all its segments in this sweep."""

    rules: SiteRules
    ceiling: _DueTest | None
    floor: _DueTest | None
    holds: list[Hold]
    held: _HoldIndex  # ``holds`` by the hours they hold
    settle_after: float  # mtime above this: still being recorded
    keep_txt: str  # "keep=15d" / "camera keep=90d", formatted once: in every expiry reason
    local: _LocalTime  # site-local ISO time of an instant
    skew: float  # guards.max_clock_skew, to say in a reason when the two times disagree
    # the whole site's rules (``rules`` is a camera's own where it has one)
    site_rules: SiteRules


@dataclass
class _Pressure:
    """A volume short of space in this sweep, and what the sweep has for it so far."""

    label: str  # "site gate" / "volume /srv/a (sites gate, yard)", for alerts
    at: str  # "" / " on /srv/a", for reasons
    need: int  # bytes to free
    free_note: str  # "free 8.0% < min_free 10%"
    spare: list[Segment]  # its footage not due by age (the disk-pressure candidates)
    freed: int = 0  # by ordinary expiries of its footage


def _pressures(
    volumes: Sequence[Volume], rules: Mapping[str, SiteRules]
) -> tuple[list[_Pressure], dict[str, list[tuple[bytes | None, _Pressure | None]]]]:
    """The volumes short of space, and per site with footage on one of them every (root,
    pressure) member pair of the site, deepest root first (pressure None: a volume with
    space). Sites sharing a volume share its one shortfall, measured against the strictest
    ``min_free`` among them. A member root may lie below another (a file system mounted inside
    a ``cross_mounts`` root): a segment belongs to the deepest member that contains it."""
    out: list[_Pressure] = []
    by_site: dict[str, list[tuple[bytes | None, _Pressure | None]]] = {}
    short_sites: set[str] = set()
    for v in volumes:
        fractions = [rules[s].min_free for s, _ in v.members if s in rules]
        min_free = max(fractions, default=0.0)
        need = v.state.bytes_to_free(min_free) if min_free > 0 else 0
        p: _Pressure | None = None
        if need:
            sites = v.sites()
            if not v.name:  # a per-site figure (no volume known): speak of the site
                label, at = f"site {', '.join(sites)}", ""
            else:
                noun = "sites" if len(sites) > 1 else "site"
                label, at = f"volume {v.name} ({noun} {', '.join(sites)})", f" on {v.name}"
            p = _Pressure(
                label=label,
                at=at,
                need=need,
                free_note=f"free {v.free / max(v.total, 1) * 100:.1f}% < min_free {_pct(min_free)}",
                spare=[],
            )
            out.append(p)
            short_sites.update(sites)
        for s, root in v.members:
            by_site.setdefault(s, []).append((root, p))
    for pairs in by_site.values():
        # deepest first; a whole-site member (None) only after every root
        pairs.sort(key=lambda rp: -1 if rp[0] is None else len(rp[0]), reverse=True)
    return out, {s: pairs for s, pairs in by_site.items() if s in short_sites}


def _pressure_of(
    seg: Segment, pairs: list[tuple[bytes | None, _Pressure | None]]
) -> _Pressure | None:
    """The pressure of the volume the segment is on (its deepest member), None if it has space."""
    for root, p in pairs:
        if root is None or seg.path.startswith(root + b"/"):
            return p
    return None


class _HoldIndex:
    """Holds by the hours of footage they hold, so that a segment is compared with the holds
    near its own time only, not with all of them (a backlog of 130,000 segments against 2,000
    request holds was 250 million comparisons, three minutes of a sweep under the engine lock).

    ``Hold.covers`` still decides; the index only leaves out holds that cannot overlap the
    segment's span, and the first covering hold in the given order is the one named, as a
    walk over the list would name it."""

    BUCKET = 3600.0  # seconds of footage per bucket
    WIDE = 24 * 400  # buckets: a hold or a span wider than this is compared directly

    def __init__(self, holds: Sequence[Hold]) -> None:
        self.holds = list(holds)
        self.always: list[int] = []  # indexes of holds compared with every segment
        self.by_hour: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(self.holds):
            lo, hi = self._buckets(h.start, h.end)
            if lo is None or hi is None or not 0 <= hi - lo <= self.WIDE:
                self.always.append(i)
                continue
            for b in range(lo, hi + 1):
                self.by_hour[b].append(i)

    def _buckets(self, start: float, end: float) -> tuple[int | None, int | None]:
        if not (math.isfinite(start) and math.isfinite(end)):
            return None, None
        return math.floor(start / self.BUCKET), math.floor(end / self.BUCKET)

    def first_covering(self, seg: Segment, now: float, tolerance: float) -> Hold | None:
        """The first of the holds (in the given order) that covers ``seg``, else None."""
        if not self.holds:
            return None
        lo, hi = self._buckets(*seg.span(tolerance))
        if lo is None or hi is None or hi - lo > self.WIDE:
            candidates: Iterable[int] = range(len(self.holds))
        else:
            found = set(self.always)
            for b in range(lo, hi + 1):
                found.update(self.by_hour.get(b, ()))
            candidates = sorted(found)
        for i in candidates:
            h = self.holds[i]
            if h.covers(seg, now, tolerance):
                return h
        return None


def _site_context(
    rules: SiteRules,
    now: ClockReading,
    holds: Sequence[Hold],
    skew: float,
    site_rules: SiteRules | None = None,
) -> _Site:
    wall = now.wall
    keep = rules.keep
    floor = rules.min_keep
    in_force = [
        h
        for h in holds
        # a hold of another site still covers its roots (the site may have been renamed)
        if (h.site is None or h.site == rules.site or h.roots)
        and (h.released is None or h.released > wall)
        and (h.until is None or h.until > wall)
    ]
    return _Site(
        rules=rules,
        ceiling=_DueTest(keep, rules.tz, wall) if keep is not None else None,
        floor=_DueTest(floor, rules.tz, wall) if floor is not None and not floor.is_zero else None,
        holds=in_force,
        held=_HoldIndex(in_force),
        settle_after=wall - rules.settle,
        keep_txt=("camera keep=" if rules.camera_keep else "keep=") + _dur(keep),
        local=_LocalTime(rules.tz),
        skew=skew,
        site_rules=rules if site_rules is None else site_rules,
    )


def _held_back(seg: Segment, ctx: _Site, wall: float) -> str | None:
    """The reason a segment may not be deleted at all right now (hold, settling), else None."""
    h = ctx.held.first_covering(seg, wall, ctx.skew)
    if h is not None:
        return f"held: {h.label()}"
    if seg.mtime > ctx.settle_after:
        age = wall - seg.mtime
        when = (
            f"modified {age:.0f} s ago" if age >= 0 else "modified in the future (check the clock)"
        )
        return f"settling: {when} (settle={ctx.rules.settle:g} s)"
    return None


def _floor_note(seg: Segment, rules: SiteRules, skew: float) -> str:
    """The floor's end for this segment: the later of the two times' (both must pass it)."""
    until = floor_until(seg.start, rules)
    assert until is not None
    note = ""
    if seg.mtime != seg.start:
        by_mtime = floor_until(seg.mtime, rules)
        assert by_mtime is not None
        if by_mtime > until:
            until = by_mtime
        if is_skewed(seg.start, seg.mtime, skew):
            note = (
                f" (path time {_local(seg.start, rules.tz)} and mtime "
                f"{_local(seg.mtime, rules.tz)} disagree: clock skew, the later one counts)"
            )
    label = "camera min_keep" if rules.camera_min_keep else "min_keep"
    return f"{label}={_dur(rules.min_keep)} until {_local(until, rules.tz)}{note}"


def decide(
    segments: Iterable[Segment],
    now: ClockReading,
    rules: Mapping[str, SiteRules],
    guards: GuardRules,
    holds: Sequence[Hold],
    totals: Mapping[tuple[str, str], int],
    disk: Mapping[str, DiskState] | None = None,
    history: SweepHistory | None = None,
    confirmed: Confirmation | None = None,
    volumes: Sequence[Volume] | None = None,
) -> Plan:
    """Decide one sweep over ``segments`` (the catalog's candidates: everything that may be due,
    plus the oldest segments on volumes under disk pressure). See the module docstring.

    ``volumes``: the file systems holding the roots and which footage is on each. ``disk`` is
    the older per-site form (each site its own volume); it is used only without ``volumes``."""
    wall = now.wall
    if volumes is None:
        volumes = [
            Volume("", d.total, d.free, ((s, None),)) for s, d in sorted((disk or {}).items())
        ]
    plan = Plan(now=wall)
    items: list[Item] = []
    contexts: dict[tuple[str, str | None], _Site] = {}
    unknown: dict[str, int] = {}
    # footage not due by age is kept aside for the disk-pressure pass of its volume
    pressures, site_pressures = _pressures(volumes, rules)

    # The loop runs once per candidate (up to ~150,000 in a purge of several days): per-site
    # values live in locals, refreshed only when the site changes (the catalog hands segments
    # over grouped by site), and fixed-length ceilings are tested inline.
    DELETE, KEEP = Action.DELETE, Action.KEEP
    ctx: _Site | None = None
    ctx_site: str | None = None
    ctx_cam: str | None = None
    per_cam = False  # the site has cameras with rules of their own: a context per camera
    unmanaged = False  # retention: none
    due: _DueTest | None = None
    fixed = False
    secs = 0.0
    expired_txt = ""
    local = _LocalTime(UTC)
    careful_after = 0.0  # mtime above this needs a look (settling); -inf with holds: always
    on_short: list[tuple[bytes | None, _Pressure | None]] | None = None
    for seg in segments:
        site = seg.site
        if site != ctx_site or (per_cam and seg.camera != ctx_cam):
            ctx_site = site
            ctx_cam = seg.camera
            r = rules.get(site)
            ctx = None if r is None else _context(contexts, r, seg.camera, now, holds, guards)
            if ctx is None:
                # a site no longer (or not) in the config: its rules are unknown, so nothing of
                # it may be deleted; the operator hears about it once per site
                unknown[site] = unknown.get(site, 0) + 1
                ctx_site = None  # count every one of them
                continue
            per_cam = bool(ctx.site_rules.cameras)
            unmanaged = not ctx.rules.enforce
            due = ctx.ceiling
            fixed = due is not None and due.fixed
            secs = due.secs if due is not None else 0.0
            expired_txt = f"expired: {ctx.keep_txt}, recorded "
            local = ctx.local
            careful_after = float("-inf") if ctx.holds else ctx.settle_after
            on_short = site_pressures.get(site)
        assert ctx is not None
        if unmanaged:
            # nvr-guard deletes nothing there, by age or for space; a candidate (the catalog
            # hands none over) is shown kept, so a plan says why
            items.append(Item(seg, KEEP, UNMANAGED_REASON))
            continue
        start = seg.start
        mtime = seg.mtime
        # both times must be past the ceiling: the path time (what the camera said) and the
        # mtime (what the host saw); one alone is not trusted (a reset camera clock)
        if fixed:
            is_due = (mtime if mtime > start else start) + secs <= wall
        else:
            is_due = due is not None and due(start) and (mtime == start or due(mtime))
        if not is_due:
            if on_short is not None:
                p = _pressure_of(seg, on_short)
                if p is not None:
                    p.spare.append(seg)
            continue
        # due by age: only a hold, settling or the floor can keep it
        why_not = _held_back(seg, ctx, wall) if seg.mtime > careful_after else None
        if why_not is not None:
            items.append(Item(seg, KEEP, f"{why_not}; otherwise expired ({ctx.keep_txt})"))
        elif ctx.floor is not None and not _past_floor(ctx.floor, seg):
            # keep < min_keep is refused by the config check; kept here in case rules come from
            # elsewhere: the floor wins over the ceiling
            items.append(
                Item(
                    seg,
                    KEEP,
                    f"floor: {_floor_note(seg, ctx.rules, ctx.skew)}; {ctx.keep_txt}",
                )
            )
        else:
            items.append(Item(seg, DELETE, expired_txt + local(start) + " (site-local)"))
            if on_short is not None:
                p = _pressure_of(seg, on_short)
                if p is not None:
                    p.freed += seg.size

    for site in sorted(unknown):
        plan.alerts.append(
            f"site {site}: no retention rules (the site is not in the config) for "
            f"{_n(unknown[site])} in the catalog; none of them is deleted"
        )

    for p in pressures:
        _disk_pressure(p, contexts, wall, items, plan)

    items.sort(key=lambda i: (i.segment.site, i.segment.camera, i.segment.start, i.segment.path))
    plan.items = items
    _guards(plan, now, rules, guards, totals, history, confirmed or Confirmation())
    return plan


def _context(
    contexts: dict[tuple[str, str | None], _Site],
    rules: SiteRules,
    camera: str,
    now: ClockReading,
    holds: Sequence[Hold],
    guards: GuardRules,
) -> _Site:
    """The decision context of a camera's footage: its site's, or its own where the camera has
    a rule of its own (``cameras.<id>``); made once per sweep."""
    key = (rules.site, camera if rules.cameras and rules.camera_rule(camera) else None)
    ctx = contexts.get(key)
    if ctx is None:
        own = rules.for_camera(camera) if key[1] is not None else rules
        ctx = contexts[key] = _site_context(own, now, holds, guards.max_clock_skew, rules)
    return ctx


def _past_floor(floor: _DueTest, seg: Segment) -> bool:
    """Both times are past the floor (the later one decides; see the module docstring)."""
    return floor(seg.start) and (seg.mtime == seg.start or floor(seg.mtime))


def _disk_pressure(
    p: _Pressure,
    contexts: Mapping[tuple[str, str | None], _Site],
    wall: float,
    items: list[Item],
    plan: Plan,
) -> None:
    """Free ``p.need`` bytes of one volume beyond the ordinary expiries, oldest recordings on
    that volume first (whichever of its sites they belong to); each under its own site's rules."""
    freed = p.freed
    under_floor_bytes = 0
    floors: dict[str, str] = {}  # site -> its min_keep, for what the floor kept
    overwritten = overwritten_bytes = 0
    overwrote: dict[str, str] = {}
    # oldest first by the later of the two times: a file named 2000-01-01 by a reset camera
    # clock but written today is young, not the oldest footage of the site
    p.spare.sort(key=lambda s: (s.end, s.path))
    for seg in p.spare:
        if freed >= p.need:
            break
        ctx = contexts.get((seg.site, seg.camera)) or contexts[(seg.site, None)]
        r = ctx.rules
        who = seg.site if r.camera is None else f"{seg.site}/{r.camera}"
        why_not = _held_back(seg, ctx, wall)
        if why_not is not None:
            items.append(
                Item(seg, Action.KEEP, f"{why_not}; wanted by disk pressure ({p.free_note}{p.at})")
            )
            continue
        if ctx.floor is not None and not _past_floor(ctx.floor, seg):
            if r.disk_action == "overwrite-oldest":
                items.append(
                    Item(
                        seg,
                        Action.DELETE,
                        f"overwrite-oldest: {p.free_note}{p.at}, under floor "
                        f"{_floor_note(seg, r, ctx.skew)}, "
                        f"recorded {ctx.local(seg.start)} (site-local)",
                    )
                )
                freed += seg.size
                overwritten += 1
                overwritten_bytes += seg.size
                overwrote[who] = _dur(r.min_keep)
            elif freed + under_floor_bytes < p.need:
                # shown so the operator sees exactly what the floor protects from the shortage
                # (a shortfall's worth of it). Younger footage of another camera or site may
                # still be past its own floor, so the search goes on.
                items.append(
                    Item(
                        seg,
                        Action.KEEP,
                        f"floor: {_floor_note(seg, r, ctx.skew)}; wanted by disk pressure "
                        f"({p.free_note}{p.at})",
                    )
                )
                under_floor_bytes += seg.size
                floors[who] = _dur(r.min_keep)
            continue
        label = "camera min_keep" if r.camera_min_keep else "min_keep"
        floor_txt = f" ({label}={_dur(r.min_keep)})" if r.min_keep is not None else ""
        items.append(
            Item(
                seg,
                Action.DELETE,
                f"disk pressure: {p.free_note}{p.at}, oldest past its floor{floor_txt}, "
                f"recorded {ctx.local(seg.start)} (site-local)",
            )
        )
        freed += seg.size
    missing = p.need - freed
    if overwritten:
        plan.alerts.append(
            f"{p.label}: disk {p.free_note}: overwrite-oldest deletes {_n(overwritten)} "
            f"({human_bytes(overwritten_bytes)}) younger than the floor {_floors(overwrote)}"
        )
    if missing > 0:
        if under_floor_bytes:
            plan.alerts.append(
                f"{p.label}: disk {p.free_note}: {human_bytes(missing)} still to free, but the "
                f"remaining footage is under its floor {_floors(floors)}, which "
                f"protects it; add space or lower the load "
                f"(disk.action: overwrite-oldest would overwrite it)"
            )
        else:
            plan.alerts.append(
                f"{p.label}: disk {p.free_note}: {human_bytes(missing)} still to free after "
                f"deleting everything eligible (the rest is held, still recording, or not yet "
                f"catalogued); add space"
            )


def _floors(by_site: Mapping[str, str]) -> str:
    """``min_keep=30d``, or ``min_keep=30d (gate), 7d (yard)`` when the sites differ."""
    values = set(by_site.values())
    if len(values) == 1:
        return f"min_keep={values.pop()}"
    return "min_keep=" + ", ".join(f"{v} ({s})" for s, v in sorted(by_site.items()))


def _clock_jump(now: ClockReading, history: SweepHistory | None) -> tuple[float, str] | None:
    """(forward jump in seconds, how it was measured), or None without a previous sweep."""
    if history is None or history.last_wall is None:
        return None
    elapsed_wall = now.wall - history.last_wall
    last = datetime.fromtimestamp(history.last_wall, UTC).isoformat(timespec="seconds")
    if history.boot_id == now.boot_id and history.last_boottime is not None:
        elapsed_boot = now.boottime - history.last_boottime
        return (
            elapsed_wall - elapsed_boot,
            f"last sweep {last}; the wall clock advanced {_span(elapsed_wall)} while the boot "
            f"clock advanced {_span(elapsed_boot)}",
        )
    # after a reboot the boot clock restarted: the time the host was down cannot be told from a
    # clock jump, so all of the elapsed wall time counts as a possible jump (safe side)
    return (
        elapsed_wall,
        f"last sweep {last}, before a reboot; the wall clock advanced {_span(elapsed_wall)} and "
        f"the downtime cannot be told from a clock jump",
    )


def _guards(
    plan: Plan,
    now: ClockReading,
    rules: Mapping[str, SiteRules],
    guards: GuardRules,
    totals: Mapping[tuple[str, str], int],
    history: SweepHistory | None,
    confirmed: Confirmation,
) -> None:
    items = plan.items
    blocked_why: dict[int, list[str]] = {}

    jump = _clock_jump(now, history)
    clock_tripped = False
    if jump is not None:
        seconds, how = jump
        if seconds < -_BACKWARD_ALERT:
            # keeping footage longer is never a privacy breach worth stopping for, but the
            # operator must know: settle times and expiries are off by that much
            plan.alerts.append(
                f"clock: the wall clock went back {_span(seconds)} since the last sweep ({how}); "
                f"nothing is deleted early because of it, but check the clock (timedatectl, "
                f"chronyc tracking)"
            )
        elif seconds > guards.max_clock_jump and not _clock_accepted(
            seconds, guards, confirmed, now
        ):
            clock_tripped = True
            idx = [i for i, it in enumerate(items) if it.action is Action.DELETE]
            for i in idx:
                blocked_why.setdefault(i, []).append(
                    f"clock guard (forward jump {_span(seconds)} > {_span(guards.max_clock_jump)})"
                )
            trip = GuardTrip(
                kind="clock-jump",
                site=None,
                camera=None,
                message="",
                count=len(idx),
                total=len(idx),
                bytes=sum(items[i].segment.size for i in idx),
                limit=guards.max_clock_jump,
                cause=f"forward jump of {_span(seconds)} ({how})",
                measured=seconds,
            )
            plan.trips.append(_with_message(trip))

    # mass-deletion guard, per camera: items are sorted by (site, camera, ...)
    per_cam: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        if it.action is Action.DELETE and it.segment.path not in confirmed.paths:
            per_cam.setdefault((it.segment.site, it.segment.camera), []).append(i)
    for (site, camera), idx in per_cam.items():
        count = len(idx)
        total = max(totals.get((site, camera), 0), count)
        fraction = count / total
        if fraction <= guards.max_delete_fraction:
            continue
        for i in idx:
            blocked_why.setdefault(i, []).append(
                f"mass-deletion guard (camera {camera}: {_pct(fraction)} > "
                f"{_pct(guards.max_delete_fraction)})"
            )
        trip = GuardTrip(
            kind="mass-deletion",
            site=site,
            camera=camera,
            message="",
            count=count,
            total=total,
            bytes=sum(items[i].segment.size for i in idx),
            limit=guards.max_delete_fraction,
            cause=_likely_cause(site, rules.get(site), history, clock_tripped),
            measured=fraction,
        )
        plan.trips.append(_with_message(trip))

    for i, why in blocked_why.items():
        it = items[i]
        items[i] = Item(
            it.segment, Action.BLOCKED, f"blocked by the {' and '.join(why)}: {it.reason}"
        )

    if confirmed.whole and plan.trips:
        # A confirmation releases what the admin was shown, nothing else: a guard that trips
        # now (a clock jump after the blocked sweep, many more deletions) withholds all of it
        kinds = " and ".join(sorted({t.kind for t in plan.trips}))
        for i, it in enumerate(items):
            if it.action is Action.DELETE:
                items[i] = Item(
                    it.segment,
                    Action.BLOCKED,
                    f"withheld: the confirmation releases only what it showed, and the {kinds} "
                    f"guard tripped since: {it.reason}",
                )


def _clock_accepted(
    seconds: float, guards: GuardRules, confirmed: Confirmation, now: ClockReading
) -> bool:
    """Whether the admin's confirmation covers a forward jump of ``seconds``: exactly the jump
    they were shown. Measured from the blocked sweep's own clock reading when known (the wall
    clock may have moved on only as the boot clock did; after a reboot in between, all of the
    elapsed wall time counts, as the guard counts it); else the shown jump plus the guard's
    tolerance (sweeps blocked before their readings were kept)."""
    if not confirmed.accept_clock:
        return False
    if confirmed.clock_jump is None:
        return True
    since = confirmed.since
    if since is not None:
        further = now.wall - since.wall
        if since.boot_id == now.boot_id:
            further -= now.boottime - since.boottime
        return seconds <= confirmed.clock_jump + CONFIRM_SLACK and further <= CONFIRM_SLACK
    return seconds <= confirmed.clock_jump + guards.max_clock_jump


def _likely_cause(
    site: str, rules: SiteRules | None, history: SweepHistory | None, clock_tripped: bool
) -> str:
    if history is None or site not in history.site_rules:
        return "first sweep of an existing archive"
    change = _rules_change(history.site_rules[site], rules.describe()) if rules else None
    if change is not None:
        return f"config change: {change}"
    if clock_tripped:
        return "clock jump: the wall clock moved forward since the last sweep (see the clock guard)"
    return "unexpected: check the clock, recently restored or moved recordings"


def _with_message(trip: GuardTrip) -> GuardTrip:
    return replace(trip, message=trip_message(trip, None))


# what a trip message says before its sweep has an id (a plan, or the sweep's stored summary,
# which must read the same every sweep so a repeated trip is audited once)
_CONFIRM_LATER = (
    "`nvr-guard retention confirm SWEEP_ID` (`nvr-guard retention run` gives the sweep id)"
)


def name_sweep(message: str, sweep_id: int) -> str:
    """A trip message written before its sweep had an id, naming sweep ``sweep_id`` instead: the
    admin is told exactly which sweep to confirm."""
    return message.replace(_CONFIRM_LATER, f"`nvr-guard retention confirm {sweep_id}`")


def trip_message(trip: GuardTrip, sweep_id: int | None) -> str:
    """The operator's message for a guard trip: what stopped, how much, the likely cause and the
    exact commands to review and release it."""
    confirm = _CONFIRM_LATER if sweep_id is None else f"`nvr-guard retention confirm {sweep_id}`"
    if trip.kind == "clock-jump":
        what = (
            f"{_n(trip.count)} ({human_bytes(trip.bytes)}) held back"
            if trip.count
            else "nothing is due right now, but deletions stay stopped"
        )
        return (
            f"clock guard: {trip.cause}, more than the {_span(trip.limit)} guard. All deletions "
            f"are stopped ({what}). Check the clock (timedatectl, chronyc tracking); if it is "
            f"right, review with `nvr-guard retention plan`, then {confirm}."
        )
    site = trip.site or "?"
    fraction = trip.count / trip.total if trip.total else 1.0
    return (
        f"camera {trip.camera} (site {site}): {_n(trip.count)} "
        f"({human_bytes(trip.bytes)}) would be deleted, {_pct(fraction)} of its footage "
        f"({trip.count:,} of {trip.total:,}) — over the {_pct(trip.limit)} mass-deletion guard; "
        f"nothing of this camera is deleted. Likely cause: {trip.cause}. Review with "
        f"`nvr-guard retention plan --site {site}`, then {confirm}."
    )
