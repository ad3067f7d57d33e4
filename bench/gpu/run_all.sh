#!/usr/bin/env bash
# Everything the GPU machine does in one call (GPU time is scarce): build (or use binaries built
# elsewhere), the GPU tests, the GPU tests under compute-sanitizer, `kvcache bench ops --device
# cuda`. Logs and JSON go to $OUT (at most 8 files come back from the device tool).
#   bench/gpu/run_all.sh [build] [test] [serving] [sanitize] [bench] [quick-bench] [demo]
#   (default: build test sanitize bench)
# Env: GPU_TEST_FILTER (gtest filter, default all), BENCH_FILTER (bench ops --filter), SANITIZE_FILTER (default: the GPU tests minus
# the slow dtype sweeps), BIN (a folder with prebuilt cuda_tests and kvcache: used when they run
# here, else the script builds), BUILD (build folder, default build-gpu).
# Building here needs copies of GoogleTest and xxhash.h in .gtest/ and .xxhash/ (the GPU machine
# has neither; see docs/ARCHITECTURE.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kvcache-gpu}
BUILD=${BUILD:-build-gpu}
BIN=${BIN:-.gpu-bin}
FILTER=${GPU_TEST_FILTER:-*}
# (the out-of-memory test is left out: its intended failed cudaMalloc counts as a sanitizer error)
SANITIZE_FILTER=${SANITIZE_FILTER:-*-CudaAttention.DecodeEveryKVDTypeAndHeadDim:CudaAttention.GqaRatiosLayoutsAndOddPages:CudaBuffer.OutOfMemoryIsResourceExhausted}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
status=0
has() { for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
log() { echo "$*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader \
  | tee -a "$OUT/summary.txt"
TESTS="$BIN/cuda_tests"
CLI="$BIN/kvcache"
if has build; then
  if [ -x "$TESTS" ] && "$TESTS" --gtest_list_tests > /dev/null 2>&1 && "$CLI" --help > /dev/null 2>&1; then
    log "build: using prebuilt binaries in $BIN"
  else
    log "build: prebuilt binaries missing or not runnable here; building"
    t0=$(date +%s)
    cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVCACHE_CUDA=ON -DKVCACHE_WERROR=ON \
      -DKVCACHE_GTEST_SOURCE_DIR="$PWD/.gtest" -DKVCACHE_XXHASH_INCLUDE_DIR="$PWD/.xxhash" \
      > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    cmake --build "$BUILD" -j "$(nproc)" --target cuda_tests serving_tests kvcache_cli \
      >> "$OUT/build.log" 2>&1 \
      || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
    TESTS="$BUILD/tests/cuda_tests"
    CLI="$BUILD/tools/kvcache/kvcache"
    log "build: ok in $(( $(date +%s) - t0 )) s"
  fi
fi
if has test; then
  "$TESTS" --gtest_filter="$FILTER" > "$OUT/cuda_tests.log" 2>&1 || status=1
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |tests ran" "$OUT/cuda_tests.log" | sort | uniq -c | head -40 \
    | tee -a "$OUT/summary.txt"
  grep -B2 -A14 "Failure" "$OUT/cuda_tests.log" | head -150
fi
if has serving; then
  "$(dirname "$TESTS")/serving_tests" --gtest_filter='*Cuda*' > "$OUT/serving_tests.log" 2>&1 || status=1
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK" "$OUT/serving_tests.log" | tee -a "$OUT/summary.txt"
  grep -B2 -A14 "Failure" "$OUT/serving_tests.log" | head -60
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 "$TESTS" --gtest_filter="$SANITIZE_FILTER" \
      > "$OUT/sanitize_$tool.log" 2>&1 || status=1
    log "compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1) $(grep -cE '^\[       OK' "$OUT/sanitize_$tool.log") tests ok"
  done
fi
if has bench || has quick-bench; then
  quick=(); has quick-bench && quick=(--quick)
  [ -n "${BENCH_FILTER:-}" ] && quick+=(--filter "$BENCH_FILTER")
  "$CLI" bench ops --device cuda "${quick[@]}" --json "$OUT/bench_cuda.json" \
    > "$OUT/bench_cuda.txt" 2>&1 || status=1
  cat "$OUT/bench_cuda.txt"
fi
if has demo; then
  "$CLI" demo --device cuda --conversations 16 --turns 2 --verify all \
    > "$OUT/demo_cuda.txt" 2>&1 || status=1
  tail -30 "$OUT/demo_cuda.txt"
fi
exit $status
