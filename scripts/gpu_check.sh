#!/usr/bin/env bash
# GPU checks, run from the repository root on a CUDA machine that has torch, transformers (and
# triton) but not necessarily ray, vllm, deepspeed or a network:
#
#   bash scripts/gpu_check.sh
#
# Installs nothing. The repository goes on PYTHONPATH (no `pip install -e .`: an editable install
# needs the build backend from the network), and so does build/gpu-pydeps when present
# (omegaconf, pytest: scripts/stage_gpu_pydeps.sh makes it on the CPU machine). Runs
#   1. what the machine has (python, torch, CUDA, GPU, importable modules),
#   2. python -m pytest tests/gpu -q         (the chunked loss and the scorer's forward on CUDA),
#   3. python -m opsd.launch.cli bench loss       (chunked vs unchunked loss memory; T = 2048 and 8192,
#                                             fp32 and bf16)
# and writes the log and the JSON figures to $OUT (default build/gpu-check). Without CUDA the
# tests skip and the benchmark runs once at a small size, as a smoke test of the script.
# Exit status: that of pytest, else of the first failing benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-$ROOT/build/gpu-check}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
PY="${PYTHON:-$(command -v python || command -v python3)}"
DEPS="${GPU_PYDEPS:-$ROOT/build/gpu-pydeps}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$DEPS" ] && export PYTHONPATH="$PYTHONPATH:$DEPS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
status=0

step() { echo; echo "=== $*" | tee -a "$LOG"; }
run() {  # run LIMIT_SECONDS CMD...: output to the terminal and the log; remember the first failure
    local limit="$1"; shift
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && echo "--- exit $rc: $*" | tee -a "$LOG"
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    return 0
}

step "machine"
run 60 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "capability", f"{p.major}.{p.minor}")
for m in ("transformers", "tokenizers", "safetensors", "triton", "numpy", "omegaconf", "pytest", "psutil",
          "pyarrow", "ray", "vllm", "deepspeed"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:12s} {getattr(mod, '__version__', '?'):12s} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"  {m:12s} missing ({type(exc).__name__})")
EOF
command -v nvidia-smi >/dev/null && run 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

step "pytest tests/gpu"
if "$PY" -c 'import pytest' 2>/dev/null; then
    # -p no:cacheprovider: leave no .pytest_cache behind; -rs: say why anything skipped.
    run 300 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider
else
    echo "pytest is not importable: run scripts/stage_gpu_pydeps.sh on the CPU machine and carry build/gpu-pydeps" | tee -a "$LOG"
    status=1
fi

# `opsd bench` through the CLI when opsd.config imports (omegaconf), else the same code directly.
if "$PY" -c 'import opsd.launch.cli' 2>/dev/null; then BENCH=("$PY" -m opsd.launch.cli bench); else BENCH=("$PY" -m opsd.benchmarks.bench); fi
if [ "$CUDA" = "1" ]; then
    step "bench loss, T=2048 (the default), fp32"
    run 120 "${BENCH[@]}" loss --json "$OUT_DIR/bench_loss_T2048_fp32.json"
    step "bench loss, T=8192, fp32"
    run 120 "${BENCH[@]}" loss --tokens 8192 --json "$OUT_DIR/bench_loss_T8192_fp32.json"
    step "bench loss, T=8192, bf16, hidden 2048 (Qwen3-1.7B's)"
    run 120 "${BENCH[@]}" loss --tokens 8192 --hidden 2048 --dtype bfloat16 --json "$OUT_DIR/bench_loss_T8192_bf16.json"
else
    step "bench loss (no CUDA: a small size, only to check that the script runs)"
    run 180 "${BENCH[@]}" loss --vocab 8192 --tokens 512 --chunk 128 --hidden 64 --json "$OUT_DIR/bench_loss_smoke.json"
fi

step "done: exit status $status; log and figures in $OUT_DIR"
ls -l "$OUT_DIR" | tee -a "$LOG"
exit "$status"
