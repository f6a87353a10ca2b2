"""Natural photos shipped inside installed packages, cut into ImageNet-normalised crops.

Three splits of DISJOINT photos, so a quantizer calibrated on 'calib' is never scored on a crop
of an image it has seen, and results are reported on photos no design choice has seen:

- 'calib' (6 photos, Python packages): calibration;
- 'eval', also called 'dev' (5 photos, Python packages): the photos onnxq's CNN defaults were
  tuned on (the 300-crop evaluation of earlier benchmarks);
- 'test' (23 photos from the Debian packages mate-backgrounds and plasma-workspace-wallpapers,
  `apt-get install mate-backgrounds plasma-workspace-wallpapers`): photos nothing was tuned on.

Set ONNXQ_PHOTO_DIR to a folder that holds every photo as <name><suffix> (`export_photos` writes one)
to read them from there instead: a machine without the packages then cuts the same crops.

Every split draws many crops per photo (several scales, positions and horizontal flips),
deterministically from a seed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# name -> (package, file inside it). Only RGB photos; the stereo pair motorcycle_left/right
# is kept in one split because the two views are near-duplicates.
_PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
# photographs (not the artwork) of two Debian wallpaper packages, at a resolution each ships
_MATE, _PLASMA = "/usr/share/backgrounds/mate/nature", "/usr/share/wallpapers"
_DEBIAN_PHOTOS = {
    **{name.lower(): ("mate-backgrounds", f"{_MATE}/{name}.jpg")
       for name in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops",
                    "Storm", "TwoWings", "Wood", "YellowFlower")},
    **{name.lower(): ("plasma-workspace-wallpapers", f"{_PLASMA}/{name}/contents/images/{size}.jpg")
       for name, size in (("BytheWater", "1280x1024"), ("ColdRipple", "1280x1024"), ("ColorfulCups", "2560x1600"),
                          ("DarkestHour", "1280x1024"), ("EveningGlow", "1280x1024"), ("FallenLeaf", "1280x1024"),
                          ("Grey", "1280x1024"), ("Kite", "1280x1024"), ("OneStandsOut", "1280x1024"),
                          ("Path", "1280x1024"), ("summer_1am", "1280x1024"))},
}
SPLITS = {
    "calib": ("astronaut", "coffee", "rocket", "china", "hubble_deep_field", "immunohistochemistry"),
    "eval": ("chelsea", "motorcycle_left", "motorcycle_right", "flower", "grace_hopper"),
    "test": tuple(_DEBIAN_PHOTOS),
}
SPLITS["dev"] = SPLITS["eval"]
MIN_SCALE = 0.35  # smallest crop side, as a fraction of the photo's shorter side


def photo_path(name: str) -> Path:
    """File of one named photo inside its installed package (Python or Debian), or in ONNXQ_PHOTO_DIR."""
    import importlib

    if os.environ.get("ONNXQ_PHOTO_DIR"):
        folder = Path(os.environ["ONNXQ_PHOTO_DIR"])
        found = [p for p in folder.iterdir() if p.is_file() and p.stem == name] if folder.is_dir() else []
        if len(found) != 1:
            raise FileNotFoundError(f"ONNXQ_PHOTO_DIR={folder} holds {len(found)} files named '{name}'; it needs one")
        return found[0]

    if name in _DEBIAN_PHOTOS:
        package, path = _DEBIAN_PHOTOS[name]
        if not Path(path).is_file():
            raise FileNotFoundError(f"photo '{name}' comes from the Debian package {package}, which is not installed: "
                                    "apt-get install mate-backgrounds plasma-workspace-wallpapers")
        return Path(path)
    package, rel = _PHOTOS[name]
    return Path(importlib.import_module(package).__file__).parent / rel


def export_photos(folder: str | os.PathLike) -> Path:
    """Copy every photo of every split into `folder` as <name><suffix>, for ONNXQ_PHOTO_DIR elsewhere."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in {n for split in SPLITS.values() for n in split}:
        source = photo_path(name)
        target = folder / f"{name}{source.suffix}"
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    return folder


def load_photo(name: str) -> np.ndarray:
    """One photo as an HxWx3 uint8 RGB array."""
    with Image.open(photo_path(name)) as im:
        return np.asarray(im.convert("RGB"))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 with the ImageNet mean/std used by torchvision weights."""
    return ((rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def _center_box(h: int, w: int) -> tuple[int, int, int]:
    side = round(min(h, w) * 224 / 256)  # the usual "resize 256, center-crop 224" view
    return (h - side) // 2, (w - side) // 2, side


def _crop(rgb: np.ndarray, box: tuple[int, int, int], flip: bool, size: int) -> np.ndarray:
    top, left, side = box
    im = Image.fromarray(rgb[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    out = np.asarray(im)
    return out[:, ::-1] if flip else out


def crops(split: str, n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """n crops of the split's photos as an (n, 3, size, size) float32 ImageNet-normalised array.

    Crop i comes from photo i mod (number of photos). The first crop of each photo is the
    standard evaluation view (central square of side 224/256 of the shorter side); the rest
    are squares of random side in [MIN_SCALE, 1] x shorter side at random positions, half
    of them mirrored. The same (split, n, size, seed) always gives the same array.
    """
    names = SPLITS[split]
    photos = [load_photo(name) for name in names]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        if i < len(photos):
            box, flip = _center_box(h, w), False
        else:
            side = int(min(h, w) * rng.uniform(MIN_SCALE, 1.0))
            box = (int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side)
            flip = bool(rng.random() < 0.5)
        out[i] = normalize(_crop(rgb, box, flip, size))
    return out


def center_crop(name: str, size: int = 224) -> np.ndarray:
    """The standard evaluation view of one named photo, shape (1, 3, size, size)."""
    rgb = load_photo(name)
    return normalize(_crop(rgb, _center_box(*rgb.shape[:2]), False, size))[None]
