#!/usr/bin/env bash
# The prepared GPU check. Each part fits one device call; `all` runs them in turn, each under a time limit:
#   bash benchmarks/run_cuda.sh tests OUTDIR   the CUDA-parametrised tests (rules, export packages, ...)
#   bash benchmarks/run_cuda.sh bench OUTDIR   resnet50 at batch 1: freezing / bnfuse under mode="reduce-overhead"
#                                              (CUDA graphs), eager / freezing / bnfuse / limit, then the package
#   bash benchmarks/run_cuda.sh all OUTDIR     both
# Exits non-zero when a test or the benchmark fails. Needs torch, torchvision and hypothesis installed.
set -uo pipefail
part=${1:?tests, bench or all}
out=${2:-.}
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())" || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONUNBUFFERED=1
status=0
bench() {  # name, time limit, then compilefuse-bench arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m compilefuse.bench --device cuda --rounds 3 --min-run-time 0.2 --no-progress \
    --json "$out/$name.json" "$@" 2>&1 | grep -v Warning | tail -20 | tee "$out/$name.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: $name"; status=1; }
}
if [ "$part" = tests ] || [ "$part" = all ]; then
  # test_report needs expecttest (not on the GPU image) and has no CUDA case; the fuzz has none either.
  timeout 200 python3 -m pytest tests -q -m cuda -p no:cacheprovider -o addopts="" --ignore=tests/test_report.py \
    --ignore=tests/test_fuzz.py --ignore=tests/test_export.py 2>&1 | tail -40 | tee "$out/cuda_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: tests"; status=1; }
  # Apart: on the GPU machine's torch 2.11, loading any AOTInductor CUDA package segfaults (torch's own
  # aoti_compile_and_package too; docs/compatibility.md), which would end the run above.
  timeout 200 python3 -m pytest tests/test_export.py -q -m cuda -p no:cacheprovider -o addopts="" 2>&1 | tail -40 \
    | tee "$out/cuda_export_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: export tests"; status=1; }
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  bench bench_cuda_reduce_overhead 110 --mode reduce-overhead --batch-size 1 --systems inductor-freezing bnfuse \
    --model resnet50
  bench bench_cuda_resnet50 170 --batch-size 1 --systems eager inductor-freezing bnfuse limit --model resnet50
  # Apart, for the same reason as the export tests: a segfault loading the package ends the process.
  bench bench_cuda_resnet50_export 120 --batch-size 1 --systems export --model resnet50
fi
exit $status
