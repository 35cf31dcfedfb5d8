"""∞-Diff's main stage: mollified diffusion trained on random pixel subsets (METHODS.md).

Per training image x_0 in [-1, 1] at N x N (`infty_diff.image_size`):

  t ~ U{0..T-1}, eps ~ N(0, I)                      (cosine schedule, T = 1000)
  x_t    = T(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps)   full resolution, DCT mollifier
  target = T eps                                       (mollified noise; or the
                                                       mollified v, a config choice)
  S      = N^2 / rate pixels, uniform without replacement, a new subset per image
  loss   = MSE(f(x_t[S], S, t, z), target[S])

f is `models.sparse_unet.SparseOperatorUNet` on the points S only (sparse depthwise
convolutions, k-nearest interpolation to the inner grid UNet and back). As a diffusion
autoencoder (z_dim > 0, the paper's conditional model) an encoder of the same down path
sees the clean x_0 at a fresh independent subset and gives z; denoiser and encoder are
one parameter group {'net', 'encoder'} trained by the one loss, clipped per network
(`optim.grad_clip_per`), EMA 0.995 every 10 steps. After training, `finalize` writes the
statistics of z over training images (for the `infty_diff_latent` stage) or, for an
unconditional model, sample grids.

The shapes are static (P = N^2 / rate points), so the step compiles once.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from infdiff.data import transforms
from infdiff.diffusion import gaussian, mollifier
from infdiff.methods import base, latents
from infdiff.models import sparse
from infdiff.models.sparse_unet import SparseEncoder, SparseOperatorUNet


def build_networks(cfg, image_size: int):
  """(denoiser, encoder or None) from an `infty_diff` config section."""
  n, u = cfg.net, cfg.net.unet
  common = dict(
      nf=n.nf,
      num_blocks=n.num_blocks,
      kernel_size=n.kernel_size,
      train_side=image_size,
      # Full-grid evaluation uses the mean of the kernels trained at this rate.
      train_rate=float(cfg.rate) if cfg.net.get("density_match", True) else 1.0,
      grid_size=n.grid_size,
      grid_channels=n.grid_channels,
      knn=n.knn,
      sparse_conv_impl=n.get("sparse_conv_impl", "xla"),
      ch=u.ch,
      channel_mult=tuple(u.channel_mult),
      num_res_blocks=u.num_res_blocks,
      attention_resolutions=tuple(u.attention_resolutions),
      head_channels=u.head_channels,
      dtype=jnp.dtype(cfg.dtype),
  )
  net = SparseOperatorUNet(
      **common,
      dropout=u.dropout,
      dropout_resolution=u.dropout_resolution,
      z_dim=int(cfg.z_dim),
  )
  enc = SparseEncoder(z_dim=int(cfg.z_dim), **common) if cfg.z_dim else None
  return net, enc


def num_points(cfg, image_size: int) -> int:
  """Points per training image: N^2 / rate (at least 1)."""
  rate = float(cfg.rate)
  if rate < 1:
    raise ValueError(f"infty_diff.rate must be >= 1 (a subsampling rate), got {rate}")
  return max(1, int(round(image_size * image_size / rate)))


class Method(base.Method):
  """∞-Diff denoiser (+ diffusion-autoencoder encoder) on random pixel subsets."""

  provides = (base.GENERATOR,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.image_size = int(c.image_size)
    self.z_dim = int(c.z_dim)
    levels = len(c.net.unet.channel_mult)
    if c.net.grid_size % 2 ** (levels - 1):
      raise ValueError(
          f"infty_diff.net.grid_size={c.net.grid_size} cannot be halved {levels - 1} times "
          f"(net.unet.channel_mult={tuple(c.net.unet.channel_mult)})"
      )
    if c.net.kernel_size % 2 == 0:
      raise ValueError(f"infty_diff.net.kernel_size must be odd, got {c.net.kernel_size}")
    self.points = num_points(c, self.image_size)
    d = c.diffusion
    self.schedule = gaussian.make_schedule(d.schedule, int(d.num_steps))
    self.parameterization = str(d.get("parameterization", "eps"))
    if self.parameterization not in gaussian.PARAMETERIZATIONS:
      raise ValueError(
          f"infty_diff.diffusion.parameterization must be one of "
          f"{gaussian.PARAMETERIZATIONS}, got {self.parameterization!r}"
      )
    self.net, self.encoder = build_networks(c, self.image_size)

  def data_transform(self, split):
    del split
    return transforms.RandomResizedSquare(size=self.image_size)

  # --- parameters ---------------------------------------------------------------------
  def init(self, rng, batch):
    b, n = batch["image"].shape[0], self.image_size
    r_net, r_enc, r_pts = jax.random.split(rng, 3)
    pts = sparse.point_set(sparse.random_subset(r_pts, b, n, n, self.points), n, n)
    x = jnp.zeros((b, self.points, 3), jnp.float32)
    t = jnp.zeros((b,), jnp.int32)
    z = jnp.zeros((b, self.z_dim), jnp.float32) if self.z_dim else None
    params = {"net": self.net.init(r_net, x, pts, n, n, t, z)["params"]}
    if self.encoder is not None:
      params["encoder"] = self.encoder.init(r_enc, x, pts, n, n)["params"]
    return {"model": params}

  # --- training -----------------------------------------------------------------------
  def mollify(self, x):
    return mollifier.mollify(x, float(self.cfg.mollifier.sigma))

  def encode_points(self, enc_params, x0, pts, dense=False):
    """z [B, z_dim] of clean x_0 [B, N, N, 3] in [-1, 1] seen at the points `pts`."""
    n = self.image_size
    vals = sparse.gather_points(x0, pts)
    return self.encoder.apply({"params": enc_params}, vals, pts, n, n, dense=dense)

  def encode_full(self, enc_params, x0):
    """z of clean images [B, N, N, 3] in [-1, 1] seen at every pixel."""
    b, n = x0.shape[0], self.image_size
    return self.encode_points(enc_params, x0, sparse.full_point_set(b, n, n), dense=True)

  def loss(self, group, params, aux, batch, rng, step):
    del group, aux, step
    p = params["model"]
    n, b = self.image_size, batch["image"].shape[0]
    k_t, k_eps, k_pts, k_enc, k_drop = jax.random.split(rng, 5)
    x0 = batch["image"].astype(jnp.float32) * 2.0 - 1.0
    t = gaussian.sample_timesteps(k_t, b, self.schedule.num_steps)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    # The mollifier is linear: x_t = T(a x0 + s eps) = a T x0 + s T eps, so one transform of
    # (x0, eps) gives the state and the target of any parameterisation (T eps for 'eps',
    # the paper's; a T eps - s T x0 for 'v').
    both = self.mollify(jnp.concatenate([x0, eps], -1))
    tx0, teps = both[..., :3], both[..., 3:]
    x_t = gaussian.q_sample(self.schedule, tx0, t, teps)
    target = gaussian.model_target(self.schedule, tx0, teps, t, self.parameterization)
    pts = sparse.point_set(sparse.random_subset(k_pts, b, n, n, self.points), n, n)
    z = None
    if self.encoder is not None:
      enc_pts = sparse.point_set(sparse.random_subset(k_enc, b, n, n, self.points), n, n)
      z = self.encode_points(p["encoder"], x0, enc_pts)
    out = self.net.apply(
        {"params": p["net"]},
        sparse.gather_points(x_t, pts),
        pts,
        n,
        n,
        t,
        z,
        train=True,
        rngs={"dropout": k_drop},
    )
    loss = gaussian.regression_loss(out, sparse.gather_points(target, pts), "mse")
    return loss, {"mse": loss}

  # --- inference ----------------------------------------------------------------------
  def make_inference(self, params, aux, **options):
    """`MollifiedDDIM` (options: num_steps, batch_size, deblur,
    clip_denoised) for an unconditional model."""
    from infdiff.methods.infty_diff.sampler import MollifiedDDIM

    del aux
    allowed = {"num_steps", "batch_size", "deblur", "clip_denoised"}
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise ValueError(f"{self.stage} sampling has no option(s) {', '.join(unknown)}")
    return MollifiedDDIM(self, params, **options)

  def latent_stats(self) -> dict | None:
    """{'mean', 'std', 'count'} of z written by `finalize`, or None before it ran."""
    return latents.read_stats(self.workdir)

  def finalize(self, ctx):
    """z statistics (diffusion autoencoder) or sample grids (unconditional model)."""
    params = ctx.state.ema or ctx.state.params
    if self.encoder is not None:
      stats = self.z_statistics(ctx, params["model"]["encoder"])
      latents.write_stats(self.workdir, stats, self.stage)
      return
    from infdiff import sampling

    gen = self.inference(params, ctx.aux)
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    sizes = [(s, s) for s in self.cfg.sample.sizes]
    for (w, h), images in gen.iter_sample([""], int(self.cfg.sample.num), self.config.seed, sizes):
      sampling.save_grid(os.path.join(out, f"grid_{w}x{h}.png"), images)

  def z_statistics(self, ctx, enc_params) -> dict:
    """Per-dimension mean/std of z over `stats_images` training images (full grid)."""
    c = self.cfg
    loader = ctx.make_loader(
        transform=self.data_transform("train"),
        split="train",
        num_epochs=None,
        batch_size=c.stats_batch_size,
    )
    encode = jax.jit(lambda p, img: self.encode_full(p, img * 2.0 - 1.0))
    zs, seen = [], 0
    for batch in loader:
      if seen >= c.stats_images:
        break
      take = min(len(batch["image"]), c.stats_images - seen)
      seen += take
      zs.append(np.asarray(jax.device_get(encode(enc_params, jnp.asarray(batch["image"]))))[:take])
    if not zs:
      raise ValueError("z statistics: the training set gave no batch")
    z = np.concatenate(zs).astype(np.float64)
    return {"mean": z.mean(0).tolist(), "std": np.maximum(z.std(0), 1e-6).tolist(), "count": seen}
