#!/usr/bin/env bash
# One curriculum stage of the student, taught by a trained teacher: runs train_distillation.py.
#
# Settings live in one place, the constants at the top of train_distillation.py (its own: profile, teacher,
# alpha, ...) and of train.py (all the others). This wrapper holds no copy of any of them: it passes on
# exactly the arguments you give it, and those win over the constants.
#
#   bash main_distillation.sh                         # the stage the constants describe
#   bash main_distillation.sh --profile 2 --alpha 0.7 # any flag
#   sbatch jobscript_slurm_distillation.sh            # on the cluster (runs this file)
#   bash submit_curriculum.sh --with-student          # teacher's five stages, then the student's
#
# The run prints each setting that differs from the constants.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/launch.sh
source "$here/tools/launch.sh"
PYTHON="$(fastseg_default_python "$here")"
exec "$PYTHON" "$here/train_distillation.py" "$@"
