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
import dataclasses
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from fastseg import deploy, measure, report
from fastseg.cityscapes import Profile, get_profile
from fastseg.config import report_overrides
from fastseg.distributed import nvidia_driver, resolve_device
from fastseg.errors import UserError, run_cli
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
    requested_profiles(args.profile)  # a bad --profile ends here
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


def requested_profiles(value: Any) -> list[int] | None:
    """``--profile``'s values as profile indices, in order without repeats: None (each checkpoint's own),
    ``3``, ``["1", "3"]``, ``"1-5"``, ``(1, 2, 3)``."""
    if value is None:
        return None
    profiles: list[int] = []
    for item in [value] if isinstance(value, (int, str)) else value:
        for part in str(item).replace(",", " ").split():
            first, _, last = part.partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise UserError(f"--profile {part}: expected a profile (1-5) or a range such as 1-5") from None
            if low > high:
                raise UserError(f"--profile {part}: the range goes down; write it as {high}-{low}")
            for k in range(low, high + 1):
                get_profile(k)  # an unknown profile ends here, naming the flag
                if k not in profiles:
                    profiles.append(k)
    return profiles or None


def resolve_profile(index: int | None, config: dict[str, Any], path: Path) -> Profile:
    """The profile to evaluate at: ``index`` (from --profile), else the checkpoint's own (with its stored
    resize, which a stage trained with --resize changed)."""
    if index is not None:
        return get_profile(index)
    if config.get("profile") is None:
        raise UserError(
            f"--profile: {path} is a plain state_dict with no stored profile; "
            "pass --profile K (1-5) with the profile it was trained at"
        )
    profile = get_profile(int(config["profile"]))
    if config.get("resize"):
        profile = dataclasses.replace(profile, resize=tuple(int(v) for v in config["resize"]))
    return profile


@dataclasses.dataclass
class Job:
    """One row of the report: a checkpoint scored at one profile, with what training recorded in it."""

    path: Path
    profile: Profile
    config: dict[str, Any]
    flag: str  # the flag the path came from, for error messages
    epoch: int | None = None
    cum_train_tflop: float | None = None
    last: Path | None = None  # the stage's last.pth, scored beside a best.pth
    epoch_last: int | None = None


def read_job(path: Path, args: argparse.Namespace, flag: str, index: int | None = None,
             profile: Profile | None = None, with_last: bool = True) -> Job:
    """Read a checkpoint (and the last.pth beside a best.pth) and settle its profile, so that a bad file or a
    missing --profile stops the run at once rather than after the checkpoints before it have been scored."""
    from fastseg.checkpoint import load_checkpoint, model_config

    checkpoint = load_checkpoint(path, flag=flag)
    config = model_config(checkpoint)
    job = Job(path, profile or resolve_profile(index, config, path), config, flag,
              **report.training_record(checkpoint, path))
    last = path.with_name("last.pth")
    if with_last and args.last_epoch and not args.skip_accuracy and path.name == "best.pth" and last.is_file():
        job.last, job.epoch_last = last, load_checkpoint(last, flag=flag).get("epoch")
    return job


def plan(args: argparse.Namespace) -> tuple[list[Job], dict[str, list] | None]:
    """Every (checkpoint, profile) to score, all read before the first is scored.

    With --compare, also the roles: the indices of the students, of their twins, and of each student's
    teacher scored at the student's profile (None where the teacher's file is not there).
    """
    if args.compare is None:
        profiles = requested_profiles(args.profile) or [None]
        jobs = []
        for path in report.expand_checkpoint_paths(args.current_model_path):
            job = read_job(path, args, "--current-model-path", profiles[0])  # each file is read once
            jobs += [job] + [dataclasses.replace(job, profile=get_profile(k)) for k in profiles[1:]]
        return jobs, None

    student_glob, twin_glob = args.compare
    students = [read_job(p, args, "--compare") for p in report.expand_checkpoint_paths([student_glob], "--compare")]
    twins = [read_job(p, args, "--compare") for p in report.expand_checkpoint_paths([twin_glob], "--compare")]
    for job in students:
        if not report.is_distilled(job.config):
            raise UserError(f"--compare: {job.path} was trained without a teacher; the first path is the "
                            "distilled student's (train_distillation.py), the second its undistilled twin's")
    for job in twins:
        if report.is_distilled(job.config):
            raise UserError(f"--compare: {job.path} was distilled from {report.teacher_path(job.config)}; the "
                            "second path is the twin's, trained with the same recipe and no teacher")
    for role, jobs in (("student", students), ("twin", twins)):
        seen: dict[int, Path] = {}
        for job in jobs:
            if job.profile.index in seen:
                raise UserError(f"--compare: two {role} checkpoints of profile {job.profile.index} "
                                f"({seen[job.profile.index]}, {job.path}); give the stages of one run")
            seen[job.profile.index] = job.path

    jobs = students + twins
    teachers: list[int | None] = []
    for student in students:
        teacher = Path(report.teacher_path(student.config))
        if not teacher.is_file():
            print(f"note: {student.path} was distilled from {teacher}, which is not there (a relative path is read "
                  "from the current directory); its teacher column stays empty", file=sys.stderr, flush=True)
            teachers.append(None)
            continue
        # The teacher at the student's input size: what it offered the student at that stage.
        same = [i for i, job in enumerate(jobs)
                if job.path.resolve() == teacher.resolve() and job.profile == student.profile]
        if not same:
            jobs.append(read_job(teacher, args, "--compare", profile=student.profile, with_last=False))
            same = [len(jobs) - 1]
        teachers.append(same[0])
    roles = {"students": list(range(len(students))),
             "twins": list(range(len(students), len(students) + len(twins))),
             "teachers": teachers}
    return jobs, roles


def val_loader(args: argparse.Namespace, profile: Profile):
    from fastseg.data import SegmentationDataset, build_loader

    dataset = SegmentationDataset(
        Path(args.data_dir),
        "val",
        profile,
        train=False,
        cache_dir=args.cache_dir,
        label_resolution=args.label_resolution,
    )
    loader = build_loader(dataset, args.batch_size, args.num_workers, shuffle=False, seed=0, drop_last=False)
    return dataset, loader


def accuracy(model, job: Job, label: str, args, device, prediction_dir, overlay_dir) -> dict[str, Any]:
    """The accuracy part of a row: the trainers' validation pass, with --tta the augmented one, and the
    last.pth beside a best.pth."""
    from fastseg.cityscapes import NUM_CLASSES
    from fastseg.models import load_model

    k = job.profile.index
    dataset, loader = val_loader(args, job.profile)
    fields = measure.evaluate_accuracy(
        model,
        loader,
        device,
        num_classes=NUM_CLASSES,
        samples=dataset.samples,
        prediction_dir=prediction_dir,
        overlay_dir=overlay_dir,
        progress=_progress(f"val, profile {k}"),
    )
    if args.tta:
        print(f"{label}: accuracy with multi-scale + flip augmentation", file=sys.stderr, flush=True)
        fields.update(
            measure.evaluate_tta(model, loader, device, NUM_CLASSES, progress=_progress(f"TTA, profile {k}"))
        )
    if job.last is not None:
        fields["epoch_last"] = job.epoch_last
        if job.epoch_last == job.epoch:  # best.pth was saved at the last epoch: the same weights
            fields["miou_last"] = fields["miou"]
        else:
            print(f"{label}: accuracy of the stage's last epoch ({job.last.name}, epoch {job.epoch_last})",
                  file=sys.stderr, flush=True)
            last_model, _ = load_model(job.last, device, flag=job.flag)
            last = measure.evaluate_accuracy(last_model, loader, device, num_classes=NUM_CLASSES,
                                             progress=_progress(f"val, last epoch, profile {k}"))
            fields["miou_last"] = last["miou"]
            del last_model
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


def evaluate_checkpoint(
    job: Job, label: str, file_label: str, args: argparse.Namespace, device: torch.device, several: bool
) -> dict[str, Any]:
    """One row of the report; ``file_label`` names its predictions, plots and ONNX file."""
    from fastseg.flops import count_macs, count_params
    from fastseg.models import load_model

    model, config = load_model(job.path, device, flag=job.flag)
    profile = job.profile
    input_hw = tuple(profile.resize_hw)
    row: dict[str, Any] = dict.fromkeys(report.RESULT_KEYS)
    row.update(
        checkpoint=label,
        path=str(job.path),
        profile=profile.index,
        trained_profile=config.get("profile"),
        input_size=list(input_hw),
        epoch=job.epoch,
        cum_train_tflop=job.cum_train_tflop,
        arch=config.get("arch", "fast_scnn"),
        experiment_id=config.get("experiment_id"),
        distilled=report.is_distilled(config),
        teacher=report.teacher_path(config),
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
                job,
                label,
                args,
                device,
                _per_checkpoint(optional_path(args.save_predictions), several, file_label),
                _per_checkpoint(optional_path(args.save_overlays), several, file_label),
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

    onnx = _per_checkpoint(optional_path(args.export_onnx), several, file_label, ".onnx")
    deployed = args.deployed_speed and not args.skip_speed and device.type == "cpu"
    if onnx is not None or deployed:
        row.update(deploy.deployed_fields(model, input_hw, label, export_path=onnx, runs=args.runs,
                                          warmup=args.warmup, use_cuda=device.type == "cuda"))

    submission = optional_path(args.export_submission)
    if submission is not None:
        package = export_submission(model, config, profile, submission / report.slug(file_label))
        print(f"{label}: submission packages in {package} (codalab.zip, docker/)", file=sys.stderr, flush=True)
        row["submission_dir"] = str(package)

    row.update(measure.efficiency_scores(row))
    del model
    return row


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
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # Let cuDNN pick its fastest kernels for the fixed input size, as a deployment would.
        torch.backends.cudnn.benchmark = True
    if args.throughput_batch is None:
        args.throughput_batch = 32 if device.type == "cuda" else 4

    jobs, roles = plan(args)
    paths = [job.path for job in jobs]
    labels = report.checkpoint_labels(paths)
    # A checkpoint scored at several profiles gets one file name per profile.
    file_labels = [label if paths.count(job.path) == 1 else f"{report.slug(label)}_p{job.profile.index}"
                   for job, label in zip(jobs, labels)]
    several = len(jobs) > 1
    results = [evaluate_checkpoint(job, label, file_label, args, device, several)
               for job, label, file_label in zip(jobs, labels, file_labels)]

    print(report.markdown_table(results))
    comparison = None
    if roles is not None:
        comparison = report.distillation_comparison(
            [results[i] for i in roles["students"]],
            [results[i] for i in roles["twins"]],
            [None if i is None else results[i] for i in roles["teachers"]],
        )
        print(f"\nstudent {args.compare[0]} against its undistilled twin {args.compare[1]}; "
              "gain = student - twin; the teacher scored at each student's profile")
        print(report.comparison_table(comparison))

    output = optional_path(args.output)
    if output is not None:
        report.write_json(output, results, run_settings(args, device), comparison=comparison)
        print(f"wrote {output}", file=sys.stderr)
    plots = optional_path(args.plots)
    if plots is not None:
        from fastseg.cityscapes import CLASS_NAMES

        written = []
        for row, file_label in zip(results, file_labels):
            if row.get("per_class_iou"):
                name = f"per_class_iou_{report.slug(file_label)}.png"
                written.append(report.plot_per_class_iou(row, plots / name, CLASS_NAMES))
        if several:
            written += report.plot_tradeoffs(results, plots)
        print(f"wrote {len(written)} plot(s) to {plots}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
