"""Several calibration batches in one ONNX Runtime run (onnxq.runtime.batch_groups): every batch gets the
tensors its own run would give, or grouping is not used."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxq.runtime.batch_groups import grouped_runs

D = 6


def _model(batch: str | int = "N", sequence_first: bool = False) -> onnx.ModelProto:
    """x (batch, 4, D) → MatMul → y; also the flattened (batch·4, D) product, a batch-independent table
    (Shape-free: a constant MatMul), and, if asked, y laid out sequence-first (4, batch, D)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Reshape", ["y", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["table_in", "w"], ["table"])]
    outputs = ["y", "flat", "table"]
    if sequence_first:
        nodes.append(helper.make_node("Transpose", ["y"], ["y_t"], perm=[1, 0, 2]))
        outputs.append("y_t")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, D])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(rng.normal(size=(D, D)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([-1, D], np.int64), "flat_shape"),
         numpy_helper.from_array(rng.normal(size=(3, D)).astype(np.float32), "table_in")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class CountingSession:
    """A real ORT session that counts its runs."""

    def __init__(self, model: onnx.ModelProto):
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.runs = 0

    def __call__(self, names, feed):
        self.runs += 1
        return self.session.run(list(names), feed)


def _batches(n: int, size: int = 1, seed: int = 1, lengths=None):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(size, (lengths or [4] * n)[i], D)).astype(np.float32)} for i in range(n)]


def _check_against_single_runs(model, batches, names):
    grouped = CountingSession(model)
    single = CountingSession(model)
    results = list(grouped_runs(grouped, names, batches))
    assert [r[0] for r in results] == batches  # every batch, in order, with its own feed
    for (feed, outputs) in results:
        for got, want in zip(outputs, single(names, feed)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return grouped.runs


def test_stacked_flattened_and_batch_independent_tensors_come_back_per_batch():
    batches = _batches(20)
    runs = _check_against_single_runs(_model(), batches, ["y", "flat", "table"])
    assert runs <= 4  # two single runs and the joint check, then the other 18 batches in one run


def test_a_tensor_laid_out_sequence_first_keeps_one_run_per_batch():
    batches = _batches(6)
    runs = _check_against_single_runs(_model(sequence_first=True), batches, ["y", "y_t"])
    assert runs == 6 + 1  # the joint check failed: no grouping


def test_a_graph_with_a_fixed_batch_size_keeps_one_run_per_batch():
    batches = _batches(5)
    assert _check_against_single_runs(_model(batch=1), batches, ["y", "flat"]) == 5 + 1


def test_batches_of_different_shapes_group_only_with_their_equals():
    lengths = [4, 4, 4, 4, 3, 3, 3, 4, 4]
    batches = _batches(len(lengths), lengths=lengths)
    model = _model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "S"
    runs = _check_against_single_runs(model, batches, ["y", "flat"])
    assert runs == 2 + 1 + 3  # 2 singles, the check, then runs of lengths 4·2, 3·3, 4·2


def test_mask_sized_values_do_not_make_a_wrong_layout_pass():
    """A sequence-first tensor that also holds float32's lowest value (an additive attention mask): the
    check compares the other entries at their own scale, so the wrong layout is still refused."""
    model = _model(sequence_first=True)
    mask = np.zeros((4, 1, D), np.float32)
    mask[0, 0, :2] = np.finfo(np.float32).min
    model.graph.initializer.append(numpy_helper.from_array(mask, "mask"))
    model.graph.node.append(helper.make_node("Add", ["y_t", "mask"], ["masked"]))
    model.graph.output.append(helper.make_tensor_value_info("masked", TensorProto.FLOAT, None))
    batches = _batches(5)
    assert _check_against_single_runs(model, batches, ["masked"]) == 5 + 1


def test_batches_that_fill_a_joint_run_alone_skip_the_check(monkeypatch):
    """With a budget that one batch's tensors half fill, grouping cannot gain: no joint check run is made
    (one run per batch, not three extra), and the outputs are the single runs'."""
    from onnxq.runtime import batch_groups

    batches = _batches(6, size=4)
    per_batch = sum(np.asarray(o).nbytes for o in CountingSession(_model())(["y", "flat"], batches[0]))
    monkeypatch.setattr(batch_groups, "GROUP_BYTES", 2 * per_batch - 1)
    assert _check_against_single_runs(_model(), batches, ["y", "flat"]) == 6
    monkeypatch.setattr(batch_groups, "GROUP_BYTES", 6 * per_batch)  # room: two alone, the joint check, four in one
    assert _check_against_single_runs(_model(), batches, ["y", "flat"]) == 4


def test_two_equal_first_batches_vouch_for_nothing():
    batches = _batches(6)
    batches[1] = {"x": batches[0]["x"].copy()}
    assert _check_against_single_runs(_model(sequence_first=True), batches, ["y_t"]) == 6


def test_a_graph_with_a_data_dependent_op_runs_batch_by_batch(monkeypatch):
    """NonZero's length depends on the values: the statistics service does not group such a graph."""
    from onnxq.ir.modelio import load_model
    from onnxq.stats import service

    model = _model()
    model.graph.node.append(helper.make_node("NonZero", ["y"], ["nz"]))
    model.graph.output.append(helper.make_tensor_value_info("nz", TensorProto.INT64, None))
    calls, seen = [], []

    def recording(run, names, batches, *, allowed=True):
        calls.append(allowed)
        return grouped_runs(run, names, batches, allowed=allowed)

    class Seen:
        names = ("y",)

        def update(self, values):
            seen.append(values["y"].shape)

    monkeypatch.setattr(service, "grouped_runs", recording)
    service.observe(load_model(model), _batches(4), Seen(), desc="", show_progress=False)
    assert calls == [False] and seen == [(1, 4, D)] * 4
