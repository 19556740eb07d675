"""Train a student on one curriculum stage with knowledge distillation from a frozen teacher.

This is ``train.py`` (the same flags, data, loop, validation, checkpoints, tracking, DDP and signals) with two
changes only: a teacher that has learned the whole curriculum, and the loss
``(1 - alpha) * CE + alpha * T^2 * KL(teacher/T || student/T)``, the KL averaged over labelled pixels so its
size does not grow with the resolution. The constants below are this script's own; every other setting is
``train.py``'s constant of the same name. Each one is also a flag::

    python train_distillation.py --profile 1 --trained-teacher-model-path checkpoints/fast_scnn/profile-5/best.pth
    python train_distillation.py --profile 2 --previous-student-model-path auto --trained-teacher-model-path ...
    sbatch jobscript_slurm_distillation.sh                      # the stage set by PROFILE below
    sbatch jobscript_slurm_distillation.sh --profile 2

The teacher may be any checkpoint ``train.py`` wrote (a wider Fast-SCNN, a torchvision DeepLabV3, ...) or a
users' plain Fast-SCNN state_dict; its architecture is read from the checkpoint.
"""

from __future__ import annotations

import argparse

import torch

import train
from fastseg.checkpoint import load_model
from fastseg.cityscapes import NUM_CLASSES
from fastseg.errors import UserError, run_cli
from fastseg.losses import DistillationLoss

# ---- what users edit (every other setting is train.py's constant) ------------------------------------------
PROFILE = 1  # curriculum stage 1..5, as in train.py
EXPERIMENT_ID = "fast_scnn_student"  # the student's run; its stages live under <output-dir>/<this>/
TRAINED_TEACHER_MODEL_PATH = "checkpoints/fast_scnn/profile-5/best.pth"  # the teacher after the whole curriculum
PREVIOUS_STUDENT_MODEL_PATH = "auto"  # auto = the student's best.pth of the previous profile (none at 1)
ALPHA = 0.5  # weight of the distillation term; 1 - ALPHA weighs the cross-entropy with the labels
TEMPERATURE = 4.0  # softens both distributions; the KL is multiplied by T^2 to keep gradient sizes
CWD_WEIGHT = 0.0  # channel-wise distillation (Shu et al. 2021) on the logits; 0 = off


def constants() -> dict:
    """train.py's constants, with this script's own in their place."""
    own = train.constants(globals())
    own["previous_model_path"] = own.pop("previous_student_model_path")
    return {**train.constants(), **own}


def add_distillation_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    g = parser.add_argument_group("distillation")
    g.add_argument("--trained-teacher-model-path", default=defaults["trained_teacher_model_path"],
                   help="the frozen teacher: a checkpoint written by train.py or a plain Fast-SCNN state_dict")
    g.add_argument("--previous-student-model-path", dest="previous_model_path", default=argparse.SUPPRESS,
                   help="the student's weights to start from: none, a path, or auto (same as --previous-model-path)")
    g.add_argument("--alpha", type=float, default=defaults["alpha"], help="weight of the KD term, in [0, 1]")
    g.add_argument("--temperature", type=float, default=defaults["temperature"], help="softmax temperature, > 0")
    g.add_argument("--cwd-weight", type=float, default=defaults["cwd_weight"], help="channel-wise distillation weight")


def build_objective(args, device: torch.device, model):
    """Cross-entropy with the labels plus distillation from the frozen teacher on the same augmented batch."""
    criterion = DistillationLoss(alpha=args.alpha, temperature=args.temperature, cwd_weight=args.cwd_weight,
                                 aux_weight=0.4)
    flag = "--trained-teacher-model-path"
    teacher, teacher_cfg = load_model(args.trained_teacher_model_path, device, flag=flag)
    if int(teacher_cfg.get("num_classes", NUM_CLASSES)) != NUM_CLASSES:
        raise UserError(f"{flag}: {args.trained_teacher_model_path} predicts {teacher_cfg['num_classes']} classes, "
                        f"the student {NUM_CLASSES}; use a teacher trained on the Cityscapes train ids")
    teacher.requires_grad_(False)  # load_model returns it in eval mode; the loop never switches it
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)

    def objective(student, images, labels):
        with torch.no_grad():
            teacher_logits = teacher(images)
        return criterion(student(images), teacher_logits, labels)

    teacher_info = {"path": str(args.trained_teacher_model_path), "arch": teacher_cfg.get("arch"),
                    "width_mult": teacher_cfg.get("width_mult"), "profile": teacher_cfg.get("profile")}
    return objective, {"teacher": teacher_info}


def main(argv=None) -> int:
    args = train.parse_args(argv, constants(), "train_distillation.py", add_distillation_flags, __doc__)
    return train.main(script_args=args, make_objective=build_objective,
                      previous_flag="--previous-student-model-path")


if __name__ == "__main__":
    run_cli(main)
