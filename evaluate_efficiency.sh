#!/usr/bin/env bash
# Accuracy, cost and speed of trained checkpoints with evaluate_efficiency.py: a Markdown table on stdout,
# JSON and plots. Edit the settings below, then:
#
#   bash evaluate_efficiency.sh                                   # here
#   bash evaluate_efficiency.sh --device cpu --current-model-path checkpoints/run/profile-2/best.pth
#   mkdir -p logs && sbatch evaluate_efficiency.sh                # on the cluster, same arguments
#
# Arguments given to this script reach evaluate_efficiency.py after the settings below, so they win.
# In a Slurm job it uses container.sif through apptainer when that file exists (or $CONTAINER), else
# .venv, else python3; here it uses $PYTHON, else .venv, else python3.
#SBATCH --job-name=fastseg-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=18
#SBATCH --gpus-per-node=1
#SBATCH --partition=gpu_a100
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# One or more checkpoints; a quoted glob is expanded by evaluate_efficiency.py (every stage of a run).
CURRENT_MODEL_PATH=("checkpoints/fast_scnn/profile-*/best.pth")
DATA_DIR=data/cityscapes            # leftImg8bit/ and gtFine/ inside; the val split is scored
OUTPUT=results/efficiency.json      # one object per checkpoint
PLOTS=results/efficiency            # accuracy vs GFLOPs and vs latency, per-class IoU
BATCH_SIZE=8
NUM_WORKERS=8

# sbatch runs a copy of this file from Slurm's spool directory; the project is where it was submitted.
if [[ -n ${SLURM_JOB_ID:-} && -f ${SLURM_SUBMIT_DIR:-}/tools/launch.sh ]]; then
    here="$SLURM_SUBMIT_DIR"
else
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi
# shellcheck source=tools/launch.sh
source "$here/tools/launch.sh"
launch=()
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    fastseg_select_runtime "$here"
    launch=("${FASTSEG_LAUNCH[@]}")
else
    PYTHON="$(fastseg_default_python "$here")"
fi

exec "${launch[@]}" "$PYTHON" "$here/evaluate_efficiency.py" \
    --current-model-path "${CURRENT_MODEL_PATH[@]}" \
    --data-dir "$DATA_DIR" \
    --output "$OUTPUT" \
    --plots "$PLOTS" \
    --batch-size "$BATCH_SIZE" \
    --num-workers "$NUM_WORKERS" \
    "$@"
