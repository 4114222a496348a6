"""`opsd eval` end to end on CPU: the tiny model on two small problem sets (JSONL and Parquet),
n=2 samples at temperature 0.8, through the CLI entry point in this process (so it joins the
session's Ray instead of starting a second cluster)."""

from __future__ import annotations

import json

import pytest

from opsd.launch.cli import main
from opsd.evaluation import Graded, majority_correct
from opsd.verify import extract_boxed, score_response

pytestmark = pytest.mark.integration

PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 0)]]


def recompute(records: list[dict]) -> dict:
    """avg@n, pass@n, maj@n, format rate from the per-problem records, independently of the code
    under test (majority voting is opsd.evaluation's, which has its own unit tests)."""
    n = len(records[0]["correct"])
    m = len(records)
    return {
        "problems": m, "n": n,
        f"avg@{n}": sum(sum(r["correct"]) / n for r in records) / m,
        f"pass@{n}": sum(any(r["correct"]) for r in records) / m,
        f"maj@{n}": sum(majority_correct(Graded(r["uid"], r["answers"], r["correct"], r["gold"])) for r in records) / m,
        "format_rate": sum(sum(extract_boxed(t) is not None for t in r["responses"]) / n for r in records) / m,
        "response_len_mean": sum(sum(r["response_lens"]) for r in records) / (m * n),
        "truncated_frac": sum(f == "length" for r in records for f in r["finish_reasons"]) / (m * n),
    }


def test_opsd_eval_tiny(ray_session, tiny_model, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "sums.jsonl"
    jsonl.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    parquet = tmp_path / "more.parquet"
    pq.write_table(pa.table({"problem": ["What is 8 + 1?", "What is 4 + 4?"], "answer": ["9", "8"]}), parquet)
    out = tmp_path / "report.json"

    rc = main(["eval", "--model", "tiny", "--data", str(jsonl), str(parquet), "--n", "2", "--temperature", "0.8",
               "--max-tokens", "24", "--out", str(out), "--responses", "--config", "configs/tiny.yaml",
               "rollout.kv_cache_mb=128"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sums" in printed and "more" in printed and "avg@n" in printed and str(out) in printed

    report = json.loads(out.read_text())
    assert report["model_path"] == tiny_model and report["run_dir"] is None
    assert report["sampling"] == {"n": 2, "temperature": 0.8, "top_p": 1.0, "max_tokens": 24, "seed": 0}
    assert report["grading"] == "strict"
    assert list(report["datasets"]) == ["sums", "more"]
    for name, size, gold in [("sums", 6, [a for _, a in PROBLEMS]), ("more", 2, ["9", "8"])]:
        d = report["datasets"][name]
        recs = d["problems"]
        assert d["skipped"] == []
        assert [r["uid"] for r in recs] == [f"{name}:{i}" for i in range(size)]  # no id column: row numbers
        assert [r["gold"] for r in recs] == gold
        for r in recs:
            assert len(r["answers"]) == len(r["correct"]) == len(r["responses"]) == 2
            assert all(0 < k <= 24 for k in r["response_lens"])
            assert set(r["finish_reasons"]) <= {"stop", "length"}
            assert not any(c and a is None for a, c in zip(r["answers"], r["correct"]))
        metrics = d["metrics"]
        expected = recompute(recs)
        assert set(expected) <= set(metrics)
        for k, v in expected.items():
            assert metrics[k] == pytest.approx(v), k
        assert metrics["accuracy_strict"] == pytest.approx(expected["avg@2"])  # the config grades strictly
        lenient = sum(score_response(t, r["gold"], "lenient") for r in recs for t in r["responses"]) / (2 * size)
        assert metrics["accuracy_lenient"] == pytest.approx(lenient)
        assert metrics["seconds"] > 0
