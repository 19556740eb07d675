#!/usr/bin/env bash
# Everything a GPU node can tell that a CPU cannot, in one run: the GPU, its driver and the PyTorch build; the
# CUDA tests; one Cityscapes epoch (2975 images) of profiles 1 and 5 per recipe (images/s, seconds, peak memory);
# training images/s per profile for each recipe (AMP), the cost of the all-rank stop/NaN check, the
# distillation step; inference FPS at batch 1 in fp16 at 2048x1024 and 1024x512 (BN folded, channels_last,
# plain and torch.compile), latency per profile; and the loader.
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
from fastseg.distributed import nvidia_driver, torch_build
from fastseg.engine import resolve_amp
if not torch.cuda.is_available():
    sys.exit(f"gpu_figures.sh: no CUDA device is visible to {torch_build()} ({nvidia_driver() or 'no nvidia-smi'}); "
             "run it on a GPU node (docs/gpu.md)")
cuda = torch.device("cuda", 0)
major, minor = torch.cuda.get_device_capability(cuda)
print(f"GPU: {torch.cuda.get_device_name(cuda)} x {torch.cuda.device_count()}, compute capability {major}.{minor}, "
      f"{nvidia_driver() or 'driver unknown (no nvidia-smi)'}; {torch_build()}, cuDNN {torch.backends.cudnn.version()}; "
      f"--amp auto trains in {str(resolve_amp('auto', cuda)).removeprefix('torch.')}")
PYEOF

echo "==> CUDA tests"
"$PY" -m pytest -q tests/test_cuda.py tests/test_data.py -k "cuda"

for recipe in paper adamw; do
    echo "==> one Cityscapes epoch (186 steps of 16 = 2976 images) of profiles 1 and 5, recipe $recipe"
    "$PY" -m benchmarks.bench_train --recipe "$recipe" --profiles 1 5 --batch-size 16 --steps 186 --warmup 5
done

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

echo "==> Fast-SCNN inference FPS, batch 1, fp16 (BN folded, channels_last; plain and torch.compile)"
"$PY" -m benchmarks.bench_inference --sizes 2048x1024 1024x512 --dtype fp16 --runs 100 --warmup 20

echo "==> Fast-SCNN inference per profile (BN folded, channels_last, fp16 weights; batch 1)"
"$PY" -m benchmarks.bench_model --device cuda --fold-bn --channels-last --runs 100 --warmup 20

echo "==> data loader (the CPU side), profiles 1 and 5, 8 workers, with and without scale aug"
"$PY" benchmarks/bench_data.py --profile 1 --mode fast --workers 8 --batch-size 16 --batches 100 --scale-aug
"$PY" benchmarks/bench_data.py --profile 5 --mode fast --workers 8 --batch-size 16 --batches 30 --scale-aug
