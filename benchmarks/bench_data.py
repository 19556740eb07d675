"""Train-loader throughput: the cached loader of fastseg.data against the plain torchvision pipeline.

    python benchmarks/bench_data.py --data-dir data/cityscapes --profile 1
    python benchmarks/bench_data.py --profile 5 --mode both --batches 30 --workers 2 --batch-size 8
    python benchmarks/bench_data.py --profile 5 --mode fast --batches 60 --scale-aug

fast:  fastseg.data.SegmentationDataset + build_loader (cached, pre-resized uint8 arrays; crop and flip in
       the workers) and prepare_batch on the CPU (colour jitter, normalisation), i.e. everything up to
       the float batch a model takes. Printed first: the CPU time of one item in one process (the crop's
       own cost, which other jobs on the machine do not change); then the loader alone (uint8 batches),
       which is the CPU's share on a GPU node, where prepare_batch runs on the GPU. With --scale-aug each
       figure is followed by the same measurement with the random scale 0.5-2.0 before the crop, and its
       ratio to the first.
plain: torchvision Cityscapes(target_type="semantic") decoding the PNGs at every step, transforms.v2
       Resize/RandomCrop/RandomHorizontalFlip/ColorJitter(0.3, 0.3, 0.3, 0.1)/Normalize, label ids
       mapped to train ids with Tensor.apply_.

The cache is built first when missing, and its time reported on its own line. Without --data-dir a
synthetic set of full-size (2048×1024) images is generated once into the temp directory and reused.
The last line is ``images/s X`` for the fast loader without scale aug (the plain one's when --mode
plain).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastseg.augment import (  # noqa: E402
    JITTER_BRIGHTNESS,
    JITTER_CONTRAST,
    JITTER_HUE,
    JITTER_SATURATION,
    prepare_batch,
)
from fastseg.cache import open_cache  # noqa: E402
from fastseg.cityscapes import (  # noqa: E402
    ID_TO_TRAIN_ID,
    MEAN,
    PROFILES,
    STD,
    Profile,
    get_profile,
    list_samples,
)
from fastseg.data import SegmentationDataset, build_loader  # noqa: E402
from fastseg.errors import UserError, run_cli  # noqa: E402


def synthetic_dir(n: int, width: int, height: int) -> Path:
    """A synthetic Cityscapes-layout set in the temp directory, generated on first use."""
    from tools.synthetic import VERSION, generate

    # The version in the name: a set left by an older generator is not this one (the generator refuses it).
    out = Path(tempfile.gettempdir()) / f"fastseg-bench-{width}x{height}-{n}-v{VERSION}"
    print(f"synthetic data: {n} training images of {width}x{height} in {out} (generated once)", flush=True)
    return generate(out, train=n, val=0, width=width, height=height, seed=0)


def timed_batches(loader, batches: int, warmup: int, step=None) -> tuple[float, float]:
    """(images/s, seconds) over ``batches`` batches after ``warmup``; epochs restart as needed."""
    done, images, epoch = 0, 0, 0
    t0 = time.perf_counter()  # reset when the warm-up ends
    while done < warmup + batches:
        if hasattr(loader.sampler, "set_epoch"):  # the plain torchvision pipeline has none
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            if step is not None:
                step(batch)
            done += 1
            if done == warmup:
                t0 = time.perf_counter()
            elif done > warmup:
                images += batch[0].shape[0]
            if done == warmup + batches:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    return images / seconds, seconds


def item_cpu_ms(dataset: SegmentationDataset, items: int) -> float:
    """CPU milliseconds per training item (cache read, crop, flip) in this process on one torch thread, as in
    a loader worker: unlike images/s, other processes sharing the cores leave it unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        keys = [(0, k // len(dataset), k % len(dataset)) for k in range(items)]
        dataset[keys[0]]
        t0 = time.thread_time()
        for key in keys:
            dataset[key]
        return (time.thread_time() - t0) / items * 1e3
    finally:
        torch.set_num_threads(threads)


def bench_fast(args, profile: Profile) -> float:
    samples = list_samples(args.data_dir, "train")
    present = open_cache(args.data_dir, "train", samples, profile.resize_hw, args.cache_dir, build=False)
    t0 = time.perf_counter()
    datasets = {
        scale_aug: SegmentationDataset(
            args.data_dir, "train", profile, train=True, cache_dir=args.cache_dir, scale_aug=scale_aug
        )
        for scale_aug in ([False, True] if args.scale_aug else [False])
    }
    took = time.perf_counter() - t0
    print(
        f"cache: {'present, opened' if present else 'built'} in {took:.1f} s ({len(datasets[False])} images)",
        flush=True,
    )
    loaders = {
        s: build_loader(ds, args.batch_size, args.workers, shuffle=True, seed=0) for s, ds in datasets.items()
    }
    generator = torch.Generator().manual_seed(0)

    def step(batch):
        prepare_batch(batch[0], batch[1], "cpu", train=True, generator=generator)

    cpu = {s: item_cpu_ms(ds, args.batches * args.batch_size) for s, ds in datasets.items()}
    versus = f"; scale aug: {cpu[True]:.2f} ms ({cpu[True] / cpu[False]:.1f}x)" if args.scale_aug else ""
    print(f"fast item CPU (1 thread): {cpu[False]:.2f} ms{versus}", flush=True)
    # What the loader alone hands over (uint8 crops): on a GPU node prepare_batch runs on the GPU, so this
    # is the pace the CPU side sets there. The scale-aug loader is timed right after the plain one, so both
    # see the same load from other processes as far as possible.
    rates = {}
    for name, batch_step in (("fast loader alone (uint8 batches)", None), ("fast", step)):
        for scale_aug, loader in loaders.items():
            rate, seconds = timed_batches(loader, args.batches, args.warmup, batch_step)
            rates[name, scale_aug] = rate
            what = f"{name}, scale aug:" if scale_aug else f"{name}:"
            versus = f"; {rate / rates[name, False]:.2f} of without" if scale_aug else ""
            print(
                f"{what:<47} {rate:8.1f} images/s ({args.batches} batches in {seconds:.1f} s{versus})",
                flush=True,
            )
    return rates["fast", False]


class PlainTransforms:
    """The usual torchvision v2 recipe, label ids mapped per pixel with ``Tensor.apply_``."""

    def __init__(self, profile: Profile) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.tv_tensors = v2, tv_tensors
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(profile.resize_hw, antialias=True),
                v2.RandomCrop(profile.patch_hw),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_SATURATION, JITTER_HUE),
                v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        )
        self.lut = ID_TO_TRAIN_ID.tolist()

    def __call__(self, image, target):
        v2, tv_tensors = self.tv_tensors
        mask = tv_tensors.Mask(v2.functional.pil_to_tensor(target)[0])
        image, mask = self.transform(image, mask)
        lut = self.lut
        label = mask.as_subclass(torch.Tensor).clone().apply_(lambda v: lut[v])
        return image.as_subclass(torch.Tensor), label.long()


def bench_plain(args, profile: Profile) -> float:
    from torch.utils.data import DataLoader
    from torchvision.datasets import Cityscapes

    list_samples(args.data_dir, "train")  # the same checks and errors as the fast path
    dataset = Cityscapes(
        str(args.data_dir),
        split="train",
        mode="fine",
        target_type="semantic",
        transforms=PlainTransforms(profile),
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
    )
    rate, seconds = timed_batches(loader, args.batches, args.warmup)
    print(f"plain: {rate:8.1f} images/s ({args.batches} batches in {seconds:.1f} s)", flush=True)
    return rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", type=Path, help="Cityscapes layout; default: a generated full-size synthetic set"
    )
    p.add_argument("--profile", type=int, default=1, choices=sorted(PROFILES))
    p.add_argument("--batches", type=int, default=30, help="timed batches per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start, page cache)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=["fast", "plain", "both"], default="both")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: as the trainers (see fastseg.cache)")
    p.add_argument(
        "--scale-aug",
        action="store_true",
        help="also time the fast loader with the random 0.5-2.0 scale, printed beside the figure without it",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (default: the cores the workers leave, at least 1)",
    )
    p.add_argument(
        "--synthetic-images", type=int, default=32, help="size of the generated set without --data-dir"
    )
    args = p.parse_args()
    if args.batches < 1 or args.warmup < 0:
        raise UserError("--batches must be at least 1 and --warmup at least 0")
    if args.data_dir is None:
        args.data_dir = synthetic_dir(args.synthetic_images, 2048, 1024)
    profile = get_profile(args.profile)
    # Threads beyond the free cores make OpenMP spin against the loader workers (a stack of 8 crops went
    # from 1 ms to 50 ms on 2 cores with 2 workers).
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or max(1, cores - args.workers))
    print(
        f"data: {args.data_dir}; profile {profile.index}: resize {profile.resize[0]}x{profile.resize[1]}, "
        f"patch {profile.patch[0]}x{profile.patch[1]}; batch {args.batch_size}, workers {args.workers}, "
        f"{torch.get_num_threads()} main-process torch threads",
        flush=True,
    )
    fast = bench_fast(args, profile) if args.mode in ("fast", "both") else None
    plain = bench_plain(args, profile) if args.mode in ("plain", "both") else None
    if fast is not None and plain is not None:
        print(f"ratio fast/plain: {fast / plain:.1f}x", flush=True)
    print(f"images/s {fast if fast is not None else plain:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
