"""ONNX export of PETR-tiny, with the position embedding inside the graph or as a graph input.

Two forms, for either PE type (LID or QFPE), legacy exporter, opset 17, batch 1, static shapes:

* ``in_graph`` (form A): inputs ``images`` (1, N, 3, H, W) and ``img2lidar`` (1, N, 4, 4). The PE
  subgraph is in the graph. img2lidar = inverse(lidar2img) is computed by the caller on the host, as
  PETR itself does (np.linalg.inv on img_metas), and because aten::linalg_inv has no ONNX export at
  opset 17. For the LID PE the subgraph reads
  MatMul(frustum const (W·H·D, 4), Transpose(img2lidar)) -> Slice[:3] -> Sub(range_min) -> Div(range_span)
  -> Reshape/Transpose to (N, 3·D, H, W) -> Clip(0, 1) -> {Clip(min=1e-5); Sub(1, ·) -> Clip(min=1e-5)}
  -> Div -> Log -> Conv 1×1 (3·D -> 4E) -> Relu -> Conv 1×1 (4E -> E) -> Reshape/Transpose to tokens.
  For QFPE: MatMul(ray points const (H·W, 4), Transpose(img2lidar)) -> Slice -> Sub -> Div -> Clip(0, 1)
  -> Mul(n_anchors - 1) -> Sub(anchor positions) -> Abs -> Sub(1, ·) -> Relu (the interpolation weights)
  -> per axis Gather(axis) -> MatMul(anchor table) -> Concat -> Reshape/Transpose -> Conv -> Relu -> Conv.
* ``input`` (form B): inputs ``images`` and ``pos_embed`` (1, N, E, H, W), the PE computed outside
  (NVIDIA's petr-trt moves it out of the engine the same way); see `compute_pos_embed`.

In both, the cross-attention keys of every decoder layer are MatMul(Add(memory, pe), k_proj weight) + bias
and the values MatMul(memory, v_proj weight): the place where the PE meets the image features. The
three layers' Add(memory, pe) are identical, and the exporter merges them: one Add (named
/model/layers.0/cross_attn/Add_1) feeds the k_proj MatMul of all layers, its inputs the token-major
memory and PE (Reshape/Transpose of the (1, N, E, H, W) maps). Node names keep the module path. Outputs:
``cls_logits`` (1, Q, C) and ``boxes`` (1, Q, 8) = (x, y, z, w, l, h, sin yaw, cos yaw) of the last layer.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxq_models.petr import PETR, metric_boxes
from onnxq_models.petr_data import CameraRig

PE_FORMS = ("in_graph", "input")
IMAGES, IMG2LIDAR, POS_EMBED = "images", "img2lidar", "pos_embed"
CLS_LOGITS, BOXES = "cls_logits", "boxes"
OPSET = 17


class _ExportWrapper(nn.Module):
    """The model with its query geometry (a function of weights only) frozen into buffers, so that
    the graph holds it as constants instead of the sine embedding and MLP that produce it."""

    def __init__(self, model: PETR):
        super().__init__()
        self.model = model
        with torch.no_grad():
            query_pos, reference_logit = model.query_geometry()
        self.register_buffer("query_pos", query_pos.clone())
        self.register_buffer("reference_logit", reference_logit.clone())


class InGraphPE(_ExportWrapper):
    """Form A: (images, img2lidar) -> (cls_logits, boxes) of the last decoder layer."""

    def forward(self, images: torch.Tensor, img2lidar: torch.Tensor):
        logits, regs = self.model(images, img2lidar, False, (self.query_pos, self.reference_logit))
        return logits, metric_boxes(regs)


class PEInput(_ExportWrapper):
    """Form B: (images, pos_embed) -> (cls_logits, boxes) of the last decoder layer."""

    def forward(self, images: torch.Tensor, pos_embed: torch.Tensor):
        logits, regs = self.model.forward_with_pe(images, pos_embed, False, (self.query_pos, self.reference_logit))
        return logits, metric_boxes(regs)


def rig_img2lidar(rig: CameraRig | None = None) -> np.ndarray:
    """The graph input img2lidar (1, N, 4, 4) float32 for a rig (inverse of lidar2img in float64)."""
    return (rig or CameraRig()).img2lidar().astype(np.float32)[None]


@torch.no_grad()
def compute_pos_embed(model: PETR, img2lidar: np.ndarray) -> np.ndarray:
    """The form-B input pos_embed (1, N, E, H, W) float32: the model's PE for this calibration."""
    model.eval()
    return model.position_embed(torch.as_tensor(img2lidar, dtype=torch.float32)).numpy()


def example_inputs(model: PETR, pe_form: str, images: np.ndarray | None = None,
                   rig: CameraRig | None = None) -> dict[str, np.ndarray]:
    """Named graph inputs for one scene: normalised images (1, N, 3, H, W) (zeros if not given) and
    img2lidar or pos_embed for the rig."""
    cfg = model.cfg
    if images is None:
        images = np.zeros((1, cfg.num_cameras, 3, *cfg.image_hw), dtype=np.float32)
    img2lidar = rig_img2lidar(rig)
    second = {IMG2LIDAR: img2lidar} if pe_form == "in_graph" else {POS_EMBED: compute_pos_embed(model, img2lidar)}
    return {IMAGES: np.asarray(images, dtype=np.float32), **second}


def export_onnx(model: PETR, path: str | Path, pe_form: str = "in_graph", rig: CameraRig | None = None) -> Path:
    """Export `model` (put in eval mode) in form `pe_form` ("in_graph" or "input") to `path`."""
    if pe_form not in PE_FORMS:
        raise ValueError(f"pe_form must be one of {PE_FORMS}, not {pe_form!r}")
    model.eval()
    # The wrapper must be in eval mode too: the exporter restores the wrapper's mode afterwards, and a
    # wrapper left in training mode would switch the model's BatchNorm layers to training with it.
    wrapper = (InGraphPE(model) if pe_form == "in_graph" else PEInput(model)).eval()
    inputs = example_inputs(model, pe_form, rig=rig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(wrapper, tuple(torch.from_numpy(v) for v in inputs.values()), str(path),
                          input_names=list(inputs), output_names=[CLS_LOGITS, BOXES], opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return path


def qfpe_parameters(model: PETR) -> dict[str, np.ndarray]:
    """The arrays the QFPE subgraph is authored from (onnxq.passes.petr.qfpe_data.PE_ARRAYS), from a
    PETR model with a QFPE position embedding."""
    pe = model.position_embedding
    get = lambda t: t.detach().cpu().numpy().astype(np.float32)
    return {"ray_points": get(pe.ray_points), "range_min": get(pe.range_min), "range_span": get(pe.range_span),
            "anchor_positions": get(pe.anchor_positions), "anchors": get(pe.anchors),
            "w1": get(pe.encoder[0].weight), "b1": get(pe.encoder[0].bias),
            "w2": get(pe.encoder[2].weight), "b2": get(pe.encoder[2].bias),
            "feat_hw": np.array(model.cfg.feat_hw)}


@torch.no_grad()
def write_qfpe_weights(model: PETR, path: str | Path, check_seed: int = 0) -> Path:
    """Write the weights file the `qfpe` pass reads (plain arrays in an .npz, no pickle): the QFPE
    arrays, every constant of the model's form-A export, and one reference evaluation (the default rig
    for the model's image size, standard-normal images from `check_seed`) the pass checks its result
    against. A LID model's file is written too (without QFPE arrays); the pass refuses it."""
    from onnxq.ir.modelio import load_model
    from onnxq.passes.petr.qfpe_data import check_images, write_qfpe_weights_file

    model.eval()
    cfg = model.cfg
    config = {"pe_type": cfg.pe_type, "num_cameras": cfg.num_cameras, "image_hw": list(cfg.image_hw),
              "feat_hw": list(cfg.feat_hw), "embed_dims": cfg.embed_dims}
    with tempfile.TemporaryDirectory(prefix="onnxq-qfpe-") as tmp:
        reference = load_model(str(export_onnx(model, Path(tmp) / "reference.onnx", "in_graph")))
    img2lidar = rig_img2lidar(CameraRig(image_hw=cfg.image_hw))
    images = check_images({"check_seed": check_seed, **config})
    inv = torch.from_numpy(img2lidar)
    logits, regs = model(torch.from_numpy(images), inv, all_layers=False)
    check = {"seed": check_seed, "img2lidar": img2lidar, "pe": model.position_embed(inv).flatten(0, 1).numpy(),
             "outputs": [logits.numpy(), metric_boxes(regs).numpy()]}
    pe = {k: v for k, v in qfpe_parameters(model).items() if k != "feat_hw"} if cfg.pe_type == "qfpe" else {}
    return write_qfpe_weights_file(path, config, pe, reference, check)
