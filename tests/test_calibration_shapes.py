"""--calibration-shapes (ModelOpt's calibration_shapes): batches of exactly the given shapes, checked
against the model and the data before any work; the quantized model keeps its dynamic batch."""

import numpy as np
import onnx
import pytest

import onnxq
from builders import attention_model, mobilenet_block_model, random_images
from conftest import cli, run
from onnxq.errors import OnnxqError, OnnxqTypeError, OnnxqValueError
from onnxq.stats.calib_shapes import parse_shapes

CALIB = {"input": random_images(32, seed=1)}


def quiet(*_):
    pass


def initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.raw_data or t.SerializeToString() for t in model.graph.initializer}


def test_shapes_set_the_batch_and_the_model_stays_dynamic():
    model = mobilenet_block_model()
    shaped = onnxq.quantize(model, CALIB, calibration_shapes="input:8x3x16x16", show_progress=False, log=quiet)
    batched = onnxq.quantize(model, CALIB, batch_size=8, show_progress=False, log=quiet)
    assert initializers(shaped) == initializers(batched)  # the same calibration as batches of 8
    assert shaped.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # still dynamic
    assert run(shaped, {"input": random_images(3, seed=4)})[0].shape[0] == 3
    as_dict = onnxq.quantize(model, CALIB, calibration_shapes={"input": [8, 3, 16, 16]}, show_progress=False, log=quiet)
    assert initializers(as_dict) == initializers(shaped)


@pytest.mark.parametrize("shapes, message", [
    ("input:8x3x32x32", "does not fit the model's input"),
    ("input:8x3x16", "does not fit the model's input"),
    ("image:8x3x16x16", "the model has no input ['image']"),
    ("input=8x3x16x16", "is not NAME:D1xD2x"),
    ("input:8x3x16x16,input:8x3x16x16", "named twice"),
    ("input:0x3x16x16", "zero dimension"),
])
def test_shapes_that_do_not_fit_the_model_are_refused(shapes, message):
    with pytest.raises(OnnxqError, match=message.replace("[", r"\[").replace("]", r"\]")):
        onnxq.quantize(mobilenet_block_model(), CALIB, calibration_shapes=shapes, show_progress=False, log=quiet)


def test_every_input_needs_a_shape_and_one_batch_size():
    model = attention_model()
    feeds = {"hidden": np.zeros((8, 8, 16), np.float32), "attention_mask": np.ones((8, 8), np.int64)}
    with pytest.raises(OnnxqError, match=r"no shape for input\(s\) \['attention_mask'\]"):
        onnxq.quantize(model, feeds, calibration_shapes="hidden:4x8x16", show_progress=False, log=quiet)
    with pytest.raises(OnnxqError, match="first dimensions .* differ"):
        onnxq.quantize(model, feeds, calibration_shapes="hidden:4x8x16,attention_mask:2x8", show_progress=False,
                       log=quiet)
    with pytest.raises(OnnxqError, match="batch_size 2 and the calibration shapes' batch size 4 differ"):
        onnxq.quantize(model, feeds, batch_size=2, calibration_shapes="hidden:4x8x16,attention_mask:4x8",
                       show_progress=False, log=quiet)


def test_data_of_another_shape_is_named():
    feeds = [{"input": random_images(2, seed=s)} for s in range(3)] + [{"input": random_images(1, seed=9)}]
    with pytest.raises(OnnxqError, match=r"calibration batch #3: input 'input' has shape \[1, 3, 16, 16\]"):
        onnxq.quantize(mobilenet_block_model(), feeds, calibration_shapes="input:2x3x16x16", show_progress=False,
                       log=quiet)


def test_parse():
    assert parse_shapes("a:1x3x224x224, b:1x8") == {"a": (1, 3, 224, 224), "b": (1, 8)}
    assert parse_shapes("input:0:4X3") == {"input:0": (4, 3)}  # a TensorFlow-style name keeps its ':'


@pytest.mark.parametrize("shapes, error, message", [
    ({"input": "8x3x16x16"}, OnnxqTypeError, "calibration_shapes: expected"),
    ({"input": (None, 3, 16, 16)}, OnnxqValueError, "not a tuple of positive integers"),
    ({"input": (8.5, 3, 16, 16)}, OnnxqValueError, "not a tuple of positive integers"),
    ({"input": (True, 3, 16, 16)}, OnnxqValueError, "not a tuple of positive integers"),
    ({"input": (-1, 3, 16, 16)}, OnnxqValueError, "not a tuple of positive integers"),
])
def test_python_shapes_are_checked(shapes, error, message):
    with pytest.raises(error, match=message):
        onnxq.quantize(mobilenet_block_model(), CALIB, calibration_shapes=shapes, show_progress=False, log=quiet)


def test_cli(tmp_path, capsys):
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **CALIB)
    base = ["quantize", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz", "-q"]
    code, _, err = cli(capsys, *base, "-o", tmp_path / "ok.onnx", "--calibration-shapes", "input:16x3x16x16")
    assert code == 0, err
    code, _, err = cli(capsys, *base, "-o", tmp_path / "bad.onnx", "--calibration-shapes", "input:16x3")
    assert code == 1 and "does not fit the model's input" in err and not (tmp_path / "bad.onnx").exists()
    for malformed in ("input:", ":8", "input:8x", "input:-1"):
        with pytest.raises(SystemExit) as stop:
            cli(capsys, *base, "-o", tmp_path / "bad.onnx", "--calibration-shapes", malformed)
        assert stop.value.code == 2 and "is not NAME:D1xD2x" in capsys.readouterr().err


def test_too_few_samples_for_the_batch_says_which_batch():
    few = {"input": random_images(8, seed=1)}
    with pytest.raises(OnnxqError, match=r"8 samples, fewer than the batch size asked for \(16\)"):
        onnxq.quantize(mobilenet_block_model(), few, calibration_shapes="input:16x3x16x16", show_progress=False,
                       log=quiet)
    with pytest.raises(OnnxqError, match=r"fewer than the model's fixed batch size \(16\)"):
        onnxq.quantize(mobilenet_block_model(batch=16), few, show_progress=False, log=quiet)


def test_an_input_of_unknown_rank_takes_any_given_shape():
    model = mobilenet_block_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")  # rank unknown: nothing to check against
    out = onnxq.quantize(model, CALIB, calibration_shapes="input:8x3x16x16", show_progress=False, log=quiet)
    assert run(out, {"input": CALIB["input"][:2]})[0].shape[0] == 2
