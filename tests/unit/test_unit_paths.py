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
