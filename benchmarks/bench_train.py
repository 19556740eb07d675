"""Training throughput per curriculum profile: images/s of full training steps (forward, loss, backward, AdamW).

Batches are random uint8 crops of each profile's patch size, put through the same ``prepare_batch`` (jitter,
normalisation) and ``train_one_epoch`` as ``train.py``, so the figure is the model's pace without the loader
(``benchmarks/bench_data.py`` measures the loader). On CUDA it uses AMP (bf16 where supported) and
channels_last, as the trainer does.

    python -m benchmarks.bench_train                         # every profile, CPU or GPU
    python -m benchmarks.bench_train --profiles 1 2 --batch-size 8 --steps 10
    python -m benchmarks.bench_train --distill                # with a frozen teacher's forward, as train_distillation.py
"""

from __future__ import annotations

import argparse
import time

import torch

from fastseg.cityscapes import PROFILES
from fastseg.distributed import resolve_device
from fastseg.engine import StepContext, supervised_objective, train_one_epoch
from fastseg.losses import DistillationLoss, SegmentationLoss
from fastseg.models import build_model
from fastseg.stage import build_optimizer, resolve_amp


def random_batches(n: int, batch_size: int, patch_hw: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = patch_hw
    images = torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 19, (batch_size, h, w), dtype=torch.uint8, generator=gen)
    return [(images, labels, torch.arange(batch_size))] * n


def measure(profile: int, args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model("fast_scnn").to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9}
    optimizer = build_optimizer(cfg, model)
    amp = resolve_amp("auto" if not args.fp32 else "off", device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    if args.distill:
        teacher = build_model("fast_scnn").to(device).eval().requires_grad_(False)
        criterion = DistillationLoss()

        def objective(m, x, y):
            with torch.no_grad():
                t = teacher(x)
            return criterion(m(x), t, y)
    else:
        objective = supervised_objective(SegmentationLoss())
    ctx = StepContext(model, objective, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      scaler, device, amp, channels_last, seed=0)
    patch_hw = PROFILES[profile].patch_hw
    train_one_epoch(ctx, random_batches(args.warmup, args.batch_size, patch_hw), epoch=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_one_epoch(ctx, random_batches(args.steps, args.batch_size, patch_hw), epoch=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, nargs="+", default=sorted(PROFILES), choices=sorted(PROFILES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--fp32", action="store_true", help="no AMP on CUDA")
    p.add_argument("--distill", action="store_true", help="add a frozen Fast-SCNN teacher's forward")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch_size}; {args.steps} timed steps after {args.warmup} warm-up"
          + ("; with a teacher" if args.distill else ""))
    print("| profile | patch (WxH) | train images/s |")
    print("|---|---|---|")
    for k in args.profiles:
        rate = measure(k, args, device)
        w, h = PROFILES[k].patch
        print(f"| {k} | {w}x{h} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
