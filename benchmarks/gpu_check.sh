#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests, then benchmark suites, then an A/B against a base tree,
# each stage under its own time limit so that a slow one cannot take the others' results with it.
# Everything lands in $OUT (the device tool brings it back); the last lines printed are the tables.
#
#   usage (from the repository root, on the GPU machine; .peers from ../shared/device/build_peers.sh):
#     OUT=/tmp/out TESTS="-k 'lora or MLP'" SUITES="targets" AB_BASE=.snap0 \
#       AB_CASES="1b 8 2048 none 0;8b 2 2048 none 0" bash benchmarks/gpu_check.sh
#   TESTS: pytest arguments for tests/kernels/ (empty: skip); SUITES: run.py suites (empty: skip);
#   AB_BASE / AB_CASES: a base tree and ';'-separated cases for benchmarks/ab.py (empty: skip);
#   T_TESTS, T_SUITES, T_AB: each stage's seconds (defaults 90, 300, 150); ROUNDS: A/B rounds (1).
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
peers="$PWD/.peers"
export PYTHONPATH="$PWD/src:$peers${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [ -n "${TESTS:-}" ]; then
  eval "timeout ${T_TESTS:-90} python3 -m pytest -q -p no:cacheprovider tests/kernels $TESTS" \
    > "$OUT/gpu-tests.txt" 2>&1
  tail -n 2 "$OUT/gpu-tests.txt"
fi
if [ -n "${SUITES:-}" ]; then
  # shellcheck disable=SC2086  # several suites, one word each
  timeout "${T_SUITES:-300}" python3 benchmarks/run.py $SUITES --out "$OUT" --timeout 150 \
    > "$OUT/suites.txt" 2>&1
  # a stopped run keeps its printed rows: rebuild its table from them (run.py --rows)
  ls "$OUT"/*.md > /dev/null 2>&1 || python3 benchmarks/run.py $SUITES --rows "$OUT/suites.txt" --out "$OUT" \
    > /dev/null 2>&1
  grep -h '^|' "$OUT"/*.md 2>/dev/null || tail -n 5 "$OUT/suites.txt"
fi
if [ -n "${AB_BASE:-}" ] && [ -n "${AB_CASES:-}" ]; then
  IFS=';' read -r -a cases <<< "$AB_CASES"
  timeout "${T_AB:-150}" python3 benchmarks/ab.py "$AB_BASE" --rounds "${ROUNDS:-1}" --out "$OUT/ab.jsonl" \
    "${cases[@]}" > "$OUT/ab.txt" 2>&1
  grep '^|' "$OUT/ab.txt" || tail -n 3 "$OUT/ab.txt"
fi
