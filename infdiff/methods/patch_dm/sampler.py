"""Patch-DM sampling at any size: DDIM over the whole canvas, the denoiser run per patch.

At every DDIM step (paper: 50, eta 0) the noise prediction of an H x W canvas (multiples
of the patch p) is assembled from patches (`collage`):

  'feature' (Patch-DM)  pad x_t by p / 2, encode the (H/p + 1) x (W/p + 1) padded patches
                        in batches, collage neighbouring features at every level, decode
                        the H/p x W/p image patches at their positions;
  'none'                every image patch encoded and decoded alone (paper Fig. 2a);
  'shift'               'none', alternating between the image grid and the half-patch
                        shifted grid from step to step, the last step on the image grid
                        (pixel-space collage, paper Fig. 2b).

Positions (patch centres in units of the training frame's patches):
  'stretch'  the canvas covers the training frame: a 2x canvas inserts patches at
             interpolated positions (paper §5.4, 2x resolution);
  'extend'   the training frame sits in the canvas centre at its own positions and the
             patches outside it get no position (the null embedding of the position
             dropout), the paper's beyond-boundary generation.

The semantic code of sample i comes from the run's code sampler (the `patch_dm_codes`
latent model, or, for the main stage alone, the code of a random training image) with key
fold_in(key_i, 1); the canvas noise from fold_in(key_i, 0). With guidance_scale w != 1 the
prediction is uncond + w (cond - uncond), the unconditional branch without code and
position (classifier-free guidance; train with `patch_dm.cfg.enabled`).

Memory: the patch UNet runs on `patch_batch` patches at a time (`lax.map`), so its
activations do not grow with the canvas; the collaged features of all patches (the skips,
about 4 x ch floats per pixel) do, like the canvas.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import fields
from infdiff.diffusion import gaussian
from infdiff.methods import base
from infdiff.methods.patch_dm import collage

COLLAGE_MODES = ("feature", "none", "shift")
POSITION_MODES = ("stretch", "extend")


class PatchDDIM(base.Generator, base.GuidablePrior):
  """Unconditional Patch-DM generator and a `GuidablePrior` over canvas pixels."""

  conditional = False
  eta = 0.0  # DDIM, deterministic
  clip_x0 = 1.0  # x0_hat clipped to [-1, 1] at every step
  pixel_state = True  # the diffusion state is the canvas (guide's --step_rule=replace)

  def __init__(
      self,
      method,
      params,
      *,
      code_sampler=None,
      num_steps=None,
      batch_size=None,
      patch_batch=None,
      collage=None,
      positions=None,
      guidance_scale=None,
      height=None,
      width=None,
  ):
    s = method.cfg.sample
    self.method = method
    self.params = params
    self.code_sampler = code_sampler
    self.patch_size = method.patch
    self.num_steps = int(num_steps or s.num_steps)
    self.batch_size = int(batch_size or s.batch_size)
    self.patch_batch = int(patch_batch or s.patch_batch)
    self.collage = str(collage or s.collage)
    self.positions = str(positions or s.positions)
    self.guidance_scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
    self.max_size = int(s.max_size)
    self.schedule = method.schedule
    self.parameterization = method.parameterization
    if self.collage not in COLLAGE_MODES:
      raise ValueError(f"collage must be one of {COLLAGE_MODES}, got {self.collage!r}")
    if self.positions not in POSITION_MODES:
      raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
    if not 1 <= self.num_steps <= self.schedule.num_steps:
      raise ValueError(f"num_steps must be in 1..{self.schedule.num_steps}, got {self.num_steps}")
    if self.batch_size < 1 or self.patch_batch < 1:
      raise ValueError("batch_size and patch_batch must be positive")
    # The three samplers `--metric=seams` compares on the same weights.
    self.seam_samplers = {
        "feature_collage": {"collage": "feature"},
        "independent": {"collage": "none"},
        "pixel_shift": {"collage": "shift"},
    }
    self.canvas = (height, width)
    if height is not None:
      self.latent_shape = (int(height), int(width), 3)
    self.patch_traces = {}  # traces of the jitted patch functions (host sampling)
    self._jitted = {}

  @property
  def native_size(self) -> tuple[int, int]:
    return (self.method.height, self.method.width)

  def set_params(self, params, aux) -> None:
    del aux
    self.params = params

  def default_sizes(self):
    return [tuple(v) for v in self.method.cfg.sample.sizes]

  # --- sizes and positions -------------------------------------------------------------
  def check_size(self, height: int, width: int) -> None:
    m = self.method
    collage.check_patch(height, width, self.patch_size, len(m.cfg.unet.channel_mult))
    if max(height, width) > self.max_size:
      raise ValueError(
          f"{width}x{height} exceeds patch_dm.sample.max_size={self.max_size}; raise it to "
          "sample larger canvases"
      )

  def _positions(self, pos, nh: int, nw: int):
    """Canvas patch centres [..., 2] (canvas patch units) -> (training-frame positions,
    keep [..., 1]: 0 where the patch has no position)."""
    th, tw = self.method.grid
    pos = jnp.asarray(pos)
    if self.positions == "stretch":
      scale = jnp.asarray([th / nh, tw / nw], jnp.float32)
      return pos * scale, jnp.ones((*pos.shape[:-1], 1), jnp.float32)
    offset = jnp.asarray([(nh - th) / 2.0, (nw - tw) / 2.0], jnp.float32)
    q = pos - offset
    inside = (q[..., 0] >= 0) & (q[..., 0] <= th) & (q[..., 1] >= 0) & (q[..., 1] <= tw)
    return q, inside[..., None].astype(jnp.float32)

  # --- the patch UNet on a batch of patches -----------------------------------------------
  def _embed(self, up, t, feats, code):
    return self.method.unet.apply(up, t, feats, code, method="embed")

  def _encode(self, up, x, t, feats, code):
    """Patches [N, p, p, 3] -> (skips, bottleneck) of the UNet encoder."""
    return self.method.unet.apply(up, x, self._embed(up, t, feats, code), method="encode")

  def _decode(self, up, skips, h, t, feats, code):
    """(Collaged) skips and bottleneck of N patches -> eps_hat [N, p, p, 3]."""
    return self.method.unet.apply(up, skips, h, self._embed(up, t, feats, code), method="decode")

  def _whole(self, up, x, t, feats, code):
    return self._decode(up, *self._encode(up, x, t, feats, code), t, feats, code)

  def _patch_map(self, name, up, host, *xs):
    """`self._<name>(up, *xs)` over N patches, `patch_batch` at a time.

    Traced (host=False): `lax.map` inside the caller's program (guidance). Host: the
    stage's jitted function on fixed-size chunks (the last one zero-padded), so it
    compiles once per patch batch whatever the canvas.
    """
    fn = getattr(self, f"_{name}")
    n = jax.tree.leaves(xs)[0].shape[0]
    if not host:
      single = lambda a: jax.tree.map(lambda v: v[0], fn(up, *jax.tree.map(lambda v: v[None], a)))
      return jax.lax.map(single, xs, batch_size=self.patch_batch)
    k = self.patch_batch
    if name not in self._jitted:

      def counted(*args, fn=fn, name=name):
        self.patch_traces[name] = self.patch_traces.get(name, 0) + 1
        return fn(*args)

      self._jitted[name] = jax.jit(counted)

    def piece(v, start):  # rows start..start+k of v, zero-padded to k
      rows = v[start : start + k]
      return jnp.pad(rows, [(0, k - rows.shape[0])] + [(0, 0)] * (v.ndim - 1))

    outs = []
    for start in range(0, n, k):
      out = self._jitted[name](up, *jax.tree.map(functools.partial(piece, start=start), xs))
      outs.append(out)
    return jax.tree.map(lambda *v: jnp.concatenate(v)[:n], *outs)

  # --- the denoiser on a canvas ----------------------------------------------------------
  def denoiser(self, params, height: int, width: int, host: bool = False):
    """`(x [B, H, W, 3], t [B], code [B, K]) -> eps_hat [B, H, W, 3]`; traceable unless
    `host` (then it runs the jitted patch functions from Python)."""
    m, ps = self.method, self.patch_size
    nh, nw = height // ps, width // ps
    up = {"params": params["model"]["unet"]}
    pos_dim = int(m.cfg.pos_dim)
    run_patches = lambda name, *xs: self._patch_map(name, up, host, *xs)

    def inputs(b, t, code, grid_pos, use_pos):
      """Per-patch (t, position features, code) of a [n, m] patch grid, row-major."""
      pos, keep = self._positions(grid_pos, nh, nw)
      feats = collage.position_features(pos, pos_dim) * (keep if use_pos else 0.0)
      n = grid_pos.shape[0] * grid_pos.shape[1]
      feats = jnp.broadcast_to(feats.reshape(1, n, pos_dim), (b, n, pos_dim))
      return jnp.repeat(t, n), feats.reshape(b * n, pos_dim), jnp.repeat(code, n, axis=0)

    def per_patch(x, t, code, shifted, use_pos):
      """Every patch alone, on the image grid or (shifted) the half-patch padded grid."""
      b = x.shape[0]
      tiles = collage.split(collage.pad_half(x, ps) if shifted else x, ps)
      grid_pos = collage.padded_positions(nh, nw) if shifted else collage.image_positions(nh, nw)
      out = run_patches(
          "whole", tiles.reshape(-1, ps, ps, 3), *inputs(b, t, code, grid_pos, use_pos)
      )
      out = collage.merge(out.reshape(tiles.shape))
      half = ps // 2
      return out[:, half : half + height, half : half + width] if shifted else out

    def feature_collage(x, t, code, use_pos):
      b = x.shape[0]
      tiles = collage.split(collage.pad_half(x, ps), ps)  # [B, nh+1, nw+1, p, p, 3]
      skips, h = run_patches(
          "encode",
          tiles.reshape(-1, ps, ps, 3),
          *inputs(b, t, code, collage.padded_positions(nh, nw), use_pos),
      )

      def coll(f):  # [B (nh+1)(nw+1), r, r, C] -> [B nh nw, r, r, C]
        g = collage.collage(f.reshape(b, nh + 1, nw + 1, *f.shape[1:]))
        return g.reshape(-1, *f.shape[1:])

      out = run_patches(
          "decode",
          [coll(s) for s in skips],
          coll(h),
          *inputs(b, t, code, collage.image_positions(nh, nw), use_pos),
      )
      return collage.merge(out.reshape(b, nh, nw, ps, ps, 3))

    steps = np.asarray(gaussian.ddim_timesteps(self.schedule.num_steps, self.num_steps))

    def predict(x, t, code, use_pos=True):
      if self.collage == "feature":
        return feature_collage(x, t, code, use_pos)
      if self.collage == "none":
        return per_patch(x, t, code, False, use_pos)
      # Shifted at every other step, counted from the last, which is on the image grid
      # (so the final image's patch boundaries are those `--metric=seams` measures).
      last = len(steps) - 1
      if host:  # the step index is known on the host
        odd = (last - int(np.argmax(steps == int(t[0])))) % 2 == 1
        return per_patch(x, t, code, odd, use_pos)
      odd = (last - jnp.argmax(jnp.asarray(steps) == t[0])) % 2 == 1
      return jax.lax.cond(
          odd,
          lambda a, b, c: per_patch(a, b, c, True, use_pos),
          lambda a, b, c: per_patch(a, b, c, False, use_pos),
          x,
          t,
          code,
      )

    w = self.guidance_scale

    def fn(x, t, code):
      cond = predict(x, t, code)
      if w == 1.0:
        return cond
      # Classifier-free guidance: the unconditional branch has no code and no position.
      uncond = predict(x, t, jnp.zeros_like(code), use_pos=False)
      return uncond + w * (cond - uncond)

    return fn

  # --- sampling --------------------------------------------------------------------------
  def codes(self, keys):
    """[B, K] semantic codes for per-sample keys (zeros, the null code, without a sampler)."""
    if self.code_sampler is None:
      return jnp.zeros((len(keys), self.method.code_dim), jnp.float32)
    return self.code_sampler([jax.random.fold_in(k, 1) for k in keys])

  def noise(self, keys, height: int, width: int):
    return jnp.stack(
        [jax.random.normal(jax.random.fold_in(k, 0), (height, width, 3)) for k in keys]
    )

  def _sample_canvas(self, noise, code, height: int, width: int):
    """DDIM (eta 0, x0 clipped) from a Python loop; the patch UNet runs jitted."""
    fn = self.denoiser(self.params, height, width, host=True)
    return gaussian.ddim_sample(
        lambda x, t: fn(x, t, code),
        self.schedule,
        noise,
        num_steps=self.num_steps,
        eta=0.0,
        parameterization=self.parameterization,
        clip_x0=1.0,
        loop="python",
    )

  def iter_sample(self, conditions, num: int, seed: int, sizes):
    conditions = self.check_conditions(conditions)
    if num <= 0:
      raise ValueError(f"--num must be positive, got {num}")
    sizes = [(int(w), int(h)) for w, h in sizes]
    for w, h in sizes:
      self.check_size(h, w)
    n_total = len(conditions) * num
    for w, h in sizes:
      out = []
      for count, keys in self.key_batches(n_total, seed, self.batch_size):
        x = self._sample_canvas(self.noise(keys, h, w), self.codes(keys), h, w)
        img = (np.asarray(jax.device_get(x), np.float32) + 1.0) / 2.0
        out.append(np.clip(img, 0.0, 1.0)[:count])
      yield (w, h), np.concatenate(out)

  # --- GuidablePrior ---------------------------------------------------------------------
  def guidance_view(self, height: int, width: int) -> PatchDDIM:
    self.check_size(height, width)
    view = PatchDDIM.__new__(PatchDDIM)
    view.__dict__.update(self.__dict__)
    view.canvas = (int(height), int(width))
    view.latent_shape = (int(height), int(width), 3)
    return view

  def _check_view(self):
    if self.canvas[0] is None:
      raise ValueError("Patch-DM guidance works on a canvas: call guidance_view(H, W) first")
    return self.canvas

  def initial_state(self, keys):
    h, w = self._check_view()
    return self.noise(keys, h, w), self.codes(keys)

  def model_fn(self):
    h, w = self._check_view()
    fn = self.denoiser(self.params, h, w)
    return lambda x, t, code: fn(x, t, code)

  def field_fn(self):
    return lambda x0: x0

  def render_fn(self):
    def render(field, coords, cells):
      del cells
      return (fields.interpolate_latent(field, coords, "bilinear") + 1.0) / 2.0

    return render

  def to_images(self, x0, height: int, width: int) -> np.ndarray:
    img = np.asarray(jax.device_get(x0), np.float32)
    return np.clip((img + 1.0) / 2.0, 0.0, 1.0)
