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
