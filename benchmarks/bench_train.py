"""Training throughput per curriculum profile: images/s of full training steps (forward, loss, backward, optimiser).

Batches are random uint8 crops of each profile's patch size, put through ``train.py``'s own
``train_one_epoch`` (jitter, normalisation, AMP, the stop/NaN check every ``--check-every`` steps), so the
figure is the model's pace without the loader (``benchmarks/bench_data.py`` measures the loader). On CUDA it
uses AMP (``--amp auto``'s choice: bf16 from compute capability 8.0, else fp16 with a GradScaler) and
channels_last, as the trainer does, and reports the peak memory PyTorch's allocator held during the timed steps. Under torchrun every process trains
its own batches through DistributedDataParallel and the figure is the sum over processes.

    python -m benchmarks.bench_train                         # every profile, CPU or GPU
    python -m benchmarks.bench_train --profiles 1 2 --batch-size 8 --steps 10
    python -m benchmarks.bench_train --profiles 1 5 --batch-size 16 --steps 186   # one Cityscapes epoch (2975 images)
    python -m benchmarks.bench_train --distill                # with a frozen teacher's forward, as train_distillation.py
    torchrun --nproc-per-node 2 -m benchmarks.bench_train --profiles 1 --check-every 1   # agree every step
"""

from __future__ import annotations

import argparse
import time

import torch

import train
from fastseg import distributed
from fastseg.cityscapes import PROFILES
from fastseg.engine import resolve_amp
from fastseg.losses import DistillationLoss
from fastseg.models import build_model
from fastseg.optim import RECIPES, build_optimizer
from fastseg.stopping import StopFlag
from fastseg.tracking import Progress


def random_batches(n: int, batch_size: int, patch_hw: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = patch_hw
    images = torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 19, (batch_size, h, w), dtype=torch.uint8, generator=gen)
    return [(images, labels, torch.arange(batch_size))] * n


def measure(profile: int, args, device: torch.device, info) -> tuple[float, float | None]:
    """Training images/s (all processes) and, on CUDA, this process's peak allocated memory in MiB."""
    torch.manual_seed(0)
    recipe = RECIPES[args.recipe]
    model = build_model("fast_scnn", aux=recipe["aux"]).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe["optimizer"], 1e-3, recipe["weight_decay"], 0.9)
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
        objective, _ = train.build_objective(args, device, model)
    trained = model
    if info.distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    patch_hw = PROFILES[profile].patch_hw

    def epoch(steps: int) -> None:
        batches = random_batches(steps, args.batch_size, patch_hw, seed=info.rank)
        train.train_one_epoch(trained, objective, optimizer, scheduler, batches, device, 0, args, StopFlag(),
                              Progress(total=steps, enabled=False), scaler, amp, info.world_size)

    epoch(args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    epoch(args.steps)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return args.steps * args.batch_size * info.world_size / (time.perf_counter() - t0), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, nargs="+", default=sorted(PROFILES), choices=sorted(PROFILES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--fp32", action="store_true", help="no AMP on CUDA")
    p.add_argument("--distill", action="store_true", help="add a frozen Fast-SCNN teacher's forward")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=train.RECIPE,
                   help="the recipe's optimiser and auxiliary heads (its scale augmentation is the loader's)")
    p.add_argument("--check-every", type=int, default=train.CHECK_EVERY,
                   help="steps between the all-rank stop/NaN checks (1: a host sync every step)")
    args = p.parse_args()
    info = distributed.env_dist_info()
    device = distributed.resolve_device(args.device, info.local_rank)
    info = distributed.init_distributed(device, info)
    say = print if info.is_main else (lambda *a, **k: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    amp = resolve_amp("auto" if not args.fp32 else "off", device)
    say(f"device: {name} x {info.world_size} processes; {distributed.torch_build()}; recipe {args.recipe}; "
        f"batch {args.batch_size} per process; AMP {str(amp).removeprefix('torch.') if amp else 'off (fp32)'}; "
        f"{args.steps} timed steps after {args.warmup} warm-up; checks every {args.check_every} steps"
        + ("; with a teacher" if args.distill else ""))
    say("| profile | patch (WxH) | train images/s | ms per step | s per Cityscapes epoch (2975 images) "
        "| peak memory per GPU (MiB) |")
    say("|---|---|---|---|---|---|")
    for k in args.profiles:
        rate, peak = measure(k, args, device, info)
        w, h = PROFILES[k].patch
        say(f"| {k} | {w}x{h} | {rate:.1f} | {1000 * args.batch_size * info.world_size / rate:.1f} | "
            f"{2975 / rate:.0f} | {'-' if peak is None else f'{peak:.0f}'} |", flush=True)
    distributed.cleanup()


if __name__ == "__main__":
    main()
