#!/usr/bin/env bash
# The main job: set up (once), then quantize a pretrained MobileNetV2 end to end (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
