"""The layering rules (design.md, issue 13), read from the source: every import of every module
of qtest_virtio, function-level and TYPE_CHECKING ones included, parsed with ast (nothing is
imported, so a rule broken in a module no test loads still fails here)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtest_virtio

ROOT = Path(qtest_virtio.__file__).parent
PACKAGE = "qtest_virtio"
APP = f"{PACKAGE}.app"
#: What only the application layer may import: the test runner and the plugin built on the library.
APP_ONLY = ("pytest", "_pytest", "pytest_qtest_virtio", APP)
#: Import cycles tolerated, each with its reason (none: keep it so).
ALLOWED_CYCLES: frozenset[frozenset[str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from {dots}{node.module} import ...`` means inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each import in ``module``; ``from P import N`` counts as
    importing P.N where that is a module, else P."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            yield from ((s, node.lineno) for s in subs)
            if len(subs) < len(node.names):
                yield target, node.lineno


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def internal_graph() -> dict[str, set[str]]:
    """qtest_virtio module -> the qtest_virtio modules it imports. An import of an enclosing
    package is left out: Python has run that ``__init__`` before the module, so it closes no cycle."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        edges = graph.setdefault(module, set())
        for target, _ in imports(module):
            if target in MODULES and target != module and not _within(module, target):
                edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_layer() -> None:
    """The rules below mean something only if the walk finds the modules and their imports."""
    for name in (PACKAGE, f"{PACKAGE}.qtest", f"{PACKAGE}.pci", f"{PACKAGE}.virtqueue", f"{APP}.cli", f"{APP}.shell"):
        assert name in MODULES, name
    graph = internal_graph()
    assert f"{APP}.shell" in graph[f"{APP}.cli"]  # a function-level import
    assert f"{APP}.args" in graph[f"{APP}.shell"]
    assert "pytest" in {t for t, _ in imports(f"{APP}.runner")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _within(m, APP)))
def test_the_library_never_imports_the_application_layer(module: str) -> None:
    """Below qtest_virtio.app nothing imports pytest, the plugin or the app (design.md: the
    library never imports pytest; the plugin and the CLI are adapters on top)."""
    bad = [f"line {line}: {target}" for target, line in imports(module) if any(_within(target, p) for p in APP_ONLY)]
    assert not bad, f"{MODULES[module]} imports the application layer: {'; '.join(bad)}"


def test_no_import_cycle() -> None:
    found = cycles(internal_graph())
    unexpected = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"
    gone = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not gone, f"no longer a cycle, remove it from ALLOWED_CYCLES: {gone}"


def test_cycle_finder_finds_a_cycle() -> None:
    """The finder itself, on a small graph: a three-module loop and a tail that is no cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


#: The house rule is "modules stay under about 800 lines"; a module over it would be listed here
#: with the room that will split it (none is). The list may only shrink.
OVERSIZE: dict[str, str] = {}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_under_the_house_size(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    if module in OVERSIZE:
        assert lines > 800, f"{module} is {lines} lines now: remove it from OVERSIZE"
    else:
        assert lines <= 800, f"{MODULES[module]} is {lines} lines: split it (the house allows about 800)"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _within(m, APP)))
def test_command_lines_are_parsed_only_in_the_application_layer(module: str) -> None:
    """argparse belongs to qtest_virtio/app (the fuzz engine, replay and bisect take values)."""
    assert "argparse" not in {t for t, _ in imports(module)}, f"{MODULES[module]} parses a command line"
