"""Count how often quantizing all-MiniLM-L6-v2 (default recipe, transformer-w8a8) runs ONNX Runtime.

    python scripts/count_ort_runs.py [--sentences 96] [--words 160] [--batch-size 16] [--output q.onnx]

The calibration set is the one scripts/bench_transformers.py uses (96 wiki sentences + 160 single
words, 32 tokens, batches of 16). onnxruntime.InferenceSession.run is wrapped here, in the script
(the library is left as it is), and each call is attributed to the pipeline pass whose `apply` is on
the stack. A full pass over the calibration set is counted each time its last batch is fed; a pass
that stops early (the auto calibrator's trial batches, the pipeline's exactness check) counts only
in the run total.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import time

import numpy as np
import onnxruntime as ort

from benchlib.profiling import pass_on_stack


def _feed_key(feed: dict) -> str:
    digest = hashlib.sha1()
    for name in sorted(feed):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=96)
    parser.add_argument("--words", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=None, help="also write the quantized model here (to compare two runs)")
    args = parser.parse_args(argv)

    from onnxq.api import quantize
    from onnxq.ir.modelio import load_model
    from onnxq.stats.calib_data import load_calibration
    from onnxq_models import minilm

    fp32 = minilm.cached_onnx()
    calib = minilm.calibration_feeds(args.sentences, args.words)
    data = load_calibration(calib, load_model(fp32), batch_size=args.batch_size)
    batch_keys = [_feed_key(feed) for feed in data]
    last_batch = batch_keys[-1]

    runs_by_pass: collections.Counter = collections.Counter()
    passes_by_pass: collections.Counter = collections.Counter()
    original_run = ort.InferenceSession.run

    def counting_run(self, output_names, input_feed, *rest, **kwargs):
        where = pass_on_stack()
        runs_by_pass[where] += 1
        if _feed_key(input_feed) == last_batch:
            passes_by_pass[where] += 1
        return original_run(self, output_names, input_feed, *rest, **kwargs)

    ort.InferenceSession.run = counting_run
    start = time.perf_counter()
    try:
        quantize(str(fp32), calib, output=args.output, batch_size=args.batch_size, show_progress=False,
                 log=lambda *_: None)
    finally:
        ort.InferenceSession.run = original_run
    report = {
        "calibration": f"{data.num_samples} samples in {len(batch_keys)} batches of {args.batch_size}",
        "full_passes": sum(passes_by_pass.values()),
        "run_calls": sum(runs_by_pass.values()),
        "by_pass": {name: {"full_passes": passes_by_pass[name], "run_calls": runs_by_pass[name]}
                    for name in runs_by_pass},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
