"""The report that compares checkpoints: a Markdown table, a JSON file and plots.

- the report itself (:func:`markdown_table`, :func:`write_json`, :func:`plot_per_class_iou`,
  :func:`plot_tradeoffs`, :func:`plot_accuracy_vs_train_compute`, :func:`train_compute_runs`);
- a distilled student beside its undistilled twin and its teacher (:func:`distillation_comparison`,
  :func:`comparison_table`).

The rows are chosen by :mod:`fastseg.selection` and measured by :mod:`fastseg.measure`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastseg.checkpoint import atomic_path, atomic_write

# Keys every result carries in the JSON report (None where a part was skipped).
RESULT_KEYS = (
    "checkpoint",
    "profile",
    "input_size",
    "epoch",
    "miou",
    "miou_tta",
    "miou_last",
    "epoch_last",
    "cum_train_tflop",
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


def _epochs(row: dict[str, Any]) -> str:
    best, last = row.get("epoch"), row.get("epoch_last")
    return f"{'–' if best is None else best}/{'–' if last is None else last}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per checkpoint; accuracy in percent, cost in millions and GMACs.

    The test-time-augmented mIoU and the last epoch's mIoU (with the epochs of both checkpoints) get their
    columns, after the mIoU, when some row has them; so does the deployed path's latency (``ORT ms``), after
    PyTorch's.
    """
    extra: list[tuple[str, Any]] = []
    if any(row.get("miou_tta") is not None for row in results):
        extra.append(("mIoU TTA %", lambda row: _fmt(row.get("miou_tta"), ".2f", 100)))
    if any(row.get("miou_last") is not None for row in results):
        extra.append(("mIoU last %", lambda row: _fmt(row.get("miou_last"), ".2f", 100)))
        extra.append(("epoch best/last", _epochs))
    deployed = any(row.get("onnx_latency_ms") is not None for row in results)
    columns = [*MARKDOWN_COLUMNS[:4], *(name for name, _ in extra), *MARKDOWN_COLUMNS[4:]]
    if deployed:  # the deployed path's latency (onnxruntime, fastseg.deploy) beside PyTorch's
        columns.insert(columns.index("latency ms") + 1, "ORT ms")
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    for row in results:
        height, width = row["input_size"]
        cells = [
            row["checkpoint"],
            str(row["profile"]),
            f"{height}×{width}",
            _fmt(row.get("miou"), ".2f", 100),
            *(cell(row) for _, cell in extra),
            _fmt(row.get("dice"), ".2f", 100),
            _fmt(row.get("params"), ".3f", 1e-6),
            _fmt(row.get("macs"), ".3f", 1e-9),
            _fmt(row.get("latency_ms"), ".2f"),
            *([_fmt(row.get("onnx_latency_ms"), ".2f")] if deployed else []),
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


def write_json(
    path: str | os.PathLike, results: Sequence[dict[str, Any]], settings: dict[str, Any], **sections: Any
) -> Path:
    """``{"results": [...], "settings": {...}, **sections}`` written atomically (sections that are None are
    left out); NaN becomes null so any reader parses it."""
    payload = {"results": list(results), "settings": settings}
    payload.update({name: value for name, value in sections.items() if value is not None})
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


def _stacked(xy: Sequence[tuple[float, float]], near: float = 0.03) -> list[int]:
    """For each point, the line its label goes on: the lowest that no earlier point near it (within ``near``
    of the plotted ranges) took, so that stages with the same figures stay readable."""
    spans = [max(v) - min(v) or 1.0 for v in zip(*xy)] if xy else []
    levels: list[int] = []
    for i, (x, y) in enumerate(xy):
        taken = {levels[j] for j, (a, b) in enumerate(xy[:i])
                 if abs(x - a) <= near * spans[0] and abs(y - b) <= near * spans[1]}
        levels.append(min(set(range(len(taken) + 1)) - taken))
    return levels


def plot_tradeoffs(results: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Accuracy vs GFLOPs and accuracy vs latency, each point labelled with its stage, and accuracy vs the
    training compute (:func:`plot_accuracy_vs_train_compute`).

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
        xy = [(x, 100 * row["miou"]) for x, row, _ in points]
        for (x, y), (_, _, label), stacked in zip(xy, points, _stacked(xy)):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 + 11 * stacked), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy on val (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    compute = plot_accuracy_vs_train_compute(results, out_dir / "accuracy_vs_train_compute.png")
    return written + ([compute] if compute else [])


def train_compute_runs(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of :func:`plot_accuracy_vs_train_compute` by run (experiment id), each run's in order of
    training compute: the rows with an mIoU and a ``cum_train_tflop``, scored at the profile they were
    trained at (a checkpoint scored at other profiles has no training compute of its own there)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        if (
            row.get("miou") is not None
            and row.get("cum_train_tflop") is not None
            and row.get("trained_profile") in (None, row["profile"])
        ):
            runs.setdefault(str(row.get("experiment_id") or row["checkpoint"]), []).append(row)
    return {run: sorted(rows, key=lambda row: (row["cum_train_tflop"], row["profile"])) for run, rows in runs.items()}


# One marker per profile, so that the stages are told apart by shape and no text label can cover another;
# the star is drawn larger, as it fills less of its box.
_PROFILE_MARKERS = {1: ("o", 8), 2: ("s", 8), 3: ("^", 9), 4: ("D", 7), 5: ("*", 13)}


def plot_accuracy_vs_train_compute(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Val mIoU against the training compute of the curriculum up to each checkpoint (``cum_train_tflop``):
    one colour and one line per run, a point per stage whose marker names its profile; two legends (runs,
    profiles) instead of labels at the points, which would overlap where runs run close.

    Returns None when no row has both figures (see :func:`train_compute_runs`).
    """
    runs = train_compute_runs(results)
    if not runs:
        return None
    plt = _figure()
    from matplotlib.lines import Line2D

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 5))
    run_handles = []
    for i, (run, rows) in enumerate(runs.items()):
        colour = colours(i % 10)
        xs = [row["cum_train_tflop"] for row in rows]
        ys = [100 * row["miou"] for row in rows]
        (line,) = ax.plot(xs, ys, color=colour, linewidth=1.5, label=run)
        run_handles.append(line)
        for x, y, row in zip(xs, ys, rows):
            marker, size = _PROFILE_MARKERS.get(row["profile"], ("o", 8))
            ax.plot(x, y, marker=marker, markersize=size, color=colour, markeredgecolor="white", linestyle="none")
    xs = [row["cum_train_tflop"] for rows in runs.values() for row in rows]
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # later stages cost many times the first: keep p1 readable
        ax.set_xscale("log")
    ax.set_xlabel("training compute of the curriculum up to the checkpoint (TFLOP)")
    ax.set_ylabel("mIoU on val (%)")
    ax.grid(True, alpha=0.3)
    profiles = sorted({row["profile"] for rows in runs.values() for row in rows})
    profile_handles = [
        Line2D([], [], marker=marker, markersize=size, color="0.4", linestyle="none", label=f"profile {k}")
        for k in profiles
        for marker, size in [_PROFILE_MARKERS.get(k, ("o", 8))]
    ]
    ax.add_artist(ax.legend(handles=run_handles, title="run", fontsize=8, loc="upper left"))
    ax.legend(handles=profile_handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Student, twin and teacher
# --------------------------------------------------------------------------------------------------


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def distillation_comparison(
    students: Sequence[dict[str, Any]],
    twins: Sequence[dict[str, Any]],
    teachers: Sequence[dict[str, Any] | None],
) -> list[dict[str, Any]]:
    """Per profile: the student's mIoU, its undistilled twin's (the same recipe without a teacher), the
    difference (the distillation gain, also between their last epochs) and the teacher's mIoU at that profile.

    ``teachers[i]`` is the row of ``students[i]``'s teacher scored at the student's profile (None if it could
    not be scored); twins are matched to students by profile.
    """
    twin_at = {row["profile"]: row for row in twins}
    comparison = []
    for student, teacher in zip(students, teachers):
        twin = twin_at.get(student["profile"]) or {}
        comparison.append(
            {
                "profile": student["profile"],
                "student": student["checkpoint"],
                "twin": twin.get("checkpoint"),
                "teacher": teacher["checkpoint"] if teacher else None,
                "student_miou": student.get("miou"),
                "twin_miou": twin.get("miou"),
                "gain": _difference(student.get("miou"), twin.get("miou")),
                "student_miou_last": student.get("miou_last"),
                "twin_miou_last": twin.get("miou_last"),
                "gain_last": _difference(student.get("miou_last"), twin.get("miou_last")),
                "teacher_miou": teacher.get("miou") if teacher else None,
            }
        )
    return sorted(comparison, key=lambda row: row["profile"])


COMPARISON_COLUMNS = (
    "profile",
    "student mIoU %",
    "twin mIoU %",
    "gain (points)",
    "gain, last epochs (points)",
    "teacher mIoU %",
)


def comparison_table(comparison: Sequence[dict[str, Any]]) -> str:
    """The student, its twin and the gain per profile, with the teacher's mIoU at that profile."""
    lines = [
        "| " + " | ".join(COMPARISON_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COMPARISON_COLUMNS) - 1)) + "|",
    ]
    for row in comparison:
        cells = [
            str(row["profile"]),
            _fmt(row["student_miou"], ".2f", 100),
            _fmt(row["twin_miou"], ".2f", 100),
            _fmt(row["gain"], "+.2f", 100),
            _fmt(row["gain_last"], "+.2f", 100),
            _fmt(row["teacher_miou"], ".2f", 100),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
