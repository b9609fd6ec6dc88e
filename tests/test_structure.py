"""The package's structure, read from its source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import nashalign

PACKAGE_DIR = Path(nashalign.__file__).parent


def package_modules() -> Iterator[tuple[str, Path, ast.Module]]:
    """(dotted module name, path, parsed tree) of every module under src/nashalign, in path order.

    A package's `__init__.py` is named after the package ("nashalign.data").
    """
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every `import` / `from ... import` in `tree`, at module level and inside functions and classes,
    except those under `if TYPE_CHECKING:` (never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if isinstance(node, ast.If) and _is_type_checking_block(node):
            yield from _runtime_imports(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        yield from _runtime_imports(node)


def import_graph() -> dict[str, set[str]]:
    """module -> the nashalign modules it imports (an edge to a package is an edge to its `__init__`).

    `from nashalign.x import y` is an edge to `nashalign.x.y` when that is a module, else to `nashalign.x`.
    The parent packages Python initializes on the way are not edges: they are docstring-only `__init__`s,
    except `nashalign` itself, which imports nothing.
    """
    parsed = list(package_modules())
    modules = {name for name, _, _ in parsed}
    graph: dict[str, set[str]] = {}
    for name, path, tree in parsed:
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            edges.update(target for target in targets if target in modules and target != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert "nashalign.judges.model_judges" in graph["nashalign.judges.registry"]  # module level
    assert "nashalign.data.logprobs" in graph["nashalign.demo"]  # inside functions only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    """No module imports (at module level or inside a function) a module that imports it back."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The modules whose functions the loop logic lives in: the training loop, the online loop and the scorer.
LOOP_MODULES = ("nashalign.train.loop", "nashalign.online.loop", "nashalign.data.cache")
MAX_FUNCTION_LINES = 80


def function_lengths(tree: ast.Module) -> Iterator[tuple[str, int, int]]:
    """(qualified name, first line, lines from `def` to the last line of the body) of every function
    and method, nested ones included."""
    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{child.name}", child.lineno, child.end_lineno - child.lineno + 1
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def test_function_lengths_sees_methods_and_nested_functions():
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n        return g\n")
    assert list(function_lengths(tree)) == [("A.f", 2, 4), ("A.f.g", 3, 2)]


def test_no_long_function_in_the_training_loop_the_online_loop_or_the_scorer():
    """Each function of the loops and the scorer holds one idea: none is longer than 80 lines."""
    long = [f"{name}.{function} (line {line}): {length} lines"
            for name, _, tree in package_modules() if name in LOOP_MODULES
            for function, line, length in function_lengths(tree) if length > MAX_FUNCTION_LINES]
    assert not long, "functions over 80 lines: " + "; ".join(long)
