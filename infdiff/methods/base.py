"""The interface every method (or stage of a method) implements for the one trainer.

The trainer owns everything generic: mesh, data loading, state construction with
shardings, the jitted and donated step, optimisers, EMA, checkpoints, logging and
evaluation. A method supplies the parts that differ:

- `groups`: the trainable parameter groups, updated in this order within one step.
  A plain model has one ('model',); a GAN has ('model', 'disc') and its `loss` is
  called once per group, always with the latest parameters of every group, so the
  discriminator step sees the generator just updated (standard alternation).
- `ema_groups`: groups with an EMA copy of their parameters (evaluation, sampling). The
  decay is `config.<stage>.ema_decay` if the stage sets it, else the run's `ema_decay`;
  0 keeps no copy (`TrainState.ema` is empty and inference uses the parameters).
- `data_transform(split)`: the host-side transform from source records to training
  examples (e.g. the multi-resolution crop).
- `prepare(mesh, training=True)`: frozen inputs that are not trained nor checkpointed
  with the run (pretrained teachers loaded from local paths, a frozen previous stage,
  latent statistics). Returned as a pytree and passed to every loss call. Leaves boxed
  with `nn.LogicallyPartitioned` (e.g. `nn.LogicallyPartitioned(w, ('embed', 'mlp'))`)
  are sharded by the config's logical axis rules like parameters; unboxed leaves are
  replicated. The trainer passes training=True; inference (sampling, evaluation CLIs)
  passes training=False, and a method then skips inputs only its training loss uses
  (a distillation or REPA teacher, LPIPS).
- `init(rng, batch)`: per group, the Linen parameters (boxed with logical names):
  `{group: params}`. A method with mutable, non-trained variables (BatchNorm statistics
  of a discriminator, EMA codebooks) returns `{'params': {group: params},
  'state': {group: {collection: tree}}}` instead, e.g.
  `{'params': {'model': ..., 'disc': v['params']}, 'state': {'disc': {'batch_stats':
  v['batch_stats']}}}`. The state is sharded like parameters, checkpointed with the run
  and kept in `TrainState.model_state` (groups without state are absent).
- `loss(group, params, aux, batch, rng, step)`: scalar loss and metrics for `group`,
  returned as `(loss, metrics)`. With mutable state it is called with the keyword
  `state=` (the current `{group: {collection: tree}}` of every group, including updates
  made earlier in the same step) and returns `(loss, metrics, updates)`, where `updates`
  is a `{group: {collection: tree}}` of the collections it changed (e.g. the
  `batch_stats` from `apply(..., mutable=['batch_stats'])`); structures and shapes must
  match the initial state. Updates are written into the new state after the step, and
  dropped with the rest of the step when the loss or gradients are non-finite.
- `optimizer_config(group)`: the optax config of a group (default: the stage's `optim`).
- `summaries(params, aux, batch, rng)`: images for TensorBoard (optional).
- `finalize(ctx)`: host work after the last step (e.g. latent statistics, samples).
"""

from __future__ import annotations

from typing import Any


class Method:
  """Base class with defaults; subclasses override what they need."""

  groups: tuple[str, ...] = ("model",)
  # Groups whose parameters get an EMA copy (used for evaluation and sampling); none when
  # the stage's EMA decay is 0.
  ema_groups: tuple[str, ...] = ("model",)

  def __init__(self, config, stage: str, workdir: str):
    self.config = config  # the full run config
    self.stage = stage
    self.cfg = config[stage]  # this stage's section
    self.workdir = workdir  # this stage's directory

  def data_transform(self, split: str):
    raise NotImplementedError

  def prepare(self, mesh, training: bool = True) -> Any:
    """Frozen inputs of the loss (training) or of inference (training=False)."""
    del mesh, training
    return {}

  def init(self, rng, batch) -> dict:
    raise NotImplementedError

  def loss(self, group, params, aux, batch, rng, step):
    """(loss, metrics), or (loss, metrics, state updates) when called with `state=`."""
    raise NotImplementedError

  def optimizer_config(self, group: str):
    del group
    return self.cfg.optim

  def summaries(self, params, aux, batch, rng) -> dict:
    del params, aux, batch, rng
    return {}

  def finalize(self, ctx) -> None:
    del ctx
