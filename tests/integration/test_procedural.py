"""A procedural task (reasoning-gym) in real runs: its rewards come from the task's own verifier,
and `opsd bench task` measures it with the answer-only teacher."""

from __future__ import annotations

import math

import pytest

from opsd.batch import read_ipc
from opsd.config import REPO_ROOT
from opsd.launch.driver import train

from .conftest import local_config, local_overrides, read_metrics

pytestmark = pytest.mark.integration
rg = pytest.importorskip("reasoning_gym")

CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
TASK = "gsm_symbolic"  # its verifier gives 0.01 to a wrong number: math-verify would give 0


def test_grpo_rewards_on_a_procedural_task_are_its_own_verifiers(tmp_path, tiny_model, ray_session):
    from transformers import AutoTokenizer

    from opsd.verify import extract_answer

    run = train(CONFIG, local_overrides(
        tmp_path, "algo=grpo", f"data.train_path=reasoning_gym:{TASK}", "train.steps=2", "train.prompts_per_step=4",
        "rollout.n=4", "rollout.max_tokens=48", "eval.every=2", f"data.test_path=reasoning_gym:{TASK}:test",
        "eval.max_problems=8", "eval.max_tokens=16", "train.checkpoint_every=0", "logging.save_batches=true",
        "grading.extract=lenient", "prompt.max_prompt_len=448", "model.max_model_len=512", "prompt.overlong=skip",
        "data.max_rows=64"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    # Held-out problems of the task's test part, graded by its verifier (numbers not checked: a
    # random model scores about 0).
    assert 0.0 <= rows[-1]["eval/accuracy_strict"] <= 1.0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # The task regenerated here from reasoning-gym itself: the training part is seed 0, 2,000 problems.
    data = rg.create_dataset(TASK, seed=0, size=2000)
    by_question = {data[i]["question"]: data[i] for i in range(len(data))}
    rewards = []
    for path in sorted((run / "batches").glob("step_*.arrow")):
        for row in read_ipc(path).to_pylist():
            prompt = tok.decode(row["prompt_ids"])
            entry = next(e for q, e in by_question.items() if q in prompt)
            answer = extract_answer(tok.decode(row["response_ids"], skip_special_tokens=True), "lenient")
            expected = 0.0 if answer is None else data.score_answer(answer=answer.strip(), entry=entry)
            assert math.isclose(row["reward"], expected, rel_tol=1e-6), (row["sample_id"], answer, entry["answer"])
            rewards.append(row["reward"])
    assert len(rewards) == 2 * 4 * 4  # steps x prompts x samples
    # A wrong number scored 0.01: the task's verifier graded these, not math-verify.
    assert any(0 < r < 1 for r in rewards), rewards


def test_bench_task_measures_a_procedural_task_with_the_answer_only_teacher(tiny_model, ray_session):
    from opsd.benchmarks.task_report import task_report

    cfg = local_config(f"data.test_path=reasoning_gym:{TASK}:test", "teacher.context=answer", "eval.max_tokens=16",
                       "prompt.max_prompt_len=448", "model.max_model_len=1024", "prompt.overlong=skip")
    lines: list[str] = []
    report = task_report(cfg, 6, log=lines.append)
    assert report["problems"] + report["skipped_overlong"] == 6 and report["teacher_context"] == "answer"
    # The reference is scored only where prompt and reference fit the context, and here they all do.
    assert report["reference_scored"] == report["problems"] > 0
    for role in ("student", "teacher"):
        acc = report[role]["accuracy_strict"]
        n = report["problems"]
        assert 0.0 <= acc <= 1.0 and math.isclose(acc * n, round(acc * n))
        assert math.isfinite(report[role]["reference_logprob_per_token"]) and report[role][
            "reference_logprob_per_token"] < 0
    assert any(line.startswith("task: teacher prompt") for line in lines), lines
