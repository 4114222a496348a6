"""The project's modules as one namespace: no import cycles (counting imports inside functions: a
deferred import hides a cycle from Python, not from a reader), no module reaching into another's
underscore names, the runtime never importing the benchmarks, and `opsd` the only name a wheel
installs (docs/DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from opsd import SUBPACKAGES
from opsd.config import REPO_ROOT

# Folder -> the import name its modules have.
FOLDERS = {"opsd": "opsd", **{name: f"opsd.{name}" for name in SUBPACKAGES}}


def project_modules() -> dict[str, Path]:
    """Every module of the project by its import name (``opsd.workers.learner``: workers/learner.py)."""
    modules = {}
    for folder, prefix in FOLDERS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), filename=str(path)) for name, path in project_modules().items()}


def import_graph() -> dict[str, set[str]]:
    trees = _trees()
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in trees and t != name}
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(trees: dict[str, ast.Module]) -> list[str]:
    """``from <project module> import _name`` and ``<project module alias>._name``."""
    found = []
    for name, tree in trees.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in trees and node.module != name:
                found += [f"{name} imports {node.module}.{a.name}" for a in node.names if _private(a.name)]
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in trees})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in trees})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id, name) != name):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return found


def foreign_private_members(trees: dict[str, ast.Module]) -> list[str]:
    """``obj._member`` where ``_member`` is defined in another module of the project and not in
    this one, and ``obj`` is not ``self`` or ``cls``: a call into another module's insides."""
    defined: dict[str, set[str]] = {}
    for name, tree in trees.items():
        own = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
        defined[name] = own
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in defined[name]:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            owners = sorted(m for m, names in defined.items() if node.attr in names and m != name)
            if owners:
                found.append(f"{name}:{node.lineno} uses {node.attr} of {owners[0]}")
    return found


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_private_checks_find_what_they_look_for():
    trees = {
        "opsd.a": ast.parse("def _helper(): pass\nclass Pool:\n    def _recover(self): self._n = 1\n"),
        "opsd.b": ast.parse("from opsd.a import _helper\nimport opsd.a as a\n"
                            "def f(pool): pool._recover(); a._helper(); pool._n\n"),
        "opsd.c": ast.parse("class Own:\n    def _recover(self): pass\ndef g(x): x._recover()\n"),
    }
    assert private_imports(trees) == ["opsd.b imports opsd.a._helper", "opsd.b uses opsd.a._helper"]
    # opsd.c defines a _recover of its own: a call on another object is not counted against it
    assert sorted(foreign_private_members(trees)) == ["opsd.b:3 uses _helper of opsd.a", "opsd.b:3 uses _n of opsd.a",
                                                      "opsd.b:3 uses _recover of opsd.a"]


def test_no_module_of_the_project_imports_itself_through_others():
    graph = import_graph()
    assert {"opsd.launch.driver", "opsd.launch.evaluate", "opsd.benchmarks.bench", "opsd.workers.learner",
            "opsd.assets.models"} <= set(graph)
    assert "opsd.launch.cluster" in graph["opsd.launch.driver"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_reaches_into_another_modules_underscore_names():
    trees = _trees()
    assert private_imports(trees) == []
    assert foreign_private_members(trees) == []


def test_the_runtime_does_not_import_the_benchmarks():
    """benchmarks/ drives and measures the runtime; only the CLI's `opsd bench` reaches into it."""
    graph = import_graph()
    reaching = sorted(m for m, deps in graph.items()
                      if not m.startswith("opsd.benchmarks") and m != "opsd.launch.cli"
                      and any(d.startswith("opsd.benchmarks") for d in deps))
    assert reaching == []
    assert "opsd.benchmarks.bench" in graph["opsd.launch.cli"]


def test_the_algorithm_imports_no_runtime():
    """opsd/ (the algorithm and the assets) never imports the actors, the driver, Ray or vLLM."""
    trees = _trees()
    offenders = []
    for name, tree in trees.items():
        if any(name.startswith(f"opsd.{sub}") for sub in SUBPACKAGES):
            continue
        for node in ast.walk(tree):
            mods = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{name} imports {m}" for m in mods
                          if m.split(".")[0] in ("ray", "vllm", "deepspeed")
                          or any(m.startswith(f"opsd.{sub}") for sub in SUBPACKAGES)]
    assert offenders == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Built from a copy, so that setuptools' build/ and egg-info land outside the repository,
    # with the venv's own setuptools (pyproject's build requirement), so no index is needed.
    src = tmp_path_factory.mktemp("src") / "opsd"
    keep = ("pyproject.toml", "README.md", *FOLDERS)
    shutil.copytree(REPO_ROOT, src, ignore=lambda d, names: [n for n in names if Path(d) == REPO_ROOT and n not in keep]
                    + [n for n in names if n == "__pycache__"])
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, text=True)
    (path,) = out.glob("opsd-*.whl")
    return zipfile.ZipFile(path)


def test_a_wheel_installs_opsd_as_the_only_top_level_name(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"opsd"}
    # every module of the four folders is in it, under its import name
    expected = {name.replace(".", "/") + (".py" if path.name != "__init__.py" else "/__init__.py")
                for name, path in project_modules().items()}
    assert expected - set(names) == set()


def test_the_source_tree_maps_exactly_the_three_subpackages():
    code = ("import opsd.workers.learner as l, opsd.launch.cli as c, opsd.benchmarks.bench as b; "
            "print(l.__file__); print(c.__file__); print(b.__file__)\n"
            "try:\n    import opsd.tests\nexcept ImportError:\n    print('no opsd.tests')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT).stdout.splitlines()
    assert out == [str(REPO_ROOT / "workers" / "learner.py"), str(REPO_ROOT / "launch" / "cli.py"),
                   str(REPO_ROOT / "benchmarks" / "bench.py"), "no opsd.tests"]


def test_no_function_of_the_runtime_is_over_80_lines():
    """Longer functions are split where the split names a real step (docs/DESIGN.md, "Layout")."""
    long = []
    for name, tree in _trees().items():
        if name.startswith("opsd.benchmarks"):
            continue
        long += [f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
