"""The learner rank by role (docs/DESIGN.md, "The learner"): training, the weights' export and
checkpoints are modules of their own, none reading another's internals, and no function of the
learner's four modules runs over 40 lines (a reader takes each in at a glance)."""

from __future__ import annotations

import ast

from opsd.config import REPO_ROOT

MODULES = ("learner", "learner_training", "learner_export", "learner_checkpoints")


def tree(name: str) -> ast.Module:
    return ast.parse((REPO_ROOT / "workers" / f"{name}.py").read_text())


def test_no_function_of_the_learner_runs_over_40_lines():
    long = [f"{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name in MODULES for node in ast.walk(tree(name))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 40]
    assert long == []


def test_each_role_imports_no_other_role_but_the_ones_it_composes():
    def imported(name: str) -> set[str]:
        return {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree(name))
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opsd.workers.learner")}

    assert imported("learner_training") == set()
    assert imported("learner_export") == set()
    # checkpoints save the training step and export through the weights' buckets
    assert imported("learner_checkpoints") == {"learner_training", "learner_export"}
    assert imported("learner") == {"learner_training", "learner_export", "learner_checkpoints"}


def test_the_rank_is_a_thin_actor():
    """LearnerRank's calls from the group each hand over to one role."""
    rank = next(n for n in ast.walk(tree("learner")) if isinstance(n, ast.ClassDef) and n.name == "LearnerRank")
    delegating = {}
    for fn in rank.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in (
                "train_step", "weight_layout", "push_weights", "open_weight_group", "join_weight_group",
                "close_weight_group", "full_state", "export_hf", "save_checkpoint", "load_checkpoint"):
            calls = [c.func.value.attr for c in ast.walk(fn) if isinstance(c, ast.Call)
                     and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Attribute)]
            delegating[fn.name] = calls
    assert len(delegating) == 10
    assert all(len(c) == 1 and c[0] in ("training", "export", "checkpoints") for c in delegating.values()), delegating
