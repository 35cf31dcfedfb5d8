#!/usr/bin/env bash
# Runs the five CPU benchmarks (about 20 minutes on a 2-core CPU) and prints a summary.
# Usage: benchmarks/run_all.sh [python]   (default: the python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python}"
export JAX_PLATFORMS=cpu
unset XLA_FLAGS  # one CPU device, as training and sampling run here
LOG="$(mktemp)"
echo "machine: $(nproc) cores; $(uptime)"
start=$SECONDS
for bench in step_efficiency liif_step resolution_scaling render_memory subsampling; do
  "$PY" -m "benchmarks.$bench" 2>/dev/null | tee -a "$LOG"
done
echo
echo "=== summary ($((SECONDS - start)) s; $(uptime | sed 's/.*load/load/')) ==="
grep -E "ratio|target|MISSED|met|^subsampling " "$LOG" | grep -vE "^ratio =|^step " || true
rm -f "$LOG"
