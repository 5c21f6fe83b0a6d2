"""Finding the watermark font: ``export.font`` is a file, a fontconfig family, or unset.

The watermark carries names and reasons in Chinese; a font without CJK glyphs draws them as empty
boxes, which would make the watermark unreadable exactly where it matters. So a family is accepted
only when fontconfig says it covers Simplified Chinese, and with nothing configured the first
installed font that does is used.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from nvr_guard.errors import RuntimeFailure

CJK = "zh-cn"
INSTALL_HINT = "install one (apt install fonts-wqy-zenhei) or set export.font to a font file"


def _fc_list(pattern: str) -> list[Path]:
    try:
        cp = subprocess.run(
            ["fc-list", "--", pattern, "file"], capture_output=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise RuntimeFailure(f"fc-list (fontconfig) is not installed; {INSTALL_HINT}") from None
    files = []
    for line in cp.stdout.decode("utf-8", "replace").splitlines():
        name = line.strip().rstrip(":").strip()
        if name:
            files.append(Path(name))
    return sorted(files)


def resolve_font(spec: str | None) -> Path:
    """The font file to give drawtext."""
    if spec and (spec.startswith("/") or Path(spec).is_file()):
        path = Path(spec)
        if not path.is_file():
            raise RuntimeFailure(f"export.font: {spec} does not exist; {INSTALL_HINT}")
        return path
    if spec:
        # fontconfig pattern syntax: escape its separators in the family name
        family = "".join("\\" + c if c in "\\-:,=" else c for c in spec)
        found = _fc_list(f"{family}:lang={CJK}")
        if not found:
            raise RuntimeFailure(
                f"export.font: no installed font of family {spec!r} covers Chinese; {INSTALL_HINT}"
            )
        return found[0]
    found = _fc_list(f":lang={CJK}")
    if not found:
        raise RuntimeFailure(f"no font with Chinese glyphs is installed; {INSTALL_HINT}")
    return found[0]


def _charset(ranges: str) -> list[tuple[int, int]]:
    out = []
    for part in ranges.split():
        lo, _, hi = part.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return out


def coverage_problem(path: Path, text: str) -> str | None:
    """Why the font file at ``path`` cannot draw the watermark, or None when it can.

    It must cover Simplified Chinese as fontconfig judges it (names and reasons filled into the
    watermark are often Chinese) and every character the template itself writes; else drawtext
    draws empty boxes where the evidence needs words."""
    try:
        cp = subprocess.run(
            ["fc-query", "-i", "0", "--format", "%{lang}\n%{charset}\n", "--", str(path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        return f"fc-query (fontconfig) is not installed, the font cannot be checked; {INSTALL_HINT}"
    lines = cp.stdout.decode("ascii", "replace").splitlines()
    if cp.returncode != 0 or len(lines) < 2:
        return f"{path} is not a font fontconfig can read"
    langs = set(lines[0].split("|"))
    try:
        ranges = _charset(lines[1])
    except ValueError:
        return f"{path}: fontconfig reported no readable character set"
    if CJK not in langs:
        return (
            f"{path} has no Chinese glyphs (the watermark would show empty boxes); {INSTALL_HINT}"
        )
    missing = sorted(
        {
            ch
            for ch in text
            if not ch.isspace() and not any(lo <= ord(ch) <= hi for lo, hi in ranges)
        }
    )
    if missing:
        shown = " ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:5])
        return f"{path} lacks glyphs the watermark template uses: {shown}"
    return None
