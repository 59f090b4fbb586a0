#!/usr/bin/env bash
# Validate and benchmark fastvq on a GPU in one command (one call of a lent GPU machine, <= 8 min):
#
#   bash benchmarks/gpu_run.sh             # on a CUDA machine, from the repo root (no install needed)
#   bash benchmarks/gpu_run.sh --dry-run   # the same steps on CPU under the Triton interpreter (about a minute)
#
# Steps, lightest first so that a time limit loses the least:
#   1. environment (GPU, driver, python/torch/triton versions, git sha)   -> env.txt
#   2. the whole test suite on CUDA tensors (no -x; a per-test timeout)    -> tests.log, tests.xml (junit)
#   3. python -m fastvq check (every op vs float64, fastvq.testing bounds) -> check.txt
#   4. python -m fastvq bench at the README shapes, row groups by weight: op rows, then training
#      steps, then peer packages (skipped when not installed)            -> bench.json, bench.md, bench.png, bench.log
# into benchmarks/results/<date>-<gpu slug>/ (under $OUT instead when the device tool sets it): 8 files.
# The git sha comes from $FASTVQ_GIT_SHA when the tree has no .git (a copy sent to a GPU machine).
# Exit status: 0 when the tests and the check passed, 1 otherwise (the bench never fails the run).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--dry-run]" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
START=$(date +%s)
TOTAL_S=${FASTVQ_GPU_RUN_S:-470}      # the whole run, inside the 8 minutes
TESTS_S=${FASTVQ_TESTS_S:-270}        # the test suite
CHECK_S=${FASTVQ_CHECK_S:-100}        # the check (every launcher, each dtype: ~30 compiles more than before)
PER_TEST_S=${FASTVQ_PER_TEST_S:-90}   # one test

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 FASTVQ_ONE_PER_FILE=1
  TESTS_S=150; CHECK_S=60; PER_TEST_S=60   # guards only: the dry run takes about a minute on 2 cores
  SLUG=dry-run-cpu
else
  SLUG=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-cuda')" 2>/dev/null \
         | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9._' '-' | sed 's/^-*//; s/-*$//')
  SLUG=${SLUG:-unknown-gpu}
fi
DIR="${OUT:-benchmarks/results}/$(date -u +%Y-%m-%d)-$SLUG"
mkdir -p "$DIR"
echo "fastvq gpu_run: results in $DIR"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# ---- 1. environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: ${FASTVQ_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "host: $(uname -srm); cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //'); cores: $(nproc)"
  [ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import importlib.util, platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
for name in ("pytest", "pytest_timeout", "xdist", "matplotlib", "tqdm", "vector_quantize_pytorch"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
EOF
} 2>&1 | tee "$DIR/env.txt"

# ---- 2. tests: the whole suite (on CUDA tensors with CUDA), a per-test timeout, junit XML
TEST_ARGS=(-q -p no:cacheprovider -rfE --junitxml="$DIR/tests.xml" --deselect tests/test_cuda_compile.py)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TEST_ARGS+=(--timeout="$PER_TEST_S")
else
  export FASTVQ_TEST_TIMEOUT="$PER_TEST_S"   # tests/conftest.py's SIGALRM fallback
fi
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  TEST_ARGS+=(-n 8)                          # compiling the kernels is the cost: spread it over CPU cores
fi
[ "$DRY" = 1 ] && TEST_ARGS+=(--deselect tests/test_gpu_run.py --deselect tests/nn/test_distributed.py)
echo "== tests (at most ${TESTS_S}s): pytest ${TEST_ARGS[*]}"
timeout -k 10 "$TESTS_S" "$PY" -m pytest "${TEST_ARGS[@]}" tests > "$DIR/tests.log" 2>&1
TESTS_RC=$?
tail -n 15 "$DIR/tests.log"
[ "$TESTS_RC" = 124 ] && echo "tests: stopped at the ${TESTS_S}s limit (tests.xml may be missing; tests.log has the progress)"

# ---- 3. check
CHECK_ARGS=()
[ "$DRY" = 1 ] && CHECK_ARGS=(--ops pairwise_sqdist rotation_trick --dtypes float32 bfloat16)
echo "== check (at most ${CHECK_S}s)"
timeout -k 10 "$CHECK_S" "$PY" -m fastvq check "${CHECK_ARGS[@]}" 2>&1 | tee "$DIR/check.txt"
CHECK_RC=${PIPESTATUS[0]}

# ---- 4. bench: op rows, then training steps, then peers (registry order); a cut-short run keeps its rows
BENCH_S=$(left)
BENCH_ARGS=(--out "$DIR" --name bench)
[ "$DRY" = 1 ] && BENCH_ARGS+=(--ops pairwise_sqdist vector_quantizer_step --providers reference --no-check) && BENCH_S=60
if [ "$BENCH_S" -gt 15 ]; then
  echo "== bench (at most ${BENCH_S}s)"
  timeout -k 10 "$BENCH_S" "$PY" -m fastvq bench "${BENCH_ARGS[@]}" > "$DIR/bench.log" 2>&1
  echo "bench exit status $? (124/130: cut short at the time limit, rows so far kept)"
  grep -v '^bench:' "$DIR/bench.log" | tail -n 40
else
  echo "== bench skipped: no time left" | tee "$DIR/bench.log"
fi

echo "== done in $(( $(date +%s) - START ))s: tests exit $TESTS_RC, check exit $CHECK_RC; files:"
ls -1 "$DIR"
[ "$TESTS_RC" = 0 ] && [ "$CHECK_RC" = 0 ]
