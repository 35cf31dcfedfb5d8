"""Two processes on 127.0.0.1 train a few data-parallel steps through jax.distributed."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import tiny

from infdiff import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    *tiny.STAGE1_ONLY,
    *tiny.steps(3),
    "--config.log_every=1",
    "--config.checkpoint_every=3",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_data_parallel(tmp_path):
  port = _free_port()
  env = tiny.subprocess_env()  # one CPU device per process: a 2-device global mesh
  procs = []
  for i in range(2):
    cmd = [
        sys.executable,
        "-m",
        "infdiff.main",
        "--config=configs/rapd.py:demo",
        f"--workdir={tmp_path}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *TINY,
    ]
    procs.append(
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
  errs = [p.communicate(timeout=600)[1].decode() for p in procs]
  for p, e in zip(procs, errs):
    assert p.returncode == 0, e[-3000:]
  state, step = ckpt_lib.restore_params_only(str(tmp_path / "rapd_stage1" / "checkpoints"))
  assert step == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  log = (tmp_path / "train.log").read_text()
  assert "step 3/3" in log
  assert "2 devices in 2 processes" in log
