"""YAML loading for run configs and ``payload.yaml``: safe, bounded, strict, with line numbers.

One loader for every YAML file a user writes (:func:`load_yaml`), so both read the same
language:

- PyYAML's safe loader (plain data types only).
- **Bounded alias expansion**: aliases are shared references while loading, but
  everything downstream (line maps, ``${VAR}`` substitution, pydantic, JSON dumps)
  walks them as copies, so a "billion laughs" file of a few hundred bytes becomes
  gigabytes. The nodes that aliases add to the document (counted with everything
  nested in what they point to) are bounded by :data:`MAX_ALIAS_NODES`; past it the
  file is refused at the alias that crosses the bound.
- **Duplicate keys are errors** (PyYAML keeps the last silently; it is almost always a
  mistake), while **merge keys** work as YAML 1.1 specifies: ``<<: *base`` (or a list of
  aliases, the first one winning) brings in the keys of ``base``, and keys written in
  the mapping itself override the merged ones.
- Every problem is raised as the caller's :class:`~multirun.errors.InputError` subclass
  naming the file and the line (and the dotted key of a duplicate).

Example:
    >>> data, lines = load_yaml("base: &b {lr: 1, wd: 0}\\nrun: {<<: *b, lr: 2}\\n", source="x.yaml")
    >>> data["run"], lines[("run", "lr")]
    ({'lr': 2, 'wd': 0}, 2)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from multirun.errors import InputError

__all__ = ["MAX_ALIAS_NODES", "KeyPath", "dotted", "load_yaml"]

KeyPath = tuple[str | int, ...]

# Nodes that aliases may add to one document, counting everything nested in the aliased
# node. A config that reuses a block of defaults in fifty experiments stays far below;
# the smallest alias bombs (nine levels of ten aliases: 10**9 nodes) are refused at
# their third level, after a few thousand nodes.
MAX_ALIAS_NODES = 10_000

# "\ud800" and "\0" escapes give strings that are no text (a lone surrogate cannot be
# encoded) or almost surely a mistake (NUL).
_SURROGATE_OR_NUL = re.compile("[\ud800-\udfff\x00]")

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts alias-expanded nodes and rejects duplicate keys (merge keys aside)."""

    def __init__(self, stream: str, *, source: str, error: type[InputError], limit: int) -> None:
        super().__init__(stream)
        self.source = source
        self.error_class = error
        self._limit = limit
        self._expanded = 0  # nodes of the document with every alias expanded
        self._through_aliases = 0  # the part of _expanded that aliases added
        self._size: dict[int, int] = {}  # id(anchored node) -> its expanded size

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)  # the anchored node (or "undefined alias")
            added = self._size.get(id(node), 1)
            self._expanded += added
            self._through_aliases += added
            if self._through_aliases > self._limit:
                raise self.error_class(
                    f"YAML aliases expand to more than {self._limit} nodes (alias *{event.anchor}): "
                    "refused, as a file this small cannot mean that much data (an 'alias bomb'); "
                    "write the values out or use fewer nested aliases",
                    file=self.source,
                    line=event.start_mark.line + 1,
                )
            return node
        anchor = getattr(self.peek_event(), "anchor", None)
        before = self._expanded
        self._expanded += 1
        node = super().compose_node(parent, index)
        if anchor is not None:
            self._size[id(node)] = self._expanded - before
        return node


def _check_keys(loader: _BoundedLoader, node: yaml.Node, path: KeyPath, seen_nodes: set[int]) -> None:
    """Reject a key written twice in one mapping (``<<`` included), before merges are flattened,
    and strings holding a lone surrogate or a NUL."""
    if id(node) in seen_nodes:
        return  # an aliased node: checked where its anchor is
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key: Any = None
            if key_node.tag == _MERGE_TAG:
                key = "<<"
            elif isinstance(key_node, yaml.ScalarNode):
                key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                duplicate = key is not None and key in first
            except TypeError:  # an unhashable key: PyYAML refuses it when constructing
                continue
            if duplicate:
                hint = "; a merge is written `<<: *anchor` (or `<<: [*a, *b]`) once" if key == "<<" else ""
                raise loader.error_class(
                    f"duplicate key (first on line {first[key]}){hint}",
                    file=loader.source,
                    key=dotted((*path, str(key))),
                    line=line,
                )
            if key is not None:
                first[key] = line
            _check_keys(loader, value_node, (*path, str(key)) if key is not None else path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(loader, item, (*path, i), seen_nodes)
    elif isinstance(node, yaml.ScalarNode):
        m = _SURROGATE_OR_NUL.search(node.value)
        if m is not None:
            what = "a NUL character (\\0)" if m.group() == "\x00" else f"a lone surrogate \\u{ord(m.group()):04x}"
            raise loader.error_class(
                f"contains {what}, which no config or payload text may hold",
                file=loader.source,
                key=dotted(path) or None,
                line=node.start_mark.line + 1,
            )


def load_yaml(
    text: str,
    *,
    source: str | Path,
    error: type[InputError] = InputError,
    max_alias_nodes: int = MAX_ALIAS_NODES,
) -> tuple[Any, dict[KeyPath, int]]:
    """Parse one YAML document; return the data and the 1-based line of every key path.

    ``lines`` maps ``("experiments", 0, "name")`` to the line of that key (list items to
    the line where the item starts); a key that a merge brought in has the line where it
    is written in the merged mapping.

    Raises:
        InputError: (of class ``error``) naming ``source`` and the line: a syntax error,
            a duplicate key, aliases expanding past ``max_alias_nodes`` nodes, nesting
            too deep to load, or more than one document.
    """
    file = str(source)
    try:
        loader = _BoundedLoader(text, source=file, error=error, limit=max_alias_nodes)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters)
        line = text.count("\n", 0, e.position) + 1
        raise error(f"YAML syntax error: character {e.character:#06x} is not allowed", file=file, line=line) from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_keys(loader, node, (), set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        reason = getattr(e, "problem", None) or str(e)
        raise error(f"YAML syntax error: {reason}", file=file, line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise error("YAML nested too deeply to load", file=file) from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _walk_nodes(node, (), lines)
    return data, lines


def _walk_nodes(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    # After construction every merge is flattened into node.value (merged pairs first),
    # so a key written in the mapping comes last and its line wins. Aliases are walked
    # as copies: bounded by the loader's alias limit.
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key_path = (*path, key_node.value)
            lines[key_path] = key_node.start_mark.line + 1
            _walk_nodes(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            item_path = (*path, i)
            lines[item_path] = item.start_mark.line + 1
            _walk_nodes(item, item_path, lines)


def dotted(path: Sequence[str | int]) -> str:
    """``("experiments", 1, "name")`` -> ``experiments[1].name``."""
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out
