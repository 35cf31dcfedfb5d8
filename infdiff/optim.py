"""Optimisers, schedules and parameter EMA from config."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def make_schedule(cfg) -> optax.Schedule:
  """Linear warmup then 'cosine' decay to `end_factor * lr`, or 'constant'."""
  lr, warmup = cfg.lr, int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    decay_steps = max(int(cfg.decay_steps) - warmup, 1)
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.get("end_factor", 0.0))
  else:
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine' or 'constant'")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _path_labels(params, frozen_patterns) -> dict:
  """'frozen' for leaves whose '/'-joined path matches a pattern, else 'train'."""
  regexes = [re.compile(p) for p in frozen_patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: "frozen" if any(r.fullmatch(k) for r in regexes) else "train" for k in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


def make_optimizer(cfg, params) -> optax.GradientTransformation:
  """AdamW with warmup + cosine/constant schedule, global-norm clipping, frozen sub-trees.

  Args:
    cfg: ConfigDict with lr, b1, b2, eps, weight_decay, grad_clip, schedule,
      warmup_steps, decay_steps, frozen (regexes over '/'-joined param paths) and
      optionally grad_clip_per (top-level keys of `params` clipped each on its own).
    params: the parameter tree (only its structure is used).
  """
  per = tuple(cfg.get("grad_clip_per", ()))
  if cfg.grad_clip and per:
    # One global-norm clip per listed top-level sub-tree (∞-Diff clips its denoiser and
    # its encoder separately); sub-trees not listed are clipped together.
    labels = {k: (k if k in per else "_rest") for k in params}
    clip = optax.multi_transform(
        {k: optax.clip_by_global_norm(cfg.grad_clip) for k in set(labels.values())}, labels
    )
  elif cfg.grad_clip:
    clip = optax.clip_by_global_norm(cfg.grad_clip)
  else:
    clip = optax.identity()
  tx = optax.chain(
      clip,
      optax.adamw(
          make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
      ),
  )
  frozen = tuple(cfg.get("frozen", ()))
  if not frozen:
    return tx
  labels = _path_labels(params, frozen)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema, params, decay, step, every: int = 1):
  """EMA with the usual warm-up `min(decay, (1 + step) / (10 + step))` (TF/flax style).

  With every = n > 1 the average moves only on steps that are multiples of n (∞-Diff:
  decay 0.995 every 10 steps) and is left unchanged otherwise.
  """
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  if every > 1:
    d = jnp.where(step % every == 0, d, 1.0)
  return jax.tree.map(lambda e, p: e * d + (1.0 - d) * p.astype(e.dtype), ema, params)
