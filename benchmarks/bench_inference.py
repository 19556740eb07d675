"""Fast-SCNN inference frames per second at batch 1, as a deployment runs it: BatchNorm folded, channels_last,
weights and input converted to the dtype (no autocast), with and without ``torch.compile``.

    python -m benchmarks.bench_inference                                  # fp16 at 2048x1024 and 1024x512
    python -m benchmarks.bench_inference --sizes 2048x1024 --no-compile
    python -m benchmarks.bench_inference --device cpu --dtype fp32 --sizes 256x128 --runs 3 --warmup 1   # a smoke run

The timing is :func:`fastseg.measure.benchmark_speed`'s, the one behind evaluate_efficiency.py (fp32 with TF32
off). Random weights and input: the cost does not depend on them. Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse

import torch

from fastseg import measure
from fastseg.distributed import nvidia_driver, resolve_device, torch_build
from fastseg.errors import run_cli
from fastseg.models import build_model


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_size, nargs="+", default=[(2048, 1024), (1024, 512)], metavar="WxH")
    p.add_argument("--dtype", choices=tuple(measure.DTYPES), default="fp16")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the torch.compile'd model (--no-compile: the plain one only)")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        major, minor = torch.cuda.get_device_capability(device)
        where = (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), "
                 f"{nvidia_driver() or 'driver unknown (no nvidia-smi)'}")
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; {torch_build()}, cuDNN {torch.backends.cudnn.version()}")
    print(f"Fast-SCNN, batch 1, {args.dtype} weights and input, BatchNorm folded, channels_last; median of "
          f"{args.runs} runs after {args.warmup} warm-up")
    print("| input (WxH) | torch.compile | latency ms (median) | latency ms (p90) | FPS |")
    print("|---|---|---|---|---|")
    model = build_model("fast_scnn").eval()
    for width, height in args.sizes:
        for compiled in (False, True) if args.compile else (False,):
            speed = measure.benchmark_speed(model, (height, width), device, dtypes=(args.dtype,), runs=args.runs,
                                            warmup=args.warmup, throughput_batch=1, compile_model=compiled)
            row = speed["by_dtype"][args.dtype]
            print(f"| {width}x{height} | {'yes' if compiled else 'no'} | {row['latency_ms']:.2f} | "
                  f"{row['latency_p90_ms']:.2f} | {row['fps_batch1']:.1f} |", flush=True)


if __name__ == "__main__":
    run_cli(main)
