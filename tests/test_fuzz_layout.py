"""The fuzzer's rooms (issue 13): a package with no argparse, modules under the size the house
allows, and no import cycle through fuzz, outcome, reproducer, report or the fuzz command
(function-level and TYPE_CHECKING imports count: a cycle hidden in a function is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qtest_virtio"
#: The modules issue 13 gave this room: none of them may sit on an import cycle.
OWN = (
    "qtest_virtio.fuzz",
    "qtest_virtio.outcome",
    "qtest_virtio.reproducer",
    "qtest_virtio.report",
    "qtest_virtio.app.fuzz_cmd",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The module ``name`` is, or the nearest enclosing one (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every qtest_virtio module ``module`` imports anywhere in its text, with the packages
    below qtest_virtio that importing it runs (their ``__init__``), except its own."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        for name in names:
            target = _resolve(name)
            if target is None or not target.startswith("qtest_virtio"):
                continue
            parts = target.split(".")
            out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # A module's own packages are running already when it imports: no edge back to their init.
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    return {m for m in out - own if m in MODULES}


GRAPH = {m: _imports(m) for m in MODULES}


def _reaches(start: str, goal: str) -> list[str] | None:
    """A path of imports from ``start`` to ``goal``, or None."""
    seen, stack = {start}, [[start]]
    while stack:
        path = stack.pop()
        for nxt in sorted(GRAPH[path[-1]]):
            if nxt == goal:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append([*path, nxt])
    return None


def _owned(module: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in OWN)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _owned(m)))
def test_no_import_cycle_through(module: str) -> None:
    cycle = _reaches(module, module)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_the_edges_that_matter() -> None:
    """The checker itself: it finds a function-level import, relative imports and package inits."""
    assert "qtest_virtio.fuzz.corpus" in GRAPH["qtest_virtio.reproducer"]
    assert "qtest_virtio.fuzz" in GRAPH["qtest_virtio.reproducer"]  # the package init runs first
    assert "qtest_virtio.outcome" in GRAPH["qtest_virtio.fuzz.engine"]
    assert _reaches("qtest_virtio.app.fuzz_cmd", "qtest_virtio.outcome") is not None


def test_fuzz_is_a_package_without_argparse_in_modules_of_house_size() -> None:
    fuzz = ROOT / "fuzz"
    assert (fuzz / "__init__.py").is_file() and not (ROOT / "fuzz.py").exists()
    for path in sorted(fuzz.glob("*.py")):
        text = path.read_text()
        assert "argparse" not in text, f"{path.name}: the command line belongs in qtest_virtio/app/fuzz_cmd.py"
        assert len(text.splitlines()) < 800, f"{path.name}: {len(text.splitlines())} lines"
    assert not any(m.startswith("qtest_virtio.reproducer") or m.startswith("qtest_virtio.app") for m in _below("fuzz"))


def _below(package: str) -> set[str]:
    """What the modules of ``qtest_virtio.<package>`` import."""
    prefix = f"qtest_virtio.{package}"
    return {t for m, ts in GRAPH.items() if m == prefix or m.startswith(prefix + ".") for t in ts}
