"""Stage `vae`: the Stable Diffusion VAE's architecture (KL-f8), trained from scratch.

InfGen decodes the latent of a frozen SD/SDXL VAE. Without downloaded weights this stage
trains the same `infdiff.models.sd_vae.SDVAE` on the run's data, so the demo has a VAE;
with real weights, point `infgen.vae_path` at them and skip this stage.

Loss (LDM's KL autoencoder without the GAN; supplement Eq. 1-3, with L1 + LPIPS as the
reconstruction term as SD's VAE was trained):
  L = |x_hat - x|_1 (on [-1, 1]; `recon_loss=l2`: squared) + lpips_weight LPIPS(x_hat, x)
      + kl_weight / (H W 3) * KL(q(z|x) || N(0, I)) summed over the latent,
with z = mean + exp(logvar / 2) eps. The KL weight means what LDM's does (there the
reconstruction is summed over the pixels of an image; here it is averaged). The
PatchGAN term of SD's VAE training is not included (configs/infgen.py).
Training images are whole images resized to enc_size (`RandomResizedSquare`). Latent
statistics are written after training (the latent DDPM's scale_factor=0 reads them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infdiff.data import transforms
from infdiff.losses.perceptual import LPIPSTerm
from infdiff.methods import base, latents
from infdiff.models import sd_vae


def build_vae(cfg) -> sd_vae.SDVAE:
  """The SDVAE of a `vae` config section."""
  m = cfg.model
  return sd_vae.SDVAE(
      block_out_channels=tuple(int(c) for c in m.block_out_channels),
      layers_per_block=int(m.layers_per_block),
      latent_channels=int(m.latent_channels),
      norm_num_groups=int(m.norm_num_groups),
      mid_block_add_attention=bool(m.mid_block_add_attention),
      dtype=jnp.dtype(cfg.dtype),
  )


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: [B]."""
  kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


def inference_params(params) -> dict:
  """The SDVAE parameter tree of a stage parameter set ({'model'})."""
  return params["model"]


class Method(base.Method):
  """The SD-layout VAE ('model'), trained with L1 + LPIPS + KL."""

  ema_groups = ()  # like LDM's autoencoders
  provides = (base.AUTOENCODER,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    self.model = build_vae(self.cfg)
    self.lpips = LPIPSTerm(self.cfg, stage, training, fallback="L1 + KL only")

  inference_params = staticmethod(inference_params)

  # --- the latent a latent DDPM models (infdiff.methods.latent_ddpm) -----------------
  @property
  def image_size(self) -> int:
    return int(self.cfg.enc_size)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    side = self.image_size // 2 ** (len(self.cfg.model.block_out_channels) - 1)
    return (side, side, int(self.cfg.model.latent_channels))

  def encode_latent(self, tree, images):
    """Pure: the posterior mean of [B, enc, enc, 3] images in [0, 1]."""
    return self.model.apply({"params": tree}, images, method=self.model.encode)["mean"]

  # --- training ---------------------------------------------------------------------
  def data_transform(self, split):
    del split
    return transforms.RandomResizedSquare(size=int(self.cfg.enc_size))

  def prepare(self, mesh, training=True):
    del mesh
    return {"lpips": self.lpips.params} if training and self.lpips.active else {}

  def init(self, rng, batch):
    params = self.model.init(rng, batch["image"])["params"]
    b0 = float(self.cfg.get("logvar_init", 0.0))
    if b0 and self.model.use_quant_conv:
      # The log-variance half of quant_conv's bias starts at logvar_init (not SD's): a
      # posterior std of 1 at step 0 buries a short run's latent in sampling noise.
      bias = params["quant_conv"]["bias"]
      unboxed = getattr(bias, "value", bias)
      c = self.model.latent_channels
      new = unboxed.at[c:].set(b0)
      params["quant_conv"]["bias"] = bias.replace_boxed(new) if hasattr(bias, "value") else new
    return {"model": params}

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    c = self.cfg
    v = {"params": params["model"]}
    x = batch["image"].astype(jnp.float32)
    post = self.model.apply(v, x, method=self.model.encode)
    mean, logvar = post["mean"], post["logvar"]
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    rec = self.model.apply(v, z, method=self.model.decode).astype(jnp.float32)
    # L1 (SD's) or squared error on [-1, 1] (+ LPIPS)
    loss, metrics = self.lpips.reconstruction(aux, rec, x, c.get("recon_loss", "l1"))
    kl = jnp.mean(kl_divergence(mean, logvar))
    return loss + float(c.kl_weight) / (x.shape[1] * x.shape[2] * 3) * kl, {**metrics, "kl": kl}

  def summaries(self, params, aux, batch, rng):
    del rng
    ae = self.inference(params, aux)
    image = jax.device_get(batch["image"][:4])
    return {"vae/input": image, "vae/recon": ae.render(ae.encode(image), *image.shape[1:3])}

  def latent_stats(self) -> dict | None:
    return latents.read_stats(self.workdir)

  def finalize(self, ctx):
    """Per-channel latent statistics (a latent DDPM with scale_factor=0 rescales by them)."""
    latents.write_stats(self.workdir, latents.latent_statistics(self, ctx), self.stage)

  # --- inference --------------------------------------------------------------------
  def make_inference(self, params, aux, *, tile=None, batch=None):
    """`pipeline.VAEAutoencoder`: native decode + bicubic resize (the baseline)."""
    del aux
    from infdiff.methods.infgen import pipeline

    return pipeline.VAEAutoencoder(
        self.model, inference_params(params), self.image_size, batch=batch, tile=tile
    )
