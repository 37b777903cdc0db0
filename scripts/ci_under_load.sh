#!/usr/bin/env bash
# CI on a busy machine: clone HEAD fresh (beside a link to ../shared, as CI checks out),
# occupy every core with a busy loop, and run .ci/run RUNS times in a row (default 3).
# Usage: scripts/ci_under_load.sh [RUNS]; logs and a summary in $OUT (default /tmp/ci_under_load).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
OUT=${OUT:-/tmp/ci_under_load}
rm -rf "$OUT" && mkdir -p "$OUT"
ln -s "$(cd .. && pwd)/shared" "$OUT/shared"
git clone -q . "$OUT/main"
hogs=()
for _ in $(seq "$(nproc)"); do python3 -c 'while True: pass' & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
failed=0
for run in $(seq "$RUNS"); do
  start=$(date +%s)
  (cd "$OUT/main" && .ci/run) > "$OUT/run$run.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "run $run: exit $rc, $(( $(date +%s) - start )) s, $(grep -E '(passed|failed)' "$OUT/run$run.log" | tail -1)" | tee -a "$OUT/summary.txt"
done
exit $failed
