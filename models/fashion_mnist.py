"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/):
60,000 training and 10,000 test images of 28×28 clothing items in 10 classes, read from its IDX files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # the training images' pixel mean and standard deviation (scaled to [0, 1])


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 N×1×28×28, normalised; labels int64 N) of split "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_file, labels_file = ROOT / f"{prefix}-images-idx3-ubyte.gz", ROOT / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.exists():
        raise FileNotFoundError(f"{images_file} missing: apt-get install dataset-fashion-mnist")
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return ((images.astype(np.float32) / 255 - MEAN) / STD).astype(np.float32), labels
