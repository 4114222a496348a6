#!/usr/bin/env bash
# docs/BENCHMARKS.md, "The teacher on the inference engine": `opsd bench step` on configs/local.yaml
# (SmolLM2-135M-Instruct) for each way of scoring the teacher, in bf16 and fp32, and `opsd bench head`
# with its vLLM rows. Resumable: a figure whose JSON exists is skipped. Run it on a quiet machine.
#   scripts/bench_teacher_backends.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench/teacher-backends}
mkdir -p "$out"
opsd=${OPSD:-.venv/bin/opsd}
steps=${STEPS:-2}

bench() {  # name overrides...
  local name=$1; shift
  local file="$out/$name.json"
  [[ -f $file ]] && { echo "skip $file (done)"; return; }
  echo "== bench step $name: $*"
  "$opsd" bench step configs/local.yaml "$@" --steps "$steps" --json "$file.tmp"
  mv "$file.tmp" "$file"
}

for dtype in bfloat16 float32; do
  bench "step-$dtype-transformers-fixed" "model.dtype=$dtype"
  bench "step-$dtype-vllm-fixed" "model.dtype=$dtype" scorer.backend=vllm
  bench "step-$dtype-transformers-live" "model.dtype=$dtype" teacher.mode=live
  bench "step-$dtype-rollout-engines-live" "model.dtype=$dtype" teacher.mode=live scorer.on_rollout_engines=true
done
# LoRA (r=64) with a fixed teacher: merged pushes and a transformers scorer, against the adapter alone
# served by the engines, which score the teacher on their base weights (model.lora.serve=adapter).
bench "step-bfloat16-lora-merged-fixed" model.dtype=bfloat16 model.lora.enabled=true
bench "step-bfloat16-lora-adapter-engines-fixed" model.dtype=bfloat16 model.lora.enabled=true \
  model.lora.serve=adapter scorer.on_rollout_engines=true
if [[ ! -f $out/head.json ]]; then
  "$opsd" bench head configs/local.yaml --rows 8 --json "$out/head.json.tmp"
  mv "$out/head.json.tmp" "$out/head.json"
fi
