#!/usr/bin/env bash
# One prepared GPU check: the CUDA-parametrised tests, then the CUDA latency benchmark.
# Usage (on a machine with a GPU and torch installed): bash benchmarks/run_cuda.sh OUTDIR
set -u
out=${1:-.}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
PYTHONUNBUFFERED=1 timeout 330 python3 -m pytest tests -q -m "slow or not slow" -k cuda -p no:cacheprovider \
  -o addopts="" 2>&1 | tail -40 | tee "$out/cuda_tests.log"
PYTHONUNBUFFERED=1 timeout 180 python3 benchmarks/core_latency.py --device cuda --batch-size 1 --batch-size 32 \
  --rounds 5 --min-run-time 0.3 --json "$out/core_cuda.json" 2>&1 | grep -v Warning | tail -8
