"""Calibration data that cannot give statistics is refused with one clear line; samples that do not
fill a last batch are named in a warning instead of dropped silently."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from builders import mobilenet_block_model, random_images
from conftest import cli
from onnxq.errors import OnnxqError


def masked_model() -> onnx.ModelProto:
    """x·W, zeroed where attention_mask is 0: a model with a padding-mask input."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"], name="expand"),
             helper.make_node("Mul", ["h", "m3"], ["y"], name="mask")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8]),
                                                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])],
                              [w, numpy_helper.from_array(np.array([2], np.int64), "last")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_all_padding_calibration_is_refused(tmp_path, capsys):
    calib = {"x": np.ones((4, 5, 8), np.float32), "attention_mask": np.zeros((4, 5), np.int64)}
    with pytest.raises(OnnxqError, match="every calibration position is padding"):
        onnxq.quantize(masked_model(), calib, show_progress=False, log=lambda *_: None)
    onnx.save(masked_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **calib)
    code, _, err = cli(capsys, "quantize", tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "q.onnx")
    assert code == 1 and err.strip().splitlines()[-1].startswith("onnxq: error: every calibration position is padding")
    assert not (tmp_path / "q.onnx").exists()


def test_samples_past_the_last_batch_are_named(caplog):
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        onnxq.quantize(mobilenet_block_model(), {"input": random_images(10, seed=1)}, batch_size=4,
                       show_progress=False, log=lambda *_: None)
    assert "10 samples do not split into batches of 4: the last 2 are left out (a batch size that divides 10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        onnxq.quantize(mobilenet_block_model(), {"input": random_images(8, seed=1)}, batch_size=4,
                       show_progress=False, log=lambda *_: None)
    assert "left out" not in caplog.text


def test_constant_calibration_data_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        onnxq.quantize(mobilenet_block_model(), {"input": np.zeros((8, 3, 16, 16), np.float32)}, show_progress=False,
                       log=lambda *_: None)
    assert "input 'input' is 0.0 everywhere in the first batch" in caplog.text
