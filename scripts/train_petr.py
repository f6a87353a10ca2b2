#!/usr/bin/env python3
"""Train PETR-tiny on the synthetic multi-view data set, or evaluate a checkpoint.

The committed checkpoints were trained in three stages on one H100 (logs in scripts/logs/, see
scripts/logs/README.md); to repeat them, run with the step counts the logs fixed:

    # stage 1: original PETR position embedding (LID depth bins), from scratch
    python scripts/train_petr.py --steps 2996 --lr 2e-4 --out .cache/petr_checkpoints/petr_tiny_lid_stage1.pt
    # stage 2: both continue from stage 1, the QFPE variant with a fresh PE module (rest initialised from it)
    python scripts/train_petr.py --init .cache/petr_checkpoints/petr_tiny_lid_stage1.pt --steps 2701 --lr 2e-4 \
        --warmup 200 --out .cache/petr_checkpoints/petr_tiny_lid_stage2.pt
    python scripts/train_petr.py --qfpe --init .cache/petr_checkpoints/petr_tiny_lid_stage1.pt --steps 2652 \
        --lr 2e-4 --warmup 200 --out .cache/petr_checkpoints/petr_tiny_qfpe_stage1.pt
    # stage 3: one more cosine cycle each
    python scripts/train_petr.py --init .cache/petr_checkpoints/petr_tiny_lid_stage2.pt --steps 2828 --lr 2e-4 \
        --warmup 200 --out models/checkpoints/petr_tiny_lid.pt
    python scripts/train_petr.py --qfpe --init .cache/petr_checkpoints/petr_tiny_qfpe_stage1.pt --steps 2841 \
        --lr 2e-4 --warmup 200 --out models/checkpoints/petr_tiny_qfpe.pt
    # stage 4 (QFPE only): quantization-aware fine-tune, per-tensor INT8 layer inputs and weights simulated
    # (models/petr_qat.py); the petr-w8a8 and petr-full-int8 recipes swap in this checkpoint's weights file
    python scripts/train_petr.py --qfpe --qat --qat-weights --init models/checkpoints/petr_tiny_qfpe.pt --steps 2262 \
        --lr 1.5e-4 --warmup 100 --out models/checkpoints/petr_tiny_qfpe_qat.pt \
        --weights-out onnxq/recipes/data/petr_tiny_qfpe_qat.npz
    # evaluation on the validation split (CPU; the split is rendered once and cached under .cache/)
    python scripts/train_petr.py --eval-only --init models/checkpoints/petr_tiny_lid.pt --val-scenes 300 --device cpu
    # tiny end-to-end run on the CPU
    python scripts/train_petr.py --smoke

A QFPE run also writes the weights file the qfpe pass reads (plain arrays in an .npz, never a pickle:
onnxq_models.petr_export.write_qfpe_weights) beside its checkpoint, or to --weights-out; stage 3's
models/checkpoints/petr_tiny_qfpe.npz is what scripts/bench_petr.py's `_ptq` rows swap in. `--convert
CHECKPOINT` writes it for an existing checkpoint. Run where onnxq and onnxq_models are installed
(`bash scripts/setup.sh`; on a training machine with torch already, `pip install -e . -e ./models`).

Training scenes are rendered on the training device as they are needed: step s of a run uses train
scenes s·B .. s·B + B - 1 (each run starts again at scene 0), so a run is reproducible from
--data-seed and --seed up to GPU non-determinism. With --time-budget the step count is fixed after
timing the first 30 steps and logged, so a run can be repeated with --steps (the learning-rate
schedule is then the same).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from onnxq_models import petr, petr_data, petr_eval, petr_qat


class Log:
    """Prints to stdout and appends to a log file."""

    def __init__(self, path: str | None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")  # noqa: SIM115 (appended to for the whole run)

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qfpe", action="store_true", help="use the QFPE position embedding")
    p.add_argument("--feature-guided-pe", action="store_true", help="PETRv2's SE gating of the PE")
    p.add_argument("--init", help="checkpoint to start from (its PE weights are skipped if the PE type differs)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--time-budget", type=float, default=None, help="seconds: fix --steps from the speed of the first steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--grad-clip", type=float, default=35.0)
    p.add_argument("--workers", type=int, default=6, help="scene-sampling workers when training on a GPU")
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set (train and val)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--val-scenes", type=int, default=300)
    p.add_argument("--train-val-scenes", type=int, default=96, help="val scenes evaluated during training")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", help="checkpoint path")
    p.add_argument("--log", help="log file (appended)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --init on the val split and exit")
    p.add_argument("--json", help="with --eval-only: write the metrics here")
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware: fake-quantize every Linear/Conv2d input to per-tensor INT8 (models/petr_qat.py)")
    p.add_argument("--qat-weights", action="store_true", help="with --qat, also fake-quantize Linear and biased Conv2d weights")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps on the CPU, end to end")
    p.add_argument("--weights-out", help="where a QFPE model's weights file for the qfpe pass goes (default: --out as .npz)")
    p.add_argument("--convert", metavar="CHECKPOINT", help="no training: write CHECKPOINT's weights file for the qfpe "
                   "pass (to --weights-out, default beside it as .npz) and exit")
    args = p.parse_args(argv)
    if args.qat_weights and not args.qat:
        p.error("--qat-weights only applies with --qat")
    if args.smoke:
        args.device, args.steps, args.batch_size, args.warmup = "cpu", 4, 2, 2
        args.train_val_scenes, args.val_scenes, args.eval_every, args.log_every = 4, 4, 1000, 1
    return args


def rig_img2lidar(rig, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(rig.img2lidar(), dtype=torch.float32, device=device)[None].expand(batch, -1, -1, -1)


@torch.no_grad()
def predict(model, data, rig, device, batch_size: int = 16) -> list:
    """Detections of `model` on every scene of a DetectionBatch."""
    model.eval()
    detections = []
    for start in range(0, len(data.images), batch_size):
        images = petr_data.images_to_input(data.images[start:start + batch_size].to(device))
        logits, regs = model(images, rig_img2lidar(rig, len(images), device))
        boxes = petr.metric_boxes(regs[-1]).cpu().numpy()
        logits = logits[-1].cpu().numpy()
        detections += [petr_eval.decode_detections(logits[i], boxes[i]) for i in range(len(images))]
    return detections


def evaluate_model(model, data, rig, device):
    detections = predict(model, data, rig, device)
    truths = [petr_eval.GroundTruth(b.cpu().numpy(), l.cpu().numpy()) for b, l in zip(data.gt_boxes, data.gt_labels)]
    return petr_eval.evaluate(detections, truths, petr_data.CLASS_NAMES)


@torch.no_grad()
def pe_feature_ranges(model, data, rig, device, num_scenes: int = 16) -> dict:
    """Abs-max and 99.9th percentile of |memory| (image features after input_proj), |PE| (as added to
    the memory, i.e. after feature gating) and |memory + PE|; and how many INT8 steps the features
    span under one per-tensor scale for memory + PE (what naive W8A8 quantizes at the K projection)."""
    model.eval()
    images = petr_data.images_to_input(data.images[:num_scenes].to(device))
    feats = model.image_features(images)
    pe = model.position_embed(rig_img2lidar(rig, len(images), device))
    if model.feature_guided_pe is not None:
        pe = model.feature_guided_pe(pe, feats)
    pe = pe.expand_as(feats)

    def stats(x):
        a = x.abs().flatten().float()
        a = a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:4_000_000].to(a.device)]
        return {"absmax": float(x.abs().max()), "p99.9": float(torch.quantile(a, 0.999)), "std": float(x.std())}

    out = {"memory": stats(feats), "pe": stats(pe), "memory_plus_pe": stats(feats + pe)}
    step = out["memory_plus_pe"]["absmax"] / 127
    out["memory_int8_steps_under_sum_scale"] = out["memory"]["p99.9"] / step
    out["pe_to_memory_absmax_ratio"] = out["pe"]["absmax"] / out["memory"]["absmax"]
    return out


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up from base/3 (PETR's warmup_ratio), then cosine annealing to base/1000."""
    if step < warmup:
        return base * (1 / 3 + (2 / 3) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args, log) -> petr.PETR:
    torch.manual_seed(args.seed)
    cfg = petr.PETRConfig(pe_type="qfpe" if args.qfpe else "lid", feature_guided_pe=args.feature_guided_pe)
    model = petr.PETR(cfg)
    if args.init:
        init, _meta = petr.load_checkpoint(args.init)
        source = init.state_dict()
        own = model.state_dict()
        loaded = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape
                  and not (k.startswith("position_embedding.") and init.cfg.pe_type != cfg.pe_type)}
        model.load_state_dict(loaded, strict=False)
        skipped = sorted(set(own) - set(loaded))
        log(f"init from {args.init}: {len(loaded)} tensors loaded; fresh: {skipped}")
    return model


def main(argv=None):
    args = parse_args(argv)
    log = Log(args.log)
    log("=" * 100)
    log("command:", "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    log(f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    device = torch.device(args.device)
    rig = petr_data.CameraRig()

    if args.convert:
        model, _ = petr.load_checkpoint(args.convert)
        write_weights(model, args.weights_out or Path(args.convert).with_suffix(".npz"), log)
        return None
    if args.eval_only:
        model, meta = petr.load_checkpoint(args.init)
        model.to(device)
        data = petr_data.load_split("val", args.val_scenes, args.data_seed, rig)
        result = evaluate_model(model, data, rig, device)
        ranges = pe_feature_ranges(model, data, rig, device)
        log(f"{args.init} ({petr.count_parameters(model)} parameters) on {args.val_scenes} val scenes:")
        log(result.summary())
        log("ranges:", json.dumps(ranges, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"eval": result.as_dict(), "ranges": ranges}, indent=1))
        return result

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model = build_model(args, log).to(device)
    log(f"config: {model.cfg}")
    log(f"parameters: {petr.count_parameters(model)}")
    train_set = petr_data.SyntheticDetectionSet("train", args.data_seed, rig, device)
    val_set = petr_data.SyntheticDetectionSet("val", args.data_seed, rig, device)
    val_data = val_set.render(list(range(args.train_val_scenes)))
    fake_quant = petr_qat.attach(model, weights=args.qat_weights) if args.qat else None
    criterion = petr.HungarianLoss(model.cfg.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    img2lidar = rig_img2lidar(rig, args.batch_size, device)

    # Scenes are sampled (numpy, CPU) by loader workers; rendering and training run on the device.
    stream = petr_data.SceneStream("train", args.data_seed, args.batch_size, 10**8)
    workers = 0 if device.type == "cpu" else args.workers
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                              prefetch_factor=8 if workers else None))
    total_steps, start = args.steps, time.time()
    step_times = []
    for step in range(10**9):
        if step >= total_steps:
            break
        t0 = time.time()
        model.train()
        indices, scenes = next(loader)
        batch = train_set.render(indices, scenes)
        lr = lr_at(step, total_steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, regs = model(petr_data.images_to_input(batch.images), img2lidar)
        loss, parts = criterion(logits, regs, batch.gt_boxes, batch.gt_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step_times.append(time.time() - t0)
        if args.time_budget and step == 29:
            per_step = float(np.median(step_times[5:]))
            total_steps = max(30, int(args.time_budget / per_step))
            log(f"time budget {args.time_budget:.0f} s at {per_step * 1000:.1f} ms/step: --steps {total_steps}")
        if step % args.log_every == 0 or step == total_steps - 1:
            log(f"step {step:5d}/{total_steps} loss {float(loss.detach()):.4f} cls {parts['cls']:.4f} box {parts['box']:.4f} "
                f"grad {float(grad_norm):.2f} lr {lr:.2e} {np.mean(step_times[-args.log_every:]) * 1000:.0f} ms/step "
                f"elapsed {time.time() - start:.0f} s")
        if (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
            log(f"step {step + 1} val({args.train_val_scenes}): {evaluate_model(model, val_data, rig, device).summary()}")

    if args.qat:
        log(f"final val({args.train_val_scenes} scenes), INT8 inputs simulated: {evaluate_model(model, val_data, rig, device).summary()}")
        petr_qat.detach(fake_quant)  # the checkpoint is an ordinary float model
    result = evaluate_model(model, val_data, rig, device)
    log(f"final val({args.train_val_scenes} scenes, rendered on {device.type}): {result.summary()}")
    ranges = pe_feature_ranges(model, val_data, rig, device)
    log("PE vs image-feature ranges:", json.dumps(ranges, indent=1))
    if args.out:
        meta = {"command": " ".join(sys.argv), "steps": total_steps, "batch_size": args.batch_size,
                "train_seconds": time.time() - start, "device": args.device,
                "val_subset": {"scenes": args.train_val_scenes, "mAP": result.mAP, "NDS": result.NDS},
                "ranges": ranges}
        petr.save_checkpoint(model.cpu(), args.out, meta)
        log(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")
        if model.cfg.pe_type == "qfpe":
            write_weights(model, args.weights_out or Path(args.out).with_suffix(".npz"), log)
    return result


def write_weights(model, path: str | Path, log) -> None:
    """The weights file the qfpe pass reads (plain arrays, no pickle); needs onnxq for the export."""
    from onnxq_models import petr_export

    try:
        petr_export.write_qfpe_weights(model.cpu().eval(), path)
    except ImportError as exc:  # a training machine with onnxq_models but not onnxq's dependencies
        log(f"no weights file written ({exc}); where onnxq is installed run: "
            f"python scripts/train_petr.py --convert CHECKPOINT --weights-out {path}")
        return
    log(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB), the weights file for the qfpe pass")


if __name__ == "__main__":
    main()
