"""A DDPM in the latent of a frozen autoencoder stage: INFD's stage 2 (`infd_ldm`, METHODS.md:
INFD) and the latent generator InfGen decodes (`latent_ddpm`, configs/infgen.py).

x_0 = scale_factor * E(I) is the autoencoder's deterministic latent of the whole image
resized to the encoder size (INFD: the un-quantised VQ-f4 output, LDM's recipe, so the
diffusion never sees the quantiser and decoding a sample quantises it first; the SD-style
VAE: the posterior mean). The denoiser is the core ADM UNet predicting eps with the MSE
loss on uniform timesteps of a linear-beta schedule (`infdiff.diffusion.gaussian`).

Sampling is DDIM (INFD: 200 steps, eta 1) on the latent grid, so its cost does not depend
on the output size. Samples are drawn by a `FieldAutoencoder` that reads this latent: the
autoencoder's own (INFD: decoder to phi once per sample, then CLIF in static-shape tiles),
or another stage that decodes the same latent at any size (`decoder_stage`: InfGen's
decoder, its plug-in use on a latent generator). The generator is also a `GuidablePrior`
when that autoencoder exposes `decode_fn` / `render_points_fn`: `infdiff.guide` runs
diffusion posterior sampling through it.

The autoencoder stage provides, on its `Method`: `image_size` (encoder input side),
`latent_shape` (h, w, C), `inference_params(params)`, `encode_latent(tree, images)` (pure
JAX, images in [0, 1]), `latent_stats()` and `make_inference({'model': tree}, aux)`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from infdiff import runs
from infdiff.data import transforms
from infdiff.diffusion import gaussian
from infdiff.methods import base
from infdiff.models.unet import UNet

AE_STAGE = "infd_ae"  # default autoencoder stage (INFD)


def stage1_dir(config, stage: str, workdir: str) -> str:
  """The autoencoder run: `<stage>.stage1_workdir` if set, else the sibling stage."""
  c = config[stage]
  return runs.previous_stage_dir(c.stage1_workdir, workdir, c.get("autoencoder_stage", AE_STAGE))


def load_autoencoder_run(config, stage: str, path: str):
  """The frozen autoencoder run at `path` (a run or its stage directory), or one line."""
  ae = config[stage].get("autoencoder_stage", AE_STAGE)
  return runs.load_previous_stage(path, ae, stage, f"{stage}.stage1_workdir")


def load_decoder(config, stage: str, workdir: str, ae_run):
  """The `FieldAutoencoder` that draws this stage's latents.

  `<stage>.decoder_stage` '' -> the autoencoder's own; else that stage's run, found at
  `<stage>.decoder_workdir` or beside this stage, which must decode the same latent.
  """
  c = config[stage]
  name = c.get("decoder_stage", "")
  if not name:
    return None
  path = runs.previous_stage_dir(c.get("decoder_workdir", ""), workdir, name)
  run = runs.load_previous_stage(path, name, stage, f"{stage}.decoder_workdir")
  dec = run.inference()
  want = tuple(ae_run.method.latent_shape[-1:])
  have = tuple(getattr(dec, "latent_shape", want)[-1:])
  if have != want:
    raise ValueError(
        f"{stage}.decoder_stage={name} decodes {have[0]}-channel latents, but "
        f"{ae_run.stage} gives {want[0]} channels"
    )
  return dec


def scale_by_std(stats: dict | None, where: str, stage: str = "infd_ldm") -> float:
  """1 / the overall std of the latent (all channels pooled), from per-channel statistics."""
  if stats is None:
    raise FileNotFoundError(
        f"{stage}.scale_factor=0 needs the autoencoder's latent statistics; {where} has no "
        "latent_stats.json (its training did not finish)"
    )
  mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
  var = np.mean(std**2 + mean**2) - np.mean(mean) ** 2
  return float(1.0 / np.sqrt(max(var, 1e-12)))


def build_unet(cfg, latent_side: int, channels: int) -> UNet:
  u = cfg.unet
  return UNet(
      image_size=latent_side,
      ch=u.ch,
      channel_mult=tuple(u.channel_mult),
      num_res_blocks=u.num_res_blocks,
      attention_resolutions=tuple(u.attention_resolutions),
      head_channels=u.head_channels,
      norm_groups=u.norm_groups,
      dropout=u.dropout,
      scale_shift=False,  # LDM's UNetModel default (METHODS.md: INFD stage 2)
      out_channels=channels,  # eps only (fixed variances)
      dtype=jnp.dtype(cfg.dtype),
  )


def make_schedule(cfg) -> gaussian.Schedule:
  d = cfg.diffusion
  return gaussian.make_schedule(
      "linear", int(d.num_steps), beta_start=float(d.beta_start), beta_end=float(d.beta_end)
  )


class Method(base.Method):
  """A latent DDPM on a finished autoencoder run (INFD's `infd_ae`, InfGen's `vae`)."""

  provides = (base.GENERATOR,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.ae_dir = stage1_dir(config, stage, workdir)
    ae_run = load_autoencoder_run(config, stage, self.ae_dir)
    self.ae_method = ae_run.method
    self._ae_params = ae_run.method.inference_params(ae_run.params)
    self._ae_aux = ae_run.aux
    self.image_size = int(ae_run.method.image_size)
    h, w, self.channels = (int(v) for v in ae_run.method.latent_shape)
    if h != w:
      raise ValueError(f"{stage} models square latents; {ae_run.stage} gives {h}x{w}")
    self.latent_side = h
    # The decoder of the samples: None = the autoencoder's own (`_autoencoder` builds it).
    self.decoder = load_decoder(config, stage, workdir, ae_run)
    levels = len(c.unet.channel_mult)
    if self.latent_side % 2 ** (levels - 1):
      raise ValueError(
          f"the {self.latent_side}x{self.latent_side} latent cannot be halved "
          f"{levels - 1} times ({stage}.unet.channel_mult={tuple(c.unet.channel_mult)})"
      )
    self.scale = float(c.scale_factor) or scale_by_std(
        ae_run.method.latent_stats(), self.ae_dir, stage
    )
    self.schedule = make_schedule(c)
    self.unet = build_unet(c, self.latent_side, self.channels)

  def data_transform(self, split):
    del split
    # The whole image at the encoder size (the largest centred-or-random square of a
    # non-square image, area-downsampled), as stage 1's encoder sees it.
    return transforms.RandomResizedSquare(size=self.image_size)

  def prepare(self, mesh, training=True):
    del mesh, training
    return {"ae": self._ae_params}

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    x = jnp.zeros((b, self.latent_side, self.latent_side, self.channels), jnp.float32)
    return {"model": self.unet.init(rng, x, jnp.zeros((b,), jnp.int32))["params"]}

  def latent(self, aux, image):
    """The diffusion's x_0: scale_factor * un-quantised encoder output, no gradient."""
    z = self.ae_method.encode_latent(aux["ae"], image)
    return jax.lax.stop_gradient(z.astype(jnp.float32) * self.scale)

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    r_loss, r_drop = jax.random.split(rng)
    x0 = self.latent(aux, batch["image"])
    p = params["model"]
    model_fn = lambda x, t: self.unet.apply(
        {"params": p}, x, t, train=True, rngs={"dropout": r_drop}
    )
    loss = gaussian.training_loss(
        model_fn, self.schedule, x0, r_loss, parameterization=self.cfg.diffusion.parameterization
    )
    return loss, {"mse": loss}

  # --- sampling ---------------------------------------------------------------------
  def make_inference(self, params, aux, **options):
    """`LatentDDPM` (options: num_steps, eta, batch_size, tile; defaults: <stage>.sample)."""
    allowed = {"num_steps", "eta", "batch_size", "tile"}
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise ValueError(f"{self.stage} sampling has no option(s) {', '.join(unknown)}")
    return LatentDDPM(self, params, aux, **options)

  def finalize(self, ctx):
    """Sample grids at the configured sizes into workdir/../samples (the run's root)."""
    from infdiff import sampling

    gen = self.inference(ctx.state.ema or ctx.state.params, ctx.aux)
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    z = gen.latents([""], num=int(self.cfg.sample.num), seed=self.config.seed)
    for s in self.cfg.sample.sizes:
      sampling.save_grid(os.path.join(out, f"grid_{s}x{s}.png"), gen.render(z, s, s))
    logging.info(
        "[%s] sample grids at %s written to %s", self.stage, list(self.cfg.sample.sizes), out
    )


class LatentDDPM(base.LatentGenerator, base.GuidablePrior):
  """Unconditional sampler: DDIM in the latent, then the decoder's tiled render."""

  conditional = False

  def __init__(self, method, params, aux, *, num_steps=None, eta=None, batch_size=None, tile=None):
    s = method.cfg.sample
    self.method = method
    self.params = params
    self.aux = aux
    self.num_steps = int(num_steps or s.num_steps)
    self.eta = float(s.eta if eta is None else eta)
    self.batch_size = int(batch_size or s.batch_size)
    self.tile = int(tile or s.tile)
    self.max_size = int(s.max_size)
    self.latent_shape = (method.latent_side, method.latent_side, method.channels)
    self.schedule = method.schedule
    self.parameterization = method.cfg.diffusion.parameterization
    if not 1 <= self.num_steps <= self.schedule.num_steps:
      raise ValueError(f"num_steps must be in 1..{self.schedule.num_steps}, got {self.num_steps}")
    self.autoencoder = _autoencoder(method, aux)
    self.trace_count = 0  # times the sampler was traced (compiled)
    self._sample = jax.jit(self._sample_impl)

  @property
  def native_size(self) -> tuple[int, int]:
    return (self.method.image_size,) * 2

  def set_params(self, params, aux) -> None:
    self.params, self.aux = params, aux

  # --- GuidablePrior ------------------------------------------------------------------
  def model_fn(self):
    p = self.params["model"]
    unet = self.method.unet
    return lambda x, t: unet.apply({"params": p}, x, t)

  def field_fn(self):
    decode = self.autoencoder.decode_fn()
    scale = self.method.scale
    return lambda x0: decode(x0 / scale)

  def render_fn(self):
    return self.autoencoder.render_points_fn()

  # --- sampling -----------------------------------------------------------------------
  def _sample_impl(self, params, noise, keys, eta):
    """noise [B, h, w, C], keys [B] -> x_0 [B, h, w, C]: one DDIM chain per sample.

    Each chain draws its step noise from its own key, so a sample depends on its seed and
    index only, not on the batch it is computed in (the batch is vmapped, not mixed).
    """
    self.trace_count += 1
    unet = self.method.unet
    p = params["model"]
    model_fn = lambda x, t: unet.apply({"params": p}, x, t)

    def one(n, k):
      return gaussian.ddim_sample(
          model_fn,
          self.schedule,
          n[None],
          k,
          num_steps=self.num_steps,
          eta=eta,
          parameterization=self.parameterization,
      )[0]

    return jax.vmap(one)(noise, keys)

  def latents(self, conditions, num: int = 1, seed: int = 0) -> np.ndarray:
    """Diffusion-space latents x_0 [len(conditions) * num, h, w, C] (`render` takes them).

    Sample i starts from noise of fold_in(PRNGKey(seed), i) and draws its DDIM noise from
    fold_in(that key, 1), whatever the batch it is computed in.
    """
    conditions = self.check_conditions(conditions)
    if num <= 0:
      raise ValueError(f"--num must be positive, got {num}")
    out = []
    for count, keys in self.key_batches(len(conditions) * num, seed, self.batch_size):
      noise = jnp.stack([jax.random.normal(k, self.latent_shape, jnp.float32) for k in keys])
      step_keys = jnp.stack([jax.random.fold_in(k, 1) for k in keys])
      x0 = self._sample(self.params, noise, step_keys, jnp.float32(self.eta))
      out.append(np.asarray(jax.device_get(x0))[:count])
    return np.concatenate(out)

  def render(self, latents, height: int, width: int) -> np.ndarray:
    """[N, h, w, C] diffusion-space latents -> [N, height, width, 3] in [0, 1] (clipped)."""
    z = np.asarray(latents, np.float32) / self.method.scale  # stage-1 units
    img = self.autoencoder.render(z, height, width, tile=self.tile)
    return np.clip(img, 0.0, 1.0, out=img)


def _autoencoder(method, aux):
  """The `FieldAutoencoder` that draws the samples: the decoder stage's if the config names
  one, else the autoencoder's own on the frozen parameters in `aux`."""
  if method.decoder is not None:
    return method.decoder
  return method.ae_method.make_inference({"model": aux["ae"]}, method._ae_aux)
