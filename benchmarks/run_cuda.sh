#!/usr/bin/env bash
# One prepared GPU check: the CUDA-parametrised tests, then the CUDA benchmark.
# Usage (on a machine with a GPU and torch + torchvision installed): bash benchmarks/run_cuda.sh OUTDIR
set -u
out=${1:-.}
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
PYTHONUNBUFFERED=1 timeout 200 python3 -m pytest tests -q -m "slow or not slow" -k cuda -p no:cacheprovider \
  -o addopts="" -x 2>&1 | tail -30 | tee "$out/cuda_tests.log"
PYTHONUNBUFFERED=1 timeout 300 python3 -m compilefuse.bench --device cuda --batch-size 1 32 --rounds 3 \
  --min-run-time 0.2 --no-progress --json "$out/bench_cuda.json" \
  --model resnet_style --model mobilenet_style --model dcgan_generator --model pointnet_head \
  --model audio_cnn --model preact_cnn --model resnet18 2>&1 | grep -v Warning | tail -60 | tee "$out/bench_cuda.txt"
