#!/usr/bin/env bash
# docs/TASK.md, "GSM8K, MATH and procedural tasks": SmolLM2-135M-Instruct before training, student
# prompt vs teacher prompt, greedy, on each task with the reference in the user turn (the paper's
# way) and in the system message. Resumable: a measurement whose JSON exists is skipped.
#   scripts/measure_tasks.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench/tasks}
mkdir -p "$out"
opsd=${OPSD:-.venv/bin/opsd}
system='prompt.teacher_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.\nReference solution of the next problem:\n{solution}"'
common=(model.path=smollm2-135m model.max_model_len=1024 prompt.max_prompt_len=640 prompt.overlong=skip
        rollout.num_threads=2 cluster.num_cpus=2 grading.extract=auto)

measure() {  # name problems overrides...
  local name=$1 problems=$2; shift 2
  for form in user system; do
    local file="$out/$name-$form.json" extra=()
    [[ -f $file ]] && { echo "skip $file (done)"; continue; }
    [[ $form == system ]] && extra=("$system")
    echo "== $name, reference in the $form $( [[ $form == user ]] && echo turn || echo message )"
    "$opsd" bench task configs/gsm8k.yaml "${common[@]}" "$@" "${extra[@]}" --problems "$problems" --json "$file.tmp"
    mv "$file.tmp" "$file"
  done
}

measure gsm8k-test 400 data.test_path=gsm8k-test eval.max_tokens=320
measure math-l1-2 300 data.test_path=math:all:1-2 eval.max_tokens=384
# gsm_symbolic writes worked solutions (GSM8K's form), the counting tasks only answers.
measure rg-gsm_symbolic 200 data.test_path=reasoning_gym:gsm_symbolic:test eval.max_tokens=320
for task in leg_counting letter_counting; do
  measure "rg-$task" 200 "data.test_path=reasoning_gym:$task:test" teacher.context=answer eval.max_tokens=256
done
