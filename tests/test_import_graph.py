"""The package's layering: the import graph of its subpackages and top-level modules has no cycle."""

import ast
import pathlib

import keras_powerquant

PACKAGE = pathlib.Path(keras_powerquant.__file__).parent


def _node(module):
    """`keras_powerquant.converter.graph` -> "converter"; the package itself -> "keras_powerquant"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imported_modules(path, module):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for statement in ast.walk(ast.parse(path.read_text())):
        if isinstance(statement, ast.Import):
            yield from (alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            base = statement.module or ""
            if statement.level:
                anchor = package.split(".")[: len(package.split(".")) - statement.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            # `from keras_powerquant import refinement` imports a subpackage.
            yield from (f"{base}.{alias.name}" for alias in statement.names)


def import_graph():
    """`{node: set of nodes it imports}`, every import counted (function-level ones too)."""
    nodes = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    nodes.discard("__init__")
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        source = _node(module)
        targets = graph.setdefault(source, set())
        for imported in _imported_modules(path, module):
            if imported.startswith("keras_powerquant.") and _node(imported) in nodes:
                targets.add(_node(imported))
        targets.discard(source)
    return graph


def _cycle(graph):
    """One cycle of `graph` as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"converter", "pipeline", "refinement", "synthesis", "quantization"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_stages_below_the_pipeline_never_import_it():
    graph = import_graph()
    assert "converter" in graph["refinement"]  # the graph sees real edges
    for node in ("converter", "refinement", "synthesis", "quantization", "layers"):
        assert "pipeline" not in graph[node], node
    assert not graph["converter"] & {"refinement", "synthesis", "config"}


def test_the_numpy_core_imports_no_keras():
    for path in (PACKAGE / "quantization").rglob("*.py"):
        imported = set(_imported_modules(path, "keras_powerquant.quantization." + path.stem))
        assert not {m for m in imported if m.split(".")[0] in ("keras", "tensorflow")}, path.name
