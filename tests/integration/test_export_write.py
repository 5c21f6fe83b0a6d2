"""Writing a package into a target other local users can write to, tested as the attack.

A real unprivileged Unix user runs a racer beside the export: it watches the target for the
exporter's hidden ``.NVRG-…`` directory, renames it away, and plants a directory of its own under
the same name in which every file the exporter will write is a dangling symlink to a directory
outside the target. Whatever happens, no file may appear outside the target, and a package, if
one is produced, must be the exporter's own (root-owned) and intact; otherwise the export fails
cleanly, leaves none of its files behind and (through the daemon) is audited.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvr_guard.errors import PolicyRefused, RuntimeFailure
from nvr_guard.export import (
    DirectoryDestination,
    load_or_create_key,
    run_export,
    verify_package,
    writer,
)
from nvr_guard.export.plan import local_stamp
from tests.fixtures.site import poll
from tests.integration.test_export import SH, T0, job, make_footage, segs
from tests.integration.test_workflow import Env, env, new_request, unix_users

IMPORTED_FIXTURES = (env, unix_users)  # found by pytest by name

MALLORY = "nvrg-mallory"
PACKAGE_FILES = [
    "manifest.json",
    "manifest.sig",
    "signer.pub",
    "approval-record.html",
    "VERIFY.txt",
]

# The racer, run as the unprivileged user. It stops when ``stop`` appears and then writes what
# it managed into ``report``; ``ready`` tells the test it is running.
RACER = r"""
import json, os, sys
target, outside, names, ready, stop, report = sys.argv[1:7]
names = json.loads(names)
me = os.getuid()
tally = {"seen": 0, "renamed": 0, "denied": 0, "planted": 0}
open(ready, "w").close()
n = 0
while not os.path.exists(stop):
    try:
        entries = os.listdir(target)
    except OSError:
        continue
    for name in entries:
        if not name.startswith((".NVRG-", "NVRG-")):
            continue
        path = os.path.join(target, name)
        try:
            if os.lstat(path).st_uid == me:
                continue
        except OSError:
            continue
        tally["seen"] += 1
        if name.startswith("NVRG-"):
            continue  # a finished package: only reported
        n += 1
        try:
            os.rename(path, os.path.join(target, f"moved-{n}"))
            tally["renamed"] += 1
        except OSError:
            tally["denied"] += 1
            continue
        try:
            os.mkdir(path, 0o777)
            os.chmod(path, 0o777)
            for f in names:
                os.symlink(os.path.join(outside, f), os.path.join(path, f))
            tally["planted"] += 1
        except OSError:
            pass
with open(report, "w") as f:
    json.dump(tally, f)
"""


@pytest.fixture(scope="module")
def mallory() -> Iterator[int]:
    """A real unprivileged account (the suite runs as root), removed afterwards."""
    created = False
    try:
        pwd.getpwnam(MALLORY)
    except KeyError:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", MALLORY], check=True)
        created = True
    yield pwd.getpwnam(MALLORY).pw_uid
    if created:
        subprocess.run(["userdel", MALLORY], check=False)


class Racer:
    def __init__(self, uid: int, target: Path, outside: Path, names: list[str], base: Path):
        self.box = base / "racer"
        self.box.mkdir()
        os.chown(self.box, uid, -1)
        self.stop_file, self.report = self.box / "stop", self.box / "report.json"
        ready = self.box / "ready"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RACER, str(target), str(outside), json.dumps(names)]
            + [str(ready), str(self.stop_file), str(self.report)],
            user=uid,
        )
        poll(ready.exists, 30, "the racer to start")

    def stop(self) -> dict[str, int]:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return json.loads(self.report.read_text())


def open_up(base: Path) -> None:
    """Let the unprivileged user reach ``base`` (pytest's directories are root-only)."""
    for p in [base, *base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)


def owned_by(where: Path, uid: int) -> list[str]:
    """Every entry under ``where`` (links not followed) owned by ``uid``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(where):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if os.lstat(p).st_uid == uid:
                out.append(str(p.relative_to(where)))
    return sorted(out)


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_footage(tmp_path_factory.mktemp("footage"), audio=False, count=2)


START, END = T0 + 1, T0 + 19
CLIP = f"lobby-1_{local_stamp(START, SH)}_{local_stamp(END, SH)}.mp4"


def race_export(
    tmp_path: Path, footage: list[Path], mallory: int, mode: int
) -> tuple[Any, BaseException | None, dict[str, int], Path, Path]:
    open_up(tmp_path)
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    os.chmod(target, mode)
    outside.mkdir()
    key = load_or_create_key(tmp_path / "state")[0]
    racer = Racer(mallory, target, outside, [CLIP, *PACKAGE_FILES], tmp_path)
    pkg, error = None, None
    try:
        pkg = run_export(
            [("lobby-1", segs(footage))],
            job(START, END),
            DirectoryDestination(target, reserve=0),
            key,
            audit_head=(1, "h"),
        )
    except (PolicyRefused, RuntimeFailure) as e:
        error = e
    finally:
        tally = racer.stop()
    return pkg, error, tally, target, outside


def assert_root_package(pkg: Any, target: Path) -> None:
    assert pkg.path.parent == target
    st = os.lstat(pkg.path)
    # owner and export group only: nobody else on the host reads footage (not even a racer)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o750
    assert sorted(os.listdir(pkg.path)) == sorted([CLIP, *PACKAGE_FILES])
    for n in os.listdir(pkg.path):
        f = os.lstat(pkg.path / n)
        assert stat.S_ISREG(f.st_mode) and f.st_uid == 0 and f.st_nlink == 1, n
        assert stat.S_IMODE(f.st_mode) == 0o640, n
    assert verify_package(pkg.path).ok


@pytest.mark.integration
def test_world_writable_target_without_sticky_bit_is_refused_while_a_user_races(
    tmp_path: Path, footage: list[Path], mallory: int
) -> None:
    pkg, error, tally, target, outside = race_export(tmp_path, footage, mallory, 0o777)
    assert os.listdir(outside) == [], "the export wrote outside its target"
    assert pkg is None and isinstance(error, PolicyRefused), (pkg, error, tally)
    assert "is not safe to write to" in str(error) and "sticky" in str(error)
    assert os.listdir(target) == [] and tally["seen"] == 0  # refused before writing anything


@pytest.mark.integration
def test_sticky_world_writable_target_gets_an_intact_root_package_despite_the_racer(
    tmp_path: Path, footage: list[Path], mallory: int
) -> None:
    pkg, error, tally, target, outside = race_export(tmp_path, footage, mallory, 0o1777)
    assert os.listdir(outside) == [], "the export wrote outside its target"
    assert error is None, error
    assert tally["seen"] >= 1 and tally["renamed"] == 0, tally  # it tried, the kernel said no
    assert_root_package(pkg, target)
    assert sorted(os.listdir(target)) == [pkg.path.name]


@pytest.mark.integration
def test_descriptors_alone_keep_the_writes_inside_when_the_racer_can_rename(
    tmp_path: Path, footage: list[Path], mallory: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target rule switched off: the user renames the temporary directory away and plants
    symlinks under its name. The writes still go to the directory the export made; the rename
    check sees the swap; the export fails and removes its own directory wherever it was moved."""
    monkeypatch.setattr(writer, "check_target", lambda path, st: None)
    pkg, error, tally, target, outside = race_export(tmp_path, footage, mallory, 0o777)
    assert os.listdir(outside) == [], "the export wrote outside its target"
    assert tally["seen"] >= 1, tally
    if pkg is not None:  # the racer lost every race: then the package must be ours and intact
        assert_root_package(pkg, target)
        assert owned_by(target, 0) == sorted(
            [pkg.path.name] + [f"{pkg.path.name}/{n}" for n in os.listdir(pkg.path)]
        )
    else:
        assert tally["renamed"] >= 1, tally
        assert isinstance(error, RuntimeFailure), error
        assert "nothing was exported" in str(error) or "tampering" in str(error)
        # none of the export's files is left; at most an empty directory it never got to open
        leftovers = owned_by(target, 0)
        assert all(os.path.isdir(target / p) and not os.listdir(target / p) for p in leftovers)
        assert len(leftovers) <= (1 if "tampering" in str(error) else 0), leftovers
        assert not any(n.startswith("NVRG-") for n in os.listdir(target))


# ---- through the daemon: the refusal is audited --------------------------------------------------
@pytest.mark.integration
def test_daemon_refuses_a_world_writable_target_audits_it_and_writes_nothing(
    env: Env, mallory: int, tmp_path: Path
) -> None:
    e = env
    os.chmod(e.target, 0o777)
    rid = new_request(e)
    e.ok("nvrg-bob", "request", "approve", str(rid))
    e.ok("nvrg-carol", "request", "approve", str(rid))
    assert e.ok("nvrg-tom", "media", "scan", str(e.target))["result"] == "clean"
    outside = tmp_path / "outside"
    outside.mkdir()
    racer = Racer(mallory, e.target, outside, PACKAGE_FILES, tmp_path)
    try:
        msg = e.refused("nvrg-tom", "export", "run", str(rid), "--media", str(e.target))
    finally:
        tally = racer.stop()
    assert "is not safe to write to" in msg and "sticky" in msg
    assert os.listdir(outside) == [] and os.listdir(e.target) == [] and tally["seen"] == 0
    refusals = [
        x for x in e.audit() if x["object"] == f"request:{rid}" and x["action"] == "export.refused"
    ]
    assert refusals and "is not safe to write to" in json.dumps(refusals[-1], ensure_ascii=False)
    assert e.ok("nvrg-alice", "request", "show", str(rid))["state"] == "approved"
