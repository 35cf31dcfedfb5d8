#!/usr/bin/env bash
# One task per host; process 0's host is the coordinator.
#   sbatch --nodes=4 --ntasks-per-node=1 launch/slurm.sh --config=configs/rapd.py --workdir=/shared/run
#SBATCH --job-name=infdiff
set -euo pipefail
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun python -m infdiff.main --coordinator_address="${head}:${PORT:-12355}" \
  --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID" "$@"
