"""`opsd plot`: a PNG of the expected size with something drawn on it, from a metrics.jsonl."""

import json
import math

import numpy as np
import pytest

from opsd.launch.cli import main
from opsd.launch.plot import PANELS, plot_runs, read_metrics


def write_run(path, steps=12, eval_every=3, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    total = 0
    lines = []
    for step in range(1, steps + 1):
        gen = int(rng.integers(200, 400))
        total += gen
        row = {
            "step": step, "loss": 1.0 / step + 0.05 * rng.random(), "kl_sampled": 0.5 / step,
            "reward_mean": min(1.0, 0.05 * step), "response_len_mean": gen / 8, "tokens_generated": gen,
            "tokens_generated_total": total, "sample_ids": [f"p:{i}#0" for i in range(8)],
        }
        if step == 2:
            row["kl_sampled"] = float("nan")  # e.g. an objective without a KL estimate
            row["reward_mean"] = None  # e.g. SFT
        if step % eval_every == 0:
            row.update({"eval/problems": 16, "eval/n": 1, "eval/avg@1": 0.1 * step / eval_every, "eval/pass@1": 0.1})
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 13, "loss": 0.')  # torn last line
    return path


def load_png(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_read_metrics_sorted_dedup_and_torn_tail(tmp_path):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "r+") as f:  # a resumed run that redid step 12
        body = f.read().rsplit("\n", 1)[0]
        f.seek(0)
        f.write(body + "\n" + json.dumps({"step": 12, "loss": 9.0}) + "\n")
        f.truncate()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] == 9.0
    assert math.isnan(rows[1]["kl_sampled"])


def test_plot_png_size_and_not_blank(tmp_path):
    run = write_run(tmp_path / "run")
    out = plot_runs([run], figsize=(9.0, 5.0), dpi=80)
    assert out == run / "curves.png"
    img = load_png(out)
    assert img.shape[:2] == (5 * 80, 9 * 80)  # rows = height, columns = width
    assert img.shape[2] in (3, 4)
    assert float(np.var(img[..., :3])) > 0
    # Not just a few stray pixels: a good share of the image is not background white.
    assert (img[..., :3] < 0.9).any(axis=-1).mean() > 0.01
    assert len(PANELS) == 10


def test_the_collapse_panels_read_their_keys_and_a_missing_value_is_a_gap(tmp_path):
    from opsd.launch.plot import _series

    keys = {k for _, key, _ in PANELS if not isinstance(key, str) or key != "eval"
            for k in ([key] if isinstance(key, str) else key)}
    assert {"truncated_frac", "eval/truncated_frac", "repeated_ngram_rate", "eval/repeated_ngram_rate",
            "stop_gap_truncated", "stop_gap_finished", "eval/response_len_mean"} <= keys
    rows = [{"step": 1, "kl_sampled": 0.2}, {"step": 2, "kl_sampled": None}, {"step": 3, "kl_sampled": 0.1},
            {"step": 4}]
    xs, ys = _series(rows, "kl_sampled")
    assert xs == [1, 2, 3] and ys[0] == 0.2 and math.isnan(ys[1]) and ys[2] == 0.1  # a gap at 2, not 0
    assert _series([{"step": 1, "reward_mean": None}], "reward_mean") == ([], [])  # nothing measured: no data


def test_cli_plot_several_runs(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", steps=8, seed=1)
    out = tmp_path / "cmp" / "both.png"
    assert main(["plot", str(a), str(b), "--labels", "beta0.5", "beta1", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    from opsd.launch.plot import DPI, FIGSIZE

    img = load_png(out)
    assert img.shape[:2] == (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI))
    assert float(np.var(img[..., :3])) > 0


def test_cli_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    a = write_run(tmp_path / "a")
    assert main(["plot", str(a), "--labels", "x", "y"]) == 2
    assert "2 labels for 1 run" in capsys.readouterr().err


def test_plot_without_eval_or_data(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.3}) + "\n")
    img = load_png(plot_runs([run], tmp_path / "c.png", figsize=(6, 4), dpi=50))
    assert img.shape[:2] == (200, 300)
    with pytest.raises(ValueError, match="no run directories"):
        plot_runs([])


def test_eval_panel_keys_leave_out_standard_errors_and_add_strict_and_format():
    from opsd.launch.plot import _band, _eval_keys, _eval_label

    rows = [{"step": 0, "eval/avg@1": 0.19, "eval/avg@1_se": 0.04, "eval/pass@1": 0.19, "eval/pass@1_se": 0.04,
             "eval/accuracy_strict": 0.0, "eval/accuracy_lenient": 0.19, "eval/format_rate": 0.01,
             "eval/problems": 100, "eval/n": 1},
            {"step": 1, "loss": 1.0},
            {"step": 40, "eval/avg@1": 0.37, "eval/avg@1_se": 0.05, "eval/accuracy_strict": 0.36,
             "eval/accuracy_lenient": 0.37, "eval/format_rate": 0.91}]
    keys = _eval_keys(rows)
    assert keys == ["eval/avg@1", "eval/accuracy_strict", "eval/format_rate"]
    assert [_eval_label(k) for k in keys] == ["avg@1", "strict (boxed)", "format rate"]
    steps, low, high = _band(rows, "eval/avg@1")
    assert steps == [0, 40] and low == pytest.approx([0.15, 0.32]) and high == pytest.approx([0.23, 0.42])
    assert _band(rows, "eval/format_rate") is None
    # Graded strictly, avg@1 is the strict accuracy: one curve, not two on top of each other.
    strict = [{**r, "eval/accuracy_strict": r["eval/avg@1"]} if "eval/avg@1" in r else r for r in rows]
    assert _eval_keys(strict) == ["eval/avg@1", "eval/format_rate"]
    # avg@n for several n, in order of n, and never their _se keys.
    several = [{"step": 3, "eval/avg@4": 0.2, "eval/avg@16": 0.3, "eval/avg@4_se": 0.1, "eval/avg@16_se": 0.1}]
    assert _eval_keys(several) == ["eval/avg@4", "eval/avg@16"]
