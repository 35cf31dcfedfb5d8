"""Stage `infgen`: InfGen's any-resolution decoder on a frozen SD-layout VAE encoder.

The encoder comes from `infgen.vae_path` (vae_source='sd': a diffusers `AutoencoderKL`
directory, e.g. the `vae` folder of SD1.5 or SDXL, read by `infdiff.pretrained.load('sd_vae',
DIR)`) or from a finished `vae` run (vae_source='run': `infgen.vae_workdir`, default the
sibling stage).
It sees the whole image resized to `enc_size` (supplement: 512); the latent is sampled,
y = mean + exp(logvar / 2) eps (Table 1), without gradient.

Each example is a window of the image resized to a random H x W (`transforms.FieldPatch`:
arbitrary sizes and aspect ratios, sides multiples of 8), queried at its pixel centres (a
window larger than a small target overhangs it: the decoder sees those queries as
outside the image, as a tiled render does, and the loss skips them);
the decoder (`infdiff.models.infgen.InfGenDecoder`) renders that window from the latent:
  L = |x_hat - x|_1 (on [-1, 1]; `recon_loss=l2`: squared) + lpips_weight LPIPS(x_hat, x).
The supplement does not give the loss; this is the reconstruction part of the VAE's own
objective (L1 + LPIPS), without its GAN.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from infdiff import runs
from infdiff.data import transforms
from infdiff.losses.perceptual import LPIPSTerm
from infdiff.methods import base
from infdiff.models.infgen import InfGenDecoder

VAE_STAGE = "vae"


def build_decoder(cfg, latent_channels: int) -> InfGenDecoder:
  d = cfg.decoder
  return InfGenDecoder(
      latent_channels=int(latent_channels),
      width=int(d.width),
      depth=int(d.depth),
      heads=int(d.heads),
      mlp_ratio=float(d.mlp_ratio),
      pos_dim=int(d.pos_dim),
      up_channels=tuple(int(c) for c in d.up_channels),
      layers_per_block=int(d.layers_per_block),
      norm_groups=int(d.norm_groups),
      tail_norm=str(d.tail_norm),
      mid_attention=bool(d.mid_attention),
      full_res_blocks=int(d.get("full_res_blocks", 0)),
      zero_init=bool(d.get("zero_init", False)),
      query_chunk=int(d.query_chunk),
      query_init=str(d.get("query_init", "none")),
      dtype=jnp.dtype(cfg.dtype),
  )


def load_vae(config, stage: str, workdir: str):
  """(SDVAE module, its parameter tree, where it came from) of the frozen encoder."""
  c = config[stage]
  if c.vae_source == "sd":
    if not c.vae_path:
      raise ValueError(f"{stage}.vae_source=sd needs {stage}.vae_path (preset vae=DIR)")
    from infdiff import pretrained

    model, variables = pretrained.load("sd_vae", os.path.expanduser(c.vae_path))
    return model, variables["params"], c.vae_path
  if c.vae_source != "run":
    raise ValueError(f"{stage}.vae_source must be 'sd' or 'run', got {c.vae_source!r}")
  path = runs.previous_stage_dir(c.vae_workdir, workdir, VAE_STAGE)
  run = runs.load_previous_stage(
      path, VAE_STAGE, stage, f"{stage}.vae_workdir (or {stage}.vae_path for SD weights)"
  )
  return run.method.model, run.method.inference_params(run.params), run.directory


class Method(base.Method):
  """InfGen's decoder ('model') on the frozen VAE encoder."""

  provides = (base.AUTOENCODER,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.vae, self._vae_params, where = load_vae(config, stage, workdir)
    logging.info("[%s] frozen VAE encoder from %s", stage, where)
    self.decoder = build_decoder(c, self.vae.latent_channels)
    self.lpips = LPIPSTerm(c, stage, training)
    from infdiff.methods.infgen import pipeline

    self._encoder = pipeline.FrozenEncoder(self.vae, None, int(c.enc_size))
    if self._encoder.factor != self.decoder.factor:
      raise ValueError(
          f"the InfGen decoder upsamples x{self.decoder.factor}, the VAE at {where} is "
          f"f{self._encoder.factor}"
      )

  def data_transform(self, split):
    del split
    c = self.cfg
    return transforms.FieldPatch(
        enc_size=int(c.enc_size),
        r_min=int(c.r_min),
        r_max=int(c.r_max),
        patch=int(c.patch),
        max_aspect=float(c.max_aspect),
        align=self.decoder.factor,
        size_dist=str(c.get("size_dist", "uniform")),
    )

  def prepare(self, mesh, training=True):
    del mesh
    aux = {"vae": {"params": self._vae_params}}
    if training and self.lpips.active:
      aux["lpips"] = self.lpips.params
    return aux

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    y = jnp.zeros((b, *self._encoder.latent_shape), jnp.float32)
    return {"model": self.decoder.init(rng, y, batch["coord"], batch["cell"])["params"]}

  def latent(self, aux, images, rng):
    """y = mean + exp(logvar / 2) eps of the frozen encoder, no gradient."""
    mean, logvar = self._encoder.moments(aux["vae"], images)
    if self.cfg.sample_posterior:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return jax.lax.stop_gradient(mean)

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    y = self.latent(aux, batch["image"], rng)
    valid = batch.get("valid")  # windows overhanging a small target (patch > r_min)
    rgb = self.decoder.apply({"params": params["model"]}, y, batch["coord"], batch["cell"], valid)
    kind = self.cfg.get("recon_loss", "l1")
    return self.lpips.reconstruction(aux, rgb, batch["target"], kind, valid)

  def summaries(self, params, aux, batch, rng):
    del rng
    ae = self.inference(params, aux)
    image = jax.device_get(batch["image"][:4])
    z = ae.encode(image)
    s = image.shape[1]
    out = {"infgen/input": image}
    for k in (1, 2):
      out[f"infgen/render_{k}x"] = ae.render(z, k * s, k * s).clip(0.0, 1.0)
    return out

  def finalize(self, ctx):
    """Held-out images and their decodes at 1x, 2x and 4x the encoder input, as grids in
    workdir/../samples (decode_input.png, decode_<s>x<s>.png)."""
    from infdiff import sampling
    from infdiff.evaluators import common

    ae = self.inference(ctx.state.ema or ctx.state.params, ctx.aux)
    source = common.held_out_source(self.config.data)
    r = int(self.cfg.enc_size)
    n = min(8, len(source))
    images = np.stack(
        [common.square_crop(source, j, r, np.random.default_rng([0, j])) for j in range(n)]
    )
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    sampling.save_grid(os.path.join(out, "decode_input.png"), images)
    z = ae.encode(images)
    for k in (1, 2, 4):
      s = k * r
      sampling.save_grid(os.path.join(out, f"decode_{s}x{s}.png"), ae.render(z, s, s))
    logging.info("[%s] held-out decodes at 1x, 2x, 4x written to %s", self.stage, out)

  def make_inference(self, params, aux, *, tile=None, batch=None):
    """`pipeline.InfGenAutoencoder` of these parameters."""
    from infdiff.methods.infgen import pipeline

    encoder = pipeline.FrozenEncoder(self.vae, aux["vae"], int(self.cfg.enc_size))
    return pipeline.InfGenAutoencoder(
        self.decoder, params["model"], encoder, tile=tile or self.cfg.tile, batch=batch
    )
