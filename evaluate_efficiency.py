"""Accuracy, cost and speed of one or more checkpoints: a Markdown table, a JSON report and plots.

For each checkpoint: mIoU, per-class IoU, Dice and pixel accuracy on Cityscapes val (one confusion matrix,
scored at full label resolution by default); parameters, MACs and FLOPs (= 2 × MACs) at the profile's input
size; latency at batch 1 (median and p90), throughput at a larger batch and, on CUDA, peak memory, with
BatchNorm folded and channels_last, in fp32 and, on CUDA, fp16/bf16. The JSON also stores the settings of the
run (device, threads, torch version, timed passes).

One checkpoint (the profile is read from the checkpoint)::

    python evaluate_efficiency.py --data-dir data/cityscapes \\
        --current-model-path checkpoints/fast_scnn/profile-5/best.pth --output results/efficiency.json

Every stage of a curriculum, with the trade-off plots (quote the glob; the script expands it)::

    python evaluate_efficiency.py --data-dir data/cityscapes \\
        --current-model-path 'checkpoints/*/profile-*/best.pth' \\
        --output results/efficiency.json --plots results/plots

An older plain state_dict stores no profile, so name it::

    python evaluate_efficiency.py --data-dir data/cityscapes --current-model-path fast_scnn.pth --profile 3

Cost and speed only (no dataset needed), or accuracy only::

    python evaluate_efficiency.py --current-model-path fast_scnn.pth --profile 5 --skip-accuracy
    python evaluate_efficiency.py --data-dir data/cityscapes --current-model-path best.pth --skip-speed

Predictions for the official evaluation (or a benchmark submission), plus colour overlays::

    python evaluate_efficiency.py --data-dir data/cityscapes --current-model-path best.pth --skip-speed \\
        --save-predictions results/pred --save-overlays results/overlays
    CITYSCAPES_DATASET=data/cityscapes CITYSCAPES_RESULTS=results/pred csEvalPixelLevelSemanticLabeling

ONNX export (needs ``pip install onnxscript``), timed with onnxruntime when it is installed::

    python evaluate_efficiency.py --current-model-path best.pth --skip-accuracy --export-onnx results/fast_scnn.onnx

With several checkpoints, predictions go to one sub-folder per checkpoint and ONNX files get the
checkpoint's name appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from fastseg import measure, report
from fastseg.distributed import resolve_device
from fastseg.errors import UserError, run_cli

# Full-resolution logits of one image are 19×1024×2048 floats (160 MB), so the val batch stays small.
BATCH_SIZE = 4
NUM_WORKERS = 4
# At least 50 timed passes so that the p90 latency rests on a handful of samples, not one.
RUNS = 50
# The first passes pay for cuDNN autotuning, allocator growth and lazy initialisation.
WARMUP = 10
# Throughput batch: large enough to fill a GPU at the small profiles; on a CPU larger batches only wait.
THROUGHPUT_BATCH_CUDA = 32
THROUGHPUT_BATCH_CPU = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--current-model-path",
        nargs="+",
        required=True,
        metavar="PATH",
        help="checkpoint(s): several paths and/or globs such as 'checkpoints/*/profile-*/best.pth'",
    )
    p.add_argument("--data-dir", default="data/cityscapes", help="Cityscapes root (leftImg8bit/ and gtFine/)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where pre-resized copies of the val split are kept (default: beside the data, or ~/.cache)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        help="input-size profile (1-5); default: the one stored in the checkpoint; "
        "needed for a plain state_dict",
    )
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="val batch size for accuracy")
    p.add_argument("--num-workers", type=int, default=NUM_WORKERS, help="data loader workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--label-resolution",
        choices=("full", "resized"),
        default="full",
        help="score at the full label resolution (Cityscapes convention) or at the profile's size",
    )
    p.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument(
        "--save-predictions",
        type=Path,
        default=None,
        metavar="DIR",
        help="one <city>_<seq>_<frame>_pred_labelIds.png (Cityscapes label ids) per val image",
    )
    p.add_argument(
        "--save-overlays",
        type=Path,
        default=None,
        metavar="DIR",
        help="colour overlays of the predictions on the images (kept apart from the label-id PNGs)",
    )
    p.add_argument(
        "--export-onnx",
        type=Path,
        default=None,
        metavar="PATH",
        help="export the BN-folded fp32 model to ONNX (needs onnxscript); timed by onnxruntime if installed",
    )
    p.add_argument("--runs", type=int, default=RUNS, help="timed passes per latency figure")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed passes before timing")
    p.add_argument(
        "--throughput-batch",
        type=int,
        default=None,
        help=f"batch for images/s (default {THROUGHPUT_BATCH_CUDA} on CUDA, {THROUGHPUT_BATCH_CPU} on CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(measure.DTYPES),
        default="fp32",
        help="precision shown in the table; on CUDA all of fp32/fp16/bf16 are measured and stored",
    )
    p.add_argument("--compile", action="store_true", help="time the model after torch.compile")
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="time in the contiguous (NCHW) memory format",
    )
    p.add_argument("--skip-accuracy", action="store_true", help="no val pass (no dataset needed)")
    p.add_argument("--skip-speed", action="store_true", help="no timing")
    args = p.parse_args(argv)
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--num-workers", args.num_workers, 0),
        ("--runs", args.runs, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < low:
            raise UserError(f"{flag}: must be at least {low}, got {value}")
    if args.throughput_batch is not None and args.throughput_batch < 1:
        raise UserError(f"--throughput-batch: must be at least 1, got {args.throughput_batch}")
    if args.skip_accuracy and (args.save_predictions or args.save_overlays):
        raise UserError("--save-predictions/--save-overlays: need the val pass; drop --skip-accuracy")
    return args


def resolve_profile(args: argparse.Namespace, config: dict[str, Any], path: Path):
    """The profile to evaluate at: --profile, else the checkpoint's own (with its stored resize, which a
    stage trained with --resize changed)."""
    from fastseg.cityscapes import get_profile

    if args.profile is not None:
        return get_profile(args.profile)
    if config.get("profile") is None:
        raise UserError(
            f"--profile: {path} is a plain state_dict with no stored profile; "
            "pass --profile K (1-5) with the profile it was trained at"
        )
    profile = get_profile(int(config["profile"]))
    if config.get("resize"):
        profile = dataclasses.replace(profile, resize=tuple(int(v) for v in config["resize"]))
    return profile


def accuracy(model, args, profile, device, prediction_dir, overlay_dir) -> dict[str, Any]:
    from fastseg.cityscapes import NUM_CLASSES
    from fastseg.data import SegmentationDataset, build_loader

    data_dir = Path(args.data_dir)
    dataset = SegmentationDataset(
        data_dir,
        "val",
        profile,
        train=False,
        cache_dir=args.cache_dir,
        label_resolution=args.label_resolution,
    )
    loader = build_loader(dataset, args.batch_size, args.num_workers, shuffle=False, seed=0, drop_last=False)
    return measure.evaluate_accuracy(
        model,
        loader,
        device,
        num_classes=NUM_CLASSES,
        samples=dataset.samples,
        prediction_dir=prediction_dir,
        overlay_dir=overlay_dir,
        progress=_progress(f"val, profile {profile.index}"),
    )


def _progress(desc: str):
    def wrap(iterable):
        try:
            from tqdm import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())

    return wrap


def _per_checkpoint(path: Path | None, several: bool, label: str, suffix: str = "") -> Path | None:
    """Several checkpoints each get their own folder (or file name) under the one the user gave."""
    if path is None or not several:
        return path
    if suffix:
        return path.with_name(f"{path.stem}_{report.slug(label)}{suffix}")
    return path / report.slug(label)


def evaluate_checkpoint(
    path: Path, label: str, args: argparse.Namespace, device: torch.device, several: bool
) -> dict[str, Any]:
    from fastseg.checkpoint import load_model
    from fastseg.flops import count_macs, count_params

    model, config = load_model(path, device, flag="--current-model-path")
    profile = resolve_profile(args, config, path)
    input_hw = tuple(profile.resize_hw)
    row: dict[str, Any] = dict.fromkeys(report.RESULT_KEYS)
    row.update(
        checkpoint=label,
        path=str(path),
        profile=profile.index,
        input_size=list(input_hw),
        arch=config.get("arch", "fast_scnn"),
        experiment_id=config.get("experiment_id"),
        distilled=report.is_distilled(config),
        stage=report.stage_label(config, profile.index),
        device=str(device),
        label_resolution=None if args.skip_accuracy else args.label_resolution,
    )
    row.update(measure.cost_fields(count_params(model), count_macs(model, input_hw)))

    if not args.skip_accuracy:
        print(f"{label}: accuracy on val at profile {profile.index}", file=sys.stderr, flush=True)
        row.update(
            accuracy(
                model,
                args,
                profile,
                device,
                _per_checkpoint(args.save_predictions, several, label),
                _per_checkpoint(args.save_overlays, several, label),
            )
        )

    if not args.skip_speed:
        print(
            f"{label}: timing at {input_hw[0]}×{input_hw[1]} (H×W) on {device}", file=sys.stderr, flush=True
        )
        speed = measure.benchmark_speed(
            model,
            input_hw,
            device,
            dtypes=measure.speed_dtypes(device, args.dtype),
            runs=args.runs,
            warmup=args.warmup,
            throughput_batch=args.throughput_batch,
            channels_last=args.channels_last,
            compile_model=args.compile,
        )
        shown = speed["by_dtype"][args.dtype]
        row.update({k: shown[k] for k in ("latency_ms", "latency_p90_ms", "fps", "peak_memory_mb")})
        row.update(
            dtype=args.dtype,
            throughput_batch=shown["throughput_batch"],
            fps_batch1=shown["fps_batch1"],
            bn_folded=speed["bn_folded"],
            speed=speed["by_dtype"],
        )

    if args.export_onnx is not None:
        onnx_path = measure.export_onnx(
            model, input_hw, _per_checkpoint(args.export_onnx, several, label, ".onnx")
        )
        print(f"{label}: exported {onnx_path}", file=sys.stderr, flush=True)
        row["onnx_path"] = str(onnx_path)
        if measure.onnxruntime_available():
            row.update(
                measure.onnx_latency(
                    onnx_path, input_hw, runs=args.runs, warmup=args.warmup, use_cuda=device.type == "cuda"
                )
            )
        else:
            print(
                f"{label}: onnxruntime is not installed, so the ONNX model is not timed "
                "(pip install onnxruntime)",
                file=sys.stderr,
                flush=True,
            )

    row.update(measure.efficiency_scores(row))
    del model
    return row


def check_checkpoints(paths: list[Path], args: argparse.Namespace) -> None:
    """Read every checkpoint and settle its profile first, so that a bad file or a missing --profile
    stops the run at once rather than after the checkpoints before it have been evaluated."""
    from fastseg.checkpoint import load_checkpoint, model_config

    for path in paths:
        resolve_profile(args, model_config(load_checkpoint(path, flag="--current-model-path")), path)


def run_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where and how the figures were taken, for the JSON (each row also holds its dtype and BN folding)."""
    cuda = device.type == "cuda"
    cpu_name = platform.processor() or platform.machine()
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": args.runs,
        "warmup": args.warmup,
        "throughput_batch": args.throughput_batch,
        "dtypes": measure.speed_dtypes(device, args.dtype),
        "channels_last": args.channels_last,
        "compile": args.compile,
        "label_resolution": args.label_resolution,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # Let cuDNN pick its fastest kernels for the fixed input size, as a deployment would.
        torch.backends.cudnn.benchmark = True
    if args.throughput_batch is None:
        args.throughput_batch = THROUGHPUT_BATCH_CUDA if device.type == "cuda" else THROUGHPUT_BATCH_CPU
    paths = report.expand_checkpoint_paths(args.current_model_path)
    several = len(paths) > 1

    check_checkpoints(paths, args)
    labels = report.checkpoint_labels(paths)
    results = [evaluate_checkpoint(path, label, args, device, several) for path, label in zip(paths, labels)]

    print(report.markdown_table(results))

    if args.output is not None:
        report.write_json(args.output, results, run_settings(args, device))
        print(f"wrote {args.output}", file=sys.stderr)
    if args.plots is not None:
        from fastseg.cityscapes import CLASS_NAMES

        written = []
        for row in results:
            if row.get("per_class_iou"):
                name = f"per_class_iou_{report.slug(row['checkpoint'])}.png"
                written.append(report.plot_per_class_iou(row, args.plots / name, CLASS_NAMES))
        if several:
            written += report.plot_tradeoffs(results, args.plots)
        print(f"wrote {len(written)} plot(s) to {args.plots}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
