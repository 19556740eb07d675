"""Accuracy, cost and speed of one or more checkpoints: a Markdown table, a JSON report and plots.

For each checkpoint: mIoU, per-class IoU, Dice and pixel accuracy on Cityscapes val (one confusion matrix,
scored at full label resolution by default); parameters, MACs and FLOPs (= 2 × MACs) at the profile's input
size; latency at batch 1 (median and p90), throughput at a larger batch and, on CUDA, peak memory, with
BatchNorm folded and channels_last, in fp32 (TF32 off) and, on CUDA, fp16 and (compute capability 8.0 and up)
bf16, each on a copy of the model converted to that dtype; on a CPU also the deployed path's latency,
onnxruntime on the ONNX export (``ORT ms``, docs/deploy.md). The JSON also stores the settings of the run
(device, threads, torch version, timed passes).

Edit the constants below, or override any of them with the flag of the same name (``OUTPUT`` is
``--output``); evaluate_efficiency.sh holds no settings of its own, and the run prints (on stderr) every
setting that differs from these constants. ``none`` turns off OUTPUT, PLOTS and the other optional paths.

Every stage of a curriculum: the table, the JSON (OUTPUT) and the plots (PLOTS); quote a glob, the script
expands it::

    python evaluate_efficiency.py --current-model-path 'checkpoints/run1/profile-*/best.pth'
    bash evaluate_efficiency.sh --current-model-path 'checkpoints/run1/profile-*/best.pth'   # the same
    sbatch evaluate_efficiency.sh --current-model-path 'checkpoints/run1/profile-*/best.pth'

Beside each best.pth the stage's last.pth is scored too (``miou_last``, ``epoch_last``): picking the best of
every stage's validation epochs flatters the figure, the last epoch does not (``--no-last-epoch`` skips it).
The plots are accuracy against GFLOPs, against latency and against the training compute of the curriculum
up to the checkpoint (``cum_train_tflop`` from its epoch's metrics; one line per experiment id), and
per-class IoU bars.

Accuracy as papers report it, with multi-scale (0.5-1.75 × the profile's size) and flipped test-time
augmentation, the softmax averaged at the label's size, in its own column (``miou_tta``)::

    python evaluate_efficiency.py --current-model-path checkpoints/run1/profile-5/best.pth --tta

A teacher at every profile (the same checkpoint at each profile's size), before distilling from it::

    python evaluate_efficiency.py --current-model-path checkpoints/run1/profile-5/best.pth --profile 1-5 \\
        --skip-speed

A distilled student beside its undistilled twin (the same recipe without a teacher, e.g. train.py with the
student's flags) and its teacher: per profile the student's mIoU, the twin's, the gain (best and last
epochs) and the teacher's mIoU at that profile, read from each student's config (also in the JSON under
``comparison``)::

    python evaluate_efficiency.py --compare 'checkpoints/student1/profile-*/best.pth' \\
        'checkpoints/twin1/profile-*/best.pth' --skip-speed

An older plain state_dict stores no profile, so name it::

    python evaluate_efficiency.py --current-model-path fast_scnn.pth --profile 3

Cost and speed only (no dataset needed), or accuracy only::

    python evaluate_efficiency.py --current-model-path fast_scnn.pth --profile 5 --skip-accuracy
    python evaluate_efficiency.py --current-model-path best.pth --skip-speed

Predictions for the official evaluation (or a benchmark submission), plus colour overlays::

    python evaluate_efficiency.py --current-model-path best.pth --skip-speed \\
        --save-predictions results/pred --save-overlays results/overlays
    CITYSCAPES_DATASET=data/cityscapes CITYSCAPES_RESULTS=results/pred csEvalPixelLevelSemanticLabeling

ONNX export (needs ``pip install onnxscript``), timed with onnxruntime when it is installed::

    python evaluate_efficiency.py --current-model-path best.pth --skip-accuracy --export-onnx results/fast_scnn.onnx

Packages to submit or deploy, each running without this repo and scoring what the table says (a grader's zip
and a Docker entry point; docs/deploy.md)::

    python evaluate_efficiency.py --current-model-path best.pth --skip-speed --export-submission results/submit

With several checkpoints (or profiles), predictions and packages go to one sub-folder per checkpoint and ONNX
files get the checkpoint's name appended.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from fastseg import cityscapes, deploy, measure, report, selection
from fastseg.config import report_overrides
from fastseg.data import SegmentationDataset, build_loader
from fastseg.distributed import nvidia_driver, resolve_device
from fastseg.errors import UserError, run_cli
from fastseg.flops import count_macs, count_params
from fastseg.models import load_model
from fastseg.submission import export_submission

# ---- what users edit ---------------------------------------------------------------------------------------
CURRENT_MODEL_PATH = ("checkpoints/fast_scnn/profile-*/best.pth",)  # paths or globs: every stage of a run
DATA_DIR = "data/cityscapes"  # Cityscapes root with leftImg8bit/ and gtFine/; the val split is scored
OUTPUT = "results/efficiency.json"  # the JSON report, one object per checkpoint; none = no file
PLOTS = "results/efficiency"  # folder for the PNG plots; none = no plots
PROFILE = None  # None = each checkpoint's own stage; 3 scores at profile 3, "1-5" (or (1, 2, 3)) at each
TTA = False  # also multi-scale + flip accuracy (miou_tta): 12 forward passes per image
LAST_EPOCH = True  # beside a best.pth, also score the stage's last.pth (miou_last): the honest figure
COMPARE = None  # (STUDENT, TWIN) paths/globs: a distilled run beside its undistilled twin and its teacher
# ---- rarely changed ----------------------------------------------------------------------------------------
BATCH_SIZE = 8  # val images per batch; full-size logits are 160 MB an image (19×1024×2048 floats)
NUM_WORKERS = 8  # data loader processes; the cached val split needs few
DEVICE = "auto"  # cuda when there is a GPU, else cpu
LABEL_RESOLUTION = "full"  # score at the labels' full size (Cityscapes convention) or "resized"
CACHE_DIR = None  # pre-resized copies of the val split; default beside the data or in ~/.cache/fastseg
SKIP_ACCURACY = False  # no val pass (no dataset needed)
SKIP_SPEED = False  # no timing
RUNS = 50  # timed passes: at least 50 so that the p90 latency rests on a handful of samples, not one
WARMUP = 10  # untimed passes first: they pay for cuDNN autotuning, allocator growth, lazy initialisation
THROUGHPUT_BATCH = None  # batch for images/s; None = 32 on CUDA (fills a GPU at small profiles), 4 on a CPU
DTYPE = "fp32"  # precision shown in the table; on CUDA fp32, fp16 and (capability 8.0+) bf16 are timed and stored
CHANNELS_LAST = True  # time in the channels_last memory format, as a deployment would
COMPILE = False  # time the model after torch.compile
SAVE_PREDICTIONS = None  # folder for <city>_<seq>_<frame>_pred_labelIds.png (the official evaluation's input)
SAVE_OVERLAYS = None  # folder for colour overlays of the predictions on the images
DEPLOYED_SPEED = True  # on a CPU, also time onnxruntime on the ONNX export, the fastest path measured (docs/deploy.md)
EXPORT_ONNX = None  # path of a BN-folded fp32 ONNX export (needs onnxscript), timed by onnxruntime
EXPORT_SUBMISSION = None  # folder: per checkpoint, the grader's codalab.zip and a docker/ package (docs/deploy.md)


def constants() -> dict[str, Any]:
    """The constants above by flag name (``DATA_DIR`` -> ``data_dir``)."""
    return {name.lower(): value for name, value in globals().items() if name.isupper()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The constants as flag defaults, then the command line; prints the settings the flags changed."""
    d = constants()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--current-model-path", nargs="+", default=d["current_model_path"], metavar="PATH",
                   help="checkpoint(s): several paths and/or globs such as 'checkpoints/*/profile-*/best.pth'")
    p.add_argument("--data-dir", default=d["data_dir"], help="Cityscapes root (leftImg8bit/ and gtFine/)")
    p.add_argument("--output", default=d["output"], help="write the JSON report here (none: no file)")
    p.add_argument("--plots", default=d["plots"], metavar="DIR", help="write PNG plots into DIR (none: no plots)")
    p.add_argument("--profile", nargs="+", default=d["profile"], metavar="K",
                   help="score at these profiles (1-5): K, several, or a range such as 1-5; default: the "
                   "checkpoint's own; needed for a plain state_dict")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=d["tta"],
                   help=f"also score with test-time augmentation: scales {measure.TTA_SCALES} of the profile's "
                   "size, each also flipped, softmax averaged at the label size (miou_tta)")
    p.add_argument("--last-epoch", action=argparse.BooleanOptionalAction, default=d["last_epoch"],
                   help="beside a best.pth, also score the stage's last.pth (miou_last, epoch_last)")
    p.add_argument("--compare", nargs=2, default=d["compare"], metavar=("STUDENT", "TWIN"),
                   help="paths/globs of a distilled student's stages and of its undistilled twin's: a table "
                   "of both per profile, the gain, and the teacher's mIoU at that profile")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="val batch size for accuracy")
    p.add_argument("--num-workers", type=int, default=d["num_workers"], help="data loader workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d["device"])
    p.add_argument("--label-resolution", choices=("full", "resized"), default=d["label_resolution"],
                   help="score at the full label resolution (Cityscapes convention) or at the profile's size")
    p.add_argument("--cache-dir", default=d["cache_dir"],
                   help="where pre-resized copies of the val split are kept (default: beside the data, or ~/.cache)")
    p.add_argument("--skip-accuracy", action=argparse.BooleanOptionalAction, default=d["skip_accuracy"],
                   help="no val pass (no dataset needed)")
    p.add_argument("--skip-speed", action=argparse.BooleanOptionalAction, default=d["skip_speed"],
                   help="no timing")
    p.add_argument("--runs", type=int, default=d["runs"], help="timed passes per latency figure")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="untimed passes before timing")
    p.add_argument("--throughput-batch", type=int, default=d["throughput_batch"],
                   help="batch for images/s (default 32 on CUDA, 4 on a CPU)")
    p.add_argument("--dtype", choices=tuple(measure.DTYPES), default=d["dtype"],
                   help="precision shown in the table; on CUDA all of fp32/fp16/bf16 are measured and stored")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d["channels_last"],
                   help="time in the channels_last memory format (--no-channels-last: NCHW)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d["compile"],
                   help="time the model after torch.compile")
    p.add_argument("--save-predictions", default=d["save_predictions"], metavar="DIR",
                   help="one <city>_<seq>_<frame>_pred_labelIds.png (Cityscapes label ids) per val image")
    p.add_argument("--save-overlays", default=d["save_overlays"], metavar="DIR",
                   help="colour overlays of the predictions on the images (kept apart from the label-id PNGs)")
    p.add_argument("--deployed-speed", action=argparse.BooleanOptionalAction, default=d["deployed_speed"],
                   help="on a CPU, also time the deployed path: onnxruntime on the BN-folded ONNX export (needs "
                   "onnxscript and onnxruntime), shown beside PyTorch's latency")
    p.add_argument("--export-onnx", default=d["export_onnx"], metavar="PATH",
                   help="export the BN-folded fp32 model to ONNX (needs onnxscript); timed by onnxruntime "
                   "if installed")
    p.add_argument("--export-submission", default=d["export_submission"], metavar="DIR",
                   help="write DIR/<checkpoint>/codalab.zip (model.py, model.pth, process_data.py) and "
                   "DIR/<checkpoint>/docker/ (Dockerfile, predict.py, ...): packages that run without this repo, "
                   "with the evaluation's pre- and post-processing (docs/deploy.md)")
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
    if args.skip_accuracy and (optional_path(args.save_predictions) or optional_path(args.save_overlays)):
        raise UserError("--save-predictions/--save-overlays: need the val pass; drop --skip-accuracy")
    selection.requested_profiles(args.profile)  # a bad --profile ends here
    submission = optional_path(args.export_submission)
    if submission is not None and submission.exists() and not submission.is_dir():
        raise UserError(f"--export-submission: {submission} is a file; give a folder (it is created if missing)")
    if args.compare is not None:
        if args.skip_accuracy:
            raise UserError("--compare: compares accuracy; drop --skip-accuracy")
        if args.profile is not None:
            raise UserError("--compare: scores every stage at its own profile; drop --profile")
        if tuple(args.current_model_path) != tuple(d["current_model_path"]):
            raise UserError("--compare: takes the checkpoints from its two paths (and the students' teacher); "
                            "drop --current-model-path")
    report_overrides(args, d, "evaluate_efficiency.py", file=sys.stderr)
    return args


def optional_path(value: str | Path | None) -> Path | None:
    """A path setting, or None when it is unset or ``none``."""
    if value is None or str(value).lower() in ("", "none"):
        return None
    return Path(value)


# ---- one checkpoint: what it is, then its score, cost, time and exports ------------------------------------


def evaluate_checkpoint(job: selection.Job, label: str, file_label: str, args: argparse.Namespace,
                        device: torch.device, several: bool) -> dict[str, Any]:
    """One row of the report; ``file_label`` names its predictions, plots and exported files."""
    model, config = load_model(job.path, device, flag=job.flag)
    input_hw = tuple(job.profile.resize_hw)
    row = describe(job, label, config, args, device)
    if not args.skip_accuracy:
        row.update(score(model, job, label, args, device, several, file_label))
    row.update(measure.cost_fields(count_params(model), count_macs(model, input_hw)))
    if not args.skip_speed:
        row.update(time_model(model, input_hw, label, args, device))
    row.update(export(model, config, job, label, args, device, several, file_label))
    row.update(measure.efficiency_scores(row))  # mIoU and Dice per GFLOP, from the figures above
    return row


def describe(job: selection.Job, label: str, config: dict[str, Any], args: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    """The row's identity: which checkpoint, at which profile and size, and what training recorded in it."""
    row: dict[str, Any] = dict.fromkeys(report.RESULT_KEYS)
    row.update(
        checkpoint=label,
        path=str(job.path),
        profile=job.profile.index,
        trained_profile=config.get("profile"),
        input_size=list(job.profile.resize_hw),
        epoch=job.epoch,
        cum_train_tflop=job.cum_train_tflop,
        arch=config.get("arch", "fast_scnn"),
        experiment_id=config.get("experiment_id"),
        distilled=selection.is_distilled(config),
        teacher=selection.teacher_path(config),
        stage=selection.stage_label(config, job.profile.index),
        device=str(device),
        label_resolution=None if args.skip_accuracy else args.label_resolution,
    )
    return row


def score(model, job: selection.Job, label: str, args: argparse.Namespace, device: torch.device,
          several: bool, file_label: str) -> dict[str, Any]:
    """Accuracy on the val split: the trainers' validation pass, with --tta the augmented one, and the
    last.pth beside a best.pth (the figure that picking the best epoch does not flatter)."""
    k = job.profile.index
    print(f"{label}: accuracy on val at profile {k}", file=sys.stderr, flush=True)
    dataset = SegmentationDataset(Path(args.data_dir), "val", job.profile, train=False, cache_dir=args.cache_dir,
                                  label_resolution=args.label_resolution)
    loader = build_loader(dataset, args.batch_size, args.num_workers, shuffle=False, seed=0, drop_last=False)
    fields = measure.evaluate_accuracy(
        model, loader, device, num_classes=cityscapes.NUM_CLASSES, samples=dataset.samples,
        prediction_dir=_per_checkpoint(optional_path(args.save_predictions), several, file_label),
        overlay_dir=_per_checkpoint(optional_path(args.save_overlays), several, file_label),
        progress=_progress(f"val, profile {k}"),
    )
    if args.tta:
        print(f"{label}: accuracy with multi-scale + flip augmentation", file=sys.stderr, flush=True)
        fields.update(measure.evaluate_tta(model, loader, device, cityscapes.NUM_CLASSES,
                                           progress=_progress(f"TTA, profile {k}")))
    if job.last is not None:
        fields["epoch_last"] = job.epoch_last
        if job.epoch_last == job.epoch:  # best.pth was saved at the last epoch: the same weights
            fields["miou_last"] = fields["miou"]
        else:
            print(f"{label}: accuracy of the stage's last epoch ({job.last.name}, epoch {job.epoch_last})",
                  file=sys.stderr, flush=True)
            last_model, _ = load_model(job.last, device, flag=job.flag)
            last = measure.evaluate_accuracy(last_model, loader, device, num_classes=cityscapes.NUM_CLASSES,
                                             progress=_progress(f"val, last epoch, profile {k}"))
            fields["miou_last"] = last["miou"]
    return fields


def time_model(model, input_hw: tuple[int, int], label: str, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """Latency and throughput: BN folded, in each dtype the device runs (the table shows --dtype)."""
    print(f"{label}: timing at {input_hw[0]}×{input_hw[1]} (H×W) on {device}", file=sys.stderr, flush=True)
    speed = measure.benchmark_speed(
        model, input_hw, device, dtypes=measure.speed_dtypes(device, args.dtype), runs=args.runs,
        warmup=args.warmup, throughput_batch=args.throughput_batch, channels_last=args.channels_last,
        compile_model=args.compile,
    )
    shown = speed["by_dtype"][args.dtype]
    fields = {k: shown[k] for k in ("latency_ms", "latency_p90_ms", "fps", "peak_memory_mb")}
    fields.update(dtype=args.dtype, throughput_batch=shown["throughput_batch"], fps_batch1=shown["fps_batch1"],
                  bn_folded=speed["bn_folded"], speed=speed["by_dtype"])
    return fields


def export(model, config: dict[str, Any], job: selection.Job, label: str, args: argparse.Namespace,
           device: torch.device, several: bool, file_label: str) -> dict[str, Any]:
    """The ONNX export and its onnxruntime latency (on a CPU by default: the deployed path), and the
    submission packages (fastseg/deploy.py, fastseg/submission.py)."""
    fields: dict[str, Any] = {}
    onnx = _per_checkpoint(optional_path(args.export_onnx), several, file_label, ".onnx")
    if onnx is not None or (args.deployed_speed and not args.skip_speed and device.type == "cpu"):
        fields.update(deploy.deployed_fields(model, tuple(job.profile.resize_hw), label, export_path=onnx,
                                             runs=args.runs, warmup=args.warmup, use_cuda=device.type == "cuda"))
    submission = optional_path(args.export_submission)
    if submission is not None:
        package, no_onnx = export_submission(model, config, job.profile, submission / report.slug(file_label))
        print(f"{label}: submission packages in {package} (codalab.zip, docker/)", file=sys.stderr, flush=True)
        if no_onnx:
            print(f"note: {package / 'docker'} runs PyTorch, not onnxruntime (2.6-2.8x faster at 2048x1024 in "
                  f"docs/deploy.md): {no_onnx}", file=sys.stderr, flush=True)
        fields["submission_dir"] = str(package)
    return fields


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


# ---- the report --------------------------------------------------------------------------------------------


def write_report(rows: list[dict[str, Any]], roles: dict[str, list] | None, file_labels: list[str],
                 args: argparse.Namespace, device: torch.device) -> None:
    """The Markdown table (and with --compare the student/twin/teacher table) on stdout, the JSON and plots."""
    print(report.markdown_table(rows))
    comparison = None
    if roles is not None:
        comparison = report.distillation_comparison(
            [rows[i] for i in roles["students"]],
            [rows[i] for i in roles["twins"]],
            [None if i is None else rows[i] for i in roles["teachers"]],
        )
        print(f"\nstudent {args.compare[0]} against its undistilled twin {args.compare[1]}; "
              "gain = student - twin; the teacher scored at each student's profile")
        print(report.comparison_table(comparison))

    output = optional_path(args.output)
    if output is not None:
        report.write_json(output, rows, run_settings(args, device), comparison=comparison)
        print(f"wrote {output}", file=sys.stderr)
    plots = optional_path(args.plots)
    if plots is not None:
        written = []
        for row, file_label in zip(rows, file_labels):
            if row.get("per_class_iou"):
                name = f"per_class_iou_{report.slug(file_label)}.png"
                written.append(report.plot_per_class_iou(row, plots / name, cityscapes.CLASS_NAMES))
        if len(rows) > 1:
            written += report.plot_tradeoffs(rows, plots)
        print(f"wrote {len(written)} plot(s) to {plots}", file=sys.stderr)


def run_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where and how the figures were taken, for the JSON (each row also holds its dtype and BN folding)."""
    cuda = device.type == "cuda"
    cpu_name = platform.processor() or platform.machine()
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "driver": nvidia_driver() if cuda else None,
        # How each dtype was timed: weights and input in it (no autocast), BN folded for Fast-SCNN; fp32 no TF32.
        "speed_method": "converted weights, fp32 without TF32",
        "runs": args.runs,
        "warmup": args.warmup,
        "throughput_batch": args.throughput_batch,
        "dtypes": measure.speed_dtypes(device, args.dtype),
        "channels_last": args.channels_last,
        "compile": args.compile,
        "deployed_speed": args.deployed_speed,
        "label_resolution": args.label_resolution,
        "tta_scales": list(measure.TTA_SCALES) if args.tta else None,
        "tta_flip": True if args.tta else None,
        "last_epoch": args.last_epoch,
    }


def main(argv: list[str] | None = None) -> int:
    """Plan every (checkpoint, profile), evaluate each (score, cost, time, export), then write the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # Let cuDNN pick its fastest kernels for the fixed input size, as a deployment would.
        torch.backends.cudnn.benchmark = True
    if args.throughput_batch is None:
        args.throughput_batch = 32 if device.type == "cuda" else 4

    jobs, roles = selection.plan(args.current_model_path, args.profile, args.compare,
                                 with_last=args.last_epoch and not args.skip_accuracy)
    paths = [job.path for job in jobs]
    labels = selection.checkpoint_labels(paths)
    # A checkpoint scored at several profiles gets one file name per profile.
    file_labels = [label if paths.count(job.path) == 1 else f"{report.slug(label)}_p{job.profile.index}"
                   for job, label in zip(jobs, labels)]
    rows = [evaluate_checkpoint(job, label, file_label, args, device, several=len(jobs) > 1)
            for job, label, file_label in zip(jobs, labels, file_labels)]
    write_report(rows, roles, file_labels, args, device)
    return 0


if __name__ == "__main__":
    run_cli(main)
