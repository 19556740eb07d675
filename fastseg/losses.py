"""Training losses: cross-entropy with the auxiliary heads, and knowledge distillation (KL, DIST, CWD).

Every loss here is a mean (over valid pixels, or channels), so its size does not depend on the resolution
of the curriculum stage. An earlier KD term summed over pixels and divided by the batch grew from about 8·10^4 at
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


def _check_temperature(temperature: float, flag: str = "--temperature") -> None:
    # `not >` also rejects NaN.
    if not temperature > 0 or math.isinf(temperature):
        raise UserError(f"{flag}: must be a positive number, got {temperature}; 1.0 is the published value")


def _labels_at(target: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Labels brought to a logits grid with nearest (a blend of two class ids is no class)."""
    if target.shape[-2:] == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


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
    temperature: float = 1.0,
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
    valid = _labels_at(target, size) != ignore_index
    # A batch with no valid pixel gives 0 with a gradient rather than 0/0.
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1) * temperature**2


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``; 0 where either is constant (``eps``)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): match the teacher's relations, not its exact probabilities.

    With ``p = softmax(logits / τ)`` over the classes at every pixel, and the pixels of the whole batch as
    the samples (N·H·W of them, those labelled ``ignore_index`` left out when ``target`` is given):

    * inter-class relation: 1 − the Pearson correlation between the student's and the teacher's class
      vectors at a pixel, averaged over the pixels;
    * intra-class relation: 1 − the Pearson correlation between the student's and the teacher's
      probabilities of one class across all those pixels, averaged over the classes.

    The loss is ``τ² · (β · inter + γ · intra)``. The intra-class samples are the batch's pixels together,
    as in the authors' segmentation code (logits flattened to (N·H·W)×C), so a class's correlation also
    compares images. Correlation ignores the scale and shift of the teacher's probabilities, which is what
    lets a much stronger teacher (sharper, more confident) still be a reachable target. Teacher logits are
    detached and resized bilinearly, labels with nearest, to the student's grid.
    """
    _check_temperature(temperature)
    size = student_logits.shape[-2:]
    teacher_logits = _resize_like(teacher_logits.detach(), size)
    c = student_logits.shape[1]
    # One row per pixel: (N·H·W)×C.
    p_s = F.softmax(student_logits.float() / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    if target is not None:
        valid = (_labels_at(target, size) != ignore_index).reshape(-1)
        if not valid.any():  # 0 with a (zero) gradient rather than the mean of nothing
            return student_logits.float().sum() * 0.0
        p_s, p_t = p_s[valid], p_t[valid]
    inter = 1.0 - _pearson(p_s, p_t, dim=1).mean()
    intra = 1.0 - _pearson(p_s, p_t, dim=0).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def cwd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel's logits become a distribution over the spatial positions (softmax over H×W at
    temperature T); the loss is ``T² · KL(teacher ‖ student)`` summed over positions and averaged over
    channels and batch, as in the paper's implementation (divided by N·C). Every position takes part, the
    unlabelled ones too: a channel's distribution is over the whole image. Teacher logits are detached and
    resized bilinearly to the student's size when they differ.
    """
    _check_temperature(temperature, "--cwd-temperature")
    teacher_logits = _resize_like(teacher_logits.detach(), student_logits.shape[-2:])
    n, c = student_logits.shape[:2]
    log_s = F.log_softmax(student_logits.float().reshape(n, c, -1) / temperature, dim=2)
    log_t = F.log_softmax(teacher_logits.float().reshape(n, c, -1) / temperature, dim=2)
    return (log_t.exp() * (log_t - log_s)).sum() / (n * c) * temperature**2


KD_LOSSES = ("dist", "kl")
# Which pixels the KD term averages over: every pixel of the batch (DIST's and CIRKD's code), or the labelled ones.
KD_PIXEL_CHOICES = ("all", "labelled")


class DistillationLoss:
    """Cross-entropy with the labels plus distillation from a teacher's logits, in one of two forms.

    * ``alpha=None`` (the published recipes): ``CE + aux_weight·aux CE + kd_weight·KD + cwd_weight·CWD``.
      The labels keep their full weight; the distillation is added on top.
    * ``alpha`` in [0, 1] (this project's earlier form): ``(1 − α)·(CE + aux_weight·aux CE) + α·KD +
      cwd_weight·CWD``; ``kd_weight`` is not used.

    KD is ``dist`` (:func:`dist_loss`, τ = ``temperature``) or ``kl`` (:func:`kd_loss` at ``temperature``),
    averaged over every pixel of the batch (``kd_pixels="all"``, as the DIST authors' segmentation code and
    CIRKD's ``CriterionKD`` do) or over the labelled ones only (``"labelled"``); CWD (:func:`cwd_loss` at
    ``cwd_temperature``) is an extra term over every position, off at weight 0.

    With ``aux_pairs`` (student's and teacher's auxiliary-head logits), KD also compares each pair, at
    ``aux_weight`` (0.4) times the main term's weight, as the DIST authors distil their auxiliary head:
    ``KD`` above becomes ``KD(main) + aux_weight · Σ KD(aux pair)``.

    Called as ``loss_fn(student_output, teacher_logits, target, student_logits=None, aux_pairs=())``.
    ``student_output`` is the logits tensor or ``(main, aux, ...)`` at the labels' size, for the
    cross-entropy; ``student_logits`` are the logits the distillation compares with the teacher's (the
    classifier's, at the model's output stride); without them the main output is used. Returns
    ``(total, parts)`` with ``ce`` (main CE), ``kd`` (the main pair's), ``aux`` (the sum over the auxiliary
    outputs, as in ``SegmentationLoss``) when the student has them, ``kd_aux`` (the sum over ``aux_pairs``)
    when given, and ``cwd`` when ``cwd_weight > 0``.
    """

    def __init__(
        self,
        kd: str = "dist",
        kd_weight: float = 1.0,
        alpha: float | None = None,
        temperature: float = 1.0,
        cwd_weight: float = 0.0,
        cwd_temperature: float = 1.0,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        kd_pixels: str = "all",
    ):
        if kd_pixels not in KD_PIXEL_CHOICES:
            raise UserError(f"--kd-pixels: unknown choice {kd_pixels!r}; choose one of {', '.join(KD_PIXEL_CHOICES)}")
        if kd not in KD_LOSSES:
            raise UserError(f"--kd-loss: unknown loss {kd!r}; choose one of {', '.join(KD_LOSSES)}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise UserError(
                f"--alpha: must be in [0, 1] or none, got {alpha}; none adds --kd-weight x KD to the full "
                "cross-entropy"
            )
        if not kd_weight >= 0 or math.isinf(kd_weight):
            raise UserError(f"--kd-weight: must be a number >= 0, got {kd_weight}; 1.0 is the published value")
        _check_temperature(temperature)
        _check_temperature(cwd_temperature, "--cwd-temperature")
        if not cwd_weight >= 0:
            raise UserError(
                f"--cwd-weight: must be >= 0, got {cwd_weight}; 0 turns channel-wise distillation off"
            )
        self.kd = kd
        self.kd_weight = kd_weight
        self.alpha = alpha
        self.temperature = temperature
        self.cwd_weight = cwd_weight
        self.cwd_temperature = cwd_temperature
        self.ignore_index = ignore_index
        self.kd_pixels = kd_pixels
        self.aux_weight = aux_weight
        self.segmentation = SegmentationLoss(aux_weight=aux_weight, ignore_index=ignore_index)

    def __call__(
        self,
        student_output: Output,
        teacher_logits: Output,
        target: torch.Tensor,
        student_logits: torch.Tensor | None = None,
        aux_pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...] | list = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if student_logits is None:
            student_logits, _ = _split(student_output)
        teacher, _ = _split(teacher_logits)
        seg, parts = self.segmentation(student_output, target)
        kd = self._kd(student_logits, teacher, target)
        parts["kd"] = kd.detach()
        if aux_pairs:
            kd_aux = sum(self._kd(s, t, target) for s, t in aux_pairs)
            parts["kd_aux"] = kd_aux.detach()
            kd = kd + self.aux_weight * kd_aux
        if self.alpha is None:
            total = seg + self.kd_weight * kd
        else:
            total = (1.0 - self.alpha) * seg + self.alpha * kd
        if self.cwd_weight > 0:
            cwd = cwd_loss(student_logits, teacher, self.cwd_temperature)
            parts["cwd"] = cwd.detach()
            total = total + self.cwd_weight * cwd
        return total, parts

    def _kd(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target if self.kd_pixels == "labelled" else None  # None: every pixel of the batch
        if self.kd == "dist":
            return dist_loss(student, teacher, target, self.temperature, ignore_index=self.ignore_index)
        return kd_loss(student, teacher, target, self.temperature, self.ignore_index)
