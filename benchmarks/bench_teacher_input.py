"""How right is a teacher on a student's crops: at the student's scale, or scaled to its own (--teacher-input)?

    python -m benchmarks.bench_teacher_input                      # CPU: a few minutes
    python -m benchmarks.bench_teacher_input --epochs 60 --device cuda

A teacher trained at a profile-5-like size (synthetic scenes resized to 512x256, 384x192 crops: the
curriculum divided by 4) is scored on the crops that students at profile-1-like and profile-3-like sizes train
on (144x72 -> 112x56 and 256x128 -> 192x96 crops of the val scenes, the curriculum's scale ratios 3.56 and 2),
through ``train_distillation.teacher_logits``, the function the KD objective calls:

* ``student``: the teacher sees the student's crop as it is (``--teacher-input student``);
* ``teacher``: the crop is scaled by teacher resize / student resize first (``--teacher-input teacher``).

Both ways the teacher's classifier logits are brought to the student's 1/8 grid (what the KD term compares),
then upsampled to the crop and scored against its labels. Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch.nn.functional as F

import train
import train_distillation
from fastseg.augment import prepare_batch
from fastseg.checkpoint import load_checkpoint
from fastseg.cityscapes import Profile
from fastseg.data import SegmentationDataset, build_loader
from fastseg.distributed import resolve_device
from fastseg.errors import run_cli
from fastseg.metrics import ConfusionMatrix
from fastseg.models import ClassifierLogits, load_model
from tools.synthetic import generate

TEACHER = Profile(5, (512, 256), (384, 192))
STUDENTS = (Profile(1, (144, 72), (112, 56)), Profile(3, (256, 128), (192, 96)))


def score(teacher, head: ClassifierLogits, loader, device, scale: tuple[float, float], grid: float = 8) -> tuple:
    """mIoU and pixel accuracy of the teacher's logits on the student's 1/8 grid."""
    cm = ConfusionMatrix(19, device=device)
    for images, labels, _ in loader:
        x, y = prepare_batch(images, labels, device, train=False)
        low = train_distillation.teacher_logits(teacher, head, x, scale)
        student_grid = (round(x.shape[-2] / grid), round(x.shape[-1] / grid))  # Fast-SCNN's, for these sizes
        low = F.interpolate(low.float(), size=student_grid, mode="bilinear", align_corners=False)
        cm.update(y, F.interpolate(low, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1))
    result = cm.compute()
    return result["miou"], result["pixel_accuracy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the data and the teacher go (default: a temp dir)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--scale-aug", action=argparse.BooleanOptionalAction, default=False,
                   help="train the teacher with random scale 0.5-2.0 (the paper recipe's augmentation)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = resolve_device(args.device, 0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_teacher_input-"))
    data = generate(work / "data", train=48, val=12, width=1024, height=512, seed=args.seed, workers=2)

    flags = ["--data-dir", str(data), "--output-dir", str(work / "checkpoints"), "--experiment-id", "teacher",
             "--resize", "x".join(map(str, TEACHER.resize)), "--patch", "x".join(map(str, TEACHER.patch)),
             "--epochs", str(args.epochs), "--recipe", "adamw", "--lr", "3e-3", "--batch-size", "8",
             "--num-workers", "2", "--device", args.device, "--wandb", "disabled", "--previous-model-path", "none",
             "--label-resolution", "resized", "--seed", str(args.seed),
             "--scale-aug" if args.scale_aug else "--no-scale-aug"]
    assert train.main(flags) == 0
    path = work / "checkpoints" / "teacher" / "profile-1" / "best.pth"
    teacher, cfg = load_model(path, device)
    teacher.requires_grad_(False)
    head = ClassifierLogits(teacher)
    own = load_checkpoint(path)["metrics"]["val_miou"]
    print(f"\nteacher: Fast-SCNN, {args.epochs} epochs on {TEACHER.patch[0]}x{TEACHER.patch[1]} crops of "
          f"{TEACHER.resize[0]}x{TEACHER.resize[1]} scenes (scale aug {'on' if args.scale_aug else 'off'}); "
          f"val mIoU on whole scenes at that size {own:.4f}")
    # The teacher's forward costs about scale^2 times as much when it sees the crops at its own resolution.
    print("| student crops (of resize) | teacher input | scale | teacher's pixels | teacher mIoU | pixel acc |")
    print("|---|---|---|---|---|---|")
    for student in STUDENTS:
        # The crops a student trains on (random crop and flip, fixed seed), without colour jitter.
        val = SegmentationDataset(data, "val", student, train=True)
        loader = build_loader(val, 4, 0, shuffle=False, seed=args.seed)
        for way in ("student", "teacher"):
            # The factors train_distillation.py derives from the teacher's checkpoint and the student's stage.
            stage = argparse.Namespace(teacher_input=way, profile=student.index, resize=student.resize,
                                       patch=student.patch, trained_teacher_model_path=str(path))
            scale = train_distillation.teacher_scale(stage, cfg)
            miou, acc = score(teacher, head, loader, device, scale)
            print(f"| {student.patch[0]}x{student.patch[1]} ({student.resize[0]}x{student.resize[1]}) | {way} | "
                  f"{scale[1]:.2f} | {scale[0] * scale[1]:.1f}x | {miou:.4f} | {acc:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
