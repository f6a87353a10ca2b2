"""Calibration data in every accepted format, and a one-line error for every malformed one."""

import numpy as np
import onnx_ir as ir
import pytest

from builders import attention_model, mobilenet_block_model, random_images
from onnxq.errors import OnnxqError
from onnxq.stats.calib_data import load_calibration


@pytest.fixture
def cnn():
    return ir.from_proto(mobilenet_block_model())


def batches(data):
    return [b["input"].shape[0] for b in data]


def test_npz_stacked_samples_are_batched(cnn, tmp_path):
    np.savez(tmp_path / "c.npz", input=random_images(10))
    data = load_calibration(tmp_path / "c.npz", cnn, batch_size=4)
    assert batches(data) == [4, 4] and data.num_samples == 8  # the incomplete last batch is dropped
    assert batches(data) == [4, 4]  # re-iterable


def test_npy_folder_dict_and_iterables(cnn, tmp_path):
    np.save(tmp_path / "single.npy", random_images(3))
    assert load_calibration(tmp_path / "single.npy", cnn).num_samples == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "a.npz", input=random_images(2))
    np.save(folder / "b.npy", random_images(3))
    assert load_calibration(folder, cnn).num_samples == 5
    assert load_calibration({"input": random_images(6)}, cnn, batch_size=3).num_batches == 2
    feeds = [{"input": random_images(2, seed=i)} for i in range(3)]
    assert load_calibration(iter(feeds), cnn).num_samples == 6  # a one-shot iterator is read once


def test_ort_calibration_data_reader_plugs_in(cnn):
    class Reader:  # the shape of onnxruntime.quantization.CalibrationDataReader
        def __init__(self):
            self.feeds = iter([{"input": random_images(1, seed=i)} for i in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    assert load_calibration(Reader(), cnn).num_batches == 4


def test_fixed_batch_model_is_fed_its_batch_size(tmp_path):
    model = ir.from_proto(mobilenet_block_model(batch=2))
    assert batches(load_calibration({"input": random_images(7)}, model, batch_size=5)) == [2, 2, 2]


@pytest.mark.parametrize("data, message", [
    ({"image": random_images(2)}, "lacks model input(s) ['input']"),
    ({"input": random_images(2), "extra": random_images(2)}, "has ['extra'], which the model does not take"),
    ({"input": random_images(2).astype(np.float64)}, "has dtype float64, the model expects float32"),
    ({"input": random_images(2)[:, :, :8]}, "has shape (2, 3, 8, 16)"),
    ({"input": random_images(2)[0]}, "(rank 3)"),
    ({"input": np.zeros((0, 3, 16, 16), np.float32)}, "empty"),
    ({"input": np.full((2, 3, 16, 16), np.nan, np.float32)}, "NaN"),
    ([], "empty"),
    (42, "not supported"),
])
def test_bad_calibration_data_is_one_line_error(cnn, data, message):
    with pytest.raises(OnnxqError) as err:
        load_calibration(data, cnn)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_unreadable_files(cnn, tmp_path):
    with pytest.raises(OnnxqError, match="not found"):
        load_calibration(tmp_path / "nope.npz", cnn)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxqError, match="cannot read calibration arrays"):
        load_calibration(tmp_path / "bad.npz", cnn)


def test_npy_needs_a_single_input_model(tmp_path):
    np.save(tmp_path / "x.npy", random_images(2))
    with pytest.raises(OnnxqError, match="single-input"):
        load_calibration(tmp_path / "x.npy", ir.from_proto(attention_model()))
