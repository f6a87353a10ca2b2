"""Train the reference byte-level recurrent LMs: RWKV-4 (models/rwkv_lm.py) and Mamba (models/mamba_lm.py).

    python scripts/train_moe.py --write-data DIR                   # the packaged text as bytes (CPU)
    python scripts/train_recurrent.py --model rwkv|mamba --data DIR [--steps 4000] [--out FILE]

Trains from scratch with AdamW (cosine learning rate after a warm-up, gradient clipping at 1) on random
256-byte windows of the training text, next-byte cross-entropy. Uses CUDA when torch sees a GPU. Prints
and writes (beside the checkpoint, .log.json) the held-out bits per byte as it goes (256 windows of the
held-out articles) and the unigram baseline. The text is the MoE LM's (moe_lm.corpus).
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

from onnxq_models import byte_lm, mamba_lm, moe_lm, rwkv_lm

MODELS = {"rwkv": (rwkv_lm.RWKVConfig, rwkv_lm.build, rwkv_lm.CHECKPOINT),
          "mamba": (mamba_lm.MambaConfig, mamba_lm.build, mamba_lm.CHECKPOINT)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with train.bin and heldout.bin")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--budget-seconds", type=float, default=0,
                        help="fewer steps if the first 50 show that --steps would take longer than this")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--out", type=Path, help="checkpoint (default: the model's committed checkpoint path)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config_type, build, default_out = MODELS[args.model]
    config = config_type()
    train = np.frombuffer((args.data / "train.bin").read_bytes(), np.uint8).astype(np.int64)
    heldout = np.frombuffer((args.data / "heldout.bin").read_bytes(), np.uint8)
    test_windows = torch.from_numpy(moe_lm.windows(heldout.tobytes(), args.eval_windows, config.seq_len)).to(device)
    model = build(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    plan = {"steps": args.steps, "warmup": max(1, args.steps // 20)}  # steps may shrink to the time budget
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / plan["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(s, plan["steps"]) / plan["steps"])))
    rng = np.random.default_rng(args.seed)
    log = {"model": args.model, "config": asdict(config), "args": {k: str(v) for k, v in vars(args).items()},
           "device": device, "parameters": sum(p.numel() for p in model.parameters()),
           "unigram_heldout_bits_per_byte": byte_lm.unigram_bits(train, heldout.astype(np.int64)), "curve": []}
    start = time.time()
    log["steps"] = args.steps

    def heldout_bits() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(float(torch.nn.functional.cross_entropy(model(w)[:, :-1].reshape(-1, 256), w[:, 1:].reshape(-1),
                                                                 reduction="sum")) for w in test_windows.split(16))
        model.train()
        return total / (test_windows.shape[0] * (config.seq_len - 1)) / math.log(2)

    step = 0
    while True:
        if step == 50 and args.budget_seconds:
            per_step = (time.time() - start) / 50
            plan["steps"] = max(step, min(args.steps, int(args.budget_seconds / per_step)))
            log["steps"] = plan["steps"]
        if step % 500 == 0 or step == plan["steps"]:
            point = {"step": step, "heldout_bits_per_byte": round(heldout_bits(), 4), "seconds": round(time.time() - start, 1)}
            log["curve"].append(point)
            print(args.model, point, flush=True)
        if step == plan["steps"]:
            break
        starts = rng.integers(0, len(train) - config.seq_len - 1, args.batch)
        x = torch.from_numpy(np.stack([train[s:s + config.seq_len] for s in starts])).to(device)
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1

    model.eval()
    log["heldout_bits_per_byte"] = log["curve"][-1]["heldout_bits_per_byte"]
    log["heldout_perplexity_per_byte"] = round(2.0 ** log["heldout_bits_per_byte"], 4)
    log["train_seconds"] = round(time.time() - start, 1)
    out = args.out or default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    byte_lm.save(model.cpu(), out, {"training": {k: v for k, v in log.items() if k != "curve"}})
    out.with_suffix(".log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
