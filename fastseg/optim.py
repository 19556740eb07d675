"""Recipes, optimiser and learning-rate schedule of a stage.

``paper`` is the recipe behind every published Fast-SCNN result on Cityscapes (68.6-71.5 val mIoU): Poudel et
al. 2019 and mmsegmentation's ``configs/fastscnn`` agree on SGD with momentum 0.9 at 0.00375 per image of
the global batch, weight decay 4e-5, a poly decay (power 0.9) to 1e-4, two auxiliary heads at weight 0.4 and
random scaling 0.5-2.0 before the crop, and one decay over the whole curriculum. Its weights start from
PyTorch's layer defaults rather than mmsegmentation's He init: in benchmarks/bench_recipes.py (synthetic scenes,
three seeds) He init was behind at every budget measured (docs/recipe.md); ``--init kaiming`` restores it.
``adamw`` is exactly what earlier runs of this project used (AdamW 1e-3, weight decay 1e-4, a poly decay to 0
within each stage, batch 16, PyTorch's layer initialisation, no auxiliary heads, no scaling), kept so their
results can be reproduced; tests/test_recipe.py holds a short run to the figures of that code.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

RECIPES: dict[str, dict] = {
    "paper": {"batch_size": 16, "optimizer": "sgd", "lr_per_image": 0.00375, "weight_decay": 4e-5,
              "lr_schedule": "poly", "min_lr": 1e-4, "lr_decay": "curriculum", "aux": True, "scale_aug": True,
              "init": "pytorch"},
    "adamw": {"batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
              "lr_schedule": "poly", "min_lr": 0.0, "lr_decay": "stage", "aux": False, "scale_aug": False,
              "init": "pytorch"},
}
# The settings a recipe fills in when the script's constant (and flag) leaves them unset (None).
RECIPE_SETTINGS = ("batch_size", "optimizer", "lr", "weight_decay", "lr_schedule", "min_lr", "lr_decay", "aux",
                   "scale_aug", "init")


def apply_recipe(args: argparse.Namespace, world_size: int) -> tuple[argparse.Namespace, dict]:
    """``args`` with every unset recipe setting filled from ``args.recipe``; returns it and what was filled.

    The paper's rate scales with the global batch (per-process batch x processes), so the same recipe holds
    on one GPU or sixteen.
    """
    recipe = RECIPES[args.recipe]
    filled = {}
    for key in RECIPE_SETTINGS:
        if getattr(args, key) is None and key != "lr":
            filled[key] = recipe[key]
    batch = filled.get("batch_size", args.batch_size)
    if args.lr is None:
        filled["lr"] = recipe["lr_per_image"] * batch * world_size if "lr_per_image" in recipe else recipe["lr"]
    return argparse.Namespace(**{**vars(args), **filled}), filled


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norm weights, biases and depthwise kernels (decay would only shrink them)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            no_decay.add(id(module.weight))
        for name, p in module.named_parameters(recurse=False):
            if p.ndim <= 1 or name == "bias":
                no_decay.add(id(p))
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float):
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def decay_span(curriculum_epochs: list[int], profile: int, epochs: int, scope: str) -> tuple[int, int]:
    """(epochs before this stage, epochs in the whole decay) of the learning-rate decay this stage is part of.

    ``curriculum``: one decay over every planned epoch of profiles 1-5 (this stage's own count in its place),
    so stage k starts at the rate where stage k-1 ended. ``stage``: a whole decay within this stage.
    """
    if scope == "stage":
        return 0, epochs
    before = sum(curriculum_epochs[: profile - 1])
    return before, before + epochs + sum(curriculum_epochs[profile:])


def planned_decay(saved: dict | None, plan: tuple[int, int]) -> tuple[int, int]:
    """The decay span of a resumed stage: the one it started with (its checkpoint's config), not ``plan``.

    The decay is planned once, when a stage starts; a resume with other --epochs, --curriculum-epochs or
    --lr-decay keeps it, so the rate never jumps back up (docs/resume.md). Files from before the span was
    stored have it recomputed from their own settings.
    """
    saved = saved or {}
    if saved.get("decay_epochs"):
        return tuple(saved["decay_epochs"])
    if all(saved.get(k) is not None for k in ("curriculum_epochs", "profile", "epochs", "lr_decay")):
        return decay_span(saved["curriculum_epochs"], saved["profile"], saved["epochs"], saved["lr_decay"])
    return plan


def lr_factor(step: int, total_steps: int, schedule: str, min_factor: float = 0.0) -> float:
    """Multiplier of the base rate at ``step`` of a decay of ``total_steps``: poly (power 0.9) from 1 down to
    ``min_factor`` (mmsegmentation's ``min_lr`` / lr), or constant."""
    if schedule == "constant":
        return 1.0
    progress = min(1.0, step / max(1, total_steps))
    return min_factor + (1.0 - min_factor) * (1.0 - progress) ** 0.9


def build_scheduler(optimizer, schedule: str, start_step: int, total_steps: int, warmup_steps: int = 0,
                    min_factor: float = 0.0, done_steps: int = 0):
    """This stage's part of the decay: from ``start_step`` of ``total_steps``, after an optional linear warm-up
    (after a change of resolution) up to the rate the decay has reached there. ``done_steps``: the steps of
    the stage already trained (a resume), counted at this run's steps per epoch, so the decay goes on at the
    same epoch whatever the batch is now."""

    def factor(step: int) -> float:
        step += done_steps
        rate = lr_factor(start_step + step, total_steps, schedule, min_factor)
        return rate * (step + 1) / warmup_steps if step < warmup_steps else rate

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore_optimizer(optimizer, state: dict, lr: float) -> None:
    """Load a saved optimiser state (momentum, Adam's moments) with this run's base rate ``lr`` in place of
    the saved one: a resume with another global batch trains at the rate its recipe gives that batch."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
