"""One training epoch and one validation pass, shared by every trainer and the evaluation tool.

The trainers differ only in their *objective*: a callable ``objective(model, images, labels)`` returning
``(loss, parts)`` where ``parts`` maps names (``ce``, ``kd``, ...) to detached scalar tensors.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastseg import distributed as dist_utils
from fastseg.data import IGNORE_INDEX, NUM_CLASSES, prepare_batch
from fastseg.errors import UserError
from fastseg.metrics import ConfusionMatrix

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class StopRequested(Exception):
    """A signal asked the run to stop after the current step (time limit or preemption).

    ``partial`` holds the epoch's running sums so far; passed back as ``carry`` on resume, the epoch's
    recorded losses and throughput cover the whole epoch, not only the part after the restart.
    """

    def __init__(self, step: int, partial: dict):
        super().__init__(f"stop requested after step {step}")
        self.step = step
        self.partial = partial


class NonFiniteLoss(UserError):
    pass


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def supervised_objective(criterion: Callable) -> Objective:
    """The teacher's objective: the model's output against the labels."""

    def objective(model, images, labels):
        return criterion(model(images), labels)

    return objective


@dataclass
class StepContext:
    """Everything a training step needs besides the batch; built once per stage."""

    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    seed: int
    rank: int = 0
    world_size: int = 1


def _jitter_generator(ctx: StepContext, epoch: int, step: int) -> torch.Generator:
    # Colour jitter depends only on (seed, epoch, step, rank): a resumed run draws the same values.
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(((ctx.seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + ctx.rank)
    return gen


def train_one_epoch(
    ctx: StepContext,
    loader: Iterable,
    epoch: int,
    start_step: int = 0,
    stop_requested: Callable[[], bool] = lambda: False,
    progress=None,
    check_every: int = 20,
    carry: dict | None = None,
) -> dict[str, float]:
    """Train over ``loader``, whose first batch is step ``start_step`` of the epoch (``set_epoch(loader,
    epoch, start_step)`` when resuming inside one); returns mean losses and throughput.

    Raises :class:`StopRequested` after the step during which ``stop_requested()`` became true (on any rank),
    and :class:`NonFiniteLoss` when the loss is NaN or infinite.
    """
    model = ctx.model
    model.train()
    carry = carry or {}
    sums: dict[str, torch.Tensor] = {
        k: torch.tensor(v, device=ctx.device) for k, v in carry.get("sums", {}).items()
    }
    count, images_seen = carry.get("count", 0), carry.get("images", 0)
    t0 = time.perf_counter() - carry.get("elapsed", 0.0)
    end = start_step + len(loader) if hasattr(loader, "__len__") else -1
    for step, batch in enumerate(loader, start=start_step):
        images, labels = prepare_batch(
            batch[0], batch[1], ctx.device, train=True, channels_last=ctx.channels_last,
            generator=_jitter_generator(ctx, epoch, step),
        )
        with autocast_context(ctx.device, ctx.amp_dtype):
            loss, parts = ctx.objective(model, images, labels)
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            loss.backward()
            ctx.optimizer.step()
        ctx.scheduler.step()

        for name, value in {"loss": loss.detach(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        count += 1
        images_seen += images.shape[0]
        last = step == end - 1
        # One host sync every few steps, not every step: enough to stop before a NaN reaches a checkpoint.
        if (count % check_every == 0 or last) and not math.isfinite(float(sums["loss"])):
            raise NonFiniteLoss(
                f"training loss became {float(sums['loss'])} at epoch {epoch + 1} step {step + 1}; "
                "lower --lr or use --amp bf16/off; the last good checkpoint is kept"
            )
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress.update(
                loss=loss.detach(),  # read only when a line is shown: no GPU sync per step
                lr=ctx.optimizer.param_groups[0]["lr"],
                images_per_s=images_seen * ctx.world_size / max(elapsed, 1e-9),
            )
        if dist_utils.broadcast_flag(stop_requested(), ctx.device):
            partial = {"sums": {k: float(v) for k, v in sums.items()}, "count": count, "images": images_seen,
                       "elapsed": time.perf_counter() - t0}
            raise StopRequested(step + 1, partial)

    elapsed = time.perf_counter() - t0
    means = {name: dist_utils.all_reduce_mean(float(v) / max(count, 1), ctx.device) for name, v in sums.items()}
    if not count:
        raise RuntimeError(f"epoch {epoch + 1} ran no training step (start_step {start_step}, no carried sums)")
    if not math.isfinite(means["loss"]):
        raise NonFiniteLoss(f"training loss became {means['loss']} in epoch {epoch + 1}; lower --lr")
    means["images_per_s"] = images_seen * ctx.world_size / max(elapsed, 1e-9)
    means["epoch_time_s"] = elapsed
    return means


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
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(valid)
    metrics = cm.compute()
    metrics["loss"] = float(loss_sum / valid.clamp(min=1))
    metrics["matrix"] = cm.mat.cpu()
    return metrics
