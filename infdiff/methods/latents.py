"""Latent statistics of an autoencoder stage, written beside its checkpoints.

A later stage that models the latent reads them: RaPD stage 2 normalises per channel,
INFD's latent DDPM can rescale by the overall std (LDM's `scale_by_std`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from infdiff import checkpoint as ckpt_lib
from infdiff.data import transforms

STATS_FILE = "latent_stats.json"  # per-channel latent statistics, beside the checkpoints


def read_stats(stage_dir: str) -> dict | None:
  """{'mean', 'std', 'count'} that a stage's `finalize` wrote, or None before it ran."""
  path = os.path.join(stage_dir, STATS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_stats(stage_dir: str, stats: dict, stage: str) -> str:
  """Writes the statistics beside the stage's checkpoints (atomically); returns the path."""
  path = os.path.join(stage_dir, STATS_FILE)
  ckpt_lib.write_json(path, stats)
  logging.info("[%s] latent statistics over %d latents written to %s", stage, stats["count"], path)
  return path


def latent_statistics(method, ctx) -> dict:
  """Latent mean/std of cfg.stats_images random training crops, with the EMA encoder.

  The training set is repeated (with new random crops) when it holds fewer images than
  stats_images or than one batch, e.g. the seven built-in colour photos.
  """
  c = method.cfg
  transform = transforms.RandomResizedSquare(size=c.enc_size)
  loader = ctx.make_loader(
      transform=transform, split="train", num_epochs=None, batch_size=c.stats_batch_size
  )
  p = (ctx.state.ema or ctx.state.params)["model"]
  if hasattr(method, "encode_latent"):  # the autoencoder protocol of latent_ddpm
    encode = jax.jit(method.encode_latent)
  else:
    encode = jax.jit(lambda p, x: method.model.apply({"params": p}, x, method="encode"))
  total = np.zeros((), np.float64)
  s1 = s2 = None
  seen = 0
  for batch in loader:
    if seen >= c.stats_images:
      break
    take = min(len(batch["image"]), c.stats_images - seen)  # the last batch may overshoot
    seen += take
    z = np.asarray(jax.device_get(encode(p, jnp.asarray(batch["image"]))), np.float64)[:take]
    z = z.reshape(-1, z.shape[-1])
    s1 = z.sum(0) if s1 is None else s1 + z.sum(0)
    s2 = (z**2).sum(0) if s2 is None else s2 + (z**2).sum(0)
    total += z.shape[0]
  if s1 is None:
    raise ValueError("latent statistics: the training set gave no batch")
  mean = s1 / total
  std = np.sqrt(np.maximum(s2 / total - mean**2, 1e-12))
  return {"mean": mean.tolist(), "std": std.tolist(), "count": int(total)}


def mlp_ddim_sampler(mlp, schedule, params, dim: int, mean, std, num_steps: int):
  """`keys [B] -> vectors [B, dim]`: DDIM (eta 0) on a latent MLP (∞-Diff's z, Patch-DM's
  codes), one standard-normal start per key, de-normalised by (mean, std)."""
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  @jax.jit
  def run(p, noise):
    from infdiff.diffusion import gaussian

    zn = gaussian.ddim_sample(
        lambda x, t: mlp.apply({"params": p}, x, t), schedule, noise, num_steps=num_steps
    )
    return zn * std + mean

  def sample(keys):
    noise = jnp.stack([jax.random.normal(k, (dim,)) for k in keys])
    return run(params, noise)

  return sample
