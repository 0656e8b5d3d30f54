#!/usr/bin/env bash
# scripts/phase_timing.sh BUILD LOGS: the last step of `make gpu-check`. Waits for the phase
# timer's build that gpu_check.sh started in the background (RNNFUSED_PHASE_TIMING=1, into
# BUILD/lib; it writes its exit status to BUILD/status), then runs python -m bench.phases on
# that build, writing LOGS/phases/phases.csv: the planner's tilings and the three it is weighed
# against most (W in shared memory, clusters of at most 8, no clusters), within the step's time. The timer lives in a build of its own so that the
# tests and benchmarks before it run the kernels without it.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$1
LOGS=$2
PYTHON=${PYTHON:-python3}
until [ -f "$BUILD/status" ]; do sleep 2; done
status=$(cat "$BUILD/status")
if [ "$status" != 0 ]; then
  echo "phase_timing: the RNNFUSED_PHASE_TIMING=1 build failed (exit $status):"
  tail -30 "$LOGS/phase-timing-build.log"
  exit 1
fi
# build_ext put the extension (and _build_info.py) in BUILD/lib/rnnfused; the Python sources
# come from the checkout. Run from BUILD/lib so that `import rnnfused` finds this build first.
cp -n "$ROOT"/rnnfused/*.py "$BUILD/lib/rnnfused/"
cd "$BUILD/lib" && PYTHONPATH="$BUILD/lib:$ROOT" "$PYTHON" -m bench.phases --repeats 3 \
  --tilings model,shared_w,portable,grid --out "$LOGS/phases"
