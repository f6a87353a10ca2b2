"""Where derived files (exported ONNX, calibration arrays) are cached: never in git."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$ONNXQ_CACHE_DIR, else the repository's .cache/ (git-ignored), joined with parts; created."""
    root = Path(os.environ.get("ONNXQ_CACHE_DIR") or Path(__file__).resolve().parents[1] / ".cache")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
