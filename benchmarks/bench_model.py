"""Forward latency and MACs of a model at the five curriculum resolutions, on this machine.

    python -m benchmarks.bench_model                          # Fast-SCNN, CUDA (fp16 weights) if present, else CPU
    python -m benchmarks.bench_model --arch lraspp_mobilenet_v3_large --runs 50
    python -m benchmarks.bench_model --fold-bn --channels-last --batch-size 4

Prints figures only; nothing is asserted. Latency is the median over ``--runs`` timed forward passes after
``--warmup`` untimed ones (eval mode, no grad, random weights and input: the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fast_scnn import fold_batchnorm
from fastseg.cityscapes import PROFILES
from fastseg.errors import UserError, run_cli
from fastseg.flops import count_macs, count_params
from fastseg.models import ARCHS, build_model


def time_forward(model, x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Seconds per forward pass, ``runs`` of them."""
    cuda = x.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()  # kernels run asynchronously; wait for them before reading the clock
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="fast_scnn", choices=ARCHS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=None, help="timed passes (default 50 on CUDA, 5 on CPU)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed passes (default 10 on CUDA, 1 on CPU)"
    )
    parser.add_argument("--profiles", type=int, nargs="+", choices=sorted(PROFILES), default=sorted(PROFILES))
    parser.add_argument(
        "--fold-bn", action="store_true", help="fold BatchNorm into the convs (Fast-SCNN only)"
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-amp", action="store_true", help="time CUDA in fp32 (TF32 off) instead of fp16")
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    runs = args.runs or (50 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    amp = cuda and not args.no_amp
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes per profile: let cuDNN pick its fastest kernels
        # "fp32" means fp32: cuDNN would otherwise use TF32 on Ampere and later.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    model = build_model(args.arch).eval()
    if args.fold_bn:
        model = fold_batchnorm(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # fp16 as a deployment runs it: weights and input converted, no autocast casting weights on every call.
    dtype = torch.float16 if amp else torch.float32
    model = model.to(device, dtype, memory_format=memory_format)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch}: {count_params(model):,} parameters on {name}")
    print(
        f"batch {args.batch_size}, {'fp16 weights and input' if amp else 'fp32 (no TF32)'}, "
        f"{'channels_last' if args.channels_last else 'contiguous'}, "
        f"{'BN folded, ' if args.fold_bn else ''}median of {runs} runs after {warmup} warm-up"
    )
    print("MACs per image (FLOPs = 2 × MACs)")
    print(f"{'profile':>7}  {'W×H':>10}  {'GMACs':>7}  {'ms/batch':>9}  {'images/s':>9}")
    for index in args.profiles:
        width, height = PROFILES[index].resize
        x = torch.randn(args.batch_size, 3, height, width, device=device, dtype=dtype)
        x = x.to(memory_format=memory_format)
        seconds = statistics.median(time_forward(model, x, runs, warmup))
        macs = count_macs(model, (height, width))
        print(
            f"{index:>7}  {f'{width}×{height}':>10}  {macs / 1e9:7.3f}  {seconds * 1e3:9.2f}"
            f"  {args.batch_size / seconds:9.1f}"
        )


if __name__ == "__main__":
    run_cli(main)
