"""Teacher contexts in real runs: a solution-free teacher on a set of bare problems, a contrastive
teacher's per-context targets against an independent forward, and an objective and a context
from outside opsd that run without a change to the driver, the scorer or the learner."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, contexts_of, read_ipc
from opsd.config import REPO_ROOT, PromptConfig
from opsd.launch.driver import train
from opsd.verify import extract_answer, normalise_answer

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration

CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
COMMON = ("train.steps=2", "train.prompts_per_step=2", "rollout.n=4", "eval.every=0", "train.checkpoint_every=0",
          "logging.save_batches=true", "grading.extract=lenient")


def bare_problems(path, n: int = 8):
    """The first n toy problems with nothing but the problem: no solution, no answer."""
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "toy" / "train.jsonl").read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"id": f"bare{i}", "problem": r["problem"]}) + "\n" for i, r in enumerate(rows)))
    return path


def batches(run):
    return [read_ipc(p) for p in sorted((run / "batches").glob("step_*.arrow"))]


def test_a_solution_free_majority_teacher_trains_on_bare_problems(tmp_path, tiny_model, ray_session):
    from transformers import AutoTokenizer

    from opsd.prompts import PromptBuilder

    data = bare_problems(tmp_path / "bare.jsonl")
    run = train(CONFIG, local_overrides(tmp_path, *COMMON, "teacher.context=majority", f"data.train_path={data}",
                                        "teacher.min_agreement=0.25", "teacher.majority_hint=answer"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_mean"] is None for r in rows)
    problems = {json.loads(line)["id"]: json.loads(line)["problem"] for line in data.read_text().splitlines()}
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_model), PromptConfig(), max_model_len=512,
                            max_new_tokens=64)
    tok = builder.tokenizer
    labelled = 0
    for table, row in zip(batches(run), rows):
        assert batch_meta(table)["opsd.rewards"] == "none" and table.column("reward").null_count == table.num_rows
        by_prompt: dict[str, list[dict]] = {}
        for r in table.to_pylist():
            by_prompt.setdefault(r["sample_id"].rsplit("#", 1)[0], []).append(r)
        skipped = 0
        for uid, group in by_prompt.items():
            # The vote, written out: the most frequent normalised answer; on a tie the teacher
            # read one of the tied answers, and every sample of the prompt the same one.
            answers = [extract_answer(tok.decode(r["response_ids"], skip_special_tokens=True), "lenient")
                       for r in group]
            votes = Counter(normalise_answer(a) for a in answers if a is not None and a.strip())
            if not votes:
                assert all(not any(r["loss_mask"]) for r in group)
                assert all(r["teacher_prompt_ids"] == r["prompt_ids"] for r in group)
                skipped += len(group)
                continue
            top = max(votes.values())
            expected = {tuple(builder.teacher_ids(problems[uid], f"The final answer is \\boxed{{{a.strip()}}}."))
                        for a in answers if a is not None and a.strip() and votes[normalise_answer(a)] == top}
            assert len({tuple(r["teacher_prompt_ids"]) for r in group}) == 1
            assert tuple(group[0]["teacher_prompt_ids"]) in expected
            assert all(any(r["loss_mask"]) for r in group)
            labelled += 1
        assert row["context_skipped"] == skipped
    assert labelled > 0, "no prompt reached agreement: the test checked nothing"


def test_contrastive_targets_are_the_teacher_under_each_context(tmp_path, tiny_model, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(CONFIG, local_overrides(tmp_path, *COMMON, "algo=contrastive", "teacher.context=contrastive",
                                        "teacher.wrong_contexts=2", "data.max_rows=16"))
    rows = read_metrics(run)
    assert {"moved_frac", "contrast_mean", "clip_frac"} <= set(rows[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()  # the fixed teacher
    tok = AutoTokenizer.from_pretrained(tiny_model)
    checked = 0
    for table in batches(run):
        assert contexts_of(table) == {"wrong_0": "token", "wrong_1": "token"}
        for r in table.to_pylist():
            for name in ("", ":wrong_0", ":wrong_1"):
                ctx, lp = r[f"teacher_prompt_ids{name}"], r[f"teacher_token_logprobs{name}"]
                if ctx is None:
                    assert lp is None
                    continue
                if name:
                    assert "Correct final answer" in tok.decode(ctx)
                with torch.no_grad():
                    logits = model(torch.tensor([ctx + r["response_ids"]])).logits[0].float()
                resp = r["response_ids"]
                want = torch.log_softmax(logits[len(ctx) - 1: len(ctx) - 1 + len(resp)], -1).gather(
                    -1, torch.tensor(resp)[:, None]).squeeze(-1).numpy()
                np.testing.assert_allclose(np.array(lp), want, atol=1e-4)
                checked += bool(name)
    assert checked > 0, "no sample had a wrong context: the test checked nothing"


def test_an_objective_and_a_context_from_outside_opsd_run_through_the_registries(tmp_path, tiny_model, ray_session):
    """tests/plugins/squared_gap.py: a context (the solution's first sentence) and an objective
    (the squared gap of the sampled token's logprobs) of a user's own, named by module path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.prompts import PromptBuilder
    from tests.plugins.squared_gap import first_sentence

    run = train(CONFIG, local_overrides(tmp_path, "train.steps=1", "train.prompts_per_step=4", "eval.every=0",
                                        "train.checkpoint_every=0", "logging.save_batches=true",
                                        "algo=tests.plugins.squared_gap:OBJECTIVE",
                                        "teacher.context=tests.plugins.squared_gap:CONTEXT"))
    (row,) = read_metrics(run)
    (table,) = batches(run)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    builder = PromptBuilder(tok, PromptConfig(), max_model_len=512, max_new_tokens=64)
    train_rows = {json.loads(line)["id"]: json.loads(line)
                  for line in (REPO_ROOT / "data" / "toy" / "train.jsonl").read_text().splitlines()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for r in table.to_pylist():
        src = train_rows[r["sample_id"].rsplit("#", 1)[0]]
        assert r["teacher_prompt_ids"] == builder.teacher_ids(src["problem"], first_sentence(src["solution"]))
        seq, n = r["prompt_ids"] + r["response_ids"], len(r["prompt_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        student = logp[n - 1: len(seq) - 1].gather(-1, torch.tensor(r["response_ids"])[:, None]).squeeze(-1)
        gap = (student.numpy() - np.array(r["teacher_token_logprobs"])) ** 2
        total += float(gap[np.array(r["loss_mask"])].sum())
        tokens += sum(r["loss_mask"])
    # The first step's loss is the plug-in's formula on the initial weights.
    assert row["loss"] == pytest.approx(total / tokens, rel=1e-3)
    assert row["gap_mean"] == pytest.approx(row["loss"], rel=1e-6)
