"""Structure checks anyone can run: no import cycle inside ``fedrag_ray`` (module-level and
function-level imports alike; ``if TYPE_CHECKING:`` blocks excepted, they never run), and
no function over ``MAX_LINES`` lines in the federated engine, ``centralized.py`` and
``tune.py`` unless its docstring says why (``LONG_REASON``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedrag_ray"
MAX_LINES = 60
LONG_REASON = "Long on purpose:"
LENGTH_CHECKED = ("fedrag_ray/federated/", "fedrag_ray/centralized.py", "fedrag_ray/tune.py")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The fedrag_ray modules ``module`` imports anywhere (functions included)."""
    found: set[str] = set()

    def target(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fedrag_ray") and (t := target(alias.name)):
                    found.add(t)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.startswith("fedrag_ray"):
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    t = sub if sub in known else target(base)
                    if t:
                        found.add(t)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {
        m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", known)
        for m, p in mods.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). A package's
    ``__init__`` that re-exports its submodules is an edge package → submodule only; a
    submodule importing its own package's ``__init__`` back would close a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_fedrag_ray():
    graph = import_graph()
    assert "fedrag_ray.federated.server_app" in graph  # the walk found the package
    assert cycles(graph) == []


def long_functions() -> list[str]:
    """``path:line name (n lines)`` of every function over MAX_LINES in the checked
    files whose docstring does not give its reason."""
    out = []
    root = PACKAGE.parent
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(LENGTH_CHECKED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_long_function_without_its_reason():
    assert long_functions() == []
