"""Evidence is never deleted early, and expired footage never lingers unseen (issue 11, items
8-13): mount boundaries (real bind mounts and tmpfs), roots that vanish, empty or change file
system, hidden names, files the layout does not match, symlinked roots, unreadable directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nvr_guard import attention as att
from nvr_guard.config import check_config, load_config
from nvr_guard.engine import Engine
from nvr_guard.identity import Caller
from nvr_guard.model import Segment
from nvr_guard.retention.purge import PurgeTarget, purge
from tests.fixtures.caps import NO_DAC, no_dac_override
from tests.fixtures.cli import run_cli
from tests.fixtures.site import LAYOUT, Site, make_config, write_segment

DAY = timedelta(days=1)
Mount = Callable[..., Path]


@pytest.fixture
def mount() -> Iterator[Mount]:
    """``mount(target, "--bind", source)`` / ``mount(target, "-t", "tmpfs", "tmpfs")``; every
    mount is undone in teardown (innermost first)."""
    done: list[Path] = []

    def do(target: Path, *args: str | Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *map(str, args), str(target)], check=True)
        done.append(target)
        return target

    yield do
    for t in reversed(done):
        subprocess.run(["umount", str(t)], check=False, capture_output=True)
    for t in reversed(done):  # still mounted (busy): detach it
        if os.path.ismount(t):
            subprocess.run(["umount", "-l", str(t)], check=False)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def engine_of(site: Site) -> Engine:
    return Engine(load_config(site.config))


def count(engine: Engine) -> int:
    return engine.catalog.count()


def kinds(engine: Engine) -> dict[str, list[att.Entry]]:
    out: dict[str, list[att.Entry]] = {}
    for e in engine.attention.entries():
        out.setdefault(e.kind, []).append(e)
    return out


def plan_json(site: Site, *args: str) -> Any:
    return site.json("retention", "plan", *args)


def with_site_key(site: Site, line: str, **over: Any) -> None:
    """The usual test config plus one key in the site (before its layout line)."""
    text = make_config(site, **over)
    if "    layout:" in text:
        text = text.replace("    layout:", f"    {line}\n    layout:", 1)
    else:
        text = text.replace(
            f"    roots: [{site.root}]\n", f"    roots: [{site.root}]\n    {line}\n"
        )
    site.config.write_text(text)


# ---- item 8: mount boundaries --------------------------------------------------------------


def test_bind_mount_and_tmpfs_under_a_root_are_neither_walked_nor_purged(
    site: Site, now: datetime, tmp_path: Path, mount: Mount
) -> None:
    site.write_config(fraction=1.0)
    own = write_segment(site.root, "camA", now - 20 * DAY)
    # a tree from outside bind-mounted where the layout would match it (same file system:
    # st_dev is the same, only the mount table shows the boundary)
    outside = tmp_path / "outside"
    theirs = write_segment(outside, "x", now - 20 * DAY)
    date_dir = theirs.parent.parent
    bound = mount(site.root / "camB" / date_dir.name, "--bind", date_dir)
    # another file system mounted as a camera directory
    mount(site.root / "camC", "-t", "tmpfs", "tmpfs")
    on_tmpfs = write_segment(site.root, "camC", now - 20 * DAY)

    r = site.run("retention", "run")
    assert r.returncode == 0, r.stderr
    assert not own.exists()  # the root's own expired footage goes
    assert theirs.exists(), "a file reached through a bind mount was deleted"
    assert on_tmpfs.exists(), "a file on another file system below the root was deleted"

    plan = plan_json(site)
    skipped = [a for a in plan["attention"] if a["kind"] == att.MOUNT_SKIPPED]
    assert len(skipped) == 1 and skipped[0]["site"] == "toll"
    assert str(bound) in skipped[0]["message"] and str(site.root / "camC") in skipped[0]["message"]
    assert plan["items"] == []


def test_cross_mounts_true_walks_into_mounts(
    site: Site, now: datetime, tmp_path: Path, mount: Mount
) -> None:
    with_site_key(site, "cross_mounts: true", fraction=1.0)
    mount(site.root / "camC", "-t", "tmpfs", "tmpfs")
    on_tmpfs = write_segment(site.root, "camC", now - 20 * DAY)
    plan = plan_json(site)
    assert [i["path"] for i in plan["items"] if i["action"] == "delete"] == [str(on_tmpfs)]
    assert not [a for a in plan["attention"] if a["kind"] == att.MOUNT_SKIPPED]
    r = site.run("retention", "run")
    assert r.returncode == 0, r.stderr
    assert not on_tmpfs.exists()


def test_purge_refuses_a_directory_mounted_over_after_the_plan(
    site: Site, now: datetime, tmp_path: Path, mount: Mount
) -> None:
    site.write_config(fraction=1.0)
    seg = write_segment(site.root, "camA", now - 20 * DAY)
    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        assert count(engine) == 1
        # a twin (same name, size and mtime) elsewhere, bind-mounted over the hour directory
        twin_dir = tmp_path / "twin"
        twin_dir.mkdir()
        twin = twin_dir / seg.name
        twin.write_bytes(seg.read_bytes())
        st = seg.stat()
        os.utime(twin, (st.st_mtime, st.st_mtime))
        mount(seg.parent, "--bind", twin_dir)
        out = engine.sweep(actor="test")  # from the catalog, no rescan in between
        assert twin.exists(), "the purge deleted a file through a mount point"
        assert out.deleted == 0
        assert [r.split(":")[0] for _s, r in out.skipped] == ["other-mount"]
    finally:
        engine.catalog.close()


def test_purge_refuses_other_file_systems_and_hidden_names_directly(
    tmp_path: Path, mount: Mount
) -> None:
    from nvr_guard.store.audit import AuditLog, ensure_schema

    root = tmp_path / "rec"
    (root / "cam").mkdir(parents=True)
    mount(root / "cam" / "disk", "-t", "tmpfs", "tmpfs")
    old = 1_700_000_000.0
    made = []
    for rel in ("cam/disk/a.mp4", "cam/.tmp/b.mp4", "cam/.c.mp4", "cam/plain.mp4"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"v" * 10)
        os.utime(p, (old, old))
        made.append(p)
    import sqlite3

    conn = sqlite3.connect(tmp_path / "audit.db")
    ensure_schema(conn)
    audit = AuditLog(conn, clock=lambda: old + 1e6)

    def target(p: Path, cross: bool = False) -> PurgeTarget:
        seg = Segment("s", "cam", os.fsencode(p), old - 60, old, 10)
        return PurgeTarget(seg, os.fsencode(root), frozenset({".mp4"}), 0.0, cross)

    res = purge(
        [target(p) for p in made],
        audit=audit,
        actor="t",
        sweep_id=None,
        now=lambda: old + 1e6,
        on_deleted=lambda segs: None,
    )
    assert [os.fsdecode(s.path) for s in res.deleted] == [str(made[3])]
    assert sorted(r.split(":")[0] for _s, r in res.skipped) == ["hidden", "hidden", "other-mount"]
    assert all(p.exists() for p in made[:3])
    # the site's cross_mounts lets the purge into the mount
    res = purge(
        [target(made[0], cross=True)],
        audit=audit,
        actor="t",
        sweep_id=None,
        now=lambda: old + 1e6,
        on_deleted=lambda segs: None,
    )
    assert len(res.deleted) == 1 and not made[0].exists()
    conn.close()


def _two_sites(tmp_path: Path, school: Path, highway: Path, cross: str = "") -> Path:
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "sites:\n"
        "  school:\n"
        "    keep: 1y\n"
        f"    roots: [{school}]\n"
        f"{cross}"
        "  highway:\n"
        "    keep: 15d\n"
        f"    roots: [{highway}]\n"
    )
    return cfg


@pytest.mark.parametrize("what", ["alias", "nested-alias"])
def test_a_bind_mount_alias_of_another_root_fails_config_check(
    tmp_path: Path, mount: Mount, what: str
) -> None:
    school = tmp_path / "school"
    (school / "sub").mkdir(parents=True)
    alias = mount(tmp_path / "alias", "--bind", school if what == "alias" else school / "sub")
    cfg = _two_sites(tmp_path, school, alias)
    r = run_cli(["--config", str(cfg), "config", "check"])
    assert r.returncode == 2, r.stdout + r.stderr
    want = "is the same directory as" if what == "alias" else "is inside"
    assert f"{cfg}:8: sites.highway.roots[0]: {alias}" in r.stderr and want in r.stderr, r.stderr


def test_a_root_crossing_mounts_may_not_contain_another_root(tmp_path: Path, mount: Mount) -> None:
    school = tmp_path / "school"
    disk = mount(school / "disk", "-t", "tmpfs", "tmpfs")
    other = mount(tmp_path / "other", "--bind", disk)
    # without cross_mounts the school site never enters school/disk: no conflict
    cfg, errors, _ = check_config(_two_sites(tmp_path, school, other))
    assert cfg is not None, errors
    _, errors, _ = check_config(_two_sites(tmp_path, school, other, "    cross_mounts: true\n"))
    assert any("overlaps sites.school.roots[0]" in m for _f, _ln, m in errors), errors


def test_a_root_nested_by_path_on_its_own_mount_is_allowed_unless_the_outer_crosses_mounts(
    tmp_path: Path, mount: Mount
) -> None:
    school = tmp_path / "school"
    inner = mount(school / "disk", "-t", "tmpfs", "tmpfs")
    cfg, errors, _ = check_config(_two_sites(tmp_path, school, inner))
    assert cfg is not None, errors
    _, errors, _ = check_config(_two_sites(tmp_path, school, inner, "    cross_mounts: true\n"))
    assert any("overlaps sites.school.roots[0]" in m for _f, _ln, m in errors), errors


# ---- item 9: a root that vanished, emptied or changed file system ---------------------------


def _tree(root: Path, now: datetime, n: int = 4) -> list[Path]:
    return [write_segment(root, f"cam{i % 2}", now - (i + 1) * DAY) for i in range(n)]


def test_an_emptied_root_keeps_its_rows_until_it_is_back_or_confirmed(
    site: Site, now: datetime, tmp_path: Path
) -> None:
    _tree(site.root, now)
    engine = engine_of(site)
    root_b = os.fsencode(site.root)
    away = tmp_path / "away"
    away.mkdir()
    try:
        engine.reconcile(full=True)
        assert count(engine) == 4
        for cam in ("cam0", "cam1"):
            os.rename(site.root / cam, away / cam)
        for full in (True, False):
            engine.reconcile(full=full)
            assert count(engine) == 4, "rows of an emptied root were dropped"
            (entry,) = kinds(engine)[att.ROOT_EMPTIED]
            assert entry.site == "toll" and str(site.root) in entry.message
            assert engine.scanner.unhealthy_roots() == {root_b}
        st = engine.status()
        assert st["ok"] is False and [a["kind"] for a in st["attention"]] == [att.ROOT_EMPTIED]
        assert list(engine.audit.entries(action="attention.raised"))
        # the footage comes back: healthy again, without anyone confirming
        for cam in ("cam0", "cam1"):
            os.rename(away / cam, site.root / cam)
        engine.reconcile(full=True)
        assert not engine.attention.entries() and not engine.scanner.unhealthy_roots()
        assert count(engine) == 4
        # gone for good: an admin confirms, the rows go, the confirmation is audited
        for cam in ("cam0", "cam1"):
            os.rename(site.root / cam, away / cam)
        engine.reconcile(full=True)
        with pytest.raises(Exception, match="is not a root of site toll"):
            engine.confirm_root(Caller.local(), "toll", str(tmp_path))  # not a root
        res = engine.confirm_root(Caller.local(), "toll", str(site.root))
        assert res["was"] == att.ROOT_EMPTIED and res["forgotten"] == 4
        assert count(engine) == 0 and not engine.attention.entries()
        assert list(engine.audit.entries(action="root.confirm"))
    finally:
        engine.catalog.close()


def test_an_unmounted_root_is_a_device_change_and_confirm_root_accepts_the_new_one(
    site: Site, now: datetime, mount: Mount
) -> None:
    mount(site.root, "-t", "tmpfs", "tmpfs")
    _tree(site.root, now)
    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        assert count(engine) == 4
        umount(site.root)  # the disk is gone; the mount point directory is left, empty
        engine.reconcile(full=True)
        assert count(engine) == 4
        assert [e.kind for e in engine.attention.entries()] == [att.ROOT_DEVICE]
        assert engine.scanner.unhealthy_roots() == {os.fsencode(site.root)}
        # another (fresh) file system in its place with one file: still not the one catalogued
        mount(site.root, "-t", "tmpfs", "tmpfs")
        kept = write_segment(site.root, "cam9", now - DAY)
        engine.reconcile(full=False)
        assert count(engine) == 4 and engine.catalog.get(os.fsencode(kept)) is None
        plan = plan_json(site)
        assert [a["kind"] for a in plan["attention"]] == [att.ROOT_DEVICE]
        # the admin accepts it (the CLI without a daemon: root acts on the state directly)
        r = site.run("--json", "retention", "confirm-root", "toll", str(site.root))
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["was"] == att.ROOT_DEVICE and res["forgotten"] == 4 and res["found"] == 1
        engine.reconcile(full=True)  # this engine sees the accepted file system as healthy
        assert not engine.attention.entries()
        assert [os.fsdecode(s.path) for s in engine.catalog.segments_of(None, None, 0, 1e12)] == [
            str(kept)
        ]
        assert list(engine.audit.entries(action="root.confirm"))
        # bad input: one line, exit 2
        r = site.run("retention", "confirm-root", "toll", str(site.root))
        assert r.returncode == 2 and "nothing to confirm" in r.stderr
        r = site.run("retention", "confirm-root", "nosuch", str(site.root))
        assert r.returncode == 2 and "unknown site" in r.stderr
    finally:
        engine.catalog.close()


def _with_school(site: Site, tmp_path: Path) -> Path:
    """The usual site ``toll`` (keep 15d) beside ``school`` (keep 1y) on the same file system."""
    school = tmp_path / "school"
    school.mkdir()
    extra = f'  school:\n    keep: 1y\n    roots: [{school}]\n    layout: "{LAYOUT}"\n'
    site.write_config(fraction=1.0, extra_site=extra)
    return school


def test_another_sites_root_bind_mounted_over_a_root_is_a_device_change(
    site: Site, now: datetime, tmp_path: Path, mount: Mount
) -> None:
    """``mount --bind school toll`` while running: the same file system id, another directory.
    The toll root is out of service (rows kept, not walked, no disk pressure) and the school's
    footage is never catalogued or deleted under toll's 15 days."""
    school = _with_school(site, tmp_path)
    own = [write_segment(site.root, "hw1", now - d * DAY) for d in (1, 2)]
    theirs = [write_segment(school, "sch1", now - d * DAY) for d in (13, 14, 15, 16)]
    engine = engine_of(site)
    toll_b = os.fsencode(site.root)
    try:
        engine.reconcile(full=True)
        assert engine.catalog.count("toll") == 2 and engine.catalog.count("school") == 4
        mount(site.root, "--bind", school)
        # hints before the next walk: neither the school's file is taken as toll's, nor toll's
        # (hidden by the mount) forgotten
        seen_as_toll = site.root / theirs[0].relative_to(school)
        assert engine.scanner.hint(os.fsencode(seen_as_toll)) == "ignored"
        assert engine.scanner.hint(os.fsencode(own[0])) == "ignored"
        assert engine.catalog.count("toll") == 2
        for full in (False, True):
            engine.reconcile(full=full)
            assert engine.catalog.count("toll") == 2, "rows of the covered root were dropped"
            toll_paths = {
                os.fsdecode(s.path) for s in engine.catalog.segments_of("toll", None, 0, 1e12)
            }
            assert toll_paths == {str(p) for p in own}
            (entry,) = kinds(engine)[att.ROOT_DEVICE]
            assert entry.site == "toll" and "another directory" in entry.message
            assert engine.scanner.unhealthy_roots() == {toll_b}
            assert toll_b in engine.excluded_roots()
        out = engine.sweep(actor="test")
        assert out.deleted == 0
        assert all(p.exists() for p in theirs), "school footage deleted under toll's rule"
        # the bind mount goes: back in service by itself
        umount(site.root)
        engine.reconcile(full=True)
        assert not engine.attention.entries() and not engine.scanner.unhealthy_roots()
        assert engine.catalog.count("toll") == 2
    finally:
        engine.catalog.close()


def test_purge_refuses_a_root_that_is_another_directory_than_planned(
    site: Site, now: datetime, tmp_path: Path, mount: Mount
) -> None:
    """The plan is made, then another site's root is bind-mounted over the root before the
    purge: twins at the same relative paths (same size and mtime) are not deleted."""
    school = _with_school(site, tmp_path)
    seg = write_segment(site.root, "cam", now - 20 * DAY)
    twin = write_segment(school, "cam", now - 20 * DAY)
    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        plan = engine.plan()
        assert [i.segment.path for i in plan.deletions] == [os.fsencode(seg)]
        mount(site.root, "--bind", school)
        out = engine.sweep(actor="test")  # from the catalog, no rescan in between
        assert twin.exists(), "the purge deleted another site's footage through a bind mount"
        assert out.deleted == 0
        assert [r.split(":")[0] for _s, r in out.skipped] == ["root-changed"]
        umount(site.root)
        assert seg.exists()
        assert engine.sweep(actor="test").deleted == 1 and not seg.exists()
    finally:
        engine.catalog.close()


def test_a_root_identity_recorded_without_the_inode_is_completed_silently(
    site: Site, now: datetime
) -> None:
    """Upgrade: a record of an older version (file system only) is accepted once and completed;
    no attention entry for it."""
    from nvr_guard.mounts import fs_identity

    _tree(site.root, now)
    engine = engine_of(site)
    root_b = os.fsencode(site.root)
    try:
        engine.reconcile(full=True)
        full_id = engine.catalog.root_fs(root_b)
        assert full_id is not None and " ino:" in full_id
        engine.catalog.set_root_fs(root_b, "toll", fs_identity(root_b))  # as an old version wrote
        engine.reconcile(full=False)
        assert not engine.attention.entries() and not engine.scanner.unhealthy_roots()
        assert engine.catalog.root_fs(root_b) == full_id
        assert engine.excluded_roots() == set() and count(engine) == 4
    finally:
        engine.catalog.close()


def test_a_missing_root_keeps_its_rows(site: Site, now: datetime, tmp_path: Path) -> None:
    _tree(site.root, now)
    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        os.rename(site.root, tmp_path / "moved")
        for full in (True, False):
            engine.reconcile(full=full)
            assert count(engine) == 4
            assert [e.kind for e in engine.attention.entries()] == [att.ROOT_MISSING]
        assert engine.hint(os.fsencode(site.root / "cam0")) is None
        assert count(engine) == 4
        os.rename(tmp_path / "moved", site.root)
        engine.reconcile(full=False)
        assert not engine.attention.entries() and count(engine) == 4
    finally:
        engine.catalog.close()


# ---- item 10: hidden names -------------------------------------------------------------------


@pytest.mark.parametrize("layout", [LAYOUT, None])
def test_hidden_files_and_directories_are_never_segments(
    site: Site, now: datetime, layout: str | None
) -> None:
    site.write_config(fraction=1.0, layout=layout)
    t = now - 20 * DAY
    plain = write_segment(site.root, "cam1", t)
    hidden = [
        plain.parent / ".00.00.mp4",  # a recorder's temporary next to a segment
        plain.parent / ".tmp-81.mkv",
        write_segment(site.root / "cam1" / ".work", "x", t),  # a hidden directory below
        write_segment(site.root / ".cache", "cam1", t),  # a hidden top-level directory
        write_segment(site.root, ".cam2", t),  # a hidden camera directory
    ]
    for p in hidden[:2]:
        p.write_bytes(b"\0" * 10)
        os.utime(p, (t.timestamp(), t.timestamp()))
    plan = plan_json(site)
    assert [i["path"] for i in plan["items"]] == [str(plain)]
    assert plan["unmatched"] == []
    r = site.run("retention", "run")
    assert r.returncode == 0, r.stderr
    assert not plain.exists() and all(p.exists() for p in hidden)


def test_a_layout_with_a_hidden_component_is_refused(site: Site) -> None:
    site.write_config(layout="{camera}/.%Y-%m-%d/%H/%M.%S.mp4")
    r = site.run("config", "check")
    assert r.returncode == 2 and "starts with '.'" in r.stderr, r.stderr


# ---- item 11: files the layout does not match -------------------------------------------------


def test_files_the_layout_does_not_match_are_counted_reported_and_measured(
    site: Site, now: datetime
) -> None:
    site.write_config(fraction=1.0)
    # a Dahua-style tree under a Hikvision-style layout: nothing of it matches
    day = (now - 40 * DAY).strftime("%Y-%m-%d")
    for ch in range(4):
        for i in range(10):
            p = site.root / f"ch{ch:02d}" / day / "001" / "dav" / "10" / f"10.{i:02d}.00[M].mp4"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\0" * 10)
    matching = write_segment(site.root, "cam1", now - 20 * DAY)
    plan = plan_json(site)
    assert [i["path"] for i in plan["items"]] == [str(matching)]
    (u,) = plan["unmatched"]
    assert (u["site"], u["root"], u["count"]) == ("toll", str(site.root), 40)
    assert len(u["examples"]) == 3 and all("/dav/10/" in e for e in u["examples"])
    human = site.run("retention", "plan")
    assert human.returncode == 0 and "unmatched: site toll" in human.stderr

    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        st = engine.status()
        assert st["ok"] is False
        (a,) = st["attention"]
        assert (a["kind"], a["site"], a["count"]) == (att.UNMATCHED, "toll", 40)
        assert "40 files" in a["message"] and "layout" in a["message"]
        from prometheus_client import generate_latest

        from nvr_guard.daemon.metrics import Exporter
        from tests.integration.test_metrics import parse, value

        exporter = Exporter(engine)
        exporter.collector.update()
        m = parse(generate_latest(exporter.registry).decode())
        assert value(m, "nvrguard_unmatched_files", site="toll") == 40
        assert value(m, "nvrguard_attention", kind="unmatched") == 1
        # the files are dealt with: the next walk clears the entry (and audits that)
        for ch in range(4):
            subprocess.run(["rm", "-r", str(site.root / f"ch{ch:02d}")], check=True)
        engine.reconcile(full=True)
        assert not engine.attention.entries()
        assert list(engine.audit.entries(action="attention.cleared"))
    finally:
        engine.catalog.close()


# ---- item 12: a symlinked root ---------------------------------------------------------------


def test_a_symlinked_root_is_refused_with_its_line(site: Site, tmp_path: Path) -> None:
    link = tmp_path / "rec-link"
    link.symlink_to(site.root)
    site.config.write_text(make_config(site).replace(f"roots: [{site.root}]", f"roots: [{link}]"))
    line = site.config.read_text().splitlines().index(f"    roots: [{link}]") + 1
    r = site.run("config", "check")
    assert r.returncode == 2
    assert f"{site.config}:{line}: sites.toll.roots[0]: {link} is a symlink" in r.stderr, r.stderr
    assert f"write the directory itself ({site.root})" in r.stderr


def test_a_root_replaced_by_a_symlink_later_is_an_attention_state(
    site: Site, now: datetime, tmp_path: Path
) -> None:
    _tree(site.root, now)
    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        os.rename(site.root, tmp_path / "real")
        site.root.symlink_to(tmp_path / "real")
        engine.reconcile(full=True)
        (e,) = engine.attention.entries()
        assert e.kind == att.ROOT_MISSING and "is now a symlink" in e.message
        assert count(engine) == 4
    finally:
        engine.catalog.close()


# ---- item 13: unreadable directories ------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o000, 0o444])  # not listable / listable but not searchable
def test_an_unreadable_directory_is_skipped_reported_and_its_rows_kept(
    site: Site, now: datetime, mode: int
) -> None:
    site.write_config(fraction=1.0)
    a = write_segment(site.root, "camA", now - 20 * DAY)
    b = write_segment(site.root, "camB", now - 20 * DAY)
    locked = b.parent.parent  # camB/<date>
    engine = engine_of(site)
    try:
        engine.reconcile(full=True)
        assert count(engine) == 2
        locked.chmod(mode)
        with no_dac_override():
            engine.reconcile(full=True)
            assert engine.catalog.get(os.fsencode(b)) is not None, "row dropped as deleted"
            (e,) = kinds(engine)[att.UNREADABLE]
            assert e.site == "toll" and str(locked) in e.message
            assert engine.status()["ok"] is False
            out = engine.sweep(actor="test")
        assert not a.exists(), "the other camera's expired footage stayed"
        assert out.deleted == 1
        locked.chmod(0o755)
        assert b.exists()
        engine.reconcile(full=True)
        assert att.UNREADABLE not in kinds(engine)
    finally:
        locked.chmod(0o755)
        engine.catalog.close()


def test_retention_run_goes_on_past_an_unreadable_directory(site: Site, now: datetime) -> None:
    """The CLI in a process without root's file-mode override (as on NFS with root_squash)."""
    site.write_config(fraction=1.0)
    a = write_segment(site.root, "camA", now - 20 * DAY)
    b = write_segment(site.root, "camB", now - 20 * DAY)
    locked = b.parent.parent  # camB/<date>: listable, but its entries cannot be reached
    locked.chmod(0o444)
    try:
        cmd = [*NO_DAC, sys.executable, "-m", "nvr_guard", "--config", str(site.config)]
        r = subprocess.run([*cmd, "retention", "run"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not a.exists()
        r = subprocess.run([*cmd, "--json", "retention", "plan"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        bad = [x for x in json.loads(r.stdout)["attention"] if x["kind"] == att.UNREADABLE]
        assert [x["path"] for x in bad] == [str(b.parent)], bad
    finally:
        locked.chmod(0o755)
    assert b.exists()
