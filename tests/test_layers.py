"""The import graph of jaxbn: adapters → orchestration → checks → math → primitives.

Parsed with ``ast`` from the source (every import, at module level or inside a function): a
module may import one of a lower layer, or of its own layer as long as the graph stays
acyclic. The math modules run on checked input and never import the checks. Each rule has a
negative control on a made-up graph, so the checker is known to fail when it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxbn"

PRIMITIVES = {"_layout", "_dtypes", "_state", "_copies"}
MATH = {"_moments", "_normalize", "_train", "_update", "_ghost"}
CHECKS = {"_checks"}
ORCHESTRATION = {"_batch_norm", "_renorm", "_recalibrate", "_fold", "interop"}
ADAPTERS = {"_adapter", "_overrides", "_convert_nnx", "_convert_equinox", "linen", "nnx",
            "equinox"}
PUBLIC = {"__init__"}
LAYERS = [PRIMITIVES, MATH, CHECKS, ORCHESTRATION, ADAPTERS, PUBLIC]  # bottom to top
LEVEL = {module: level for level, modules in enumerate(LAYERS) for module in modules}
DROP_INS = {"linen", "nnx", "equinox"}


def _imports(path: Path) -> set[str]:
    """The jaxbn modules that ``path`` imports (relative or absolute, anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import _x
                found |= {alias.name for alias in node.names}
            elif node.level == 1:  # from ._x import y
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.startswith("jaxbn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxbn.")}
    return found


def _graph() -> dict[str, set[str]]:
    return {path.stem: _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def _upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(src, dst) for src, dsts in graph.items() for dst in dsts if LEVEL[dst] > LEVEL[src]]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer():
    graph = _graph()
    assert set(graph) == set(LEVEL), (
        f"place new modules in a layer: {sorted(set(graph) - set(LEVEL))}; "
        f"gone: {sorted(set(LEVEL) - set(graph))}"
    )
    assert graph["_train"] >= {"_moments", "_normalize", "_copies"}  # the parser sees imports


def test_no_upward_import():
    assert _upward_edges(_graph()) == []


def test_math_and_primitives_never_import_the_checks():
    graph = _graph()
    assert [m for m in sorted(MATH | PRIMITIVES) if "_checks" in graph[m]] == []


def test_the_import_graph_is_acyclic():
    assert _cycle(_graph()) is None


def test_no_drop_in_imports_another():
    graph = _graph()
    assert {m: graph[m] & DROP_INS for m in DROP_INS if graph[m] & DROP_INS} == {}


@pytest.mark.parametrize("edge", [("_moments", "_checks"), ("_layout", "_ghost"),
                                  ("_update", "_batch_norm")])
def test_negative_control_an_upward_edge_is_found(edge):
    graph = _graph()
    graph[edge[0]] = graph[edge[0]] | {edge[1]}
    assert edge in _upward_edges(graph)


def test_negative_control_a_cycle_is_found():
    graph = _graph()
    graph["_moments"] = graph["_moments"] | {"_train"}  # _train imports _moments
    cycle = _cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"_moments", "_train"} <= set(cycle)
