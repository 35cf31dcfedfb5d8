"""Patch-DM's second stage: a latent diffusion over the learned semantic codes.

The frozen `patch_dm` run's codes (the per-image table, or its encoder's codes of the
training images) are normalised per dimension and modelled by the DiffAE MLP-skip network
(`models.mlp.MLPSkipNet`; paper: 10 layers, width 2048, LayerNorm, SiLU) with an L1 loss
on eps, constant betas 0.008 over T = 1000 (DiffAE's latent DDIM). Unconditional
sampling draws a code with DDIM (paper: 50 steps) and then runs the main model's patch
sampler with it (`sampler.PatchDDIM`): this stage provides the run's `Generator`.

Training batches are rows of the code table drawn uniformly by the step's rng (table
source) or the encoder's codes of the loader's images (encoder source); the image
loader runs either way, since the trainer feeds every stage from it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from infdiff import runs
from infdiff.diffusion import gaussian
from infdiff.methods import base, latents
from infdiff.models.mlp import MLPSkipNet

MAIN_STAGE = "patch_dm"


def main_dir(config, workdir: str) -> str:
  """The main run: `patch_dm_codes.stage1_workdir` if set, else the sibling stage."""
  return runs.previous_stage_dir(config.patch_dm_codes.stage1_workdir, workdir, MAIN_STAGE)


class Method(base.Method):
  """Latent DDPM over the semantic codes of a finished `patch_dm` run."""

  provides = (base.GENERATOR,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.main_dir = main_dir(config, workdir)
    run = runs.load_previous_stage(
        self.main_dir, MAIN_STAGE, "patch_dm_codes", "patch_dm_codes.stage1_workdir"
    )
    self.main = run.method
    self._main_params = run.params
    self.dim = self.main.code_dim
    if self.main.encoder is None:
      table = np.asarray(jax.device_get(run.params["model"]["codes"]), np.float64)
      self.code_mean = table.mean(0).astype(np.float32)
      self.code_std = np.maximum(table.std(0), 1e-6).astype(np.float32)
    else:  # encoder codes are modelled as they are (the encoder's output is not normalised)
      self.code_mean = np.zeros((self.dim,), np.float32)
      self.code_std = np.ones((self.dim,), np.float32)
    d = c.diffusion
    self.schedule = gaussian.make_schedule("constant", int(d.num_steps), beta=float(d.beta))
    self.mlp = MLPSkipNet(
        dim=self.dim,
        num_layers=int(c.mlp.num_layers),
        width=int(c.mlp.width),
        time_dim=int(c.mlp.time_dim),
        dtype=jnp.dtype(c.dtype),
    )

  def data_transform(self, split):
    return self.main.data_transform(split)

  def prepare(self, mesh, training=True):
    del mesh, training
    return {"main": self._main_params}

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    z = jnp.zeros((b, self.dim), jnp.float32)
    return {"model": self.mlp.init(rng, z, jnp.zeros((b,), jnp.int32))["params"]}

  def normalised_codes(self, aux, batch, rng):
    """[B', K] normalised training codes: table rows drawn by rng, or the batch's codes."""
    p = aux["main"]["model"]
    if self.main.encoder is None:
      table = p["codes"]
      n = int(self.cfg.codes_per_step)
      codes = jnp.take(table, jax.random.randint(rng, (n,), 0, table.shape[0]), axis=0)
    else:
      codes = self.main.codes_for(p, batch)
    return jax.lax.stop_gradient((codes - self.code_mean) / self.code_std)

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    k_rows, k_loss = jax.random.split(rng)
    z = self.normalised_codes(aux, batch, k_rows)
    p = params["model"]
    loss = gaussian.training_loss(
        lambda x, t: self.mlp.apply({"params": p}, x, t),
        self.schedule,
        z,
        k_loss,
        loss=self.cfg.diffusion.loss,
    )
    return loss, {self.cfg.diffusion.loss: loss}

  # --- sampling ---------------------------------------------------------------------
  def code_sampler(self, params, num_steps: int):
    """`keys [B] -> codes [B, K]` (de-normalised) by DDIM with eta 0 on the code model."""
    return latents.mlp_ddim_sampler(
        self.mlp, self.schedule, params["model"], self.dim, self.code_mean, self.code_std, num_steps
    )

  def make_inference(self, params, aux, **options):
    """The main model's `PatchDDIM` with codes drawn by this stage (options: the main
    sampler's and code_steps)."""
    from infdiff.methods.patch_dm.sampler import PatchDDIM

    del aux
    allowed = set(self.main.SAMPLER_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise ValueError(f"{self.stage} sampling has no option(s) {', '.join(unknown)}")
    steps = int(options.pop("code_steps", None) or self.cfg.sample.num_steps)
    return PatchDDIM(
        self.main, self._main_params, code_sampler=self.code_sampler(params, steps), **options
    )

  def finalize(self, ctx):
    """Sample grids at the main stage's sizes into the run's samples/."""
    from infdiff import sampling

    gen = self.inference(ctx.state.ema or ctx.state.params, ctx.aux)
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    sizes = gen.default_sizes()
    for (w, h), images in gen.iter_sample(
        [""], int(self.main.cfg.sample.num), self.config.seed, sizes
    ):
      sampling.save_grid(os.path.join(out, f"grid_{w}x{h}.png"), images)
    logging.info("[%s] sample grids at %s written to %s", self.stage, sizes, out)
