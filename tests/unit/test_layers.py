"""The package layout holds: no import cycles inside torpor, and no import running up
the layers (docs/architecture.md). Imports are read from the source (every `import`,
also those inside functions), except those under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Each package, and what it must never import (anything above it).
# The leaf packages (copy, codec, images, network, remote) sit below everything that runs
# VMs.
LEAF_FORBIDS = ("torpor.instances", "torpor.operations", "torpor.machinestate",
                "torpor.hypervisor", "torpor.jobs", "torpor.manager", "torpor.api", "torpor.cli")
ABOVE = {
    "torpor.copy": LEAF_FORBIDS,
    "torpor.codec": LEAF_FORBIDS,
    "torpor.images": LEAF_FORBIDS,
    "torpor.network": LEAF_FORBIDS,
    "torpor.remote": LEAF_FORBIDS,
    "torpor.hypervisor": ("torpor.instances", "torpor.operations", "torpor.machinestate",
                          "torpor.jobs", "torpor.manager", "torpor.api", "torpor.cli"),
    "torpor.guest": ("torpor.instances", "torpor.operations", "torpor.jobs",
                     "torpor.manager", "torpor.api", "torpor.cli"),
    "torpor.machinestate": ("torpor.instances", "torpor.operations", "torpor.jobs",
                            "torpor.manager", "torpor.api", "torpor.cli"),
    "torpor.instances": ("torpor.operations", "torpor.jobs", "torpor.manager", "torpor.api",
                         "torpor.cli"),
    "torpor.jobs": ("torpor.operations", "torpor.manager", "torpor.api", "torpor.cli"),
    "torpor.operations": ("torpor.manager", "torpor.api", "torpor.cli"),
    "torpor.manager": ("torpor.api", "torpor.cli"),
    "torpor.api": ("torpor.cli",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The torpor modules `path` imports (a name imported from a package that is itself
    a module counts as that module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("torpor"))
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("torpor") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "torpor").rglob("*.py")}
    names = set(files)
    return {name: imports_of(path, names) & names for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "torpor.operations.registry" in graph["torpor.manager"]
    assert "torpor.instances.states" in graph["torpor.operations.registry"]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_runs_up_the_layers() -> None:
    wrong = []
    for module, imported in import_graph().items():
        for package, forbidden in ABOVE.items():
            if module == package or module.startswith(package + "."):
                wrong += [f"{module} imports {m}" for m in sorted(imported)
                          if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert wrong == []
