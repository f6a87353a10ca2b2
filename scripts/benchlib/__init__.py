"""What the benchmark scripts share: the quantizers they compare against (anchors), ORT CPU latency,
the facts they report about a quantized model, and the MiniLM task they have in common.

The scripts run as `python scripts/NAME.py`, so Python puts scripts/ on sys.path and `import benchlib`
finds this package with no path edits. Importing it stays light (numpy only): a worker started with
another environment's Python (the neural-compressor venv, which has no onnxq) imports it too.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def log(*args) -> None:
    print(*args, flush=True)


def only_filter(text: str):
    """--only: a predicate on quantizer labels, true for those containing one of the comma-separated
    substrings (every label when `text` is empty)."""
    parts = [p for p in text.split(",") if p]
    return lambda label: not parts or any(part in label for part in parts)


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository where it lies inside it, else as given: results name no machine paths."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
