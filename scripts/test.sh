#!/usr/bin/env bash
# Set up (once) and run the test suite: the README's test command, and what CI runs.
# First ruff: its default rules and the import boundaries in pyproject.toml / */ruff.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q "$@"
