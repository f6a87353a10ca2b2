"""Mixture-of-experts LMs: recognition of router and experts, exact stream rotation through the experts and
the position table, and AGQ's gate-weighted Hessians."""

import numpy as np
import onnx_ir as ir
import pytest

from conftest import assert_lint_clean, rel_change, run

torch = pytest.importorskip("torch")
moe_lm = pytest.importorskip("onnxq_models.moe_lm")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A random 2-layer top-2-of-4 MoE LM (dynamic sequence length) and a calibration set of its inputs."""
    torch.manual_seed(0)
    config = moe_lm.MoEConfig(vocab=32, dim=16, layers=2, heads=2, experts=4, top_k=2, expert_ffn=8, seq_len=32)
    module = moe_lm.build(config).eval()
    with torch.no_grad():
        module.position.normal_(0, 0.5)  # a position table that matters, so rotating it wrongly shows
    path = moe_lm.export_onnx(module, tmp_path_factory.mktemp("moe") / "moe.onnx")
    ids = np.random.default_rng(0).integers(0, 32, (8, 24))
    return path, {"input_ids": ids}


def test_router_experts_and_stream_are_recognised(tiny_moe):
    from onnxq.analysis.structure import analyse

    s = analyse(ir.load(str(tiny_moe[0])))
    assert len(s.moes) == 2 and all(len(m.experts) == 4 and m.top_k == 2 for m in s.moes)
    assert all(e.mlp.kind == "swiglu" for m in s.moes for e in m.experts)
    downs = {e.mlp.down.node for m in s.moes for e in m.experts}
    assert downs <= {w.node for w in s.stream.writers}  # every expert writes the residual stream
    assert s.stream.rotatable and len(s.stream.position_tables) == 1
    assert {m.router.node for m in s.moes} <= {r.node for r in s.stream.readers}


def test_rotation_through_experts_and_position_table_is_exact(tiny_moe):
    from onnxq.pipeline import PassContext, load_recipe, run_pipeline
    from onnxq.stats.calib_data import load_calibration

    path, feed = tiny_moe
    model = ir.load(str(path))
    _, passes = load_recipe(["lift_constants", "fold_constants", "fold_norm", "rotate"])
    records = run_pipeline(model, passes, PassContext(calibration=load_calibration(feed, model, batch_size=4),
                                                      show_progress=False, log=lambda *_: None))
    rotate = next(r for r in records if r.name == "rotate")
    assert rotate.summary["residual"].startswith("rotated")
    assert rotate.max_rel_change is not None and rotate.max_rel_change < 1e-4  # the pipeline's own check
    other = {"input_ids": np.random.default_rng(5).integers(0, 32, (3, 17))}  # another length, other tokens
    assert rel_change(run(path, other)[0], run(ir.to_proto(model), other)[0]) < 1e-4
    # the rotation really moved the stream: the position table is no longer the original one
    tables = [v for v in model.graph.initializers.values() if v.const_value is not None and v.shape == [32, 16]]
    original = ir.load(str(path)).graph.initializers["position"].const_value.numpy()
    assert tables and not any(np.allclose(t.const_value.numpy(), original) for t in tables)


def test_expert_gates_cover_every_expert_layer_also_after_split_range(tiny_moe):
    from onnxq.analysis.moe import expert_gates
    from onnxq.pipeline import PassContext, load_recipe, run_pipeline
    from onnxq.stats.calib_data import load_calibration

    path, feed = tiny_moe
    model = ir.load(str(path))

    def run_steps(steps):
        _, passes = load_recipe(steps)
        run_pipeline(model, passes, PassContext(calibration=load_calibration(feed, model, batch_size=4),
                                                show_progress=False, log=lambda *_: None))

    run_steps(["lift_constants", "fold_constants"])  # (these name the exporter's anonymous nodes)
    gates = expert_gates(model)
    assert len(gates) == 2 * 4 * 3  # gate, up, down of every expert
    assert len(set(gates.values())) == 8  # one gate tensor per expert
    # split_range cuts down projections into several MatMuls sharing one weight: each part is the expert's
    before = {n.name for n in model.graph if n.op_type == "MatMul"}
    run_steps([{"split_range": {"down_percentile": 90.0, "down_ratio": 2, "outlier_margin": 1}}])
    split = expert_gates(model)
    parts = {n.name: n.name.split("_inliers")[0] for n in model.graph if n.op_type == "MatMul" and n.name not in before}
    expert_parts = {name for name, origin in parts.items() if origin in gates}
    assert expert_parts and all(split[name] == gates[parts[name]] for name in expert_parts)  # each part, its expert
    assert set(split.values()) == set(gates.values())


def test_agq_hessian_weights_each_row_by_the_gate(tiny_moe):
    from onnxq.analysis.moe import expert_gates
    from onnxq.quant.gptq import HessianObserver
    from onnxq.runtime.session import exposing, session

    path, feed = tiny_moe
    model = ir.load(str(path))
    gates = expert_gates(model)
    node = next(n for n in model.graph if n.name in gates)
    observer = HessianObserver({"w": [node]}, gates)
    names = [node.inputs[0].name, gates[node.name]]
    x, g = session(exposing(model, names)).run(names, feed)
    observer.update({node.inputs[0].name: x, gates[node.name]: g})
    h = observer.hessians({"w": [node]})["w"].total
    rows, weights = x.reshape(-1, x.shape[-1]).astype(np.float64), g.reshape(-1).astype(np.float64)
    expected = (rows * weights[:, None]).T @ rows
    assert np.allclose(h, expected, rtol=1e-4, atol=1e-5)
    assert (weights == 0).any() and (weights > 0).any()  # routed and unrouted tokens both present


def test_agq_quantizes_the_moe_and_needs_one(tiny_moe, tmp_path):
    import onnxq
    from onnxq.errors import OnnxqError

    path, feed = tiny_moe
    out = tmp_path / "agq.onnx"
    onnxq.quantize(str(path), feed, output=str(out), recipe="transformer-w8a8", agq=True, batch_size=4,
                   show_progress=False, log=lambda *_: None)
    assert_lint_clean(str(out))
    reference, quantized = run(path, feed)[0], run(out, feed)[0]
    assert rel_change(reference, quantized) < 0.2
    assert np.isfinite(quantized).all()
    with pytest.raises(OnnxqError, match="rounding 'nearest' has none"):
        onnxq.quantize(str(path), feed, recipe="transformer-w4a8", rounding="nearest", agq=True,
                       show_progress=False, log=lambda *_: None)


def test_agq_on_a_model_without_experts_says_so(tmp_path):
    import onnxq
    from onnxq.errors import OnnxqError

    torch.manual_seed(0)
    dense = moe_lm.build(moe_lm.MoEConfig(vocab=32, dim=16, layers=1, heads=2, experts=0, expert_ffn=8, seq_len=16))
    path = moe_lm.export_onnx(dense.eval(), tmp_path / "dense.onnx")
    feed = {"input_ids": np.random.default_rng(1).integers(0, 32, (4, 16))}
    with pytest.raises(OnnxqError, match="no mixture-of-experts layer"):
        onnxq.quantize(str(path), feed, recipe="transformer-w4a8", agq=True, show_progress=False, log=lambda *_: None)
