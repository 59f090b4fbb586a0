#!/usr/bin/env bash
# One call on a lent GPU machine (its image has CUDA torch + Triton; nothing can be installed
# from a registry there). Usage, from the repo root:
#   bash benchmarks/gpu_run.sh tests   # gpu-marked tests + the whole suite + `python -m fastvq check`
#   bash benchmarks/gpu_run.sh bench [op ...]   # `python -m fastvq bench` (all ops, or the ones named)
# Results go to $OUT (the device tool's folder) when set, else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
case "${1:-}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.log"
    python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -5 | tee -a "$out/gpu-tests.log"
    python3 -m fastvq check 2>&1 | tee "$out/check.log"
    ;;
  bench)
    shift
    python3 -m fastvq bench --out "$out" ${1:+--ops "$@"} 2>&1 | tee "$out/bench.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_run.sh tests | bench [op ...]" >&2
    exit 2
    ;;
esac
