"""Where `retention plan` comes from (issue 19): the daemon's catalog while a daemon runs under
the same config, a copy of that catalog when root previews another config file, and a walk of
the roots with ``--rescan`` or without a daemon. Each must give the plan a full walk gives."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.fixtures.site import Site, build_tree, make_config


def plan(site: Site, *args: str, config: Path | None = None) -> dict[str, Any]:
    cfg = ["--config", str(config)] if config else []
    r = site.run(*cfg, "--json", "retention", "plan", *args)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def judged(res: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {i["path"]: (i["action"], i["reason"].split(":")[0]) for i in res["items"]}


def catalog_state(site: Site) -> tuple[int, int, float]:
    """(sweeps recorded, segments, sum of expiries): what a plan must leave as it was."""
    con = sqlite3.connect(site.state / "catalog.db")
    try:
        sweeps = con.execute("SELECT count(*) FROM sweeps").fetchone()[0]
        n, total = con.execute("SELECT count(*), total(expires_at) FROM segments").fetchone()
        return int(sweeps), int(n), float(total)
    finally:
        con.close()


def test_the_daemon_plans_from_its_catalog_as_a_walk_would(site, daemon, now):
    files = build_tree(site.root, ["cam1", "cam2"], days=14, per_day=24, now=now)
    # a plan three days ahead must not stop at the clock guard
    text = make_config(site, sweep_every="1h", fraction=1.0)
    site.config.write_text(text.replace("max_clock_jump: 1d", "max_clock_jump: 30d"))
    daemon()
    ahead = (now + timedelta(days=3)).isoformat()  # three days' footage past keep: 15d
    before = catalog_state(site)

    from_catalog = plan(site, "--now", ahead)
    walked = plan(site, "--now", ahead, "--rescan")
    assert (from_catalog["basis"], from_catalog["walked"]) == ("catalog", [])
    assert (walked["basis"], walked["walked"]) == ("rescan", ["toll"])
    due = {p for p, (action, _) in judged(from_catalog).items() if action == "delete"}
    assert 50 < len(due) < len(files)
    assert judged(from_catalog) == judged(walked)
    # a dry run through the daemon records nothing: no sweep, no expiry changed, nothing gone
    assert catalog_state(site) == before
    assert all(Path(p).exists() for p in due)

    # a person's view gets the per-camera summary from the daemon, not every segment
    human = site.run("retention", "plan", "--now", ahead)
    assert human.returncode == 0, human.stderr
    assert "from the daemon's catalog" in human.stdout
    assert f"to delete {len(due)}," in human.stdout
    for cam in ("cam1", "cam2"):
        mine = sum(1 for i in from_catalog["items"] if i["camera"] == cam and i["path"] in due)
        row = next(ln for ln in human.stdout.splitlines() if f" {cam} " in f" {ln} ")
        assert f"{mine:,}" in row.split()


def test_root_previews_another_config_on_a_copy_of_the_catalog(site, daemon, now):
    build_tree(site.root, ["cam1", "cam2"], days=14, per_day=24, now=now)
    site.write_config(sweep_every="1h", fraction=1.0)
    daemon()
    before = catalog_state(site)
    other = site.base / "shorter.yaml"
    other.write_text(make_config(site, keep="10d", sweep_every="1h", fraction=1.0))

    preview = plan(site, config=other)
    assert (preview["basis"], preview["walked"]) == ("snapshot", [])
    assert judged(preview) == judged(plan(site, "--rescan", config=other))
    due = [i for i in preview["items"] if i["action"] == "delete"]
    assert due and all(now.timestamp() - i["recorded"] > 10 * 86400 for i in due)
    # the daemon's catalog is not the copy: its expiries and sweeps are as they were, and its
    # own plan (keep: 15d) has nothing due
    assert catalog_state(site) == before
    assert not [i for i in plan(site)["items"] if i["action"] == "delete"]
    assert all(Path(i["path"]).exists() for i in due)

    # a config that reads the site under another root cannot be judged from the catalog: that
    # site is walked for the preview, and the output says so
    elsewhere = site.base / "elsewhere"
    build_tree(elsewhere, ["cam9"], days=12, per_day=4, now=now)
    moved = site.base / "moved.yaml"
    moved.write_text(
        make_config(site, keep="10d", sweep_every="1h").replace(str(site.root), str(elsewhere))
    )
    res = plan(site, config=moved)
    assert (res["basis"], res["walked"]) == ("snapshot", ["toll"])
    assert {i["camera"] for i in res["items"]} == {"cam9"}
    human = site.run("--config", str(moved), "retention", "plan")
    assert "sites walked again for their new roots or layout: toll" in human.stdout


def test_without_a_daemon_root_walks_the_roots(site, now):
    build_tree(site.root, ["cam1"], days=17, per_day=24, now=now)
    site.write_config(fraction=1.0)
    res = plan(site)
    assert (res["basis"], res["walked"]) == ("rescan", ["toll"])
    assert [i for i in res["items"] if i["action"] == "delete"]
    r = site.run("retention", "plan")
    assert r.returncode == 0 and "a walk of every root" in r.stdout, r.stderr


def test_a_config_that_drops_an_extension_is_previewed_as_a_walk_would(site, daemon, now):
    # the catalog's rows of .mp4 files are not segments under a config that names only .mkv:
    # the preview walks the site again, and plans what a sweep under that config would do
    build_tree(site.root, ["cam1"], days=20, per_day=24, now=now)
    site.write_config(sweep_every="1h", fraction=1.0, keep="30d")
    daemon()
    mkv = site.base / "mkv.yaml"
    text = make_config(site, sweep_every="1h", fraction=1.0, keep="10d")
    mkv.write_text(
        text.replace(
            f"    roots: [{site.root}]\n", f"    roots: [{site.root}]\n    extensions: [.mkv]\n"
        )
    )
    res = plan(site, config=mkv)
    assert (res["basis"], res["walked"]) == ("snapshot", ["toll"])
    assert res["items"] == [] and judged(res) == judged(plan(site, "--rescan", config=mkv))
