#!/usr/bin/env bash
# GPU checks, run from the repository root on a CUDA machine that has torch, transformers (and
# triton) but not necessarily ray, vllm, deepspeed, peft or a network: one prepared command for a
# short GPU window (issue 40), under 5 minutes on an H100 or H200:
#
#   bash scripts/gpu_check.sh              (after scripts/stage_gpu_pydeps.sh here, carrying build/gpu-pydeps*)
#
# Installs nothing. The repository goes on PYTHONPATH (no `pip install -e .`: an editable install
# needs the build backend from the network), and so does build/gpu-pydeps when present
# (omegaconf, pytest: scripts/stage_gpu_pydeps.sh makes it on the CPU machine); build/gpu-pydeps-peft
# (peft, accelerate) only when the machine has no peft of its own. Runs
#   1. what the machine has (python, torch, CUDA, GPU, importable modules),
#   2. python -m pytest tests/gpu -q         (the chunked and fused loss, the scorer's forward on CUDA),
#   3. scripts/gpu_roofline.py               (Qwen3-1.7B's shape: the learner's forward + backward and
#                                             whole update, head path module and fused, full and LoRA,
#                                             gradient checkpointing on and off; the scorer too with
#                                             GPU_CHECK_SCORER=1)
# and writes the log and the JSON figures to $OUT (default build/gpu-check). Without CUDA the
# tests skip and the roofline runs --tiny on the CPU, as a dry run of the script (GPU_CHECK_DRY=1
# does that on a GPU machine too).
# Exit status: that of pytest, else of the first failing step.
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
# The staged peft is for a machine without one: the machine's own matches its transformers.
if ! "$PY" -c 'import peft' 2>/dev/null && [ -d "$DEPS-peft" ]; then export PYTHONPATH="$PYTHONPATH:$DEPS-peft"; fi
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
          "peft", "accelerate", "pyarrow", "ray", "vllm", "deepspeed"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:12s} {getattr(mod, '__version__', '?'):12s} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"  {m:12s} missing ({type(exc).__name__})")
EOF
command -v nvidia-smi >/dev/null && run 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
[ "${GPU_CHECK_DRY:-0}" = "1" ] && CUDA=0

step "pytest tests/gpu"
if "$PY" -c 'import pytest' 2>/dev/null; then
    # -p no:cacheprovider: leave no .pytest_cache behind; -rs: say why anything skipped.
    run 120 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider
else
    echo "pytest is not importable: run scripts/stage_gpu_pydeps.sh on the CPU machine and carry build/gpu-pydeps" | tee -a "$LOG"
    status=1
fi

if [ "$CUDA" = "1" ]; then
    # The learner's rows before (module) and after (fused), full and LoRA, T = 2,048 and 8,192,
    # checkpointing on (the recipe) and off: 16 rows, each forward + backward and the whole update
    # (~3 minutes). The scorer's rows (docs/BENCHMARKS.md has them) with GPU_CHECK_SCORER=1.
    step "roofline, Qwen3-1.7B's shape"
    PARTS=(learner); [ "${GPU_CHECK_SCORER:-0}" = "1" ] && PARTS=(scorer learner)
    run 270 "$PY" scripts/gpu_roofline.py --parts "${PARTS[@]}" --json "$OUT_DIR/gpu_roofline.json"
else
    step "roofline --tiny (no CUDA: the CPU, only to check that the script runs)"
    # Every kind of row once (scorer, learner full and LoRA, both head paths) at the smallest size.
    run 240 "$PY" scripts/gpu_roofline.py --tiny --repeats 1 --lengths 64 --checkpointing on \
        --json "$OUT_DIR/gpu_roofline_tiny.json"
fi

step "done: exit status $status; log and figures in $OUT_DIR"
ls -l "$OUT_DIR" | tee -a "$LOG"
exit "$status"
