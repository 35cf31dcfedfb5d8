"""Logging, metric writing and progress reporting (TensorFlow-free)."""

from __future__ import annotations

import logging as pylogging
import os
import time

import numpy as np
from absl import logging


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of checkpointing internals (each save logs ~20 lines)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def quiet_library_logs_everywhere() -> None:
  """`quiet_library_logs` for records of the absl logger whatever handler prints them
  (a notebook kernel prints them through its own root handler, not absl's)."""
  logger = pylogging.getLogger("absl")
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())


def add_log_file(path: str) -> None:
  """Mirrors absl logging into a plain-text log file (once per path)."""
  logger = pylogging.getLogger("absl")
  path = os.path.abspath(path)
  if any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
    return
  handler = pylogging.FileHandler(path)
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  handler.addFilter(_QuietLibraries())
  quiet_library_logs()
  logger.addHandler(handler)
  logging.set_verbosity(logging.INFO)


def enable_compilation_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path` ('' leaves it off)."""
  if not path:
    return
  import jax

  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class MetricWriter:
  """TensorBoard event files via tensorboardX (scalars and image grids)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter

    self._w = SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      self._w.add_scalar(k, float(v), global_step=step)

  def write_images(self, step: int, name: str, images: np.ndarray) -> None:
    """images: [N, H, W, 3] in [0, 1] (clipped), written as one grid."""
    grid = image_grid(np.clip(images, 0.0, 1.0))
    self._w.add_image(name, grid, global_step=step, dataformats="HWC")

  def flush(self) -> None:
    self._w.flush()


class NullWriter:

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, name, images):
    pass

  def flush(self):
    pass


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """[N, H, W, C] -> one [rows*(H+pad), cols*(W+pad), C] grid image."""
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), images.dtype)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[
        pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w
    ] = images[i]
  return grid


class Progress:
  """Steps/s over the last interval and an ETA for the rest of the run."""

  def __init__(self, total: int, start: int):
    self.total = total
    self.last_step = start
    self.last_time = time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {"steps_per_sec": rate, "eta_sec": (self.total - step) / max(rate, 1e-9)}


def _fmt_time(sec: float) -> str:
  sec = int(sec)
  h, rem = divmod(sec, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_progress(step: int, total: int, scalars: dict, skips: dict | None = None) -> str:
  """One progress line: step, the main losses, steps/s and ETA, and skipped-file counts."""
  parts = [f"step {step}/{total}"]
  for k in sorted(scalars):
    if k.endswith("loss") or k.endswith("nonfinite_skipped"):
      parts.append(f"{k} {scalars[k]:.4g}")
  parts.append(f"{scalars.get('steps_per_sec', 0.0):.2f} steps/s")
  parts.append(f"ETA {_fmt_time(scalars.get('eta_sec', 0.0))}")
  if skips and sum(skips.values()):
    total_skipped = sum(skips.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(skips.items()) if v)
    parts.append(f"skipped {total_skipped} files ({detail})")
  return " | ".join(parts)


def make_evaluators(config, stage: str) -> list:
  """Evaluators from `config.evals`: {name: {every, stage, ...}} -> objects with .run(ctx, step)."""
  evals = config.get("evals")
  if not evals:
    return []
  out = []
  for name, ecfg in evals.items():
    if ecfg.get("stage", stage) != stage or not ecfg.get("every"):
      continue
    metric = ecfg.get("metric", name)
    from infdiff.evaluators import metric_module

    try:
      module = metric_module(metric)
    except ValueError as e:
      raise ValueError(f"evals.{name}: {e}") from None
    out.append(module.Evaluator(ecfg))
  return out
