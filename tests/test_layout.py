"""The package's shape: stages import each other without cycles, plugins only import multirun.

Every import counts, at module level, inside functions (lazy imports) and under
``TYPE_CHECKING``: a cycle hidden in a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO

PLUGIN_PACKAGES = ("injectors", "monitors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}


def _imported(path: Path, known: set[str]) -> Iterator[str]:
    """Modules of ``known`` that the file imports (``from a.b import c`` counts ``a.b.c`` if it is a module)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


def _import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package in packages:
        modules.update(_modules(package))
    known = set(modules)
    # A module always imports its own packages first (their __init__): not an edge of the design.
    return {
        name: {t for t in _imported(path, known) if not (name + ".").startswith(t + ".")}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_inside_multirun() -> None:
    assert _cycles(_import_graph(("multirun",))) == []


def test_plugins_import_only_multirun_never_another_plugin() -> None:
    graph = _import_graph(("multirun", *PLUGIN_PACKAGES))
    offending = {
        module: sorted(t for t in targets if t.split(".")[0] in PLUGIN_PACKAGES and t.split(".")[0] != "multirun")
        for module, targets in graph.items()
        if module.split(".")[0] in PLUGIN_PACKAGES
    }
    assert {m: t for m, t in offending.items() if t} == {}


def test_the_core_never_imports_a_plugin_module() -> None:
    # The registries name plugins by "module:attribute" strings, loaded on first use.
    graph = _import_graph(("multirun", *PLUGIN_PACKAGES))
    core = {
        m: sorted(t for t in targets if t.split(".")[0] in PLUGIN_PACKAGES)
        for m, targets in graph.items()
        if m.startswith("multirun")
    }
    assert {m: t for m, t in core.items() if t} == {}


def test_the_callback_implements_composers_event_methods_not_run_event() -> None:
    from composer.core import Callback, Event

    from multirun.integration.callback import MultirunCallback

    assert MultirunCallback.run_event is Callback.run_event  # Composer dispatches each event to its method
    handled = (
        Event.FIT_START,
        Event.AFTER_DATALOADER,
        Event.BEFORE_FORWARD,
        Event.BATCH_END,
        Event.BATCH_CHECKPOINT,
        Event.EPOCH_CHECKPOINT,
        Event.FIT_END,
    )
    for event in handled:
        assert getattr(MultirunCallback, event.value) is not getattr(Callback, event.value), event
