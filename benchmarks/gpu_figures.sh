#!/usr/bin/env bash
# Everything a GPU node can tell that a CPU cannot, in one run: the CUDA tests, training images/s and the
# time of a Cityscapes epoch per profile for each recipe (AMP), the cost of the all-rank stop/NaN check, the
# distillation step, inference latency per profile, and the loader.
#
#   bash benchmarks/gpu_figures.sh            # uses .venv (made with `make venv`) or python3
#   sbatch --gpus=1 --wrap "bash benchmarks/gpu_figures.sh"
#
# Prints figures only; nothing here fails on a slow number. Exits non-zero when a test fails or no GPU is seen.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_figures.sh: no CUDA device is visible (run it on a GPU node)")
print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
PYEOF

echo "==> CUDA tests"
"$PY" -m pytest -q tests/test_cuda.py tests/test_data.py -k "cuda"

for recipe in paper adamw; do
    echo "==> training per profile, recipe $recipe (AMP, channels_last; batch 16)"
    "$PY" -m benchmarks.bench_train --recipe "$recipe" --batch-size 16 --steps 20 --warmup 5
done

echo "==> the all-rank stop/NaN check: every step (a host sync per step) against every 10 steps, profile 1"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
for every in 1 10; do
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m benchmarks.bench_train \
        --profiles 1 --batch-size 16 --steps 50 --warmup 5 --check-every "$every"
done

echo "==> distillation step (a Fast-SCNN teacher's forward added), per profile"
"$PY" -m benchmarks.bench_train --distill --batch-size 16 --steps 20 --warmup 5

echo "==> Fast-SCNN inference per profile (BN folded, channels_last, AMP; batch 1)"
"$PY" -m benchmarks.bench_model --device cuda --fold-bn --channels-last --runs 100 --warmup 20

echo "==> data loader (the CPU side), profiles 1 and 5, 8 workers, with and without scale aug"
"$PY" benchmarks/bench_data.py --profile 1 --mode fast --workers 8 --batch-size 16 --batches 100 --scale-aug
"$PY" benchmarks/bench_data.py --profile 5 --mode fast --workers 8 --batch-size 16 --batches 30 --scale-aug
