"""Training losses: cross-entropy with the auxiliary heads, and knowledge distillation.

Every loss here is a mean over valid pixels, so its size does not depend on the resolution of the
curriculum stage. An earlier KD term summed over pixels and divided by the batch grew from about 8·10^4 at
profile 1 to 4·10^5 at profile 5 and drowned the cross-entropy (about 0.3).

The dicts returned next to each loss hold detached 0-d tensors: turning them into Python floats every
step would wait for the GPU, so callers convert them when they print or log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastseg.errors import UserError

Output = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def _split(output: Output) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Main logits and the auxiliary logits that the model returned after them (none, one or several)."""
    if isinstance(output, (tuple, list)):
        return output[0], tuple(output[1:])
    return output, ()


def _resize_like(logits: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _check_temperature(temperature: float) -> None:
    # `not >` also rejects NaN.
    if not temperature > 0 or math.isinf(temperature):
        raise UserError(
            f"--temperature: must be a positive number, got {temperature}; 4.0 is the usual value"
        )


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy averaged over the pixels whose label is not ``ignore_index``.

    A batch with no valid pixel gives 0 (with a zero gradient) instead of the NaN of ``reduction="mean"``.
    Logits at another size than the labels are resized bilinearly to the labels first.
    """
    logits = _resize_like(logits, target.shape[-2:])
    total = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


class SegmentationLoss:
    """Cross-entropy on the main logits plus ``aux_weight`` × the sum of the auxiliary logits' cross-entropies.

    Called as ``loss_fn(output, target)`` where ``output`` is the logits tensor or ``(main, aux1, ...)``:
    Fast-SCNN with ``aux`` returns two auxiliary outputs, torchvision's models one. Each head has the full
    weight, as in the published recipes (0.4 each), so a second head adds to the loss rather than sharing it.
    Returns ``(loss, {"ce": main CE, "aux": sum of the aux CEs})``, so that ``loss = ce + aux_weight · aux``;
    ``aux`` is there only when the model returned auxiliary outputs. With two heads it is about twice what
    a run with one head logged.
    """

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = 255):
        if not aux_weight >= 0:
            raise UserError(f"--aux-weight: must be >= 0, got {aux_weight}")
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    def __call__(self, output: Output, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        main, aux = _split(output)
        ce = cross_entropy(main, target, self.ignore_index)
        parts = {"ce": ce.detach()}
        loss = ce
        if aux:
            aux_ce = sum(cross_entropy(logits, target, self.ignore_index) for logits in aux)
            parts["aux"] = aux_ce.detach()
            loss = loss + self.aux_weight * aux_ce
        return loss, parts


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    temperature: float = 4.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Pixel-wise distillation: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    The KL is summed over classes at each pixel and averaged over the valid pixels (label ≠
    ``ignore_index`` when ``target`` is given, every pixel otherwise). The teacher is a fixed target: its
    logits are detached, and resized bilinearly to the student's size when they differ; a ``target`` at
    another size is resized with nearest to the student's size. Computed in float32 from log-softmaxes.
    """
    _check_temperature(temperature)
    size = student_logits.shape[-2:]
    teacher_logits = _resize_like(teacher_logits.detach(), size)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_pixel = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # N×H×W
    if target is None:
        return per_pixel.mean() * temperature**2
    if target.shape[-2:] != size:
        target = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()
    valid = target != ignore_index
    # A batch with no valid pixel gives 0 with a gradient rather than 0/0.
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1) * temperature**2


def cwd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel's logits become a distribution over the spatial positions (softmax over H×W at
    temperature T); the loss is ``T² · KL(teacher ‖ student)`` summed over positions and averaged over
    channels and batch, as in the paper's implementation (divided by N·C). Teacher logits are detached and
    resized bilinearly to the student's size when they differ.
    """
    _check_temperature(temperature)
    teacher_logits = _resize_like(teacher_logits.detach(), student_logits.shape[-2:])
    n, c = student_logits.shape[:2]
    log_s = F.log_softmax(student_logits.float().reshape(n, c, -1) / temperature, dim=2)
    log_t = F.log_softmax(teacher_logits.float().reshape(n, c, -1) / temperature, dim=2)
    return (log_t.exp() * (log_t - log_s)).sum() / (n * c) * temperature**2


class DistillationLoss:
    """``(1 − α)·(CE + aux_weight·aux CE) + α·KD + cwd_weight·CWD``.

    Called as ``loss_fn(student_output, teacher_logits, target)``; ``student_output`` is the logits tensor
    or ``(main, aux1, ...)``, and the KD and CWD terms use the main logits (the teacher's too, when it
    returns a tuple). ``aux CE`` is the sum over the auxiliary outputs, as in ``SegmentationLoss``. Returns
    ``(total, parts)`` where ``parts`` has ``ce`` (main CE), ``kd``, ``aux`` when the student has auxiliary
    outputs, and ``cwd`` when ``cwd_weight > 0``.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 4.0,
        cwd_weight: float = 0.0,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise UserError(
                f"--alpha: must be in [0, 1], got {alpha}; 0 is plain cross-entropy, 1 is only distillation"
            )
        _check_temperature(temperature)
        if not cwd_weight >= 0:
            raise UserError(
                f"--cwd-weight: must be >= 0, got {cwd_weight}; 0 turns channel-wise distillation off"
            )
        self.alpha = alpha
        self.temperature = temperature
        self.cwd_weight = cwd_weight
        self.ignore_index = ignore_index
        self.segmentation = SegmentationLoss(aux_weight=aux_weight, ignore_index=ignore_index)

    def __call__(
        self, student_output: Output, teacher_logits: Output, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student, _ = _split(student_output)
        teacher, _ = _split(teacher_logits)
        seg, parts = self.segmentation(student_output, target)
        kd = kd_loss(student, teacher, target, self.temperature, self.ignore_index)
        parts["kd"] = kd.detach()
        total = (1.0 - self.alpha) * seg + self.alpha * kd
        if self.cwd_weight > 0:
            cwd = cwd_loss(student, teacher, self.temperature)
            parts["cwd"] = cwd.detach()
            total = total + self.cwd_weight * cwd
        return total, parts
