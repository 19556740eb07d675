#!/usr/bin/env bash
# One curriculum stage of the teacher with train.py. Edit the settings below, then:
#
#   bash main.sh                          # here (GPU if there is one, else CPU)
#   bash main.sh --epochs 1 --profile 2   # any train.py flag; it wins over the settings below
#   sbatch jobscript_slurm.sh             # on the cluster (runs this file)
#   bash submit_curriculum.sh             # all five stages on the cluster, chained
#
# Tracking: wandb logs online when WANDB_API_KEY is set (in the environment or in .env, see
# .env.example), offline otherwise; no `wandb login` needed. Checkpoints:
# $OUTPUT_DIR/$EXPERIMENT_ID/profile-$PROFILE/{best.pth,last.pth,metrics.jsonl}.
set -euo pipefail

EXPERIMENT_ID=fast_scnn             # names the run; every stage of one curriculum shares it
PROFILE=1                           # curriculum stage 1..5: 576x288 -> 2048x1024 (see README)
PREVIOUS_MODEL_PATH=auto            # auto: best.pth of the previous profile of this run; none; or a .pth
DATA_DIR=data/cityscapes            # leftImg8bit/ and gtFine/ inside
OUTPUT_DIR=checkpoints
EPOCHS=100
BATCH_SIZE=16                       # per GPU
LR=1e-3                             # AdamW, as the earlier runs
NUM_WORKERS=8                       # data-loading processes per GPU
SEED=0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/launch.sh
source "$here/tools/launch.sh"
PYTHON="$(fastseg_default_python "$here")"

# --resume auto: a requeued or resubmitted job continues from this stage's last.pth, and a finished stage
# is not trained again. Arguments given to this script come last, so they win.
exec "$PYTHON" "$here/train.py" \
    --experiment-id "$EXPERIMENT_ID" \
    --profile "$PROFILE" \
    --previous-model-path "$PREVIOUS_MODEL_PATH" \
    --data-dir "$DATA_DIR" \
    --output-dir "$OUTPUT_DIR" \
    --epochs "$EPOCHS" \
    --batch-size "$BATCH_SIZE" \
    --lr "$LR" \
    --num-workers "$NUM_WORKERS" \
    --seed "$SEED" \
    --resume auto \
    "$@"
