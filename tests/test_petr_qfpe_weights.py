"""The qfpe pass's weights file: data only (a pickle named as the checkpoint never runs), read after the
model is recognised as a PETR, and found relative to the recipe file that names it."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxq
from builders import mobilenet_block_model, random_images
from onnxq.errors import OnnxqError
from onnxq.passes.petr.qfpe_data import read_qfpe_weights
from onnxq_models import petr, petr_export
from test_petr_passes import export, feeds, one, outputs, small_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")
QUIET = {"show_progress": False, "log": lambda *a: None}


class _MakesMarker:
    """Unpickling this object runs os.system('touch MARKER'): what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_pickle(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_MakesMarker(marker)))
    return path, marker


def test_the_marker_pickle_does_run_code_when_unpickled(tmp_path):
    path, marker = malicious_pickle(tmp_path)  # the hazard the tests below guard against is real
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_a_pickled_checkpoint_is_refused_unread_through_the_api(tmp_path):
    lid = small_model()
    path, marker = malicious_pickle(tmp_path)
    with pytest.raises(OnnxqError, match="not a QFPE weights file") as err:
        onnxq.quantize(str(export(lid, tmp_path, "in_graph")), feeds(lid, "in_graph", 1),
                       recipe=[{"qfpe": {"checkpoint": str(path)}}], **QUIET)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_pytorch_checkpoint_is_refused_unread(tmp_path):
    qfpe = small_model(seed=1, pe_type="qfpe")
    checkpoint = tmp_path / "qfpe.pt"
    petr.save_checkpoint(qfpe, checkpoint)  # a zip with a pickle inside
    with pytest.raises(OnnxqError, match="not a QFPE weights file"):
        read_qfpe_weights(checkpoint)


def test_damaged_weights_files_are_refused_in_one_line(tmp_path):
    import json

    from onnxq.passes.petr.qfpe_data import FORMAT, VERSION

    good = read_qfpe_weights(petr_export.write_qfpe_weights(small_model(seed=1, pe_type="qfpe"), tmp_path / "good.npz"))
    arrays = {k: v for k, v in good.arrays.items() if k != "pe.anchors"}  # one array gone
    cases = {"no_meta.npz": {"x": np.zeros(3)},
             "missing_array.npz": {"meta": np.array(json.dumps(good.meta)), **arrays},
             "other_version.npz": {"meta": np.array(json.dumps({**good.meta, "version": VERSION + 1}))},
             "bad_tables.npz": {"meta": np.array(json.dumps({**good.meta, "nodes": {"/a": {"op_type": "Conv", "inputs": {"1": [1]}}}})),
                                **good.arrays}}
    for name, members in cases.items():
        np.savez(tmp_path / name, **members)
        with pytest.raises(OnnxqError) as err:
            read_qfpe_weights(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value), str(err.value)
    assert good.meta["format"] == FORMAT


def test_a_pickled_checkpoint_is_refused_unread_through_the_cli(tmp_path):
    lid = small_model()
    path, marker = malicious_pickle(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"passes:\n  - qfpe: {{checkpoint: {path.name}}}\n")
    model = export(lid, tmp_path, "in_graph")
    np.savez(tmp_path / "calib.npz", **feeds(lid, "in_graph", 1))
    result = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(model), "--calib", str(tmp_path / "calib.npz"),
                             "-o", str(tmp_path / "out.onnx"), "--recipe", str(recipe)],
                            check=False, capture_output=True, text=True, cwd=tmp_path.parent)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("onnxq: error:")]
    assert len(errors) == 1 and "not a QFPE weights file" in errors[0], result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.onnx").exists()


def test_a_model_without_a_petr_pe_is_refused_before_the_file_is_opened(tmp_path):
    path, marker = malicious_pickle(tmp_path)
    with pytest.raises(OnnxqError, match="no PETR position embedding") as err:
        onnxq.quantize(mobilenet_block_model(), {"input": random_images(2)},
                       recipe=[{"qfpe": {"checkpoint": str(path)}}], **QUIET)
    assert "not a QFPE weights file" not in str(err.value)
    assert not marker.exists()


def test_a_recipe_file_names_the_weights_relative_to_its_own_folder(tmp_path, monkeypatch):
    lid = small_model(seed=0)
    qfpe = small_model(seed=1, pe_type="qfpe")
    recipes = tmp_path / "recipes"
    petr_export.write_qfpe_weights(qfpe, recipes / "weights" / "qfpe.npz")
    recipe = recipes / "swap.yaml"
    recipe.write_text("passes:\n  - qfpe: {checkpoint: weights/qfpe.npz}\n")
    model = export(lid, tmp_path, "in_graph")
    data = feeds(lid, "in_graph", 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the recipe's folder
    proto = onnxq.quantize(str(model), data, recipe=str(recipe), **QUIET)
    reference = export(qfpe, tmp_path, "in_graph", name="qfpe.onnx")
    for ref, got in zip(outputs(reference, one(data)), outputs(proto, one(data))):
        assert np.abs(ref - got).max() <= 1e-4 * np.abs(ref).max()
    # the same name from a Python recipe is relative to the working directory, where it is not
    with pytest.raises(OnnxqError, match="not found"):
        onnxq.quantize(str(model), data, recipe=[{"qfpe": {"checkpoint": "weights/qfpe.npz"}}], **QUIET)


def test_the_shipped_weights_file_fits_the_built_in_recipes():
    from onnxq.pipeline import load_recipe

    for name in ("petr-w8a8", "petr-full-int8"):
        step = next(p for p in load_recipe(name)[1] if p.name == "qfpe")
        weights = read_qfpe_weights(Path(step.checkpoint))  # made absolute by the recipe loader
        assert weights.pe_type == "qfpe" and weights.meta["feat_hw"] == [8, 22]
        assert weights.check_feed() is not None
