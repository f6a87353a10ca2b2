"""PETR position-embedding passes: recognition (both export forms), pe_fold exactness, the QFPE swap
against the PyTorch module and model, and the PETR recipes end to end (small models, CPU)."""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import onnxq
from conftest import assert_lint_clean, rel_change, run
from onnxq.analysis.petr_pe import find_pe
from onnxq.errors import OnnxqError
from onnxq.ir.modelio import load_model
from onnxq.pipeline import load_recipe
from onnxq.pipeline.recipes import with_options
from onnxq.runtime.session import session
from onnxq_models import petr, petr_data, petr_export

SMALL_RIG = petr_data.CameraRig(image_hw=(64, 176))
CANONICAL = ["lift_constants", "fold_constants", {"upgrade_opset": {"opset": 19}}, "fold_batchnorm"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def small_model(seed=0, **overrides) -> petr.PETR:
    """PETR-tiny shrunk for tests: 64×176 images (4×11 features), 8 depth bins, 2 layers, 20 queries."""
    values = {"image_hw": (64, 176), "backbone_channels": (8, 8, 16, 16), "embed_dims": 32, "num_heads": 4, "ffn_dims": 64,
                  "num_layers": 2, "num_queries": 20, "depth_num": 8, "qfpe_anchor_dims": 8}
    values.update(overrides)
    torch.manual_seed(seed)
    model = petr.PETR(petr.PETRConfig(**values)).eval()
    with torch.no_grad():  # a PE an order of magnitude above the features, as in the trained model
        model.position_embedding.encoder[2].weight.mul_(8.0)
    return model


def export(model, tmp_path, form, name="petr.onnx") -> Path:
    return petr_export.export_onnx(model, tmp_path / name, form, rig=SMALL_RIG)


def feeds(model, form, n=4, seed=0, rig=SMALL_RIG) -> dict[str, np.ndarray]:
    """n scenes stacked: random images and the rig's img2lidar or pos_embed."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, model.cfg.num_cameras, 3, *model.cfg.image_hw)).astype(np.float32)
    inv = petr_export.rig_img2lidar(rig)
    second = inv if form == "in_graph" else petr_export.compute_pos_embed(model, inv)
    key = "img2lidar" if form == "in_graph" else "pos_embed"
    return {"images": images, key: np.repeat(second, n, axis=0)}


def outputs(path_or_proto, feed) -> list[np.ndarray]:
    sess = session(path_or_proto if isinstance(path_or_proto, (str, Path)) else load_model(path_or_proto))
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})


def one(feed, i=0):
    return {k: v[i:i + 1] for k, v in feed.items()}


# --- recognition ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pe_type", ["lid", "qfpe"])
@pytest.mark.parametrize("form", ["in_graph", "input"])
def test_pe_is_recognised_in_both_export_forms(tmp_path, pe_type, form):
    model = small_model(pe_type=pe_type)
    site = find_pe(load_model(str(export(model, tmp_path, form))))
    assert site.form == form
    assert site.pe_type == (pe_type if form == "in_graph" else None)
    assert site.source.name == ("img2lidar" if form == "in_graph" else "pos_embed")
    assert not site.gated
    # the exporter merges the layers' identical Add(memory, pe) into one node feeding every k_proj
    assert len(site.adds) == 1 and site.adds[0].add.name.endswith("cross_attn/Add_1")
    projections = site.key_projections
    assert len(projections) == model.cfg.num_layers
    assert all("k_proj" in k.node.name and k.bias_node is not None for k in projections)
    if form == "in_graph":
        assert [n.op_type for n in site.encoder] == ["Conv", "Relu", "Conv"]
        ops = {n.op_type for n in site.nodes}
        assert ("Log" in ops) == (pe_type == "lid")  # inverse sigmoid only in PETR's LID PE


def test_pe_is_recognised_after_canonicalisation(tmp_path):
    model = small_model()
    path = export(model, tmp_path, "in_graph")
    proto = onnxq.quantize(str(path), feeds(model, "in_graph", 1), recipe=CANONICAL, show_progress=False, log=lambda *a: None)
    site = find_pe(load_model(proto))
    assert site.pe_type == "lid" and len(site.key_projections) == 2


@pytest.mark.parametrize("form", ["in_graph", "input"])
def test_feature_gated_pe_is_recognised_and_not_folded(tmp_path, form):
    model = small_model(feature_guided_pe=True)
    path = export(model, tmp_path, form)
    site = find_pe(load_model(str(path)))
    assert site.gated and site.gate.op_type == "Mul"
    with pytest.raises(OnnxqError, match="gate"):
        onnxq.quantize(str(path), feeds(model, form, 1), recipe=CANONICAL + ["pe_fold"], show_progress=False,
                       log=lambda *a: None)


def test_no_pe_is_a_clear_error(tmp_path):
    from builders import attention_model

    with pytest.raises(OnnxqError, match="no PETR position embedding"):
        find_pe(load_model(attention_model()))


def test_petr_pe_pass_reports_and_tags(tmp_path):
    model = small_model()
    path = export(model, tmp_path, "in_graph")
    proto = onnxq.quantize(str(path), feeds(model, "in_graph", 1), recipe=["petr_pe"], show_progress=False,
                           log=lambda *a: None)
    tagged = [n for n in proto.graph.node if any(p.key == "onnxq.petr_pe" for p in n.metadata_props)]
    assert any(n.op_type == "Log" for n in tagged) and any(n.name.endswith("cross_attn/Add_1") for n in tagged)


# --- pe_fold ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pe_type", ["lid", "qfpe"])
@pytest.mark.parametrize("form", ["in_graph", "input"])
def test_pe_fold_is_exact_and_removes_the_pe_input(tmp_path, pe_type, form):
    model = small_model(pe_type=pe_type)
    path = export(model, tmp_path, form)
    data = feeds(model, form, 4)
    # the pipeline itself verifies exact passes on the first calibration sample (1e-4 relative)
    proto = onnxq.quantize(str(path), data, recipe=CANONICAL + ["pe_fold"], show_progress=False, log=lambda *a: None)
    source = "img2lidar" if form == "in_graph" else "pos_embed"
    assert [i.name for i in proto.graph.input] == ["images"]
    graph = load_model(proto).graph
    ops = {n.op_type for n in graph}
    assert "Log" not in ops and not any("position_embedding" in (n.name or "") for n in graph)
    for node in graph:  # every key projection reads the image features, its bias holds the PE
        if "cross_attn/k_proj/MatMul" in (node.name or ""):
            assert node.outputs[0].name.endswith("_pe_folded")
            assert node.inputs[0].producer().op_type != "Add"
    record = [p for p in proto.metadata_props if p.key.startswith("onnxq.pass.") and p.key.endswith("pe_fold")]
    assert f"input_removed={source}" in record[0].value
    for i in range(4):  # exact on every scene, not only the verified one
        for ref, got in zip(outputs(path, one(data, i)), outputs(proto, one(data, i))):
            assert rel_change(ref, got) < 1e-5


def test_pe_fold_refuses_calibration_from_several_rigs(tmp_path):
    model = small_model()
    path = export(model, tmp_path, "in_graph")
    data = feeds(model, "in_graph", 3)
    other = petr_data.CameraRig(image_hw=(64, 176), horizon_row_frac=0.45)
    data["img2lidar"][2] = petr_export.rig_img2lidar(other)[0]
    with pytest.raises(OnnxqError, match="sample 2 has different camera matrices"):
        onnxq.quantize(str(path), data, recipe=CANONICAL + ["pe_fold"], show_progress=False, log=lambda *a: None)


def test_pe_fold_takes_the_rig_from_a_file(tmp_path):
    model = small_model()
    path = export(model, tmp_path, "in_graph")
    rig_file = tmp_path / "rig.npy"
    np.save(rig_file, petr_export.rig_img2lidar(SMALL_RIG)[0])  # (N, 4, 4): the batch axis is added
    data = feeds(model, "in_graph", 2)
    proto = onnxq.quantize(str(path), data, recipe=CANONICAL + [{"pe_fold": {"rig": str(rig_file)}}],
                           show_progress=False, log=lambda *a: None)
    assert rel_change(outputs(path, one(data))[0], outputs(proto, one(data))[0]) < 1e-5
    np.save(rig_file, petr_export.rig_img2lidar(petr_data.CameraRig(image_hw=(64, 176), horizon_row_frac=0.45))[0])
    with pytest.raises(OnnxqError, match=f"different camera matrices .* than {rig_file}"):
        onnxq.quantize(str(path), data, recipe=CANONICAL + [{"pe_fold": {"rig": str(rig_file)}}],
                       show_progress=False, log=lambda *a: None)


def test_pe_fold_takes_the_pe_out_of_the_quantized_key_input(tmp_path):
    """Per-tensor INT8 at the key projections: with the PE folded, its input scale is the features' own."""
    model = small_model()
    path = export(model, tmp_path, "input")
    data = feeds(model, "input", 4)
    scales = {}
    for name, recipe in [("naive", CANONICAL), ("folded", CANONICAL + ["pe_fold"])]:
        proto = onnxq.quantize(str(path), data, recipe=recipe + [{"quantize": {"weights": "per-tensor"}}],
                               show_progress=False, log=lambda *a: None)
        assert_lint_clean(proto)
        graph = load_model(proto).graph
        k_proj = next(n for n in graph if (n.name or "").endswith("layers.0/cross_attn/k_proj/MatMul"))
        dq = k_proj.inputs[0].producer()
        assert dq.op_type == "DequantizeLinear"
        scales[name] = float(dq.inputs[1].const_value.numpy())
    assert scales["folded"] < scales["naive"] / 3


# --- qfpe -------------------------------------------------------------------------------------------


def random_rigs(n, seed=0) -> np.ndarray:
    """(n, N, 4, 4) img2lidar of the small rig with the cameras moved and turned a little."""
    rng = np.random.default_rng(seed)
    cams = []
    for _ in range(n):
        cameras = tuple(petr_data.Camera(c.name, c.yaw_deg + rng.uniform(-5, 5),
                                         tuple(np.array(c.position) + rng.uniform(-0.3, 0.3, 3)), c.hfov_deg)
                        for c in petr_data.NUSCENES_LIKE_CAMERAS)
        cams.append(petr_data.CameraRig(cameras, image_hw=(64, 176)).img2lidar())
    return np.stack(cams).astype(np.float32)


@pytest.mark.parametrize("float_geometry", [True, False])
def test_qfpe_subgraph_matches_the_pytorch_module(float_geometry):
    from onnxq.passes.petr.qfpe import qfpe_pe_model

    model = small_model(pe_type="qfpe")
    with torch.no_grad():  # trained-looking anchors (init is uniform ±0.5)
        model.position_embedding.anchors.mul_(3.0)
    inv = random_rigs(2)
    proto = onnx_model(qfpe_pe_model(petr_export.qfpe_parameters(model), model.cfg.num_cameras, float_geometry, batch=2))
    got = run(proto, {"img2lidar": inv})[0]
    with torch.no_grad():
        ref = model.position_embed(torch.from_numpy(inv)).flatten(0, 1).numpy()
    assert got.shape == ref.shape == (2 * 6, 32, 4, 11)
    assert rel_change(ref, got) < 1e-5
    # float geometry: the ray projection and anchor interpolation are elementwise, which INT8 quantizers
    # leave in float; only the encoder's two 1×1 convs carry weights to quantize
    weighted = sorted(n.op_type for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "Conv"))
    assert weighted == (["Conv", "Conv"] if float_geometry else ["Conv", "Conv", "MatMul", "MatMul", "MatMul", "MatMul"])


def onnx_model(ir_model) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.to_proto(ir_model)


def test_qfpe_pass_reproduces_the_fine_tuned_qfpe_model(tmp_path):
    lid = small_model(seed=0)
    qfpe = small_model(seed=1, pe_type="qfpe")  # "fine-tuned": every weight differs from the LID model
    checkpoint = petr_export.write_qfpe_weights(qfpe, tmp_path / "qfpe.npz")
    path = export(lid, tmp_path, "in_graph")
    data = feeds(lid, "in_graph", 3)
    proto = onnxq.quantize(str(path), data, recipe=[{"qfpe": {"checkpoint": str(checkpoint)}}], show_progress=False,
                           log=lambda *a: None)
    ops = {n.op_type for n in proto.graph.node}
    assert "Log" not in ops and "Abs" in ops
    record = next(p.value for p in proto.metadata_props if p.key.endswith(".qfpe"))
    assert "pe_replaced=lid -> qfpe" in record and "pe_vs_pytorch_rel" in record and "model_vs_pytorch_rel" in record
    reference = export(qfpe, tmp_path, "in_graph", name="qfpe.onnx")
    for i in range(3):
        for ref, got in zip(outputs(reference, one(data, i)), outputs(proto, one(data, i))):
            assert rel_change(ref, got) < 1e-4
    # changed tensors carry the suffix; the interface keeps its names
    names = {o for n in proto.graph.node for o in n.output}
    assert any(n.endswith("_qfpe") for n in names)
    assert [o.name for o in proto.graph.output] == ["cls_logits", "boxes"]


def test_qfpe_pass_refuses_a_lid_checkpoint(tmp_path):
    lid = small_model()
    checkpoint = petr_export.write_qfpe_weights(lid, tmp_path / "lid.npz")
    path = export(lid, tmp_path, "in_graph")
    with pytest.raises(OnnxqError, match="'lid' checkpoint"):
        onnxq.quantize(str(path), feeds(lid, "in_graph", 1), recipe=[{"qfpe": {"checkpoint": str(checkpoint)}}],
                       show_progress=False, log=lambda *a: None)


def test_qfpe_pass_refuses_a_checkpoint_of_another_shape(tmp_path):
    lid = small_model()
    other = small_model(pe_type="qfpe", ffn_dims=48)
    checkpoint = petr_export.write_qfpe_weights(other, tmp_path / "other.npz")
    with pytest.raises(OnnxqError, match="does not fit"):
        onnxq.quantize(str(export(lid, tmp_path, "in_graph")), feeds(lid, "in_graph", 1),
                       recipe=[{"qfpe": {"checkpoint": str(checkpoint)}}], show_progress=False, log=lambda *a: None)


# --- recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["petr-w8a8", "petr-w8a8-pe-fold", "petr-full-int8"])
def test_petr_recipes_run(tmp_path, recipe):
    lid = small_model()
    qfpe = small_model(seed=1, pe_type="qfpe")
    checkpoint = petr_export.write_qfpe_weights(qfpe, tmp_path / "qfpe.npz")
    _, passes = load_recipe(recipe)
    # the built-in recipes name the shipped full-size weights
    passes = [with_options(step, checkpoint=str(checkpoint)) if step.name == "qfpe" else step for step in passes]
    path = export(lid, tmp_path, "in_graph")
    data = feeds(lid, "in_graph", 4)
    proto = onnxq.quantize(str(path), data, recipe=passes, per_tensor=True, show_progress=False, log=lambda *a: None)
    # TensorRT lint: clean; the attention products the recipes keep in float on purpose only warn (R8b)
    from onnxq.quant.lint import lint

    excluded = [re.compile(pattern) for pattern in next(p for p in passes if p.name == "quantize").exclude]
    results = {r.rule: r for r in lint(load_model(proto))}
    assert all(r.status != "FAIL" for r in results.values()), [(r.rule, r.violations[:2]) for r in results.values()
                                                               if r.status == "FAIL"]
    assert results["R8b"].status == "warn"
    assert all(any(x.fullmatch(v.split("'")[1]) for x in excluded) for v in results["R8b"].violations), \
        results["R8b"].violations[:3]
    got = outputs(proto, one(data))
    assert all(np.isfinite(g).all() for g in got)
    ops = {n.op_type for n in proto.graph.node}
    assert "Log" not in ops and "QuantizeLinear" in ops
    if recipe == "petr-full-int8":
        assert not ops & {"Softmax", "Sigmoid", "Exp", "LayerNormalization"}
