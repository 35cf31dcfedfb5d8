"""INFD stage 1 (`infd_ae`): the neural-field autoencoder with a PatchGAN (METHODS.md: INFD).

Model (`infdiff.models.ldm_autoencoder.INFDAutoencoder`): LDM VQ-f4 encoder -> VQ (or KL)
-> LDM decoder without its last layer -> feature map phi -> CLIF renderer queried at the
pixel centres of a patch of the randomly resized image (`transforms.INFDPatch`).

Image space. The model works in [-1, 1] like LDM/INFD: the encoder maps its [0, 1] input,
the renderer's raw output is compared with the target mapped to [-1, 1], and the
discriminator sees [-1, 1] images. So `l1` is LDM's L1 in [-1, 1] (twice the [0, 1] L1);
LPIPS takes [0, 1] inputs (its port rescales). The inference contract maps renders back
to [0, 1] (`pipeline.Autoencoder`).

Groups, updated in this order each step (the trainer calls `loss` per group with the
latest parameters, so the discriminator sees the generator just updated, as taming's
alternating optimisers do):
  'model'  L1 + lpips_weight LPIPS + vq.weight * VQ loss (or the KL term)
           + [step >= gan.start] gan.weight * w_ada * (-mean D(pred)),
           w_ada = ||grad nll|| / (||grad g_adv|| + ada_eps) clamped to [0, ada_max],
           stop-gradient, at the renderer's output conv kernel (VQGAN's last layer),
           nll = L1 + lpips_weight LPIPS; both norms from the loss's one forward pass
           (infdiff.losses.adaptive).
  'disc'   [step >= gan.start] 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(sg(pred)))).
Both run the discriminator in training mode (BatchNorm with batch statistics), as taming's
single module does in both optimiser steps. Only the discriminator loss returns its
BatchNorm statistics updates (see `_gen_loss`). No EMA (ema_decay 0), no clipping.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from absl import logging

from infdiff.data import sources, transforms
from infdiff.losses import adaptive, gan
from infdiff.methods import base, latents
from infdiff.models.discriminators import PatchGAN
from infdiff.models.ldm_autoencoder import INFDAutoencoder
from infdiff.models.quantize import DiagonalGaussian

# theta of w_ada: the renderer's output conv kernel (the generator's last layer).
LAST_LAYER = ("renderer", "conv_out", "kernel")


def build_model(cfg) -> INFDAutoencoder:
  """The INFDAutoencoder of an `infd_ae` config section."""
  return INFDAutoencoder(
      ae=_to_dict(cfg.ae),
      renderer_cfg=_to_dict(cfg.renderer),
      bottleneck=str(cfg.bottleneck),
      num_codes=int(cfg.vq.num_codes),
      beta=float(cfg.vq.beta),
      dtype=jnp.dtype(cfg.dtype),
  )


def build_disc(cfg) -> PatchGAN:
  """The PatchGAN of an `infd_ae` config section."""
  g = cfg.gan
  return PatchGAN(
      ndf=int(g.ndf), n_layers=int(g.n_layers), kernel=int(g.kernel), dtype=jnp.dtype(cfg.dtype)
  )


def _to_dict(c):
  return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)
  tree[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return tree


def inference_params(params) -> dict:
  """The INFDAutoencoder's parameter tree of a stage-1 parameter set ({'model', 'disc'})."""
  return params["model"]


class Method(base.Method):
  """INFD stage 1: autoencoder ('model') and PatchGAN ('disc')."""

  groups = ("model", "disc")
  ema_groups = ()  # no EMA in stage 1 (paper / LDM)
  provides = (base.AUTOENCODER,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.lpips = None
    if c.lpips_weight > 0 and training:  # training-only, like RaPD stage 1
      if not c.lpips_path:
        raise ValueError(
            f"{stage}.lpips_weight > 0 needs {stage}.lpips_path (a VGG16-LPIPS checkpoint "
            f"directory); set {stage}.lpips_weight=0 to train without LPIPS"
        )
      from infdiff import pretrained

      self.lpips, self._lpips_params = pretrained.load("lpips_vgg16", c.lpips_path)
    self.model = build_model(c)  # the INFDAutoencoder (also used by the latent stage)
    self.disc = build_disc(c)

  inference_params = staticmethod(inference_params)

  # --- the latent a latent DDPM models (infdiff.methods.latent_ddpm) -----------------
  @property
  def image_size(self) -> int:
    """Encoder input side."""
    return int(self.cfg.enc_size)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of one latent."""
    s = self.image_size // 2 ** (len(self.cfg.ae.ch_mult) - 1)
    return (s, s, int(self.cfg.ae.z_channels))

  def encode_latent(self, tree, images):
    """Pure: the un-quantised latent (KL: the mean) of [B, enc, enc, 3] images in [0, 1]."""
    return self.model.apply({"params": tree}, images, method="encode")

  # --- data -----------------------------------------------------------------------
  def data_transform(self, split):
    del split
    c = self.cfg
    return transforms.INFDPatch(
        enc_size=int(c.enc_size), r_max=int(c.r_max), patch=int(c.patch), fix_r=bool(c.fix_r)
    )

  def data_source(self, source, split):
    """Training draws `hires_fraction` of its records from images of short side >= r_max."""
    if split != "train":
      return source
    c = self.cfg
    out = sources.balance_by_size(source, int(c.r_max), float(c.hires_fraction), self.config.seed)
    if out is not source:
      logging.info(
          "[%s] %.2f of the records from images with a short side >= %d (%d slots)",
          self.stage,
          out.hires_fraction,
          c.r_max,
          len(out),
      )
    return out

  # --- state ----------------------------------------------------------------------
  def prepare(self, mesh, training=True):
    del mesh
    if training and self.lpips is not None:
      return {"lpips": self._lpips_params}
    return {}

  def init(self, rng, batch):
    r_model, r_disc = jax.random.split(rng)
    model = self.model.init(r_model, batch["image"], batch["coord"], batch["cell"])
    disc = self.disc.init(r_disc, batch["target"], train=False)
    return {
        "params": {"model": model["params"], "disc": disc["params"]},
        "state": {"disc": {"batch_stats": disc["batch_stats"]}},
    }

  def optimizer_config(self, group):
    return self.cfg.disc_optim if group == "disc" else self.cfg.optim

  # --- generator ------------------------------------------------------------------
  def _regulariser_weight(self) -> float:
    c = self.cfg
    if c.bottleneck == "vq":
      return float(c.vq.weight)
    # LDM's KL autoencoders sum the reconstruction over pixels (per image) and add
    # kl_weight * KL; this loss averages it, so the KL weight is divided by the values
    # per target to keep LDM's balance (kl_weight 1e-6 means the same as there).
    return float(c.kl_weight) / (int(c.patch) ** 2 * 3)

  def _generate(self, p, batch, rng, train=True):
    """The generator forward: (rgb [B, P, P, 3] on the [-1, 1] scale, (reg loss, metrics))."""
    c = self.cfg
    rngs = {}
    if c.ae.dropout > 0 and train:
      rng, drop = jax.random.split(rng)
      rngs = {"dropout": drop}
    v = {"params": p}
    m = self.model.apply(v, batch["image"], train, method="moments", rngs=rngs)
    if c.bottleneck == "kl":
      post = DiagonalGaussian.from_moments(m)
      z = post.sample(rng) if train else post.mean
      reg = post.kl()
      metrics = {"kl": reg}
    else:
      q = self.model.apply(v, m, method="quantize")
      z, reg = q.zq, q.loss
      metrics = {"codebook": q.loss, "perplexity": q.perplexity}
    phi = self.model.apply(v, z, train, method="decode_quantized", rngs=rngs)
    rgb = self.model.apply(v, phi, batch["coord"], batch["cell"], method="render")
    return rgb.astype(jnp.float32), (reg, metrics)

  def _nll(self, rgb, batch, aux):
    """L1 in [-1, 1] + lpips_weight * LPIPS: (nll, metrics)."""
    target = batch["target"].astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(rgb - (2.0 * target - 1.0)))
    metrics = {"l1": l1}
    loss = l1
    if self.lpips is not None:
      lp = jnp.mean(self.lpips.apply(aux["lpips"], (rgb + 1.0) * 0.5, target))
      metrics["lpips"] = lp
      loss = loss + self.cfg.lpips_weight * lp
    metrics["nll"] = loss
    return loss, metrics

  def _gen_loss(self, params, aux, batch, rng, step, state):
    c = self.cfg
    p = params["model"]
    reg_w = self._regulariser_weight()
    if c.gan.weight <= 0:
      rgb, (reg, qm) = self._generate(p, batch, rng)
      nll, metrics = self._nll(rgb, batch, aux)
      return nll + reg_w * reg, {**metrics, **qm}

    disc_vars = {"params": params["disc"], **state["disc"]}

    def features(theta):  # the whole forward, with the renderer's output kernel = theta
      return self._generate(_set(p, LAST_LAYER, theta), batch, rng)

    def adversarial(rgb):
      # Training-mode BatchNorm (batch statistics of the fake batch), as the one taming
      # module runs in both optimiser steps. Its running-statistics update is dropped:
      # training never reads running statistics (both losses use batch statistics), so
      # which calls update them does not change training; keeping only the
      # discriminator step's two updates (real, then fake) gives one well-defined EMA of
      # the statistics the discriminator is trained on.
      logits, _ = self.disc.apply(disc_vars, rgb, True, mutable=["batch_stats"])
      return gan.generator_loss(logits), {}

    ada = adaptive.adaptive_weight(
        features,
        lambda rgb: self._nll(rgb, batch, aux),
        adversarial,
        _get(p, LAST_LAYER),
        eps=float(c.gan.ada_eps),
        max_weight=float(c.gan.ada_max),
    )
    reg, qm = ada.aux
    on = gan.gan_active(step, int(c.gan.start))
    loss = ada.loss_a + reg_w * reg + on * float(c.gan.weight) * ada.weight * ada.loss_b
    metrics = {**ada.aux_a, **qm, "g_adv": ada.loss_b, "w_ada": ada.weight, "gan_on": on}
    return loss, metrics

  # --- discriminator --------------------------------------------------------------
  def _disc_loss(self, params, batch, rng, step, state):
    c = self.cfg
    if c.gan.weight <= 0:  # no GAN term: the discriminator is neither run nor trained
      return jnp.zeros((), jnp.float32), {}, {"disc": state["disc"]}
    rgb, _ = self._generate(params["model"], batch, rng)  # the generator just updated
    fake = jax.lax.stop_gradient(rgb)
    real = 2.0 * batch["target"].astype(jnp.float32) - 1.0
    # Two calls, real then fake, as taming: batch statistics per call, running ones
    # updated after each.
    v = {"params": params["disc"], **state["disc"]}
    logits_real, upd = self.disc.apply(v, real, True, mutable=["batch_stats"])
    v = {"params": params["disc"], **upd}
    logits_fake, upd = self.disc.apply(v, fake, True, mutable=["batch_stats"])
    on = gan.gan_active(step, int(c.gan.start))
    d_loss = gan.hinge_d_loss(logits_real, logits_fake)
    metrics = {
        "d_loss": d_loss,
        "logits_real": jnp.mean(logits_real),
        "logits_fake": jnp.mean(logits_fake),
    }
    return on * d_loss, metrics, {"disc": {"batch_stats": upd["batch_stats"]}}

  def loss(self, group, params, aux, batch, rng, step, state=None):
    """(loss, metrics, state updates) of `group`; `state` is the trainer's model state."""
    if state is None or "disc" not in state:
      raise ValueError("infd_ae's loss needs state={'disc': {'batch_stats': ...}}")
    if group == "model":
      loss, metrics = self._gen_loss(params, aux, batch, rng, step, state)
      return loss, metrics, {}
    if group == "disc":
      return self._disc_loss(params, batch, rng, step, state)
    raise ValueError(f"unknown group {group!r}")

  # --- summaries and inference ------------------------------------------------------
  def summaries(self, params, aux, batch, rng):
    """Encoder inputs and their renders at 1x and 2x the input side, in [0, 1]."""
    del rng
    ae = self.inference(params, aux)
    n = min(4, len(batch["image"]))
    image = jax.device_get(batch["image"][:n])
    z = ae.encode(image)
    s = image.shape[1]
    out = {"infd_ae/input": image}
    for k in (1, 2):
      out[f"infd_ae/render_{k}x"] = ae.render(z, k * s, k * s).clip(0.0, 1.0)
    return out

  def latent_stats(self) -> dict | None:
    """{'mean', 'std', 'count'} of the un-quantised latent, written by `finalize`."""
    return latents.read_stats(self.workdir)

  def finalize(self, ctx):
    """Per-channel statistics of the un-quantised latent over training images (the latent
    DDPM's `scale_factor=0` rescales by their overall std, LDM's scale_by_std)."""
    latents.write_stats(self.workdir, latents.latent_statistics(self, ctx), self.stage)

  def make_inference(self, params, aux, *, tile=None, batch=None):
    """The `FieldAutoencoder` of these parameters (`pipeline.Autoencoder`)."""
    del aux
    from infdiff.methods.infd import pipeline

    return pipeline.Autoencoder(
        self.model, self.cfg, params, tile=tile, batch=batch, select=inference_params
    )
