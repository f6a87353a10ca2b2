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
PY="${PYTHON:-python3}"
# the same ONNX Runtime and onnx as the project, so only the SmoothQuant step differs from the plain anchor
PROJECT_PY="${PROJECT_PYTHON:-$REPO/.venv/bin/python}"
read -r ORT_VERSION ONNX_VERSION < <("$PROJECT_PY" -c 'import onnxruntime, onnx; print(onnxruntime.__version__, onnx.__version__)')
# sympy: ORT's quant_pre_process; six: imported by neural_compressor but not declared
WANT="neural-compressor==2.6 onnxruntime==$ORT_VERSION onnx==$ONNX_VERSION sympy six"
STAMP="$VENV/.onnxq-setup"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && "$VENV/bin/python" -c "import neural_compressor.adaptor.ox_utils.smooth_quant" >/dev/null 2>&1; then
  exit 0
fi

start=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# shellcheck disable=SC2086 - WANT is a list of requirement specifiers
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $WANT \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -W ignore -c "import neural_compressor.adaptor.ox_utils.smooth_quant"
echo "$WANT" >"$STAMP"
echo "neural-compressor 2.6 installed in $VENV ($((SECONDS - start)) s)"
