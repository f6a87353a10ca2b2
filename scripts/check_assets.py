"""Smoke check of the real models and data the benchmarks use: loads each one and prints what it is.

Run: python scripts/check_assets.py   (about a minute; exports the ONNX files into .cache/models/
on first use). Exits non-zero when an asset is missing or gives an implausible FP32 result.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx

from onnxq_models import images, minilm, mobilenet_v2, text_data

# A few ImageNet-1k class names, only to make the printout readable.
IMAGENET_NAMES = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat",
                  457: "bow tie", 599: "honeycomb", 652: "military uniform", 665: "moped",
                  670: "motor scooter", 698: "palace", 834: "suit", 967: "espresso"}
CAT_CLASSES = range(281, 286)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def op_counts(path: Path) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node).most_common(8))


def check_mobilenet() -> None:
    import onnxruntime as ort
    import torch

    print("== MobileNetV2 (torchvision ImageNet weights)")
    print("weights:", mobilenet_v2.weights_path())
    model = mobilenet_v2.load_model()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    path = mobilenet_v2.cached_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print("onnx:", path.name, [(i.name, i.shape) for i in session.get_inputs()],
          [(o.name, o.shape) for o in session.get_outputs()])
    print("ops:", op_counts(path))
    for name in images.SPLITS["eval"] + images.SPLITS["calib"]:
        logits = session.run(None, {"input": images.center_crop(name)})[0][0]
        top = np.argsort(-logits)[:3]
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        print(f"  {name:22s} top-3 {[(int(c), IMAGENET_NAMES.get(int(c), '?')) for c in top]}  p1={prob[top[0]]:.2f}")
        if name == "chelsea":
            check(int(top[0]) in CAT_CLASSES, "chelsea (a cat photo) is not classified as a cat")
    x = images.crops("eval", 8, seed=1)
    with torch.no_grad():
        diff = np.abs(session.run(None, {"input": x})[0] - model(torch.from_numpy(x)).numpy()).max()
    print(f"ONNX vs PyTorch max |diff| on 8 crops: {diff:.2e}")
    check(diff < 1e-3, "ONNX export disagrees with PyTorch")


def check_images() -> None:
    print("== photos")
    for split, names in images.SPLITS.items():
        print(f"  {split}: {len(names)} photos {list(names)}")
    check(not set(images.SPLITS["calib"]) & set(images.SPLITS["eval"]), "calib and eval photos overlap")
    calib, evaluation = images.crops("calib", 128, seed=0), images.crops("eval", 300, seed=1)
    print(f"  crops calib {calib.shape} eval {evaluation.shape} {calib.dtype}; "
          f"calib mean {calib.mean():.3f} std {calib.std():.3f}")
    check(np.array_equal(calib, images.crops("calib", 128, seed=0)), "crops are not deterministic")


def check_minilm() -> None:
    import onnxruntime as ort

    print("== all-MiniLM-L6-v2")
    print("model dir:", minilm.model_dir())
    path = minilm.cached_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print("onnx:", path.name, [(i.name, i.shape) for i in session.get_inputs()],
          [(o.name, o.shape) for o in session.get_outputs()])
    print("ops:", op_counts(path))
    sentences = text_data.wiki_sentences("eval")[:32]
    diff = np.abs(minilm.embed(session, sentences, max_length=64)
                  - minilm.embed(minilm.torch_runner(), sentences, max_length=64)).max()
    print(f"ONNX vs PyTorch max |diff| of sentence embeddings: {diff:.2e}")
    check(diff < 1e-4, "ONNX export disagrees with PyTorch")
    for dataset in text_data.WORD_SETS:
        rho = text_data.word_similarity_spearman(lambda words: minilm.embed(session, words, max_length=16), dataset)
        print(f"  FP32 Spearman {dataset}: {rho:.4f}")
        check(rho > 0.35, f"{dataset} Spearman implausibly low")


def check_text() -> None:
    print("== text")
    for dataset in text_data.WORD_SETS:
        pairs, scores = text_data.word_pairs(dataset)
        print(f"  {dataset}: {len(pairs)} pairs, scores {scores.min():.2f}..{scores.max():.2f}, e.g. {pairs[0]}")
    calib, evaluation = text_data.wiki_articles("calib"), text_data.wiki_articles("eval")
    check(not {t for t, _ in calib} & {t for t, _ in evaluation}, "calib and eval articles overlap")
    for split, arts in (("calib", calib), ("eval", evaluation)):
        print(f"  wiki {split}: {len(arts)} articles, {sum(len(t) for _, t in arts):,} characters, "
              f"{len(text_data.wiki_sentences(split)):,} sentences; first: {arts[0][0]!r}")


if __name__ == "__main__":
    check_images()
    check_mobilenet()
    check_text()
    check_minilm()
    print("all assets OK")
