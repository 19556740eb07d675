"""Train Fast-SCNN on one stage of the resolution curriculum (a teacher, or a model on its own).

Edit the constants below, or override any of them with a flag of the same name (``--batch-size 8``).
One run trains one stage; the next stage starts from this one's best weights::

    python train.py --profile 1 --experiment-id run1                                  # stage 1 from scratch
    python train.py --profile 2 --experiment-id run1 --previous-model-path auto       # stage 2 from stage 1
    torchrun --nproc-per-node 4 train.py --profile 3 --experiment-id run1 --previous-model-path auto
    sbatch jobscript_slurm.sh --profile 3                                             # on the cluster
    python train.py --data-dir data/synthetic --epochs 2 --batch-size 4 --device cpu  # a laptop smoke run

Stage k writes ``<output-dir>/<experiment-id>/profile-<k>/``: config.json, metrics.jsonl, best.pth, last.pth.
A stopped run (Slurm time limit, preemption: SIGUSR1/SIGTERM) saves last.pth and exits with status 75;
``--resume auto`` (the default) continues it exactly.
"""

from __future__ import annotations

from fastseg.config import build_parser
from fastseg.engine import supervised_objective
from fastseg.errors import run_cli
from fastseg.losses import SegmentationLoss
from fastseg.stage import run_stage

# ---- what users edit ---------------------------------------------------------------------------------------
PROFILE = 1  # curriculum stage 1..5: 576x288 -> 448x224 crops ... 2048x1024 -> 1536x768 crops (README table)
DATA_DIR = "data/cityscapes"  # Cityscapes root with leftImg8bit/ and gtFine/ (data/synthetic for the demo)
EXPERIMENT_ID = "fast_scnn"  # names the curriculum run; every stage of one run shares it
PREVIOUS_MODEL_PATH = "auto"  # auto = best.pth of the previous profile of this run (none at profile 1)
EPOCHS = 100  # per stage; the higher profiles cost ~12x more per epoch than profile 1
BATCH_SIZE = 16  # per GPU; Fast-SCNN at profile 5 (1536x768 crops) fits 16 in 40 GB with bf16
LR = 1e-3  # AdamW's rate as used before; with --optimizer sgd the paper used 0.045
OPTIMIZER = "adamw"  # adamw, or sgd (momentum 0.9, the paper's recipe)
LR_SCHEDULE = "poly"  # poly: (1 - step/total)^0.9 after the warm-up; constant: no decay
WARMUP_EPOCHS = 0.0  # linear warm-up; useful with sgd and large batches
WEIGHT_DECAY = 1e-4  # not applied to norm weights, biases and depthwise kernels
MOMENTUM = 0.9  # sgd only
AUX = False  # auxiliary head on the 1/8 features (loss weight 0.4); off keeps the users' checkpoint layout
NUM_WORKERS = 8  # data loader processes per GPU; the cached loader needs few
SEED = 0
# ---- rarely changed ----------------------------------------------------------------------------------------
ARCH = "fast_scnn"  # or a torchvision model (deeplabv3_resnet50, ...) to train a larger teacher
WIDTH_MULT = 1.0  # Fast-SCNN channel width; 2.0 makes a wider teacher
SCALE_AUG = False  # random scale 0.5-2.0 before cropping (the paper's augmentation)
LABEL_RESOLUTION = "full"  # validate at the labels' full size (Cityscapes convention) or "resized"
OUTPUT_DIR = "checkpoints"
RESUME = "auto"  # continue from this stage's last.pth when it exists (a requeued Slurm job)
DEVICE = "auto"
AMP = "auto"  # bf16 on GPUs that support it, else fp16; off on the CPU
COMPILE = False
WANDB = "auto"  # online with WANDB_API_KEY (environment or .env), else offline; never a login prompt
WANDB_PROJECT = "fast-scnn-cityscapes"
LOG_EVERY = 50  # steps between progress lines in log files (an interactive terminal gets a bar)
CACHE_DIR = None  # pre-resized copies of the data; default beside the data or in ~/.cache/fastseg


def defaults() -> dict:
    """This script's constants as flag defaults (lower-case names)."""
    return {name.lower(): value for name, value in globals().items() if name.isupper()}


def build_objective(cfg: dict, device, model):
    """Cross-entropy (ignoring unlabelled pixels), plus 0.4 x the auxiliary head's when it is on."""
    return supervised_objective(SegmentationLoss(aux_weight=0.4))


def parse_config(argv=None, description: str = __doc__, defaults_: dict | None = None, extend=None) -> dict:
    parser = build_parser(description, defaults_ or defaults())
    if extend is not None:
        extend(parser)
    return vars(parser.parse_args(argv))


def main(argv=None) -> int:
    cfg = parse_config(argv)
    return run_stage(cfg, build_objective)


if __name__ == "__main__":
    run_cli(main)
