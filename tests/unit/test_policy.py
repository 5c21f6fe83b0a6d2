"""Retention policy at its boundaries: each test states a situation and the plan it must produce."""

from __future__ import annotations

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvr_guard.model import (
    Action,
    ClockReading,
    DiskState,
    GuardRules,
    Hold,
    Plan,
    Segment,
    SiteRules,
    SweepHistory,
)
from nvr_guard.retention.policy import (
    Confirmation,
    candidate_cutoff,
    decide,
    expiry,
    floor_until,
    trip_message,
)
from nvr_guard.text import Duration

DAY = 86400.0
GiB = 1024**3
SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = ZoneInfo("UTC")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def rules(
    site: str = "gate",
    keep: str | None = "15d",
    min_keep: str | None = None,
    tz: ZoneInfo = UTC,
    settle: float = 120.0,
    min_free: float = 0.0,
    disk_action: str = "alert",
) -> SiteRules:
    return SiteRules(
        site=site,
        keep=Duration.parse(keep) if keep else None,
        min_keep=Duration.parse(min_keep) if min_keep else None,
        tz=tz,
        settle=settle,
        min_free=min_free,
        disk_action=disk_action,
    )


def seg(
    start: float,
    camera: str = "cam-1",
    site: str = "gate",
    size: int = 1000,
    mtime: float | None = None,
    name: str | None = None,
) -> Segment:
    """A segment; its mtime is its start unless given. The boundary tables here measure the
    calendar arithmetic of one instant; a segment's two times (path start, mtime = end) and
    their disagreement are tested in test_segment_time.py."""
    path = f"/srv/rec/{site}/{camera}/{name or int(start)}.mp4".encode()
    return Segment(site, camera, path, start, start if mtime is None else mtime, size)


def clock(wall: float, boottime: float = 10_000.0, boot_id: str = "boot-a") -> ClockReading:
    return ClockReading(wall=wall, boottime=boottime, boot_id=boot_id)


def settled_history(*site_rules: SiteRules, last_wall: float | None = None) -> SweepHistory:
    """A history in which the same rules were already used: no first-sweep / config-change cause."""
    return SweepHistory(site_rules={r.site: r.describe() for r in site_rules})


def plan_for(
    segments: list[Segment],
    now: float | ClockReading,
    site_rules: list[SiteRules] | SiteRules,
    holds: list[Hold] | None = None,
    totals: dict[tuple[str, str], int] | None = None,
    guards: GuardRules | None = None,
    **kw: object,
) -> Plan:
    """decide() with harmless defaults: every camera has a large archive, so the mass-deletion guard
    stays quiet unless a test sets ``totals``; the history says these rules were used before."""
    rl = [site_rules] if isinstance(site_rules, SiteRules) else site_rules
    if totals is None:
        totals = {(s.site, s.camera): 1_000_000 for s in segments}
    kw.setdefault("history", settled_history(*rl))
    return decide(
        segments,
        now if isinstance(now, ClockReading) else clock(now),
        {r.site: r for r in rl},
        guards or GuardRules(),
        holds or [],
        totals,
        **kw,  # type: ignore[arg-type]
    )


def actions(plan: Plan) -> dict[bytes, Action]:
    return {i.segment.path: i.action for i in plan.items}


# ---- ceiling ---------------------------------------------------------------------------------

START = ts("2026-11-01T10:00:00+08:00")


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(-1.0, None), (0.0, Action.DELETE), (1.0, Action.DELETE)],
    ids=["expiry-1s-keeps", "expiry+0s-deletes", "expiry+1s-deletes"],
)
def test_fixed_ceiling_boundary(offset: float, expected: Action | None) -> None:
    r = rules(keep="15d", tz=SHANGHAI)
    s = seg(START)
    assert expiry(START, r) == START + 15 * DAY
    plan = plan_for([s], START + 15 * DAY + offset, r)
    assert actions(plan).get(s.path) is expected
    if expected is Action.DELETE:
        assert plan.items[0].reason == (
            "expired: keep=15d, recorded 2026-11-01T10:00:00+08:00 (site-local)"
        )


@pytest.mark.parametrize(
    ("start", "keep", "expires"),
    [
        ("2026-08-31T10:00:00+08:00", "6mo", "2027-02-28T10:00:00+08:00"),  # clamped to 28 Feb
        ("2027-08-31T10:00:00+08:00", "6mo", "2028-02-29T10:00:00+08:00"),  # leap year: 29 Feb
        ("2028-02-29T10:00:00+08:00", "1y", "2029-02-28T10:00:00+08:00"),  # no 29 Feb next year
        ("2028-02-29T10:00:00+08:00", "4y", "2032-02-29T10:00:00+08:00"),
        ("2026-01-31T23:30:00+08:00", "1mo", "2026-02-28T23:30:00+08:00"),
        ("2026-03-31T00:00:00+08:00", "1mo", "2026-04-30T00:00:00+08:00"),
        ("2026-12-31T12:00:00+08:00", "2mo", "2027-02-28T12:00:00+08:00"),
    ],
)
@pytest.mark.parametrize(("offset", "due"), [(-1.0, False), (0.0, True), (1.0, True)])
def test_calendar_ceiling_boundary(
    start: str, keep: str, expires: str, offset: float, due: bool
) -> None:
    r = rules(keep=keep, tz=SHANGHAI)
    s = seg(ts(start))
    assert expiry(s.start, r) == ts(expires)
    now = ts(expires) + offset
    plan = plan_for([s], now, r)
    assert (actions(plan).get(s.path) is Action.DELETE) is due
    if due:
        assert candidate_cutoff(now, r) is not None
        assert s.start <= candidate_cutoff(now, r)  # type: ignore[operator]


def test_month_end_clamping_is_not_a_prefix_of_start_times() -> None:
    """keep 6mo on 28 Feb 12:00: 31 Aug 01:00 is due (-> 28 Feb 01:00), 30 Aug 23:00 is not
    (-> 28 Feb 23:00) although it was recorded earlier."""
    r = rules(keep="6mo", tz=SHANGHAI)
    early_late = seg(ts("2026-08-30T23:00:00+08:00"), name="a")
    late_early = seg(ts("2026-08-31T01:00:00+08:00"), name="b")
    plan = plan_for([early_late, late_early], ts("2027-02-28T12:00:00+08:00"), r)
    assert actions(plan) == {late_early.path: Action.DELETE}
    cutoff = candidate_cutoff(ts("2027-02-28T12:00:00+08:00"), r)
    assert cutoff is not None and late_early.start <= cutoff


def test_same_instant_in_two_zones() -> None:
    """The recorded instant is the same; the calendar month is added on each site's own wall."""
    start = ts("2026-08-30T20:00:00+00:00")  # Shanghai: 31 Aug 04:00
    utc_site = rules(site="utc-site", keep="6mo", tz=UTC)
    sh_site = rules(site="sh-site", keep="6mo", tz=SHANGHAI)
    assert expiry(start, utc_site) == ts("2027-02-28T20:00:00+00:00")  # 30 Aug + 6mo = 28 Feb
    assert expiry(start, sh_site) == ts("2027-02-28T04:00:00+08:00")  # 31 Aug + 6mo = 28 Feb
    a = seg(start, site="utc-site")
    b = seg(start, site="sh-site")
    plan = plan_for([a, b], ts("2027-02-28T12:00:00+00:00"), [utc_site, sh_site])
    assert actions(plan) == {b.path: Action.DELETE}
    assert "recorded 2026-08-31T04:00:00+08:00 (site-local)" in plan.items[0].reason
    # fixed-length rules do not depend on the zone at all
    assert expiry(start, rules(keep="15d", tz=UTC)) == expiry(start, rules(keep="15d", tz=SHANGHAI))


@given(
    zone=st.sampled_from(["UTC", "Asia/Shanghai", "Europe/Berlin", "America/Sao_Paulo"]),
    keep=st.sampled_from(["1mo", "6mo", "1y", "1mo12h", "2w"]),
    now=st.floats(min_value=1.6e9, max_value=1.9e9),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None)
def test_decide_matches_exact_expiry(zone: str, keep: str, now: float, seed: int) -> None:
    """The per-site shortcut decides exactly like the calendar arithmetic, segment by segment."""
    r = rules(keep=keep, tz=ZoneInfo(zone))
    rng = random.Random(seed)
    cutoff = candidate_cutoff(now, r)
    assert cutoff is not None
    starts = [cutoff + rng.uniform(-6 * DAY, 6 * DAY) for _ in range(300)]
    starts += [cutoff, cutoff - 0.01, cutoff + 0.01]
    segs = [seg(s, name=f"{i}") for i, s in enumerate(starts)]
    plan = plan_for(segs, now, r)
    got = {i.segment.path for i in plan.items if i.action is Action.DELETE}
    want = {s.path for s in segs if expiry(s.start, r) <= now}  # type: ignore[operator]
    assert got == want
    assert all(s.start <= cutoff for s in segs if s.path in want)


def test_keep_forever_deletes_nothing_by_age() -> None:
    r = rules(keep=None)
    assert expiry(START, r) is None and candidate_cutoff(START + 1e9, r) is None
    assert plan_for([seg(START)], START + 1e9, r).items == []


# ---- floor -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "min_keep", "age_days", "expected", "reason_start"),
    [
        ("45d", "30d", 44.9, None, None),  # under the ceiling: not a candidate at all
        ("45d", "30d", 45.0, Action.DELETE, "expired: keep=45d"),
        ("45d", "30d", 60.0, Action.DELETE, "expired: keep=45d"),
        # rules that put the ceiling below the floor (the config check refuses them): floor wins
        ("15d", "30d", 20.0, Action.KEEP, "floor: min_keep=30d until 2026-12-01T10:00:00+08:00"),
        ("15d", "30d", 30.0, Action.DELETE, "expired: keep=15d"),
    ],
)
def test_floor_and_ceiling(
    keep: str, min_keep: str, age_days: float, expected: Action | None, reason_start: str | None
) -> None:
    r = rules(keep=keep, min_keep=min_keep, tz=SHANGHAI)
    assert floor_until(START, r) == ts("2026-12-01T10:00:00+08:00")
    s = seg(START)
    plan = plan_for([s], START + age_days * DAY, r)
    assert actions(plan).get(s.path) is expected
    if reason_start:
        assert plan.items[0].reason.startswith(reason_start)


def test_no_floor() -> None:
    assert floor_until(START, rules(min_keep=None)) is None


# ---- holds and settling ----------------------------------------------------------------------

NOW = START + 20 * DAY  # both cameras' segments at START are 5 days past keep=15d


def _hold(**kw: object) -> Hold:
    base: dict[str, object] = dict(
        id=3, reason="case 17 robbery", owner="alice", start=START - 3600, end=START + 3600
    )
    base.update(kw)
    return Hold(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hold", "held_cameras"),
    [
        (_hold(camera="cam-1", site="gate"), {"cam-1"}),
        (_hold(camera=None, site="gate"), {"cam-1", "cam-2"}),  # site-wide
        (_hold(camera=None, site=None), {"cam-1", "cam-2"}),  # every site
        (_hold(camera=None, site="other"), set()),
        (_hold(camera="cam-1", until=NOW), set()),  # its end has come
        (_hold(camera="cam-1", until=NOW + 1), {"cam-1"}),
        (_hold(camera="cam-1", released=NOW - 60), set()),  # released
        (_hold(camera="cam-1", start=START + 7200, end=START + 9000), set()),  # other footage
    ],
    ids=[
        "camera",
        "site-wide",
        "all-sites",
        "other-site",
        "until-passed",
        "until-ahead",
        "released",
        "other-range",
    ],
)
def test_holds(hold: Hold, held_cameras: set[str]) -> None:
    r = rules(keep="15d", tz=SHANGHAI)
    segs = [seg(START, camera="cam-1"), seg(START, camera="cam-2")]
    plan = plan_for(segs, NOW, r, holds=[hold])
    assert len(plan.items) == 2
    for item in plan.items:
        if item.segment.camera in held_cameras:
            assert item.action is Action.KEEP
            assert item.reason.startswith("held: hold 3 (manual: case 17 robbery, by alice)")
        else:
            assert item.action is Action.DELETE


@pytest.mark.parametrize(
    ("modified_ago", "expected", "reason_start"),
    [
        (40.0, Action.KEEP, "settling: modified 40 s ago (settle=120 s)"),
        (119.0, Action.KEEP, "settling: modified 119 s ago (settle=120 s)"),
        (120.0, Action.DELETE, "disk pressure"),
        (-30.0, Action.KEEP, "settling: modified in the future"),
    ],
)
def test_settling(modified_ago: float, expected: Action, reason_start: str) -> None:
    # a file still written to is never due by age (its mtime is recent, and both times must be
    # past keep), but disk pressure reaches it: a long recording with an old start
    s = seg(START, mtime=NOW - modified_ago)
    r = rules(keep="1y", settle=120, min_free=0.1)
    plan = plan_for([s], NOW, r, disk={"gate": DiskState(total=1_000_000, free=0)})
    assert plan.items[0].action is expected
    assert plan.items[0].reason.startswith(reason_start)


def test_hold_beats_settling() -> None:
    s = seg(START, mtime=NOW - 10)
    r = rules(keep="1y", min_free=0.1)
    plan = plan_for([s], NOW, r, holds=[_hold()], disk={"gate": DiskState(total=1_000_000, free=0)})
    assert plan.items[0].reason.startswith("held: hold 3")


# ---- disk pressure ---------------------------------------------------------------------------

PNOW = ts("2026-11-20T12:00:00+08:00")


def _pressure_tree() -> list[Segment]:
    """Ten daily segments of 10,000 bytes, 34.5 .. 25.5 days old; the floor is 30 days."""
    return [seg(PNOW - (34.5 - i) * DAY, size=10_000, name=f"day{i:02}") for i in range(10)]


def _pressure_rules(action: str) -> SiteRules:
    return rules(keep="1y", min_keep="30d", tz=SHANGHAI, min_free=0.10, disk_action=action)


def test_disk_pressure_deletes_oldest_and_stops_at_floor() -> None:
    segs = _pressure_tree()
    hold = _hold(camera="cam-1", start=segs[1].start - 1, end=segs[1].start + 1)
    # 10% of 1,000,000 must be free, 30,000 is: 70,000 bytes to free
    disk = {"gate": DiskState(total=1_000_000, free=30_000)}
    plan = plan_for(segs, PNOW, _pressure_rules("alert"), holds=[hold], disk=disk)
    act = actions(plan)
    deleted = [s for s in segs if act.get(s.path) is Action.DELETE]
    # oldest first, past the floor only (day00..day04 are 34.5..30.5 days old), the held one skipped
    assert deleted == [segs[0], segs[2], segs[3], segs[4]]
    assert act[segs[1].path] is Action.KEEP
    by_path = {i.segment.path: i.reason for i in plan.items}
    assert by_path[segs[0].path].startswith(
        "disk pressure: free 3.0% < min_free 10%, oldest past its floor"
    )
    assert by_path[segs[1].path].startswith("held: hold 3")
    # what the floor protects from the shortage is shown, not deleted
    assert act[segs[5].path] is Action.KEEP and act[segs[6].path] is Action.KEEP
    assert by_path[segs[5].path].startswith("floor: min_keep=30d until ")
    assert segs[9].path not in act  # not needed to cover the shortage: omitted
    assert len(plan.alerts) == 1
    alert = plan.alerts[0]
    assert "site gate" in alert and "29.3 KiB still to free" in alert
    assert "under its floor min_keep=30d" in alert


def test_overwrite_oldest_crosses_the_floor_but_never_a_hold() -> None:
    segs = _pressure_tree()
    hold = _hold(camera="cam-1", start=segs[6].start - 1, end=segs[6].start + 1)
    disk = {"gate": DiskState(total=1_000_000, free=30_000)}
    plan = plan_for(segs, PNOW, _pressure_rules("overwrite-oldest"), holds=[hold], disk=disk)
    act = actions(plan)
    deleted = [s for s in segs if act.get(s.path) is Action.DELETE]
    assert deleted == [segs[i] for i in (0, 1, 2, 3, 4, 5, 7)]
    assert act[segs[6].path] is Action.KEEP
    by_path = {i.segment.path: i.reason for i in plan.items}
    assert by_path[segs[5].path].startswith(
        "overwrite-oldest: free 3.0% < min_free 10%, under floor"
    )
    assert "min_keep=30d" in by_path[segs[5].path]
    assert by_path[segs[4].path].startswith("disk pressure:")
    assert any("overwrite-oldest deletes 2 segments" in a for a in plan.alerts)


def test_disk_pressure_counts_ordinary_expiries_first() -> None:
    r = rules(keep="30d", min_keep="30d", tz=SHANGHAI, min_free=0.10)
    segs = _pressure_tree()
    disk = {"gate": DiskState(total=1_000_000, free=70_000)}  # 30,000 to free
    plan = plan_for(segs, PNOW, r, disk=disk)
    # the five expired ones free 50,000 already: nothing else is touched
    assert [i.segment for i in plan.items] == segs[:5]
    assert all(i.reason.startswith("expired:") for i in plan.items)
    assert plan.alerts == []


def test_no_disk_pressure_when_enough_free() -> None:
    segs = _pressure_tree()
    disk = {"gate": DiskState(total=1_000_000, free=100_000)}
    assert plan_for(segs, PNOW, _pressure_rules("alert"), disk=disk).items == []


# ---- mass-deletion guard ---------------------------------------------------------------------

MNOW = START + 40 * DAY


def _mass_case() -> tuple[list[Segment], dict[tuple[str, str], int]]:
    big = int(7.64 * GiB)
    a = [seg(START + i * 60, camera="gate-03", size=big, name=f"a{i}") for i in range(5)]
    b = [seg(START + i * 60, camera="gate-04", size=big, name=f"b{i}") for i in range(5)]
    return a + b, {("gate", "gate-03"): 10, ("gate", "gate-04"): 100}


@pytest.mark.parametrize(
    ("history", "cause"),
    [
        (None, "first sweep of an existing archive"),
        (
            SweepHistory(site_rules={"other": "keep=1y min_keep=none"}),
            "first sweep of an existing archive",
        ),
        (
            SweepHistory(site_rules={"gate": "keep=30d min_keep=none"}),
            "config change: keep 30d -> 15d",
        ),
        (
            SweepHistory(site_rules={"gate": "keep=15d min_keep=none"}),
            "unexpected: check the clock, recently restored or moved recordings",
        ),
    ],
    ids=["no-history", "site-new", "config-change", "unexpected"],
)
def test_mass_deletion_guard_per_camera(history: SweepHistory | None, cause: str) -> None:
    segs, totals = _mass_case()
    plan = plan_for(segs, MNOW, rules(keep="15d"), totals=totals, history=history)
    by_cam = {(i.segment.camera, i.action) for i in plan.items}
    # gate-03 would lose 50% of its footage: stopped; gate-04 loses 5%: proceeds
    assert by_cam == {("gate-03", Action.BLOCKED), ("gate-04", Action.DELETE)}
    blocked = [i for i in plan.items if i.action is Action.BLOCKED]
    assert all(i.reason.startswith("blocked by the mass-deletion guard") for i in blocked)
    assert all("expired: keep=15d" in i.reason for i in blocked)
    (trip,) = plan.trips
    assert (trip.kind, trip.site, trip.camera, trip.count, trip.total) == (
        "mass-deletion",
        "gate",
        "gate-03",
        5,
        10,
    )
    msg = trip_message(trip, 17)
    for part in (
        "camera gate-03",
        "5 segments (38.2 GiB)",
        "50% of its footage",
        "over the 20% mass-deletion guard",
        f"Likely cause: {cause}.",
        "`nvr-guard retention plan --site gate`",
        "`nvr-guard retention confirm 17`",
    ):
        assert part in msg, (part, msg)
    # before the sweep has an id, the message says where the id comes from
    assert "SWEEP_ID" in trip.message and "retention run" in trip.message


def test_mass_deletion_cause_clock_jump() -> None:
    segs, totals = _mass_case()
    r = rules(keep="15d")
    hist = SweepHistory(
        last_wall=MNOW - 3 * DAY,
        last_boottime=9_000.0,
        boot_id="boot-a",
        site_rules={"gate": r.describe()},
    )
    plan = plan_for(segs, clock(MNOW, 10_000.0), r, totals=totals, history=hist)
    mass = [t for t in plan.trips if t.kind == "mass-deletion"]
    assert len(mass) == 1 and "Likely cause: clock jump" in mass[0].message


@pytest.mark.parametrize(
    ("confirmed_count", "expected"),
    [
        (5, Action.DELETE),  # all confirmed
        (3, Action.DELETE),  # two left: 2 of 10 = 20%, not over the guard
        (2, Action.BLOCKED),  # three left: 30%
    ],
)
def test_confirmation_exempts(confirmed_count: int, expected: Action) -> None:
    segs, totals = _mass_case()
    conf = Confirmation(paths=frozenset(s.path for s in segs[:confirmed_count]))
    plan = plan_for(segs, MNOW, rules(keep="15d"), totals=totals, history=None, confirmed=conf)
    act = actions(plan)
    assert all(act[s.path] is Action.DELETE for s in segs[:confirmed_count])
    assert all(act[s.path] is expected for s in segs[confirmed_count:5])
    assert bool(plan.trips) is (expected is Action.BLOCKED)


def test_camera_without_total_is_guarded() -> None:
    s = seg(START)
    plan = plan_for([s], MNOW, rules(), totals={}, history=None)
    assert plan.items[0].action is Action.BLOCKED


# ---- clock guard -----------------------------------------------------------------------------

CNOW = START + 20 * DAY


@pytest.mark.parametrize(
    ("wall_elapsed", "boot_elapsed", "same_boot", "accept", "blocked"),
    [
        (2 * DAY, 2 * DAY, True, False, False),  # two days passed on both clocks: fine
        (2 * DAY, 3600.0, True, False, True),  # wall jumped ~1 d 23 h ahead of the boot clock
        (DAY + 3600, 3600.0, True, False, False),  # a jump of exactly 1 d: not more than the guard
        (DAY + 3601, 3600.0, True, False, True),
        (3600.0, 3600.0, False, False, False),  # rebooted, an hour since the last sweep
        (2 * DAY, 2 * DAY, False, False, True),  # rebooted, two days: cannot tell, be safe
        (2 * DAY, 3600.0, True, True, False),  # the admin confirmed the clock
    ],
)
def test_clock_guard(
    wall_elapsed: float, boot_elapsed: float, same_boot: bool, accept: bool, blocked: bool
) -> None:
    r = rules(keep="15d")
    segs = [seg(START, camera="cam-1"), seg(START, camera="cam-2", site="lobby")]
    lobby = rules(site="lobby", keep="15d")
    hist = SweepHistory(
        last_wall=CNOW - wall_elapsed,
        last_boottime=50_000.0 - boot_elapsed,
        boot_id="boot-a",
        site_rules={"gate": r.describe(), "lobby": lobby.describe()},
    )
    now = clock(CNOW, 50_000.0, "boot-a" if same_boot else "boot-b")
    plan = plan_for(
        segs, now, [r, lobby], history=hist, confirmed=Confirmation(accept_clock=accept)
    )
    assert len(plan.items) == 2
    want = Action.BLOCKED if blocked else Action.DELETE
    assert all(i.action is want for i in plan.items)  # all sites and cameras alike
    if blocked:
        (trip,) = plan.trips
        assert trip.kind == "clock-jump" and trip.count == 2
        assert all(i.reason.startswith("blocked by the clock guard") for i in plan.items)
        msg = trip_message(trip, 9)
        assert "more than the 1 d guard" in msg
        assert "`nvr-guard retention confirm 9`" in msg and "retention plan" in msg
        if not same_boot:
            assert "reboot" in msg
    else:
        assert plan.trips == []


def test_clock_guard_trips_with_nothing_due() -> None:
    """Stopping only when something is due would let the next sweep delete on a wrong clock."""
    hist = SweepHistory(last_wall=CNOW - 5 * DAY, last_boottime=0.0, boot_id="boot-a")
    plan = plan_for([], clock(CNOW, 60.0), rules(), history=hist)
    (trip,) = plan.trips
    assert trip.kind == "clock-jump" and "deletions stay stopped" in trip.message


def test_backward_jump_alerts_only() -> None:
    r = rules(keep="15d")
    hist = SweepHistory(
        last_wall=CNOW + 3 * 3600,
        last_boottime=49_000.0,
        boot_id="boot-a",
        site_rules={"gate": r.describe()},
    )
    plan = plan_for([seg(START)], clock(CNOW, 50_000.0), r, history=hist)
    assert [i.action for i in plan.items] == [Action.DELETE]
    assert plan.trips == []
    assert len(plan.alerts) == 1 and "went back" in plan.alerts[0]


def test_first_sweep_has_no_clock_guard() -> None:
    plan = plan_for(
        [seg(START)],
        CNOW,
        rules(),
        history=SweepHistory(site_rules={"gate": "keep=15d min_keep=none"}),
    )
    assert [i.action for i in plan.items] == [Action.DELETE] and plan.trips == []


# ---- the plan as a whole ---------------------------------------------------------------------


def test_every_item_explained_and_ordered() -> None:
    r = rules(keep="15d", min_keep="10d", tz=SHANGHAI, min_free=0.5)
    segs = [
        seg(
            START + i * 3600,
            camera=cam,
            size=100,
            name=f"{cam}-{i}",
            mtime=CNOW - 5 if i == 3 else None,
        )
        for cam in ("cam-2", "cam-1", "cam-3")
        for i in range(12 * 24)  # 12 days of hourly segments, the last 7 past the floor only
    ]
    holds = [_hold(camera="cam-3", start=START, end=START + 10 * 3600)]
    disk = {"gate": DiskState(total=10**6, free=10**5)}
    shuffled = list(segs)
    random.Random(4).shuffle(shuffled)
    plan = plan_for(shuffled, CNOW, r, holds=holds, disk=disk)
    assert {i.action for i in plan.items} == {Action.DELETE, Action.KEEP}
    prefixes = ("expired:", "held:", "settling:", "floor:", "disk pressure:")
    assert all(i.reason.startswith(prefixes) for i in plan.items)
    keys = [(i.segment.site, i.segment.camera, i.segment.start, i.segment.path) for i in plan.items]
    assert keys == sorted(keys)
    again = plan_for(segs, CNOW, r, holds=holds, disk=disk)
    assert [(i.segment, i.action, i.reason) for i in again.items] == [
        (i.segment, i.action, i.reason) for i in plan.items
    ]


def test_segments_of_unknown_site_are_never_deleted() -> None:
    s = seg(START, site="removed")
    plan = plan_for([s], CNOW, rules())
    assert plan.items == []
    assert plan.alerts == [
        "site removed: no retention rules (the site is not in the config) for 1 segment in the "
        "catalog; none of them is deleted"
    ]


def test_not_due_candidates_are_omitted() -> None:
    plan = plan_for([seg(CNOW - DAY)], CNOW, rules(keep="15d"), holds=[_hold(start=0, end=1e12)])
    assert plan.items == [] and plan.trips == [] and plan.alerts == []


@given(
    zone=st.sampled_from(
        [
            "UTC",
            "Asia/Shanghai",
            "Asia/Kathmandu",
            "Australia/Lord_Howe",
            "Europe/Berlin",
            "America/St_Johns",
        ]
    ),
    start=st.floats(min_value=-1e9, max_value=2.5e9),
)
@settings(max_examples=300, deadline=None)
def test_recorded_time_is_site_local_iso(zone: str, start: float) -> None:
    tz = ZoneInfo(zone)
    plan = plan_for([seg(start)], start + 16 * DAY, rules(keep="15d", tz=tz))
    local = datetime.fromtimestamp(start, tz).isoformat(timespec="seconds")
    assert plan.items[0].reason == f"expired: keep=15d, recorded {local} (site-local)"


@pytest.mark.parametrize(
    ("zone", "now_text", "keep"),
    [
        ("Europe/Berlin", "2027-03-28T02:30:00+00:00", "6mo"),  # spring forward at the expiry
        ("Europe/Berlin", "2027-04-25T01:30:00+00:00", "6mo"),  # fall back (Oct) at the start
        ("Europe/Berlin", "2026-10-25T00:30:00+00:00", "1y"),
        ("America/Sao_Paulo", "2019-02-17T02:30:00+00:00", "1mo"),  # midnight transition
        ("Asia/Shanghai", "2027-02-28T04:00:00+00:00", "6mo"),  # month end, no DST
        ("UTC", "2028-02-29T23:59:59+00:00", "1y"),
    ],
)
def test_calendar_decision_near_transitions_is_exact(zone: str, now_text: str, keep: str) -> None:
    r = rules(keep=keep, tz=ZoneInfo(zone))
    now = ts(now_text)
    cutoff = candidate_cutoff(now, r)
    assert cutoff is not None
    # every 7 minutes 13 seconds across the days before the cutoff (near a DST change it is a
    # week generous) and a little after it
    segs = [seg(cutoff - 16 * DAY + i * 433.0, name=f"{i}") for i in range(int(18 * DAY / 433))]
    plan = plan_for(segs, now, r)
    got = {i.segment.path for i in plan.items if i.action is Action.DELETE}
    want = {s.path for s in segs if expiry(s.start, r) <= now}  # type: ignore[operator]
    assert got == want and want
    assert max(s.start for s in segs if s.path in want) <= cutoff


_EDGES = [START + k * 1800.0 for k in range(-6, 7)] + [float("-inf"), float("inf")]


@settings(max_examples=300, deadline=None)
@given(
    holds=st.lists(
        st.tuples(
            st.sampled_from(_EDGES),
            st.sampled_from(_EDGES),
            st.sampled_from([None, "cam-1", "cam-2"]),
            st.sampled_from([None, NOW - 60, NOW + 60]),
        ),
        max_size=12,
    ),
    segs=st.lists(
        st.tuples(
            st.sampled_from([k * 900.0 for k in range(-12, 13)]),
            st.sampled_from([0.0, 60.0, -7200.0, 30 * DAY]),  # mtime - start: ahead, far ahead
            st.sampled_from(["cam-1", "cam-2"]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_the_hold_index_names_the_hold_a_walk_over_all_of_them_names(
    holds: list[tuple[float, float, str | None, float | None]],
    segs: list[tuple[float, float, str]],
) -> None:
    # the sweep looks a segment's holds up by the hours they hold; what it names (or that it
    # names none) must be what comparing the segment with every hold in order would give
    from nvr_guard.retention.policy import _HoldIndex

    hs = [
        _hold(id=i, start=a, end=b, camera=c, released=rel)
        for i, (a, b, c, rel) in enumerate(holds)
    ]
    index = _HoldIndex(hs)
    for off, ahead, cam in segs:
        s = seg(START + off, camera=cam, mtime=START + off + ahead)
        walked = next((h for h in hs if h.covers(s, NOW, 3600.0)), None)
        assert index.first_covering(s, NOW, 3600.0) is walked
