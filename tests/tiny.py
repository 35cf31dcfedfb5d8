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
