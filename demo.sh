#!/usr/bin/env bash
# The whole workflow on the embedded synthetic Cityscapes, on any machine (CPU is fine):
#   teacher profile 1 -> 2, student distilled from it profile 1 -> 2, efficiency report of the four stages.
# Run by `make demo`. Every size below is a variable so the tests run the very same steps tiny:
#   TRAIN_IMAGES=12 VAL_IMAGES=4 IMAGE_SIZE=128x64 EPOCHS=1 STAGE_ARGS="--resize 128x64 --patch 96x48" bash demo.sh
# Running it again reuses the data and skips finished stages (their last.pth says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-data/synthetic}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints}
RESULTS_DIR=${RESULTS_DIR:-results/demo}
TRAIN_IMAGES=${TRAIN_IMAGES:-96}
VAL_IMAGES=${VAL_IMAGES:-16}
IMAGE_SIZE=${IMAGE_SIZE:-1024x512}   # the generator's size; each profile resizes from it
EPOCHS=${EPOCHS:-6}
BATCH_SIZE=${BATCH_SIZE:-8}
NUM_WORKERS=${NUM_WORKERS:-2}
TIMED_RUNS=${TIMED_RUNS:-50}
DEPLOYED_SPEED=${DEPLOYED_SPEED:-deployed-speed}   # no-deployed-speed: skip the onnxruntime timing (its export)
read -r -a STAGE_ARGS <<< "${STAGE_ARGS:-}"   # extra flags for every training stage
TEACHER=${TEACHER:-demo_teacher}
STUDENT=${STUDENT:-demo_student}

WANDB=${WANDB:-offline}

step() { printf '\n==> %s\n' "$*"; }
make_data() {
    "$PYTHON" tools/synthetic.py "$DATA_DIR" --train "$TRAIN_IMAGES" --val "$VAL_IMAGES" \
        --width "${IMAGE_SIZE%x*}" --height "${IMAGE_SIZE#*x}"
}
# The training flags every stage shares, except where data and checkpoints are (submit_curriculum.sh takes
# those as its own options).
# The adamw recipe: at the demo's budget (1.2-2 TFLOP a stage) it learns far faster than the paper recipe
# on these scenes (docs/recipe.md, benchmarks/bench_recipes.py); two stages of $EPOCHS epochs, a decay each.
stage_flags=(--recipe "${RECIPE:-adamw}" --curriculum-epochs "$EPOCHS,$EPOCHS,0,0,0" --batch-size "$BATCH_SIZE"
             --num-workers "$NUM_WORKERS" --wandb "$WANDB" "${STAGE_ARGS[@]}")
common=(--data-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR" "${stage_flags[@]}")

# `make demo-slurm` (tools/demo_slurm.py) sources this file up to here, so both demos read the same sizes
# and make the same data; run as a script, it goes on with the steps.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

step "1/6 synthetic Cityscapes: $TRAIN_IMAGES train + $VAL_IMAGES val street scenes at $IMAGE_SIZE in $DATA_DIR"
make_data

step "2/6 teacher, profile 1"
"$PYTHON" train.py "${common[@]}" --experiment-id "$TEACHER" --profile 1 --previous-model-path none
step "3/6 teacher, profile 2 (from profile 1's best weights)"
"$PYTHON" train.py "${common[@]}" --experiment-id "$TEACHER" --profile 2 --previous-model-path auto

teacher_ckpt="$OUTPUT_DIR/$TEACHER/profile-2/best.pth"
step "4/6 student, profile 1, distilled from $teacher_ckpt"
"$PYTHON" train_distillation.py "${common[@]}" --experiment-id "$STUDENT" --profile 1 \
    --trained-teacher-model-path "$teacher_ckpt" --previous-student-model-path none
step "5/6 student, profile 2"
"$PYTHON" train_distillation.py "${common[@]}" --experiment-id "$STUDENT" --profile 2 \
    --trained-teacher-model-path "$teacher_ckpt" --previous-student-model-path auto

step "6/6 accuracy, cost and speed of the four stages"
mkdir -p "$RESULTS_DIR"
"$PYTHON" evaluate_efficiency.py --data-dir "$DATA_DIR" --num-workers "$NUM_WORKERS" --runs "$TIMED_RUNS" --"$DEPLOYED_SPEED" \
    --current-model-path "$OUTPUT_DIR/$TEACHER"/profile-*/best.pth "$OUTPUT_DIR/$STUDENT"/profile-*/best.pth \
    --output "$RESULTS_DIR/efficiency.json" --plots "$RESULTS_DIR"

printf '\nDone.\n  report:      %s\n  plots:       %s\n  checkpoints: %s and %s\n  W&B runs:    %s (offline; `wandb sync` uploads them)\n' \
    "$RESULTS_DIR/efficiency.json" "$RESULTS_DIR/*.png" "$OUTPUT_DIR/$TEACHER" "$OUTPUT_DIR/$STUDENT" \
    "$OUTPUT_DIR/*/profile-*/wandb"
