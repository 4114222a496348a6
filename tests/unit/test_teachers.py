"""opsd/teachers.py and the parts of launch/teachers.py that need no actors: the teachers: section,
each teacher's own config, the refusals, the route kept through loading and its errors, the prompt
pairs built with each row's teacher, and the metrics per teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from opsd.batch import Sample, build_batch
from opsd.config import ConfigError, load_config
from opsd.data import DataError, load_problems
from opsd.teachers import DEFAULT, default_teacher, names, teacher_config

TWO = ["teachers.base.context=solution", "teachers.big.model=other", "teachers.big.context=none",
       "teachers.big.scorer.num_cpus_per_worker=0.25", "teachers.big.scorer.backend=vllm"]


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value)


def test_one_teacher_without_a_teachers_section_is_the_run_itself():
    cfg = load_config()
    assert names(cfg) == [DEFAULT] and default_teacher(cfg) == DEFAULT and teacher_config(cfg, DEFAULT) is cfg


def test_each_teacher_sees_the_run_with_its_own_model_context_and_scorer_settings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teachers:\n  base: {}\n  big:\n    model: other\n    context: none\n    options: {x: 1}\n"
                    "    scorer: {num_workers: 2, max_tokens_per_forward: 512}\nteacher:\n  route: task\n"
                    "  options: {x: 0, y: 2}\n")
    cfg = load_config(path, ["teachers.big.scorer.num_cpus_per_worker=0.25"])
    assert names(cfg) == ["base", "big"] and default_teacher(cfg) == "base"
    base, big = teacher_config(cfg, "base"), teacher_config(cfg, "big")
    assert (base.teacher.model, base.teacher.context, base.scorer.num_workers) == (None, "solution", 1)
    assert (big.teacher.model, big.teacher.context) == ("other", "none")
    assert (big.scorer.num_workers, big.scorer.num_cpus_per_worker, big.scorer.max_tokens_per_forward) == (2, 0.25, 512)
    assert dict(big.teacher.options) == {"x": 1, "y": 2} and dict(base.teacher.options) == {"x": 0, "y": 2}
    assert not big.teachers and not base.teachers and big.teacher.route == "task"
    # The run's own config is left as it was.
    assert cfg.teacher.context == "solution" and cfg.scorer.num_workers == 1
    assert default_teacher(load_config(path, ["teacher.default=big"])) == "big"


@pytest.mark.parametrize("overrides, expected", [
    (["teacher.model=other", "teachers.a.context=none"], "'teacher.model' = 'other' and 'teachers' are both set"),
    (["teachers.a.context=none", "teacher.mode=live"], "'teacher.mode' = live with teachers: ['a']"),
    (["teachers.a.context=none", "teacher.mode=ema"], "set teacher.mode=fixed"),
    (["teachers.a.context=none", "scorer.on_rollout_engines=true", "teacher.mode=live"], "'teacher.mode' = live"),
    (["teachers.a.context=none", "scorer.on_rollout_engines=true", "model.lora.enabled=true",
      "model.lora.serve=adapter"], "'scorer.on_rollout_engines' = true with teachers"),
    (["teachers.a.context=none", "algo=grpo", "rollout.n=2"], "'teachers' is set with algo=grpo"),
    (["teachers.a.context=none", "algo=sft"], "'teachers' is set with algo=sft"),
    (["teachers.a.context=none", "teacher.default=b"], "'teacher.default' = 'b' names no teacher; the teachers are ['a']"),
    (["teacher.default=b"], "'teacher.default' = 'b' without a teachers: section"),
    (["teachers.a.context=none", "teacher.route= "], "'teacher.route' is empty"),
    (["teachers.a.scorer.topk=8"], "'teachers.a.scorer.topk' is the run's, not one teacher's; set scorer.topk"),
    (["teachers.a.scorer.resources={x: 1}"], "'teachers.a.scorer.resources' is the run's"),
    (["teachers.a.scorer.workers=2"], "'teachers.a.scorer.workers' is not a scorer setting"),
    (["teachers.a.scorer.num_workers=many"], "'teachers.a.scorer.num_workers' = 'many'"),
    (["teachers.a.scorer.backend=onnx"], "teachers.a: config key 'scorer.backend'"),
    (["teachers.a.model=other", "algo=kd", "objectives.kd.source=teacher_samples"],
     "teachers.a: config key 'teacher.model' = 'other' with algo=kd"),
    (["teachers.a.model=''"], "teachers.a: config key 'teacher.model' is empty"),
    (["teachers.a.context=none", "teachers.b.context=solution", "algo=contrastive", "rollout.n=2",
      "teacher.context=contrastive"], "teachers.a: algo=contrastive reads wrong teacher contexts"),
    (["teachers.a.context=nope"], "nope"),
    (["teachers.a/b.context=none"], "'teachers.a/b': a teacher's name"),
])
def test_what_cannot_work_with_several_teachers_is_refused_naming_the_key(overrides, expected):
    assert expected in _error(*overrides)


def test_an_unknown_key_of_a_teacher_is_an_error_naming_it():
    assert "teachers.a.modle" in _error("teachers.a.modle=x")


def _rows(tmp_path: Path, routes: list) -> Path:
    path = tmp_path / "routed.jsonl"
    with path.open("w") as f:
        for i, route in enumerate(routes):
            row = {"problem": f"What is {i} + 1?", "solution": f"\\boxed{{{i + 1}}}"}
            if route != "absent":
                row["teacher"] = route
            f.write(json.dumps(row) + "\n")
    return path


def test_a_row_keeps_its_teacher_through_loading_and_a_row_without_one_gets_none(tmp_path):
    path = _rows(tmp_path, ["big", None, "absent", "base"])
    found = load_problems(path, route_key="teacher", routes=("base", "big"))
    assert [p.teacher for p in found] == ["big", None, None, "base"]
    # Without several teachers the column is not read at all (any value passes).
    assert [p.teacher for p in load_problems(_rows(tmp_path, ["x", 3]))] == [None, None]


@pytest.mark.parametrize("value", ["huge", 3])
def test_an_unknown_teacher_in_the_data_names_file_row_value_and_the_teachers(tmp_path, value):
    path = _rows(tmp_path, ["big", "base", value])
    with pytest.raises(DataError) as info:
        load_problems(path, route_key="teacher", routes=("base", "big"))
    assert str(info.value).startswith(f"{path}, line 3: key 'teacher' = {value!r} names no teacher; the teachers are "
                                      "['base', 'big']")


def test_validate_and_train_read_the_route_through_the_configs_data_requirements(tmp_path):
    from opsd.config import training_rows

    cfg = load_config(None, ["teachers.base.context=solution", "teachers.big.context=none", "teacher.route=task"])
    rows = training_rows(cfg)
    assert (rows["route_key"], rows["routes"]) == ("task", ("base", "big"))
    assert "route_key" not in training_rows(load_config())


def test_the_pairs_of_several_teachers_use_each_rows_teacher_context_in_the_rows_order(tmp_path, tiny_model):
    from opsd.assets.models import load_tokenizer
    from opsd.contexts.base import DatasetView
    from opsd.launch.problems import build_pairs, teacher_builders
    from opsd.prompts import PromptBuilder

    cfg = load_config(None, ["teachers.sol.context=solution", "teachers.bare.context=none", "teacher.default=bare"])
    tok = load_tokenizer(tiny_model)
    builder = PromptBuilder(tok, cfg.prompt, max_model_len=cfg.model.max_model_len, max_new_tokens=64)
    problems = load_problems(_rows(tmp_path, ["sol", None, "bare", "sol"]), route_key="teacher", routes=("sol", "bare"))
    builders = teacher_builders(cfg, builder, {})
    assert builders == {"sol": builder, "bare": builder}  # no other model: the student's template
    pairs, skipped = build_pairs(cfg, problems, builder, DatasetView(problems, 0), builders, "routed.jsonl")
    assert skipped == [] and [p.uid for p in pairs] == [p.uid for p in problems]
    assert [p.teacher for p in pairs] == ["sol", "bare", "bare", "sol"]
    for pair, problem in zip(pairs, problems):
        # Built independently: the solution context's teacher prompt, or the student's own (context none).
        expected = (builder.teacher_ids(problem.problem, problem.solution) if pair.teacher == "sol"
                    else builder.teacher_context_ids(builder.student_messages(problem.problem)))
        assert pair.teacher_ids == expected and pair.student_ids == builder.student_ids(problem.problem)
    assert pairs[0].teacher_ids != pairs[0].student_ids


def _sample(i: int, teacher: str | None, rollout: list[float], taught: list[float], mask: list[bool],
            reward: float) -> Sample:
    T = len(rollout)
    return Sample(f"r{i}#0", [1, 2], [1, 2, 3], list(range(4, 4 + T)), rollout, mask, reward, 0, "stop",
                  np.zeros((T, 2), np.int32), np.full((T, 2), -0.7, np.float32), taught, 0, teacher=teacher)


def test_the_metrics_per_teacher_equal_a_direct_sum_over_each_teachers_loss_tokens():
    from opsd.launch.teachers import teacher_metrics

    rng = np.random.default_rng(0)
    spec = [("a", 3, 1.0), ("b", 5, 0.0), ("a", 2, 0.0), ("b", 4, 1.0), ("b", 1, 1.0)]
    samples = []
    for i, (name, T, reward) in enumerate(spec):
        rollout, taught = (-rng.random(T)).tolist(), (-rng.random(T)).tolist()
        mask = [bool(m) for m in rng.integers(0, 2, T)]
        mask[0] = True
        samples.append(_sample(i, name, rollout, taught, mask, reward))
    row = teacher_metrics(build_batch(samples, k=2, temperature=1.0, teacher_mode="fixed"))
    for name in ("a", "b"):
        mine = [s for s in samples if s.teacher == name]
        gap = [r - t for s in mine for r, t, m in zip(s.rollout_logprobs, s.teacher_token_logprobs, s.loss_mask) if m]
        assert row[f"teacher/{name}/samples"] == len(mine)
        assert row[f"teacher/{name}/kl"] == pytest.approx(sum(gap) / len(gap), abs=1e-6)  # float32 in the batch
        assert row[f"teacher/{name}/reward_mean"] == pytest.approx(sum(s.reward for s in mine) / len(mine))
        assert row[f"teacher/{name}/response_len_mean"] == pytest.approx(
            sum(len(s.response_ids) for s in mine) / len(mine))
    assert set(row) == {f"teacher/{n}/{m}" for n in ("a", "b") for m in ("samples", "kl", "reward_mean",
                                                                          "response_len_mean")}


def test_a_batch_of_one_teacher_has_no_metrics_per_teacher():
    from opsd.launch.teachers import teacher_metrics

    table = build_batch([_sample(0, None, [-0.1], [-0.2], [True], 1.0)], k=2, temperature=1.0, teacher_mode="fixed")
    assert table.column("teacher").null_count == 1 and teacher_metrics(table) == {}
    assert isinstance(table, pa.Table)


# --- opsd validate ---------------------------------------------------------------------------------


def _validate(data: Path, *overrides: str, check_data: bool = True) -> list[str]:
    from opsd.launch.validate import validate_config

    return validate_config(str(Path(__file__).parents[2] / "configs" / "tiny.yaml"),
                           [f"data.train_path={data}", "train.prompts_per_step=2", "eval.every=0", *overrides],
                           check_data=check_data)


def test_validate_checks_each_teachers_tokenizer_and_counts_the_rows_routed_to_each(tmp_path, tiny_model, teacher_model):
    lines = _validate(_rows(tmp_path, ["big", None, "absent", "base", "big"]), "teachers.base.context=solution",
                      f"teachers.big.model={teacher_model}", "teachers.big.context=none", "cluster.num_cpus=3")
    assert "teacher base: the student's initial weights (fixed), context solution" in lines
    assert f"teacher big: local directory {teacher_model}, context none" in lines
    assert any(line.startswith("teacher big: the student's tokenizer (") for line in lines), lines
    assert "teachers: each row's teacher is its data column 'teacher' (a row without it: base); one scorer pool " \
           "per teacher" in lines
    assert any(line.endswith("5 problems, 5 usable; rows per teacher: base 3, big 2") for line in lines), lines
    assert any("needs 0 GPUs, 2.5 CPUs" in line for line in lines), lines  # a scorer pool (0.5 CPU) per teacher
    assert lines[-1] == "ok"


def test_validate_refuses_an_unknown_teacher_in_the_data_as_train_does(tmp_path, tiny_model):
    path = _rows(tmp_path, ["base", "base", "nobody"])
    with pytest.raises(DataError) as info:
        _validate(path, "teachers.base.context=solution", "teachers.big.context=none")
    assert str(info.value) == (f"config key 'data.train_path': {path}, line 3: key 'teacher' = 'nobody' names no "
                               "teacher; the teachers are ['base', 'big'] (teachers:; the column is teacher.route, "
                               "and a row without it goes to teacher.default)")


def test_validate_refuses_a_teacher_of_another_vocabulary_naming_its_key(tmp_path, tiny_model):
    from transformers import Qwen3Config

    from opsd.assets.tiny import build_tokenizer

    other = tmp_path / "other"
    build_tokenizer([f"a corpus of its own, line {i}" for i in range(50)], vocab_size=300).save_pretrained(other)
    Qwen3Config(vocab_size=300).save_pretrained(other)
    with pytest.raises(ConfigError) as info:
        _validate(tmp_path, "teachers.base.context=solution", f"teachers.odd.model={other}", check_data=False)
    assert str(info.value).startswith(f"config key 'teachers.odd.model' = '{other}' has another tokenizer")


def test_code_rows_routed_by_task_to_a_teacher_that_reads_an_answer_are_refused_naming_its_context(tmp_path):
    from opsd.launch.problems import check_data

    code = {"id": "add", "task": "code", "problem": "Write add(a, b).",
            "solution": "```python\ndef add(a, b):\n    return a + b\n```", "tests": ["assert add(1, 2) == 3"]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "one", "problem": "What is 1 + 1?", "solution": "\\boxed{2}", "answer": "2"}, code]))
    routed = [f"data.train_path={path}", "train.prompts_per_step=2", "eval.every=0", "teacher.route=task",
              "teacher.default=math", "teachers.math.context=answer"]
    # Rows: the math row goes to math (no task key: the default), the code row to code.
    found = check_data(load_config(None, [*routed, "teachers.code.context=solution"]), None)
    assert [p.teacher for p in found.problems] == [None, "code"] and found.routed == {"math": 1, "code": 1}
    with pytest.raises(ConfigError) as info:
        check_data(load_config(None, [*routed, "teachers.code.context=answer"]), None)
    assert str(info.value).startswith(f"config key 'teachers.code.context' = 'answer' has no meaning for code rows, "
                                      f"and {path} has them (routed to teacher code): ")
