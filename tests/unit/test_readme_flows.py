"""The README's flow blocks (tests/fixtures/readme_flows.py) parse, and every value a marker
substitutes is in its block: the container test (tests/integration/test_deployed.py) runs them."""

from __future__ import annotations

import pytest

from tests.fixtures.readme_flows import parse_flows, readme_flows


def test_the_readme_marks_the_request_and_usb_flows() -> None:
    flows = {f.name: f for f in readme_flows()}
    assert {"request-export", "usb-export"} <= set(flows)
    for flow in flows.values():
        assert flow.commands, flow.name
        text = "\n".join(cmd for _, cmd in flow.commands)
        for literal in flow.subs:
            assert literal in text, f"flow {flow.name}: {literal!r} is not in the block"


def test_every_export_in_a_flow_follows_a_scan_of_its_destination() -> None:
    for flow in readme_flows():
        scanned: set[str] = set()
        for _, cmd in flow.commands:
            words = cmd.split()
            if words[1:3] == ["media", "scan"]:
                scanned.add(words[3])
            if words[1:3] == ["export", "run"]:
                dest = words[words.index("--media") + 1]
                assert dest in scanned, f"flow {flow.name}: export onto {dest} without a scan"


def test_a_block_line_that_is_not_a_command_is_an_error() -> None:
    text = "<!-- flow: x\n-->\n```\nalice$ nvr-guard status\nsome prose\n```\n"
    with pytest.raises(ValueError, match="user\\$ command"):
        parse_flows(text)


def test_continuations_join_and_substitution_is_one_pass_by_whole_word() -> None:
    text = (
        "<!-- flow: x\n  7 = request\n  NVRG-7-X = package\n-->\n\n```sh\n"
        "bob$   nvr-guard request approve 7   # step\n"
        "tom$ nvr-guard verify /t/NVRG-7-X \\\n      --fingerprint F\n```\n"
    )
    [flow] = parse_flows(text)
    assert flow.commands == [
        ("bob", "nvr-guard request approve 7   # step"),
        ("tom", "nvr-guard verify /t/NVRG-7-X --fingerprint F"),
    ]
    values = {"request": "17", "package": "NVRG-17-Y"}
    subst = [flow.substitute(c, values.__getitem__) for _, c in flow.commands]
    assert subst == [
        "nvr-guard request approve 17   # step",
        "nvr-guard verify /t/NVRG-17-Y --fingerprint F",
    ]
    with pytest.raises(ValueError, match="unknown role"):
        parse_flows("<!-- flow: y\n  7 = requets\n-->\n```\na$ b\n```\n")
