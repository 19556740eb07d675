"""Validation and mixed precision, shared by the trainers and the evaluation tool.

The training loop itself is in ``train.py``; :func:`evaluate` is here because ``evaluate_efficiency.py``
scores checkpoints with the very same pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastseg import distributed as dist_utils
from fastseg.augment import prepare_batch
from fastseg.cityscapes import IGNORE_INDEX, NUM_CLASSES
from fastseg.errors import UserError
from fastseg.metrics import ConfusionMatrix


class NonFiniteLoss(UserError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# bf16 is computed natively from Ampere (compute capability 8.0) on; older GPUs (V100 7.0, T4 7.5) emulate it
# slowly, although torch.cuda.is_bf16_supported() says True there in current PyTorch.
BF16_MIN_CAPABILITY = (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bf16 natively (compute capability 8.0 and up); False off CUDA."""
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``.

    ``auto``: bf16 where the GPU computes it natively (no loss scaling needed), else fp16, which the trainer
    pairs with a GradScaler; None (fp32) on the CPU or with ``off``.
    """
    if device.type != "cuda" or name == "off":
        if name in ("bf16", "fp16") and device.type != "cuda":
            print(f"note: --amp {name} needs a GPU; running in fp32 on {device}", flush=True)
        return None
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if name == "bf16" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        print(f"note: --amp bf16 on a GPU of compute capability {major}.{minor} is emulated and slow; "
              "--amp fp16 (or auto) is the fast choice there", flush=True)
    return torch.bfloat16 if name == "bf16" else torch.float16


def main_logits(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The logits a prediction is made from: a model with an auxiliary head returns ``(main, aux)``."""
    return output[0] if isinstance(output, (tuple, list)) else output


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``N×C×h×w`` logits resized to ``size`` (H, W), bilinear as the Cityscapes convention scores them;
    the argmax over ``C`` of the result is the prediction at that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int = NUM_CLASSES,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_batch: Callable | None = None,
) -> dict:
    """Validation over the whole split: loss and the metrics of one confusion matrix (all-reduced).

    Logits are upsampled to the labels' size, so full-resolution labels give the Cityscapes convention.
    ``on_batch(indices, logits, images, labels)`` sees every batch with its float logits at the labels' size
    (saving predictions, logging images). The result holds the matrix itself too, as ``matrix``.
    """
    model.eval()
    dist_utils.broadcast_buffers(model)
    cm = ConfusionMatrix(num_classes, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    valid = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        images, labels = prepare_batch(batch[0], batch[1], device, train=False, channels_last=channels_last)
        with autocast_context(device, amp_dtype):
            output = model(images)
        logits = upsample_logits(main_logits(output).float(), labels.shape[-2:])
        loss_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").double()
        valid += (labels != IGNORE_INDEX).sum()
        cm.update(labels, logits.argmax(1))
        if on_batch is not None:
            on_batch(batch[2] if len(batch) > 2 else None, logits, images, labels)
    cm.all_reduce()
    if torch.distributed.is_initialized():
        dist_utils.all_reduce(loss_sum, kind="val_loss_sum")
        dist_utils.all_reduce(valid, kind="val_valid")
    metrics = cm.compute()
    metrics["loss"] = float(loss_sum / valid.clamp(min=1))
    metrics["matrix"] = cm.mat.cpu()
    return metrics
