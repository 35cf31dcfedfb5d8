"""∞-Diff's second stage: a latent diffusion over the diffusion autoencoder's z.

The frozen `infty_diff` run's encoder gives z of every training image (seen at every
pixel), normalised per dimension by the statistics that stage wrote after training. A
DiffAE MLP-skip network (`models.mlp.MLPSkipNet`: 10 layers, width 2048) learns it with
constant betas 0.008 over T = 1000 steps, eps-prediction and an L1 loss (DiffAE's latent
DDIM). Unconditional sampling draws z with DDIM (eta 0) first, de-normalises it, then
runs the main model's mollified DDIM at any resolution conditioned on it
(`sampler.MollifiedDDIM`): this stage provides the run's `Generator`.
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

MAIN_STAGE = "infty_diff"


def main_dir(config, workdir: str) -> str:
  """The main run: `infty_diff_latent.stage1_workdir` if set, else the sibling stage."""
  return runs.previous_stage_dir(config.infty_diff_latent.stage1_workdir, workdir, MAIN_STAGE)


def load_main_run(path: str):
  """The frozen `infty_diff` run at `path`, or a one-line error."""
  return runs.load_previous_stage(
      path, MAIN_STAGE, "infty_diff_latent", "infty_diff_latent.stage1_workdir"
  )


class Method(base.Method):
  """Latent DDPM over z of a finished diffusion-autoencoder `infty_diff` run."""

  provides = (base.GENERATOR,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.main_dir = main_dir(config, workdir)
    run = load_main_run(self.main_dir)
    self.main = run.method
    if not self.main.z_dim:
      raise ValueError(
          f"{self.main_dir}: its infty_diff model is unconditional (z_dim=0); it samples "
          "without a latent stage"
      )
    self._main_params = run.params
    stats = self.main.latent_stats()
    if stats is None:
      raise FileNotFoundError(
          f"{self.main_dir}/{MAIN_STAGE} has no z statistics (its training did not finish)"
      )
    self.z_mean = np.asarray(stats["mean"], np.float32)
    self.z_std = np.asarray(stats["std"], np.float32)
    d = c.diffusion
    self.schedule = gaussian.make_schedule("constant", int(d.num_steps), beta=float(d.beta))
    self.mlp = MLPSkipNet(
        dim=self.main.z_dim,
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
    z = jnp.zeros((b, self.main.z_dim), jnp.float32)
    return {"model": self.mlp.init(rng, z, jnp.zeros((b,), jnp.int32))["params"]}

  def normalised_z(self, aux, image):
    """Normalised z of images [B, N, N, 3] in [0, 1] (frozen encoder, full grid)."""
    z = self.main.encode_full(aux["main"]["model"]["encoder"], image * 2.0 - 1.0)
    return jax.lax.stop_gradient((z - self.z_mean) / self.z_std)

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    z = self.normalised_z(aux, batch["image"].astype(jnp.float32))
    p = params["model"]
    loss = gaussian.training_loss(
        lambda x, t: self.mlp.apply({"params": p}, x, t),
        self.schedule,
        z,
        rng,
        loss=self.cfg.diffusion.loss,
    )
    return loss, {self.cfg.diffusion.loss: loss}

  # --- sampling ---------------------------------------------------------------------
  def z_sampler(self, params, num_steps: int):
    """`keys [B] -> z [B, z_dim]` (de-normalised) by DDIM with eta 0 on the latent model."""
    return latents.mlp_ddim_sampler(
        self.mlp,
        self.schedule,
        params["model"],
        self.main.z_dim,
        self.z_mean,
        self.z_std,
        num_steps,
    )

  def make_inference(self, params, aux, **options):
    """The main model's `MollifiedDDIM` with z drawn by this stage (options: num_steps,
    batch_size, deblur, clip_denoised, latent_steps)."""
    from infdiff.methods.infty_diff.sampler import MollifiedDDIM

    del aux
    allowed = {"num_steps", "batch_size", "deblur", "clip_denoised", "latent_steps"}
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise ValueError(f"{self.stage} sampling has no option(s) {', '.join(unknown)}")
    steps = int(options.pop("latent_steps", None) or self.cfg.sample.num_steps)
    return MollifiedDDIM(
        self.main, self._main_params, z_sampler=self.z_sampler(params, steps), **options
    )

  def finalize(self, ctx):
    """Sample grids at the main stage's sizes into the run's samples/."""
    from infdiff import sampling

    gen = self.inference(ctx.state.ema or ctx.state.params, ctx.aux)
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    s = self.main.cfg.sample
    sizes = [(v, v) for v in s.sizes]
    for (w, h), images in gen.iter_sample([""], int(s.num), self.config.seed, sizes):
      sampling.save_grid(os.path.join(out, f"grid_{w}x{h}.png"), images)
    logging.info("[%s] sample grids at %s written to %s", self.stage, list(s.sizes), out)
