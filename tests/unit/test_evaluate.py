"""launch/evaluate.py without Ray: model and run-directory resolution, the eval config, data
loading, and evaluate_pairs over a fake actor pool."""

import json

import pytest

from opsd.assets.gguf import ModelError

from opsd.launch.cli import main
from opsd.launch.evaluate import (
    DEFAULT_SAMPLING_TEMPERATURE, EvalError, ResolvedModel, _load_eval_problems, default_report_path,
    eval_config, evaluate_pairs, format_table, resolve_eval_model,
)
from opsd.config import REPO_ROOT, ConfigError, load_config, to_yaml
from opsd.prompts import PromptPair
from opsd.workers.rollout import Rollout


def make_run(root, steps=(), complete=(), hf=()):
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(None, ["eval.max_tokens=33"])))
    for s in steps:
        d = run / "checkpoints" / f"step_{s}"
        d.mkdir()
        if s in complete:
            (d / "driver_state.json").write_text("{}")
        if s in hf:
            (d / "hf").mkdir()
            (d / "hf" / "config.json").write_text("{}")
    return run


def test_run_dir_without_checkpoint(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(EvalError, match="no complete checkpoint"):
        resolve_eval_model(str(run))
    # step_2 was interrupted before its driver state was written: not complete either.
    run2 = make_run(tmp_path / "b", steps=[2], hf=[2])
    with pytest.raises(EvalError, match="no complete checkpoint"):
        resolve_eval_model(str(run2))


def test_run_dir_checkpoint_without_hf(tmp_path):
    run = make_run(tmp_path, steps=[3], complete=[3])
    with pytest.raises(EvalError, match="export_hf=false"):
        resolve_eval_model(str(run))


def test_run_dir_latest_complete_checkpoint(tmp_path):
    run = make_run(tmp_path, steps=[3, 6, 9], complete=[3, 6], hf=[3, 6, 9])
    m = resolve_eval_model(str(run))
    assert m.path == str(run / "checkpoints" / "step_6" / "hf")
    assert m.run_dir == run and m.checkpoint == run / "checkpoints" / "step_6"
    # A checkpoint directory itself.
    m3 = resolve_eval_model(str(run / "checkpoints" / "step_3"))
    assert m3.path == str(run / "checkpoints" / "step_3" / "hf") and m3.run_dir == run
    assert default_report_path(m, ["test", "math500"], 4) == run / "eval" / "step_6_test+math500_n4.json"


def test_hf_dir_hub_id_and_bad_paths(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    m = resolve_eval_model(str(tmp_path / "hf"))
    assert m.path == str(tmp_path / "hf") and m.run_dir is None
    assert default_report_path(m, ["x"], 1).name == "eval_report.json"
    # A hub id: itself when it is in the local cache or the hub can be reached; offline and not
    # cached, one line naming --model (not a minute of retries and a traceback).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="--model = 'Qwen/Qwen3-1.7B': not in the local Hugging Face cache"):
        resolve_eval_model("Qwen/Qwen3-1.7B")
    with pytest.raises(EvalError, match="no such file"):
        resolve_eval_model(str(tmp_path / "missing" / "model"))
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvalError, match="no such file"):  # a typo in a local path, not a hub id
        resolve_eval_model("runs/beta1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither an HF model directory"):
        resolve_eval_model(str(tmp_path / "empty"))
    (tmp_path / "f.txt").write_text("")
    with pytest.raises(EvalError, match="is a file"):
        resolve_eval_model(str(tmp_path / "f.txt"))


def test_cli_eval_reports_resolution_error(tmp_path, capsys):
    run = make_run(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_eval_config_defaults(tmp_path):
    run = make_run(tmp_path, steps=[3], complete=[3], hf=[3])
    m = resolve_eval_model(str(run))
    cfg = eval_config(m, config=None, overrides=[], n=None, temperature=None, max_tokens=None)
    assert cfg.eval.max_tokens == 33  # the run directory's saved config
    assert cfg.model.path == m.path
    assert cfg.eval.n == 1 and cfg.eval.temperature == 0.0
    cfg = eval_config(m, config=None, overrides=["eval.max_tokens=40"], n=4, temperature=None, max_tokens=None)
    assert cfg.eval.n == 4 and cfg.eval.temperature == DEFAULT_SAMPLING_TEMPERATURE and cfg.eval.max_tokens == 40
    cfg = eval_config(ResolvedModel("x"), config=None, overrides=[], n=2, temperature=1.1, max_tokens=17)
    assert cfg.eval.temperature == 1.1 and cfg.eval.max_tokens == 17
    with pytest.raises(ConfigError, match="eval.temperature"):
        eval_config(m, config=None, overrides=[], n=4, temperature=0.0, max_tokens=None)


def test_load_eval_problems_without_ids_or_solutions(tmp_path):
    cfg = load_config(None)
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "1+1?", "answer": "2"},
        {"problem": "2+2?", "answer": "4", "solution": "2+2=\\boxed{4}"},
    ]) + "\n")
    ps = _load_eval_problems(str(f), cfg)
    assert [p.uid for p in ps] == ["set:0", "set:1"]
    assert [p.answer for p in ps] == ["2", "4"] and all(p.solution == "" for p in ps)
    g = tmp_path / "ids.jsonl"
    g.write_text(json.dumps({"id": "q7", "problem": "3+4?", "answer": "7"}) + "\n")
    assert [p.uid for p in _load_eval_problems(str(g), cfg)] == ["q7"]


class FakePool:
    """ActorPool's map() contract: actor i gets per_actor_args[i]; answers 'n+1' boxed (correct
    for even uids) and records each call."""

    def __init__(self, n_actors):
        self.actors = [object()] * n_actors
        self.calls = []

    def map(self, method, per_actor_args, **kw):
        assert method == "generate" and len(per_actor_args) <= len(self.actors)
        self.calls.append((len(per_actor_args), kw))
        out = []
        for prompts, seeds in per_actor_args:
            assert len(prompts) == len(seeds)
            out.append([
                [Rollout([1] * (j + 1), [0.0] * (j + 1), "length" if j == 0 else "stop",
                         f"\\boxed{{{p[0] + (j % 2)}}}" if j < kw["n"] else "", 0) for j in range(kw["n"])]
                for p in prompts
            ])
        return out


def test_evaluate_pairs_order_chunks_and_metrics():
    pairs = [PromptPair(f"u{i}", [i], [i], str(i)) for i in range(7)]
    pool = FakePool(3)
    seen = []
    metrics, results = evaluate_pairs(pool, pairs, n=2, max_tokens=8, temperature=0.7, chunk_size=1,
                                      expect_version=5, progress=lambda d, t: seen.append((d, t)))
    assert [r.uid for r in results] == [p.uid for p in pairs]
    assert [c[0] for c in pool.calls] == [3, 3, 1]  # rounds of one prompt per actor; the last is short
    assert all(c[1]["expect_version"] == 5 and c[1]["temperature"] == 0.7 for c in pool.calls)
    assert seen == [(3, 7), (6, 7), (7, 7)]
    # sample 0 answers the gold, sample 1 is off by one
    assert all(r.correct == [True, False] for r in results)
    assert metrics["problems"] == 7 and metrics["n"] == 2
    assert metrics["avg@2"] == 0.5 and metrics["pass@2"] == 1.0 and metrics["format_rate"] == 1.0
    assert metrics["maj@2"] == 1.0  # a 1:1 tie goes to the answer seen first
    assert metrics["response_len_mean"] == 1.5 and metrics["truncated_frac"] == 0.5
    with pytest.raises(ValueError, match="greedy"):
        evaluate_pairs(pool, pairs, n=2, max_tokens=8, temperature=0.0)
    table = format_table({"datasets": {"toy": {"metrics": metrics}}})
    assert "avg@n" in table and "0.500" in table and "toy" in table


def test_each_named_set_is_graded_its_own_way_unless_the_command_line_says_otherwise():
    from opsd.launch.evaluate import eval_gradings

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["grading.extract=strict"])
    sets = ["gsm8k-test", "math-500", "math:algebra:1-2", "data/toy/test.jsonl", "math:no_subject:1"]
    # GSM8K by its last number, MATH by its box; a file (and a malformed facet) by the config's.
    assert eval_gradings(cfg, sets, []) == ["lenient", "strict", "strict", "strict", "strict"]
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["grading.extract=lenient"])
    assert eval_gradings(cfg, sets, []) == ["lenient", "strict", "strict", "lenient", "lenient"]
    assert eval_gradings(cfg, sets, ["grading.extract=lenient"]) == ["lenient"] * 5


def test_a_small_first_round_then_progress_with_the_time_left():
    from opsd.launch.evaluate import progress_line

    pairs = [PromptPair(f"u{i}", [i], [i], str(i)) for i in range(20)]
    pool = FakePool(3)
    seen = []
    _, results = evaluate_pairs(pool, pairs, n=1, max_tokens=8, temperature=0.0, chunk_size=4, first_chunk=1,
                                progress=lambda d, t: seen.append((d, t)))
    assert [r.uid for r in results] == [p.uid for p in pairs]
    assert seen == [(3, 20), (15, 20), (20, 20)]  # 1 prompt per worker first, then rounds of 4 per worker
    assert progress_line(3, 20, 105.0) == "3/20 problems (1m45s; about 9m55s left)"  # 35 s a problem
    assert progress_line(24, 500, 24 * 35.0) == "24/500 problems (14m00s; about 4h37m left)"
    assert progress_line(20, 20, 700.0) == "20/20 problems (11m40s)"


def test_the_evaluation_reports_the_mean_repeated_4gram_rate_of_its_answers():
    """Answers of varied repetition (one too short to have a 4-gram): the summary's rate is the
    mean over the answers that have one, each counted by brute force."""
    import random

    rng = random.Random(3)
    answers = {i: [[rng.randrange(v) for _ in range(rng.randrange(0, 24))] for v in (2, 5, 50)] for i in range(5)}
    answers[0][0] = [1, 2]  # no 4-gram: left out of the mean

    class Pool(FakePool):
        def map(self, method, per_actor_args, **kw):
            return [[[Rollout(ids, [0.0] * len(ids), "stop", "\\boxed{1}", 0) for ids in answers[p[0]]]
                     for p in prompts] for prompts, _ in per_actor_args]

    def brute(ids):
        grams = [tuple(ids[i: i + 4]) for i in range(len(ids) - 3)]
        return None if not grams else sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams)

    pairs = [PromptPair(f"u{i}", [i], [i], "1") for i in range(5)]
    metrics, _ = evaluate_pairs(Pool(2), pairs, n=3, max_tokens=24, temperature=0.7)
    rates = [r for i in range(5) for r in map(brute, answers[i]) if r is not None]
    assert len(rates) < 15 and metrics["repeated_ngram_rate"] == pytest.approx(sum(rates) / len(rates))
