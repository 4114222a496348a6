"""The project's modules import one another without cycles, counting imports inside functions
(a deferred import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast

from opsd.config import REPO_ROOT

PACKAGES = ("opsd", "workers", "launch", "benchmarks")


def import_graph() -> dict[str, set[str]]:
    modules = {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in (REPO_ROOT / pkg).glob("*.py")
               if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_project_imports_itself_through_others():
    graph = import_graph()
    assert {"launch.driver", "launch.evaluate", "benchmarks.bench", "workers.learner"} <= set(graph)
    assert "launch.cluster" in graph["launch.driver"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_runtime_does_not_import_the_benchmarks():
    """benchmarks/ drives and measures the runtime; only the CLI's `opsd bench` reaches into it."""
    graph = import_graph()
    reaching = sorted(m for m, deps in graph.items()
                      if not m.startswith("benchmarks.") and m != "launch.cli" and any(d.startswith("benchmarks") for d in deps))
    assert reaching == []
    assert "benchmarks.bench" in graph["launch.cli"]
