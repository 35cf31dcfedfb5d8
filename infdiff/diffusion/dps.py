"""Diffusion posterior sampling (DPS, Chung et al. 2023) on a latent prior over fields.

INFD (Sec. 5.5) solves inverse problems whose conditions sit at different scales of the
same image: a text for a box of a 2K canvas, a low-resolution version of the whole
image, a known high-resolution crop. Its latent is a field, so each condition renders
only its own region, at its own resolution, through the field renderer; the cost of a
condition does not depend on the canvas size.

At every DDIM step (`gaussian.ddim_timesteps`, the sampler's grid) with state x_t:

  x0_hat = x0(x_t)                              (model, `to_x0_eps`; a function of x_t)
  field  = field_fn(x0_hat)
  cost_k = condition k's error at field         (render of its region only)
  x_s    = DDIM(x_t; x0_hat, eps_hat, eta)      (as `gaussian.ddim_sample`)
  x_s   -= scale * grad_{x_t} sum_k w_k term_k

with the gradient taken through the denoiser, as DPS does (its Algorithm 1: the
gradient of the measurement error of x0_hat(x_t) with respect to x_t). Two step rules:

- 'dps': the normalised DPS step. For norm-type conditions (LowRes, Crop,
  ColourLayout, whose cost is a mean squared residual over n values) term_k is the
  residual norm ||y - A(x0_hat)||_2 = sqrt(n cost_k), so the step is
  scale * grad ||r|| = scale * grad ||r||^2 / (2 ||r||): DPS's step zeta_i grad ||r||^2
  with zeta_i = zeta' / ||y - A(x0_hat)|| and zeta' = scale / 2 (the official DPS code
  differentiates the norm itself, with scale as its step size). Scores that are not
  norms (ClipText's 1 - cos) enter as they are.
- 'plain': term_k = cost_k for every condition; the step is scale * grad cost.
- 'replace': no gradient; after every step the pixels of each Crop are replaced by the
  known pixels noised to the new level, sqrt(abar_s) y + sqrt(1 - abar_s) z (the
  outpainting and inpainting of Patch-DM's §5.4; the last step writes y itself). Only
  for priors whose state is the canvas in [-1, 1] (`pixel_state`), Crop conditions only;
  scale 0 switches it off (the unguided reference).

The step size is task-dependent, as DPS's zeta' is (tuned per task in the paper); the
weights w_k balance several conditions under one scale. Neither INFD nor DPS gives
values for layout guidance: choose them per prior (tests/test_dps.py's toy prior needs
2-20 for the pixel conditions and 30 for CLIP with the 'dps' rule).

A condition (LowRes, Crop, ColourLayout, ClipText below) is a pytree: its targets are
array leaves and its geometry (boxes, grid sizes) static, so a jitted sampler takes the
conditions as an argument and compiles once per geometry. It provides
`cost(render_fn, field, batch) -> [B]` (the error at a field, what guidance lowers) and
`error(images) -> [N]` (the same error measured on final canvas images, with no
guidance-specific path: crops, area downsampling, box means, CLIP on the crop).

Boxes are (top, left, height, width) in pixels of a canvas (H, W) (`Box`). Their
coordinates follow METHODS.md: pixel centres of the canvas grid restricted to the box,
so rendering a box at the canvas resolution gives exactly the matching window of the
full canvas render (`box_grid`, equal to `fields.crop_grid`), and rendering it at
another grid (ClipText's 224^2) spans the same region with proportionally larger cells.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from infdiff import fields
from infdiff.diffusion import gaussian

RenderFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
STEP_RULES = ("dps", "plain", "replace")
# Added under the square root of the 'dps' rule so that a zero residual has a finite
# gradient (d sqrt(u) / du is infinite at 0).
_NORM_EPS = 1e-12


# --- boxes -----------------------------------------------------------------------------
class Box(NamedTuple):
  """A rectangle of canvas pixels: rows [top, top + height), cols [left, left + width)."""

  top: int
  left: int
  height: int
  width: int
  canvas_height: int  # H of the canvas the pixels belong to
  canvas_width: int  # W

  @classmethod
  def whole(cls, height: int, width: int) -> Box:
    """The whole canvas of height x width pixels (the whole [-1, 1]^2 domain)."""
    return cls(0, 0, height, width, height, width)

  def check(self) -> None:
    """One-line ValueError unless the box is non-empty and inside its canvas."""
    t, le, h, w, ch, cw = (int(v) for v in self)
    if min(h, w, ch, cw) <= 0 or t < 0 or le < 0 or t + h > ch or le + w > cw:
      raise ValueError(
          f"box (top={t}, left={le}, height={h}, width={w}) is empty or not inside the "
          f"{ch}x{cw} (HxW) canvas"
      )

  def window(self, images):
    """The box's pixels of canvas images [N, H, W, C]."""
    if tuple(images.shape[1:3]) != (self.canvas_height, self.canvas_width):
      raise ValueError(
          f"images of {images.shape[1]}x{images.shape[2]} (HxW) do not match the box's "
          f"{self.canvas_height}x{self.canvas_width} canvas"
      )
    return images[:, self.top : self.top + self.height, self.left : self.left + self.width]


def box_axes(box: Box, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row and column coordinates of an out_h x out_w grid spanning the box, and its cell.

  Sample (i, j) is the centre of the i-th of out_h equal rows (j-th of out_w columns) of
  the box, in domain coordinates of the canvas:
    y_i = -1 + (2 top + (2 i + 1) height / out_h) / H,   cell_y = 2 height / (out_h H).
  With out_h = height this is the canvas grid's own rows, `fields.crop_grid`'s values.

  Returns:
    (ys [out_h], xs [out_w], cell [2]) float32 numpy.
  """
  t, le, h, w, ch, cw = (int(v) for v in box)
  if (out_h, out_w) == (h, w):  # the canvas resolution: exactly the canvas grid
    g = fields.crop_grid(ch, cw, t, le, h, w)
    ys, xs = g[:, 0, 0], g[0, :, 1]
  else:
    ys = -1.0 + (2.0 * t + (2.0 * np.arange(out_h) + 1.0) * h / out_h) / ch
    xs = -1.0 + (2.0 * le + (2.0 * np.arange(out_w) + 1.0) * w / out_w) / cw
  cell = np.array([2.0 * h / (out_h * ch), 2.0 * w / (out_w * cw)])
  f32 = lambda a: np.asarray(a, np.float32)
  return f32(ys), f32(xs), f32(cell)


def box_grid(box: Box, out_h: int | None = None, out_w: int | None = None):
  """Coordinates [out_h, out_w, 2] (row, col) and cell [2] of the box's grid.

  Defaults to the canvas resolution (out = the box's own height x width), where the grid
  equals `fields.crop_grid(H, W, top, left, height, width)`.
  """
  out_h = box.height if out_h is None else out_h
  out_w = box.width if out_w is None else out_w
  ys, xs, cell = box_axes(box, out_h, out_w)
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1), cell


def render_box(render_fn: RenderFn, field, box: Box, out_h: int, out_w: int, batch: int):
  """Renders only the box, at an out_h x out_w grid: [batch, out_h, out_w, 3].

  Coordinates are built in the graph from the two small axis vectors, so a box of a
  huge canvas costs (and embeds) only its own grid.
  """
  ys, xs, cell = box_axes(box, out_h, out_w)
  ys, xs = jnp.asarray(ys), jnp.asarray(xs)
  coords = jnp.stack(jnp.broadcast_arrays(ys[:, None], xs[None, :]), axis=-1)
  coords = jnp.broadcast_to(coords, (batch, out_h, out_w, 2))
  cells = jnp.broadcast_to(jnp.asarray(cell), (batch, 2))
  return render_fn(field, coords, cells).astype(jnp.float32)


def _mse(a, b, axes) -> jax.Array:
  return jnp.mean(jnp.square(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)), axes)


def _box_label(box: Box) -> str:
  return f"{box.top},{box.left},{box.height},{box.width}"


# --- conditions ------------------------------------------------------------------------
@struct.dataclass
class LowRes:
  """The whole image seen at low resolution: A(x) = downsample(x), squared error.

  The field is rendered on the supersample * (h, w) grid of the whole domain and
  box-filtered by `supersample` (area downsampling). supersample = 1 (default) renders
  the h x w grid itself (cell 2/h), where a cell-aware renderer (CLIF) draws the pixel
  as seen at that resolution; larger values integrate explicitly at s^2 the render cost.
  `error` area-downsamples the final canvas to h x w (`fields.area_downsample`).
  """

  image: jax.Array  # [h, w, 3] target in [0, 1]
  supersample: int = struct.field(pytree_node=False, default=1)  # render factor s >= 1
  weight: float = struct.field(pytree_node=False, default=1.0)  # multiplies its term

  norm_type = True  # cost is a mean squared residual

  def check(self) -> None:
    if self.image.ndim != 3 or self.image.shape[-1] != 3 or self.supersample < 1:
      raise ValueError(
          f"LowRes takes an [h, w, 3] image and supersample >= 1, got {self.image.shape} "
          f"and {self.supersample}"
      )

  @property
  def num_residuals(self) -> int:
    return int(np.prod(self.image.shape))

  def label(self) -> str:
    return f"lowres:{self.image.shape[0]}x{self.image.shape[1]}"

  def cost(self, render_fn: RenderFn, field, batch: int) -> jax.Array:
    h, w, _ = self.image.shape
    s = self.supersample
    rgb = render_box(render_fn, field, Box.whole(h, w), s * h, s * w, batch)
    rgb = rgb.reshape(batch, h, s, w, s, 3).mean(axis=(2, 4))
    return _mse(rgb, self.image[None], (1, 2, 3))

  def error(self, images) -> jax.Array:
    h, w, _ = self.image.shape
    down = np.stack([fields.area_downsample(np.asarray(im, np.float32), h, w) for im in images])
    return _mse(down, self.image[None], (1, 2, 3))


@struct.dataclass
class Crop:
  """A known high-resolution crop: the box rendered at the canvas resolution, squared error."""

  box: Box = struct.field(pytree_node=False)
  pixels: jax.Array  # [box.height, box.width, 3] in [0, 1]
  weight: float = struct.field(pytree_node=False, default=1.0)

  norm_type = True

  def check(self) -> None:
    self.box.check()
    if tuple(self.pixels.shape) != (self.box.height, self.box.width, 3):
      raise ValueError(
          f"crop pixels of shape {tuple(self.pixels.shape)} do not fill the "
          f"{self.box.height}x{self.box.width} box"
      )

  @property
  def num_residuals(self) -> int:
    return int(np.prod(self.pixels.shape))

  def label(self) -> str:
    return f"crop:{_box_label(self.box)}"

  def cost(self, render_fn: RenderFn, field, batch: int) -> jax.Array:
    rgb = render_box(render_fn, field, self.box, self.box.height, self.box.width, batch)
    return _mse(rgb, self.pixels[None], (1, 2, 3))

  def error(self, images) -> jax.Array:
    return _mse(self.box.window(images), self.pixels[None], (1, 2, 3))


@struct.dataclass
class ColourLayout:
  """Mean colour of each box against its target colour, squared error over boxes."""

  boxes: tuple[Box, ...] = struct.field(pytree_node=False)
  colours: jax.Array  # [K, 3] in [0, 1], one per box
  grid: int = struct.field(pytree_node=False, default=16)  # each box is rendered grid^2
  weight: float = struct.field(pytree_node=False, default=1.0)

  norm_type = True

  def check(self) -> None:
    for b in self.boxes:
      b.check()
    if tuple(self.colours.shape) != (len(self.boxes), 3) or self.grid < 1:
      raise ValueError(
          f"ColourLayout needs one RGB colour per box ({len(self.boxes)}) and grid >= 1, "
          f"got colours of shape {tuple(self.colours.shape)}"
      )

  @property
  def num_residuals(self) -> int:
    return 3 * len(self.boxes)

  def label(self) -> str:
    return "colours:" + ";".join(_box_label(b) for b in self.boxes)

  def cost(self, render_fn: RenderFn, field, batch: int) -> jax.Array:
    g = self.grid
    means = [render_box(render_fn, field, b, g, g, batch).mean((1, 2)) for b in self.boxes]
    return _mse(jnp.stack(means, axis=1), self.colours[None], (1, 2))  # [B, K, 3] vs [K, 3]

  def error(self, images) -> jax.Array:
    means = [jnp.asarray(b.window(images), jnp.float32).mean((1, 2)) for b in self.boxes]
    return _mse(jnp.stack(means, axis=1), self.colours[None], (1, 2))


@dataclasses.dataclass(frozen=True, eq=False)
class ClipImageEncoder:
  """CLIP's image tower as `(params, images [B, S, S, 3] in [0, 1]) -> embeds [B, P]`.

  Wraps the `infdiff.pretrained.clip.Clip` module (which is not hashable: its fields are
  dicts) so conditions can hold it as static data; it hashes by identity, so reuse one
  encoder to reuse compiled samplers. The port does CLIP's preprocessing (centre crop,
  bicubic resize to `image_size`, mean/std normalisation) on [0, 1] inputs.
  """

  module: Any  # infdiff.pretrained.clip.Clip

  @property
  def image_size(self) -> int:
    return int((self.module.vision or {}).get("image_size", 224))

  def __call__(self, params, images: jax.Array) -> jax.Array:
    return self.module.apply(params, images=images)["image_embeds"]

  @functools.cached_property
  def jitted(self):
    return jax.jit(self.__call__)

  def text_embeddings(self, params, input_ids, attention_mask) -> jax.Array:
    """Text tower: token ids [T, L] -> embeds [T, P] (not normalised)."""
    out = self.module.apply(params, input_ids=input_ids, attention_mask=attention_mask)
    return out["text_embeds"]


def _normalise(v: jax.Array) -> jax.Array:
  v = v.astype(jnp.float32)
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


@struct.dataclass
class ClipText:
  """A box that should show a text: 1 - cos(CLIP image embedding, text embedding).

  The box is rendered at size x size (INFD: 224, CLIP's input), whatever its pixel size,
  so a 1000^2 region of a 2K canvas costs one 224^2 render. A non-square box is rendered
  squashed to the square grid (its cells are then not square), which CLIP sees whole
  instead of centre-cropped. The render is passed unclipped (clipping would cut the
  gradient of out-of-range pixels).
  """

  box: Box = struct.field(pytree_node=False)
  text_embedding: jax.Array  # [P] CLIP text embedding (normalised here)
  encoder: ClipImageEncoder = struct.field(pytree_node=False)
  params: Any  # the CLIP params of `encoder.module`
  size: int = struct.field(pytree_node=False, default=224)  # render grid side
  weight: float = struct.field(pytree_node=False, default=1.0)
  text: str = struct.field(pytree_node=False, default="")  # for labels only

  norm_type = False  # a similarity score, not a residual norm

  def check(self) -> None:
    self.box.check()
    if self.text_embedding.ndim != 1 or self.size < 1:
      raise ValueError(
          f"ClipText takes one [P] text embedding and size >= 1, got "
          f"{tuple(self.text_embedding.shape)} and {self.size}"
      )

  @property
  def num_residuals(self) -> None:
    return None

  def label(self) -> str:
    return f"clip:{_box_label(self.box)}:{self.text}"

  def _score(self, embeds: jax.Array) -> jax.Array:
    return 1.0 - jnp.sum(_normalise(embeds) * _normalise(self.text_embedding)[None], axis=-1)

  def cost(self, render_fn: RenderFn, field, batch: int) -> jax.Array:
    rgb = render_box(render_fn, field, self.box, self.size, self.size, batch)
    return self._score(self.encoder(self.params, rgb))

  def error(self, images) -> jax.Array:
    from infdiff.pretrained import common

    crop = jnp.asarray(self.box.window(images), jnp.float32)
    # The same size x size view of the box that guidance rendered, here resampled from
    # the final pixels (antialiased bicubic, as CLIP's own preprocessing resizes).
    crop = common.resize(crop, (self.size, self.size), "bicubic", True)
    return self._score(self.encoder.jitted(self.params, crop))


Condition = LowRes | Crop | ColourLayout | ClipText


def check_conditions(conditions: Sequence[Condition]) -> tuple[Condition, ...]:
  """The conditions as a tuple, each checked (one-line ValueError on a bad one)."""
  conditions = tuple(conditions)
  if not conditions:
    raise ValueError("guided sampling needs at least one condition")
  for c in conditions:
    c.check()
  return conditions


# --- costs -----------------------------------------------------------------------------
def field_costs(render_fn: RenderFn, field, conditions: Sequence[Condition], batch: int):
  """Every condition's error at a field: [K, B] float32 (K conditions)."""
  return jnp.stack([c.cost(render_fn, field, batch) for c in conditions])


def latent_costs(field_fn, render_fn, conditions, x0: jax.Array) -> jax.Array:
  """Every condition's error at clean latents x0 [B, h, w, C]: [K, B]."""
  return field_costs(render_fn, field_fn(x0), conditions, x0.shape[0])


def guidance_objective(costs: jax.Array, conditions, step_rule: str) -> jax.Array:
  """The scalar whose gradient is the guidance step (module docstring), from [K, B] costs.

  Summed over the batch: samples are independent, so each sample's gradient is its own.
  """
  if step_rule not in STEP_RULES:
    raise ValueError(f"unknown step rule {step_rule!r}; expected one of {STEP_RULES}")
  total = jnp.float32(0.0)
  for c, cost in zip(conditions, costs):
    if step_rule == "dps" and c.norm_type:
      cost = jnp.sqrt(c.num_residuals * cost + _NORM_EPS)  # ||y - A(x0_hat)||_2
    total = total + c.weight * jnp.sum(cost)
  return total


def constraint_errors(conditions: Sequence[Condition], images) -> list[np.ndarray]:
  """Each condition's error measured on final canvas images [N, H, W, 3] in [0, 1].

  Plain measurements of the images (crops, area downsampling, box means, CLIP of the
  crop), for reporting the constraint error with and without guidance. Returns one [N]
  float32 array per condition.
  """
  images = np.asarray(images, np.float32)
  return [np.asarray(jax.device_get(c.error(images)), np.float32) for c in conditions]


# --- sampler ---------------------------------------------------------------------------
class DPSResult(NamedTuple):
  x0: jax.Array  # [B, h, w, C] final latents
  costs: jax.Array  # [num_steps, K, B]: each condition's error at x0_hat of every step


def dps_sample(
    model_fn: gaussian.ModelFn,
    field_fn: Callable[[jax.Array], Any],
    render_fn: RenderFn,
    schedule: gaussian.Schedule,
    conditions: Sequence[Condition],
    noise: jax.Array,
    rng: jax.Array | None = None,
    *,
    num_steps: int,
    scale: float | jax.Array = 1.0,
    step_rule: str = "dps",
    eta: float | jax.Array = 0.0,
    parameterization: str = "eps",
    clip_x0: float | jax.Array | None = None,
    context: Any = None,
) -> DPSResult:
  """DPS on DDIM's grid: DDIM steps (as `gaussian.ddim_sample`) plus the guidance step.

  Pure and jit-able: a `fori_loop` over a static number of steps, the model traced once;
  `scale`, `eta` and the conditions' targets may be traced. With scale = 0 it returns
  `ddim_sample`'s samples for the same noise and rng (the unguided reference), and the
  cost trace still records the constraint errors along the way.

  Args:
    model_fn: `(x [B, h, w, C], t [B] int32) -> output` of the parameterisation.
    field_fn: `x0 [B, h, w, C] -> field` (differentiable).
    render_fn: `(field, coords [B, H, W, 2], cells [B, 2]) -> rgb [B, H, W, 3]`.
    schedule: the prior's noise schedule.
    conditions: LowRes / Crop / ColourLayout / ClipText (each renders only its region).
    noise: [B, h, w, C] standard normal start at level T - 1.
    rng: key for DDIM's per-step noise; needed unless eta is the Python number 0.
    num_steps: DDIM steps (static).
    scale: guidance step size (zeta); 0 turns guidance off.
    step_rule: 'dps' (normalised by the residual norm) or 'plain' (module docstring).
    eta: DDIM noise scale (INFD samples with eta = 1).
    parameterization: 'eps', 'x0' or 'v'.
    clip_x0: if given, x0_hat is clipped to [-clip_x0, clip_x0] (eps re-derived).
    context: per-sample inputs that are not diffused (a pytree with leading axis B); when
      given, the model is called as `model_fn(x, t, context)`.

  Returns:
    DPSResult(x0 [B, h, w, C] float32, costs [num_steps, K, B] float32).
  """
  conditions = check_conditions(conditions)
  if step_rule not in STEP_RULES:
    raise ValueError(f"unknown step rule {step_rule!r}; expected one of {STEP_RULES}")
  deterministic = isinstance(eta, (int, float)) and eta == 0
  if not deterministic and rng is None:
    raise ValueError("dps_sample with eta != 0 needs an rng")
  ts = gaussian.ddim_timesteps(schedule.num_steps, num_steps)
  levels = jnp.asarray(np.append(ts, -1), jnp.int32)  # level after step i: levels[i + 1]
  batch = noise.shape[0]
  # The schedule helpers of gaussian.py, so that scale = 0 is ddim_sample bit for bit.
  abar = gaussian._abar  # noqa: SLF001

  if context is not None:
    model_fn = functools.partial(lambda f, c, x, t: f(x, t, c), model_fn, context)

  def objective(x, t):
    tb = jnp.full((batch,), t, jnp.int32)
    x0, eps = gaussian.to_x0_eps(schedule, x, tb, model_fn(x, tb), parameterization)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      a, s = gaussian._signal_noise(schedule, tb, x)  # noqa: SLF001
      eps = (x - a * x0) / s
    costs = latent_costs(field_fn, render_fn, conditions, x0)
    return guidance_objective(costs, conditions, step_rule), (x0, eps, costs)

  grad_fn = jax.grad(objective, has_aux=True)
  replace = step_rule == "replace"
  if replace and not all(isinstance(c, Crop) for c in conditions):
    raise ValueError("step_rule 'replace' takes --crop conditions only")
  replace_key = jax.random.PRNGKey(0) if rng is None else jax.random.fold_in(rng, 1 << 20)

  def replace_known(x, i, s):
    a_s, om_s = abar(schedule, s)
    on = (jnp.asarray(scale, jnp.float32) != 0).astype(jnp.float32)
    for k, c in enumerate(conditions):
      t0, l0, h, w = (int(v) for v in c.box[:4])
      z = jax.random.normal(jax.random.fold_in(replace_key, i * 1000 + k), (batch, h, w, 3))
      y = jnp.sqrt(a_s) * (2.0 * c.pixels - 1.0) + jnp.sqrt(om_s) * z
      old = x[:, t0 : t0 + h, l0 : l0 + w]
      x = x.at[:, t0 : t0 + h, l0 : l0 + w].set(old + on * (y - old))
    return x

  def step(i, carry):
    x, trace = carry
    t, s = levels[i], levels[i + 1]
    if replace:
      x0, eps, costs = objective(x, t)[1]
      g = jnp.zeros_like(x)
    else:
      g, (x0, eps, costs) = grad_fn(x, t)
    _, om_t = abar(schedule, t)
    a_s, om_s = abar(schedule, s)
    if deterministic:
      x_new = jnp.sqrt(a_s) * x0 + jnp.sqrt(om_s) * eps
    else:
      sigma = eta * jnp.sqrt(om_s / om_t * (om_t - om_s) / a_s)
      dir_scale = jnp.sqrt(jnp.maximum(om_s - sigma**2, 0.0))
      z = gaussian._step_noise(rng, i, x, None)  # noqa: SLF001
      x_new = jnp.sqrt(a_s) * x0 + dir_scale * eps + sigma * z
    x_new = replace_known(x_new, i, s) if replace else x_new - jnp.asarray(scale, jnp.float32) * g
    return x_new, trace.at[i].set(costs)

  trace = jnp.zeros((num_steps, len(conditions), batch), jnp.float32)
  x, trace = jax.lax.fori_loop(0, num_steps, step, (noise.astype(jnp.float32), trace))
  return DPSResult(x, trace)


def make_sampler(
    prior,
    *,
    num_steps: int,
    eta: float = 0.0,
    step_rule: str = "dps",
    clip_x0: float | None = None,
):
  """A jitted `fn(conditions, noise, rng, scale, context=None) -> DPSResult` for a prior.

  The prior's model, field and render functions are fetched once and closed over; the
  function compiles once per (batch, condition geometry) and takes any scale. `context`
  is the prior's per-sample `initial_state` context (None for most priors).
  """
  model_fn, field_fn, render_fn = prior.model_fn(), prior.field_fn(), prior.render_fn()
  parameterization = getattr(prior, "parameterization", "eps")

  @jax.jit
  def sample(conditions, noise, rng, scale, context=None):
    return dps_sample(
        model_fn,
        field_fn,
        render_fn,
        prior.schedule,
        conditions,
        noise,
        rng,
        num_steps=num_steps,
        scale=scale,
        step_rule=step_rule,
        eta=eta,
        parameterization=parameterization,
        clip_x0=clip_x0,
        context=context,
    )

  return sample
