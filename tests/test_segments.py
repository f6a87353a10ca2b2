"""Running a model in segments (onnxq.runtime.segments): the same tensors as the whole graph, every
statistic the same through the statistics service, and a whole recipe's output unchanged."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION
from conftest import run
from onnxq.api import quantize
from onnxq.ir.checks import infer_shapes
from onnxq.ir.modelio import load_model
from onnxq.runtime import segments
from onnxq.runtime.segments import SegmentedModel, worth_segmenting
from onnxq.runtime.session import exposing, session
from onnxq.stats.observers import BatchValues, Ranges
from onnxq.stats.service import StatisticsService
from transformer_builders import export, feeds_for, tiny_llama

WIDTH = 32


def residual_stack(layers: int = 6) -> onnx.ModelProto:
    """h_{k+1} = h_k + relu(h_k·W_k)·V_k, plus a mask-like tensor m = x·0.5 that every layer reads, so the
    tensors crossing a cut are the stream and m."""
    rng = np.random.default_rng(0)
    nodes, inits = [helper.make_node("Mul", ["x", "half"], ["m"], name="mask")], [
        numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    h = "x"
    for k in range(layers):
        inits += [numpy_helper.from_array(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / 8, f"w{k}"),
                  numpy_helper.from_array(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / 8, f"v{k}")]
        nodes += [helper.make_node("MatMul", [h, f"w{k}"], [f"a{k}"], name=f"up{k}"),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}"),
                  helper.make_node("MatMul", [f"r{k}", f"v{k}"], [f"d{k}"], name=f"down{k}"),
                  helper.make_node("Add", [f"d{k}", "m"], [f"g{k}"], name=f"gate{k}"),
                  helper.make_node("Add", [h, f"g{k}"], [f"h{k}"], name=f"res{k}")]
        h = f"h{k}"
    graph = helper.make_graph(nodes, "residual_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["n", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def batches(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(8, WIDTH)).astype(np.float32)} for _ in range(n)]


def typed(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    infer_shapes(model)
    return model


ONE_LAYER = 2 * WIDTH * WIDTH * 4  # bytes of weights per layer


def test_segments_hand_on_only_the_tensors_that_cross_and_give_the_whole_graphs_values():
    model = typed(residual_stack())
    wanted = ["a0", "r2", "d5", "m"]
    split = SegmentedModel(model, wanted, budget_bytes=ONE_LAYER)
    assert len(split.segments) >= 6
    for segment in split.segments[1:]:
        assert set(segment.inputs) <= {"m"} | {f"h{k}" for k in range(6)} | {"x"}, segment.inputs
    got = split.collect(batches())
    whole = session(exposing(model, wanted))
    for feed, values in zip(batches(), got):
        for name, expected in zip(wanted, whole.run(wanted, feed)):
            np.testing.assert_allclose(values[name], expected, rtol=1e-6, atol=1e-6)


def test_nodes_stored_out_of_order_are_run_in_dependency_order():
    model = typed(residual_stack(3))
    proto = ir.to_proto(model)  # typed: value_info names every tensor's type
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[::-1])  # ORT sorts such graphs itself; a segment must not be cut from them
    split = SegmentedModel(model, ["h2"], budget_bytes=ONE_LAYER, proto=proto, weights={})
    np.testing.assert_allclose(split.collect(batches(1))[0]["h2"], run(residual_stack(3), batches(1)[0])[0], rtol=1e-6)


def test_the_service_serves_each_observer_the_same_statistics_in_segments():
    model = typed(residual_stack())

    def statistics(**segmenting):
        ranges, spanning = Ranges(["a0", "r3", "h5"]), BatchValues(["x", "a1", "d5"])  # spanning: first to last cut
        service = StatisticsService(model, batches(4), show_progress=False, **segmenting)
        service.register(ranges)
        service.register(spanning)
        service.run("test")
        return ranges, spanning

    whole_ranges, whole_values = statistics()
    split_ranges, split_values = statistics(segment_threshold=0, segment_budget=ONE_LAYER)
    for name in ["a0", "r3", "h5"]:
        assert split_ranges.result[name].lo == pytest.approx(whole_ranges.result[name].lo, rel=1e-6)
        assert split_ranges.result[name].hi == pytest.approx(whole_ranges.result[name].hi, rel=1e-6)
    assert len(split_values.result) == len(whole_values.result) == 4
    for split_batch, whole_batch in zip(split_values.result, whole_values.result):
        for name in ["x", "a1", "d5"]:
            np.testing.assert_allclose(split_batch[name], whole_batch[name], rtol=1e-6, atol=1e-6)


def test_hessians_collected_group_by_group_resume_where_the_last_group_stopped():
    """GPTQ's matrices in several budgeted groups: each group's run starts at the segment where the last
    one stopped (so all groups together cost about one pass), and the matrices are those of one pass."""
    from onnxq.quant.gptq import collect_hessians

    model = typed(residual_stack())
    nodes = {n.name: n for n in model.graph}
    readers = {f"{w}{k}": [nodes[f"{op}{k}"]] for k in range(6) for w, op in (("w", "up"), ("v", "down"))}
    data = batches(4)
    one_pass = collect_hessians(model, readers, data, show_progress=False)
    expected = {key: one_pass.pop(key) for key in readers}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segments, "SEGMENT_THRESHOLD_BYTES", 0)
        patch.setattr(segments, "SEGMENT_BUDGET_BYTES", ONE_LAYER)
        grouped = collect_hessians(model, readers, data, show_progress=False, budget_bytes=2 * 4 * WIDTH**2)
        assert len(grouped.groups) == 12
        starts = []
        for key in readers:
            got = grouped.pop(key)
            starts.append(grouped.resume.segment if grouped.resume is not None else None)
            np.testing.assert_allclose(got.fit, expected[key].fit, rtol=1e-5)
            np.testing.assert_allclose(got.check, expected[key].check, rtol=1e-5)
    assert grouped.passes == 12
    assert starts[:-1] == sorted(starts[:-1]) and starts[-2] >= 4, starts  # each run began further in


def test_small_models_and_control_flow_run_whole():
    small = typed(residual_stack())
    assert not worth_segmenting(small)  # 48 KiB of weights
    assert worth_segmenting(small, threshold_bytes=0)
    then_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    with_if = residual_stack(1)
    with_if.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    with_if.graph.node.append(helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=then_branch))
    assert not worth_segmenting(ir.from_proto(with_if), threshold_bytes=0)


def test_a_recipe_run_in_segments_gives_the_whole_graph_run_model(tmp_path, monkeypatch):
    """transformer-w8a8 on a tiny LLaMA: every statistic (smoothing, split thresholds, ranges, the auto
    calibrator's trials, GPTQ's Hessians, bias correction) and the exactness checks come from segments."""
    path = export(tiny_llama(layers=3), tmp_path / "llama.onnx", "llama")
    calib, probe = feeds_for("llama", 16, seed=1, seq=32), feeds_for("llama", 2, seed=5, seq=32)

    def quantized_outputs():
        result = quantize(load_model(path), calib, recipe="transformer-w8a8", show_progress=False, log=lambda *_: None)
        return session(result).run(None, probe)[0]

    whole = quantized_outputs()
    monkeypatch.setattr(segments, "SEGMENT_THRESHOLD_BYTES", 0)
    monkeypatch.setattr(segments, "SEGMENT_BUDGET_BYTES", 20_000)  # a few nodes' weights: dozens of segments
    split = quantized_outputs()
    assert np.abs(split - whole).max() <= 1e-5 * np.abs(whole).max()
