"""`make install-docs` (run by `make install-service`): the man page and the bash completion of
the installed program land where man and bash-completion look, and work (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_install_docs_writes_a_man_page_and_a_working_completion(tmp_path: Path) -> None:
    # a PREFIX like install-service's venv: bin/python and the bin/nvr-guard console script
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    # (scripts, not symlinks: a venv's python finds its packages from where it is called)
    for name, line in (("python", '"$@"'), ("nvr-guard", '-m nvr_guard "$@"')):
        (prefix / "bin" / name).write_text(f"#!/bin/sh\nexec {sys.executable} {line}\n")
        (prefix / "bin" / name).chmod(0o755)
    script = prefix / "bin" / "nvr-guard"
    man, comp = tmp_path / "man", tmp_path / "completions"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        ["make", "-C", str(REPO), "install-docs", f"PREFIX={prefix}", f"MANDIR={man}",
         f"BASHCOMPDIR={comp}"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    page = man / "man1" / "nvr-guard.1"
    assert (page.stat().st_mode & 0o777) == 0o644
    text = page.read_text()
    assert ".SS retention plan" in text and ".SS export form" in text
    assert not list((man / "man1").glob(".*.tmp")) and not list(comp.glob(".*.tmp"))
    # man itself finds and renders it
    shown = subprocess.run(
        ["man", "-l", str(page)], capture_output=True, text=True, env={**env, "MANPAGER": "cat"},
        timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0 and "retention plan" in shown.stdout, shown.stderr

    # the completion, sourced in bash as bash-completion would, completes commands and options
    completion = comp / "nvr-guard"
    assert (completion.stat().st_mode & 0o777) == 0o644

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        cmd = (
            f"source {completion}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            f'_nvr_guard_completion {script}; printf "%s\\n" "${{COMPREPLY[@]}}"'
        )
        res = subprocess.run(
            ["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert complete("nvr-guard", "ret") == ["retention"]
    assert "plan" in complete("nvr-guard", "retention", "")
    assert complete("nvr-guard", "retention", "plan", "--li") == ["--list"]
