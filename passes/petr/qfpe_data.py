"""The QFPE weights file: a fine-tuned QFPE PETR's weights as plain arrays, for the `qfpe` pass.

A needs-retraining pass takes its weights from training, and a recipe names them by file. This file
holds data only: an .npz archive read with allow_pickle=False, so opening one can never run code (a
PyTorch checkpoint is a pickle and could). onnxq_models.petr_export.write_qfpe_weights writes it from
a PyTorch model; the library reads it without torch.

Members of the archive:
* `meta`: a JSON string: format tag and version, the model's configuration (pe_type, num_cameras,
  image_hw, feat_hw, embed_dims), the weight tables below, and the seed of the check images;
* `pe.<name>`: the QFPE position embedding's arrays (ray points, position range, anchor positions and
  tables, the 1×1 encoder's weights and biases), what `build_qfpe` authors the subgraph from;
* `w.<k>`: every constant of the model's form-A ONNX export, each stored once. meta's `nodes` maps a
  scoped node name (/model/layers.0/cross_attn/k_proj/MatMul) to its op type and, per input slot, the
  constant's key; meta's `initializers` maps an initializer name to its key. Two slots reading one
  constant share a key, so the rewritten graph shares it too;
* `check.img2lidar`, `check.pe`, `check.out<i>`: one reference evaluation by the PyTorch model (camera
  matrices, its PE, its outputs), whose images `check_images` regenerates from the seed. The pass
  compares the rewritten graph with it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.ir.graph import const_array, is_const

FORMAT = "onnxq-qfpe-weights"
VERSION = 1
PE_ARRAYS = ("ray_points", "range_min", "range_span", "anchor_positions", "anchors", "w1", "b1", "w2", "b2")


@dataclass
class QfpeWeights:
    """A QFPE weights file, read: the configuration, the PE arrays and the export's constants."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def pe_type(self) -> str:
        return self.meta["pe_type"]

    def pe_parameters(self) -> dict[str, np.ndarray]:
        """The arrays `build_qfpe` needs (PE_ARRAYS and feat_hw)."""
        params = {name: self.arrays[f"pe.{name}"] for name in PE_ARRAYS}
        params["feat_hw"] = np.array(self.meta["feat_hw"])
        return params

    def node_constant(self, node_name: str, op_type: str, slot: int) -> str | None:
        """The key of the constant at input `slot` of the export's node `node_name`, if that node has this op type."""
        entry = self.meta["nodes"].get(node_name)
        if entry is None or entry["op_type"] != op_type:
            return None
        return entry["inputs"].get(str(slot))

    def initializer(self, name: str) -> str | None:
        return self.meta["initializers"].get(name)

    def check_feed(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(images, img2lidar) of the reference evaluation, or None if the file has none."""
        if "check_seed" not in self.meta:
            return None
        return check_images(self.meta), self.arrays["check.img2lidar"]

    def check_outputs(self) -> list[np.ndarray]:
        return [self.arrays[f"check.out{i}"] for i in range(self.meta["check_outputs"])]


def check_images(meta: dict) -> np.ndarray:
    """The reference evaluation's images (1, N, 3, H, W): standard normal from the seed in `meta`
    (regenerated instead of stored: they would be most of the file)."""
    rng = np.random.default_rng(meta["check_seed"])
    return rng.standard_normal((1, meta["num_cameras"], 3, *meta["image_hw"])).astype(np.float32)


def read_qfpe_weights(path: Path) -> QfpeWeights:
    """Read a QFPE weights file; anything else (a PyTorch checkpoint, a pickle) is refused unread."""
    what = f"qfpe: {path} is not a QFPE weights file (.npz from onnxq_models.petr_export.write_qfpe_weights)"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile) or "meta" not in archive.files:
                raise OnnxqError(what)
            meta = json.loads(str(archive["meta"]))
            if meta.get("format") != FORMAT:
                raise OnnxqError(what)
            if meta.get("version") != VERSION:
                raise OnnxqError(f"qfpe: {path} has format version {meta.get('version')}; this onnxq reads version {VERSION}")
            arrays = {name: archive[name] for name in archive.files if name != "meta"}
    except OnnxqError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise OnnxqError(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    bad = [name for name, array in arrays.items() if not isinstance(array, np.ndarray) or array.dtype.hasobject]
    if bad:
        raise OnnxqError(f"{what}: member {bad[0]!r} is not a numeric array")
    problem = _layout_problem(meta, arrays)
    if problem:
        raise OnnxqError(f"{what}: {problem}")
    return QfpeWeights(Path(path), meta, arrays)


def _layout_problem(meta: dict, arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a file's tables (so that a damaged file fails here, in one line), or None."""
    ints = lambda v, n: isinstance(v, list) and len(v) == n and all(isinstance(x, int) for x in v)
    if not isinstance(meta.get("pe_type"), str) or not ints(meta.get("feat_hw"), 2) or not ints(meta.get("image_hw"), 2) \
            or not isinstance(meta.get("embed_dims"), int) or not isinstance(meta.get("num_cameras"), int):
        return "its configuration (pe_type, feat_hw, image_hw, embed_dims, num_cameras) is incomplete"
    if not isinstance(meta.get("nodes"), dict) or not isinstance(meta.get("initializers"), dict):
        return "it has no weight tables"
    keys = list(meta["initializers"].values())
    for entry in meta["nodes"].values():
        if not isinstance(entry, dict) or not isinstance(entry.get("inputs"), dict) or "op_type" not in entry:
            return "a node entry of its weight table is malformed"
        keys += entry["inputs"].values()
    if not all(isinstance(k, str) for k in keys):
        return "its weight tables name arrays by something other than strings"
    keys = set(keys)
    if meta["pe_type"] == "qfpe":
        keys.update(f"pe.{name}" for name in PE_ARRAYS)
    if "check_seed" in meta:
        keys.update(["check.img2lidar", "check.pe", *(f"check.out{i}" for i in range(int(meta.get("check_outputs", 0))))])
    missing = sorted(k for k in keys if k not in arrays)
    return f"it lacks the arrays {missing[:3]}" if missing else None


def write_qfpe_weights_file(path: str | Path, config: dict, pe: dict[str, np.ndarray], reference: ir.Model,
                            check: dict | None = None) -> Path:
    """Write a QFPE weights file. `config`: pe_type, num_cameras, image_hw, feat_hw, embed_dims;
    `pe`: the PE_ARRAYS (empty for a non-QFPE model, which the pass then refuses); `reference`: the
    model's form-A export; `check`: seed, img2lidar, pe and outputs (list) of a reference evaluation."""
    arrays: dict[str, np.ndarray] = {f"pe.{name}": np.asarray(pe[name], dtype=np.float32) for name in PE_ARRAYS if name in pe}
    keys: dict[int, str] = {}

    def key_of(value: ir.Value) -> str:  # each constant once, however many slots read it
        if id(value) not in keys:
            keys[id(value)] = f"w.{len(keys)}"
            arrays[keys[id(value)]] = const_array(value)
        return keys[id(value)]

    nodes: dict[str, dict] = {}
    for node in reference.graph:
        # only scoped names carry the module path; unscoped ones (Identity_84) are export counters
        if node.name and node.name.startswith("/"):
            slots = {str(i): key_of(v) for i, v in enumerate(node.inputs) if is_const(v)}
            nodes[node.name] = {"op_type": node.op_type, "inputs": slots}
    initializers = {name: key_of(value) for name, value in reference.graph.initializers.items()
                    if not name.startswith("onnx::") and value.const_value is not None}
    meta = {"format": FORMAT, "version": VERSION, **config, "nodes": nodes, "initializers": initializers}
    if check is not None:
        meta["check_seed"] = int(check["seed"])
        meta["check_outputs"] = len(check["outputs"])
        arrays["check.img2lidar"] = np.asarray(check["img2lidar"], dtype=np.float32)
        if "pe" in check:
            arrays["check.pe"] = np.asarray(check["pe"], dtype=np.float32)
        for i, out in enumerate(check["outputs"]):
            arrays[f"check.out{i}"] = np.asarray(out, dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to another suffix
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    return path
