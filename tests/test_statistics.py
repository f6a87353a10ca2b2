"""The statistics service: one ONNX Runtime pass per model state serves every observer, padded
positions never reach a statistic, and the ranges match ONNX Runtime's own calibrators."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import (
    CalibrationDataReader,
    CalibrationMethod,
    HistogramCollector,
    create_calibrator,
)

from builders import IR_VERSION
from onnxq.passes.cnn.recentre import RoundingChange
from onnxq.quant.bias_correction import OutputShift
from onnxq.quant.calibrate import ActivationStatistics, collect_statistics
from onnxq.quant.calibrator_choice import TRIAL_BATCHES, reference_outputs
from onnxq.quant.gptq import HessianObserver
from onnxq.stats.calib_data import load_calibration
from onnxq.stats.observers import BatchValues, ChannelStatistics, Histograms, Ranges, RowSample, SecondMoments
from onnxq.stats.service import StatisticsService, observe

WIDTH = 16
NAMES = ["x", "h", "r", "y"]


def two_linears() -> onnx.ModelProto:
    """y = relu(x·W)·Wᵀ, every tensor (x, h, r, y) float and (N, 16)."""
    w = np.random.default_rng(0).normal(size=(WIDTH, WIDTH)).astype(np.float32) / 4
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")], "two_linears",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def heavy_tailed_batches(n: int = 4, rows: int = 256) -> list[dict[str, np.ndarray]]:
    """Student-t inputs (tails for the percentile to cut); one all-zero row per batch puts 0 in every
    tensor, so ONNX Runtime's |x| histogram starts at 0 as onnxq's does."""
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(n):
        x = rng.standard_t(5, size=(rows, WIDTH)).astype(np.float32)
        x[0] = 0.0
        batches.append({"x": x})
    return batches


class Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def ort_ranges(tmp_path, method, batches, op_types=None, **options):
    """ONNX Runtime's calibrated (lo, hi) per tensor, and the calibrator (for its histograms)."""
    path = tmp_path / "model.onnx"
    onnx.save(two_linears(), path)
    calibrator = create_calibrator(path, op_types, augmented_model_path=str(tmp_path / "augmented.onnx"),
                                   calibrate_method=method, extra_options=options)
    calibrator.collect_data(Reader(batches))
    data = calibrator.compute_data().data
    return {n: tuple(float(np.asarray(v).reshape(-1)[0]) for v in data[n].range_value) for n in data}, calibrator


def onnxq_statistics(batches, bins: int) -> ActivationStatistics:
    model = ir.serde.deserialize_model(two_linears())
    return collect_statistics(model, NAMES, batches, histograms=True, bins=bins, show_progress=False)


def test_min_max_equals_onnxruntime_minmax_calibrater(tmp_path):
    batches = heavy_tailed_batches()
    theirs, _ = ort_ranges(tmp_path, CalibrationMethod.MinMax, batches)
    ours = onnxq_statistics(batches, 64).raw
    assert set(theirs) == set(NAMES)
    for name in NAMES:
        assert (ours[name].lo, ours[name].hi) == theirs[name], name


def test_percentile_is_onnxruntime_percentile_one_bin_up(tmp_path):
    """Both take the |x| histogram of `bins` bins over [0, max |x|] and find the bin where the percentile
    falls; ONNX Runtime returns that bin's lower edge, onnxq its upper edge (the range then covers the
    whole bin), so onnxq's threshold is ONNX Runtime's plus one bin width."""
    batches, bins, percentile = heavy_tailed_batches(), 2048, 99.9
    theirs, _ = ort_ranges(tmp_path, CalibrationMethod.Percentile, batches, symmetric=True, num_bins=bins,
                           percentile=percentile)
    stats = onnxq_statistics(batches, bins)
    ours = stats.ranges("percentile", symmetric=True, percentile=percentile)
    for name in NAMES:
        amax = stats.raw[name].amax
        assert theirs[name][1] < 0.9 * amax, name  # the percentile clips: the comparison is not max vs max
        assert ours[name].hi == pytest.approx(theirs[name][1] + amax / bins, rel=1e-6), name


def test_histograms_are_onnxruntime_entropy_histograms(tmp_path):
    """onnxq's entropy search differs on purpose from ONNX Runtime's (|x| with 128 levels a side, a
    flattened zero bin, a floor instead of smoothing), so the thresholds are not compared. What both
    search is the same statistic: the signed histogram over [-max |x|, max |x|]. ONNX Runtime's own
    threshold search run on onnxq's histogram gives ONNX Runtime's EntropyCalibrater range exactly."""
    batches, signed_bins, levels = heavy_tailed_batches(rows=128), 512, 128
    theirs, calibrator = ort_ranges(tmp_path, CalibrationMethod.Entropy, batches, ["Relu"], symmetric=True,
                                    num_bins=signed_bins, num_quantized_bins=levels)
    stats = onnxq_statistics(batches, signed_bins // 2)
    collector: HistogramCollector = calibrator.collector
    for name in ("h", "r"):  # the Relu's input and output
        ort_hist, ort_edges = collector.histogram_dict[name][:2]
        ours = stats.histograms[name]
        assert ours.sum() == ort_hist.sum()
        # a value on a bin edge may land on either side of it (float32 vs float64 arithmetic)
        assert np.abs(ours - ort_hist).sum() <= 2 * len(batches), name
        lo, hi = stats.raw[name].lo, stats.raw[name].hi
        threshold = collector.get_entropy_threshold((ours, ort_edges, np.float32(lo), np.float32(hi)), levels)
        assert tuple(float(t) for t in threshold) == pytest.approx(theirs[name], rel=1e-6), name


# ---------------------------------------------------------------------------------------------------
# padding


SEQ = 6


def masked_model() -> onnx.ModelProto:
    """(B, 6, 16) activations h = x·W and y = relu(h)·Wᵀ next to an attention mask."""
    w = np.random.default_rng(2).normal(size=(WIDTH, WIDTH)).astype(np.float32) / 4
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="second"),
         helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="cast")],
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", SEQ, WIDTH]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", SEQ])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", SEQ, WIDTH]),
         helper.make_tensor_value_info("mask_f", TensorProto.FLOAT, ["B", SEQ])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


@pytest.fixture(scope="module")
def padded():
    """Calibration set of 4 batches of 4 sequences; padded positions (a different number per sequence)
    hold ±500, far outside what real positions reach. Also the real rows of x, h and y, computed by ORT."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, SEQ, WIDTH)).astype(np.float32)
    mask = np.ones((16, SEQ), np.int64)
    for i in range(16):
        mask[i, SEQ - i % 4:] = 0
    x[mask == 0] = 500.0 * rng.choice([-1.0, 1.0], size=(int((mask == 0).sum()), WIDTH))
    model = masked_model()
    data = load_calibration({"x": x, "attention_mask": mask}, ir.serde.deserialize_model(model), batch_size=4)
    assert data.padding_mask == "attention_mask"
    sess = ort.InferenceSession(_exposed(model, ["h"]).SerializeToString(), providers=["CPUExecutionProvider"])
    y, _, h = sess.run(None, {"x": x, "attention_mask": mask})
    keep = mask.astype(bool)
    return ir.serde.deserialize_model(model), data, {"x": x[keep], "h": h[keep], "y": y[keep]}, keep


def _exposed(model: onnx.ModelProto, names) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return copy


def test_every_observer_kind_leaves_padded_positions_out(padded):
    model, data, real, keep = padded
    ranges, hessian = Ranges(["x", "h"]), HessianObserver({"w2": [n for n in model.graph if n.name == "second"]})
    channels = ChannelStatistics(["x"], axis=-1)
    sample = RowSample({"x": -1}, per_batch=1000, seed=0)
    moments, values = SecondMoments(["h"]), BatchValues(["y"])
    shift = OutputShift({"pair": ("y", "h", -1)})  # bias correction's per-channel mean difference
    rounding = RoundingChange({("h", -1): 0.05})   # recentre's per-channel mean rounding change
    observe(model, data, ranges, channels, sample, moments, values, hessian, shift, rounding, desc="padding",
            show_progress=False)
    histograms = Histograms(ranges.result, bins=64)
    observe(model, data, histograms, desc="padding", show_progress=False)

    for name in ("x", "h"):
        assert (ranges.result[name].lo, ranges.result[name].hi) == (real[name].min(), real[name].max())
        assert histograms.result[name].sum() == real[name].size  # one count per real value, none for padding
    np.testing.assert_array_equal(channels.result["x"].amax, np.abs(real["x"]).max(axis=0))
    np.testing.assert_allclose(channels.result["x"].mean_square, (real["x"].astype(np.float64) ** 2).mean(axis=0))
    rows = sample.result["x"]
    assert len(rows) == len(real["x"]) and np.abs(rows).max() < 100  # every real row, no padded one
    h64 = real["h"].astype(np.float64)
    np.testing.assert_allclose(moments.result["h"], h64.T @ h64 / len(h64), rtol=1e-9)
    np.testing.assert_array_equal(np.concatenate([v["y"] for v in values.result]), real["y"])
    # bias correction averages per-batch means: real rows only, batch by batch (4 sequences a batch)
    batch_of_row = np.split(np.arange(len(real["y"])), np.cumsum(keep.reshape(4, -1).sum(axis=1))[:-1])
    diff = real["y"].astype(np.float64) - real["h"]
    expected_shift = np.mean([diff[rows].mean(axis=0) for rows in batch_of_row], axis=0)
    np.testing.assert_allclose(shift.total["pair"] / shift.batches, expected_shift, rtol=1e-9)
    h, s = real["h"].astype(np.float64), 0.05
    old = np.clip(np.round(h / s), -128, 127) * s
    new = np.clip(np.round((h - 127 * s / 2) / (s / 2)), -128, 127) * (s / 2) + 127 * s / 2
    np.testing.assert_allclose(rounding.result[("h", -1)], (new - old).mean(axis=0), rtol=1e-9)
    relu = np.maximum(real["h"], 0).astype(np.float64)
    np.testing.assert_allclose(hessian.hessians({"w2": [n for n in model.graph if n.name == "second"]})["w2"].total,
                               relu.T @ relu, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# one pass, many observers


@pytest.fixture
def ort_runs(monkeypatch):
    """Counts InferenceSession.run calls (each still runs ONNX Runtime)."""
    calls = []
    real_run = ort.InferenceSession.run

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    return calls


def test_one_pass_serves_every_registered_observer(padded, ort_runs):
    model, data, real, _ = padded
    service = StatisticsService(model, data, show_progress=False)
    ranges = service.register(Ranges(["x", "h"]))
    channels = service.register(ChannelStatistics(["h"], axis=-1))
    moments = service.register(SecondMoments(["x", "h"]))
    sample = service.register(RowSample({"h": -1}, per_batch=2, seed=0))
    service.run("four observers")
    assert len(ort_runs) == len(data) == 4 and len(set(map(id, ort_runs))) == 1  # one session, one run per batch
    assert ranges.result["h"].hi == channels.result["h"].amax.max() == real["h"].max()
    assert moments.result.keys() == {"x", "h"} and sample.result["h"].shape == (8, WIDTH)
    with pytest.raises(RuntimeError):
        service.run("again")


def test_quantize_statistics_serve_the_auto_reference_from_the_range_pass(padded, ort_runs):
    model, data, _, _ = padded
    reference = reference_outputs(model)
    collect_statistics(model, ["x", "h", "r"], data, histograms=True, show_progress=False, alongside=[reference])
    assert len(ort_runs) == 2 * len(data)  # ranges + histograms; the reference rode on the first
    assert len(reference.result) == TRIAL_BATCHES and set(reference.result[0]) == {"y", "mask_f"}
