#!/usr/bin/env bash
# `make gpu-check`: the one prepared call on the GPU machine (10 minutes per command there).
# Builds the CUDA kernels for this GPU, then runs only what needs the GPU: the CUDA tests
# and the build test, compute-sanitizer on a small case of every kernel (stepwise and
# persistent) and a larger one of the persistent kernel, the barrier microbenchmark, a short
# benchmark of the stepwise and the persistent kernels against cuDNN, and last the persistent
# kernel's per-phase times (python -m bench.phases) from a second build with the phase timer,
# made in the background while the GPU steps run. It ends within GPU_CHECK_SECONDS (default 540).
#
# It fails loudly: no GPU, a failed build, a build without CUDA kernels, or a CUDA test that
# could not run (RNNFUSED_REQUIRE_CUDA=1 turns their skips into errors) is FAILED, never OK.
# compute-sanitizer is SKIPPED where it is missing or does not support the device. The
# summary, with every FAILED/ERROR line, is printed last, also after a step ran out of time.
# Logs go to $OUT (the device tool's folder) or results/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-results/gpu-check}
BUDGET=${GPU_CHECK_SECONDS:-540}
START=$SECONDS
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY=()

note() { SUMMARY+=("$1"); }

# OK only when the script ran to its end and no line of the summary says otherwise.
COMPLETED=0
finish() {
  local verdict=OK
  printf '%s\n' "${SUMMARY[@]}" | grep -qE "FAILED|ERROR|TIMEOUT|NOT RUN" && verdict=FAILED
  if [ "$COMPLETED" != 1 ]; then
    note "gpu-check stopped before its end (exit $1)"
    verdict=FAILED
  fi
  {
    echo "== summary ($((SECONDS - START)) s)"
    printf '%s\n' "${SUMMARY[@]}"
    echo "gpu-check: $verdict"
  } | tee "$LOGS/summary.txt"
  [ $verdict = OK ]
}
trap 'finish $?; exit $?' EXIT

# step NAME LIMIT LOG COMMAND...: runs COMMAND for at most LIMIT seconds or what is left of
# the budget, appends its output to LOG, notes the outcome. Returns the command's status.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    note "$name: NOT RUN (out of time)"
    return 124
  fi
  echo "== $name (at most ${limit}s)"
  echo "== $name: $*" >>"$log"
  local begin=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  if ((rc == 0)); then
    note "$name: OK ($((SECONDS - begin)) s)"
  elif ((rc == 124 || rc == 137)); then
    note "$name: TIMEOUT after ${limit} s (log: $log)"
  else
    note "$name: FAILED (exit $rc, $((SECONDS - begin)) s, log: $log)"
  fi
  return $rc
}

echo "== device"
if ! $PYTHON -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "device: FAILED: no usable GPU (torch.cuda.is_available() is False); nothing was built or run"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "host compiler: $(command -v "${CXX:-c++}") $("${CXX:-c++}" --version 2>/dev/null | head -1)"
ARCH=${RNNFUSED_CUDA_ARCHS:-$($PYTHON -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")}
note "device: $($PYTHON -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)")"

if ! step "build (sm_$ARCH, $(nproc) jobs)" 300 "$LOGS/build.log" \
    env RNNFUSED_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" RNNFUSED_REQUIRE_CUDA_BUILD=1 \
    $PYTHON setup.py build_ext --inplace; then
  tail -30 "$LOGS/build.log"
  exit 1
fi
if ! $PYTHON -c "import sys, rnnfused; sys.exit(0 if 'cuda' in rnnfused.backends() else 1)"; then
  note "build: FAILED: rnnfused imports without its CUDA backend"
  exit 1
fi

# The phase timer's build (RNNFUSED_PHASE_TIMING=1) into a folder of its own, in the background
# at low priority while the GPU steps below run, bounded by what is left of the budget; the
# last step (scripts/phase_timing.sh) waits for it and runs python -m bench.phases on it.
TIMING_BUILD=$PWD/build/phase-timing
rm -rf "$TIMING_BUILD/status" "$TIMING_BUILD/lib"
mkdir -p "$TIMING_BUILD"
(
  timeout --kill-after=10 $((BUDGET - (SECONDS - START))) nice -n 10 \
    env RNNFUSED_PHASE_TIMING=1 RNNFUSED_CUDA_ARCHS="$ARCH" MAX_JOBS=$(($(nproc) / 2 + 1)) RNNFUSED_REQUIRE_CUDA_BUILD=1 \
    $PYTHON setup.py build_ext --build-lib "$TIMING_BUILD/lib" --build-temp "$TIMING_BUILD/tmp" \
    >"$LOGS/phase-timing-build.log" 2>&1
  echo $? >"$TIMING_BUILD/status"
) &

# Our kernels, not the dispatch's choice: an unverified build's `auto` runs cuDNN or the
# reference equations, and this run is what verifies it (RNNFUSED_KERNEL=ours: the persistent
# kernel wherever it plans). Tests of the dispatch set their own.
if step "CUDA tests" 200 "$LOGS/tests.log" env RNNFUSED_KERNEL=ours RNNFUSED_REQUIRE_CUDA=1 \
    RNNFUSED_REQUIRE_CUDA_BUILD=1 $PYTHON -m pytest -q -rfE -p no:cacheprovider -m "cuda or build" tests; then
  # Every CUDA test passed: record that this build's device code is verified on this
  # architecture (rnnfused/gpu_verified.json, copied to $OUT; commit it).
  step "verification record" 30 "$LOGS/record.log" $PYTHON scripts/record_gpu_run.py \
    "$(grep -E '[0-9]+ passed' "$LOGS/tests.log" | tail -1)"
  # The measured table auto reads (rnnfused/kernel_table.json, copied to $OUT; commit it).
  step "tune (ours vs cuDNN)" 150 "$LOGS/tune.log" $PYTHON -m bench.tune --budget 120 --out "$LOGS/tune"
  cp rnnfused/kernel_table.json "$LOGS/" 2>/dev/null
fi
note "  $(grep -E '[0-9]+ (passed|failed|error)' "$LOGS/tests.log" 2>/dev/null | tail -1)"
while IFS= read -r line; do note "  $line"; done < <(grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" 2>/dev/null | head -25)

step "barrier microbenchmark" 40 "$LOGS/barrier.log" $PYTHON -m bench.barrier

# rnnfused (auto: the dispatch, with this run's record and table), our kernels forced, and
# cuDNN, at fastrnns, latency_b1 and small_b16_h128 for LSTM and GRU in fp16, bf16 and fp32 (TF32).
step "benchmark vs cuDNN" 170 "$LOGS/bench.log" $PYTHON -m bench --suite gpu-check --tf32 on --repeats 10 \
  --warmup 3 --impls rnnfused,rnnfused_ours,torch --no-plot --no-progress --out "$LOGS/bench"
echo "== barriers"
cat "$LOGS/barrier.log" 2>/dev/null
echo "== benchmark table"
grep -E "^(config|-)|(rnnfused|rnnfused_ours|torch) " "$LOGS/bench.log" | head -80

SANITIZER=""
for candidate in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
    "$(command -v compute-sanitizer || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    SANITIZER=$candidate
    break
  fi
done
# memcheck over every kernel (cuBLAS reading out of bounds would be our wrong leading
# dimension), without torch's caching allocator so that a read past a buffer inside a cached
# segment is seen; initcheck for reads of memory nothing wrote; racecheck (shared memory)
# and synccheck (barriers) on the persistent kernels, the only ones with shared memory.
for check in memcheck initcheck racecheck synccheck; do
  if [ -z "$SANITIZER" ]; then
    note "compute-sanitizer $check: SKIPPED (compute-sanitizer not found)"
    continue
  fi
  options=(--report-api-errors no)
  script=(scripts/sanitize_case.py)
  if [ "$check" = racecheck ] || [ "$check" = synccheck ]; then
    options+=(--kernel-name kns=persistent)
    script+=(--persistent-only)
  fi
  log="$LOGS/sanitize.log"
  before=$(wc -l <"$log" 2>/dev/null || echo 0)
  if ! step "compute-sanitizer $check" 90 "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$check" "${options[@]}" --error-exitcode 1 $PYTHON "${script[@]}"; then
    if tail -n +"$((before + 1))" "$log" | grep -qiE "device not supported|not supported on this (device|platform)"; then
      unset 'SUMMARY[${#SUMMARY[@]}-1]'
      note "compute-sanitizer $check: SKIPPED (the sanitizer does not support this device)"
    else
      while IFS= read -r line; do note "  $line"; done < <(tail -n +"$((before + 1))" "$log" | grep -E "^=========" | head -12)
    fi
  fi
done

step "phase timing (bench.phases)" 90 "$LOGS/phases.log" env PYTHON="$PYTHON" scripts/phase_timing.sh \
  "$TIMING_BUILD" "$LOGS"
echo "== phases (us per step; begin, end, kernel: us per launch)"
grep -vE "^== " "$LOGS/phases.log" 2>/dev/null | tail -40

COMPLETED=1
