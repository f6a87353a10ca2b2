"""PP-OCRv4 text detector from the rapidocr-onnxruntime package, and text images to feed it.

The package holds deployed ONNX files whose weights are all Constant nodes (no initializers), a
good check that onnxq's passes handle constants. Only the .onnx files are used (the package's
Python code needs OpenCV, which we neither need nor install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def det_model_path() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4)")
    return Path(spec.submodule_search_locations[0]) / "models" / "ch_PP-OCRv4_det_infer.onnx"


def text_images(n: int, size: int = 320, seed: int = 0) -> np.ndarray:
    """`n` (3, size, size) crops of scikit-image's page and text images, normalised as PP-OCR does
    ((x/255 − 0.5)/0.5), at random positions and scales; deterministic for a seed."""
    from skimage import data, transform

    pages = [np.asarray(data.page(), np.float32), np.asarray(data.text(), np.float32)]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        page = pages[i % len(pages)]
        side = int(min(page.shape) * rng.uniform(0.5, 1.0))
        y = rng.integers(0, page.shape[0] - side + 1)
        x = rng.integers(0, page.shape[1] - side + 1)
        crop = transform.resize(page[y:y + side, x:x + side], (size, size), preserve_range=True, anti_aliasing=True)
        out[i] = (crop / 255.0 - 0.5) / 0.5
    return out
