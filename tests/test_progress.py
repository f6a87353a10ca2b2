"""Progress on a non-terminal stderr: stage lines with elapsed times, in order; none with -q; log lines whole."""

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from builders import mobilenet_block_model, random_images
from onnxq.progress import progress, session

STAMPED = re.compile(r"^\[ *(\d+\.\d)s\] (.+)$")


@pytest.fixture
def files(tmp_path):
    onnx.save(mobilenet_block_model(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", input=random_images(16, seed=1))
    return tmp_path


def _quantize(files, *extra):
    """The command line with stdout and stderr piped (not terminals), as in CI, `| tee` or nohup."""
    return subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(files / "model.onnx"), "--calib",
                           str(files / "calib.npz"), "-o", str(files / "out.onnx"), *extra],
                          capture_output=True, text=True, check=False)


def test_stage_lines_in_order_with_elapsed_times(files):
    result = _quantize(files, "--rounding", "gptq")
    assert result.returncode == 0, result.stderr
    stamped = [STAMPED.match(line) for line in result.stderr.splitlines()]
    assert stamped and all(stamped), result.stderr  # every stderr line is a stamped progress line
    times = [float(m.group(1)) for m in stamped]
    assert times == sorted(times)
    texts = [m.group(2) for m in stamped]
    passes = [t.split(": ", 1)[1] for t in texts if re.match(r"passes \d+/7: ", t)]
    assert passes == ["lift_constants", "fold_constants", "upgrade_opset", "fold_batchnorm", "equalize",
                      "quantize", "recentre"]
    assert texts[-1].startswith("passes 7/7 done (")
    # inside the quantize pass: calibration runs, then the per-layer GPTQ loop, then bias correction
    quantize_at = texts.index("passes 6/7: quantize")
    inside = texts[quantize_at:texts.index("passes 7/7: recentre")]
    starts = [t for t in inside if re.search(r" 0/\d+ (batch|layer)$", t)]
    assert starts == ["calibrating ranges 0/16 batch", "calibrating histograms 0/16 batch",
                      "quantize: GPTQ 0/5 layer", "GPTQ statistics 0/16 batch", "bias correction 0/16 batch"]
    assert "quantize: GPTQ 5/5 layer done (" in "\n".join(inside)
    # the log (stdout) is untouched by progress: whole lines, none stamped
    out = result.stdout.splitlines()
    assert out[0].startswith("recipe: default (") and out[1] == f"wrote {files / 'out.onnx'}"
    assert not any(STAMPED.match(line) for line in out)


def test_quiet_prints_nothing(files):
    result = _quantize(files, "-q")
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


def test_long_loop_reports_between_start_and_end(capsys, monkeypatch):
    import onnxq.progress as p

    monkeypatch.setattr(p, "PROGRESS_EVERY_S", 0.0)  # every item is "long": one line per item between the ends
    with session():
        assert list(progress(range(3), desc="work", unit="step")) == [0, 1, 2]
        assert list(progress(range(3), desc="hidden", disable=True)) == [0, 1, 2]
    lines = [STAMPED.match(line).group(2) for line in capsys.readouterr().err.splitlines()]
    assert lines[:1] == ["work 0/3 step"] and lines[1:3] == ["work 1/3 step", "work 2/3 step"]
    assert lines[3].startswith("work 3/3 step done (") and len(lines) == 4


def test_log_lines_in_a_terminal_start_on_a_cleared_line(files):
    """With stdout and stderr on one terminal, a log line printed while bars are up starts on a line
    the bars were cleared from, not after a bar's text."""
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a real terminal's size
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", str(files / "model.onnx"), "--calib",
                             str(files / "calib.npz"), "-o", str(files / "out.onnx"), "--calibrator", "auto"],
                            stdout=child, stderr=child, stdin=subprocess.DEVNULL)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait() == 0
    screen = b"".join(chunks).decode()
    assert "passes:" in screen  # bars were drawn
    at = screen.index("quantize: calibrator auto -> ")
    assert screen[at - 1] == "\r" and screen[:at].rstrip("\r").endswith(" ")  # a cleared line, then the log
