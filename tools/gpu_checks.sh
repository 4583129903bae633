#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run that fits a short device lease (~8 min):
# the card, the CUDA tests (CUDA-graph capture against the uncaptured step, a model
# without trainable params, NCCL ranks against one process), then the CUDA benchmark
# (fit captured and uncaptured, eager, hand-written, torch.compile reduce-overhead, JAX).
#
#     OUT=gpu-checks bash tools/gpu_checks.sh     # from the repo root, with torch+CUDA installed
#
# Logs go to $OUT (default ./gpu-checks): gpu.txt, tests.txt, bench.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
"$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    || { echo "gpu_checks: torch sees no CUDA device here; nothing to check" | tee "$out/gpu.txt"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
timeout 240 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_step.py tests/test_optim.py tests/test_distributed.py \
    -k "cuda or nccl" 2>&1 | tee "$out/tests.txt"
timeout 300 "$python" tools/bench.py --device cuda --quick --no-mem 2>&1 | tee "$out/bench.txt"
timeout 120 "$python" tools/bench_cnn.py --device cuda 2>&1 | tee "$out/bench_cnn.txt"
