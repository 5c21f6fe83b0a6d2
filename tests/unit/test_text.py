"""The text formats of durations, shares and sizes (nvr_guard/text.py), at their boundaries.

Each format is pinned because messages, receipts and ``config show`` print it and scripts read
them; the module must stay pure so the policy and access cores may use it; the config package's
modules import only the ones before them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nvr_guard.text import (
    Duration,
    fmt_age,
    fmt_duration,
    fmt_limit,
    fmt_mib,
    fmt_percent,
    fmt_percent_exact,
    fmt_span,
    fmt_span_exact,
    human_bytes,
    parse_fraction,
    printable,
)

PACKAGE = Path(__file__).resolve().parents[2] / "nvr_guard"


@pytest.mark.parametrize(
    ("written", "shown", "retention_key"),
    [
        ("90min", "1h30m", "1h30min"),
        ("14d", "14d", "14d"),  # days stay days: an admin wrote 14d, not 2w
        ("2w", "14d", "14d"),
        ("18mo", "1y6mo", "1y6mo"),
        ("1d12h", "1d12h", "1d12h"),
        ("45s", "45s", "45s"),
    ],
)
def test_duration_is_shown_as_written(written: str, shown: str, retention_key: str) -> None:
    d = Duration.parse(written)
    assert str(d) == shown
    assert fmt_duration(d) == shown
    assert fmt_duration(d, "min") == retention_key
    assert Duration.parse(retention_key, bare_minutes=False) == d


def test_no_limit_is_forever() -> None:
    assert fmt_limit(None) == "forever"
    assert fmt_limit(Duration.parse("6mo")) == "6mo"


@pytest.mark.parametrize(
    ("seconds", "rough", "exact", "age"),
    [
        (0, "0 s", "0 s", "0 s"),
        (90, "90 s", "1 min 30 s", "90 s"),
        (119, "119 s", "1 min 59 s", "119 s"),
        (120, "2 min", "2 min", "2 min"),
        (7199, "120 min", "1 h 59 min 59 s", "120 min"),
        (7200, "2 h", "2 h", "2.0 h"),
        (9000, "2 h", "2 h 30 min", "2.5 h"),
        (86400, "1 d", "24 h", "24.0 h"),
        (86401, "1 d", "24 h 1 s", "24.0 h"),
        (93600, "1 d 2 h", "26 h", "26.0 h"),
        (172800, "2 d", "2 d", "48.0 h"),
        (172801, "2 d", "48 h 1 s", "48.0 h"),
    ],
)
def test_spans(seconds: int, rough: str, exact: str, age: str) -> None:
    assert fmt_span(seconds) == rough
    assert fmt_span_exact(seconds) == exact
    assert fmt_age(seconds) == age


def test_rough_span_drops_the_sign() -> None:
    # a clock that went back by 2 h is reported as "went back 2 h"
    assert fmt_span(-7200) == "2 h"


@pytest.mark.parametrize(
    ("fraction", "shown"),
    [(0.31, "31%"), (0.2, "20%"), (0.125, "12.5%"), (0.001, "0.1%"), (0.0, "0%"), (1.0, "100%")],
)
def test_percent(fraction: float, shown: str) -> None:
    assert fmt_percent(fraction) == shown


@pytest.mark.parametrize(
    ("fraction", "shown"), [(0.2, "20%"), (0.1, "10%"), (0.05, "5%"), (0.125, "12.5%")]
)
def test_exact_percent_reads_back(fraction: float, shown: str) -> None:
    assert fmt_percent_exact(fraction) == shown
    assert parse_fraction(shown) == fraction


@pytest.mark.parametrize(
    ("written", "value"),
    [("20%", 0.2), (" 0.2 ", 0.2), ("100%", 1.0), ("0", 0.0), (".5", 0.5), (1, 1.0), (0.25, 0.25)],
)
def test_parse_fraction(written: str | float, value: float) -> None:
    assert parse_fraction(written) == value


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("101%", "101% is not between 0 and 1; write a fraction such as 0.2 or a percentage"),
        ("1.5", "1.5 is not between 0 and 1;"),
        (2, "2 is not between 0 and 1;"),
        ("-0.1", "-0.1 is not between 0 and 1;"),
        ("a fifth", "expected a fraction such as 0.2 or a percentage such as 20%, got 'a fifth'"),
        ("20 %%", "got '20 %%'"),
    ],
)
def test_parse_fraction_refuses(written: str | float, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_fraction(written)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 2**30, "5.0 GiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_human_bytes(n: int, shown: str) -> None:
    assert human_bytes(n) == shown


@pytest.mark.parametrize(
    ("n", "shown"), [(512 * 1024, "512 KiB"), (2**20, "1 MiB"), (1204 * 2**20, "1,204 MiB")]
)
def test_mib(n: int, shown: str) -> None:
    assert fmt_mib(n) == shown


def test_printable_keeps_a_name_on_one_line() -> None:
    assert printable("gate\n03\x1b[2J") == "gate\\n03\\x1b[2J"
    assert printable("大门 03") == "大门 03"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(node.module or "")
    return out


def test_text_is_pure() -> None:
    # the pure cores (policy, access) use it: nothing here may read the disk, the clock or the net
    assert _imports(PACKAGE / "text.py") <= {
        "__future__",
        "calendar",
        "re",
        "dataclasses",
        "datetime",
    }


CONFIG_LAYERS = ["loader", "profiles", "types", "models", "checks", "validate"]


def test_config_modules_import_only_earlier_ones() -> None:
    seen = {p.stem for p in (PACKAGE / "config").glob("*.py")} - {"__init__"}
    assert seen == set(CONFIG_LAYERS), "a new config module needs its place in CONFIG_LAYERS"
    for i, name in enumerate(CONFIG_LAYERS):
        deps = _imports(PACKAGE / "config" / f"{name}.py")
        config_deps = {m for m in deps if m.startswith("nvr_guard.config")}
        allowed = {f"nvr_guard.config.{earlier}" for earlier in CONFIG_LAYERS[:i]}
        assert config_deps <= allowed, f"config/{name}.py imports {config_deps - allowed}"
