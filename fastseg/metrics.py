"""Segmentation accuracy from one confusion matrix over a whole split.

Every score is computed from the summed matrix, never averaged per image: that is what the official
Cityscapes evaluation (``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``) does, and our mIoU
equals its figure. In that script a class whose union TP + FP + FN is zero gets IoU NaN and is left out of
the mean; a class that is only predicted (never in the ground truth) has IoU 0 and counts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastseg import distributed


class ConfusionMatrix:
    """Pixel counts ``mat[target, prediction]`` accumulated on ``device`` with one ``bincount`` per batch.

    Pixels whose target is ``ignore_index`` (or any value outside ``[0, num_classes)``) are dropped. A
    prediction outside ``[0, num_classes)`` cannot be a hit, so such a pixel is counted as a miss of its
    target class (a false negative), as the official evaluation counts a prediction of a non-evaluated label.
    """

    def __init__(
        self, num_classes: int = 19, ignore_index: int = 255, device: torch.device | str | None = None
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # One spare column collects out-of-range predictions so that no index can land in another cell.
        self._counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=self.device)

    @property
    def mat(self) -> torch.Tensor:
        """The ``num_classes × num_classes`` matrix, rows = ground truth, columns = prediction."""
        return self._counts[:, : self.num_classes]

    def reset(self) -> None:
        self._counts.zero_()

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one batch; ``target`` and ``pred`` are integer tensors of the same shape (any shape)."""
        if target.shape != pred.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} differs from prediction shape {tuple(pred.shape)}"
            )
        n = self.num_classes
        t = target.to(self.device, non_blocking=True).reshape(-1).long()
        p = pred.to(self.device, non_blocking=True).reshape(-1).long()
        keep = (t >= 0) & (t < n) & (t != self.ignore_index)
        t, p = t[keep], p[keep]
        p = torch.where((p >= 0) & (p < n), p, torch.full_like(p, n))
        counts = torch.bincount(t * (n + 1) + p, minlength=n * (n + 1))
        self._counts += counts.view(n, n + 1)

    def all_reduce(self) -> None:
        """Sum the counts over all processes (no-op outside ``torch.distributed``)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = self._counts
        # NCCL reduces CUDA tensors only; a CPU matrix visits the GPU and comes back.
        if dist.get_backend() == "nccl" and counts.device.type != "cuda":
            counts = counts.cuda()
        distributed.all_reduce(counts, op=dist.ReduceOp.SUM, kind="confusion_matrix")
        if counts is not self._counts:
            self._counts.copy_(counts.to(self._counts.device))

    def compute(self) -> dict:
        """Scores as plain Python numbers: fractions in [0, 1]; absent classes are ``None`` per class.

        Keys: ``miou``, ``per_class_iou``, ``dice``, ``per_class_dice``, ``pixel_accuracy``, ``valid_pixels``.
        """
        counts = self._counts.double().cpu()
        mat = counts[:, : self.num_classes]
        tp = mat.diag()
        fn = counts.sum(dim=1) - tp  # includes the out-of-range predictions
        fp = mat.sum(dim=0) - tp
        union = tp + fp + fn
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.full_like(tp, math.nan))
        valid = counts.sum()
        return {
            "miou": _nanmean(iou),
            "per_class_iou": _listed(iou),
            "dice": _nanmean(dice),
            "per_class_dice": _listed(dice),
            "pixel_accuracy": float(tp.sum() / valid) if valid > 0 else math.nan,
            "valid_pixels": int(valid),
        }


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def _listed(values: torch.Tensor) -> list[float | None]:
    # None rather than NaN so the list survives json.dump as valid JSON.
    return [None if math.isnan(v) else v for v in values.tolist()]
