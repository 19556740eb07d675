#!/usr/bin/env bash
# One curriculum stage of the teacher: runs train.py with the interpreter of this project.
#
# Settings live in one place, the constants at the top of train.py. This wrapper holds no copy of any of
# them: it passes on exactly the arguments you give it, and those win over the constants.
#
#   bash main.sh                          # the stage train.py's constants describe (GPU if there is one)
#   bash main.sh --profile 2 --epochs 50  # any train.py flag
#   sbatch jobscript_slurm.sh             # on the cluster (runs this file)
#   bash submit_curriculum.sh             # all five stages on the cluster, chained
#
# The run prints each setting that differs from train.py's constants. Checkpoints:
# <output-dir>/<experiment-id>/profile-<k>/{best.pth,last.pth,metrics.jsonl}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/launch.sh
source "$here/tools/launch.sh"
PYTHON="$(fastseg_default_python "$here")"
exec "$PYTHON" "$here/train.py" "$@"
