#!/usr/bin/env bash
# A/B timing on the GPU machine: runs `bench ops --filter "$FILTER"` with each CLI binary given,
# round-robin for ROUNDS rounds (the card's state drifts between runs), and prints each row's
# median_us per binary side by side (results: $OUT/ab_<i>_<round>.txt).
#   FILTER=decode_attention bench/gpu/ab.sh CLI_A CLI_B [CLI_C ...]
# Env: FILTER (required), ROUNDS (default 1), DEVICE (default cuda), QUICK=1 for small shapes.
set -uo pipefail
OUT=${OUT:-/tmp/kvcache-gpu}
ROUNDS=${ROUNDS:-1}
mkdir -p "$OUT"
for n in $(seq 1 "$ROUNDS"); do
  i=0
  for cli in "$@"; do
    i=$((i + 1))
    "$cli" bench ops --device "${DEVICE:-cuda}" ${QUICK:+--quick} --filter "$FILTER" \
      > "$OUT/ab_${i}_$n.txt" 2>&1
  done
done
python3 - "$OUT" "$ROUNDS" "$#" <<'PY'
import sys
out, rounds, clis = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = {}
for i in range(1, clis + 1):
    for n in range(1, rounds + 1):
        for line in open(f"{out}/ab_{i}_{n}.txt").read().splitlines():
            cells = [c.strip() for c in line.split("  ") if c.strip()]
            if len(cells) < 6 or cells[0] == "op" or not cells[0].islower() or " " in cells[0]:
                continue
            key = " | ".join(cells[1:5] if cells[0].endswith("attention") else cells[:5])
            rows.setdefault(key, [[] for _ in range(clis)])[i - 1].append(cells[5])
for key, per in rows.items():
    print(key, "|", " | ".join(" ".join(v) for v in per))
PY
