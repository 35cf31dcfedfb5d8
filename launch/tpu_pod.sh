#!/usr/bin/env bash
# On a Cloud TPU pod slice jax.distributed discovers its peers itself: run the same
# command on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd infdiff && bash launch/tpu_pod.sh --config=configs/rapd.py --workdir=gs://bucket/run"
set -euo pipefail
python -c "import jax; jax.distributed.initialize()" >/dev/null 2>&1 || true
exec python -m infdiff.main "$@"
