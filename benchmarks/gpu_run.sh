#!/usr/bin/env bash
# Validate and benchmark fastvq on a GPU in one command (one call of a lent GPU machine, <= 8 min):
#
#   bash benchmarks/gpu_run.sh             # on a CUDA machine, from the repo root (no install needed)
#   bash benchmarks/gpu_run.sh --dry-run   # the same steps on CPU under the Triton interpreter (about a minute)
#
# Steps (the environment first, then the order $FASTVQ_STEPS names, default "tests check bench"):
#   env    environment (GPU, driver, python/torch/triton versions, git sha)   -> env.txt
#   tests  the whole test suite on CUDA tensors (no -x; a per-test timeout)    -> tests.log, tests.xml (junit)
#   check  python -m fastvq check (every op vs float64, fastvq.testing bounds) -> check.txt
#   bench  python -m fastvq bench at the README shapes, row groups by weight: op rows, then training
#          steps, then peer packages (skipped when not installed)            -> bench.json, bench.md, bench.png, bench.log
# into benchmarks/results/<date>-<gpu slug>/ (under $OUT instead when the device tool sets it): 8 files.
# $FASTVQ_BENCH_OPS (space-separated) / $FASTVQ_BENCH_PROVIDERS (comma-separated: names hold spaces)
# pass --ops / --providers to the bench, $FASTVQ_MATMUL_PRECISION (highest, high) --matmul-precision,
# $FASTVQ_BENCH_S caps its seconds;
# a bench cut short at its time limit keeps the rows it measured (in run order).
# The git sha comes from $FASTVQ_GIT_SHA when the tree has no .git (a copy sent to a GPU machine).
# Exit status: 0 when the tests and the check passed (or were not asked for), 1 otherwise (the bench
# never fails the run).
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
BENCH_CAP_S=${FASTVQ_BENCH_S:-}      # the bench (default: what is left of TOTAL_S)

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

# ---- environment
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

TESTS_RC=0
CHECK_RC=0

run_tests() {  # the whole suite (on CUDA tensors with CUDA), a per-test timeout, junit XML
  local args=(-q -p no:cacheprovider -rfE --junitxml="$DIR/tests.xml" --deselect tests/test_cuda_compile.py)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    args+=(--timeout="$PER_TEST_S")
  else
    export FASTVQ_TEST_TIMEOUT="$PER_TEST_S"   # tests/conftest.py's SIGALRM fallback
  fi
  if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    local n=$(( $(nproc) - 2 )); [ "$n" -lt 2 ] && n=2; [ "$n" -gt 14 ] && n=14
    args+=(-n "$n")                            # compiling the kernels is the cost: spread it over CPU cores
  fi
  [ "$DRY" = 1 ] && args+=(--deselect tests/test_gpu_run.py --deselect tests/nn/test_distributed.py --deselect tests/nn/test_distprobe.py)
  echo "== tests (at most ${TESTS_S}s): pytest ${args[*]}"
  timeout -s INT -k 30 "$TESTS_S" "$PY" -m pytest "${args[@]}" tests > "$DIR/tests.log" 2>&1
  TESTS_RC=$?
  tail -n 15 "$DIR/tests.log"
  [ "$TESTS_RC" = 124 ] && echo "tests: stopped at the ${TESTS_S}s limit (interrupted: the failures so far are in tests.log, tests.xml when pytest wrote it)"
}

run_check() {
  local args=()
  [ "$DRY" = 1 ] && args=(--ops pairwise_sqdist rotation_trick --dtypes float32 bfloat16)
  echo "== check (at most ${CHECK_S}s)"
  timeout -k 10 "$CHECK_S" "$PY" -m fastvq check "${args[@]}" 2>&1 | tee "$DIR/check.txt"
  CHECK_RC=${PIPESTATUS[0]}
}

run_bench() {  # op rows, then training steps, then peers (registry order); a cut-short run keeps its rows
  local s; s=$(left)
  [ -n "${BENCH_CAP_S:-}" ] && [ "$BENCH_CAP_S" -lt "$s" ] && s=$BENCH_CAP_S
  local args=(--out "$DIR" --name bench)
  [ -n "${FASTVQ_BENCH_OPS:-}" ] && read -r -a ops <<< "$FASTVQ_BENCH_OPS" && args+=(--ops "${ops[@]}")
  [ -n "${FASTVQ_BENCH_PROVIDERS:-}" ] && IFS=, read -r -a provs <<< "$FASTVQ_BENCH_PROVIDERS" && args+=(--providers "${provs[@]}")
  [ -n "${FASTVQ_MATMUL_PRECISION:-}" ] && args+=(--matmul-precision "$FASTVQ_MATMUL_PRECISION")
  [ "$DRY" = 1 ] && args+=(--ops pairwise_sqdist vector_quantizer_step --providers reference --no-check) && s=60
  if [ "$s" -gt 15 ]; then
    echo "== bench (at most ${s}s)"
    timeout -k 10 "$s" "$PY" -m fastvq bench "${args[@]}" > "$DIR/bench.log" 2>&1
    echo "bench exit status $? (124/130: cut short at the time limit, rows so far kept)"
    grep -v '^bench:' "$DIR/bench.log" | tail -n 40
  else
    echo "== bench skipped: no time left" | tee "$DIR/bench.log"
  fi
}

for step in ${FASTVQ_STEPS:-tests check bench}; do
  case "$step" in
    tests) run_tests ;;
    check) run_check ;;
    bench) run_bench ;;
    *) echo "unknown step '$step' in FASTVQ_STEPS (tests, check, bench)" >&2; exit 2 ;;
  esac
done

echo "== done in $(( $(date +%s) - START ))s: tests exit $TESTS_RC, check exit $CHECK_RC; files:"
ls -1 "$DIR"
[ "$TESTS_RC" = 0 ] && [ "$CHECK_RC" = 0 ]
