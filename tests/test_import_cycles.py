"""The import structure of stdd / stdd_kernels: no cycles, and every import goes down the layers.

The graph is read from the source (every ``import`` statement, wherever it is), so a
cycle or an upward import that only happens when some function runs counts as well.
An edge goes to the module an import names: ``from .dataset import X`` ->
``stdd.data.dataset``, ``from ..data import build_dataset`` -> ``stdd.data`` (the
package), ``from . import builder`` -> ``stdd.askg.builder``.

:data:`LAYERS` is the layer order (docs/architecture.md explains it): a module imports
modules of its own group, or of a layer below its own; never one of a layer above,
nor one of another group of its layer (the model and the data packages do not import
each other; no command line imports another).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stdd", "stdd_kernels")

# Top to bottom: layers of groups of module patterns ("pkg.*": the package and everything in it;
# a plain name: that module). A module belongs to its most specific pattern.
LAYERS = (
    ("command lines", (("stdd.train",), ("stdd.eval",), ("stdd.predict",), ("stdd.demo",),
                       ("stdd.askg.cli", "stdd.askg.__main__"))),
    ("engine", (("stdd.engine.*",),)),
    ("askg tooling", (("stdd.askg.*",),)),
    ("model | data", (("stdd.model.*",), ("stdd.data.*",))),
    ("knowledge formats", (("stdd.knowledge.*",),)),
    ("foundation", (("stdd", "stdd.errors", "stdd.cli", "stdd.files", "stdd.seeding", "stdd.serialization",
                     "stdd.resources.*"),)),
    ("kernels", (("stdd_kernels.*",),)),
)


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


def _pattern_base(pattern: str) -> str:
    return pattern[:-2] if pattern.endswith(".*") else pattern


def placement(module: str, layers=LAYERS) -> tuple[int, int] | None:
    """``(layer index, group index)`` of ``module``: its most specific pattern's (None: in no layer)."""
    best, best_length = None, -1
    for layer_index, (_, groups) in enumerate(layers):
        for group_index, group in enumerate(groups):
            for pattern in group:
                base = _pattern_base(pattern)
                matches = module == base or (pattern.endswith(".*") and module.startswith(base + "."))
                if matches and len(base) > best_length:
                    best, best_length = (layer_index, group_index), len(base)
    return best


def layer_violations(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Every import that goes up the layers or across to another group of the same layer, as
    ``"a (layer) imports b (layer)"``; and every module in no layer."""
    problems = []
    for module in sorted(graph):
        if placement(module, layers) is None:
            problems.append(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    for module in sorted(graph):
        source = placement(module, layers)
        for target in sorted(graph[module]):
            destination = placement(target, layers)
            if source is None or destination is None:
                continue
            upward = destination[0] < source[0]
            across = destination[0] == source[0] and destination[1] != source[1]
            if upward or across:
                problems.append(f"{module} ({layers[source[0]][0]}) imports {target} ({layers[destination[0]][0]})")
    return problems


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "stdd_kernels.geometry" in graph["stdd.model.stca_settings"]
    assert "stdd.knowledge.prompts" in graph["stdd.model.text_encoder"]
    assert "stdd.data.annotations" in graph["stdd.askg.builder"]  # a function-level import counts too
    assert "stdd.data" in graph["stdd.engine.task"] or "stdd.data.annotations" in graph["stdd.engine.task"]


def test_no_import_cycles_among_stdd_and_stdd_kernels_modules():
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_layer_check_finds_upward_and_sideways_imports():
    layers = (("top", (("app",),)), ("middle", (("p.*",), ("q.*",))), ("bottom", (("base", "base.*"),)))
    graph = {"app": {"p.x", "base"}, "p": {"p.x"}, "p.x": {"base.y"}, "q.z": {"p.x"}, "base": set(),
             "base.y": {"app"}, "stray": set()}
    assert layer_violations(graph, layers) == [
        "stray is in no layer: add it to LAYERS and docs/architecture.md",
        "base.y (bottom) imports app (top)",
        "q.z (middle) imports p.x (middle)",
    ]
    assert placement("p", layers) == (1, 0) and placement("base.y", layers) == (2, 0)


def test_every_module_imports_only_its_own_group_or_the_layers_below():
    violations = layer_violations(import_graph())
    assert violations == [], "imports against the layer order (docs/architecture.md):\n" + "\n".join(violations)


def test_command_line_modules_never_import_each_other():
    graph = import_graph()
    clis = {pattern for group in LAYERS[0][1] for pattern in group}
    crossing = {cli: sorted(graph[cli] & (clis - {cli, "stdd.askg.cli"})) for cli in clis}
    assert all(not targets for targets in crossing.values()), crossing
