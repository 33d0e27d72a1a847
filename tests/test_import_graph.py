"""No import circle between the project's modules, counting every import statement (a
function-level import hides a circle from the interpreter, it does not remove it), and packages
import only packages on a lower floor of docs/ARCHITECTURE.md's layer diagram."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_vwlmm", "pipeline", "preprocessing", "vwlmm_data")
# docs/ARCHITECTURE.md, "Layers": a package imports only packages on lower floors.
FLOORS = {"vwlmm_data": 0, "preprocessing": 1, "megatron_vwlmm": 1, "pipeline": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    """The project modules one import statement loads (``from a import b`` loads ``a.b`` when
    that is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    if base in modules and len(found) < len(node.names):
        found.append(base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {dep for node in ast.walk(tree)
                       for dep in _imported(node, name, is_package, modules) if dep != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:  # Tarjan; recursion depth is bounded by the module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def test_the_graph_sees_function_level_and_submodule_imports():
    graph = import_graph()
    assert "vwlmm_data.storage" in graph["vwlmm_data.contract"]
    # ``from preprocessing import output_guard`` names the submodule
    assert "preprocessing.output_guard" in graph["preprocessing.runner"]
    # imports inside a function count (``Trainer.__init__`` imports the checkpoint manager)
    assert "pipeline.checkpoint" in graph["pipeline.trainer"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_project_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_packages_import_only_lower_floors():
    upward = sorted(f"{a} -> {b}" for a, deps in import_graph().items() for b in deps
                    if FLOORS[b.split(".")[0]] >= FLOORS[a.split(".")[0]]
                    and a.split(".")[0] != b.split(".")[0])
    assert not upward, "imports that do not go down a floor:\n" + "\n".join(upward)
