"""Each store module imports on its own, in a fresh interpreter (a process per module: the rest of
the architecture tests are in tests/unit/test_architecture.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.unit.test_architecture import PACKAGE, STORE, module_name


def test_each_store_module_imports_on_its_own() -> None:
    # Importing a submodule runs its package's __init__ first, which the graph above does not
    # model: store.media once imported media.detect, whose package imports media.gate, which
    # imports store.media half-initialised (ImportError when store.media came first).
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    failed = {}
    for path in sorted(STORE.glob("*.py")):
        mod = module_name(path)
        proc = subprocess.run(
            [sys.executable, "-c", f"import {mod}"], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            failed[mod] = proc.stderr.strip().splitlines()[-1:]
    assert len(list(STORE.glob("*.py"))) >= 5
    assert failed == {}
