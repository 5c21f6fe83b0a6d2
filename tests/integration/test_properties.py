"""Property tests of the retention engine against hostile recording trees (issue 6, item 2).

Hypothesis builds a small tree under a temporary root — segment and foreign extensions, names with
spaces, newlines and bytes that are not UTF-8, deep nesting, symlinks to files and directories
inside and outside the root — and a random valid site config. A real :class:`Engine` reconciles
and sweeps it; between its plan and its purge, files are changed under it (mtime bumped, replaced
by a symlink, deleted). Whatever happens:

- every file that disappeared was allowed by the pure policy for the catalog snapshot the plan was
  made from (``policy.decide`` over *all* catalogued segments at the real time, computed here
  independently);
- some files are named by a camera clock that is off (reset to about 2000, set to about 2099, a
  few hours either way): the true recording time is the mtime; a deleted file was past its floor
  (and, without disk pressure, past keep) by both its name and its true time, and no hold over its
  true recording time stood;
- it had a segment extension, was not held, was not under its floor (unless the admin chose
  ``overwrite-oldest``) and was not settling — judged from that snapshot *and* from the disk just
  before the purge;
- nothing outside the root changed: a snapshot of an outside directory (names, types, sizes,
  mtimes, contents, link targets) is identical before and after; no symlink was removed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nvr_guard.config import load_config
from nvr_guard.engine import Engine
from nvr_guard.model import ClockReading, Plan, Segment
from nvr_guard.retention import policy

SH = ZoneInfo("Asia/Shanghai")
HOUR = 3600.0
DAY = 86400.0

CAMERAS = [b"cam1", b"cam 2", b"cam\nline", b"cam\xff\xfe", b"c\xe9am"]
# (extension as written on disk) — the site's extensions are [.mp4, .mkv]
EXTS = [b".mp4", b".mp4", b".mp4", b".MKV", b".mkv", b".txt", b".mp4.part", b"", b".db"]
SEGMENT_EXTS = {b".mp4", b".mkv"}
ODD_NAMES = [b"", b" x", b"\nnl", b"\xff", b"'q\"", b"-dash"]
KINDS = ["file", "file", "file", "deep", "link-file-in", "link-file-out", "link-dir-out"]
MUTATIONS = ["none", "none", "none", "bump", "to-link", "delete", "replace"]


@dataclass(frozen=True)
class Entry:
    camera: int
    age: float  # hours before now of the recorded start
    ext: int
    odd: int
    kind: str
    mutation: str
    skew: float = 0.0  # hours the camera clock that names the file is off (layout sites)


# camera clocks: right, mostly; reset to about 2000; set to about 2099; off by hours
SKEWS = [0.0, 0.0, 0.0, 0.0, -26 * 365 * 24.0, 73 * 365 * 24.0, -3.0, 3.0, -0.5]


@dataclass(frozen=True)
class SiteCfg:
    keep_days: int
    min_keep_days: int | None
    layout: bool
    settle: str
    fraction: float
    disk: tuple[str, str]  # min_free, action


entries = st.lists(
    st.builds(
        Entry,
        camera=st.integers(0, len(CAMERAS) - 1),
        # mostly within 0..40 days; a few in the last minutes (settling)
        age=st.one_of(*[st.floats(0.0, 40 * 24.0)] * 4, st.floats(0.0, 0.2)),
        ext=st.integers(0, len(EXTS) - 1),
        odd=st.integers(0, len(ODD_NAMES) - 1),
        kind=st.sampled_from(KINDS),
        mutation=st.sampled_from(MUTATIONS),
        skew=st.sampled_from(SKEWS),
    ),
    min_size=4,
    max_size=30,
)


@st.composite
def site_cfgs(draw: st.DrawFn) -> SiteCfg:
    keep = draw(st.integers(1, 12))
    floor = draw(st.one_of(st.none(), st.integers(1, keep)))
    return SiteCfg(
        keep_days=keep,
        min_keep_days=floor,
        layout=draw(st.booleans()),
        settle=draw(st.sampled_from(["1s", "2m", "1h", "1d"])),
        # mostly no mass-deletion guard: a tiny tree trips it on every camera otherwise
        fraction=draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, 0.2])),
        # 99% free wanted: disk pressure on any real disk
        disk=draw(
            st.sampled_from([("1%", "alert"), ("99%", "alert"), ("99%", "overwrite-oldest")])
        ),
    )


holds_st = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(0, len(CAMERAS) - 1)),
        st.floats(1.0, 40 * 24.0),  # held range: from this many hours ago ...
        st.floats(0.5, 10 * 24.0),  # ... for this many hours
    ),
    max_size=3,
)


def _write(path: bytes, start: float, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\0" * size)
    mt = start + 60.0  # closed a minute after it started
    os.utime(path, (mt, mt), follow_symlinks=False)


def _snapshot(top: bytes) -> dict[bytes, tuple[object, ...]]:
    """Every entry below ``top`` (never following links): type, size, mtime, content, target."""
    out: dict[bytes, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(top, followlinks=False):
        for name in dirs + files:
            p = os.path.join(d, name)
            s = os.lstat(p)
            if stat.S_ISLNK(s.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISDIR(s.st_mode):
                out[p] = ("dir",)
            else:
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                out[p] = ("file", s.st_size, s.st_mtime_ns, digest)
    return out


def _config(base: Path, root: Path, c: SiteCfg) -> Path:
    site = f"    keep: {c.keep_days}d\n    roots: [{root}]\n    extensions: [.mp4, .mkv]\n"
    if c.min_keep_days is not None:
        site += f"    min_keep: {c.min_keep_days}d\n"
    if c.layout:
        site += '    layout: "{camera}/%Y-%m-%d/%H/%M.%S.mp4"\n'
    text = (
        f"state_dir: {base / 'state'}\n"
        "timezone: Asia/Shanghai\n"
        f"socket: {base / 'run' / 'c.sock'}\n"
        "socket_group: root\n"
        f"settle: {c.settle}\n"
        f"guards: {{max_delete_fraction: {c.fraction}, max_clock_jump: 1d}}\n"
        f"disk: {{min_free: {c.disk[0]}, action: {c.disk[1]}}}\n"
        f"sites:\n  toll:\n{site}"
        "people:\n  users: {root: {roles: [admin]}}\n"
    )
    path = base / "config.yaml"
    path.write_text(text)
    return path


def _build(
    root: bytes, outside: bytes, es: list[Entry], c: SiteCfg, now: float
) -> dict[int, bytes]:
    """Write the tree; returns entry index -> the path of its regular file (if it has one)."""
    files: dict[int, bytes] = {}
    # the outside world: old segment-looking files, a directory of them
    for i in range(3):
        _write(outside + b"/cam1/old%d.mp4" % i, now - 60 * DAY, 100 + i)
    for i, e in enumerate(es):
        start = now - e.age * HOUR
        cam = CAMERAS[e.camera]
        ext = EXTS[e.ext]
        if c.layout:
            named = start + e.skew * HOUR  # the camera's clock; the mtime is the host's
            stamp = datetime.fromtimestamp(named, SH).strftime("%Y-%m-%d/%H/%M.%S").encode()
            rel = cam + b"/" + stamp + ext
        else:
            rel = cam + b"/d%d" % (i % 3) + b"/seg" + ODD_NAMES[e.odd] + b"%d" % i + ext
        if e.kind == "deep":
            # deep nesting below the camera: matches no layout, but a plain tree catalogues it
            rel = cam + b"/" + b"/".join(b"n%d" % k for k in range(12)) + b"/seg%d" % i + ext
        path = root + b"/" + rel
        if os.path.lexists(path):
            continue  # two entries drew the same layout slot
        if e.kind in ("file", "deep"):
            _write(path, start, 10 + i)
            files[i] = path
        elif e.kind == "link-file-in":
            target = root + b"/targets/t%d.mp4" % i
            _write(target, start, 5)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(target, path)
        elif e.kind == "link-file-out":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(outside + b"/cam1/old%d.mp4" % (i % 3), path)
        else:  # link-dir-out: a directory (camera level or below) pointing outside
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(outside + b"/cam1", path)
    return files


def _mutate(es: list[Entry], files: dict[int, bytes], outside: bytes, now: float) -> set[bytes]:
    """Change files between plan and purge; returns the paths no longer the planned file."""
    changed: set[bytes] = set()
    for i, path in files.items():
        m = es[i].mutation
        if m == "none":
            continue
        changed.add(path)
        if m == "bump":
            os.utime(path, (now - 5.0, now - 5.0))  # written to again just now
        elif m == "to-link":
            os.unlink(path)
            os.symlink(outside + b"/cam1/old0.mp4", path)
        elif m == "delete":
            os.unlink(path)
        else:  # replace: same name, another (older-looking) file of another size
            st_ = os.lstat(path)
            os.unlink(path)
            with open(path, "wb") as fh:
                fh.write(b"\1" * (st_.st_size + 7))
            os.utime(path, (st_.st_mtime, st_.st_mtime))
    return changed


def _all_segments(engine: Engine) -> list[Segment]:
    return engine.catalog.segments_of(None, None, -1e18, 1e18)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(es=entries, cfg=site_cfgs(), holds=holds_st)
def test_sweep_deletes_only_what_the_pure_policy_allows(
    es: list[Entry], cfg: SiteCfg, holds: list[tuple[int | None, float, float]]
) -> None:
    with tempfile.TemporaryDirectory(prefix="nvr-prop-") as tmp:
        base = Path(tmp)
        (base / "rec").mkdir()
        root = os.fsencode(str(base / "rec"))
        outside = os.fsencode(str(base / "outside"))
        now = time.time()
        clock = ClockReading(now, time.clock_gettime(time.CLOCK_BOOTTIME), "prop-boot")
        files = _build(root, outside, es, cfg, now)
        config = load_config(_config(base, base / "rec", cfg))
        engine = Engine(config, clock=lambda: clock)
        try:
            engine.reconcile(full=True)
            for cam, ago, hours in holds:
                camera = None if cam is None else CAMERAS[cam].decode("utf-8", "backslashreplace")
                t0 = now - ago * HOUR
                engine.catalog.add_hold(
                    start=t0,
                    end=t0 + hours * HOUR,
                    reason="property test",
                    owner="root",
                    created=now,
                    site="toll",
                    camera=camera,
                )

            # the pure answer for this catalog snapshot, computed independently of the engine
            snapshot = {s.path: s for s in _all_segments(engine)}
            totals: dict[tuple[str, str], int] = {}
            for s in snapshot.values():
                totals[(s.site, s.camera)] = totals.get((s.site, s.camera), 0) + 1
            active = engine.catalog.active_holds(now)
            pure = policy.decide(
                sorted(snapshot.values(), key=lambda s: (s.site, s.camera, s.start, s.path)),
                clock,
                engine.rules,
                config.guard_rules(),
                active,
                totals,
                disk=engine.disk_states(),
                history=engine.catalog.last_history(),
            )
            allowed = {i.segment.path for i in pure.deletions}
            index_of = {p: i for i, p in files.items()}
            event("reasons " + ",".join(sorted({i.reason.split(":")[0] for i in pure.items})))

            before_root = _snapshot(root)
            before_out = _snapshot(outside)
            changed: set[bytes] = set()
            real_plan = engine.sweeper.plan

            def plan_then_change(*a: Any, **k: Any) -> Plan:
                p = real_plan(*a, **k)
                assert {i.segment.path for i in p.deletions} <= allowed
                changed.update(_mutate(es, files, outside, now))
                return p

            engine.sweeper.plan = plan_then_change  # type: ignore[method-assign]
            out = engine.sweep(actor="prop", now=clock)
            after_root = _snapshot(root)

            assert _snapshot(outside) == before_out, "something outside the root changed"
            gone = {
                p
                for p, v in before_root.items()
                if v[0] != "dir" and p not in after_root and p not in changed
            }
            assert gone <= allowed, [os.fsdecode(p) for p in gone - allowed]
            assert out.deleted == len(gone)
            event(f"deleted {min(len(gone), 3)} of {min(len(allowed), 3)} allowed (3 = 3+)")
            for p in gone:
                assert p not in changed, f"deleted a file changed after the plan: {p!r}"
                v = before_root[p]
                assert v[0] == "file", f"deleted a {v[0]}: {p!r}"
                seg = snapshot[p]
                name = p.rsplit(b"/", 1)[1]
                dot = name.rfind(b".")
                assert dot > 0 and name[dot:].lower() in SEGMENT_EXTS
                assert not any(h.covers(seg, now) for h in active), f"held: {p!r}"
                rules = engine.rules["toll"]
                # by the name and by the true recording time (the mtime): both
                for t in (seg.start, seg.mtime, v[2] / 1e9):
                    floor = policy.floor_until(t, rules)
                    if rules.disk_action != "overwrite-oldest":
                        assert floor is None or floor <= now, f"under its floor: {p!r}"
                    if cfg.disk[0] == "1%":  # no disk pressure: only expiry deletes
                        exp = policy.expiry(t, rules)
                        assert exp is not None and exp <= now, f"not expired: {p!r}"
                i = index_of.get(p)  # None: a link target inside the root
                if cfg.layout and i is not None and es[i].skew:
                    # a name off by the camera clock: no hold over the true time may stand
                    true_start = now - es[i].age * HOUR
                    assert not any(
                        h.start <= true_start + 60.0
                        and h.end > true_start
                        and h.camera in (None, seg.camera)
                        for h in active
                    ), f"held by its true time: {p!r}"
                    event("deleted a file with a skewed name")
                assert seg.mtime <= now - rules.settle, f"settling: {p!r}"
                assert isinstance(v[2], int) and v[2] / 1e9 <= now - rules.settle
            # every symlink that was there is still there, pointing where it pointed
            for p, v in before_root.items():
                if v[0] == "link":
                    assert after_root.get(p) == v
            # what changed after the plan was not deleted: a bumped or replaced file, a link
            for i, p in files.items():
                m = es[i].mutation
                if m in ("bump", "replace"):
                    assert os.path.isfile(p) and not os.path.islink(p), f"{m}: {p!r}"
                elif m == "to-link":
                    assert os.path.islink(p), f"{m}: {p!r}"
        finally:
            engine.catalog.close()


# ---- mount points, symlinked roots, unreadable directories (issue 11) -------------------------


@dataclass(frozen=True)
class Hostile:
    bind: str  # a tree from outside bind-mounted under the root: none, camera level, date level
    tmpfs: bool  # another file system mounted as a camera directory, with old footage on it
    unreadable: tuple[int, ...]  # cameras whose directories become unreadable after the first walk
    mode: int  # 0o000: not listable; 0o444: listable, entries unreachable
    root_link: str  # none, parent (a symlinked directory above the root), root (refused)


hostiles = st.builds(
    Hostile,
    bind=st.sampled_from(["none", "camera", "date"]),
    tmpfs=st.booleans(),
    unreadable=st.lists(st.integers(0, len(CAMERAS) - 1), max_size=2, unique=True).map(tuple),
    mode=st.sampled_from([0o000, 0o444]),
    root_link=st.sampled_from(["none", "none", "parent", "root"]),
)


def _mount(target: bytes, *args: str | bytes, done: list[bytes]) -> None:
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", *[os.fsdecode(a) for a in args], os.fsdecode(target)], check=True)
    done.append(target)


def _old_tree(top: bytes, start: float, n: int = 3) -> None:
    """Layout-shaped and plain old segment files below ``top`` (a date directory level)."""
    stamp = datetime.fromtimestamp(start, SH).strftime("%Y-%m-%d/%H/%M.%S").encode()
    for i in range(n):
        _write(top + b"/" + stamp[:-2] + b"%02d.mp4" % i, start, 50 + i)
        _write(top + b"/plain/seg%d.mp4" % i, start, 60 + i)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(es=entries, cfg=site_cfgs(), hostile=hostiles)
def test_sweep_stays_on_the_root_past_mounts_links_and_unreadable_directories(
    es: list[Entry], cfg: SiteCfg, hostile: Hostile
) -> None:
    from nvr_guard.errors import ConfigError
    from tests.fixtures.caps import no_dac_override

    with tempfile.TemporaryDirectory(prefix="nvr-prop-mnt-") as tmp:
        base = Path(tmp)
        real = base / "real"
        (real / "rec").mkdir(parents=True)
        if hostile.root_link == "parent":
            (base / "link").symlink_to(real)
            conf_root = base / "link" / "rec"
        elif hostile.root_link == "root":
            (base / "rec-link").symlink_to(real / "rec")
            conf_root = base / "rec-link"
        else:
            conf_root = real / "rec"
        root = os.fsencode(str(conf_root))
        outside = os.fsencode(str(base / "outside"))
        bound = os.fsencode(str(base / "bound"))
        now = time.time()
        clock = ClockReading(now, time.clock_gettime(time.CLOCK_BOOTTIME), "prop-boot")
        _build(root, outside, es, cfg, now)
        _old_tree(bound, now - 60 * DAY)
        mounted: list[bytes] = []
        locked: list[bytes] = []
        engine: Engine | None = None
        try:
            foreign: list[bytes] = []  # mount points: nothing below them may change
            if hostile.bind == "camera":
                _mount(root + b"/bindcam", "--bind", bound, done=mounted)
                foreign.append(root + b"/bindcam")
            elif hostile.bind == "date":
                day = datetime.fromtimestamp(now - 60 * DAY, SH).strftime("%Y-%m-%d").encode()
                _mount(root + b"/bindcam/" + day, "--bind", bound + b"/" + day, done=mounted)
                foreign.append(root + b"/bindcam/" + day)
            if hostile.tmpfs:
                _mount(root + b"/tmpcam", "-t", "tmpfs", "tmpfs", done=mounted)
                _old_tree(root + b"/tmpcam", now - 60 * DAY)
                foreign.append(root + b"/tmpcam")
            if hostile.root_link == "root":
                try:
                    load_config(_config(base, conf_root, cfg))
                except ConfigError as e:
                    assert any("is a symlink" in m for _f, _ln, m in e.errors), e.errors
                    event("symlinked root refused")
                    return
                raise AssertionError("a symlinked root was accepted")
            config = load_config(_config(base, conf_root, cfg))
            engine = Engine(config, clock=lambda: clock)
            engine.reconcile(full=True)
            first = {s.path for s in _all_segments(engine)}
            assert not any(p.startswith(tuple(f + b"/" for f in foreign)) for p in first)
            before_root = _snapshot(root)
            before_out = _snapshot(outside)
            before_foreign = {f: _snapshot(f) for f in foreign}
            for i in hostile.unreadable:
                d = root + b"/" + CAMERAS[i]
                if os.path.isdir(d) and not os.path.islink(d):
                    os.chmod(d, hostile.mode)
                    locked.append(d)
            event(f"locked {len(locked)}, mounts {len(foreign)}, link {hostile.root_link}")
            with no_dac_override():
                engine.reconcile(full=True)  # must not stop at what it cannot read
                kept = {s.path for s in _all_segments(engine)}
                for d in locked:
                    under = {p for p in first if p.startswith(d + b"/")}
                    assert under <= kept, "rows of an unreadable directory were dropped"
                snapshot = {s.path: s for s in _all_segments(engine)}
                totals: dict[tuple[str, str], int] = {}
                for s in snapshot.values():
                    totals[(s.site, s.camera)] = totals.get((s.site, s.camera), 0) + 1
                pure = policy.decide(
                    sorted(snapshot.values(), key=lambda s: (s.site, s.camera, s.start, s.path)),
                    clock,
                    engine.rules,
                    config.guard_rules(),
                    engine.catalog.active_holds(now),
                    totals,
                    disk=engine.disk_states(),
                    history=engine.catalog.last_history(),
                )
                allowed = {i.segment.path for i in pure.deletions}
                out = engine.sweep(actor="prop", now=clock)
            for d in locked:
                os.chmod(d, 0o755)
            locked.clear()
            after_root = _snapshot(root)
            assert _snapshot(outside) == before_out, "something outside the root changed"
            for f, snap in before_foreign.items():
                assert _snapshot(f) == snap, f"something below mount point {f!r} changed"
            gone = {p for p, v in before_root.items() if v[0] != "dir" and p not in after_root}
            assert gone <= allowed, [os.fsdecode(p) for p in gone - allowed]
            assert out.deleted == len(gone)
        finally:
            for d in locked:
                os.chmod(d, 0o755)
            if engine is not None:
                engine.catalog.close()
            for m in reversed(mounted):
                subprocess.run(["umount", os.fsdecode(m)], check=False, capture_output=True)
                if os.path.ismount(m):
                    subprocess.run(["umount", "-l", os.fsdecode(m)], check=False)
