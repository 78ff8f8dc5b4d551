#!/usr/bin/env bash
# Runs the multi-process tests (pytest -m distributed) N times in a row beside one busy-loop process
# per core, and counts the passes that failed. A test that fails once in N runs is a bug to find, not
# to retry: this is how the distributed tests are shown stable.
#   usage: bash tests/stress_distributed.sh [N=20] [pytest selection, default: -m distributed]
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
shift || true
sel=("$@")
[ ${#sel[@]} -eq 0 ] && sel=(-m distributed)
busy=()
for _ in $(seq "$(nproc)"); do
  (while :; do :; done) &
  busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
failed=0
for i in $(seq "$n"); do
  if python3 -m pytest -q -p no:cacheprovider "${sel[@]}" > "/tmp/stress-pass-$i.log" 2>&1; then
    echo "pass $i: ok ($(tail -1 "/tmp/stress-pass-$i.log"))"
  else
    failed=$((failed + 1))
    echo "pass $i: FAILED, log in /tmp/stress-pass-$i.log ($(tail -1 "/tmp/stress-pass-$i.log"))"
  fi
done
echo "$failed of $n passes failed under $(nproc) busy loops: ${sel[*]}"
[ "$failed" -eq 0 ]
