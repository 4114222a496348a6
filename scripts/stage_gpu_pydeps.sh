#!/usr/bin/env bash
# Run HERE (the CPU machine with .venv) before scripts/gpu_check.sh runs on a GPU machine that
# has torch + transformers but no network: copies the few pure-Python packages the GPU checks need
# and such a machine may lack (omegaconf and its antlr4 runtime for opsd.config; pytest, pluggy,
# iniconfig) from .venv into build/gpu-pydeps (about 4 MB), and peft and accelerate (the roofline's
# LoRA rows) into build/gpu-pydeps-peft. gpu_check.sh puts the first folder on PYTHONPATH when it
# exists, so these copies win over the machine's own (they are consistent with each other), and
# the second only when the machine has no peft (its own matches its transformers). build/ is
# git-ignored: carry build/gpu-pydeps and build/gpu-pydeps-peft with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SITE="$("$PY" -c 'import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))')"
DEST="build/gpu-pydeps"
rm -rf "$DEST"
mkdir -p "$DEST"
for name in omegaconf antlr4 pytest _pytest pluggy iniconfig py.py; do
    if [ -e "$SITE/$name" ]; then
        cp -r "$SITE/$name" "$DEST/"
    else
        echo "stage_gpu_pydeps: $name not found in $SITE" >&2
        exit 1
    fi
done
rm -rf "$DEST-peft"
mkdir -p "$DEST-peft"
for name in peft accelerate; do
    if [ -e "$SITE/$name" ]; then
        cp -r "$SITE/$name" "$DEST-peft/"
    else
        echo "stage_gpu_pydeps: $name not found in $SITE" >&2
        exit 1
    fi
done
cp -r "$SITE"/peft-*.dist-info "$SITE"/accelerate-*.dist-info "$DEST-peft/" 2>/dev/null || true
# pytest looks its plugins up through installed distribution metadata.
cp -r "$SITE"/pytest-*.dist-info "$SITE"/pluggy-*.dist-info "$SITE"/iniconfig-*.dist-info "$DEST/" 2>/dev/null || true
find "$DEST" "$DEST-peft" -name __pycache__ -prune -exec rm -rf {} +
echo "staged $(du -sh "$DEST" | cut -f1) into $DEST: $(ls "$DEST" | grep -v dist-info | tr '\n' ' ')"
echo "staged $(du -sh "$DEST-peft" | cut -f1) into $DEST-peft: $(ls "$DEST-peft" | grep -v dist-info | tr '\n' ' ')"
