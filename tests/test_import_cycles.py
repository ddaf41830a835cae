"""No import cycles among the stdd / stdd_kernels modules, lazy (function-level) imports included.

The graph is read from the source (every ``import`` statement, wherever it is), so a
cycle that only closes when some function runs counts as well. An edge goes to the
module an import names: ``from .dataset import X`` -> ``stdd.data.dataset``,
``from ..data import build_dataset`` -> ``stdd.data`` (the package), ``from . import
builder`` -> ``stdd.askg.builder``.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stdd", "stdd_kernels")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if _is_package(name, modules) else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # a submodule imported by name, else the module itself
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else source)
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # `import a.b.c` of a non-module attribute
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "stdd_kernels.geometry" in graph["stdd.model.stca_settings"]
    assert "stdd.askg.prompts" in graph["stdd.model.text_encoder"]  # a function-level import counts too
    assert "stdd.data" in graph["stdd.engine.task"] or "stdd.data.annotations" in graph["stdd.engine.task"]


def test_no_import_cycles_among_stdd_and_stdd_kernels_modules():
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_command_line_modules_never_import_each_other():
    graph = import_graph()
    clis = {"stdd.train", "stdd.eval", "stdd.predict", "stdd.demo", "stdd.askg.cli", "stdd.askg.__main__"}
    crossing = {cli: sorted(graph[cli] & (clis - {cli, "stdd.askg.cli"})) for cli in clis}
    assert all(not targets for targets in crossing.values()), crossing
