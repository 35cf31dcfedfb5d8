"""The interface every method (or stage of a method) implements for the one trainer.

The trainer owns everything generic: mesh, data loading, state construction with
shardings, the jitted and donated step, optimisers, EMA, checkpoints, logging and
evaluation. A method supplies the parts that differ:

- `groups`: the trainable parameter groups, updated in this order within one step.
  A plain model has one ('model',); a GAN has ('model', 'disc') and its `loss` is
  called once per group, always with the latest parameters of every group, so the
  discriminator step sees the generator just updated (standard alternation).
- `data_transform(split)`: the host-side transform from source records to training
  examples (e.g. the multi-resolution crop).
- `prepare(mesh)`: frozen inputs that are not trained nor checkpointed with the run
  (pretrained teachers loaded from local paths, a frozen previous stage, latent
  statistics). Returned as a pytree of arrays and passed to every loss call.
- `init(rng, batch)`: per group, the Linen variables (boxed with logical names).
- `loss(group, params, aux, batch, rng, step)`: scalar loss and metrics for `group`.
- `optimizer_config(group)`: the optax config of a group (default: the stage's `optim`).
- `summaries(params, aux, batch, rng)`: images for TensorBoard (optional).
- `finalize(ctx)`: host work after the last step (e.g. latent statistics, samples).
"""

from __future__ import annotations

from typing import Any


class Method:
  """Base class with defaults; subclasses override what they need."""

  groups: tuple[str, ...] = ("model",)
  # Groups whose parameters get an EMA copy (used for evaluation and sampling).
  ema_groups: tuple[str, ...] = ("model",)

  def __init__(self, config, stage: str, workdir: str):
    self.config = config  # the full run config
    self.stage = stage
    self.cfg = config[stage]  # this stage's section
    self.workdir = workdir  # this stage's directory

  def data_transform(self, split: str):
    raise NotImplementedError

  def prepare(self, mesh) -> Any:
    del mesh
    return {}

  def init(self, rng, batch) -> dict:
    raise NotImplementedError

  def loss(self, group, params, aux, batch, rng, step):
    raise NotImplementedError

  def optimizer_config(self, group: str):
    del group
    return self.cfg.optim

  def summaries(self, params, aux, batch, rng) -> dict:
    del params, aux, batch, rng
    return {}

  def finalize(self, ctx) -> None:
    del ctx
