"""Train a student on one curriculum stage with knowledge distillation from a frozen teacher.

This is ``train.py`` (the same flags, data, loop, validation, checkpoints, tracking, DDP and signals) with two
changes only: a teacher that has learned the whole curriculum, and the loss::

    CE (+ 0.4 * aux CE) + KD_WEIGHT * KD + CWD_WEIGHT * CWD        (ALPHA = None, the default)
    (1 - ALPHA) * (CE + 0.4 * aux CE) + ALPHA * KD + CWD_WEIGHT * CWD   (ALPHA set: this project's earlier form)

KD is DIST (``--kd-loss dist``) or the KL divergence at ``TEMPERATURE`` (``--kd-loss kl``); CWD is channel-wise
distillation. The cross-entropy is on the student's output at the labels' size; the distillation terms compare
the logits of both classifiers at the student's output stride (1/8 for Fast-SCNN), before the upsampling, the
teacher's resized bilinearly to the student's grid, averaged over every pixel of the batch as the authors do
(``--kd-pixels labelled``: the labelled ones only; ``--kd-aux``: the auxiliary heads too, at 0.4). The defaults
are the published recipes (docs/distillation.md). The constants below are this script's own;
every other setting is ``train.py``'s constant of the same name. Each one is also a flag::

    python train_distillation.py --profile 1 --trained-teacher-model-path checkpoints/fast_scnn/profile-5/best.pth
    python train_distillation.py --profile 2 --previous-student-model-path auto --trained-teacher-model-path ...
    python train_distillation.py --kd-loss kl --temperature 1 --kd-weight 1 --cwd-weight 5 ...   # KL + CWD
    python train_distillation.py --teacher-input teacher ...    # the teacher sees the crop at its own resolution
    sbatch jobscript_slurm_distillation.sh                      # the stage set by PROFILE below
    sbatch jobscript_slurm_distillation.sh --profile 2

The teacher may be any checkpoint ``train.py`` wrote (a wider Fast-SCNN, a torchvision DeepLabV3 with an
ImageNet backbone, ...) or a users' plain Fast-SCNN state_dict; its architecture is read from the checkpoint.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import train
from fastseg.cityscapes import NUM_CLASSES
from fastseg.config import stage_profile
from fastseg.errors import UserError, run_cli
from fastseg.losses import KD_LOSSES, KD_PIXEL_CHOICES, DistillationLoss
from fastseg.models import ClassifierLogits, aux_head_names, load_model

# ---- what users edit (every other setting is train.py's constant) ------------------------------------------
PROFILE = 1  # curriculum stage 1..5, as in train.py
EXPERIMENT_ID = "fast_scnn_student"  # the student's run; its stages live under <output-dir>/<this>/
TRAINED_TEACHER_MODEL_PATH = "checkpoints/fast_scnn/profile-5/best.pth"  # the teacher after the whole curriculum
PREVIOUS_STUDENT_MODEL_PATH = "auto"  # auto = the student's best.pth of the previous profile (none at 1)
# ---- the loss: CE (+ 0.4 aux) + KD_WEIGHT * KD + CWD_WEIGHT * CWD; values from the papers (README table) -----
KD_LOSS = "dist"  # dist: DIST (Huang et al. 2022), the teacher's class relations; kl: KL divergence (CIRKD's KD)
KD_WEIGHT = 1.0  # beside the cross-entropy at full weight; 1.0 in DIST and CIRKD
TEMPERATURE = 1.0  # softens both sides (DIST's tau, KL's T; the term is scaled by T^2); 1.0 in DIST and CIRKD
KD_PIXELS = "all"  # all: the KD term over every pixel of the batch (DIST's and CIRKD's code) | labelled: label != 255
KD_AUX = False  # also distil the auxiliary heads (student's and teacher's), 0.4 x KD each, as the DIST authors
ALPHA = None  # None: the form above; a number in [0, 1]: (1 - ALPHA) * CE + ALPHA * KD, KD_WEIGHT unused
CWD_WEIGHT = 0.0  # channel-wise distillation (Shu et al. 2021) added on top; 0 = off, 5.0 as published
CWD_TEMPERATURE = 1.0  # CWD's own temperature; 1.0 with weight 5 (the CWD authors), 4.0 with weight 3 (CIRKD)
TEACHER_INPUT = "student"  # student: the teacher sees the student's batch; teacher: at its training resolution


def constants() -> dict:
    """train.py's constants, with this script's own in their place."""
    own = train.constants(globals())
    own["previous_model_path"] = own.pop("previous_student_model_path")
    return {**train.constants(), **own}


def _alpha(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def add_distillation_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    g = parser.add_argument_group("distillation")
    g.add_argument("--trained-teacher-model-path", default=defaults["trained_teacher_model_path"],
                   help="the frozen teacher: a checkpoint written by train.py or a plain Fast-SCNN state_dict")
    g.add_argument("--previous-student-model-path", dest="previous_model_path", default=argparse.SUPPRESS,
                   help="the student's weights to start from: none, a path, or auto (same as --previous-model-path)")
    g.add_argument("--kd-loss", choices=KD_LOSSES, default=defaults["kd_loss"],
                   help="dist: DIST's inter- and intra-class correlations; kl: KL divergence at --temperature")
    g.add_argument("--kd-weight", type=float, default=defaults["kd_weight"],
                   help="weight of the KD term beside the cross-entropy at full weight")
    g.add_argument("--temperature", type=float, default=defaults["temperature"],
                   help="softmax temperature of the KD term (DIST's tau, KL's T), > 0")
    g.add_argument("--kd-pixels", choices=KD_PIXEL_CHOICES, default=defaults["kd_pixels"],
                   help="all: the KD term averages over every pixel of the batch (as DIST's and CIRKD's code); "
                        "labelled: over the pixels whose label is not 255")
    g.add_argument("--kd-aux", action=argparse.BooleanOptionalAction, default=defaults["kd_aux"],
                   help="also distil each auxiliary head from the teacher's of the same rank, 0.4 x the KD weight "
                        "(the DIST authors'); needs --aux and a teacher trained with its heads")
    g.add_argument("--alpha", type=_alpha, default=defaults["alpha"],
                   help="none: CE + kd-weight x KD; a number in [0, 1]: (1 - alpha) x CE + alpha x KD")
    g.add_argument("--cwd-weight", type=float, default=defaults["cwd_weight"],
                   help="channel-wise distillation weight, added on top (0 = off)")
    g.add_argument("--cwd-temperature", type=float, default=defaults["cwd_temperature"],
                   help="channel-wise distillation's temperature, > 0")
    g.add_argument("--teacher-input", choices=["student", "teacher"], default=defaults["teacher_input"],
                   help="student: the teacher sees the student's batch; teacher: the same crop scaled to the "
                        "teacher's training resolution (read from its checkpoint)")


def teacher_scale(args, teacher_cfg: dict) -> tuple[float, float]:
    """(height, width) factors that bring the student's images to the scale the teacher was trained at."""
    if args.teacher_input == "student":
        return 1.0, 1.0
    resize = teacher_cfg.get("resize")
    if not resize:
        raise UserError(f"--teacher-input teacher: {args.trained_teacher_model_path} does not say at which "
                        "resolution the teacher was trained (a plain state_dict); use a checkpoint written by "
                        "train.py, or --teacher-input student")
    student = stage_profile(args.profile, args.resize, args.patch).resize  # (W, H), as the teacher's
    return resize[1] / student[1], resize[0] / student[0]


def teacher_logits(teacher, head: ClassifierLogits, images: torch.Tensor, scale: tuple[float, float]):
    """The teacher's classifier logits for ``images`` seen at ``scale`` times their size (no gradient); its
    auxiliary heads' hooks, if any, get theirs from the same pass."""
    if scale != (1.0, 1.0):
        h, w = images.shape[-2:]
        size = (max(1, round(h * scale[0])), max(1, round(w * scale[1])))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        teacher(images)
    return head.take()


def build_objective(args, device: torch.device, model):
    """Cross-entropy with the labels plus distillation from the frozen teacher on the same augmented batch."""
    criterion = DistillationLoss(kd=args.kd_loss, kd_weight=args.kd_weight, alpha=args.alpha,
                                 temperature=args.temperature, cwd_weight=args.cwd_weight,
                                 cwd_temperature=args.cwd_temperature, aux_weight=0.4, kd_pixels=args.kd_pixels)
    flag = "--trained-teacher-model-path"
    if args.kd_aux and not aux_head_names(model):
        raise UserError("--kd-aux: the student has no auxiliary heads to distil; add --aux or drop --kd-aux")
    teacher, teacher_cfg = load_model(args.trained_teacher_model_path, device, flag=flag, aux=args.kd_aux)
    if int(teacher_cfg.get("num_classes", NUM_CLASSES)) != NUM_CLASSES:
        raise UserError(f"{flag}: {args.trained_teacher_model_path} predicts {teacher_cfg['num_classes']} classes, "
                        f"the student {NUM_CLASSES}; use a teacher trained on the Cityscapes train ids")
    teacher.requires_grad_(False)  # load_model returns it in eval mode; the loop never switches it
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    scale = teacher_scale(args, teacher_cfg)
    # Both classifiers' logits at the output stride: the published methods distil there, not on the upsampled
    # output, and the KD term needs about 1/64 of the memory it needs at full size (tests/test_losses.py).
    student_head, teacher_head = ClassifierLogits(model), ClassifierLogits(teacher)
    # --kd-aux: the heads in the order the models return them, paired by rank (a Fast-SCNN student's 1/8 head
    # with a torchvision teacher's only one). Their logits before the upsampling, read by hooks as above.
    pairs = list(zip(aux_head_names(model), aux_head_names(teacher))) if args.kd_aux else []
    aux_heads = [(ClassifierLogits(model, s), ClassifierLogits(teacher, t)) for s, t in pairs]
    if pairs:  # the forward runs the heads only in training mode; every layer stays in eval mode
        teacher.training = True

    def objective(student, images, labels):
        output = student(images)
        teacher_main = teacher_logits(teacher, teacher_head, images, scale)
        return criterion(output, teacher_main, labels, student_logits=student_head.take(),
                         aux_pairs=[(s.take(), t.take()) for s, t in aux_heads])

    teacher_info = {"path": str(args.trained_teacher_model_path), "arch": teacher_cfg.get("arch"),
                    "width_mult": teacher_cfg.get("width_mult"), "profile": teacher_cfg.get("profile"),
                    "resize": teacher_cfg.get("resize"), "input_scale": list(scale), "kd_aux_pairs": pairs}
    return objective, {"teacher": teacher_info}


def main(argv=None) -> int:
    args = train.parse_args(argv, constants(), "train_distillation.py", add_distillation_flags, __doc__)
    return train.main(script_args=args, make_objective=build_objective,
                      previous_flag="--previous-student-model-path")


if __name__ == "__main__":
    run_cli(main)
