"""The built wheel works outside the checkout: its command line, its built-in recipes and the data
files they name (slow: builds the wheel and installs it in a fresh virtual environment)."""

import os
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
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_runs_its_built_in_recipes_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)], tmp_path, env)
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
