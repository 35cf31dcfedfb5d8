"""∞-Diff sampling at any resolution: mollified DDIM on the full pixel grid.

At an H x W canvas of a model trained at N x N (METHODS.md: ∞-Diff):
- the mollifier's sigma is scaled by H/N and W/N (`mollifier.scaled_sigmas`), so the
  DCT gains, i.e. the blur as an operator on functions, stay the same;
- the initial state is mollified white noise times sqrt((H/N)(W/N)) (N'/N on a square):
  the per-pixel std of blurred white noise falls like 1/sigma, and this restores it;
- the depthwise kernels are resized to the odd size nearest k H/N (k W/N), at least 3
  (`sparse_unet.kernel_size_at`), the inner grid stays G x G;
- DDIM with eta 0 (`gaussian.ddim_sample`, deterministic) on all H*W pixels, x0_hat
  clipped to [-1, 1] (`clip_denoised`); the output is T x_0 mapped to [0, 1], or its
  Wiener deblurring (`deblur`, the image the paper evaluates).

Sample i of a call starts from fold_in(PRNGKey(seed), i): its state noise is drawn from
fold_in(key_i, 0) and, for the diffusion autoencoder, its latent z from fold_in(key_i, 1),
so sample i has the same z at every size and does not depend on the batch it is in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import fields
from infdiff.diffusion import gaussian, mollifier
from infdiff.methods import base
from infdiff.models import sparse


class MollifiedDDIM(base.Generator, base.GuidablePrior):
  """Unconditional ∞-Diff generator (and a `GuidablePrior` over canvas pixels)."""

  conditional = False

  def __init__(
      self,
      method,
      params,
      *,
      z_sampler=None,
      num_steps=None,
      batch_size=None,
      deblur=None,
      clip_denoised=None,
      height=None,
      width=None,
  ):
    """Args:
    method: the `infty_diff` stage's Method (network, schedule, config).
    params: its {'model': {'net': ..., 'encoder': ...}} parameters (EMA).
    z_sampler: `keys [B] -> z [B, z_dim]` for a diffusion-autoencoder model (the latent
      stage's sampler), None for an unconditional one.
    num_steps, batch_size, deblur, clip_denoised: sampling options (defaults: the
      stage's `sample`).
    height, width: the canvas of a guidance view (`guidance_view`), else None.
    """
    s = method.cfg.sample
    self.method = method
    self.params = params
    self.z_sampler = z_sampler
    self.num_steps = int(num_steps or s.num_steps)
    self.batch_size = int(batch_size or s.batch_size)
    self.deblur = bool(s.deblur if deblur is None else deblur)
    self.max_size = int(s.max_size)
    clip = s.clip_denoised if clip_denoised is None else clip_denoised
    self.clip_x0 = 1.0 if clip else None
    self.eta = 0.0
    self.schedule = method.schedule
    self.parameterization = method.parameterization
    if method.z_dim and z_sampler is None:
      raise ValueError(
          "this ∞-Diff model is conditioned on an autoencoder latent z: sample it through "
          "its infty_diff_latent stage (train that stage first)"
      )
    if not 1 <= self.num_steps <= self.schedule.num_steps:
      raise ValueError(f"num_steps must be in 1..{self.schedule.num_steps}, got {self.num_steps}")
    self.canvas = (height, width)
    if height is not None:
      self.latent_shape = (int(height), int(width), 3)
    self.trace_count = 0  # times the DDIM loop was traced (one per canvas size)
    self._sample = jax.jit(self._sample_impl, static_argnums=(3, 4))

  @property
  def native_size(self) -> tuple[int, int]:
    return (self.method.image_size,) * 2

  def set_params(self, params, aux) -> None:
    del aux
    self.params = params

  # --- the process at a canvas -------------------------------------------------------
  def sigmas(self, height: int, width: int) -> tuple[float, float]:
    m = self.method
    return mollifier.scaled_sigmas(m.cfg.mollifier.sigma, height, width, m.image_size)

  def noise(self, keys, height: int, width: int) -> jax.Array:
    """Initial states [B, H, W, 3]: mollified white noise x sqrt((H/N)(W/N))."""
    n = self.method.image_size
    white = jnp.stack(
        [jax.random.normal(jax.random.fold_in(k, 0), (height, width, 3)) for k in keys]
    )
    gain = float(np.sqrt((height / n) * (width / n)))
    return mollifier.mollify(white, *self.sigmas(height, width)) * gain

  def latents_z(self, keys):
    """z [B, z_dim] for per-sample keys (None for an unconditional model)."""
    if self.z_sampler is None:
      return None
    return self.z_sampler([jax.random.fold_in(k, 1) for k in keys])

  def denoiser(self, params, height: int, width: int):
    """`(x [B, H, W, 3], t [B], z) -> output [B, H, W, 3]` (T eps_hat or the mollified v)."""
    m = self.method

    def fn(x, t, z=None):
      b = x.shape[0]
      pts = sparse.full_point_set(b, height, width)
      out = m.net.apply(
          {"params": params["model"]["net"]},
          x.reshape(b, height * width, 3),
          pts,
          height,
          width,
          t,
          z,
          dense=True,
      )
      return out.reshape(b, height, width, 3)

    return fn

  def output(self, x0: jax.Array, height: int, width: int) -> jax.Array:
    """Final state (T x_0 in [-1, 1]) -> image in [-1, 1] (Wiener-deblurred if `deblur`)."""
    if self.deblur:
      x0 = mollifier.wiener(x0, *self.sigmas(height, width))
    return x0

  def _sample_impl(self, params, noise, z, height, width):
    self.trace_count += 1
    fn = self.denoiser(params, height, width)
    model_fn = fn if z is None else functools.partial(lambda f, z, x, t: f(x, t, z), fn, z)
    x0 = gaussian.ddim_sample(
        model_fn,
        self.schedule,
        noise,
        num_steps=self.num_steps,
        eta=0.0,
        parameterization=self.parameterization,
        clip_x0=self.clip_x0,
    )
    return self.output(x0, height, width)

  # --- Generator ---------------------------------------------------------------------
  def iter_sample(self, conditions, num: int, seed: int, sizes):
    conditions = self.check_conditions(conditions)
    if num <= 0:
      raise ValueError(f"--num must be positive, got {num}")
    n_total = len(conditions) * num
    for w, h in sizes:
      out = []
      for count, keys in self.key_batches(n_total, seed, self.batch_size):
        x = self._sample(self.params, self.noise(keys, h, w), self.latents_z(keys), h, w)
        img = (np.asarray(jax.device_get(x), np.float32) + 1.0) / 2.0
        out.append(np.clip(img, 0.0, 1.0)[:count])
      yield (w, h), np.concatenate(out)

  # --- GuidablePrior -----------------------------------------------------------------
  def guidance_view(self, height: int, width: int) -> MollifiedDDIM:
    """The prior over H x W canvases: its diffusion state is the canvas itself."""
    view = MollifiedDDIM.__new__(MollifiedDDIM)
    view.__dict__.update(self.__dict__)
    view.canvas = (int(height), int(width))
    view.latent_shape = (int(height), int(width), 3)
    return view

  def _check_view(self):
    if self.canvas[0] is None:
      raise ValueError("∞-Diff guidance works on a canvas: call guidance_view(H, W) first")
    return self.canvas

  def initial_state(self, keys):
    h, w = self._check_view()
    return self.noise(keys, h, w), self.latents_z(keys)

  def model_fn(self):
    h, w = self._check_view()
    fn = self.denoiser(self.params, h, w)
    return fn if self.z_sampler is not None else (lambda x, t, z=None: fn(x, t))

  def field_fn(self):
    h, w = self._check_view()
    return lambda x0: self.output(x0, h, w)

  def render_fn(self):
    """Bilinear samples of the canvas at any points (pixel-centre convention) in [0, 1]."""

    def render(field, coords, cells):
      del cells  # point samples of the pixel grid (a 2x low-res pixel is 2x2 of them)
      return (fields.interpolate_latent(field, coords, "bilinear") + 1.0) / 2.0

    return render

  def to_images(self, x0, height: int, width: int) -> np.ndarray:
    """Final DDIM states -> canvases in [0, 1] (deblurred like `iter_sample`'s if `deblur`)."""
    img = np.asarray(jax.device_get(self.output(jnp.asarray(x0), height, width)), np.float32)
    return np.clip((img + 1.0) / 2.0, 0.0, 1.0)
