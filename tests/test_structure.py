"""The house has floors: the project's modules import each other without a circle, and only at the top."""

import ast

from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(path):
    """(module, line, at top level) of every import of a project module in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names if name in MODULES]
    return found


def cycle(graph):
    """A circle of imports in ``graph`` (module -> imported modules) as a list of names, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node, [node]))), None)


def test_no_function_local_import_of_a_project_module():
    local = [f"{name}.py:{line} imports {mod}" for name, path in MODULES.items()
             for mod, line, at_top in project_imports(path) if not at_top]
    assert not local


def test_the_import_graph_has_no_circle():
    graph = {name: {mod for mod, _, _ in project_imports(path)} for name, path in MODULES.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_circle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
