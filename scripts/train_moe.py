"""Train the reference byte-level MoE language model (models/moe_lm.py) and its dense twin.

    python scripts/train_moe.py --write-data DIR            # the packaged text as train/heldout bytes (CPU)
    python scripts/train_moe.py --data DIR [--dense] [--steps 6000] [--out models/checkpoints/moe_lm.pt]

Trains from scratch with AdamW (cosine learning rate, warm-up) on random 256-byte windows of the
training text, next-byte cross-entropy plus, for the MoE, the Switch Transformer load-balancing loss
(E · Σₑ fₑ·Pₑ, weight 0.01) so that every expert is used. Uses CUDA when torch sees a GPU. Prints and
writes (beside the checkpoint, .log.json) the held-out bits per byte as it goes, the unigram baseline,
and each layer's share of held-out tokens per expert.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from onnxq_models import byte_lm, moe_lm


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout", "calib"):
        data = moe_lm.corpus(split)
        (folder / f"{split}.bin").write_bytes(data)
        print(f"{split}: {len(data)} bytes")


def expert_shares(model, batches) -> list[list[float]]:
    """Per MoE layer: the share of tokens whose top-k includes each expert."""
    totals = None
    with torch.no_grad():
        for x in batches:
            model(x)
            counts = [(r.last_gates > 0).float().sum((0, 1)) for r in model.routers()]
            totals = counts if totals is None else [a + b for a, b in zip(totals, counts)]
    return [[round(float(v), 3) for v in layer / layer.sum() * model.config.top_k] for layer in totals or []]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-data", type=Path, help="write train/heldout/calib .bin files here and stop")
    parser.add_argument("--data", type=Path, help="folder with train.bin and heldout.bin")
    parser.add_argument("--dense", action="store_true", help="train the dense twin instead of the MoE")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="checkpoint (default models/checkpoints/{moe,dense}_lm.pt)")
    args = parser.parse_args()
    if args.write_data:
        return write_data(args.write_data)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = moe_lm.MoEConfig(experts=0 if args.dense else 8)
    train = np.frombuffer((args.data / "train.bin").read_bytes(), np.uint8).astype(np.int64)
    heldout = np.frombuffer((args.data / "heldout.bin").read_bytes(), np.uint8).astype(np.int64)
    test_windows = torch.from_numpy(moe_lm.windows(heldout.astype(np.uint8).tobytes(), 256, config.seq_len)).to(device)
    model = moe_lm.build(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = np.random.default_rng(args.seed)
    log = {"config": asdict(config), "args": {
        k: str(v) for k, v in vars(args).items()}, "device": device,
           "parameters": sum(p.numel() for p in model.parameters()),
           "unigram_heldout_bits_per_byte": byte_lm.unigram_bits(train, heldout), "curve": []}
    start = time.time()

    def heldout_bits() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(float(torch.nn.functional.cross_entropy(model(w)[:, :-1].reshape(-1, 256), w[:, 1:].reshape(-1),
                                                                 reduction="sum")) for w in test_windows.split(32))
        model.train()
        return total / (test_windows.shape[0] * (config.seq_len - 1)) / math.log(2)

    for step in range(args.steps + 1):
        if step % 500 == 0 or step == args.steps:
            point = {"step": step, "heldout_bits_per_byte": round(heldout_bits(), 4), "seconds": round(time.time() - start, 1)}
            log["curve"].append(point)
            print(point, flush=True)
        if step == args.steps:
            break
        starts = rng.integers(0, len(train) - config.seq_len - 1, args.batch)
        x = torch.from_numpy(np.stack([train[s:s + config.seq_len] for s in starts])).to(device)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
        for router in model.routers():  # Switch load balancing: fraction routed × mean probability
            routed = (router.last_gates > 0).float().mean((0, 1)) / config.top_k
            loss = loss + 0.01 * config.experts * (routed * router.last_probs.mean((0, 1))).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()

    model.eval()
    log["heldout_bits_per_byte"] = log["curve"][-1]["heldout_bits_per_byte"]
    log["expert_shares"] = expert_shares(model, test_windows.split(32)) if config.experts else []
    log["train_seconds"] = round(time.time() - start, 1)
    out = args.out or moe_lm.checkpoint_path(args.dense)
    out.parent.mkdir(parents=True, exist_ok=True)
    moe_lm.save(model.cpu(), out, {"training": {k: v for k, v in log.items() if k != "curve"}})
    out.with_suffix(".log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
