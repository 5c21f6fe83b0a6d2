"""The shipped unit as deployed: `make install-service` and systemd as PID 1, in a container.

tests/fixtures/container.py boots a Debian bookworm tree with systemd-nspawn; inside it this
module installs the project the README's way (`make install-service` from a copy of the source
tree), writes a site config whose recording root is owned by a separate `recorder` user and whose
export target is a plain directory, and drives the unit with systemctl: start, status, the
retention sweep under the unit's sandbox, reload (good and broken), stop, SIGKILL and recovery,
the request -> approve -> scan -> export -> verify flow as separate Unix users onto the directory
target and onto a USB "stick" (a loop device over an ext4 image, bound into the container and
described as a USB disk by a fake sysfs tree, mounted by the admin at ``media.mountpoints``),
the README's command blocks marked as flows, run verbatim, and `systemd-analyze security` on the
loaded unit.

The tests share one container and one installed service and run in file order: each step starts
from the state the previous one left (as an admin's session would).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.fixtures.clamav import eicar_bytes
from tests.fixtures.container import PROJECT, Container, booted
from tests.fixtures.media import Loop, fake_usb_stick, sh
from tests.fixtures.readme_flows import Flow as ReadmeFlow
from tests.fixtures.readme_flows import readme_flows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SRC = "/usr/src/nvr-guard"
ROOT = "/data/nvr/depot"  # not among the shipped unit's example ReadWritePaths=
EXPORT = "/data/export"
CONFIG = "/etc/nvr-guard/config.yaml"
STICK_AT = "/media/nvr-export"  # media.mountpoints: where the admin mounts the stick
SYSFS = "/data/sysfs"  # the fake sysfs tree describing the loop device as a USB disk
CLAMAV_DB = "/etc/nvr-guard/clamav"
MAX_EXPOSURE = 2.0
LAYOUT = "{camera}/%Y-%m-%d/%H/%M.%S.mp4"

SITE_CONFIG = f"""\
timezone: Asia/Shanghai
sweep_every: 1h
guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
disk: {{min_free: 1%, action: alert}}
sites:
  depot:
    profile: highway
    roots: [{ROOT}]
    layout: "{LAYOUT}"
cameras:
  gate-1: {{level: 1, name: "Gate"}}
  lobby-1: {{level: 1, name: "营业厅"}}
people:
  users:
    alice: {{roles: [operator], level: 1}}
    bob: {{roles: [dept_manager]}}
    carol: {{roles: [security_lead], level: 2}}
    tom: {{roles: [technician]}}
    audrey: {{roles: [auditor]}}
  groups:
    nvr-admins: {{roles: [admin]}}
export:
  targets: [{EXPORT}]
media:
  scanner: clamscan
  database: {CLAMAV_DB}
  sysfs_root: {SYSFS}
  mountpoints: [{STICK_AT}]
"""

# Segments as the recorder writes them: its own user, 0640 files in 0750 directories, so only
# the unit's CAP_DAC_OVERRIDE/CAP_FOWNER let the daemon read and delete them.
RECORD = r"""
import os, sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

root, camera = sys.argv[1], sys.argv[2]
os.umask(0o027)
now = datetime.now(timezone.utc).replace(microsecond=0)
for age in sys.argv[3:]:
    t = now - timedelta(hours=float(age))
    path = os.path.join(root, camera, t.astimezone(ZoneInfo("Asia/Shanghai")).strftime(
        "%Y-%m-%d/%H/%M.%S.mp4"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    os.utime(path, (t.timestamp() + 60, t.timestamp() + 60))
    print(path)
"""


def test_a_container_that_cannot_boot_fails_the_test(tmp_path: Path) -> None:
    """No skip: a tree nspawn cannot boot is an assertion failure naming nspawn's complaint."""
    empty = tmp_path / "not-an-os"
    empty.mkdir()
    with (
        pytest.raises(AssertionError, match="systemd-nspawn exited"),
        booted(tmp_path / "work", root=empty),
    ):
        pass


def poll_inside(box: Container, script: str, what: str, timeout: float = 60) -> str:
    """Run ``script`` until it exits 0; its stdout. Fails naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = box.sh(script, timeout=60)
        if last.returncode == 0:
            return last.stdout
        time.sleep(0.5)  # polling interval; the deadline decides
    raise AssertionError(f"timed out waiting for {what}: {last}")


def write(box: Container, path: str, text: str) -> None:
    out = box.run(["/bin/sh", "-c", 'cat > "$0"', path], input=text)
    assert out.returncode == 0, out.stderr


def record(box: Container, camera: str, *hours_ago: float) -> list[str]:
    out = box.run(
        ["runuser", "-u", "recorder", "--", "python3", "-c", RECORD, ROOT, camera]
        + [str(h) for h in hours_ago]
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def status_json(box: Container) -> dict[str, object]:
    out = box.run(["nvr-guard", "--json", "status"], timeout=60)
    assert out.stdout.strip(), out.stderr
    data: dict[str, object] = json.loads(out.stdout)
    return data


@dataclass
class Stick:
    """The USB stick: a real loop device over an ext4 image, bound into the container."""

    device: str  # /dev/loopN, the same node inside the container
    uuid: str  # the filesystem's UUID, as blkid reads it on the host


STICK: list[Stick] = []  # the module's one stick, set by the box fixture


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("deployed")
    # The recording disk: a host directory bound in, not the container's overlay root. On an
    # overlay whose layers lie on different file systems (nspawn's --volatile=overlay: the cached
    # tree under a tmpfs), a file reports its layer's st_dev, not the directory's, and the purge
    # rightly refuses such a file as "other-mount".
    disk = work / "disk"
    disk.mkdir(mode=0o755)
    # The stick: made on the host (the container has no loop-control), its node bound in; the
    # fake sysfs tree (on the bound disk, so the daemon reads it as /data/sysfs) names the real
    # loop device and its major:minor, so blkid and the mount table inside describe the real one.
    image = work / "stick.img"
    with open(image, "wb") as f:
        f.truncate(160 * 2**20)  # media.reserve keeps 64 MiB free
    device = sh("losetup", "-f", "--show", str(image)).stdout.strip()
    try:
        sh("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "EVIDENCE", device)
        uuid = sh("blkid", "-p", "-s", "UUID", "-o", "value", device).stdout.strip()
        STICK[:] = [Stick(device, uuid)]
        fake_usb_stick(disk / "sysfs", Loop(image, device))
        with booted(work, [f"--bind={disk}:/data", f"--bind={device}"]) as container:
            try:
                yield container
            finally:
                # What happened inside, for a failing run: the transcript and the unit's journal.
                log = tmp_path_factory.getbasetemp() / "deployed-transcript.log"
                journal = container.run(["journalctl", "-u", "nvr-guard", "--no-pager"]).stdout
                log.write_text("\n".join(container.transcript) + "\n--- journal\n" + journal)
    finally:
        sh("losetup", "-d", device, check=False)


@pytest.fixture(scope="module")
def installed(box: Container) -> Container:
    """The README's install: make install-service, config, install-service again, enable."""
    # A copy of the tree (pip builds in it); the bind mount stays read-only.
    box.ok(
        f"mkdir -p {SRC} && tar -C {PROJECT} --exclude=./.venv --exclude=./.git"
        " --exclude=__pycache__ --exclude=./build --exclude=./demo --exclude='./.*_cache'"
        f" -cf - . | tar -C {SRC} -xf -"
    )
    box.ok(f"cd {SRC} && make install-service", timeout=900)
    # The recorder and the people of the config, as Unix users.
    box.ok(
        "useradd --system --user-group --no-create-home recorder\n"
        "for u in alice bob carol tom audrey; do useradd --create-home $u; done\n"
        f"install -d -m 0755 /data\ninstall -d -o recorder -g recorder -m 0750 /data/nvr {ROOT}\n"
        f"install -d -m 0755 {EXPORT} {STICK_AT} {CLAMAV_DB}\n"
        # The packages' readers: the technician and the auditor (README: who may read them).
        "for u in tom audrey; do usermod -aG nvr-guard-export $u; done\n"
    )
    # ClamAV from the tree's own packages (clamscan), with a test database: one EICAR signature.
    write(box, f"{CLAMAV_DB}/nvrg-test.ndb", f"NVRG.Test.EICAR:0:*:{eicar_bytes().hex()}\n")
    write(box, CONFIG, SITE_CONFIG)
    box.ok(f"nvr-guard config check {CONFIG}")
    box.ok(f"cd {SRC} && make install-service", timeout=900)
    return box


def test_install_service_writes_the_paths_drop_in_from_the_config(installed: Container) -> None:
    drop_in = installed.ok("cat /etc/systemd/system/nvr-guard.service.d/20-paths.conf")
    assert f'ReadWritePaths="-{ROOT}"' in drop_in
    assert f'ReadWritePaths="-{EXPORT}"' in drop_in
    assert f'ReadWritePaths="-{STICK_AT}"' in drop_in
    # systemd reads it: the loaded unit carries the paths, and the device access USB media need.
    shown = installed.ok("systemctl show -p ReadWritePaths nvr-guard")
    assert ROOT in shown and EXPORT in shown and STICK_AT in shown, shown
    devices = installed.ok(
        "systemctl show -p PrivateDevices -p DevicePolicy -p DeviceAllow nvr-guard"
    )
    assert "PrivateDevices=no" in devices and "DevicePolicy=closed" in devices, devices
    assert "DeviceAllow=block-sd r\n" in devices, devices
    venv = installed.ok("systemctl show -p ExecReload nvr-guard")
    assert "/opt/nvr-guard/bin/nvr-guard" in venv and "/usr/bin/nvr-guard" not in venv, venv


def test_enable_now_starts_an_active_unit(installed: Container) -> None:
    old = record(installed, "gate-1", 40 * 24, 40 * 24 - 1)
    installed.ok("systemctl enable --now nvr-guard", timeout=120)
    assert installed.ok("systemctl is-active nvr-guard").strip() == "active"
    assert installed.ok("systemctl is-enabled nvr-guard").strip() == "enabled"
    status = installed.sh("systemctl status --no-pager nvr-guard")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "active (running)" in status.stdout
    assert re.search(r"Status: \".+\"", status.stdout), status.stdout  # STATUS= from the daemon
    user = installed.ok("ps -o user= -p $(systemctl show -p MainPID --value nvr-guard)").strip()
    assert user == "nvr-guard"
    data = status_json(installed)
    assert data["ok"] is True, data
    # The first sweep at start purges what expired (40 days > highway's 15).
    poll_inside(
        installed,
        " && ".join(f"! test -e {p}" for p in old),
        "the first sweep to purge the expired segments",
    )


def test_sweep_purges_the_recorders_expired_footage_under_the_sandbox(
    installed: Container,
) -> None:
    expired = record(installed, "gate-1", 20 * 24, 20 * 24 - 0.5, 16 * 24)
    kept = record(installed, "gate-1", 24, 2)
    for path in expired + kept:
        owner = installed.ok(f"stat -c %U:%a {path}").strip()
        assert owner == "recorder:640", owner
    installed.ok("nvr-guard retention run", timeout=120)
    poll_inside(
        installed,
        " && ".join(f"! test -e {p}" for p in expired),
        "the sweep to purge the expired segments",
    )
    installed.ok(" && ".join(f"test -e {p}" for p in kept))
    entries = json.loads(installed.ok("nvr-guard --json audit show"))["entries"]
    receipts = [e["details"] for e in entries if e["action"] == "purge.receipt"]
    assert receipts and receipts[-1]["count"] == len(expired), receipts
    assert receipts[-1]["bytes"] == 4096 * len(expired)
    # The daemon's view of the file system (its mount namespace): the root is writable, its
    # parent and the rest of the system are not.
    in_sandbox = "nsenter -t $(systemctl show -p MainPID --value nvr-guard) -m -- "
    installed.ok(in_sandbox + f"sh -c 'touch {ROOT}/.probe && rm {ROOT}/.probe'")
    for outside in ("/data/nvr/.probe", "/usr/local/.probe", "/etc/.probe"):
        refused = installed.sh(in_sandbox + f"touch {outside}")
        assert refused.returncode != 0, outside
        assert "Read-only file system" in refused.stderr, refused.stderr


def test_reload_refuses_a_broken_config_and_applies_a_good_one(installed: Container) -> None:
    good = installed.ok(f"cat {CONFIG}")
    write(installed, CONFIG, good.replace("sweep_every: 1h", "sweep_every: 1 hour"))
    refused = installed.sh("systemctl reload nvr-guard", timeout=120)
    assert refused.returncode != 0, refused.stdout
    assert installed.ok("systemctl is-active nvr-guard").strip() == "active"
    data = status_json(installed)
    kinds = [a["kind"] for a in data["attention"]]  # type: ignore[index, union-attr]
    assert "reload_refused" in kinds, data
    assert data["ok"] is False
    journal = installed.ok("journalctl -u nvr-guard --no-pager -n 50")
    assert f"{CONFIG}:" in journal and "sweep_every" in journal, journal[-2000:]

    write(installed, CONFIG, good.replace("sweep_every: 1h", "sweep_every: 30m"))
    installed.ok("systemctl reload nvr-guard", timeout=120)
    data = status_json(installed)
    assert data["ok"] is True, data
    assert "sweep_every: 30m" in installed.ok("nvr-guard config show")


def test_stop_is_clean_within_ten_seconds(installed: Container) -> None:
    started = time.monotonic()
    installed.ok("systemctl stop nvr-guard", timeout=60)
    took = time.monotonic() - started
    assert took < 10, f"systemctl stop took {took:.1f} s"
    shown = installed.ok("systemctl show -p Result -p ExecMainStatus -p ActiveState nvr-guard")
    assert "Result=success" in shown and "ExecMainStatus=0" in shown, shown
    installed.ok("test ! -e /run/nvr-guard/control.sock")
    installed.ok("systemctl start nvr-guard", timeout=120)
    assert installed.ok("systemctl is-active nvr-guard").strip() == "active"


def test_sigkill_then_start_recovers(installed: Container) -> None:
    # Work in flight: new segments for the reconcile, an expired one for the sweep.
    fresh = record(installed, "gate-1", 3, 4, 5)
    doomed = record(installed, "gate-1", 30 * 24)
    installed.ok("systemctl kill -s KILL nvr-guard")
    poll_inside(
        installed,
        "s=$(systemctl show -p ActiveState --value nvr-guard); "
        "test $s != active || test $(systemctl show -p NRestarts --value nvr-guard) -gt 0",
        "systemd to notice the kill",
    )
    installed.ok("systemctl start nvr-guard", timeout=120)
    poll_inside(installed, "systemctl is-active nvr-guard", "the unit to be active again")
    installed.ok("nvr-guard audit verify", timeout=120)
    check = installed.ok(
        "/opt/nvr-guard/bin/python -c 'import sqlite3,sys; "
        'print(sqlite3.connect("file:/var/lib/nvr-guard/catalog.db?mode=ro", uri=True)'
        '.execute("pragma integrity_check").fetchone()[0])\''
    )
    assert check.strip() == "ok"
    installed.ok("nvr-guard retention run", timeout=120)
    poll_inside(installed, f"! test -e {doomed[0]}", "the sweep after the restart")
    installed.ok(" && ".join(f"test -e {p}" for p in fresh))
    assert status_json(installed)["ok"] is True


FOOTAGE = r"""
import os, subprocess, sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

root, camera, start = sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])
os.umask(0o027)
for i in range(3):
    t = start + timedelta(seconds=10 * i)
    path = os.path.join(root, camera, t.astimezone(ZoneInfo("Asia/Shanghai")).strftime(
        "%Y-%m-%d/%H/%M.%S.mp4"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=10", "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "25", path], check=True)
    os.utime(path, (t.timestamp() + 10, t.timestamp() + 10))
"""


def hours_around_now() -> str:
    """A site-local approval window holding the next hour (no after-hours step needed)."""
    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    a, b = now - timedelta(hours=1), now + timedelta(hours=1)
    if a.date() != now.date():
        a = now.replace(hour=0, minute=0)
    if b.date() != now.date():
        b = now.replace(hour=23, minute=59)
    return f"{a:%H:%M}-{b:%H:%M}"


def local(t: datetime) -> str:
    return t.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class Flow:
    """The installed service with the export workflow configured and footage to export."""

    box: Container
    start: datetime  # 30 s of lobby-1 footage from here (UTC)

    @property
    def span(self) -> tuple[str, str]:
        """A 20 s range of that footage, site-local, as the CLI takes it."""
        return local(self.start), local(self.start + timedelta(seconds=20))

    def approved_request(self) -> int:
        """alice files a request for the footage; bob and carol approve it."""
        a, b = self.span
        new = self.box.ok(
            f"nvr-guard --json request new --camera lobby-1 --from {a} --to {b}"
            ' --reason "robbery at counter 3" --basis "刑事诉讼法 art. 54"'
            ' --recipient "City police, unit 2; Officer Wang; 010-5555"',
            user="alice",
        )
        rid = int(json.loads(new)["id"])
        self.box.ok(f"nvr-guard request approve {rid}", user="bob")
        self.box.ok(f"nvr-guard request approve {rid}", user="carol")
        return rid

    def fingerprint(self) -> str:
        return str(json.loads(self.box.ok("nvr-guard --json key show"))["fingerprint"])

    def stick_id(self) -> str:
        """The stick's medium id, as the daemon lists it."""
        media = json.loads(self.box.ok("nvr-guard --json media list"))["media"]
        found = [m for m in media if m.get("fs_uuid") == STICK[0].uuid]
        assert len(found) == 1, media
        return str(found[0]["id"])


@pytest.fixture(scope="module")
def flow(installed: Container) -> Flow:
    """Two approval steps, export hours around now, the fast preset; footage 2 hours ago."""
    good = installed.ok(f"cat {CONFIG}")
    config = (
        good
        + f'approval:\n  steps: [dept_manager, security_lead]\n  hours: "{hours_around_now()}"\n'
    )
    write(installed, CONFIG, config.replace("targets: [", "preset: ultrafast\n  targets: ["))
    installed.ok("systemctl reload nvr-guard", timeout=120)
    installed.ok("for u in alice bob carol tom audrey; do usermod -aG nvr-guard $u; done")
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    made = installed.run(
        ["runuser", "-u", "recorder", "--", "python3", "-c", FOOTAGE, ROOT, "lobby-1"]
        + [start.isoformat()],
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    installed.ok("nvr-guard retention run", timeout=120)  # reconciles the new footage too
    return Flow(installed, start)


def modes(box: Container, package: str) -> set[str]:
    """owner:group mode of the package directory and of each file in it."""
    return set(box.ok(f"stat -c '%U:%G %a' {package} {package}/*").split("\n")) - {""}


PACKAGE_MODES = {"nvr-guard:nvr-guard-export 750", "nvr-guard:nvr-guard-export 640"}


def test_request_approve_scan_export_verify_as_separate_users(flow: Flow) -> None:
    """Each person a Unix user of their own; the technician and the auditor, members of
    export.group, read and verify the package and the record themselves, not root."""
    box = flow.box
    rid = flow.approved_request()
    box.ok(f"nvr-guard media scan {EXPORT}", user="tom", timeout=300)
    exported = box.ok(
        f"nvr-guard --json export run {rid} --media {EXPORT}", user="tom", timeout=600
    )
    package = json.loads(exported)["package"]
    # The unit's UMask=0077 does not decide: 0750/0640 and the export group, set with fchown
    # under the unit's system-call filter (the target is a plain root-owned 0755 directory).
    assert box.ok(f"stat -c '%U:%G %a' {EXPORT}").strip() == "root:root 755"
    assert modes(box, package) == PACKAGE_MODES
    fingerprint = flow.fingerprint()
    verified = box.sh(f"nvr-guard --json verify {package} --fingerprint {fingerprint}", user="tom")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["signer_confirmed"] is True
    # Someone outside export.group (the requester) cannot read the footage.
    outsider = box.sh(f"nvr-guard verify {package} --fingerprint {fingerprint}", user="alice")
    assert outsider.returncode != 0, outsider.stdout
    assert box.sh(f"cat {package}/manifest.json", user="alice").returncode != 0
    # The auditor reads the chain and the record through the daemon (state directory 0700).
    box.ok("nvr-guard audit verify", user="audrey", timeout=120)
    shown = json.loads(box.ok("nvr-guard --json audit show", user="audrey"))
    assert any(e["action"].startswith("export.") for e in shown["entries"])
    form = box.ok(f"nvr-guard export form {rid}", user="audrey")
    assert "robbery at counter 3" in form and fingerprint in form
    box.ok(f'cd "$HOME" && nvr-guard export form {rid} -o record-{rid}.html', user="audrey")
    written = f"/home/audrey/record-{rid}.html"
    assert box.ok(f"stat -c %U {written}").strip() == "audrey"
    assert fingerprint in box.ok(f"cat {written}")
    assert box.ok("stat -c %a /var/lib/nvr-guard").strip() == "700"


def in_daemon(box: Container, command: str) -> str:
    """Run ``command`` in the daemon's mount namespace (what the sandbox lets it see)."""
    return box.ok(f"nsenter -t $(systemctl show -p MainPID --value nvr-guard) -m -- {command}")


def test_usb_stick_mounted_by_the_admin_enrolled_scanned_exported_and_verified(
    flow: Flow,
) -> None:
    box, device = flow.box, STICK[0].device
    # The daemon reads the stick's filesystem from its device node (PrivateDevices= lifted by
    # the generated drop-in; under the shipped PrivateDevices=yes it saw no filesystem at all).
    mid = flow.stick_id()
    assert mid.startswith("usb-4C530001231122115392-") and mid.endswith(STICK[0].uuid[:8]), mid
    in_daemon(box, f"test -b {device}")
    box.ok(f'nvr-guard media enroll {mid} --label "evidence stick 3"')
    rid = flow.approved_request()
    # Mounted somewhere else: scanned, but refused as a destination, naming the mount point.
    box.ok(f"install -d /mnt/elsewhere && mount -o nosuid,nodev,noexec {device} /mnt/elsewhere")
    box.ok(f"nvr-guard media scan {mid}", user="tom", timeout=300)
    refused = box.sh(f"nvr-guard export run {rid} --media {mid}", user="tom", timeout=300)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"not at one of media.mountpoints ({STICK_AT})" in refused.stderr, refused.stderr
    box.ok("umount /mnt/elsewhere")
    # At the mount point, while the daemon runs: the mount propagates into its namespace.
    box.ok(f"mount -o nosuid,nodev,noexec {device} {STICK_AT}")
    box.ok(f"nvr-guard media scan {mid}", user="tom", timeout=300)
    exported = box.ok(f"nvr-guard --json export run {rid} --media {mid}", user="tom", timeout=600)
    package = json.loads(exported)["package"]
    assert package.startswith(f"{STICK_AT}/NVRG-{rid}-"), package
    assert modes(box, package) == PACKAGE_MODES
    fingerprint = flow.fingerprint()
    box.ok(f"nvr-guard verify {package} --fingerprint {fingerprint}", user="tom")
    # Mounted before the daemon starts: the unit's ProtectSystem=strict would make it read-only
    # but for the generated ReadWritePaths= entry.
    box.ok("systemctl restart nvr-guard", timeout=120)
    poll_inside(box, "systemctl is-active nvr-guard", "the restarted unit")
    options = in_daemon(box, f"findmnt -n -o OPTIONS {STICK_AT}").strip().split(",")
    assert options[0] == "rw" and {"nosuid", "nodev", "noexec"} <= set(options), options
    second = flow.approved_request()
    box.ok(f"nvr-guard media scan {mid}", user="tom", timeout=300)
    again = json.loads(
        box.ok(f"nvr-guard --json export run {second} --media {mid}", user="tom", timeout=600)
    )["package"]
    box.ok(f"nvr-guard verify {again} --fingerprint {fingerprint}", user="tom")
    box.ok(f"nvr-guard verify {package} --fingerprint {fingerprint}", user="audrey")
    entries = json.loads(box.ok("nvr-guard --json audit show", user="audrey"))["entries"]
    enrolled = [e for e in entries if e["action"] == "media.enroll"]
    assert [e["object"] for e in enrolled] == [f"media:{mid}"], enrolled
    # Done with it: the admin withdraws the enrolment and unmounts (the README's flow starts over).
    box.ok(f'nvr-guard media remove {mid} --reason "test done"')
    box.ok(f"umount {STICK_AT}")


@pytest.mark.parametrize("readme_flow", readme_flows(), ids=lambda f: f.name)
def test_readme_flow_runs_verbatim(flow: Flow, readme_flow: ReadmeFlow) -> None:
    """A README block marked as a flow, each line run as the user its prompt names (admin:
    root), from that user's home directory, with only the marker's literals replaced."""
    box = flow.box
    files_request = any(" request new " in f" {cmd} " for _, cmd in readme_flow.commands)
    values: dict[str, str] = {}

    def newest_package() -> str:
        rid = value("request")
        found = box.ok(f"ls -1dt {EXPORT}/NVRG-{rid}-* {STICK_AT}/NVRG-{rid}-* 2>/dev/null || true")
        assert found.strip(), f"no package of request {rid}"
        return Path(found.split()[0]).name

    makers: dict[str, Callable[[], str]] = {
        "from": lambda: flow.span[0],
        "to": lambda: flow.span[1],
        "target": lambda: EXPORT,
        "fingerprint": flow.fingerprint,
        "medium": flow.stick_id,
        "device": lambda: STICK[0].device,
        "request": lambda: str(flow.approved_request()),
        "package": newest_package,
    }

    def value(role: str) -> str:
        if role == "request" and files_request:
            assert "request" in values, "the flow names its request before filing it"
        if role == "package" or role not in values:
            values[role] = makers[role]()
        return values[role]

    for user, command in readme_flow.commands:
        line = readme_flow.substitute(command, value)
        result = box.sh(f'cd "$HOME"\n{line}', user=None if user == "admin" else user, timeout=600)
        assert result.returncode == 0, (
            f"{user}$ {line}\n-> exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
        if " request new " in f" {command} ":
            listed = json.loads(box.ok("nvr-guard --json request list"))["requests"]
            values["request"] = str(max(int(r["id"]) for r in listed))


def test_security_exposure_of_the_loaded_unit(installed: Container) -> None:
    out = installed.ok("systemd-analyze security --no-pager nvr-guard")
    match = re.search(r"Overall exposure level for nvr-guard\.service: (\d+(?:\.\d+)?)", out)
    assert match, out
    level = float(match.group(1))
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}\n{out}"


# Frigate beside nvr-guard (issue 16): its own user, its tree in UTC, its SQLite index in WAL mode
FRIGATE = r"""
import json, os, sqlite3, sys
from datetime import datetime, timedelta, timezone

root, db, migrations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
os.umask(0o027)
os.makedirs(os.path.dirname(db), exist_ok=True)
conn = sqlite3.connect(db)
conn.execute("PRAGMA journal_mode=wal")
for stmt in migrations:
    conn.execute(stmt)
now = datetime.now(timezone.utc).replace(microsecond=0)
for age in sys.argv[4:]:
    t = now - timedelta(hours=float(age))
    path = os.path.join(root, t.strftime("%Y-%m-%d/%H/front/%M.%S.mp4"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    os.utime(path, (t.timestamp() + 10, t.timestamp() + 10))
    conn.execute(
        "INSERT INTO recordings (id, camera, path, start_time, end_time, duration, segment_size)"
        " VALUES (?, 'front', ?, ?, ?, 10, 0)",
        (f"r{age}", path, t.timestamp(), t.timestamp() + 10),
    )
    print(path)
conn.commit()
conn.close()
"""
FRIGATE_ROOT = "/data/frigate/recordings"
FRIGATE_DB = "/data/frigate/config/frigate.db"


def test_frigate_preset_and_its_index_under_the_unit(installed: Container) -> None:
    # Frigate's own user owns its tree and its database (0640 in 0750 directories); nvr-guard,
    # under the shipped unit, deletes the expired segments and removes their rows, and the
    # drop-in written by unit-paths lets SQLite write the -wal/-shm beside the database
    from tests.fixtures.frigate_db import _MIGRATIONS

    installed.ok(
        "useradd --system --user-group --no-create-home frigate\n"
        "install -d -o frigate -g frigate -m 0750 /data/frigate /data/frigate/config "
        f"{FRIGATE_ROOT}\n"
    )
    out = installed.run(
        ["runuser", "-u", "frigate", "--", "python3", "-c", FRIGATE, FRIGATE_ROOT, FRIGATE_DB,
         json.dumps(_MIGRATIONS), str(20 * 24), str(20 * 24 - 1), "2"]
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    expired, kept = out.stdout.split()[:2], out.stdout.split()[2:]
    config = installed.ok(f"cat {CONFIG}")
    write(
        installed,
        CONFIG,
        config.replace(
            "sites:\n",
            f"recorder: {{kind: frigate, database: {FRIGATE_DB}}}\nsites:\n"
            f"  lobby:\n    keep: 15d\n    roots: [{FRIGATE_ROOT}]\n    layout: frigate\n",
            1,
        ),
    )
    installed.ok(f"nvr-guard config check {CONFIG}")
    installed.ok(
        f"nvr-guard --config {CONFIG} unit-paths > /etc/systemd/system/nvr-guard.service.d/"
        "20-paths.conf && systemctl daemon-reload && systemctl restart nvr-guard",
        timeout=120,
    )
    shown = installed.ok("systemctl show -p ReadWritePaths nvr-guard")
    assert "/data/frigate/config" in shown and FRIGATE_ROOT in shown, shown
    poll_inside(
        installed,
        " && ".join(f"! test -e {p}" for p in expired),
        "the sweep to purge Frigate's expired segments",
        timeout=120,
    )
    installed.ok(" && ".join(f"test -e {p}" for p in kept))
    rows = installed.ok(
        f"python3 -c \"import sqlite3; print('\\n'.join(r[0] for r in "
        f"sqlite3.connect('{FRIGATE_DB}').execute('SELECT path FROM recordings')))\""
    ).split()
    assert rows == kept, rows
    data = status_json(installed)
    assert not [a for a in data["attention"] if a["kind"] == "recorder_index"], data  # type: ignore[union-attr,index]
    entries = json.loads(installed.ok("nvr-guard --json audit show"))["entries"]
    receipts = [e["details"] for e in entries if e["action"] == "purge.receipt"]
    assert any(r.get("index_rows") == len(expired) for r in receipts), receipts[-3:]


# The web console as shipped (issue 17): nvr-guard-auth.socket (the password helper, PAM
# service nvr-guard) and nvr-guard-web.service with the TLS pair make install-service made.
WEB_CLIENT = r"""
import http.client, json, re, ssl, sys, urllib.parse
user, password, rid, action = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile="/etc/nvr-guard/web/tls.crt")
ctx.check_hostname = False  # the pair names the host's name; we come in by address
def req(method, path, body=None, cookie=None):
    c = http.client.HTTPSConnection("127.0.0.1", 8443, context=ctx, timeout=60)
    headers = {"content-type": "application/x-www-form-urlencoded"} if body is not None else {}
    if cookie:
        headers["cookie"] = cookie
    c.request(method, path, urllib.parse.urlencode(body) if body is not None else None, headers)
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read().decode()
status, headers, _ = req("POST", "/login", {"username": user, "password": password})
out = {"login": status, "cookie": headers.get("set-cookie", "")}
if status == 303:
    cookie = headers["set-cookie"].split(";")[0]
    status, _, page = req("GET", "/requests?waiting=me", cookie=cookie)
    out["waiting"] = status
    out["listed"] = f"/requests/{rid}" in page
    if action == "approve":
        status, _, page = req("GET", f"/requests/{rid}", cookie=cookie)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        out["approve"] = req("POST", f"/requests/{rid}/approve", {"csrf_token": token,
                             "note": "seen on the web"}, cookie=cookie)[0]
print(json.dumps(out))
"""


def test_web_console_under_its_units(flow: Flow) -> None:
    """Real accounts with passwords log in over TLS through PAM; the console acts through the
    daemon for them, as nvr-guard-web, and the daemon's record says so."""
    box = flow.box
    assert box.ok("stat -c '%U:%G %a' /etc/nvr-guard/web/tls.key").strip() == (
        "root:nvr-guard-web 640"
    )
    config = box.ok(f"cat {CONFIG}")
    write(
        box,
        CONFIG,
        config + 'web: {listen: "0.0.0.0:8443", tls_cert: /etc/nvr-guard/web/tls.crt,'
        " tls_key: /etc/nvr-guard/web/tls.key, max_failures: 3}\n",
    )
    box.ok("systemctl reload nvr-guard", timeout=120)
    box.ok("printf 'bob:Bob-pw-2026\\nalice:Alice-pw-2026\\n' | chpasswd")
    box.ok("systemctl enable --now nvr-guard-auth.socket nvr-guard-web", timeout=120)
    try:
        poll_inside(
            box,
            'python3 -c "import ssl,urllib.request as u; c=ssl._create_unverified_context();'
            " print(u.urlopen('https://127.0.0.1:8443/healthz', context=c).read().decode())\"",
            "the console's /healthz",
            timeout=90,
        )
    except AssertionError:
        journal = box.run(["journalctl", "-u", "nvr-guard-web", "--no-pager", "-n", "60"])
        raise AssertionError("the console did not come up:\n" + journal.stdout) from None
    web_user = box.ok("ps -o user= -p $(systemctl show -p MainPID --value nvr-guard-web)")
    assert web_user.strip() == "nvr-guard-web"
    # The console's account cannot read the daemon's state or the password hashes.
    for reading in ("ls /var/lib/nvr-guard", "head -c1 /etc/shadow"):
        assert box.sh(f"runuser -u nvr-guard-web -- {reading}").returncode != 0, reading
    write(box, "/usr/local/lib/webclient.py", WEB_CLIENT)
    a, b = flow.span
    new = box.ok(
        f"nvr-guard --json request new --camera lobby-1 --from {a} --to {b}"
        ' --reason "seen at the web" --basis "case 9" --recipient "PSB; Li; 110"',
        user="alice",
    )
    rid = int(json.loads(new)["id"])
    wrong = json.loads(box.ok(f"python3 /usr/local/lib/webclient.py bob nope {rid} list"))
    assert wrong["login"] == 401
    out = json.loads(box.ok(f"python3 /usr/local/lib/webclient.py bob Bob-pw-2026 {rid} approve"))
    assert out["login"] == 303 and "Secure" in out["cookie"] and "__Host-" in out["cookie"]
    assert out["listed"] is True and out["approve"] == 303
    shown = json.loads(box.ok(f"nvr-guard --json request show {rid}", user="alice"))
    assert [a["approver"] for a in shown["approvals"]] == ["bob"]
    entries = json.loads(box.ok("nvr-guard --json audit show", user="audrey"))["entries"]
    approve = [e for e in entries if e["action"] == "request.approve" and e["actor"] == "bob"]
    assert approve[-1]["details"]["via"] == "web"
    assert any(e["action"] == "auth.failed" and e["object"] == "bob" for e in entries)
    exposure = box.ok("systemd-analyze security --no-pager nvr-guard-web")
    match = re.search(r"exposure level for nvr-guard-web\.service: (\d+(?:\.\d+)?)", exposure)
    assert match and float(match.group(1)) <= 2.5, exposure
