"""Who can read what, as deployed: the state directory is the daemon's alone (0700, UMask=0077),
people with a role read through the daemon, and export packages are readable by the export
group (``export.group``) and nobody else on the host.

Real Unix users (own names: other modules create and remove theirs while this one runs) call a
real daemon started with the unit's umask; packages are written by real exports, onto a target
directory and onto an ext4 loop device described as a USB stick.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.media import MediaLab, fake_usb_stick
from tests.fixtures.site import LAYOUT, Site, daemon_answered, make_footage, poll

pytestmark = pytest.mark.integration

SOCKET_GROUP = "nvp-sock"  # everyone below: may reach the control socket
EXPORT_GROUP = "nvp-export"  # export.group: may read packages
# user -> (roles, in the export group)
PEOPLE: dict[str, tuple[str, bool]] = {
    "nvp-op": ("operator", False),
    "nvp-boss": ("dept_manager", False),
    "nvp-sec": ("security_lead", False),
    "nvp-tech": ("technician", True),
    "nvp-aud": ("auditor", True),
}


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    """Real accounts (the suite runs as root, as CI does), removed afterwards."""
    made_groups, created = [], []
    for g in (SOCKET_GROUP, EXPORT_GROUP):
        try:
            grp.getgrnam(g)
        except KeyError:
            subprocess.run(["groupadd", g], check=True)
            made_groups.append(g)
    for name, (_, exporter) in PEOPLE.items():
        try:
            pwd.getpwnam(name)
        except KeyError:
            argv = ["useradd", "-M", "-N", "-g", SOCKET_GROUP, "-s", "/usr/sbin/nologin", name]
            subprocess.run(argv, check=True)
            created.append(name)
        # exactly the supplementary groups the test needs, even for an account left behind
        subprocess.run(["usermod", "-G", EXPORT_GROUP if exporter else "", name], check=True)
    yield {n: pwd.getpwnam(n).pw_uid for n in PEOPLE}
    for name in created:
        subprocess.run(["userdel", name], check=False)
    for g in made_groups:
        subprocess.run(["groupdel", g], check=False)


class Env:
    def __init__(self, site: Site, target: Path, uids: dict[str, int], start: datetime) -> None:
        self.site, self.target, self.uids, self.start = site, target, uids, start
        self.proc: subprocess.Popen[bytes] | None = None

    def nvr(
        self, user: str, *args: str, config: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The CLI as ``user`` with the groups a login gives them (primary and supplementary)."""
        pw = pwd.getpwnam(user)
        return subprocess.run(
            [sys.executable, "-m", "nvr_guard", "--config", str(config or self.site.config), *args],
            capture_output=True,
            text=True,
            timeout=300,
            user=pw.pw_uid,
            group=pw.pw_gid,
            extra_groups=os.getgrouplist(user, pw.pw_gid),
            cwd="/",
        )

    def ok(self, user: str, *args: str) -> Any:
        r = self.nvr(user, "--json", *args)
        assert r.returncode == 0, f"{user} {args}: exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def audit(self) -> list[dict[str, Any]]:
        r = self.site.run("--json", "audit", "show")
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout)["entries"])

    def start_daemon(self) -> None:
        # the unit's UMask=0077: whatever the daemon creates without an explicit mode is private
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvr_guard", "--config", str(self.site.config), "daemon"],
            stdout=open(self.site.base / "daemon.log", "ab"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
            umask=0o077,
        )
        poll(lambda: daemon_answered(self.nvr("nvp-op", "--json", "status")), 60, "the daemon")

    def stop_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def new_request(self) -> int:
        a, b = self.start + timedelta(seconds=2), self.start + timedelta(seconds=6)
        r = self.ok(
            "nvp-op",
            "request",
            "new",
            "--camera",
            "cam1",
            "--from",
            a.isoformat(),
            "--to",
            b.isoformat(),
            "--reason",
            "theft at gate",
            "--basis",
            "police request 17",
            "--recipient",
            "City police; Officer Li; 110",
        )
        rid = int(r["id"])
        self.ok("nvp-boss", "request", "approve", str(rid))
        self.ok("nvp-sec", "request", "approve", str(rid))
        return rid


@pytest.fixture
def env(site: Site, users: dict[str, int], tmp_path: Path, clamav_db: Path) -> Iterator[Env]:
    # the unprivileged CLI must read its config and reach the socket directory
    for p in [site.base, *site.base.parents]:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    # as the unit's StateDirectoryMode=0700 and RuntimeDirectoryMode=0750 make them
    site.state.mkdir(mode=0o700)
    site.socket.parent.mkdir(mode=0o750)
    os.chown(site.socket.parent, 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (site.base / "sysfs" / "block").mkdir(parents=True)
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    make_footage(site.root, "cam1", start, 2)
    people = "\n".join(f"    {n}: {{roles: [{r}], level: 2}}" for n, (r, _) in PEOPLE.items())
    site.config.write_text(
        textwrap.dedent(f"""\
            state_dir: {site.state}
            timezone: Asia/Shanghai
            socket: {site.socket}
            socket_group: {SOCKET_GROUP}
            sweep_every: 1h
            guards: {{max_delete_fraction: 1.0, max_clock_jump: 1d}}
            disk: {{min_free: 1%, action: alert}}
            sites:
              toll:
                keep: 15d
                roots: [{site.root}]
                layout: "{LAYOUT}"
            people:
              users:
            """)
        + people
        + textwrap.dedent(f"""
            approval:
              steps: [dept_manager, security_lead]
              hours: "00:00-24:00"
            export:
              targets: [{target}]
              preset: ultrafast
              group: {EXPORT_GROUP}
            media:
              scanner: clamscan
              database: {clamav_db}
              sysfs_root: {site.base / "sysfs"}
            """)
    )
    os.chmod(site.config, 0o644)
    e = Env(site, target, users, start)
    try:
        e.start_daemon()
        yield e
    finally:  # never leave a daemon behind, even when the test failed
        e.stop_daemon()


def assert_group_package(pkg: Path) -> None:
    """Owner and export group may read it, nobody else: 0750 directory, 0640 files."""
    gid = grp.getgrnam(EXPORT_GROUP).gr_gid
    st = os.lstat(pkg)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, gid), (oct(st.st_mode), st.st_gid)
    names = os.listdir(pkg)
    assert "manifest.json" in names and "manifest.sig" in names
    for n in names:
        f = os.lstat(pkg / n)
        assert (stat.S_IMODE(f.st_mode), f.st_gid) == (0o640, gid), (n, oct(f.st_mode), f.st_gid)


def assert_readable_by_the_export_group_only(e: Env, pkg: Path) -> None:
    for user in ("nvp-tech", "nvp-aud"):  # in the export group
        v = e.ok(user, "verify", str(pkg))
        assert v["ok"] is True and v["problems"] == [], (user, v)
    # a person with a role, outside the group: cannot even list the package
    r = e.nvr("nvp-op", "verify", str(pkg))
    assert r.returncode == 2 and "is not readable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_packages_belong_to_the_export_group_under_umask_0077(
    env: Env, media_lab: MediaLab
) -> None:
    e = env
    rid = e.new_request()
    assert e.ok("nvp-tech", "media", "scan", str(e.target))["result"] == "clean"
    pkg = Path(e.ok("nvp-tech", "export", "run", str(rid), "--media", str(e.target))["package"])
    assert pkg.parent == e.target
    assert_group_package(pkg)
    assert_readable_by_the_export_group_only(e, pkg)

    # onto a USB stick (an ext4 loop device): the same modes and group
    stick = media_lab.loop(128, label="EVIDENCE")
    mp = media_lab.mount(stick.device)
    os.chmod(mp, 0o755)
    fake_usb_stick(e.site.base / "sysfs", stick, serial="NVP00001")
    [mid] = [
        m["id"] for m in e.ok("nvp-tech", "media", "list")["media"] if m.get("serial") == "NVP00001"
    ]
    assert e.site.run("media", "enroll", mid, "--label", "stick 1").returncode == 0
    assert e.ok("nvp-tech", "media", "scan", mid)["result"] == "clean"
    rid2 = e.new_request()
    pkg2 = Path(e.ok("nvp-tech", "export", "run", str(rid2), "--media", mid)["package"])
    assert pkg2.parent == mp
    assert_group_package(pkg2)
    assert_readable_by_the_export_group_only(e, pkg2)


def test_a_setgid_target_gives_the_group_to_a_writer_that_may_not_chown(
    users: dict[str, int], tmp_path: Path
) -> None:
    """The unit's daemon may not call chown (SystemCallFilter=~@privileged): a target that is
    the export group's with the setgid bit gives its packages the group by inheritance; a target
    without it refuses the export before anything is written."""
    gid = grp.getgrnam(EXPORT_GROUP).gr_gid
    writer = pwd.getpwnam("nvp-op")  # not in the export group: its fchown to it fails
    os.chmod(tmp_path, 0o755)
    for p in tmp_path.parents:
        if str(p).startswith(tempfile.gettempdir() + "/"):
            os.chmod(p, 0o755)
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from nvr_guard.errors import RuntimeFailure
        from nvr_guard.export.writer import PackageDir
        try:
            d = PackageDir(Path(sys.argv[1]), "NVRG-1-x", group={gid})
        except RuntimeFailure as e:
            print("refused:", e)
            sys.exit(3)
        d.create("manifest.json", b"{{}}")
        d.seal({{"manifest.json"}})
        d.commit("NVRG-1-x")
        d.close()
    """)
    for name, mode, group in (("setgid", 0o2750, gid), ("plain", 0o755, writer.pw_gid)):
        target = tmp_path / name
        target.mkdir()
        os.chown(target, writer.pw_uid, group)
        os.chmod(target, mode)
        r = subprocess.run(
            [sys.executable, "-c", script, str(target)],
            capture_output=True,
            text=True,
            user=writer.pw_uid,
            group=writer.pw_gid,
            extra_groups=[],
            umask=0o077,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            cwd="/",
        )
        if name == "setgid":
            assert r.returncode == 0, r.stderr
            pkg = target / "NVRG-1-x"
            st, f = os.lstat(pkg), os.lstat(pkg / "manifest.json")
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, gid)
            assert (stat.S_IMODE(f.st_mode), f.st_gid) == (0o640, gid)
        else:
            assert r.returncode == 3, (r.stdout, r.stderr)
            assert f"chgrp {EXPORT_GROUP} {target} && chmod g+s {target}" in r.stdout
            assert os.listdir(target) == []  # nothing left behind


def test_read_commands_of_people_with_roles_go_through_the_daemon(env: Env) -> None:
    e = env
    rid = e.new_request()
    # the state is the daemon's alone: nobody else could read catalog.db even if they tried
    assert stat.S_IMODE(os.stat(e.site.state).st_mode) == 0o700
    for user in ("nvp-aud", "nvp-sec"):
        assert e.ok(user, "audit", "show")["entries"]
        assert e.ok(user, "audit", "verify")["ok"] is True
    # a preview a month ahead, through the daemon: every file would be due, nothing is deleted
    ahead = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    for user in ("nvp-aud", "nvp-sec"):
        plan = e.ok(user, "retention", "plan", "--now", ahead, "--site", "toll")
        assert plan["deleted"] == 0 and plan["sweep"] is None
        judged = {Path(i["path"]) for i in plan["items"]}
        assert judged == set(e.site.root.rglob("*.mp4")) and all(p.exists() for p in judged)
        assert any(i["action"] == "keep" and "request" in i["reason"] for i in plan["items"])
    r = e.nvr("nvp-op", "retention", "plan")  # an operator may not see the plan
    assert r.returncode == 3 and "may not see the retention plan" in r.stderr, r.stderr
    assert any(x["action"] == "access.denied" and x["actor"] == "nvp-op" for x in e.audit())
    # the daemon plans under its own config only; another file is root's to preview
    other = e.site.base / "new.yaml"
    other.write_text(e.site.config.read_text().replace("keep: 15d", "keep: 30d"))
    os.chmod(other, 0o644)
    r = e.nvr("nvp-aud", "retention", "plan", config=other)
    assert r.returncode == 2 and "not the one in force" in r.stderr, r.stderr
    assert e.site.run("--config", str(other), "retention", "plan").returncode == 0

    shown = e.ok("nvp-sec", "request", "show", str(rid))
    assert shown["id"] == rid and shown["state"] == "approved"
    assert [x["id"] for x in e.ok("nvp-sec", "request", "list")["requests"]] == [rid]
    home = e.site.base / "aud-home"
    home.mkdir()
    os.chown(home, e.uids["nvp-aud"], -1)
    form = e.ok("nvp-aud", "export", "form", str(rid), "-o", str(home / "record.html"))
    assert Path(form["form"]).read_text(encoding="utf-8").lstrip().startswith("<!")
    r = e.nvr("nvp-aud", "export", "form", str(rid), "-o", str(e.site.base / "no.html"))
    assert r.returncode == 2 and "cannot write" in r.stderr, r.stderr
    assert any(h["kind"] == "request" for h in e.ok("nvp-sec", "hold", "list")["holds"])
    assert isinstance(e.ok("nvp-tech", "media", "list")["media"], list)
    assert e.ok("nvp-op", "status")["sites"]["toll"]["segments"] == 2

    # without the daemon: root reads through the same handlers, locally; others are told why
    e.stop_daemon()
    for args in (
        ("media", "list"),
        ("request", "list"),
        ("request", "show", str(rid)),
        ("export", "form", str(rid)),
        ("hold", "list"),
        ("retention", "plan", "--now", ahead),
        ("audit", "show"),
    ):
        r = e.site.run("--json", *args)
        assert r.returncode == 0, f"root {args} without a daemon: {r.returncode}: {r.stderr}"
    assert (
        e.site.run("--json", "status").returncode == 1
    )  # status reports the daemon, so it needs one
    r = e.nvr("nvp-aud", "retention", "plan")
    assert r.returncode == 1 and "only root previews" in r.stderr, r.stderr
