"""`onnxq view`: bad models fail before Netron starts; a quantized model is served by Netron with onnxq's
record in the bytes it serves, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import onnx
import pytest

import onnxq
from builders import mobilenet_block_model
from conftest import cli


def test_a_file_that_is_not_onnx_fails_with_one_line_before_netron(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    code, out, err = cli(capsys, "view", bad, "--no-browser")
    assert code == 1 and err.startswith("onnxq: error:") and "not a readable ONNX model" in err and not out
    code, _, err = cli(capsys, "view", tmp_path / "missing.onnx", "--no-browser")
    assert code == 1 and "no such file" in err


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_a_port_out_of_range_is_a_usage_error(tmp_path, capsys, port):
    with pytest.raises(SystemExit) as exit_info:
        cli(capsys, "view", tmp_path / "m.onnx", "--port", port)
    assert exit_info.value.code == 2
    assert "port (1-65535)" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("netron") is None, reason="netron not installed (pip install 'onnxq[view]')")
def test_netron_serves_the_quantized_model_with_onnxq_record(tmp_path):
    calib = {"input": np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    model = tmp_path / "block.int8.onnx"
    onnxq.quantize(mobilenet_block_model(), calib, output=model, batch_size=4, show_progress=False, log=lambda *_: None)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "view", str(model), "--port", str(port), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        page = _get(f"http://localhost:{port}/", time.monotonic() + 60).decode("utf-8", "replace")
        assert "<html" in page.lower() and "netron" in page.lower()
        served = onnx.load_from_string(_get(f"http://localhost:{port}/data/{model.name}", time.monotonic() + 10))
        record = {p.key for p in served.metadata_props}
        assert {"onnxq.recipe", "onnxq.target"} <= record
        assert any(p.key.startswith("onnxq.") for node in served.graph.node for p in node.metadata_props)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"http://localhost:{port}" in out
