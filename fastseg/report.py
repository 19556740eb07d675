"""The report that compares checkpoints: their names, a Markdown table, a JSON file and plots.

- finding checkpoints (paths and globs) and naming them (:func:`expand_checkpoint_paths`,
  :func:`checkpoint_labels`, :func:`stage_label`);
- the report itself (:func:`markdown_table`, :func:`write_json`, :func:`plot_per_class_iou`,
  :func:`plot_tradeoffs`).

The figures in each row are measured by :mod:`fastseg.measure`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastseg.checkpoint import atomic_path, atomic_write
from fastseg.errors import UserError

# Keys every result carries in the JSON report (None where a part was skipped).
RESULT_KEYS = (
    "checkpoint",
    "profile",
    "input_size",
    "miou",
    "dice",
    "pixel_accuracy",
    "per_class_iou",
    "params",
    "macs",
    "flops",
    "latency_ms",
    "latency_p90_ms",
    "fps",
    "peak_memory_mb",
    "device",
    "dtype",
    "dice_per_gflop",
    "miou_per_gflop",
)

_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------------------------------
# Checkpoints and their names
# --------------------------------------------------------------------------------------------------


def expand_checkpoint_paths(patterns: Iterable[str], flag: str = "--current-model-path") -> list[Path]:
    """Expand paths and globs (``**`` allowed) into checkpoint files, in the order given, without repeats.

    Globs are expanded here as well as by the shell, because a quoted glob reaches the script as is.
    """
    paths: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if _GLOB_CHARS.intersection(pattern):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{flag}: no file matches {pattern!r}; check the directory and the pattern")
            paths.extend(matches)
        else:
            path = Path(pattern)
            if not path.is_file():
                raise UserError(f"{flag}: {path} does not exist; give the path of a .pth checkpoint")
            paths.append(path)
    if not paths:
        raise UserError(f"{flag}: no checkpoint given; pass one or more .pth paths or a glob")
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def checkpoint_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each path relative to the deepest folder that holds them all: distinct, as short as that allows.

    ``checkpoints/*/profile-*/best.pth`` reads ``<experiment>/profile-<k>/best.pth``; one checkpoint reads
    as its file name.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath([p.parent for p in absolute])
    return [p.relative_to(common).as_posix() for p in absolute]


def is_distilled(config: dict[str, Any]) -> bool:
    """A student trained by distillation carries its teacher in the config."""
    return bool(config.get("teacher") or config.get("trained_teacher_model_path"))


def stage_label(config: dict[str, Any], profile: int) -> str:
    """``teacher p1`` / ``student p2``: the role in the curriculum and the profile.

    Models trained without a teacher are the curriculum's teachers; distilled ones are its students.
    """
    role = "student" if is_distilled(config) else "teacher"
    return f"{role} p{profile}"


def slug(text: str) -> str:
    """A file-name-safe form of a label (``exp/profile-2/best.pth`` → ``exp_profile-2_best``)."""
    text = re.sub(r"\.pth?$", "", text)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "checkpoint"


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value * scale, spec)


MARKDOWN_COLUMNS = (
    "checkpoint",
    "profile",
    "input (H×W)",
    "mIoU %",
    "Dice %",
    "params (M)",
    "GMACs",
    "latency ms",
    "FPS",
    "Dice/GFLOP",
    "mIoU/GFLOP",
)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per checkpoint; accuracy in percent, cost in millions and GMACs."""
    lines = [
        "| " + " | ".join(MARKDOWN_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(MARKDOWN_COLUMNS) - 1)) + "|",
    ]
    for row in results:
        height, width = row["input_size"]
        cells = [
            row["checkpoint"],
            str(row["profile"]),
            f"{height}×{width}",
            _fmt(row.get("miou"), ".2f", 100),
            _fmt(row.get("dice"), ".2f", 100),
            _fmt(row.get("params"), ".3f", 1e-6),
            _fmt(row.get("macs"), ".3f", 1e-9),
            _fmt(row.get("latency_ms"), ".2f"),
            _fmt(row.get("fps"), ".1f"),
            _fmt(row.get("dice_per_gflop"), ".4f"),
            _fmt(row.get("miou_per_gflop"), ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    return value


def write_json(path: str | os.PathLike, results: Sequence[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """``{"results": [...], "settings": {...}}`` written atomically; NaN becomes null so any reader parses it."""
    payload = {"results": list(results), "settings": settings}
    text = json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n"
    path = Path(path)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_per_class_iou(row: dict[str, Any], path: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """Bar chart of the IoU of each class (absent classes drawn as empty slots, marked n/a)."""
    plt = _figure()
    ious = row["per_class_iou"]
    values = [0.0 if v is None else 100 * v for v in ious]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(range(len(values)), values, color="#3b75af")
    for bar, value in zip(bars, ious):
        if value is None:
            ax.text(bar.get_x() + bar.get_width() / 2, 1, "n/a", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(list(class_names)[: len(values)], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU %")
    ax.set_ylim(0, 100)
    miou = row.get("miou")
    title = f"{row['checkpoint']} (profile {row['profile']})"
    if miou is not None:
        title += f" — mIoU {100 * miou:.2f}%"
        ax.axhline(100 * miou, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def point_labels(results: Sequence[dict[str, Any]]) -> list[str]:
    """Stage labels for the trade-off plots, prefixed by the experiment when several are compared."""
    experiments = {row.get("experiment_id") for row in results}
    labels = []
    for row in results:
        label = row.get("stage") or f"p{row['profile']}"
        if len(experiments) > 1 and row.get("experiment_id"):
            label = f"{row['experiment_id']} {label}"
        labels.append(label)
    return labels


def plot_tradeoffs(results: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Accuracy vs GFLOPs and accuracy vs latency, each point labelled with its stage.

    Returns the files written (none when accuracy or the needed cost/speed figures are missing).
    """
    plt = _figure()
    out_dir = Path(out_dir)
    labels = point_labels(results)
    written = []
    axes_specs = (
        ("flops", 1e-9, "GFLOPs (2 × MACs) per image", "accuracy_vs_gflops.png"),
        ("latency_ms", 1.0, "latency at batch 1 (ms, median)", "accuracy_vs_latency.png"),
    )
    for key, scale, xlabel, name in axes_specs:
        points = [
            (row[key] * scale, row, label)
            for row, label in zip(results, labels)
            if row.get(key) is not None and row.get("miou") is not None
        ]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        for metric, marker, colour in (("miou", "o", "#3b75af"), ("dice", "^", "#dd8452")):
            kept = [(x, 100 * row[metric], row) for x, row, _ in points if row.get(metric) is not None]
            ax.plot(
                [x for x, _, _ in kept],
                [y for _, y, _ in kept],
                marker=marker,
                linestyle="none",
                color=colour,
                label="mIoU" if metric == "miou" else "Dice",
            )
            # A faint line joins the stages of one experiment, so a curriculum reads as a path.
            for experiment in {row.get("experiment_id") for _, _, row in kept}:
                path_points = sorted((x, y) for x, y, row in kept if row.get("experiment_id") == experiment)
                if len(path_points) > 1:
                    ax.plot(*zip(*path_points), color=colour, alpha=0.35, linewidth=1)
        for x, row, label in points:
            ax.annotate(label, (x, 100 * row["miou"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy on val (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
