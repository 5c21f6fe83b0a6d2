"""`config check` refuses an export.font that cannot draw the watermark (issue: a Latin-only font
drew empty boxes where the Chinese names and reasons of the evidence watermark belong)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures.cli import run_cli


def _font(lang: str, covered: bool) -> Path:
    """An installed font file that does (or does not) cover ``lang``, per fontconfig."""
    with_lang = set(
        subprocess.run(
            ["fc-list", f":lang={lang}", "file"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    every = subprocess.run(
        ["fc-list", ":", "file"], capture_output=True, text=True, check=True
    ).stdout.split()
    pick = sorted(
        f.rstrip(":")
        for f in every
        if (f in with_lang) == covered and f.rstrip(":").endswith((".ttf", ".ttc", ".otf"))
    )
    assert pick, f"no installed font {'with' if covered else 'without'} {lang} (make deps)"
    return Path(pick[0])


def _check(
    tmp_path: Path, font: Path, watermark: str | None = None
) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "rec"
    root.mkdir(exist_ok=True)
    lines = [
        f"state_dir: {tmp_path / 'state'}",
        "sites:",
        "  a: {profile: highway, roots: [" + str(root) + "]}",
        "export:",
        f"  font: {font}",
    ]
    if watermark is not None:
        lines.append(f'  watermark: "{watermark}"')
    cfg = tmp_path / "config.yaml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_cli(["config", "check", str(cfg)])


def test_a_font_without_chinese_is_refused_with_its_line(tmp_path: Path) -> None:
    r = _check(tmp_path, _font("zh-cn", covered=False))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{tmp_path / 'config.yaml'}:5:" in r.stderr  # the export.font line
    assert "no Chinese glyphs" in r.stderr


def test_a_cjk_font_passes(tmp_path: Path) -> None:
    r = _check(tmp_path, _font("zh-cn", covered=True))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("char", ["\U0001f512", "\u2603"])
def test_template_characters_the_font_lacks_are_named(tmp_path: Path, char: str) -> None:
    font = _font("zh-cn", covered=True)
    cp = subprocess.run(
        ["fc-query", "-i", "0", "--format", "%{charset}", str(font)],
        capture_output=True,
        text=True,
        check=True,
    )
    ranges = [
        (int(a, 16), int(b or a, 16)) for a, _, b in (p.partition("-") for p in cp.stdout.split())
    ]
    assert not any(lo <= ord(char) <= hi for lo, hi in ranges), "pick a character it lacks"
    r = _check(tmp_path, font, watermark=f"调取 {{request}} {char}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"U+{ord(char):04X}" in r.stderr and "lacks glyphs" in r.stderr


def test_a_missing_font_file_is_refused(tmp_path: Path) -> None:
    r = _check(tmp_path, tmp_path / "nope.ttf")
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
