#!/usr/bin/env bash
# One curriculum stage of the student (knowledge distillation) on Slurm: runs main_distillation.sh, which runs
# train_distillation.py. Settings live in its constants and train.py's; this script holds none.
#
#   mkdir -p logs                     # Slurm writes logs/<job name>-<job id>.out; it must exist
#   sbatch jobscript_slurm_distillation.sh                                   # the stage the constants set, 1 GPU
#   sbatch jobscript_slurm_distillation.sh --profile 2 --epochs 3            # arguments reach train_distillation.py
#   sbatch --time=4:00:00 jobscript_slurm_distillation.sh                    # any #SBATCH line can be overridden
#   sbatch --gpus-per-node=4 --ntasks-per-node=4 jobscript_slurm_distillation.sh            # 4 GPUs, one process each
#   sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 jobscript_slurm_distillation.sh  # 2 nodes, 8 GPUs
#   bash submit_curriculum.sh --with-student                  # teacher, then student, chained
#
# Submit from the project directory: the job runs there. It uses container.sif through apptainer when that
# file exists (or $CONTAINER), else .venv, else python3. Five minutes before the time limit (and on
# preemption) the trainer stops within a few steps and the job requeues itself; the new run resumes from the
# last.pth of the last finished epoch.
# A stage that already finished is not trained again.
#SBATCH --job-name=fastseg-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=18
#SBATCH --gpus-per-node=1
#SBATCH --partition=gpu_a100
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f tools/launch.sh || ! -f main_distillation.sh ]]; then
    echo "error: $PWD is not the project directory (no main_distillation.sh); cd there and submit again" >&2
    exit 2
fi
# shellcheck source=tools/launch.sh
source tools/launch.sh
fastseg_select_runtime "$PWD"
fastseg_run_job bash main_distillation.sh "$@"
