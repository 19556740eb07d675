"""Command line of the trainers: every constant at the top of a script becomes a flag of the same name.

``train.py`` and ``train_distillation.py`` pass their constants as ``defaults``; the parsed values are the
run's configuration, written to ``config.json`` and stored in every checkpoint. The constants are the one
home of each setting: the shell wrappers pass on only the flags a user gives them.
"""

from __future__ import annotations

import argparse
from typing import Any

from fast_scnn import INITS
from fastseg.cityscapes import PROFILES, Profile
from fastseg.errors import UserError
from fastseg.models import ARCHS
from fastseg.optim import RECIPES


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 576x288, got '{text}'") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got '{text}'")
    return w, h


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _epochs_per_profile(text: str) -> tuple[int, ...]:
    try:
        epochs = tuple(int(v) for v in str(text).strip("()[] ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected five epoch counts such as 100,100,80,60,40, got '{text}'") from None
    if len(epochs) != len(PROFILES) or min(epochs) < 0:
        raise argparse.ArgumentTypeError(f"expected {len(PROFILES)} epoch counts >= 0 (profiles 1-5), got '{text}'")
    return epochs


def build_parser(description: str, defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """The flags every trainer shares, with defaults taken from the script's constants."""
    d = defaults
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("curriculum and data")
    g.add_argument("--profile", type=int, choices=sorted(PROFILES), default=d["profile"],
                   help="curriculum stage: resize and random-crop sizes (see README)")
    g.add_argument("--data-dir", default=d["data_dir"], help="Cityscapes root (leftImg8bit/ and gtFine/)")
    g.add_argument("--cache-dir", default=d.get("cache_dir"),
                   help="where pre-resized copies of the data are kept (default: beside the data, or ~/.cache)")
    g.add_argument("--resize", type=_size, default=None, help="override the profile's resize size, WxH")
    g.add_argument("--patch", type=_size, default=None, help="override the profile's random-crop size, WxH")
    g.add_argument("--scale-aug", action=argparse.BooleanOptionalAction, default=d["scale_aug"],
                   help="random scale 0.5-2.0 of the profile's size before cropping (the paper's augmentation)")
    g.add_argument("--label-resolution", choices=["full", "resized"], default=d["label_resolution"],
                   help="score validation at the label's full size (Cityscapes convention) or the resized one")
    g.add_argument("--num-workers", type=_non_negative_int, default=d["num_workers"])

    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=d["arch"])
    g.add_argument("--width-mult", type=_positive_float, default=d["width_mult"],
                   help="channel width of Fast-SCNN (1.0 is the standard, checkpoint-compatible layout)")
    g.add_argument("--pretrained-backbone", default=d["pretrained_backbone"],
                   help="torchvision --arch only: start the backbone from ImageNet weights, a torchvision weight "
                        "name (IMAGENET1K_V1, downloaded into $TORCH_HOME/hub/checkpoints) or the path of that file")
    g.add_argument("--init", choices=INITS, default=d["init"],
                   help="fresh Fast-SCNN weights: pytorch (each layer's default) or kaiming (He fan_out)")
    g.add_argument("--aux", action=argparse.BooleanOptionalAction, default=d["aux"],
                   help="auxiliary heads during training, weight 0.4 each (Fast-SCNN: on the 1/8 and 1/32 "
                        "features)")
    g.add_argument("--previous-model-path", default=d["previous_model_path"],
                   help="weights to start from: none, a .pth path, or auto (best.pth of the previous profile)")

    g = p.add_argument_group("optimisation (settings left unset take the recipe's value)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=d["recipe"],
                   help="paper: the published Fast-SCNN recipe; adamw: this project's earlier runs")
    g.add_argument("--curriculum-epochs", type=_epochs_per_profile, default=tuple(d["curriculum_epochs"]),
                   help="planned epochs of profiles 1-5, e.g. 100,100,80,60,40; one lr decay spans them all")
    g.add_argument("--epochs", type=_positive_int, default=d["epochs"],
                   help="this stage's epochs (default: its --curriculum-epochs entry)")
    g.add_argument("--lr-decay", choices=["curriculum", "stage"], default=d["lr_decay"],
                   help="curriculum: one decay over all stages; stage: a whole decay within this stage "
                        "(default: the recipe's)")
    g.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="per process")
    g.add_argument("--lr", type=_positive_float, default=d["lr"])
    g.add_argument("--min-lr", type=float, default=d["min_lr"], help="where the poly decay ends")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=d["optimizer"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--momentum", type=float, default=d["momentum"], help="SGD only")
    g.add_argument("--lr-schedule", choices=["poly", "constant"], default=d["lr_schedule"])
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"])
    g.add_argument("--seed", type=int, default=d["seed"])

    g = p.add_argument_group("run")
    g.add_argument("--experiment-id", default=d["experiment_id"],
                   help="names the curriculum run: <output-dir>/<experiment-id>/profile-<k>/")
    g.add_argument("--output-dir", default=d["output_dir"])
    g.add_argument("--resume", default=d["resume"],
                   help="auto (continue from this stage's last.pth if there is one), none, or a path")
    g.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=d["amp"],
                   help="mixed precision on CUDA (auto: bf16 on compute capability 8.0 and up, else fp16 with "
                        "a GradScaler)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=d["sync_bn"],
                   help="SyncBatchNorm under DDP on GPUs: BatchNorm statistics over every GPU's batch "
                        "(for per-GPU batches below 8)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d["compile"])
    g.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default=d["wandb"],
                   help="auto: online when WANDB_API_KEY is set, else offline (never a login prompt)")
    g.add_argument("--wandb-project", default=d["wandb_project"])
    g.add_argument("--log-every", type=_positive_int, default=d["log_every"],
                   help="steps between progress lines when the output is a log file")
    g.add_argument("--check-every", type=_positive_int, default=d["check_every"],
                   help="steps between the checks every rank agrees on (stop signal, NaN)")
    return p


def report_overrides(args: argparse.Namespace, defaults: dict[str, Any], script: str, file=None) -> dict[str, Any]:
    """Print (and return) each setting whose value differs from the script's constant, and where it came from.

    Only the command line can change a setting (the wrappers add nothing of their own), so a run whose log
    shows no such line ran exactly the constants in the file. ``file`` is where to print (default stdout; a
    script whose stdout is its result, such as a table, prints them to stderr).
    """
    changed = {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]
               and not (isinstance(v, tuple) and v == tuple(defaults[k]))}
    for key, value in sorted(changed.items()):
        print(f"setting: {key} = {value!r} (from the command line; the constant {key.upper()} is "
              f"{defaults[key]!r})", file=file, flush=True)
    if not changed:
        print(f"setting: every value as the constants in {script}", file=file, flush=True)
    return changed


def stage_profile(profile: int, resize: tuple[int, int] | None, patch: tuple[int, int] | None) -> Profile:
    """The curriculum profile with the ``--resize``/``--patch`` overrides applied and checked."""
    base = PROFILES[profile]
    resize, patch = tuple(resize or base.resize), tuple(patch or base.patch)
    if patch[0] > resize[0] or patch[1] > resize[1]:
        raise UserError(
            f"--patch: the crop {patch[0]}x{patch[1]} is larger than the resized image {resize[0]}x{resize[1]}; "
            "choose a smaller --patch or a larger --resize"
        )
    return Profile(index=base.index, resize=resize, patch=patch)
