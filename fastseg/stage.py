"""One curriculum stage from start to finish: set up, train epoch by epoch, validate, checkpoint, stop cleanly.

``train.py`` and ``train_distillation.py`` both call :func:`run_stage`; the only thing they pass that differs is
``build_objective`` (plain cross-entropy, or cross-entropy plus distillation from a frozen teacher).

Output of stage k of run X: ``<output-dir>/X/profile-k/`` with ``config.json``, ``metrics.jsonl`` (one line per
epoch), ``best.pth`` (best validation mIoU) and ``last.pth`` (everything needed to resume exactly).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastseg import distributed as dist_utils
from fastseg.checkpoint import (
    append_jsonl,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    load_weights,
    model_config,
)
from fastseg.cityscapes import NUM_CLASSES, PROFILES, Profile
from fastseg.data import SegmentationDataset, build_loader, set_epoch
from fastseg.engine import NonFiniteLoss, StepContext, StopRequested, evaluate, train_one_epoch
from fastseg.errors import UserError
from fastseg.models import build_model
from fastseg.tracking import Progress, Tracker, read_dotenv

# Exit status after a signal made the run save last.pth and stop; the Slurm job scripts requeue on it.
REQUEUE_EXIT_CODE = 75


def log(*args) -> None:
    print(*args, flush=True)


def stage_dir(output_dir: str | Path, experiment_id: str, profile: int) -> Path:
    return Path(output_dir) / experiment_id / f"profile-{profile}"


def stage_profile(cfg: dict) -> Profile:
    """The profile of this stage, with the ``--resize``/``--patch`` overrides applied and checked."""
    base = PROFILES[cfg["profile"]]
    resize = tuple(cfg["resize"]) if cfg.get("resize") else base.resize
    patch = tuple(cfg["patch"]) if cfg.get("patch") else base.patch
    if patch[0] > resize[0] or patch[1] > resize[1]:
        raise UserError(
            f"--patch: the crop {patch[0]}x{patch[1]} is larger than the resized image {resize[0]}x{resize[1]}; "
            "choose a smaller --patch or a larger --resize"
        )
    return Profile(index=base.index, resize=resize, patch=patch)


def resolve_previous(cfg: dict, flag: str = "--previous-model-path") -> Path | None:
    """``none``, a path, or ``auto``: best.pth of the previous profile of the same run."""
    value = str(cfg["previous_model_path"] or "none")
    if value.lower() == "none":
        return None
    if value.lower() == "auto":
        if cfg["profile"] == 1:
            log("note: profile 1 is the first stage; training from scratch (--previous-model-path auto)")
            return None
        path = stage_dir(cfg["output_dir"], cfg["experiment_id"], cfg["profile"] - 1) / "best.pth"
        if not path.is_file():
            raise UserError(
                f"{flag} auto: {path} does not exist; train profile {cfg['profile'] - 1} of experiment "
                f"'{cfg['experiment_id']}' first, or pass a path or none"
            )
        return path
    return Path(value)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norm weights, biases and depthwise kernels (decay would only shrink them)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            no_decay.add(id(module.weight))
        for name, p in module.named_parameters(recurse=False):
            if p.ndim <= 1 or name == "bias":
                no_decay.add(id(p))
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg["lr"])


def build_scheduler(cfg: dict, optimizer, steps_per_epoch: int):
    """Linear warm-up, then poly decay (power 0.9) to zero at the last step, or a constant rate."""
    total = max(1, cfg["epochs"] * steps_per_epoch)
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg["lr_schedule"] == "constant":
            return 1.0
        return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup)) ** 0.9

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or name == "off":
        if name in ("bf16", "fp16") and device.type != "cuda":
            log(f"note: --amp {name} needs a GPU; running in fp32 on {device}")
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "python": random.getstate()[1],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopFlag:
    """Set by SIGUSR1/SIGTERM (what Slurm sends before a time limit or preemption) or by Ctrl-C.

    The run then finishes its step, saves last.pth and stops. A second Ctrl-C quits at once
    (KeyboardInterrupt). Forked children (data loader workers) inherit the handler; in them the signal is
    ignored, so that they keep serving batches until the trainer has finished its step and shut them down.
    ``restore`` puts back the handlers found at ``install``.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._pid = os.getpid()
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        self._pid = os.getpid()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # asked twice: quit now, without saving
        self.signal_name = signal.Signals(signum).name
        again = "; Ctrl-C again to quit at once" if signum == signal.SIGINT else ""
        print(f"received {self.signal_name}: saving last.pth after this step{again}", file=sys.stderr, flush=True)


def run_stage(cfg: dict, build_objective: Callable[[dict, torch.device, nn.Module], Callable],
              description: str = "train") -> int:
    """Train one curriculum stage as configured by ``cfg``; returns the process exit status."""
    # Installed first: a time-limit signal may come while a large cache is still being built.
    stop = StopFlag()
    stop.install()
    try:
        read_dotenv()
        info = dist_utils.env_dist_info()
        device = dist_utils.resolve_device(cfg["device"], info.local_rank)
        info = dist_utils.init_distributed(device, info)
        return _run(cfg, build_objective, device, info, stop)
    finally:  # also when the device or the process group could not be set up
        dist_utils.cleanup()
        stop.restore()


def _run(cfg, build_objective, device, info, stop: StopFlag) -> int:
    main = info.is_main
    say = log if main else (lambda *a: None)
    prev_flag = cfg.pop("previous_flag", "--previous-model-path")  # the distillation trainer's name for it
    profile = stage_profile(cfg)
    cfg["resize"], cfg["patch"] = list(profile.resize), list(profile.patch)
    out = stage_dir(cfg["output_dir"], cfg["experiment_id"], cfg["profile"])
    if device.type == "cpu":
        say("note: no GPU in use; training on the CPU (fine for the demo and tests, slow for Cityscapes)")
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Resume state first: a finished stage is not trained again when its job runs once more.
    resume_ckpt = None
    resume = str(cfg.get("resume") or "none")
    if resume.lower() == "auto":
        if (out / "last.pth").is_file():
            resume_ckpt = load_checkpoint(out / "last.pth", "--resume auto")
    elif resume.lower() != "none":
        resume_ckpt = load_checkpoint(resume, "--resume")
    if resume_ckpt is not None and resume_ckpt.get("optimizer") is None:
        raise UserError(f"--resume: {resume} is not a last.pth of this project (it holds no optimiser state)")
    if resume_ckpt is not None and resume_ckpt["epoch"] >= cfg["epochs"] and not resume_ckpt.get("step"):
        say(f"stage already complete: {out / 'last.pth'} holds epoch {resume_ckpt['epoch']}/{cfg['epochs']}; "
            "nothing to do (remove it or raise --epochs to train further)")
        return 0

    seed_everything(cfg["seed"] + info.rank)
    aux = cfg["aux"] and cfg["arch"] == "fast_scnn"
    model = build_model(cfg["arch"], num_classes=NUM_CLASSES, aux=cfg["aux"], width_mult=cfg["width_mult"])
    previous = None if resume_ckpt is not None else resolve_previous(cfg, prev_flag)
    if previous is not None:
        prev = load_checkpoint(previous, prev_flag)
        prev_cfg = model_config(prev)
        if prev_cfg.get("arch", "fast_scnn") != cfg["arch"]:
            raise UserError(f"{prev_flag}: {previous} is a {prev_cfg.get('arch')} model but --arch is {cfg['arch']}")
        if prev_cfg.get("profile") and prev_cfg["profile"] > cfg["profile"]:
            say(f"warning: {previous} was trained at profile {prev_cfg['profile']}, above this stage's "
                f"{cfg['profile']}; a curriculum normally goes up")
        if aux and not prev_cfg.get("aux"):
            # An aux head is a training aid: start it fresh when the previous stage had none.
            prev["model"] = {**{k: v for k, v in model.state_dict().items() if k.startswith("auxlayer.")},
                             **prev["model"]}
        elif not aux and prev_cfg.get("aux"):
            prev["model"] = {k: v for k, v in prev["model"].items() if not k.startswith("auxlayer.")}
        load_weights(model, prev, prev_flag, where=previous)
        say(f"loaded weights from {previous}")
    cfg["previous_model_loaded"] = str(previous) if previous else None

    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    objective = build_objective(cfg, device, model)

    train_set = SegmentationDataset(cfg["data_dir"], "train", profile, train=True, cache_dir=cfg.get("cache_dir"),
                                    scale_aug=cfg["scale_aug"])
    val_set = SegmentationDataset(cfg["data_dir"], "val", profile, train=False, cache_dir=cfg.get("cache_dir"),
                                  label_resolution=cfg["label_resolution"])
    if len(train_set) < cfg["batch_size"] * info.world_size:
        raise UserError(f"--batch-size: {cfg['batch_size']} per process × {info.world_size} processes is more "
                        f"than the {len(train_set)} training images in {cfg['data_dir']}")
    train_loader = build_loader(train_set, cfg["batch_size"], cfg["num_workers"], shuffle=True, seed=cfg["seed"],
                                distributed=info.distributed, drop_last=True)
    val_loader = build_loader(val_set, cfg["batch_size"], cfg["num_workers"], shuffle=False, seed=cfg["seed"],
                              distributed=info.distributed, drop_last=False)

    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    amp_dtype = resolve_amp(cfg["amp"], device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    ddp_model = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(ddp_model) if cfg["compile"] else ddp_model

    start_epoch, start_step, best_miou, run_id, carry = 0, 0, -1.0, None, None
    if resume_ckpt is not None:
        load_weights(model, resume_ckpt, "--resume")
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if scaler is not None and resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch, start_step = resume_ckpt["epoch"], resume_ckpt.get("step", 0)
        best_miou = resume_ckpt.get("best_miou", -1.0)
        run_id = resume_ckpt.get("wandb_run_id")
        rng = resume_ckpt.get("rng") or []
        if info.rank < len(rng):
            set_rng_state(rng[info.rank])
        partial = resume_ckpt.get("partial") or []
        if start_step and info.rank < len(partial):
            carry = partial[info.rank]
        say(f"resumed from {out / 'last.pth' if resume.lower() == 'auto' else resume}: "
            f"epoch {start_epoch + 1}, step {start_step}")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        say(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        if resume_ckpt is None and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # a fresh start of this stage: the old log would mix two runs
        elif resume_ckpt is not None:
            reconcile_metrics(out / "metrics.jsonl", start_epoch, resume_ckpt.get("metrics") or {})

    tracker = Tracker(mode=cfg["wandb"], project=cfg["wandb_project"], name=f"{cfg['experiment_id']}-p{cfg['profile']}",
                      group=cfg["experiment_id"], config=cfg, dir=str(out), enabled=main, run_id=run_id)

    if stop():
        say(f"stopped by {stop.signal_name} before training started; exit {REQUEUE_EXIT_CODE}")
        tracker.finish()
        return REQUEUE_EXIT_CODE
    ctx = StepContext(model=train_model, objective=objective, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                      device=device, amp_dtype=amp_dtype, channels_last=channels_last, seed=cfg["seed"],
                      rank=info.rank, world_size=info.world_size)

    def checkpoint(epoch: int, step: int, metrics: dict) -> dict:
        return {"model": model.state_dict(), "config": cfg, "epoch": epoch, "step": step, "metrics": metrics,
                "best_miou": best_miou, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "wandb_run_id": tracker.run_id, "rng": gather_objects(info, rng_state())}

    for epoch in range(start_epoch, cfg["epochs"]):
        set_epoch(train_loader, epoch, start_step)  # a resumed epoch: its first start_step batches are done
        progress = Progress(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}", enabled=main,
                            log_every=cfg["log_every"], initial=start_step)
        try:
            train_metrics = train_one_epoch(ctx, train_loader, epoch, start_step, stop, progress, carry=carry)
        except StopRequested as req:
            progress.close()
            state = checkpoint(epoch, req.step, {})
            state["partial"] = gather_objects(info, req.partial)
            if req.step >= steps_per_epoch:  # the stop came on the epoch's last step: finish the epoch next time
                state["epoch"], state["step"] = epoch, req.step
            if main:
                atomic_save(state, out / "last.pth")
            say(f"stopped by {stop.signal_name} at epoch {epoch + 1} step {req.step}: saved {out / 'last.pth'}; "
                f"exit {REQUEUE_EXIT_CODE} (requeue and run again with --resume auto to continue)")
            tracker.finish()
            return REQUEUE_EXIT_CODE
        except NonFiniteLoss:
            progress.close()
            tracker.finish()
            raise
        progress.close()
        start_step, carry = 0, None

        val = evaluate(model, val_loader, device, NUM_CLASSES, amp_dtype,
                       channels_last, on_batch=tracker.val_batch_hook(epoch) if main else None)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_metrics["loss"],
            **{f"train_{k}_loss": v for k, v in train_metrics.items() if k not in ("loss", "images_per_s", "epoch_time_s")},
            "val_loss": val["loss"],
            "val_miou": val["miou"],
            "val_dice": val["dice"],
            "val_pixel_accuracy": val["pixel_accuracy"],
            "val_per_class_iou": val["per_class_iou"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": train_metrics["images_per_s"],
            "epoch_time_s": train_metrics["epoch_time_s"],
        }
        improved = val["miou"] > best_miou
        if improved:
            best_miou = val["miou"]
        state = checkpoint(epoch + 1, 0, record)
        if main:
            if improved:
                atomic_save({k: state[k] for k in ("model", "config", "epoch", "metrics")}, out / "best.pth")
            atomic_save(state, out / "last.pth")
            append_jsonl(out / "metrics.jsonl", record)
        say(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {record['train_loss']:.4f}  val loss {val['loss']:.4f}  "
            f"mIoU {val['miou']:.4f}  Dice {val['dice']:.4f}  pixel acc {val['pixel_accuracy']:.4f}  "
            f"{record['images_per_s']:.1f} img/s" + ("  (best)" if improved else ""))
        tracker.log({k: v for k, v in record.items() if k != "val_per_class_iou"}, step=epoch + 1)
        tracker.log_per_class(val["per_class_iou"], step=epoch + 1)
        if stop() and epoch + 1 < cfg["epochs"]:  # came during validation: the epoch is saved, stop here
            say(f"stopped by {stop.signal_name} after epoch {epoch + 1}; exit {REQUEUE_EXIT_CODE}")
            tracker.finish()
            return REQUEUE_EXIT_CODE

    tracker.summary({"best_val_miou": best_miou})
    tracker.finish()
    say(f"done: best val mIoU {best_miou:.4f}; checkpoints in {out}")
    return 0


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
        log(f"note: {path} did not match the checkpoint (a killed run); kept epochs {sorted(kept)}")
        atomic_write_text(path, "".join(json.dumps(kept[e], sort_keys=True) + "\n" for e in sorted(kept)))


def gather_objects(info: dist_utils.DistInfo, mine) -> list:
    """Every rank's copy of a per-rank state (RNG, partial sums): rank 0 saves them all, each restores its own."""
    if not info.distributed:
        return [mine]
    states = [None] * info.world_size
    torch.distributed.all_gather_object(states, mine)
    return states

