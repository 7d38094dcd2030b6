#!/usr/bin/env bash
# The GPU check (issue 35), one call of the device tool on a lent machine
# (one H100 or H200; its image has PyTorch and JAX with CUDA, Python 3.12,
# neither Keras nor TensorFlow, and no network). See docs/benchmarks.md,
# "On a lent GPU", for the call. In order:
#
# 1. install: the wheels benchmarks/gpu_wheels.sh downloaded (carried in
#    gpu_wheels/), offline, and keras_norms itself (editable, no deps);
# 2. devices: what JAX, PyTorch and Keras see; stops unless both put
#    tensors on a GPU;
# 3. tests: the backend-independent tests on JAX and on PyTorch, the two
#    backends at once (WORKERS pytest-xdist workers each, JAX allocating
#    GPU memory as it goes, not 75% of it per process); failures are rerun
#    once with TF32 off, to tell TF32 rounding from real failures;
# 4. bench: benchmarks/run.py (its 4-D case at 64x56x56x64 NHWC and its 2-D
#    case, 256x1024; 5 blocks of 20 steps) and benchmarks/cbn_speed.py
#    (64x56x56x64, --profile) on each backend, one after the other.
#
# Each step has a time limit and the whole a deadline (540 s), so that one
# call (600 s at most) returns what ran. Under $OUT (8 files at most come
# back): log.txt, summary.txt (printed last), env.txt, junit-jax.xml,
# junit-torch.xml, bench.md, run.json, cbn_speed.json.
#
# Settings (environment):
#   GPU_CHECK_ALLOW_CPU=1   go on without a GPU (to try the script here)
#   GPU_CHECK_QUICK=1       smoke sizes, two test files, one worker
#   GPU_CHECK_STAGES        default "install devices tests bench"
#   GPU_CHECK_BACKENDS      default "jax torch"
#   GPU_CHECK_TESTS         test paths (default: the list below)
#   GPU_CHECK_WORKERS       pytest-xdist workers per backend (default 8)
#   GPU_CHECK_DEADLINE      seconds for the whole script (default 540)
#   GPU_CHECK_WHEELS        the wheel folder (default gpu_wheels)
#   PYTHON                  the interpreter (default python3)
#   OUT                     where results go (default /tmp/gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WHEELS=${GPU_CHECK_WHEELS:-gpu_wheels}
STAGES=${GPU_CHECK_STAGES:-install devices tests bench}
BACKENDS=${GPU_CHECK_BACKENDS:-jax torch}
DEADLINE=${GPU_CHECK_DEADLINE:-540}
QUICK=${GPU_CHECK_QUICK:-0}
TMP=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
exec > >(tee -a "$OUT/log.txt") 2>&1
trap 'echo "gpu_check.sh: stopped by an error at line $LINENO"' ERR
trap 'rm -rf "$TMP"' EXIT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore TF_CPP_MIN_LOG_LEVEL=2

# The backend-independent tests of .ci/run's JAX and PyTorch list: layers,
# callbacks, serialization, recurrent, bad batches and the float64
# references (statistics, linear layers' derivatives).
TESTS=${GPU_CHECK_TESTS:-tests/layers tests/callbacks tests/test_stats.py \
tests/test_linear.py tests/test_serialization.py tests/test_recurrent.py \
tests/test_bad_batches.py}
if [[ $QUICK == 1 ]]; then
  TESTS=${GPU_CHECK_TESTS:-tests/test_linear.py tests/test_serialization.py}
  WORKERS=${GPU_CHECK_WORKERS:-1}
  RUN_ARGS=(--tiny --cases 4d_nhwc,2d --shape 4d_nhwc=2x8x8x8 --rounds 2
    --repeats 1)
  CBN_ARGS=(--tiny --profile)
  # time limits (s): tests, their TF32-off rerun, run.py, cbn_speed.py
  T_TESTS=240 T_RERUN=60 T_RUN=120 T_CBN=60
else
  WORKERS=${GPU_CHECK_WORKERS:-8}
  RUN_ARGS=(--cases 4d_nhwc,2d --shape 4d_nhwc=64x56x56x64 --rounds 20
    --repeats 5)
  CBN_ARGS=(--batch 64 --size 56 --channels 64 --profile)
  T_TESTS=200 T_RERUN=45 T_RUN=90 T_CBN=40
fi

say() { echo "== [$((SECONDS - START)) s] $*"; }
note() { echo "$*" >>"$SUMMARY"; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# The limit of a step: $1 seconds, or what is left before the deadline
# (0: no time left, skip it).
limit() {
  local left=$((DEADLINE - (SECONDS - START)))
  if ((left < 15)); then echo 0; elif ((left < $1)); then echo "$left"; else
    echo "$1"
  fi
}

# timeout sends SIGINT first: pytest then still writes its report, and
# the benchmarks print their traceback.
timed() {
  local seconds=$1
  shift
  timeout -s INT -k 15 "$seconds" "$@"
}

note "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), on $(hostname)"
if command -v nvidia-smi >/dev/null; then
  note "$(nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>&1)"
fi

if has_stage install; then
  say "install (offline, from $WHEELS/)"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" \
    -r "$WHEELS/requirements.txt"
  # Editable, no deps; setuptools for its build comes from the folder too.
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps -e .
  "$PY" -m pip list >"$OUT/env.txt" 2>&1
  note "installed: $(grep -iE '^(keras|jax|jaxlib|torch|numpy) ' \
    "$OUT/env.txt" | tr -s ' ' | paste -sd ',' -)"
fi

if has_stage devices; then
  for b in $BACKENDS; do
    say "devices: $b"
    rc=0
    KERAS_BACKEND=$b "$PY" benchmarks/gpu_report.py devices \
      >"$TMP/devices-$b.txt" 2>&1 || rc=$?
    cat "$TMP/devices-$b.txt"
    grep -v '^WARNING\|^I0000\|^E0000' "$TMP/devices-$b.txt" |
      sed "s/^/$b: /" >>"$SUMMARY" || true
    if ((rc == 3)) && [[ ${GPU_CHECK_ALLOW_CPU:-0} == 1 ]]; then
      note "$b: no GPU, going on (GPU_CHECK_ALLOW_CPU=1)"
    elif ((rc != 0)); then
      note "$b: no GPU visible (or the check failed, rc $rc): stopping;" \
        "GPU_CHECK_ALLOW_CPU=1 goes on without one"
      cat "$SUMMARY"
      exit 1
    fi
  done
fi

# The tests on backend $1 within $2 seconds, then the failures again with
# TF32 off (cuBLAS and cuDNN through NVIDIA_TF32_OVERRIDE, XLA's own
# kernels through JAX's matmul precision).
run_tests() {
  local b=$1 seconds=$2 rc=0
  # shellcheck disable=SC2086  # TESTS is a list of paths
  KERAS_BACKEND=$b XLA_PYTHON_CLIENT_PREALLOCATE=false timed "$seconds" \
    "$PY" -m pytest -q -n "$WORKERS" -o cache_dir="$TMP/cache-$b" \
    --basetemp="$TMP/pytest-$b" --junitxml="$OUT/junit-$b.xml" \
    --durations=10 $TESTS >"$TMP/tests-$b.log" 2>&1 || rc=$?
  echo "$rc" >"$TMP/rc-$b"
  local rerun
  rerun=$(limit "$T_RERUN")
  if ((rc == 1 && rerun > 0)); then
    # shellcheck disable=SC2086
    KERAS_BACKEND=$b XLA_PYTHON_CLIENT_PREALLOCATE=false \
      NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest \
      timed "$rerun" "$PY" -m pytest -q -n "$WORKERS" \
      -o cache_dir="$TMP/cache-$b" --basetemp="$TMP/pytest-$b-tf32off" \
      --last-failed --last-failed-no-failures none \
      --junitxml="$TMP/junit-$b-tf32-off.xml" $TESTS \
      >"$TMP/tests-$b-tf32-off.log" 2>&1 || true
  fi
}

seconds=$(limit "$T_TESTS")
if has_stage tests && ((seconds == 0)); then
  note "tests: skipped, no time left"
elif has_stage tests; then
  say "tests on $BACKENDS (at once), $WORKERS workers each, ${seconds} s at most"
  note "tests (${seconds} s limit, $WORKERS workers per backend): $TESTS"
  pids=()
  for b in $BACKENDS; do
    run_tests "$b" "$seconds" &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  for b in $BACKENDS; do
    for log in "$TMP/tests-$b.log" "$TMP/tests-$b-tf32-off.log"; do
      [[ -f $log ]] || continue
      say "$(basename "$log")"
      cat "$log"
    done
    rc=$(cat "$TMP/rc-$b" 2>/dev/null || echo "?")
    case $rc in
      0) verdict="all passed" ;; 1) verdict="FAILURES" ;;
      124 | 137) verdict="CUT OFF at the time limit" ;;
      *) verdict="pytest exit $rc" ;;
    esac
    note "$b tests: $verdict"
    "$PY" benchmarks/gpu_report.py junit "$OUT/junit-$b.xml" >>"$SUMMARY"
    if [[ -f $TMP/junit-$b-tf32-off.xml ]]; then
      note "$b: the failures rerun with TF32 off:"
      "$PY" benchmarks/gpu_report.py junit "$TMP/junit-$b-tf32-off.xml" \
        >>"$SUMMARY"
    fi
  done
fi

if has_stage bench; then
  for b in $BACKENDS; do
    seconds=$(limit "$T_RUN")
    say "benchmarks/run.py on $b (${seconds} s at most)"
    if ((seconds == 0)); then note "run.py $b: skipped, no time left"; else
      KERAS_BACKEND=$b timed "$seconds" "$PY" benchmarks/run.py \
        "${RUN_ARGS[@]}" --json "$TMP/run-$b.json" ||
        note "run.py $b: exit $? (124 or 137: cut off at ${seconds} s)"
    fi
  done
  for b in $BACKENDS; do
    seconds=$(limit "$T_CBN")
    say "benchmarks/cbn_speed.py on $b (${seconds} s at most)"
    if ((seconds == 0)); then note "cbn_speed.py $b: skipped, no time left"
    else
      KERAS_BACKEND=$b timed "$seconds" "$PY" benchmarks/cbn_speed.py \
        "${CBN_ARGS[@]}" --json "$TMP/cbn-$b.json" | tee "$TMP/cbn-$b.txt" ||
        note "cbn_speed.py $b: exit $? (124 or 137: cut off at ${seconds} s)"
    fi
  done
  KERAS_BACKEND=${BACKENDS%% *} "$PY" benchmarks/gpu_report.py bench \
    "$TMP" "$OUT" || note "the benchmark report failed"
  if [[ -f $OUT/bench.md ]]; then cat "$OUT/bench.md" >>"$SUMMARY"; fi
fi

note ""
note "$(ls "$OUT" | wc -l) files under \$OUT (8 come back at most);" \
  "$((SECONDS - START)) s in all"
say "summary"
cat "$SUMMARY"
