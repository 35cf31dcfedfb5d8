"""Shared pieces of the benchmark scripts: timing, FLOP counts, demo runs built in-process.

Every benchmark reports ratios measured in one process (a number against a reference
timed the same way in the same run), because absolute times on a shared CPU mean little.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg: str = "demo"):
  """configs/rapd.py:get_config(arg), loaded by path (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("rapd_cfg", os.path.join(ROOT, "configs/rapd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of `fn()` over `repeats` runs after `warmup` runs.

  `fn` must block on its own results (jax.block_until_ready) so the time covers the work,
  not only the asynchronous dispatch.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compiled_flops(jitted, *args) -> float:
  """FLOPs of one call of `jitted(*args)` from XLA's cost analysis of the compiled program."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0]
  return float(cost["flops"])


def matmul_bench(n: int = 1024):
  """(run, flops): a blocking float32 n x n @ n x n jnp.dot on this machine, compiled."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  flops = compiled_flops(dot, a, b)
  run = lambda: jax.block_until_ready(dot(a, b))
  run()
  return run, flops


def paired_rate(run, flops: float, repeats: int = 5, mm_n: int = 1024) -> dict:
  """Achieved FLOP/s of `run()` relative to the matmul, measured in alternation.

  Each repeat times the matmul (median of 3) right before `run`, and the ratio is taken
  per repeat, so load from other processes that drifts during the run affects both sides
  of each ratio alike. Returns medians: {'ratio', 'seconds', 'rate', 'mm_rate'}.
  """
  mm, mm_flops = matmul_bench(mm_n)
  run()  # warm-up
  ratios, secs, mm_rates = [], [], []
  for _ in range(repeats):
    mm_rate = mm_flops / median_time(mm, repeats=3, warmup=0)
    t0 = time.perf_counter()
    run()
    sec = time.perf_counter() - t0
    ratios.append(flops / sec / mm_rate)
    secs.append(sec)
    mm_rates.append(mm_rate)
  sec = statistics.median(secs)
  return dict(
      ratio=statistics.median(ratios),
      seconds=sec,
      rate=flops / sec,
      mm_rate=statistics.median(mm_rates),
  )


def single_device_mesh():
  from infdiff import sharding as shard_lib

  return shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])


class StepBench:
  """A method's real jitted train step (infdiff.train.make_train_step) on fixed inputs."""

  def __init__(self, method, config, batch: dict):
    from infdiff import sharding as shard_lib
    from infdiff import train

    self.mesh = single_device_mesh()
    self.rules = shard_lib.rules_from_config(config.logical_axis_rules)
    self.aux = method.prepare(self.mesh)
    with self.mesh, nn.logical_axis_rules(self.rules):
      self.state, _, txs = train.build_state(method, config, self.mesh, self.rules, batch)
      self.step = jax.jit(train.make_train_step(method, txs, config), donate_argnums=(0,))
    self.batch = jax.device_put(batch)
    self.aux = jax.device_put(self.aux)

  def flops(self) -> float:
    with self.mesh, nn.logical_axis_rules(self.rules):
      return compiled_flops(self.step, self.state, self.batch, self.aux)

  def run(self, n: int = 1) -> None:
    """n steps, blocking on the final state (the state is donated, so it is threaded)."""
    with self.mesh, nn.logical_axis_rules(self.rules):
      for _ in range(n):
        self.state, metrics = self.step(self.state, self.batch, self.aux)
      jax.block_until_ready((self.state, metrics))

  def seconds_per_step(self, steps: int = 3, repeats: int = 5) -> float:
    return median_time(lambda: self.run(steps), repeats=repeats, warmup=1) / steps


def stage1_batch(cfg, seed: int = 0) -> dict:
  """A random stage-1 training batch with the shapes of the multi-resolution crop."""
  from infdiff import fields

  rng = np.random.default_rng(seed)
  b, r, p = cfg.batch_size, cfg.enc_size, cfg.target_window
  coord = fields.crop_grid(2 * r, 2 * r, 3, 5, p, p)  # a window of a 2x render
  return {
      "image": rng.random((b, r, r, 3), np.float32),
      "target": rng.random((b, p, p, 3), np.float32),
      "coord": np.ascontiguousarray(np.broadcast_to(coord, (b, p, p, 2))),
      "cell": np.full((b, 2), 1.0 / r, np.float32),
  }


def stage1_method(config, workdir: str):
  from infdiff.methods import get_method_class

  return get_method_class("rapd_stage1")(
      config, "rapd_stage1", os.path.join(workdir, "rapd_stage1")
  )


def write_stage1_run(config, workdir: str, state) -> None:
  """Writes what a finished stage-1 run leaves behind (config, checkpoint, latent stats).

  The parameters are freshly initialised: timing does not depend on their values.
  """
  from infdiff import checkpoint as ckpt_lib

  stage_dir = os.path.join(workdir, "rapd_stage1")
  os.makedirs(stage_dir, exist_ok=True)
  with open(os.path.join(stage_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  mngr = ckpt_lib.manager(os.path.join(stage_dir, "checkpoints"))
  ckpt_lib.save(mngr, 1, jax.device_get(state))
  mngr.wait_until_finished()
  c = int(config.rapd_stage1.encoder.latent_channels)
  ckpt_lib.write_json(
      os.path.join(stage_dir, "latent_stats.json"),
      {"mean": [0.0] * c, "std": [1.0] * c, "count": 1},
  )


def stage2_method(config, workdir: str):
  """A stage-2 Method on the stage-1 run written under `workdir` by `write_stage1_run`."""
  from infdiff.methods import get_method_class

  return get_method_class("rapd_stage2")(
      config, "rapd_stage2", os.path.join(workdir, "rapd_stage2")
  )


def stage2_batch(method, seed: int = 0) -> dict:
  """A random stage-2 training batch: images at the latent size and tokenised captions."""
  rng = np.random.default_rng(seed)
  b, r = method.cfg.batch_size, method.latent_size
  caps = ["a red circle", "a blue square and a green triangle", "three yellow circles", ""]
  ids, mask = method.text.tokenize_batch([caps[i % len(caps)] for i in range(b)])
  return {
      "image": rng.random((b, r, r, 3), np.float32),
      "text_ids": np.asarray(ids, np.int32),
      "text_mask": np.asarray(mask, np.int32),
  }


def demo_runs(workdir: str, config=None, stage1_step: bool = True):
  """(config, stage-1 StepBench or None, stage-2 method) for the demo preset, no training.

  A freshly initialised stage-1 state is written as a finished stage-1 run so that the
  stage-2 Method (and the sampling Generator) load it the normal way. With
  `stage1_step=False` the stage-1 step is not compiled (only its state is built).
  """
  from infdiff import sharding as shard_lib
  from infdiff import train

  config = load_config("demo") if config is None else config
  config.rapd_stage2.text.vocab_captions = min(config.rapd_stage2.text.vocab_captions, 500)
  m1 = stage1_method(config, workdir)
  batch = stage1_batch(config.rapd_stage1)
  if stage1_step:
    s1 = StepBench(m1, config, batch)
    state = s1.state
  else:
    s1 = None
    mesh, rules = single_device_mesh(), shard_lib.rules_from_config(config.logical_axis_rules)
    state, _, _ = train.build_state(m1, config, mesh, rules, batch)
  write_stage1_run(config, workdir, state)
  m2 = stage2_method(config, workdir)
  return config, s1, m2


def stage2_params(method, seed: int = 0) -> dict:
  """Freshly initialised stage-2 parameters {'model': {...}} (unboxed), as a run stores them."""
  batch = stage2_batch(method, seed)
  variables = jax.jit(method.init)(jax.random.PRNGKey(seed), batch)
  return nn.unbox(variables)


def fmt_bytes(n: float) -> str:
  return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def header(title: str) -> None:
  logging.set_verbosity(logging.WARNING)  # checkpoint chatter would drown the table
  print(f"\n=== {title} ===", flush=True)
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
      f"load average {os.getloadavg()[0]:.2f}",
      flush=True,
  )
