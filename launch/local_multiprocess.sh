#!/usr/bin/env bash
# Runs N training processes on this machine, talking through jax.distributed on
# 127.0.0.1 (CPU collectives: gloo). The same flags work on a cluster with the
# coordinator's address; see launch/slurm.sh.
#   launch/local_multiprocess.sh 2 --config=configs/rapd.py:demo --workdir=runs/mp
set -euo pipefail
n=${1:?number of processes}; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  python -m infdiff.main --coordinator_address="127.0.0.1:${port}" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
