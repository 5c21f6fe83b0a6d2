"""Per-camera retention (``cameras.<id>: {keep, min_keep}``) and ``sites.<name>.retention: none``:
the config refuses what would break a site's floor, the policy follows a camera's own rule and
says so in its reasons, and a site under the recorder's own retention loses nothing."""

from __future__ import annotations

import textwrap
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.config import check_config, load_config
from nvr_guard.model import (
    UNMANAGED_REASON,
    Action,
    CameraRule,
    ClockReading,
    GuardRules,
    Segment,
    SiteRules,
    SweepHistory,
    Volume,
)
from nvr_guard.retention.expiry import ExpiryCalc
from nvr_guard.retention.policy import decide
from nvr_guard.text import Duration

DAY = 86400.0
UTC = ZoneInfo("UTC")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()


def D(s: str) -> Duration:
    return Duration.parse(s)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "rec-a").mkdir(exist_ok=True)
    (tmp_path / "rec-b").mkdir(exist_ok=True)
    text = textwrap.dedent(text).lstrip("\n").replace("@T", str(tmp_path))
    # (a text already flush left is left as it is)
    p = tmp_path / "config.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def errors_of(path: Path) -> list[tuple[int, str]]:
    cfg, errors, _ = check_config(path)
    assert cfg is None, "the config was accepted"
    return [(line, msg) for _src, line, msg in errors]


# ---- the config --------------------------------------------------------------------------------


SITES = """sites:
  a: {keep: 90d, min_keep: 5d, roots: [@T/rec-a]}
  b: {profile: residential, keep: 45d, roots: [@T/rec-b]}
  hik:
    retention: none
    roots: [@T/rec-a/hik]
cameras:
"""


@pytest.mark.parametrize(
    ("cameras", "line", "fragment"),
    [
        # below the floor of one of the sites (camera ids are matched at every site; the
        # retention: none site has no floor)
        (
            "  gate-03: {keep: 7d}",
            8,
            "cameras.gate-03.keep: 7d is shorter than the floor of site b (min_keep 30d)",
        ),
        (
            "  gate-03:\n    level: 1\n    min_keep: 3d",
            10,
            "cameras.gate-03.min_keep: 3d is shorter than the floor of site a (min_keep 5d), "
            "site b (min_keep 30d)",
        ),
        # the camera's own ceiling below its own floor
        (
            "  gate-03:\n    min_keep: 60d\n    keep: 40d",
            10,
            "cameras.gate-03.keep: keep 40d is shorter than min_keep 60d",
        ),
        # a camera floor above a site's ceiling, without a ceiling of its own
        (
            "  gate-03: {min_keep: 60d}",
            8,
            "cameras.gate-03.min_keep: 60d is longer than the keep of site b (keep 45d)",
        ),
    ],
    ids=["keep-below-floor", "min-keep-below-floors", "keep-below-own-floor", "floor-over-keep"],
)
def test_camera_rule_outside_the_site_floor_is_an_error_at_its_line(
    tmp_path: Path, cameras: str, line: int, fragment: str
) -> None:
    (tmp_path / "rec-a" / "hik").mkdir(parents=True)
    path = write(tmp_path, SITES + cameras + "\n")
    got = errors_of(path)
    assert (line, fragment) in [(ln, m[: len(fragment)]) for ln, m in got], got


def test_camera_rules_within_every_floor_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sites:
          a: {keep: 15d, min_keep: 5d, roots: [@T/rec-a]}
          b: {profile: residential, roots: [@T/rec-b]}
        cameras:
          front: {keep: 90d, min_keep: 60d, level: 1}
          side: {keep: 30d}
          plain: {level: 2}
        """,
    )
    cfg = load_config(path)
    rules = cfg.site_rules()
    assert rules["a"].cameras == (
        CameraRule("front", D("90d"), D("60d")),
        CameraRule("side", D("30d"), None),
    )
    front = rules["a"].for_camera("front")
    assert (front.keep, front.min_keep, front.camera_keep) == (D("90d"), D("60d"), True)
    side = rules["b"].for_camera("side")
    assert (side.keep, side.min_keep) == (D("30d"), D("30d"))  # the site's floor stays
    assert rules["a"].for_camera("plain") is rules["a"]
    assert "cameras.front.keep=90d" in rules["a"].describe()
    eff = cfg.effective()
    assert eff["cameras"]["front"]["keep"] == "90d" and eff["cameras"]["plain"]["keep"] is None


@pytest.mark.parametrize(
    ("site", "line", "fragment"),
    [
        ("    retention: none\n    keep: 30d", 4, "sites.hik.keep: contradicts retention: none"),
        ("    retention: none\n    profile: general", 4, "sites.hik.profile: contradicts"),
        ("    retention: none\n    min_keep: 30d", 4, "sites.hik.min_keep: contradicts"),
        ("    retention: enforce", 3, "sites.hik.retention: 'enforce' is not one of: none"),
    ],
)
def test_retention_none_refuses_a_rule_beside_it(
    tmp_path: Path, site: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, f"sites:\n  hik:\n{site}\n    roots: [@T/rec-a]\n")
    got = errors_of(path)
    assert (line, fragment) in [(ln, m[: len(fragment)]) for ln, m in got], got


def test_retention_none_site_needs_no_rule_and_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sites:
          hik: {retention: none, roots: [@T/rec-a]}
          gate: {keep: 15d, roots: [@T/rec-b]}
        cameras:
          front: {keep: 90d}
        """,
    )
    cfg = load_config(path)
    r = cfg.site_rules()["hik"]
    assert (r.enforce, r.keep, r.min_keep, r.cameras, r.min_free) == (False, None, None, (), 0.0)
    assert r.describe() == "retention=none"
    eff = cfg.effective()
    assert eff["sites"]["hik"]["retention"] == "none" and eff["sites"]["gate"]["retention"] is None
    again = tmp_path / "again.yaml"
    import yaml

    again.write_text(yaml.safe_dump(eff, allow_unicode=True), encoding="utf-8")
    assert load_config(again).site_rules() == cfg.site_rules()


# ---- the policy --------------------------------------------------------------------------------


def rules(
    keep: str = "15d",
    min_keep: str | None = None,
    cameras: tuple[CameraRule, ...] = (),
    enforce: bool = True,
    min_free: float = 0.0,
) -> SiteRules:
    return SiteRules(
        site="gate",
        keep=D(keep) if enforce else None,
        min_keep=D(min_keep) if min_keep and enforce else None,
        tz=UTC,
        settle=120.0,
        min_free=min_free,
        cameras=cameras,
        enforce=enforce,
    )


def seg(camera: str, days_ago: float, size: int = 1000) -> Segment:
    start = NOW - days_ago * DAY
    return Segment("gate", camera, f"/r/{camera}/{days_ago}.mp4".encode(), start, start, size)


def clock() -> ClockReading:
    return ClockReading(wall=NOW, boottime=1e4, boot_id="b")


def plan_of(
    segs: list[Segment],
    r: SiteRules,
    history: SweepHistory | None = None,
    free: int | None = None,
    fraction: float = 1.0,
) -> dict[bytes, tuple[Action, str]]:
    volumes = [Volume("/r", 1_000_000, free, (("gate", None),))] if free is not None else []
    totals = {("gate", c): 10 for c in {s.camera for s in segs}}
    plan = decide(
        sorted(segs, key=lambda s: (s.camera, s.start)),
        clock(),
        {"gate": r},
        GuardRules(max_delete_fraction=fraction),
        [],
        totals,
        history=history,
        volumes=volumes,
    )
    return {i.segment.path: (i.action, i.reason) for i in plan.items}


def test_a_camera_keep_of_its_own_is_followed_and_named_in_the_reason() -> None:
    r = rules(keep="15d", cameras=(CameraRule("front", D("90d")),))
    segs = [seg("front", 30), seg("front", 100), seg("side", 30)]
    got = plan_of(segs, r)
    assert seg("front", 30).path not in got or got[seg("front", 30).path][0] is Action.KEEP
    action, reason = got[seg("front", 100).path]
    assert action is Action.DELETE and reason.startswith("expired: camera keep=90d, recorded ")
    action, reason = got[seg("side", 30).path]
    assert action is Action.DELETE and reason.startswith("expired: keep=15d, recorded ")


def test_a_camera_floor_of_its_own_holds_under_disk_pressure() -> None:
    r = rules(
        keep="1y", min_keep="1d", cameras=(CameraRule("front", None, D("30d")),), min_free=0.5
    )
    front = [seg("front", d, 100_000) for d in (20, 19, 18)]  # the oldest: first in line
    side = [seg("side", d, 100_000) for d in (10, 9, 8, 7)]
    got = plan_of(front + side, r, free=300_000)  # 200,000 bytes to free
    # a shortfall's worth of what the camera's floor protects is shown; none of it goes
    assert front[0].path in got
    for s in front:
        action, reason = got.get(s.path, (Action.KEEP, "floor: camera min_keep=30d until "))
        assert action is Action.KEEP and reason.startswith("floor: camera min_keep=30d until ")
    assert [got[s.path][0] for s in side[:2]] == [Action.DELETE, Action.DELETE]
    assert all(s.path not in got for s in side[2:])


def test_a_camera_keep_change_is_named_as_the_guard_trips_cause() -> None:
    before = rules(keep="15d", cameras=(CameraRule("front", D("90d")),))
    after = rules(keep="15d", cameras=(CameraRule("front", D("7d")),))
    segs = [seg("front", d) for d in (8, 9, 10)]
    history = SweepHistory(site_rules={"gate": before.describe()})
    got = plan_of(segs, after, history=history, fraction=0.2)
    assert {a for a, _ in got.values()} == {Action.BLOCKED}
    plan = decide(
        segs,
        clock(),
        {"gate": after},
        GuardRules(max_delete_fraction=0.2),
        [],
        {("gate", "front"): 10},
        history=history,
    )
    (trip,) = plan.trips
    assert trip.cause == "config change: cameras.front.keep 90d -> 7d"


def test_a_camera_moved_into_a_site_by_a_reload_is_named_as_the_guard_trips_cause() -> None:
    # the cause read "unexpected: check the clock ..." after sites.*.cameras moved a camera
    from dataclasses import replace

    before = replace(rules(keep="15d"), claims=("front",))
    after = replace(rules(keep="15d"), claims=("front", "other"))
    segs = [seg("other", d) for d in (20, 21, 22)]
    plan = decide(
        segs,
        clock(),
        {"gate": after},
        GuardRules(max_delete_fraction=0.2),
        [],
        {("gate", "other"): 10},
        history=SweepHistory(site_rules={"gate": before.describe()}),
    )
    (trip,) = plan.trips
    assert trip.cause == "config change: claims front -> front,other"


def test_retention_none_keeps_everything_it_is_handed() -> None:
    r = rules(enforce=False)
    segs = [seg("cam", 5000), seg("cam", 1)]
    got = plan_of(segs, r, free=0)
    assert set(got.values()) == {(Action.KEEP, UNMANAGED_REASON)}


def test_expiry_follows_the_camera_rule() -> None:
    r = rules(keep="15d", cameras=(CameraRule("front", D("6mo")), CameraRule("side", D("90d"))))
    calc = ExpiryCalc(r)
    t = NOW - 10 * DAY
    assert calc(t, t, "other") == t + 15 * DAY
    assert calc(t, t, "side") == t + 90 * DAY
    assert calc(t, t, "front") == D("6mo").after_ts(t, UTC)
    assert calc(t, t) == t + 15 * DAY  # no camera: the site's rule
    assert ExpiryCalc(rules(enforce=False))(t, t, "front") is None


def test_a_camera_month_is_held_to_a_floor_by_the_shortest_month(tmp_path) -> None:
    # 1mo may be 28 days: below a 30d floor in February; it was accepted against 29d and 30d
    from nvr_guard.config import check_config

    root = tmp_path / "rec"
    root.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(
        f"sites:\n  a: {{keep: 1y, min_keep: 30d, roots: [{root}]}}\n"
        "cameras:\n  front: {keep: 1mo}\n  side: {keep: 1min}\n"
    )
    cfg, errors, _ = check_config(path)
    assert cfg is None
    msgs = sorted(m for _f, _ln, m in errors)
    assert len(msgs) == 2
    assert msgs[0].startswith("cameras.front.keep: 1mo is shorter than the floor of site a")
    assert msgs[1].startswith("cameras.side.keep: 1min is shorter")  # it said "1m"
