"""The package's shape: no import cycle between modules of `stn_jax`, and no module longer than 800 lines.

Both tests read the source files with `ast` (nothing is imported, nothing compiled), so they take well under a
second.

The import graph has one node per module under ``stn_jax/`` (a package is its ``__init__.py``) and an edge
``a -> b`` for every *module-level* import in ``a`` of a module ``b`` of `stn_jax`:

* ``import stn_jax.x.y`` names ``stn_jax.x.y``; ``from stn_jax.x import y`` names the submodule
  ``stn_jax.x.y`` when there is one, else ``stn_jax.x`` (``y`` is then a name defined there); relative
  imports (``from . import y``, ``from ..x import z``) are resolved against ``a``'s package;
* an edge goes to the module named, not to the packages above it that Python initialises first (every module
  of a package would otherwise depend on the package's ``__init__``, which imports its modules);
* module level means everywhere but inside a function (``def``, ``lambda``) and ``if TYPE_CHECKING:``:
  imports inside functions run when the function is called, after every module has been initialised, so they
  are ignored here (they are the usual way to break a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "stn_jax"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 800


def module_files() -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under ``stn_jax/``."""
    out = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The ``import`` statements of ``tree`` outside functions and ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]))
            elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of `stn_jax` it imports at module level (see the module docstring)."""
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base_parts = package[:len(package) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import stn_jax.x.name`: the longest module prefix
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each sorted): the modules of one component
    all import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm (the graph is small: recursion is fine)
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
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    return [_cycle_in(graph, component) for component in strongly_connected(graph)]


def _cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected ``component`` (breadth first)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return [*reversed(chain), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in the component {component}")  # pragma: no cover


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "stn_jax.paper.data.tasks" in graph["stn_jax.paper.data"]  # `from stn_jax.paper.data.tasks import`
    assert "stn_jax.paper.registry" in graph["stn_jax.paper.data.tasks"]
    assert "stn_jax.paper.data.svhn" in graph["stn_jax.paper.data"]  # `from stn_jax.paper.data import svhn`
    backbones = "stn_jax.paper.models.backbones"
    assert f"{backbones}.bn_inception" in graph[backbones]  # `from . import bn_inception, ...`
    assert f"{backbones}._common" in graph[f"{backbones}.bn_inception"]  # `from ._common import ...`


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = [f"{' -> '.join(_cycle_in(graph, component))} (the modules that import each other: "
             f"{', '.join(component)})" for component in strongly_connected(graph)]
    assert not found, "import cycles between modules of stn_jax (module-level imports):\n" + "\n".join(found)


def test_no_module_is_longer_than_800_lines():
    long = {str(path.relative_to(SOURCE.parent)): n for path in module_files().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules longer than {MAX_LINES} lines (split them by concern): {long}"
