"""Optimiser and learning-rate schedule of a stage."""

from __future__ import annotations

import torch
from torch import nn


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


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up, then poly decay (power 0.9) to zero at the last step, or a constant rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)) ** 0.9

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
