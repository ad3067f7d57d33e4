#!/usr/bin/env bash
# ncu summaries of the attention kernel of single bench cases: for each FILTER argument, the second
# attention launch of `kvcache bench ops --device cuda --filter FILTER` (the first case that
# matches), with the speed-of-light, memory, warp-state, scheduler and occupancy sections.
#   bench/gpu/ncu_cases.sh CLI FILTER...     (reports: $OUT/ncu_<n>.txt)
set -uo pipefail
OUT=${OUT:-/tmp/kvcache-gpu}
CLI=$1
shift
mkdir -p "$OUT"
n=0
for f in "$@"; do
  n=$((n + 1))
  ncu --clock-control none -k regex:attention --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section Occupancy -c 1 --launch-skip 1 \
    "$CLI" bench ops --device cuda --filter "$f" --repeats 2 > "$OUT/ncu_$n.txt" 2>&1
  echo "== $f"
  grep -E "^  [a-z].*attention|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Eligible Warps|Warp Cycles Per Issued|Achieved Occupancy|L1/TEX Hit|L2 Hit" "$OUT/ncu_$n.txt"
done
