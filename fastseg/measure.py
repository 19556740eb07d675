"""Accuracy, cost and speed of a segmentation checkpoint: the measurements behind ``evaluate_efficiency.py``.

- accuracy over the val split from one confusion matrix, optionally saving the predictions as Cityscapes
  label-id PNGs that the official evaluation accepts (:func:`evaluate_accuracy`), and the same with
  multi-scale and mirrored test-time augmentation (:func:`evaluate_tta`);
- cost: parameters, MACs and FLOPs (:func:`cost_fields`; the counts come from :mod:`fastseg.flops`,
  FLOPs are 2 × MACs) and accuracy per GFLOP (:func:`efficiency_scores`);
- speed: latency at batch 1, throughput at a larger batch and, on CUDA, peak memory, per dtype, on a copy
  of the model prepared for inference and converted to that dtype (:func:`prepare_for_speed`,
  :func:`benchmark_speed`). The ONNX export and its onnxruntime latency are :mod:`fastseg.deploy`'s.

The table, JSON and plots that compare checkpoints are :mod:`fastseg.report`'s.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fast_scnn import FastSCNN, fold_batchnorm
from fastseg.augment import prepare_batch
from fastseg.checkpoint import atomic_write
from fastseg.cityscapes import TRAIN_ID_TO_ID, colorize
from fastseg.engine import evaluate, main_logits, native_bf16, upsample_logits
from fastseg.metrics import ConfusionMatrix

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _atomic_save_image(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


def prediction_name(sample_name: str) -> str:
    """The file name the official Cityscapes evaluation matches against ``<city>_<seq>_<frame>``."""
    return f"{sample_name}_pred_labelIds.png"


def save_prediction(train_ids: np.ndarray, path: Path) -> None:
    """Write one prediction as a PNG of Cityscapes *label ids* (what the official tools expect)."""
    label_ids = TRAIN_ID_TO_ID[train_ids.astype(np.uint8)]
    _atomic_save_image(Image.fromarray(label_ids), path)


def save_overlay(image_path: Path, train_ids: np.ndarray, path: Path, alpha: float = 0.5) -> None:
    """Blend the colourised prediction over the original image, for a human to look at."""
    colours = Image.fromarray(colorize(train_ids.astype(np.uint8)))
    with Image.open(image_path) as image:
        base = image.convert("RGB")
    if base.size != colours.size:
        base = base.resize(colours.size, Image.Resampling.BILINEAR)
    _atomic_save_image(Image.blend(base, colours, alpha), path)


def _original_label_size(label_path: Path) -> tuple[int, int]:
    """(H, W) of a label file, from its header alone."""
    with Image.open(label_path) as image:
        width, height = image.size
    return height, width


def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int = 19,
    *,
    samples: Sequence[Any] | None = None,
    prediction_dir: Path | None = None,
    overlay_dir: Path | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU, Dice and pixel accuracy over ``loader``: the trainers' own validation pass.

    Logits are upsampled (bilinear) to the size of the labels the loader yields, so the score is at
    full label resolution when the dataset keeps labels full size. ``samples`` (the dataset's Sample
    list, indexed by the loader's third item) is needed to name saved predictions; these are always
    written at the size of the original label file.
    """
    if (prediction_dir or overlay_dir) and samples is None:
        raise ValueError("samples are needed to name saved predictions")

    def save(indices, logits, _images, _labels) -> None:
        for row, index in enumerate(indices.tolist()):
            sample = samples[index]
            # The official evaluation compares with the original label file, whatever size was scored here.
            full_size = _original_label_size(sample.label)
            train_ids = upsample_logits(logits[row : row + 1], full_size).argmax(1)[0]
            train_ids = train_ids.to(torch.uint8).cpu().numpy()
            if prediction_dir is not None:
                save_prediction(train_ids, Path(prediction_dir) / prediction_name(sample.name))
            if overlay_dir is not None:
                save_overlay(sample.image, train_ids, Path(overlay_dir) / f"{sample.name}_overlay.png")

    saving = prediction_dir is not None or overlay_dir is not None
    scores = evaluate(model, progress(loader) if progress else loader, device, num_classes,
                      on_batch=save if saving else None)
    return matrix_metrics(scores)


def matrix_metrics(scores: dict[str, Any]) -> dict[str, Any]:
    """The accuracy part of a report row from the scores of a validation pass (fractions; absent classes None).

    The matrix itself (rows = ground truth, columns = prediction, train ids) goes along, so any other
    score can be derived from the report later.
    """
    return {
        "miou": _finite_or_none(scores["miou"]),
        "dice": _finite_or_none(scores["dice"]),
        "pixel_accuracy": _finite_or_none(scores["pixel_accuracy"]),
        "per_class_iou": [_finite_or_none(v) for v in scores["per_class_iou"]],
        "per_class_dice": [_finite_or_none(v) for v in scores.get("per_class_dice", [])],
        "confusion_matrix": scores["matrix"].tolist(),
    }


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# Scales of the profile's size for test-time augmentation, each also mirrored: the set that DeepLab's
# multi-scale evaluation and mmsegmentation's Cityscapes configs use, so "mIoU with TTA" means the same here.
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def tta_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    size: Sequence[int],
    scales: Sequence[float] = TTA_SCALES,
    flip: bool = True,
) -> torch.Tensor:
    """Class probabilities at ``size`` (H, W): the softmax of each pass, averaged over the passes.

    One pass per scale of ``images`` (normalised N×3×h×w) and, with ``flip``, one more on its mirror image
    whose prediction is mirrored back. Each pass's logits are upsampled to ``size`` before the softmax, so
    the average is taken at the label's resolution. Scales are of the image as given (the profile's size).
    """
    height, width = images.shape[-2:]
    total, passes = None, 0
    for scale in scales:
        hw = (round(height * scale), round(width * scale))
        scaled = images
        if hw != (height, width):
            # Antialiased when shrinking, as the resize that made the profile's images from the originals.
            scaled = F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=scale < 1)
        for mirrored in (False, True) if flip else (False,):
            logits = main_logits(model(scaled.flip(-1) if mirrored else scaled)).float()
            if mirrored:
                logits = logits.flip(-1)
            probabilities = upsample_logits(logits, size).softmax(1)
            total = probabilities if total is None else total.add_(probabilities)
            passes += 1
    if total is None:
        raise ValueError("tta_probabilities needs at least one scale")
    return total / passes


@torch.inference_mode()
def evaluate_tta(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int = 19,
    *,
    scales: Sequence[float] = TTA_SCALES,
    flip: bool = True,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, Any]:
    """mIoU (and per-class IoU) of the multi-scale, mirrored prediction (:func:`tta_probabilities`) over
    ``loader``, from one confusion matrix at the labels' size: ``miou_tta``, ``per_class_iou_tta``."""
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    for batch in progress(loader) if progress else loader:
        images, labels = prepare_batch(batch[0], batch[1], device, train=False)
        cm.update(labels, tta_probabilities(model, images, labels.shape[-2:], scales, flip).argmax(1))
    scores = cm.compute()
    return {
        "miou_tta": _finite_or_none(scores["miou"]),
        "per_class_iou_tta": [_finite_or_none(v) for v in scores["per_class_iou"]],
    }


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------


def cost_fields(params: int, macs: int) -> dict[str, Any]:
    """Parameters, MACs and FLOPs (= 2 × MACs, the convention of the report) of one row."""
    return {"params": int(params), "macs": int(macs), "flops": 2 * int(macs)}


def efficiency_scores(row: dict[str, Any]) -> dict[str, float | None]:
    """Dice and mIoU (fractions) per GFLOP, with GFLOP = 2 × MACs / 1e9."""
    gflops = row["flops"] / 1e9 if row.get("flops") else None
    scores = {}
    for key in ("dice", "miou"):
        value = row.get(key)
        scores[f"{key}_per_gflop"] = value / gflops if value is not None and gflops else None
    return scores


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------


def prepare_for_speed(
    model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True
) -> tuple[nn.Module, bool]:
    """A copy of ``model`` set up as it would be deployed; returns (model, whether BN was folded).

    BatchNorm is folded into the preceding convolutions for Fast-SCNN (its own ``fold_batchnorm``);
    other architectures keep their BatchNorm layers, which the report states.
    """
    folded = fold_bn and isinstance(model, FastSCNN)
    if folded:
        model = fold_batchnorm(model)  # returns an eval-mode copy
    else:
        model = copy.deepcopy(model).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, folded


def _timed_runs(fn: Callable[[], Any], runs: int, warmup: int, device: torch.device) -> list[float]:
    """Wall times in ms of ``runs`` calls after ``warmup`` untimed ones, synchronising CUDA around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: the most memory PyTorch's allocator held (weights + activations) since the last reset.

    None on a CPU: the process's resident memory there mixes the model with everything else it holds
    (data, the Python heap, freed pages kept by the allocator), so it would not be the model's figure.
    """
    if device.type != "cuda":
        return None
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls while "fp32" is timed; the earlier settings after.

    PyTorch lets cuDNN use TF32 by default on Ampere and later (10-bit mantissa), so "fp32" timed under the
    defaults would be TF32's figure. Both flags are plain settings, harmless on a CPU.
    """
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def measure_speed(
    model: nn.Module,
    input_hw: tuple[int, int],
    device: torch.device,
    *,
    dtype: str = "fp32",
    runs: int = 50,
    warmup: int = 10,
    throughput_batch: int = 8,
    throughput_runs: int | None = None,
    channels_last: bool = True,
) -> dict[str, Any]:
    """Latency at batch 1 (median, p90, mean, min over ``runs``), throughput at ``throughput_batch`` and
    (on CUDA) the peak memory of batch-1 inference, for a model prepared by :func:`prepare_for_speed` and
    already in ``dtype`` (:func:`benchmark_speed` converts it): the input is made in that dtype, no autocast.
    fp32 is timed with TF32 off (:func:`exact_fp32`).
    """
    if runs < 1 or warmup < 0 or throughput_batch < 1:
        raise ValueError("runs and throughput_batch must be positive, warmup non-negative")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    height, width = input_hw
    generator = torch.Generator().manual_seed(0)

    def make_input(batch: int) -> torch.Tensor:
        # Random normalised images: a segmentation network's cost does not depend on pixel values.
        x = torch.randn(batch, 3, height, width, generator=generator)
        return x.to(device, DTYPES[dtype]).contiguous(memory_format=memory_format)

    single = make_input(1)

    def forward(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return model(x)

    def timed(x: torch.Tensor, n: int, n_warmup: int) -> tuple[list[float], float | None]:
        for _ in range(n_warmup):
            forward(x)
        # The peak is taken after warm-up, so that cuDNN's autotuning workspaces do not count.
        _reset_peak_memory(device)
        times = _timed_runs(lambda: forward(x), n, 0, device)
        return times, _peak_memory_mb(device)

    with exact_fp32() if dtype == "fp32" else contextlib.nullcontext():
        latencies, memory = timed(single, runs, warmup)
        throughput_runs = throughput_runs or max(5, runs // 5)
        batch_times, batch_memory = timed(make_input(throughput_batch), throughput_runs, min(warmup, 3))
    median_batch_s = _percentile(batch_times, 50) / 1e3
    return {
        "dtype": dtype,
        # How the dtype was run: weights and input in it (no autocast), and for fp32 without TF32.
        "weights_dtype": dtype,
        "tf32": False if dtype == "fp32" else None,
        "latency_ms": _percentile(latencies, 50),
        "latency_p90_ms": _percentile(latencies, 90),
        "latency_mean_ms": float(np.mean(latencies)),
        "latency_min_ms": float(np.min(latencies)),
        "runs": runs,
        "warmup": warmup,
        "fps": throughput_batch / median_batch_s,
        # What batch-1 latency alone implies; on a CPU a larger batch often does no better.
        "fps_batch1": 1e3 / _percentile(latencies, 50),
        "throughput_batch": throughput_batch,
        "throughput_runs": throughput_runs,
        "peak_memory_mb": memory,
        "peak_memory_mb_throughput": batch_memory,
    }


def speed_dtypes(device: torch.device, primary: str = "fp32") -> list[str]:
    """fp32 everywhere; on CUDA also fp16 and, where the GPU computes it natively (the rule of ``--amp auto``),
    bf16."""
    names = ["fp32"]
    if device.type == "cuda":
        names.append("fp16")
        if native_bf16(device):
            names.append("bf16")
    if primary not in names:
        names.append(primary)
    return names


def benchmark_speed(
    model: nn.Module,
    input_hw: tuple[int, int],
    device: torch.device,
    *,
    dtypes: Sequence[str] = ("fp32",),
    runs: int = 50,
    warmup: int = 10,
    throughput_batch: int = 8,
    fold_bn: bool = True,
    channels_last: bool = True,
    compile_model: bool = False,
) -> dict[str, Any]:
    """Prepare a deployable copy of ``model`` and time it in each dtype.

    fp16 and bf16 are timed on a copy converted to that dtype (BatchNorm folded first, in fp32), as a
    deployment runs it, not as autocast over fp32 weights, which casts every weight on every call.
    Returns ``{"bn_folded": bool, "channels_last": bool, "compiled": bool, "by_dtype": {dtype: speed}}``.
    """
    prepared, folded = prepare_for_speed(model, fold_bn=fold_bn, channels_last=channels_last)
    prepared = prepared.to(device)
    by_dtype = {}
    for dtype in dtypes:
        converted = prepared if dtype == "fp32" else copy.deepcopy(prepared).to(DTYPES[dtype])
        if compile_model:
            converted = torch.compile(converted)
        by_dtype[dtype] = measure_speed(
            converted,
            input_hw,
            device,
            dtype=dtype,
            runs=runs,
            warmup=max(warmup, 3 if compile_model else 0),
            throughput_batch=throughput_batch,
            channels_last=channels_last,
        )
        del converted
    del prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "bn_folded": folded,
        "channels_last": channels_last,
        "compiled": compile_model,
        "by_dtype": by_dtype,
    }
