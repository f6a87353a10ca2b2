#!/usr/bin/env bash
# Install Intel Neural Compressor 2.x next to the project's ONNX Runtime in its own virtual environment,
# .cache/inc-venv: ONNX Runtime's quantize_static runs SmoothQuant (extra_options SmoothQuant=True)
# through neural_compressor.adaptor.ox_utils, a benchmark anchor. Its own venv because INC 2.x pins numpy<2.
# INC 3.x dropped that module (ONNX moved to onnx-neural-compressor), so 2.6 it is.
#
# Idempotent and quiet: a second run with the same pins returns at once.
# Usage: bash scripts/setup_inc.sh        (PYTHON=python3.11 to choose the interpreter;
#        PROJECT_PYTHON=... the project's interpreter, default .venv/bin/python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.cache/inc-venv"
# the same ONNX Runtime and onnx as the project, so only the SmoothQuant step differs from the plain anchor
PROJECT_PY="${PROJECT_PYTHON:-$REPO/.venv/bin/python}"
read -r ORT_VERSION ONNX_VERSION < <("$PROJECT_PY" -c 'import onnxruntime, onnx; print(onnxruntime.__version__, onnx.__version__)')
# sympy: ORT's quant_pre_process; six: imported by neural_compressor but not declared
WANT="neural-compressor==2.6 onnxruntime==$ORT_VERSION onnx==$ONNX_VERSION sympy six"
CHECK="import neural_compressor.adaptor.ox_utils.smooth_quant"
source "$REPO/scripts/anchor_venv.sh"
venv_ready "$VENV" "$WANT" "$CHECK" && exit 0

start=$SECONDS
venv_create "$VENV"
# shellcheck disable=SC2086 - WANT is a list of requirement specifiers
venv_pip "$VENV" $WANT
venv_stamp "$VENV" "$WANT" "$CHECK"
echo "neural-compressor 2.6 installed in $VENV ($((SECONDS - start)) s)"
