#!/usr/bin/env bash
# Install NVIDIA ModelOpt's ONNX quantizer (a benchmark anchor) into its own virtual environment,
# .cache/modelopt-venv, because it pins an onnx/onnxruntime different from the project's.
#
# Idempotent and quiet: a second run with the same pins returns at once.
# Usage: bash scripts/setup_modelopt.sh        (PYTHON=python3.11 to choose the interpreter)
#
# Why not `pip install nvidia-modelopt[onnx]`: on Linux x86 that extra pulls onnxruntime-gpu and
# cupy-cuda12x (hundreds of MB of CUDA code this CPU-only benchmark never runs), and torch>=2.8
# would resolve to a multi-GB CUDA build. So modelopt goes in with --no-deps and its dependencies
# are listed here by hand, from the wheel's metadata (Requires-Dist of 0.47.0), with the CPU
# onnxruntime of the same minor version as the onnxruntime-gpu it asks for.
set -euo pipefail

MODELOPT_VERSION=0.47.0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.cache/modelopt-venv"

DEPS=(
  "torch==2.13.0"  # the local CPU build; modelopt.onnx imports torch for a few helpers
  "onnx~=1.21.0" "onnxruntime~=1.24.2" "onnx-graphsurgeon>=0.6.1" "onnxconverter-common~=1.16.0"
  "onnxscript" "onnxslim>=0.1.76" "polygraphy>=0.53.4" "ml_dtypes" "lief" "cppimport"
  "ninja" "numpy" "nvidia-ml-py>=12" "packaging" "setuptools>=80" "tqdm" "PyYAML>=6.0"
  "omegaconf>=2.3.0" "pulp<4.0" "pydantic>=2.0" "regex" "rich" "safetensors" "scipy"
)
WANT="nvidia-modelopt==$MODELOPT_VERSION ${DEPS[*]}"
CHECK="import modelopt, modelopt.onnx.quantization"
source "$REPO/scripts/anchor_venv.sh"
venv_ready "$VENV" "$WANT" "$CHECK" && exit 0

start=$SECONDS
venv_create "$VENV"
venv_pip "$VENV" "${DEPS[@]}"
venv_pip "$VENV" --no-deps "nvidia-modelopt==$MODELOPT_VERSION"
venv_stamp "$VENV" "$WANT" "$CHECK"
echo "modelopt $MODELOPT_VERSION installed in $VENV ($((SECONDS - start)) s)"
