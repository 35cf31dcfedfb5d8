"""Command-line overrides that shrink configs/rapd.py:demo for subprocess tests."""

import os

STAGE1 = [
    "--config.rapd_stage1.enc_size=16",
    "--config.rapd_stage1.target_window=16",
    "--config.rapd_stage1.renderer.dim=16",
    "--config.rapd_stage1.renderer.depth=2",
    "--config.rapd_stage1.encoder.n_resblocks=1",
    "--config.rapd_stage1.batch_size=4",
    "--config.rapd_stage1.stats_images=8",
    "--config.rapd_stage1.stats_batch_size=4",
    "--config.data.num_threads=1",
]
STAGE1_ONLY = ["--config.stages=('rapd_stage1',)", *STAGE1]


def steps(n: int) -> list[str]:
  """n steps for every stage (the demo's stage 1 otherwise runs 3 * total_steps)."""
  return [f"--config.total_steps={n}", f"--config.rapd_stage1.total_steps={n}"]


def subprocess_env() -> dict:
  """One CPU device per subprocess (faster start than the 8 simulated ones)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def kill_after_checkpoint(cmd, ckdir, n: int, cwd: str, timeout: float = 300):
  """Runs `cmd`, SIGKILLs it as soon as checkpoint step n is committed in `ckdir`.

  Returns (returncode, sorted saved steps). Polls tightly: a tiny run takes milliseconds
  per step, so there is no way to slow only the steps after the checkpoint.
  """
  import signal
  import subprocess
  import time

  proc = subprocess.Popen(
      cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if (ckdir / str(n)).is_dir() and not any(
        ".orbax-checkpoint-tmp" in p for p in os.listdir(ckdir)
    ):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  return proc.returncode, sorted(int(s) for s in os.listdir(ckdir) if s.isdigit())
