"""`nvr-guard unit-paths`: the ReadWritePaths= drop-in generated from the config.

That systemd honours the drop-in is tested on the real unit in
tests/integration/test_deployed.py; here: which paths, and how they are written."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.site import Site


def test_roots_targets_and_textfile_dir_become_read_write_paths(site: Site, tmp_path: Path) -> None:
    target = tmp_path / "export target"  # a space: quoted
    target.mkdir()
    textdir = tmp_path / "prom%1"  # a specifier character: escaped
    textdir.mkdir()
    site.config.write_text(
        site.config.read_text()
        + f'export:\n  targets: ["{target}"]\nmetrics:\n  textfile: "{textdir}/nvr.prom"\n'
    )
    r = site.run("unit-paths")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "[Service]" in lines
    paths = [line.removeprefix("ReadWritePaths=") for line in lines if "ReadWritePaths=" in line]
    # the test site keeps its state and socket outside the unit's directories: listed too
    assert paths == [
        f'"-{site.root}"',
        f'"-{target}"',
        f'"-{tmp_path}/prom%%1"',
        f'"-{site.state}"',
        f'"-{site.socket.parent}"',
    ]


def test_default_state_and_socket_need_no_extra_paths(site: Site) -> None:
    text = site.config.read_text()
    text = text.replace(f"state_dir: {site.state}\n", "").replace(f"socket: {site.socket}\n", "")
    site.config.write_text(text)
    data = site.json("unit-paths")
    assert data["paths"] == [{"path": str(site.root), "why": "recording root of site toll"}]


def test_a_broken_config_writes_no_drop_in(site: Site) -> None:
    site.config.write_text(site.config.read_text().replace("keep: 15d", "keep: soon"))
    r = site.run("unit-paths")
    assert r.returncode == 2
    assert r.stdout == ""
    assert f"{site.config}:" in r.stderr


def test_usb_media_mount_points_are_writable_and_open_removable_disks_read_only(
    site: Site, tmp_path: Path
) -> None:
    """media.mountpoints: the mount point is a ReadWritePaths= entry (a stick mounted before
    the daemon starts would be read-only for it otherwise) and the unit may read SCSI/USB disks
    (blkid reads the filesystem UUID); the shipped PrivateDevices=yes stays for other sites."""
    text = site.config.read_text()
    assert site.json("unit-paths")["devices"] == []
    site.config.write_text(text + "media:\n  mountpoints: [/media/nvr-export]\n")
    r = site.run("unit-paths")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert 'ReadWritePaths="-/media/nvr-export"' in lines
    settings = [line for line in lines if line and not line.startswith(("#", "ReadWrite"))]
    assert settings == ["[Service]", "PrivateDevices=no", "DeviceAllow=block-sd r"]
    data = site.json("unit-paths")
    assert {"path": "/media/nvr-export", "why": "export media mount point (media.mountpoints)"} in (
        data["paths"]
    )
    # media wipe formats the device: only then may the unit write it
    site.config.write_text(text + "media:\n  mountpoints: [/media/nvr-export]\n  prepare: wipe\n")
    assert site.json("unit-paths")["devices"] == ["PrivateDevices=no", "DeviceAllow=block-sd rw"]


def test_system_directories_are_never_made_writable(site: Site) -> None:
    # values `config check` accepts, each of which would open the system to the daemon
    base = site.config.read_text()
    for extra, bad in (
        ("export:\n  targets: [/]\n", "/ (export target)"),
        ("export:\n  targets: [/etc]\n", "/etc (export target)"),
        ("export:\n  targets: [/usr/local/x]\n", "/usr/local/x (export target)"),
        ("metrics:\n  textfile: /metrics.prom\n", "/ (metrics textfile directory)"),
        ("export:\n  targets: [/var/lib]\n", "/var/lib (export target)"),
    ):
        site.config.write_text(base + extra)
        r = site.run("unit-paths")
        assert r.returncode == 2, (extra, r.stdout)
        assert r.stdout == "" and bad in r.stderr, (extra, r.stderr)
    site.config.write_text(base.replace(f"socket: {site.socket}", "socket: /run/control.sock"))
    r = site.run("unit-paths")
    assert r.returncode == 2 and "/run (control socket directory" in r.stderr, r.stderr


def test_the_recorder_database_directory_is_writable(site: Site, tmp_path: Path) -> None:
    """SQLite writes Frigate's database and its -wal/-shm files in the database's directory:
    without it in ReadWritePaths= every index update would fail under the unit."""
    frigate = tmp_path / "frigate-config"
    text = site.config.read_text().replace(
        "    keep: 15d\n",
        f"    keep: 15d\n    recorder: {{kind: frigate, database: {frigate}/frigate.db}}\n",
    )
    site.config.write_text(text)
    data = site.json("unit-paths")
    assert {"path": str(frigate), "why": "frigate database directory"} in data["paths"]
