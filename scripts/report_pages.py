"""Report pages and their screenshots for docs/report.md (not a test): MobileNetV2 and all-MiniLM-L6-v2
quantized with their automatic recipes on bench_core's calibration data, each reported on held-out data.

    python scripts/report_pages.py [--out .cache/report_pages]      # needs chromium for the screenshots

Writes <out>/NAME.html and, with chromium installed, docs/img/report_NAME.png (1280 px wide).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import onnxq
from onnxq_models import images, minilm, mobilenet_v2, text_data


def cases() -> dict:
    sentences = text_data.wiki_sentences("eval")[:32]
    return {
        "mobilenet_v2": (mobilenet_v2.cached_onnx(), {"input": images.crops("calib", 32)},
                         {"input": images.crops("eval", 16)}),
        "minilm": (minilm.cached_onnx(), minilm.calibration_feeds(32, 48), minilm.tokenize(sentences, max_length=32)),
    }


def _shrink(png: Path) -> None:
    """A 256-colour palette keeps the screenshot small (the page has few colours)."""
    from PIL import Image

    Image.open(png).convert("RGB").quantize(colors=256).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".cache/report_pages")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (cached, calib, evaluation) in cases().items():
        fp32 = out / f"{name}.onnx"  # a copy beside the outputs: the page names repository-relative paths
        shutil.copyfile(cached, fp32)
        quantized = out / f"{name}.int8.onnx"
        onnxq.quantize(fp32, calib, output=quantized, show_progress=False, log=lambda *_: None)
        page = out / f"{name}.html"
        onnxq.report(fp32, quantized, evaluation, page, show_progress=False)
        print(f"wrote {page}")
        if shutil.which("chromium"):
            png = Path("docs/img") / f"report_{name}.png"
            subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={png}",
                            "--window-size=1280,2000", "--hide-scrollbars", page.resolve().as_uri()],
                           check=True, capture_output=True)
            _shrink(png)
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
