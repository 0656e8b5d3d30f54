#!/usr/bin/env bash
# `make gpu-check`: what the GPU machine must confirm, in one call of about 5 minutes.
# Builds for sm_90 with every core, runs the CUDA tests (and the rest of the suite),
# compute-sanitizer memcheck and racecheck on a small case of every kernel, and a short
# benchmark against cuDNN at the fastrnns config; prints a short table last.
# Logs go to $OUT (the device tool's folder) or results/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-results/gpu-check}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

echo "== build (sm_${RNNFUSED_CUDA_ARCHS:-90}, $(nproc) jobs)"
if ! RNNFUSED_CUDA_ARCHS=${RNNFUSED_CUDA_ARCHS:-90} MAX_JOBS=$(nproc) RNNFUSED_REQUIRE_CUDA_BUILD=1 \
    $PYTHON setup.py build_ext --inplace >"$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== tests"
timeout 300 $PYTHON -m pytest -q -p no:cacheprovider tests >"$LOGS/tests.log" 2>&1 || status=1
grep -E "passed|failed|error" "$LOGS/tests.log" | tail -15

echo "== compute-sanitizer"
# memcheck watches every kernel (cuBLAS reading out of bounds would be our wrong ld);
# racecheck (shared-memory hazards) only ours: cuBLAS's shared memory is not ours to check.
for tool in memcheck racecheck; do
  filter=()
  [ "$tool" = racecheck ] && filter=(--kernel-name kns=for_each_kernel)
  if timeout 240 compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 1 \
      $PYTHON scripts/sanitize_case.py >"$LOGS/sanitize-$tool.log" 2>&1; then
    echo "$tool: clean ($(grep -c '^ran ' "$LOGS/sanitize-$tool.log") cases)"
  else
    echo "$tool: FAILED (exit $?)"
    grep -E "=========" "$LOGS/sanitize-$tool.log" | head -20
    status=1
  fi
done

echo "== benchmark (vs cuDNN, fastrnns T100 B64 I512 H512)"
timeout 240 $PYTHON -m bench --suite gpu-check --repeats 20 --out "$LOGS/bench" >"$LOGS/bench.log" 2>&1 || status=1
grep -E "^date|^config|^-" "$LOGS/bench.log" | head -3
grep -E " (rnnfused|torch|torch_native) " "$LOGS/bench.log"
echo "gpu-check: $([ $status = 0 ] && echo OK || echo FAILED)"
exit $status
