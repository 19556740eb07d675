"""Checkpoints: one format, atomic writes, and loading of this project's and users' older files.

A checkpoint written by the trainers is a dict::

    {"model": state_dict, "config": {...}, "epoch": int, "metrics": {...},
     # last.pth only, for an exact resume:
     "optimizer": ..., "scheduler": ..., "scaler": ..., "best_miou": float, "wandb_run_id": str}

``config`` holds every hyperparameter plus ``arch``, ``num_classes``, ``width_mult``, ``aux`` and ``profile``,
so a checkpoint alone is enough to rebuild its model; and what the stage resolved: ``global_batch``,
``decay_epochs`` (the lr decay's span, which a resume keeps), ``previous_model_loaded`` and
``resumed_changes`` (see :func:`carry_on_resume`). A resume rebuilds the schedule from the epoch and the
config; ``scheduler`` is kept for the record. Users' older files are a plain ``state_dict`` of a
Fast-SCNN of any width (possibly with ``module.`` or ``_orig_mod.`` prefixes); they load too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fast_scnn import scaled_channels
from fastseg.errors import UserError

# Prefixes added by DistributedDataParallel and torch.compile; stripped so every file loads into a bare model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``path`` to write; renamed over ``path`` when the block ends without error.

    The file gets the permissions of a normally created one (0666 less the umask, so a group can read a
    shared run's checkpoints), not the 0600 of a temp file. A kill at any moment leaves either the previous
    file or the new one, never half of one; only a hidden temp file may remain.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, synced, then renamed over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file behind (temp file + rename)."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line; the file is rewritten atomically so a kill never leaves half a line."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(record, sort_keys=True) + "\n")


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | Path, flag: str = "checkpoint") -> dict:
    """Read a checkpoint file and return it in the project's format (``config`` is None for a plain state_dict).

    ``flag`` names the command-line flag the path came from, so the error tells the user what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, foreign or pickled-object file: all the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{flag}: {path}: not a readable PyTorch checkpoint ({first[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        ckpt = dict(obj)
        ckpt["model"] = strip_prefixes(ckpt["model"])
        ckpt.setdefault("config", None)
        return ckpt
    for key in ("state_dict", "model_state_dict"):  # other common layouts
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            return {"model": strip_prefixes(obj[key]), "config": None}
    if _is_state_dict(obj):
        return {"model": strip_prefixes(obj), "config": None}
    raise UserError(f"{flag}: {path}: holds no model weights (expected a state_dict or a dict with 'model')")


# Fast-SCNN's five channel widths at width_mult 1.0, and a layer of a plain state_dict whose output has each.
_FAST_SCNN_WIDTHS = (
    (32, "learning_to_downsample.conv.conv.0.weight"),
    (48, "learning_to_downsample.dsconv1.conv.3.weight"),
    (64, "learning_to_downsample.dsconv2.conv.3.weight"),
    (96, "global_feature_extractor.bottleneck2.0.block.2.weight"),
    (128, "global_feature_extractor.bottleneck3.0.block.2.weight"),
)


def _smallest_width_mult(base: int, channels: int) -> float:
    """The smallest ``width_mult`` at which ``scaled_channels(base, width_mult)`` reaches ``channels``."""
    low, high = 0.0, (channels + 16) / base  # scaled_channels is non-decreasing; at ``high`` it is above
    for _ in range(100):  # bisection down to float resolution
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if scaled_channels(base, middle) >= channels:
            high = middle
        else:
            low = middle
    return high


def infer_width_mult(channels: dict[int, int]) -> float | None:
    """A ``width_mult`` that gives Fast-SCNN these channel widths (``{width at 1.0: width}``), or None.

    Widths are rounded to multiples of 8, so ``channels / 32`` is not the multiplier (e.g. 0.3 gives 16
    channels at the first layer, which is 0.5's count, but not 0.5's widths elsewhere). Each layer's width
    holds for a range of multipliers; the one returned lies in all five: the widest layer's ratio (the least
    rounded, so the multiplier itself for most) when it fits, else the one with the fewest decimals.
    """

    def fits(width_mult: float) -> bool:
        return all(scaled_channels(base, width_mult) == c for base, c in channels.items())

    widest = max(channels)
    # The smallest multiplier at which every layer is wide enough: it fits whenever any multiplier does.
    low = max(_smallest_width_mult(base, c) for base, c in channels.items())
    candidates = [channels[widest] / widest, *(max(math.ceil(low * 10**d), 1) / 10**d for d in range(7)), low]
    return next((w for w in candidates if fits(w)), None)


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Architecture settings of a plain Fast-SCNN state_dict (users' older checkpoints store none)."""
    first = state_dict.get("learning_to_downsample.conv.conv.0.weight")
    head = state_dict.get("classifier.conv.1.weight")
    layers = [state_dict.get(key) for _, key in _FAST_SCNN_WIDTHS]
    if first is None or head is None or any(layer is None for layer in layers):
        raise UserError(
            "checkpoint: a plain state_dict that is not Fast-SCNN; save it with this project's trainers "
            "(they store the architecture in the checkpoint)"
        )
    channels = {base: int(layer.shape[0]) for (base, _), layer in zip(_FAST_SCNN_WIDTHS, layers)}
    width_mult = infer_width_mult(channels)
    if width_mult is None:
        shown = ", ".join(str(c) for c in channels.values())
        raise UserError(f"checkpoint: a plain state_dict whose channel widths ({shown}) match no Fast-SCNN "
                        "--width-mult; save it with this project's trainers (they store the width)")
    return {
        "arch": "fast_scnn",
        "num_classes": int(head.shape[0]),
        "in_channels": int(first.shape[1]),
        "width_mult": width_mult,
        "aux": any(k.startswith(AUX_PREFIXES) for k in state_dict),
    }


def _describe_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state_dict)
        if own[k].shape != state_dict[k].shape
    )
    parts = []
    for title, keys in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
            parts.append(f"{title}: {shown}")
    return "; ".join(parts) or None


def load_weights(
    model: nn.Module, source: str | Path | dict, flag: str = "checkpoint", where: str | Path | None = None
) -> dict:
    """Load weights strictly into ``model`` from a path or a loaded checkpoint; returns the checkpoint dict.

    A mismatch (another class count, architecture or width) raises a UserError that lists the keys.
    """
    ckpt = load_checkpoint(source, flag) if not isinstance(source, dict) else source
    where = where or (source if not isinstance(source, dict) else "checkpoint")
    problem = _describe_mismatch(model, ckpt["model"])
    if problem:
        raise UserError(f"{flag}: {where} does not fit the model ({problem})")
    model.load_state_dict(ckpt["model"], strict=True)
    return ckpt


def model_config(ckpt: dict) -> dict:
    """The architecture settings of a loaded checkpoint, stored or inferred."""
    stored = ckpt.get("config") or {}
    cfg = infer_config(ckpt["model"]) if not stored.get("arch") else {}
    cfg.update({k: v for k, v in stored.items()})
    if "aux" not in stored and cfg.get("arch") == "fast_scnn":
        cfg["aux"] = any(k.startswith(AUX_PREFIXES) for k in ckpt["model"])
    return cfg


# Auxiliary heads are training aids: a checkpoint loads into a model with or without them. Fast-SCNN's are
# ``auxlayer`` (1/8 features; the only one in older runs and the public layout) and ``auxlayer_gfe`` (1/32),
# torchvision's ``aux_classifier``.
AUX_PREFIXES = ("auxlayer.", "auxlayer_gfe.", "aux_classifier.")


def fit_aux_heads(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` made to fit ``model``'s auxiliary heads: the model's own (fresh) weights for heads the
    checkpoint lacks, and the checkpoint's heads that the model does not have dropped."""
    own = model.state_dict()
    fitted = {k: v for k, v in state_dict.items() if k in own or not k.startswith(AUX_PREFIXES)}
    fitted.update({k: v for k, v in own.items() if k.startswith(AUX_PREFIXES) and k not in state_dict})
    return fitted


def stage_dir(output_dir: str | Path, experiment_id: str, profile: int) -> Path:
    """Where stage ``profile`` of run ``experiment_id`` keeps its files."""
    return Path(output_dir) / experiment_id / f"profile-{profile}"


def make_stage_dir(path: Path, output_dir, flag: str = "--output-dir") -> Path:
    """Create a stage's directory; a path that cannot be created is the user's to fix, named by its flag."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under /proc, a read-only mount, no permission, a file in the way
        raise UserError(f"{flag} {output_dir}: cannot create {path} ({exc.strerror or exc}); choose a directory "
                        "you can write to") from None
    return path


def resolve_previous(value: str | None, output_dir, experiment_id: str, profile: int,
                     flag: str = "--previous-model-path") -> Path | None:
    """``none``, a path, or ``auto``: best.pth of the previous profile of the same run (none at profile 1)."""
    value = str(value or "none")
    if value.lower() == "none" or (value.lower() == "auto" and profile == 1):
        return None
    if value.lower() == "auto":
        path = stage_dir(output_dir, experiment_id, profile - 1) / "best.pth"
        if not path.is_file():
            raise UserError(f"{flag} auto: {path} does not exist; train profile {profile - 1} of experiment "
                            f"'{experiment_id}' first, or pass a path or none")
        return path
    return Path(value)


def load_previous_stage(model: nn.Module, path: Path, arch: str, profile: int, flag: str) -> dict:
    """Load the weights a stage starts from; returns that checkpoint's config (stored or inferred)."""
    ckpt = load_checkpoint(path, flag)
    cfg = model_config(ckpt)
    if cfg.get("arch", "fast_scnn") != arch:
        raise UserError(f"{flag}: {path} is a {cfg.get('arch')} model but --arch is {arch}")
    if cfg.get("profile") and cfg["profile"] > profile:
        print(f"warning: {path} was trained at profile {cfg['profile']}, above this stage's {profile}; "
              "a curriculum normally goes up", flush=True)
    load_weights(model, {**ckpt, "model": fit_aux_heads(model, ckpt["model"])}, flag, where=path)
    return cfg


def curriculum_totals(previous: Path) -> dict:
    """Training compute and device time of the curriculum up to the end of the stage ``previous`` comes from.

    Read from the last.pth beside it (the stage's final epoch), else from the file itself; a file without
    them (a users' plain state_dict) starts the count at 0.
    """
    for path in (previous.parent / "last.pth", previous):
        if path.is_file():
            metrics = load_checkpoint(path, "--previous-model-path").get("metrics") or {}
            if "cum_train_tflop" in metrics:
                return {k: metrics[k] for k in ("cum_train_tflop", "cum_device_hours")}
    return {"cum_train_tflop": 0.0, "cum_device_hours": 0.0}


# Settings that decide the rate and the steps of an epoch: a resume that changes them is recorded in the config.
RESUME_RECORDED = ("batch_size", "world_size", "global_batch", "lr")


def carry_on_resume(saved: dict | None, config: dict, epoch: int) -> tuple[dict, list[str]]:
    """A resumed run's ``config`` with what earlier runs of the stage recorded, and the notes to print.

    The stage's origin stays: ``previous_model_loaded`` (a resume loads last.pth, not those weights), ``init``
    and, for a student whose teacher path changed, ``teacher_at_start``. ``resumed_changes`` lists, for each resume
    that changed a setting of ``RESUME_RECORDED``, the epoch it resumed at and ``[before, after]`` of each.
    """
    saved = dict(saved or {})
    if "global_batch" not in saved and {"batch_size", "world_size"} <= saved.keys():  # files from before it
        saved["global_batch"] = saved["batch_size"] * saved["world_size"]
    config = {**config, "previous_model_loaded": saved.get("previous_model_loaded"),
              "resumed_changes": list(saved.get("resumed_changes") or [])}
    if saved.get("init"):  # how the stage's fresh weights started: --init changes nothing on a resume
        config["init"] = saved["init"]
    notes = []
    old, new = saved.get("teacher") or {}, config.get("teacher") or {}
    if old.get("path") and new.get("path") and old["path"] != new["path"]:
        config["teacher_at_start"] = saved.get("teacher_at_start") or old
        notes.append(f"note: this stage started with the teacher {old['path']}; it goes on with {new['path']}")
    elif saved.get("teacher_at_start"):
        config["teacher_at_start"] = saved["teacher_at_start"]
    changed = {k: [saved[k], config[k]] for k in RESUME_RECORDED if k in saved and saved[k] != config[k]}
    if changed:
        config["resumed_changes"].append({"epoch": epoch, **changed})
    if "global_batch" in changed:
        (old_batch, new_batch), (old_lr, new_lr) = changed["global_batch"], (saved["lr"], config["lr"])
        notes.append(f"note: up to epoch {epoch} the stage ran with a global batch of {old_batch} ({saved['batch_size']} "
                     f"x {saved['world_size']} processes), this run has {new_batch} ({config['batch_size']} x "
                     f"{config['world_size']}): the lr decay goes on from epoch {epoch} at base rate {new_lr:g} "
                     f"(was {old_lr:g}); config.json lists the change under resumed_changes")
    elif "lr" in changed:
        notes.append(f"note: the base rate is {config['lr']:g} from epoch {epoch + 1} on (was {saved['lr']:g}); "
                     "the lr decay goes on from where it is")
    return config, notes


def reconcile_metrics(path: Path, epochs_done: int, last_record: dict) -> None:
    """Make ``metrics.jsonl`` hold exactly one line per epoch of the checkpoint a run resumes from.

    A job killed outright (SIGKILL, node failure) may stop between writing last.pth and appending the
    epoch's line, or after appending a line for an epoch whose last.pth it never wrote; the resumed run
    would then leave a gap or a duplicate. last.pth holds its epoch's record, so the log is rebuilt from it.
    """
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line broken by a hand edit is dropped
                records.append(json.loads(line))
    kept = {r["epoch"]: r for r in records if isinstance(r, dict) and 0 < r.get("epoch", 0) <= epochs_done}
    if last_record.get("epoch") == epochs_done:
        kept[epochs_done] = last_record  # the checkpoint is the truth for its own epoch
    if records != [kept[e] for e in sorted(kept)]:
        print(f"note: {path} did not match the checkpoint (a killed run); kept epochs {sorted(kept)}", flush=True)
        atomic_write_text(path, "".join(json.dumps(kept[e], sort_keys=True) + "\n" for e in sorted(kept)))
