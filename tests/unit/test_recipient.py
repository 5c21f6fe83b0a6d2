"""--recipient records what was typed: positions kept, nothing dropped (a fourth part used to
vanish, and an empty middle part shifted the contact into the person field)."""

from __future__ import annotations

import pytest

from nvr_guard.cli.request_cmd import parse_recipient
from nvr_guard.errors import InvalidInput


@pytest.mark.parametrize(
    "text, want",
    [
        ("City police; Officer Wang; 110", ("City police", "Officer Wang", "110")),
        ("PSB, unit 2; Officer Wang; 010-5555", ("PSB, unit 2", "Officer Wang", "010-5555")),
        ("A, B, C", ("A", "B", "C")),
        ("A;;C", ("A", "", "C")),  # the empty person stays empty (refused later by name)
        ("A; B; C;", ("A", "B", "C")),  # a trailing separator is no fourth part
        ("unit=PSB; contact=110; person=Li", ("PSB", "Li", "110")),
        ("unit=PSB; Li; 110", ("PSB", "Li", "110")),
    ],
)  # fmt: skip
def test_parts_land_where_they_were_typed(text: str, want: tuple[str, str, str]) -> None:
    r = parse_recipient(text, None, None)
    assert (r["unit"], r["person"], r["contact"]) == want


@pytest.mark.parametrize(
    "text", ["City police, unit 2; Officer Wang; Room 301; 010-5555", "a;b;c;d", "a;;;;e"]
)
def test_more_than_three_parts_are_refused_not_dropped(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_recipient(text, None, None)
    assert "parts" in str(info.value) and "\n" not in str(info.value)
