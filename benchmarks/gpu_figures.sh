#!/usr/bin/env bash
# Everything a GPU node can tell that a CPU cannot, in one run:
# the CUDA tests, training images/s per profile with AMP, the loader, and inference latency per profile.
#
#   bash benchmarks/gpu_figures.sh            # uses .venv (made with `make venv`) or python3
#   sbatch --gpus=1 --wrap "bash benchmarks/gpu_figures.sh"
#
# Prints figures only; nothing here fails on a slow number. Exits non-zero when a test fails or no GPU is seen.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_figures.sh: no CUDA device is visible (run it on a GPU node)")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

echo "==> CUDA tests"
"$PY" -m pytest -q tests/test_cuda.py tests/test_data.py -k "cuda"

echo "==> training images/s per profile (AMP, channels_last; batch 16)"
"$PY" -m benchmarks.bench_train --batch-size 16 --steps 20 --warmup 5

echo "==> Fast-SCNN inference per profile (BN folded, channels_last, AMP; batch 1)"
"$PY" -m benchmarks.bench_model --device cuda --fold-bn --channels-last --runs 100 --warmup 20

echo "==> data loader (the CPU side), profiles 1 and 5, 8 workers, with and without scale aug"
"$PY" benchmarks/bench_data.py --profile 1 --mode fast --workers 8 --batch-size 16 --batches 100 --scale-aug
"$PY" benchmarks/bench_data.py --profile 5 --mode fast --workers 8 --batch-size 16 --batches 30 --scale-aug
