"""The package's import graph, computed from the source: no cycles, and each package imports only
the layers below it (the README's code map says which).

Every import counts, wherever it stands: at the top of a module, inside a function (a "lazy"
import that only hides a cycle) or under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nvr_guard"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package counts as its ``__init__``)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            else:
                continue
            for t in targets:
                while t and t not in files:  # nvr_guard.x.y.Name -> the module that defines it
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if colour.get(dep) == GREY:
                return stack[stack.index(dep) :] + [dep]
            if colour.get(dep) == WHITE:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_real_imports() -> None:
    graph = import_graph()
    # the reader must see what it claims to see, else "no cycle" would prove nothing
    assert "nvr_guard.engine" in graph["nvr_guard.daemon.main"]
    assert "nvr_guard.model" in graph["nvr_guard.retention.policy"]
    assert len(graph) > 40


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# ---- SQL lives in nvr_guard/store/ only ---------------------------------------------------------

STORE = PACKAGE / "store"
# what reaches SQLite: a statement run on a connection or cursor, a connection of its own
_SQL_CALLS = frozenset({"execute", "executemany", "executescript"})
# SQL as this project writes it (keywords upper case); matched anywhere in a string, so that a
# statement built from parts (implicit concatenation, f-strings) is still seen
_SQL_TEXT = re.compile(
    r"\bSELECT\b"
    r"|\bINSERT\s+(?:OR\s+[A-Z]+\s+)?INTO\b"
    r"|\bUPDATE\s+\S+\s+SET\b"
    r"|\bDELETE\s+FROM\b"
    r"|\bBEGIN(?:\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED))?\s*$"
    r"|\bBEGIN\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED)\b"
    r"|\b(?:CREATE|DROP)\s+(?:UNIQUE\s+)?(?:TABLE|INDEX|TRIGGER|VIEW)\b"
    r"|\bALTER\s+TABLE\b"
    r"|\bPRAGMA\s+\w+"
    r"|\b(?:COMMIT|ROLLBACK)\s*$"
)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose about SQL is allowed)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def sql_uses(source: str, filename: str = "<source>") -> list[str]:
    """Where ``source`` talks to SQLite: ``line: what`` for each statement call, each
    ``sqlite3.connect`` and each string (f-strings included) that reads as SQL."""
    tree = ast.parse(source, filename)
    skip = _docstring_nodes(tree)  # and the parts of f-strings, which are read whole
    skip |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr = node.func.attr
            owner = node.func.value
            if attr in _SQL_CALLS:
                found.append(f"{node.lineno}: .{attr}(...)")
            elif attr == "connect" and isinstance(owner, ast.Name) and owner.id == "sqlite3":
                found.append(f"{node.lineno}: sqlite3.connect(...)")
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "?"
                for v in node.values
            )
            if _SQL_TEXT.search(text):
                found.append(f"{node.lineno}: f-string {text[:60]!r}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip
            and _SQL_TEXT.search(node.value)
        ):
            found.append(f"{node.lineno}: string {node.value[:60]!r}")
    return found


def test_the_sql_detector_sees_each_way_sql_is_written() -> None:
    planted = {
        'conn.execute("SELECT 1")': 2,  # the call and the text
        "c.executemany(SQL, rows)": 1,
        "cur.executescript(script)": 1,
        "db = sqlite3.connect(path)": 1,
        'q = "SELECT id FROM sweeps WHERE finished IS NULL"': 1,
        'q = ("UPDATE holds SET until = ? " "WHERE request_id = ?")': 1,
        'q = f"DELETE FROM {table} WHERE id = ?"': 1,
        'q = f"SELECT {cols} " f"FROM segments"': 1,
        'BEGIN = "BEGIN IMMEDIATE"': 1,
        'q = "INSERT OR REPLACE INTO media (id) VALUES (?)"': 1,
        'q = "CREATE TABLE IF NOT EXISTS t (a)"': 1,
        'q = "PRAGMA user_version"': 1,
        'audit.conn.execute("BEGIN IMMEDIATE")': 2,
    }
    for src, n in planted.items():
        assert len(sql_uses(src)) == n, (src, sql_uses(src))
    prose = '''
def f():
    """Runs in one ``BEGIN IMMEDIATE`` transaction; SELECT is the policy's job."""
    log.info("select a site, then update it; delete from the list what is gone")
    raise InvalidInput("the begin of the range is after its end")
    pool.submit(job)
'''
    assert sql_uses(prose) == []


def test_no_sql_outside_the_store() -> None:
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if STORE not in p.parents]
    names = {module_name(p) for p in outside}
    # the check must look at the modules that used to hold SQL, else it proves nothing
    assert {
        "nvr_guard.engine",
        "nvr_guard.retention.scan",
        "nvr_guard.retention.purge",
        "nvr_guard.daemon.metrics",
        "nvr_guard.workflow.requests",
    } <= names
    problems = [
        f"{p.relative_to(PACKAGE.parent)}:{use}"
        for p in outside
        for use in sql_uses(p.read_text(), str(p))
    ]
    assert problems == [], "SQL outside nvr_guard/store/ (add a store method):\n" + "\n".join(
        problems
    )
    # and the store itself is seen as holding SQL (the detector works on the real files)
    assert sql_uses((STORE / "segments.py").read_text())


# the parts whose classes other code calls: each public method says in a line what it does
DOCUMENTED = [
    *sorted(STORE.glob("*.py")),
    *sorted((PACKAGE / "daemon").glob("*.py")),
    *sorted((PACKAGE / "workflow").glob("*.py")),
    PACKAGE / "engine.py",
    PACKAGE / "context.py",
    PACKAGE / "media" / "ops.py",
    PACKAGE / "retention" / "sweeper.py",
    PACKAGE / "retention" / "holds.py",
]


def test_public_methods_say_what_they_do() -> None:
    missing = []
    for path in DOCUMENTED:
        tree = ast.parse(path.read_text(), str(path))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            if any(isinstance(b, ast.Name) and b.id == "Protocol" for b in cls.bases):
                continue  # a structural type: its members are declarations
            if cls.name.startswith("_"):
                continue  # a module's own helper
            for fn in cls.body:
                setter = (
                    any(
                        isinstance(d, ast.Attribute) and d.attr == "setter"
                        for d in fn.decorator_list
                    )
                    if isinstance(fn, ast.FunctionDef)
                    else False
                )
                if (
                    isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                    and not fn.name.startswith("_")
                    and not setter  # the property's getter says it
                    and ast.get_docstring(fn) is None
                ):
                    missing.append(f"{path.name}: {cls.name}.{fn.name}")
    assert missing == []


# ---- layers: what each part may import (the README's code map says the same in words) ----------

# Modules every part may use: errors, the shared domain types, formats, identity, system helpers.
BASE = frozenset(
    {
        "nvr_guard",  # the package itself: __version__
        "nvr_guard.errors",
        "nvr_guard.text",
        "nvr_guard.logs",
        "nvr_guard.model",
        "nvr_guard.times",
        "nvr_guard.identity",
        "nvr_guard.workers",
        "nvr_guard.mounts",
        "nvr_guard.attention",
        "nvr_guard.statelock",
        "nvr_guard.wire",  # the control socket's client
    }
)
# part -> the parts it may import besides BASE and itself; a part is a top-level module or
# package of nvr_guard, or one module named whole where a single module is allowed
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "nvr_guard.export": frozenset(),
    "nvr_guard.store": frozenset(),
    # the config checks the key location and the font, and compiles the layouts (patterns and
    # recorder presets), at load
    "nvr_guard.config": frozenset(
        {
            "nvr_guard.export.keys",
            "nvr_guard.export.fonts",
            "nvr_guard.export.zones",
            "nvr_guard.retention.layout",
            "nvr_guard.retention.presets",
        }
    ),
    "nvr_guard.context": frozenset({"nvr_guard.config", "nvr_guard.store", "nvr_guard.export"}),
    "nvr_guard.retention": frozenset({"nvr_guard.config", "nvr_guard.store", "nvr_guard.context"}),
    "nvr_guard.media": frozenset({"nvr_guard.config", "nvr_guard.store", "nvr_guard.context"}),
    "nvr_guard.workflow": frozenset(
        {"nvr_guard.config", "nvr_guard.store", "nvr_guard.context", "nvr_guard.export"}
    ),
    "nvr_guard.auditview": frozenset({"nvr_guard.store"}),
}
_BELOW_ENGINE = frozenset(MAY_IMPORT) - {"base"} | {"nvr_guard.auditview"}
MAY_IMPORT |= {
    "nvr_guard.engine": _BELOW_ENGINE,
    "nvr_guard.daemon": _BELOW_ENGINE | {"nvr_guard.engine"},
    # the web console holds no authority: the config and the control socket's client
    # (nvr_guard.wire) only
    "nvr_guard.web": frozenset({"nvr_guard.config"}),
    "nvr_guard.cli": _BELOW_ENGINE | {"nvr_guard.engine", "nvr_guard.daemon", "nvr_guard.web"},
    "nvr_guard.demo": frozenset(),
    "nvr_guard.__main__": frozenset({"nvr_guard.cli"}),
}


def part_of(module: str) -> str:
    """The part a module belongs to: ``base`` or its top-level module/package."""
    if module in BASE:
        return "base"
    return ".".join(module.split(".")[:2])


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        part = part_of(mod)
        allowed = MAY_IMPORT.get(part)
        if allowed is None:
            out.append(f"{mod}: its part {part} has no row in MAY_IMPORT")
            continue
        for dep in sorted(deps):
            dep_part = part_of(dep)
            if dep_part in ("base", part) or dep_part in allowed or dep in allowed:
                continue
            out.append(f"{mod} imports {dep}")
    return out


def test_layer_check_sees_a_wrong_import() -> None:
    graph = {"nvr_guard.store.media": {"nvr_guard.workflow.access", "nvr_guard.errors"}}
    assert layer_violations(graph) == ["nvr_guard.store.media imports nvr_guard.workflow.access"]
    graph = {"nvr_guard.config.checks": {"nvr_guard.retention.layout"}}
    assert layer_violations(graph) == []
    graph = {"nvr_guard.config.checks": {"nvr_guard.retention.sweeper"}}
    assert layer_violations(graph) == [
        "nvr_guard.config.checks imports nvr_guard.retention.sweeper"
    ]


def test_each_part_imports_only_the_layers_below() -> None:
    assert layer_violations(import_graph()) == []
