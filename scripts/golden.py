"""Behaviour check for refactors (not a test): quantize small models with every built-in recipe family
and store outputs and initializers, then compare two such folders bit for bit.

    PYTHONPATH=tests python scripts/golden.py save /tmp/golden/before     # on the old code
    PYTHONPATH=tests python scripts/golden.py save /tmp/golden/after      # on the new code
    python scripts/golden.py compare /tmp/golden/before /tmp/golden/after

Cases: the test CNN block (default, per-tensor + entropy, ort-cpu) and tiny Llama/BERT/GPT exports
(transformer-w8a8 per channel and per tensor, w4a8 for Llama, full-int8, and the automatic choice).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def cases(tmp: Path) -> list[tuple[str, onnx.ModelProto, dict, dict, dict]]:
    import builders
    import torch
    import transformer_builders as tb

    block = builders.mobilenet_block_model()
    images, held_out = {"input": builders.random_images(16)}, {"input": builders.random_images(4, seed=7)}
    out = [("mbblock_default", block, images, {"recipe": "default"}, held_out),
           ("mbblock_pt_entropy", block, images, {"recipe": "default", "per_tensor": True, "calibrator": "entropy"}, held_out),
           ("mbblock_ortcpu", block, images, {"recipe": "default", "target": "ort-cpu"}, held_out)]
    for kind, make in (("llama", tb.tiny_llama), ("bert", tb.tiny_bert), ("gpt", tb.tiny_gpt)):
        torch.manual_seed(0)
        model = onnx.load(tb.export(make(), tmp / f"{kind}.onnx", kind))
        calib, held = tb.feeds_for(kind, 8, seed=0), tb.feeds_for(kind, 2, seed=5)
        out += [(f"{kind}_w8a8", model, calib, {"recipe": "transformer-w8a8"}, held),
                (f"{kind}_w8a8_pt", model, calib, {"recipe": "transformer-w8a8", "per_tensor": True}, held)]
        if kind == "llama":
            out.append((f"{kind}_w4a8", model, calib, {"recipe": "transformer-w4a8"}, held))
        out += [(f"{kind}_fullint8", model, calib, {"recipe": "full-int8"}, held), (f"{kind}_auto", model, calib, {}, held)]
    return out


def save(folder: Path) -> None:
    import onnxq

    folder.mkdir(parents=True, exist_ok=True)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, options, held in cases(Path(tmp)):
            q = onnxq.quantize(model, calib, show_progress=False, log=lambda *_: None, **options)
            sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
            taken = {i.name for i in sess.get_inputs()}
            outputs = sess.run(None, {k: v for k, v in held.items() if k in taken})
            np.savez(folder / f"{name}.npz", *outputs)
            inits = sorted((t.name, onnx.numpy_helper.to_array(t)) for t in q.graph.initializer)
            np.savez(folder / f"{name}.inits.npz", *[array for _, array in inits])
            summary[name] = {"nodes": len(q.graph.node), "recipe": {p.key: p.value for p in q.metadata_props}.get("onnxq.recipe")}
            print(name, summary[name], flush=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))


def compare(a: Path, b: Path) -> int:
    before, after = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    changed = 0
    for name in before:
        if name not in after:
            print(f"{name:22s} missing")
            changed += 1
            continue
        oa, ob = np.load(a / f"{name}.npz"), np.load(b / f"{name}.npz")
        diff = max(float(np.abs(oa[k].astype(np.float64) - ob[k]).max() / max(np.abs(oa[k]).max(), 1e-12)) for k in oa.files)
        ia, ib = np.load(a / f"{name}.inits.npz"), np.load(b / f"{name}.inits.npz")
        same = len(ia.files) == len(ib.files) and all(ia[k].shape == ib[k].shape and np.array_equal(ia[k], ib[k]) for k in ia.files)
        changed += diff > 0 or not same
        print(f"{name:22s} output rel diff {diff:.2e}  initializers identical {same}  "
              f"recipe {before[name]['recipe']} -> {after[name]['recipe']}")
    return 1 if changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("save").add_argument("folder", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        save(args.folder)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
