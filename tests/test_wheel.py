"""The built wheel works outside the checkout: its command line, its built-in recipes and the data
files they name (slow: builds the wheel and installs it in a fresh virtual environment)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from builders import mobilenet_block_model, random_images

REPO = Path(__file__).resolve().parents[1]
WHEEL_SOURCES = ("pyproject.toml", "README.md", "onnxq", "passes")  # what pyproject.toml packages
CHECK_RECIPES = """
import sys
from pathlib import Path
import onnxq
from onnxq.pipeline import builtin_recipes, load_recipe
from onnxq.passes.petr.qfpe import resolve_checkpoint
from onnxq.passes.petr.qfpe_data import read_qfpe_weights

assert Path(onnxq.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), onnxq.__file__
names = builtin_recipes()
for name in names:
    for step in load_recipe(name)[1]:
        if step.name == "qfpe":
            assert read_qfpe_weights(resolve_checkpoint(step.checkpoint)).pe_type == "qfpe"
print(" ".join(names))
"""


def _run(args, cwd, env) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_runs_its_built_in_recipes_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # build from a copy of what the wheel is made of: setuptools builds in the source tree, and a build/
    # folder left there from an earlier build would carry files since deleted into the wheel
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)], tmp_path, env)
    wheel, = (tmp_path / "dist").glob("onnxq-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # dependencies come from the environment running the tests (what --system-site-packages does for a
    # system interpreter); a plain path entry, so its editable-install hooks for the checkout stay off
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "environment-dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    work = tmp_path / "work"  # outside the checkout: nothing there shadows the installed package
    work.mkdir()
    onnxq_cmd = str(venv / "bin" / "onnxq")
    assert _run([onnxq_cmd, "--version"], work, env).strip() == f"onnxq {onnxq.__version__}"
    listed = _run([onnxq_cmd, "recipes"], work, env)
    names = _run([str(python), "-c", CHECK_RECIPES], work, env).split()
    assert {"default", "full-int8", "petr-w8a8", "petr-full-int8"} <= set(names)
    assert all(name in listed for name in names)

    onnx.save(mobilenet_block_model(), work / "model.onnx")
    np.savez(work / "calib.npz", input=random_images(8))
    _run([onnxq_cmd, "quantize", "model.onnx", "--calib", "calib.npz", "-o", "model.int8.onnx", "--recipe", "default"],
         work, env)
    quantized = onnx.load(work / "model.int8.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)

    # petr-w8a8 swaps in the shipped QFPE weights: from the installed package, without torch
    from onnxq_models import petr, petr_export

    lid, _ = petr.load_checkpoint(REPO / "models" / "checkpoints" / "petr_tiny_lid.pt")
    petr_export.export_onnx(lid, work / "petr.onnx", "in_graph")
    images = np.random.default_rng(0).standard_normal((2, 6, 3, *lid.cfg.image_hw)).astype(np.float32)
    np.savez(work / "petr_calib.npz", images=images, img2lidar=np.repeat(petr_export.rig_img2lidar(), 2, axis=0))
    without_torch = ("import sys; sys.modules['torch'] = None; from onnxq.cli.main import main; "
                     "sys.exit(main(['quantize', 'petr.onnx', '--calib', 'petr_calib.npz', '-o', 'petr.int8.onnx', "
                     "'--recipe', 'petr-w8a8']))")
    _run([str(python), "-c", without_torch], work, env)
    record = {p.key: p.value for p in onnx.load(work / "petr.int8.onnx").metadata_props}
    qfpe = next(v for k, v in record.items() if k.endswith(".qfpe"))
    assert "pe_replaced=lid -> qfpe" in qfpe and "model_vs_pytorch_rel" in qfpe, qfpe
