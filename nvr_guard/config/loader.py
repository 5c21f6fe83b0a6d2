"""Reading the config's YAML: no implicit types, every key's line remembered, duplicates refused.

Why so strict: YAML 1.1 (what PyYAML implements) turns ``keep: no`` into ``False``, ``level: 010``
into octal 8 and ``1:30`` into 90, and silently keeps the last of two equal keys. A retention daemon
that reads ``keep: no`` as "false" and goes on guessing deletes footage. So :class:`StrictLoader`
builds no implicit types: every plain scalar stays text (a :class:`Plain`, so the field validators
in ``types.py`` can tell ``no`` from ``"no"``) and each field converts it explicitly. Duplicate
keys, aliases and explicit tags are refused, and the line of every key and value is kept, so that
every later error (pydantic's, the cross-field checks') is reported as ``FILE:LINE: message``.

This module knows YAML and lines, not the config's keys: :func:`read_yaml` turns the file's bytes
into a mapping and a line map, or the one error that stops the reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nvr_guard.text import printable

Problem = tuple[str, int, str]  # (file, line, message); line 0 = the file as a whole


class Plain(str):
    """An unquoted scalar: the only kind a YAML 1.1 reader would turn into a bool or a number."""

    __slots__ = ()


_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"

KeyPath = tuple[str | int, ...]  # ("sites", "gate", "roots", 0)


@dataclass(frozen=True)
class Where:
    """Where one key path stood in the file."""

    key_line: int  # line of the key (or of the item, in a list)
    value_line: int
    scalar: bool  # a scalar value points at its own line; a block mapping/list at its key


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that resolves only ``null``; everything else plain is text (see module doc).

    Use :meth:`load_tracked` instead of ``yaml.load``: it returns the data and the line map and
    collects soft problems (duplicate keys, aliases, explicit tags) rather than stopping at one.
    """

    # Only the empty value, ``~`` and ``null`` are resolved (so ``keep:`` means "not set"). No bool,
    # int, float or timestamp resolvers: this is what makes ``no``/``010``/``1:30`` stay text.
    yaml_implicit_resolvers = {}

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.problems: list[Problem] = []
        self.lines: dict[KeyPath, Where] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # Aliases would let one node stand at many paths (and a few nested ones blow up into
        # millions of entries); configs here are short enough to write out.
        if self.check_event(AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]
            self.problems.append(
                (
                    self.source,
                    event.start_mark.line + 1,
                    f"alias *{event.anchor} is not supported; write the value out in full",
                )
            )
            return ScalarNode(_NULL_TAG, "", event.start_mark, event.end_mark)
        return super().compose_node(parent, index)

    def load_tracked(self) -> tuple[Any, bool]:
        """(data, empty) of the single document; raises yaml.YAMLError on a syntax error."""
        try:
            node = self.get_single_node()
        finally:
            self.dispose()
        if node is None:
            return None, True
        self.lines[()] = Where(node.start_mark.line + 1, node.start_mark.line + 1, False)
        return self._data(node, ()), False

    def _data(self, node: Node, path: KeyPath) -> Any:
        line = node.start_mark.line + 1
        if isinstance(node, ScalarNode):
            if node.tag == _NULL_TAG:
                return None
            if node.tag != _STR_TAG:
                self._problem(path, line, f"explicit tag {node.tag!r} is not supported; remove it")
                return None
            return Plain(node.value) if node.style is None else str(node.value)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ_TAG:
                self._problem(path, line, f"explicit tag {node.tag!r} is not supported; remove it")
            items: list[Any] = []
            for i, item in enumerate(node.value):
                il = item.start_mark.line + 1
                self.lines[path + (i,)] = Where(il, il, isinstance(item, ScalarNode))
                items.append(self._data(item, path + (i,)))
            return items
        if isinstance(node, MappingNode):
            if node.tag != _MAP_TAG:
                self._problem(path, line, f"explicit tag {node.tag!r} is not supported; remove it")
            out: dict[str, Any] = {}
            first: dict[str, int] = {}
            for knode, vnode in node.value:
                kl = knode.start_mark.line + 1
                if not isinstance(knode, ScalarNode) or knode.tag not in (_STR_TAG, _NULL_TAG):
                    self._problem(path, kl, "a key must be a plain word, not a list or mapping")
                    continue
                if knode.tag == _NULL_TAG or not knode.value:
                    self._problem(path, kl, "empty key; write a name before the ':'")
                    continue
                key = str(knode.value)
                if key in first:
                    # PyYAML would silently keep the last value: an admin editing the first one
                    # would see no effect, or, worse, a forgotten second `keep:` would win.
                    self._problem(
                        path + (key,),
                        kl,
                        f"duplicate key (first at line {first[key]}); keep only one",
                    )
                    continue
                first[key] = kl
                sub = path + (key,)
                self.lines[sub] = Where(
                    kl, vnode.start_mark.line + 1, isinstance(vnode, ScalarNode)
                )
                out[key] = self._data(vnode, sub)
            return out
        raise TypeError(f"unexpected YAML node {node!r}")  # pragma: no cover - composer invariant

    def _problem(self, path: KeyPath, line: int, msg: str) -> None:
        self.problems.append((self.source, line, f"{dotted(path)}: {msg}" if path else msg))


StrictLoader.add_implicit_resolver(
    _NULL_TAG, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


def dotted(path: KeyPath | tuple[Any, ...]) -> str:
    """``sites.gate.roots[0]``: a key path as messages name it, printable on one line."""
    out = ""
    for el in path:
        if isinstance(el, int):
            out += f"[{el}]"
        else:
            out += ("." if out else "") + str(el)
    # a key may hold a newline or an escape sequence: messages stay one line, inert in a terminal
    return printable(out)


class Lines:
    """The line map of a loaded file, asked by key path."""

    def __init__(self, lines: dict[KeyPath, Where]) -> None:
        self.lines = lines

    def at(self, path: tuple[Any, ...], key: bool = False) -> int:
        """Line of ``path``: its value (scalars) or key; else the nearest enclosing key."""
        p = tuple(path)
        if p in self.lines:
            w = self.lines[p]
            return w.value_line if (w.scalar and not key) else w.key_line
        while p:
            p = p[:-1]
            if p in self.lines:
                return self.lines[p].key_line
        return 1


def describe(v: object) -> str:
    """How a value read from the file looks to the admin who wrote it."""
    if v is None:
        return "an empty value"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(str(v))
    return repr(v)


@dataclass(frozen=True)
class Document:
    """A config file as read: its top-level mapping, where each key stood, and the soft problems
    (duplicate keys, aliases, explicit tags) that make it invalid without stopping the reading."""

    data: dict[str, Any]
    lines: dict[KeyPath, Where]
    problems: list[Problem]


def read_yaml(data: bytes, source: str) -> tuple[Document | None, list[Problem]]:
    """(document, []) or (None, [the error that stops the reading]); ``source`` names the file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return None, [
            (source, line, f"not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8")
        ]
    try:
        loader = StrictLoader(text, source)
    except yaml.reader.ReaderError as e:
        # PyYAML checks the whole text for control characters up front, before any mark exists
        line = text[: e.position].count("\n") + 1
        return None, [
            (source, line, f"character U+{e.character:04X} is not allowed in YAML; remove it")
        ]
    try:
        raw, empty = loader.load_tracked()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(x for x in (e.context, e.problem) if x)
        return None, [(source, line, f"YAML syntax error: {what}")]
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML parse error is marked
        return None, [(source, 1, f"YAML error: {e}")]
    except RecursionError:
        # PyYAML parses nested collections recursively: ``[[[[...`` thousands deep
        return None, [(source, loader.line + 1, "nested too deeply; a config needs a few levels")]
    if empty:
        return None, [(source, 1, "the file is empty; it needs at least a sites: section")]
    if not isinstance(raw, dict):
        return None, [
            (
                source,
                1,
                "the top level must be a mapping of keys (state_dir:, sites:, ...), "
                f"got {describe(raw)}",
            )
        ]
    return Document(raw, loader.lines, loader.problems), []
