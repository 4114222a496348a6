"""``opsd plot``: training curves of one or more run directories as one PNG.

Panels (x: training step): loss, KL on the sampled tokens, reward of the training samples, mean
response length, eval accuracy (``eval/avg@n`` with its standard error as a band, the strict
accuracy and the format rate) and tokens generated so far; then the collapse diagnostics
(opsd/diagnostics.py): the truncated share and the repeated 4-gram rate (training samples and
evaluation), the teacher-minus-student stop probability at the last position of truncated and of
finished responses, and the evaluation's mean response length. A metric logged as missing (null)
on a step is a gap in its line, not a point at 0.
Reads ``metrics.jsonl`` only, so it works on a run that is still going.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Sequence

from opsd.launch.loggers import read_metrics  # noqa: F401  (opsd plot reads what the logger wrote)

# (title, metric key, several keys or "eval", y label)
PANELS = (
    ("loss", "loss", "loss per token"),
    ("KL on the sampled tokens (kl_sampled)", "kl_sampled", "nats per token"),
    ("reward (training samples)", "reward_mean", "mean reward"),
    ("response length", "response_len_mean", "tokens"),
    ("eval accuracy", "eval", "avg@n"),
    ("tokens generated", "tokens_generated_total", "total tokens"),
    ("truncated share", ("truncated_frac", "eval/truncated_frac"), "share of responses cut"),
    ("repeated 4-gram rate", ("repeated_ngram_rate", "eval/repeated_ngram_rate"), "share of a response's 4-grams"),
    ("stop probability at the last position, teacher - student", ("stop_gap_truncated", "stop_gap_finished"),
     "probability"),
    ("eval response length", "eval/response_len_mean", "tokens"),
)
FIGSIZE = (24.0, 8.0)
DPI = 100


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The finite values of ``key`` by step; NaN (a gap in the line) where a row logs it as missing."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
        elif key in r and v is None:
            xs.append(r["step"])
            ys.append(math.nan)
    return (xs, ys) if any(math.isfinite(y) for y in ys) else ([], [])


def _eval_keys(rows: list[dict]) -> list[str]:
    """The eval panel's curves: ``avg@n`` (accuracy under the run's grading; its standard error
    ``avg@n_se`` is drawn as a band, never as a curve of its own), the strict ``\\boxed{}``
    accuracy unless it is the same curve as avg@1 (a run graded strictly), and the format rate."""
    present = {k for r in rows for k in r}
    avg = sorted((k for k in present if re.fullmatch(r"eval/avg@\d+", k)), key=lambda k: int(k.split("@")[1]))
    keys = list(avg)
    if "eval/accuracy_strict" in present and _series(rows, "eval/accuracy_strict") != _series(rows, "eval/avg@1"):
        keys.append("eval/accuracy_strict")
    return keys + (["eval/format_rate"] if "eval/format_rate" in present else [])


def _band(rows: list[dict], key: str) -> tuple[list[int], list[float], list[float]] | None:
    """(steps, low, high) of ``key`` +- its standard error ``KEY_se``, where the metrics have one."""
    xs, ys = _series(rows, key)
    se = dict(zip(*_series(rows, f"{key}_se")))
    if not se:
        return None
    kept = [(x, y, se[x]) for x, y in zip(xs, ys) if x in se]
    return [x for x, _, _ in kept], [y - e for _, y, e in kept], [y + e for _, y, e in kept]


def _eval_label(key: str) -> str:
    name = key.removeprefix("eval/")
    return {"accuracy_strict": "strict (boxed)", "format_rate": "format rate"}.get(name, name)


def _labels(run_dirs: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(run_dirs):
            raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
        return list(labels)
    names = [p.resolve().name for p in run_dirs]
    # Same folder name in different places: fall back to the paths as given.
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, run_dirs)]


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Path:
    """Write the curves of ``run_dirs`` into one PNG of figsize * dpi pixels; returns its path.

    Default ``out``: ``RUN_DIR/curves.png`` for one run, ``./curves.png`` for several.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (a no-op if pyplot already chose Agg)
    import matplotlib.pyplot as plt

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("no run directories given")
    names = _labels(dirs, labels)
    runs = [(name, read_metrics(d)) for name, d in zip(names, dirs)]
    out_path = Path(out) if out else (dirs[0] / "curves.png" if len(dirs) == 1 else Path("curves.png"))

    from matplotlib.ticker import MaxNLocator

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = [r["step"] for _, rows in runs for r in rows]
    fig, axes = plt.subplots(2, 5, figsize=figsize, dpi=dpi)
    try:
        for ax, (title, key, ylabel) in zip(axes.flat, PANELS):
            drawn = 0
            for i, (name, rows) in enumerate(runs):
                color = colors[i % len(colors)]
                keys = _eval_keys(rows) if key == "eval" else [key] if isinstance(key, str) else list(key)
                styles = ["-", "--", ":", "-."]
                for j, k in enumerate(keys):
                    xs, ys = _series(rows, k)
                    if not xs:
                        continue
                    label = name if len(keys) == 1 else f"{name} {_eval_label(k)}"
                    if len(keys) > 1 and len(runs) == 1:
                        label = _eval_label(k)
                    ax.plot(xs, ys, styles[j % len(styles)], color=color, label=label,
                            marker="o" if len(xs) < 30 else None, markersize=3)
                    band = _band(rows, k) if key == "eval" else None
                    if band is not None:
                        ax.fill_between(*band, color=color, alpha=0.15, linewidth=0)
                    drawn += 1
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if steps and min(steps) < max(steps):  # one x range for all panels (eval is sparser)
                pad = 0.02 * (max(steps) - min(steps))
                ax.set_xlim(min(steps) - pad, max(steps) + pad)
            if not drawn:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            elif len(runs) > 1 or key == "eval" or not isinstance(key, str):
                ax.legend(fontsize="small")
        last = {name: (rows[-1]["step"] if rows else 0) for name, rows in runs}
        fig.suptitle("opsd: " + ", ".join(f"{n} ({s} steps)" for n, s in last.items()))
        fig.tight_layout()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # No bbox_inches="tight": the image is exactly figsize * dpi pixels.
        fig.savefig(out_path, dpi=dpi)
    finally:
        plt.close(fig)
    return out_path


def main_plot(args) -> int:
    """The body of ``opsd plot`` (launch/cli.py parses the arguments)."""
    try:
        out = plot_runs(args.run_dirs, args.out, labels=args.labels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"opsd plot: {exc}", file=sys.stderr)
        return 2
    print(f"curves: {out}")
    return 0
