#!/usr/bin/env bash
# Accuracy, cost and speed of trained checkpoints with evaluate_efficiency.py: a Markdown table on stdout,
# JSON and plots.
#
# Settings live in evaluate_efficiency.py's constants; this wrapper holds none. It passes on exactly the
# arguments you give it, and those win over the constants; the run prints each setting that differs from them.
#
#   bash evaluate_efficiency.sh                                   # the checkpoints the constants name, here
#   bash evaluate_efficiency.sh --device cpu --current-model-path checkpoints/run/profile-2/best.pth
#   bash evaluate_efficiency.sh --current-model-path checkpoints/run/profile-5/best.pth --profile 1-5 --tta
#   mkdir -p logs && sbatch evaluate_efficiency.sh                # on the cluster, same arguments
#
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

exec "${launch[@]}" "$PYTHON" "$here/evaluate_efficiency.py" "$@"
