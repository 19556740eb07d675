"""Augmentation and batch preparation: the random (scale,) crop and flip of one training sample, on uint8
in the loader workers, and the colour jitter and normalisation of a whole uint8 batch on the device (a
uint8 batch is 4× cheaper to move than a float one).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastseg.cityscapes import IGNORE_INDEX, MEAN, STD, resize_image

# The train transform's colour jitter, as torchvision's ColorJitter(0.3, 0.3, 0.3, 0.1).
JITTER_BRIGHTNESS = 0.3
JITTER_CONTRAST = 0.3
JITTER_SATURATION = 0.3
JITTER_HUE = 0.1

# The paper's random scale range, behind `scale_aug`.
SCALE_RANGE = (0.5, 2.0)


# ---------------------------------------------------------------------------------------------------------
# The train crop, per sample in the loader workers: geometric only, on uint8.


def train_crop(
    image: np.ndarray, label: np.ndarray, patch_hw: tuple[int, int], rng: np.random.Generator, scale_aug: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Random (scale,) crop and flip of one cached sample; returns fresh C-contiguous arrays of the patch size.

    Without scale the crop is a slice of the memory map, so only the patch's pixels are read. With scale
    (uniform in ``SCALE_RANGE``) the patch is a crop of the rescaled sample, bilinear (antialiased) for the
    image and nearest for the label; where the rescaled sample is smaller than the patch, the patch is
    padded at the bottom and right, the image with 0 and the label with ``IGNORE_INDEX``.
    """
    ph, pw = patch_hw
    h, w = label.shape
    flip = rng.random() < 0.5
    if scale_aug:
        scale = rng.uniform(*SCALE_RANGE)
        # Resizing only the source region the patch covers gives the crop of the rescaled image (up to the
        # rounding of the region's borders) for a fraction of the work of rescaling everything.
        out_h, out_w = min(ph, max(1, round(h * scale))), min(pw, max(1, round(w * scale)))
        src_h, src_w = min(h, max(1, round(out_h / scale))), min(w, max(1, round(out_w / scale)))
        y, x = int(rng.integers(0, h - src_h + 1)), int(rng.integers(0, w - src_w + 1))
        image, label = _rescaled_region(image, label, (y, x, src_h, src_w), (out_h, out_w), flip)
    else:
        y, x = int(rng.integers(0, max(h - ph, 0) + 1)), int(rng.integers(0, max(w - pw, 0) + 1))
        image, label = image[:, y : y + ph, x : x + pw], label[y : y + ph, x : x + pw]
        if flip:
            image, label = image[:, :, ::-1], label[:, ::-1]
        image, label = np.array(image, order="C"), np.array(label, order="C")
    if label.shape != (ph, pw):  # smaller than the patch: pad bottom/right, labels with the ignore value
        padded_image = np.zeros((3, ph, pw), dtype=np.uint8)
        padded_label = np.full((ph, pw), IGNORE_INDEX, dtype=np.uint8)
        padded_image[:, : label.shape[0], : label.shape[1]] = image
        padded_label[: label.shape[0], : label.shape[1]] = label
        return padded_image, padded_label
    return image, label


def _nearest_indices(src: int, out: int) -> np.ndarray:
    """For each of ``out`` pixels resampling ``src``, the nearest source pixel: half-pixel centres, the grid
    of :func:`~fastseg.cityscapes.resize_image` (and of torch's ``nearest-exact``)."""
    return np.minimum(((np.arange(out) + 0.5) * (src / out)).astype(np.intp), src - 1)


def _rescaled_region(
    image: np.ndarray,
    label: np.ndarray,
    region: tuple[int, int, int, int],
    out_hw: tuple[int, int],
    flip: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The region ``(y, x, h, w)`` of a sample resized to ``out_hw``, mirrored when ``flip``; fresh
    C-contiguous arrays."""
    y, x, src_h, src_w = region
    out_h, out_w = out_hw
    # Nearest needs only the sampled rows and columns: two takes straight from the memory map, the mirror
    # folded into the column order (~2x faster than torch's nearest on a copy of the region).
    rows = y + _nearest_indices(src_h, out_h)
    cols = x + _nearest_indices(src_w, out_w)
    # (asarray: a plain view of the memory map, so that the result is a plain array, not a np.memmap)
    label = np.asarray(label).take(rows, axis=0).take(cols[::-1] if flip else cols, axis=1)
    resized = resize_image(torch.from_numpy(np.array(image[:, y : y + src_h, x : x + src_w])), out_hw)
    if flip:  # torch's flip is vectorised: ~10x faster than numpy's reversed copy of uint8
        resized = torch.flip(resized, [-1])
    return resized.numpy(), label


# ---------------------------------------------------------------------------------------------------------
# Batch preparation on the device.
#
# Colour jitter is folded into one 3×3 colour matrix and offset per image: brightness (scale), contrast
# (blend with the image's mean grey, known from the channel means), saturation (blend with grey) and hue
# are all linear in RGB. Hue is a rotation of the chroma plane in YIQ space (the choice of NVIDIA DALI's
# hue op): a close, cheap stand-in for torchvision's HSV shift, with no per-pixel branches. The ops are
# applied in a fixed order, brightness, contrast, saturation, hue, and clamped once at the end rather
# than after each (torchvision's ColorJitter picks a random order and clamps in between). A batch costs
# one batched 3×3 matrix product, one clamp and the normalisation.

_GREY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _jitter_affine(means: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image colour matrix A (N×3×3) and offset t (N×3) on the 0-1 scale, from channel means (N×3)
    and four uniform draws in [0, 1) per image (N×4)."""
    dev, dt = means.device, means.dtype
    n = means.shape[0]
    u = factors.to(dev, dt) * 2 - 1
    b = 1 + JITTER_BRIGHTNESS * u[:, 0]
    c = 1 + JITTER_CONTRAST * u[:, 1]
    s = 1 + JITTER_SATURATION * u[:, 2]
    theta = (JITTER_HUE * u[:, 3]) * 2 * math.pi
    eye = torch.eye(3, device=dev, dtype=dt).expand(n, 3, 3)
    grey = torch.tensor(_GREY, device=dev, dtype=dt)
    to_grey = grey.expand(3, 3)  # every row the luma weights: x -> (grey, grey, grey)

    a = b[:, None, None] * eye
    t = torch.zeros(n, 3, device=dev, dtype=dt)
    mean_grey = (a @ means[:, :, None])[:, :, 0] @ grey  # the image's mean grey after brightness
    a = c[:, None, None] * a
    t = c[:, None] * t + ((1 - c) * mean_grey)[:, None]
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * to_grey
    a, t = sat @ a, (sat @ t[:, :, None])[:, :, 0]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3, device=dev, dtype=dt)
    rot[:, 0, 0] = 1
    # This direction matches torchvision's: a positive hue factor turns red towards yellow.
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, sin, -sin, cos
    to_yiq = torch.as_tensor(_RGB_TO_YIQ, device=dev, dtype=dt)
    from_yiq = torch.as_tensor(_YIQ_TO_RGB, device=dev, dtype=dt)
    hue = from_yiq @ rot @ to_yiq
    return hue @ a, (hue @ t[:, :, None])[:, :, 0]


def _channel_means_cpu(x: torch.Tensor) -> torch.Tensor:
    """Per-image channel means (N×3, 0-1 scale) of a CPU uint8 batch, exact: numpy sums uint8 into
    uint64 without a float copy of the batch (torch's uint8 sums are ~7× slower)."""
    sums = x.contiguous().numpy().reshape(x.shape[0], 3, -1).sum(-1, dtype=np.uint64)
    return torch.from_numpy(sums / (255.0 * x[0, 0].numel())).float()


def _affine_cpu(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``a @ x + t`` per image on a CPU uint8 batch, one output plane at a time with scalar factors.

    One float buffer in all and in-place passes over it: on the CPU, freshly allocated batch-sized
    buffers cost more (page faults) than the arithmetic, so this is ~2× faster than float() then bmm.
    """
    out = torch.empty(x.shape, dtype=torch.float32)
    for i, (rows, offsets) in enumerate(zip(a.tolist(), t.tolist())):
        for c, (row, offset) in enumerate(zip(rows, offsets)):
            plane = out[i, c]
            torch.mul(x[i, 0], row[0], out=plane)
            for j in (1, 2):
                if row[j] != 0:
                    plane.add_(x[i, j], alpha=row[j])
            plane.add_(offset)
    return out


def _affine_bmm(xf: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``a @ x + t`` per image as one batched matrix product (the accelerator path)."""
    n = xf.shape[0]
    return torch.bmm(a, xf.view(n, 3, -1)).view_as(xf).add_(t[:, :, None, None])


def prepare_batch(
    images_u8: torch.Tensor,
    labels_u8: torch.Tensor,
    device: torch.device | str,
    train: bool,
    jitter: bool = True,
    channels_last: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch → (normalised float32 images N×3×h×w, int64 labels N×h×w), both on ``device``.

    When ``train`` and ``jitter``: per-image colour jitter (brightness, contrast, saturation 0.3, hue 0.1)
    drawn from ``generator`` (on the device's kind), vectorised over the batch.
    """
    if images_u8.dtype != torch.uint8:
        raise TypeError(f"prepare_batch expects uint8 images, got {images_u8.dtype}")
    device = torch.device(device)
    x = images_u8.to(device, non_blocking=True)
    labels = labels_u8.to(device, non_blocking=True).long()
    n = x.shape[0]
    on_cpu = x.device.type == "cpu"
    xf = None if on_cpu else x.float()
    jittered = train and jitter
    if jittered:
        gen_device = generator.device if generator is not None else device
        factors = torch.rand(n, 4, generator=generator, device=gen_device)
        means = _channel_means_cpu(x) if on_cpu else xf.mean(dim=(2, 3)) / 255
        a, t = _jitter_affine(means, factors)
    else:
        a = torch.eye(3, device=x.device).expand(n, 3, 3)
        t = torch.zeros(n, 3, device=x.device)
    # Normalisation folded in: normalise(clamp(A x + t, 0, 1)) == clamp(A' x + t', lo, hi) per channel,
    # with A' = diag(1/std) A / 255 and t' = (t - mean) / std.
    mean = torch.tensor(MEAN, device=x.device)
    inv_std = 1 / torch.tensor(STD, device=x.device)
    a = inv_std[None, :, None] * a / 255
    t = (t - mean) * inv_std
    if on_cpu:
        out = _affine_cpu(x, a, t)
    else:
        out = _affine_bmm(xf, a, t)
    if jittered:  # (without jitter the values are in range already)
        # One channel at a time with scalar bounds: ~8× faster on the CPU than per-channel bound tensors.
        for c, (m, s) in enumerate(zip(MEAN, STD)):
            out[:, c].clamp_(-m / s, (1 - m) / s)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out, labels
