#!/usr/bin/env bash
# The prepared GPU check, in two parts that each fit one device call:
#   bash benchmarks/run_cuda.sh tests OUTDIR   the CUDA-parametrised tests (and the new rules' CUDA cases)
#   bash benchmarks/run_cuda.sh bench OUTDIR   resnet50 (bnfuse / freezing / limit) and the branchy built-ins
# Exits non-zero when a test or the benchmark fails. Needs torch, torchvision and hypothesis installed.
set -uo pipefail
part=${1:?tests or bench}
out=${2:-.}
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())" || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONUNBUFFERED=1
status=0
if [ "$part" = tests ]; then
  # test_report needs expecttest (not on the GPU image) and has no CUDA case; the fuzz has none either.
  python3 -m pytest tests -q -m cuda -p no:cacheprovider -o addopts="" --ignore=tests/test_report.py \
    --ignore=tests/test_fuzz.py 2>&1 | tail -40 | tee "$out/cuda_tests.log" || status=1
else
  python3 -m compilefuse.bench --device cuda --batch-size 1 --rounds 3 --min-run-time 0.2 --no-progress \
    --systems bnfuse reparameterized limit --json "$out/bench_cuda_branchy.json" \
    --model repvgg_style --model mobileone_style 2>&1 | grep -v Warning | tail -20 | tee "$out/bench_cuda_branchy.txt" || status=1
  python3 -m compilefuse.bench --device cuda --batch-size 1 32 --rounds 3 --min-run-time 0.2 --no-progress \
    --systems inductor-freezing bnfuse limit --json "$out/bench_cuda_resnet50.json" \
    --model resnet50 2>&1 | grep -v Warning | tail -20 | tee "$out/bench_cuda_resnet50.txt" || status=1
fi
exit $status
