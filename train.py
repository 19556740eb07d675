"""Train Fast-SCNN on one stage of the resolution curriculum (a teacher, or a model on its own).

Edit the constants below, or override any of them with the flag of the same name (``PROFILE`` is
``--profile``). The wrappers (main.sh, jobscript_slurm.sh) hold no settings of their own: what you set here is
what runs, unless a flag says otherwise, and the run prints every setting that differs from these constants.
One run trains one stage; the next stage starts from this one's best weights::

    python train.py --profile 1 --experiment-id run1                                  # stage 1 from scratch
    python train.py --profile 2 --experiment-id run1 --previous-model-path auto       # stage 2 from stage 1
    torchrun --nproc-per-node 4 train.py --profile 3 --experiment-id run1
    sbatch jobscript_slurm.sh                                                         # on the cluster
    sbatch jobscript_slurm.sh --profile 3                                             # flags reach this script
    python train.py --data-dir data/synthetic --epochs 2 --batch-size 4 --device cpu  # a laptop smoke run

Stage k writes ``<output-dir>/<experiment-id>/profile-<k>/``: config.json, metrics.jsonl, best.pth, last.pth.
A stop signal (Slurm's time-limit warning, preemption, Ctrl-C) ends the run within a few steps with exit
status 75; the job scripts requeue it and ``--resume auto`` (the default) continues from last.pth, written
at the end of every epoch.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from torch import nn

from fastseg import distributed
from fastseg.augment import prepare_batch
from fastseg.checkpoint import (
    append_jsonl,
    atomic_save,
    atomic_write_text,
    carry_on_resume,
    curriculum_totals,
    load_checkpoint,
    load_previous_stage,
    load_weights,
    make_stage_dir,
    reconcile_metrics,
    resolve_previous,
    stage_dir,
)
from fastseg.cityscapes import NUM_CLASSES
from fastseg.config import build_parser, report_overrides, stage_profile
from fastseg.data import SegmentationDataset, build_loader
from fastseg.engine import NonFiniteLoss, autocast_context, evaluate, resolve_amp
from fastseg.errors import UserError, run_cli
from fastseg.flops import count_train_step_flops
from fastseg.losses import SegmentationLoss
from fastseg.models import build_model, has_aux
from fastseg.optim import (
    apply_recipe,
    build_optimizer,
    build_scheduler,
    decay_span,
    planned_decay,
    restore_optimizer,
)
from fastseg.stopping import REQUEUE_EXIT_CODE, StopFlag, agree
from fastseg.tracking import Progress, Tracker, read_dotenv

# ---- what users edit ---------------------------------------------------------------------------------------
PROFILE = 1  # curriculum stage 1..5: 576x288 -> 448x224 crops ... 2048x1024 -> 1536x768 crops (README table)
DATA_DIR = "data/cityscapes"  # Cityscapes root with leftImg8bit/ and gtFine/ (data/synthetic for the demo)
EXPERIMENT_ID = "fast_scnn"  # names the curriculum run; every stage of one run shares it
PREVIOUS_MODEL_PATH = "auto"  # auto = best.pth of the previous profile of this run (none at profile 1)
RECIPE = "paper"  # paper: published Cityscapes recipe; adamw: earlier runs, faster on short budgets (docs/recipe.md)
CURRICULUM_EPOCHS = (100, 100, 100, 100, 100)  # planned epochs of profiles 1..5: one lr decay spans them all
EPOCHS = None  # this stage's epochs; None = CURRICULUM_EPOCHS of this profile
NUM_WORKERS = 8  # data loader processes per GPU; the cached loader needs few
SEED = 0
# ---- None = the recipe's value (paper | adamw) ---------------------------------------------------------------
BATCH_SIZE = None  # per GPU: 16 (both recipes); Fast-SCNN at profile 5 (1536x768 crops) fits 16 in 40 GB with bf16
OPTIMIZER = None  # sgd | adamw
LR = None  # 0.00375 x global batch (per-GPU batch x GPUs, as the paper's 0.045 at 12) | 1e-3
LR_SCHEDULE = None  # poly: (1 - t/T)^0.9 down to MIN_LR over the decay | constant
MIN_LR = None  # 1e-4 (mmsegmentation) | 0
LR_DECAY = None  # curriculum: stage k starts at the rate where stage k-1 ended | stage: a whole decay per stage
WEIGHT_DECAY = None  # 4e-5 | 1e-4; never on norm weights, biases and depthwise kernels
AUX = None  # two auxiliary heads (1/8 and 1/32 features, loss weight 0.4 each) during training | none
SCALE_AUG = None  # random scale 0.5-2.0 of the profile's size before the crop | off
INIT = None  # pytorch: each layer's default (both recipes); kaiming (He, as mmseg) trained slower (docs/recipe.md)
# ---- rarely changed ----------------------------------------------------------------------------------------
MOMENTUM = 0.9  # sgd only
WARMUP_EPOCHS = 0.0  # linear warm-up at the start of the stage (after a change of resolution)
ARCH = "fast_scnn"  # or a torchvision model (deeplabv3_resnet50, ...) to train a larger teacher
WIDTH_MULT = 1.0  # Fast-SCNN channel width; 2.0 makes a wider teacher
PRETRAINED_BACKBONE = None  # torchvision ARCH only: ImageNet backbone, a weight name (IMAGENET1K_V1) or a file path
LABEL_RESOLUTION = "full"  # validate at the labels' full size (Cityscapes convention) or "resized"
OUTPUT_DIR = "checkpoints"
RESUME = "auto"  # continue from this stage's last.pth when it exists (a requeued Slurm job)
DEVICE = "auto"
AMP = "auto"  # bf16 on GPUs of compute capability 8.0+ (A100, H100), else fp16 with a GradScaler; off on the CPU
# Off: at the recipes' 16 images per GPU every BatchNorm sees >= 16 values per channel, even the pyramid's 1x1 bin
# (one per image), as in the published setups (paper: batch 12; mmsegmentation: 4 per GPU synced over 8 = 32),
# and SyncBatchNorm adds a blocking all-reduce per BatchNorm layer per step. On when the per-GPU batch is below 8.
SYNC_BN = False
COMPILE = False
WANDB = "auto"  # online with WANDB_API_KEY (environment or .env), else offline; never a login prompt
WANDB_PROJECT = "fast-scnn-cityscapes"
LOG_EVERY = 50  # steps between progress lines in log files (an interactive terminal gets a bar)
CACHE_DIR = None  # pre-resized copies of the data; default beside the data or in ~/.cache/fastseg
CHECK_EVERY = 10  # steps between the checks all ranks agree on (stop signal, NaN); a stop waits at most this


def constants(namespace: dict | None = None) -> dict:
    """A script's upper-case constants by flag name (``PROFILE`` -> ``profile``)."""
    return {name.lower(): value for name, value in (namespace or globals()).items() if name.isupper()}


def parse_args(argv=None, defaults: dict | None = None, script: str = "train.py", extend=None, doc: str = __doc__):
    """The constants as flag defaults, then the command line; prints the settings the flags changed."""
    defaults = defaults or constants()
    parser = build_parser(doc, defaults)
    if extend is not None:
        extend(parser, defaults)
    args = parser.parse_args(argv)
    report_overrides(args, defaults, script)
    return args


def build_objective(args, device: torch.device, model: nn.Module):
    """Cross-entropy ignoring unlabelled pixels, plus 0.4 x each auxiliary head's when they are on.

    Returns ``(objective, extra config)``; ``objective(model, images, labels) -> (loss, parts)``, where
    ``parts`` maps names (``ce``, ``aux``, ...) to detached scalars that the epoch averages and logs.
    """
    criterion = SegmentationLoss(aux_weight=0.4)

    def objective(model, images, labels):
        return criterion(model(images), labels)

    return objective, {}


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    # Seeded per epoch (and rank), so a run resumed at an epoch boundary draws what an uninterrupted one would.
    s = (seed * 1_000_003 + epoch) * 1_009 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def train_one_epoch(model, objective, optimizer, scheduler, loader, device, epoch: int, args, stop: StopFlag,
                    progress: Progress, scaler=None, amp_dtype=None, world_size: int = 1) -> dict | None:
    """One pass over ``loader``; returns the epoch's mean losses and throughput, or None if a stop was agreed.

    Every ``args.check_every`` steps (and at the last) all ranks agree in one collective whether any got a
    stop signal or a non-finite loss; between checks nothing waits for the GPU.
    """
    model.train()
    channels_last = device.type == "cuda"
    # Colour jitter is drawn on the device, from a generator seeded by the (per-epoch, per-rank) global RNG.
    jitter = torch.Generator(device=device)
    jitter.manual_seed(int(torch.randint(2**62, ())))
    sums: dict[str, torch.Tensor] = {}
    steps, images_seen, t0 = 0, 0, time.perf_counter()
    for step, (images, labels, _) in enumerate(loader):
        images, labels = prepare_batch(images, labels, device, train=True, channels_last=channels_last,
                                       generator=jitter)
        with autocast_context(device, amp_dtype):
            loss, parts = objective(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()

        for name, value in {"loss": loss, **parts}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        steps += 1
        images_seen += images.shape[0]
        progress.update(loss=loss.detach(), lr=optimizer.param_groups[0]["lr"],
                        images_per_s=images_seen * world_size / max(time.perf_counter() - t0, 1e-9))
        if steps % args.check_every == 0 or steps == len(loader):
            stopping, diverged = agree(stop(), ~torch.isfinite(sums["loss"]), device=device)
            if diverged:
                raise NonFiniteLoss(f"training loss became {float(sums['loss'])} by epoch {epoch + 1} step "
                                    f"{step + 1}; lower --lr or use --amp bf16/off; the last good checkpoint is kept")
            if stopping and steps < len(loader):  # at the last step the epoch is whole: validate and save it
                return None
    elapsed = time.perf_counter() - t0
    record = {"train_loss" if name == "loss" else f"train_{name}_loss":
              distributed.all_reduce_mean(float(total) / steps, device) for name, total in sums.items()}
    return {**record, "images_per_s": images_seen * world_size / elapsed, "epoch_s": elapsed}


def main(argv=None, *, script_args=None, make_objective=build_objective, previous_flag="--previous-model-path") -> int:
    """Train the stage that the constants and ``argv`` describe; returns the exit status (0, or 75 stopped)."""
    args = script_args if script_args is not None else parse_args(argv)
    stop = StopFlag().install()  # first: a time-limit signal may come while a large cache is being built
    try:
        read_dotenv()
        info = distributed.env_dist_info()
        device = distributed.resolve_device(args.device, info.local_rank)
        info = distributed.init_distributed(device, info)
        return run(args, make_objective, previous_flag, device, info, stop)
    finally:  # also when the device or the process group could not be set up
        distributed.cleanup()
        stop.restore()


def run(args, make_objective, previous_flag, device, info, stop: StopFlag) -> int:
    say = print if info.is_main else (lambda *a, **k: None)
    # The settings this stage runs with: the recipe fills what the constants and flags left unset (None).
    args, filled = apply_recipe(args, info.world_size)
    if "aux" in filled and not has_aux(args.arch):  # the recipe's heads, on a model that has none
        args = argparse.Namespace(**{**vars(args), "aux": False})
        filled["aux"] = False
    if args.epochs is None:
        args = argparse.Namespace(**{**vars(args), "epochs": args.curriculum_epochs[args.profile - 1]})
        filled["epochs"] = args.epochs
        if not args.epochs:
            raise UserError(f"--curriculum-epochs plans 0 epochs for profile {args.profile}; give --epochs")
    planned = args.curriculum_epochs[args.profile - 1]
    if args.lr_decay == "curriculum" and args.epochs != planned:
        say(f"note: this stage trains {args.epochs} epochs where --curriculum-epochs plans {planned}; the one lr "
            "decay assumes the plan for the other stages (set --curriculum-epochs to change the plan)")
    say(f"recipe {args.recipe}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in filled.items()))
    profile = stage_profile(args.profile, args.resize, args.patch)
    out = stage_dir(args.output_dir, args.experiment_id, args.profile)
    say(distributed.torch_build(), flush=True)  # which PyTorch ran: a cluster's container may hold another
    if info.is_main:  # a directory that cannot be written fails now, not after the whole set-up
        make_stage_dir(out, args.output_dir)
    if device.type == "cpu":
        say("note: no GPU in use; training on the CPU (fine for the demo and tests, slow for Cityscapes)")
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Resume state first: a finished stage is not trained again when its job runs once more.
    resume = str(args.resume or "none")
    resume_path = out / "last.pth" if resume.lower() == "auto" else None if resume.lower() == "none" else resume
    checkpoint = None
    if resume_path is not None and (resume.lower() != "auto" or resume_path.is_file()):
        checkpoint = load_checkpoint(resume_path, "--resume")
        if checkpoint.get("optimizer") is None:
            raise UserError(f"--resume: {resume_path} is not a last.pth of this project (it holds no optimiser state)")
        if checkpoint["epoch"] >= args.epochs:
            say(f"stage already complete: {resume_path} holds epoch {checkpoint['epoch']}/{args.epochs}; "
                "nothing to do (remove it, or raise --epochs to train further: the added epochs go on from the "
                "rate where the stage ended, never back up; docs/resume.md)")
            return 0
    # The lr decay is planned in epochs when the stage starts; a resume keeps that plan (docs/resume.md).
    plan = decay_span(args.curriculum_epochs, args.profile, args.epochs, args.lr_decay)
    decay = plan if checkpoint is None else planned_decay(checkpoint["config"], plan)
    if decay != plan:
        say(f"note: the lr decay keeps the plan this stage started with (epochs {decay[0]}-{decay[1]} of the decay; "
            f"these settings would plan {plan[0]}-{plan[1]}): epochs past the planned ones go on down the same "
            "decay, at --min-lr once it is over; the rate never jumps back up")

    # Model: from the previous stage's best weights, unless this stage resumes.
    seed_everything(args.seed, 0, info.rank)
    model = build_model(args.arch, num_classes=NUM_CLASSES, aux=args.aux, width_mult=args.width_mult,
                        pretrained_backbone=args.pretrained_backbone, init=args.init)
    previous = None
    if checkpoint is None:
        previous = resolve_previous(args.previous_model_path, args.output_dir, args.experiment_id, args.profile,
                                    previous_flag)
        if previous is None and args.profile == 1 and str(args.previous_model_path).lower() == "auto":
            say("note: profile 1 is the first stage; training from scratch")
        if previous is not None:
            load_previous_stage(model, previous, args.arch, args.profile, previous_flag)
            say(f"loaded weights from {previous}")
    model.to(device)
    if args.sync_bn:
        model, converted = distributed.sync_batchnorm(model, device, info.world_size)
        say(f"--sync-bn: {converted} BatchNorm layers are SyncBatchNorm"
            + ("" if info.distributed else " (one process: they compute as BatchNorm)"))
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    objective, objective_config = make_objective(args, device, model)

    # Data.
    if args.batch_size < 2:  # a clear line instead of BatchNorm's ValueError deep inside the first step
        raise UserError("--batch-size 1: training needs at least 2 images per process (BatchNorm in Fast-SCNN's "
                        "pyramid pooling sees one value per channel per image); use --batch-size 2 or more")
    train_set = SegmentationDataset(args.data_dir, "train", profile, train=True, cache_dir=args.cache_dir,
                                    scale_aug=args.scale_aug)
    val_set = SegmentationDataset(args.data_dir, "val", profile, train=False, cache_dir=args.cache_dir,
                                  label_resolution=args.label_resolution)
    train_loader = build_loader(train_set, args.batch_size, args.num_workers, shuffle=True, seed=args.seed,
                                distributed=info.distributed)
    val_loader = build_loader(val_set, args.batch_size, args.num_workers, shuffle=False, seed=args.seed,
                              distributed=info.distributed)

    # Optimiser and this stage's part of the learning-rate decay. A resume continues the decay at its epoch, at
    # this run's base rate: after a change of global batch, the rate the recipe gives the new one.
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum)
    start_epoch = 0 if checkpoint is None else checkpoint["epoch"]
    if checkpoint is not None:
        restore_optimizer(optimizer, checkpoint["optimizer"], args.lr)
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(optimizer, args.lr_schedule, decay[0] * steps_per_epoch, decay[1] * steps_per_epoch,
                                round(args.warmup_epochs * steps_per_epoch), args.min_lr / args.lr,
                                done_steps=start_epoch * steps_per_epoch)
    # Training compute of one step, counted once on a batch of this stage's crops (all processes together).
    generator = torch.Generator().manual_seed(0)
    ph, pw = profile.patch_hw
    images = torch.randint(0, 256, (args.batch_size, 3, ph, pw), dtype=torch.uint8, generator=generator)
    step_tflop = info.world_size * count_train_step_flops(
        model, objective, *prepare_batch(images, torch.zeros(args.batch_size, ph, pw, dtype=torch.uint8), device,
                                         train=False)) / 1e12

    # Precision and DDP.
    amp_dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    train_model = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    best_miou, run_id = -1.0, None
    # Compute and device time of the curriculum so far: the previous stage's totals, or this stage's on resume.
    totals = curriculum_totals(previous) if previous is not None else {"cum_train_tflop": 0.0, "cum_device_hours": 0.0}
    if checkpoint is not None:
        load_weights(model, checkpoint, "--resume", where=resume_path)
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        best_miou = checkpoint["best_miou"]
        run_id = checkpoint.get("wandb_run_id")
        totals = {k: (checkpoint.get("metrics") or {}).get(k, v) for k, v in totals.items()}  # older files: none
        say(f"resumed from {resume_path}: epoch {start_epoch + 1}")

    # The run's configuration: every setting, plus what was resolved from them. Fixed from here on.
    config = {**vars(args), **objective_config, "resize": list(profile.resize), "patch": list(profile.patch),
              "previous_model_loaded": str(previous) if previous else None, "world_size": info.world_size,
              "global_batch": args.batch_size * info.world_size, "decay_epochs": list(decay),
              # str(): PyTorch 2.5's torch.load(weights_only=True) refuses its own TorchVersion type.
              "torch_version": str(torch.__version__), "torch_cuda": torch.version.cuda,
              "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else None}
    if checkpoint is not None:  # where the stage came from, and what changed at each resume
        config, notes = carry_on_resume(checkpoint["config"], config, start_epoch)
        for note in notes:
            say(note)
    if info.is_main:
        atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if checkpoint is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh start: an old log would mix two runs
        else:
            reconcile_metrics(out / "metrics.jsonl", start_epoch, checkpoint.get("metrics") or {})
    tracker = Tracker(mode=args.wandb, project=args.wandb_project, name=f"{args.experiment_id}-p{args.profile}",
                      group=args.experiment_id, config=config, dir=str(out), enabled=info.is_main, run_id=run_id)

    done = start_epoch  # epochs finished and saved
    stopping = agree(stop(), device=device)[0]
    for epoch in range(start_epoch, args.epochs):
        if stopping:
            break
        seed_everything(args.seed, epoch, info.rank)
        train_loader.sampler.set_epoch(epoch)  # the epoch's order and crops (all ranks alike)
        progress = Progress(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", enabled=info.is_main,
                            log_every=args.log_every)
        train_metrics = train_one_epoch(train_model, objective, optimizer, scheduler, train_loader, device, epoch,
                                        args, stop, progress, scaler, amp_dtype, info.world_size)
        progress.close()
        if train_metrics is None:  # a stop signal: last.pth of the previous epoch is where the next run resumes
            stopping = True
            break

        val = evaluate(model, val_loader, device, NUM_CLASSES, amp_dtype, device.type == "cuda",
                       on_batch=tracker.val_batch_hook(epoch) if info.is_main else None)
        train_tflop = step_tflop * steps_per_epoch
        totals = {"cum_train_tflop": totals["cum_train_tflop"] + train_tflop,
                  "cum_device_hours": totals["cum_device_hours"] + train_metrics["epoch_s"] * info.world_size / 3600}
        record = {
            "epoch": epoch + 1, **train_metrics, "train_tflop": train_tflop, **totals,
            "val_loss": val["loss"], "val_miou": val["miou"], "val_dice": val["dice"],
            "val_pixel_accuracy": val["pixel_accuracy"], "val_per_class_iou": val["per_class_iou"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        improved = val["miou"] > best_miou
        best_miou = max(best_miou, val["miou"])
        # Never save a model that is not finite: the previous files stay the last good ones.
        if agree(not all(torch.isfinite(p).all() for p in model.state_dict().values()), device=device)[0]:
            raise NonFiniteLoss(f"the weights became non-finite in epoch {epoch + 1}; lower --lr or use "
                                "--amp bf16/off; the last good checkpoint is kept")
        if info.is_main:
            state = {"model": model.state_dict(), "config": config, "epoch": epoch + 1, "metrics": record}
            if improved:
                atomic_save(state, out / "best.pth")
            atomic_save({**state, "best_miou": best_miou, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                         "wandb_run_id": tracker.run_id}, out / "last.pth")
            append_jsonl(out / "metrics.jsonl", record)
        done = epoch + 1
        say(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f}  val loss {val['loss']:.4f}  "
            f"mIoU {val['miou']:.4f}  Dice {val['dice']:.4f}  pixel acc {val['pixel_accuracy']:.4f}  "
            f"{record['images_per_s']:.1f} img/s" + ("  (best)" if improved else ""), flush=True)
        tracker.log({k: v for k, v in record.items() if k != "val_per_class_iou"}, step=epoch + 1)
        tracker.log_per_class(val["per_class_iou"], step=epoch + 1)
        stopping = agree(stop(), device=device)[0]  # a signal during validation: this epoch is saved, stop now

    tracker.finish()
    if stopping and done < args.epochs:
        say(f"stopped by {stop.signal_name or 'a signal on another rank'}; last.pth holds the last finished "
            f"epoch; exit {REQUEUE_EXIT_CODE} (run again with --resume auto to continue)", flush=True)
        return REQUEUE_EXIT_CODE
    tracker.summary({"best_val_miou": best_miou})
    say(f"done: best val mIoU {best_miou:.4f}; checkpoints in {out}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
