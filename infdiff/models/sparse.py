"""Operators on sparse pixel subsets (∞-Diff's point level), with static shapes.

A point set is P pixels of an H x W grid, per image:

  pos    [B, P, 2] int32   (row, col) of every point
  idmap  [B, H * W] int32  point id at every grid position, -1 where no point is

(`PointSet`, built by `point_set` from flat indices). Every operator here does work
proportional to the number of points, never to H * W, apart from building `idmap`
(one int32 per grid position): training on a quarter of the pixels costs about a
quarter of the full grid, which a scatter-to-dense-grid-then-convolve does not give.

- `sparse_depthwise_conv`: a depthwise convolution over the present points only, each
  output divided by count / (kh kw), count = present neighbours in its window (a Monte
  Carlo estimate of the full-grid convolution). A loop over the kh x kw offsets gathers
  the neighbour at each offset through `idmap` and multiply-accumulates: O(P k^2 C) work
  and O(P C) memory. Its gradient is a custom VJP with the same structure (the neighbour
  relation is symmetric: q is p's neighbour at offset o iff p is q's at -o), so the
  backward pass is gathers too, no scatters, and saves only the input.
- `dense_depthwise_conv`: the same operator on a dense grid with a mask of present
  pixels (reference for tests, and the fast path when every pixel is present, as in
  sampling).
- `points_to_grid`: inverse-squared-distance interpolation from the k nearest present
  points onto a coarse Gh x Gw grid (cell centres, METHODS.md convention). Candidates are
  the points in a window around each node (`knn_window`), so the cost is O(Gh Gw w^2).
- `grid_to_points`: bilinear read-back at the points' pixel centres
  (`fields.interpolate_latent`, the core convention).
- `resize_kernel`: a kernel resized bilinearly for another sampling resolution, its taps
  scaled by the ratio of pixel areas (the operator on functions, not the tap values, is
  what is resolution independent).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import fields


class PointSet(NamedTuple):
  """Points of an H x W grid (a pytree; H and W are the static shapes of idmap's source)."""

  pos: jax.Array  # [B, P, 2] int32 (row, col)
  idmap: jax.Array  # [B, H * W] int32 point id, -1 where absent


def point_set(flat: jax.Array, height: int, width: int) -> PointSet:
  """The PointSet of flat pixel indices [B, P] (distinct per row) on a height x width grid."""
  flat = jnp.asarray(flat, jnp.int32)
  b, p = flat.shape
  pos = jnp.stack([flat // width, flat % width], axis=-1)
  ids = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  idmap = jnp.full((b, height * width), -1, jnp.int32)
  idmap = jax.vmap(lambda m, f, i: m.at[f].set(i))(idmap, flat, ids)
  return PointSet(pos, idmap)


def full_point_set(batch: int, height: int, width: int) -> PointSet:
  """Every pixel, in raster order (point id = flat index)."""
  flat = jnp.broadcast_to(jnp.arange(height * width, dtype=jnp.int32), (batch, height * width))
  pos = jnp.stack([flat // width, flat % width], axis=-1)
  return PointSet(pos, flat)


def random_subset(rng: jax.Array, batch: int, height: int, width: int, num: int) -> jax.Array:
  """[batch, num] flat indices: per image `num` distinct pixels, uniform, sorted (raster order).

  A different subset per image (one key each); sorting keeps gathers local.
  """
  keys = jax.random.split(rng, batch)
  flat = jax.vmap(lambda k: fields.random_coord_subset(k, height, width, num)[0])(keys)
  return jnp.sort(flat.astype(jnp.int32), axis=-1)


def point_coords(pos: jax.Array, height: int, width: int) -> jax.Array:
  """[B, P, 2] float32 domain coordinates of the points' pixel centres (METHODS.md)."""
  pos = pos.astype(jnp.float32)
  return jnp.stack(
      [-1.0 + (2.0 * pos[..., 0] + 1.0) / height, -1.0 + (2.0 * pos[..., 1] + 1.0) / width], -1
  )


def gather_points(grid: jax.Array, points: PointSet) -> jax.Array:
  """[B, H, W, C] grid values at the points: [B, P, C]."""
  b, h, w, c = grid.shape
  flat = points.pos[..., 0] * w + points.pos[..., 1]
  return jnp.take_along_axis(grid.reshape(b, h * w, c), flat[..., None], axis=1)


# --- sparse depthwise convolution --------------------------------------------------------
def _neighbour(points: PointSet, height: int, width: int, dy, dx) -> jax.Array:
  """[B, P] id of each point's neighbour at offset (dy, dx), -1 if absent or off-grid."""
  r = points.pos[..., 0] + dy
  c = points.pos[..., 1] + dx
  inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
  flat = jnp.clip(r, 0, height - 1) * width + jnp.clip(c, 0, width - 1)
  nb = jnp.take_along_axis(points.idmap, flat, axis=1)
  return jnp.where(inside, nb, -1)


def _take(x: jax.Array, nb: jax.Array) -> jax.Array:
  """x [B, P, C] at ids nb [B, P] (0 where nb < 0)."""
  v = jnp.take_along_axis(x, jnp.maximum(nb, 0)[..., None], axis=1)
  return jnp.where((nb >= 0)[..., None], v, jnp.zeros_like(v))


def _offset(i, kh: int, kw: int):
  return i // kw - kh // 2, i % kw - kw // 2


def _counts(points: PointSet, height: int, width: int, kh: int, kw: int) -> jax.Array:
  """[B, P] float32: present neighbours of every point within the kh x kw window."""

  def body(i, cnt):
    dy, dx = _offset(i, kh, kw)
    return cnt + (_neighbour(points, height, width, dy, dx) >= 0).astype(jnp.float32)

  return jax.lax.fori_loop(0, kh * kw, body, jnp.zeros(points.pos.shape[:2], jnp.float32))


def _conv_forward(x, kernel, points, height, width):
  kh, kw, _ = kernel.shape

  def body(i, acc):
    dy, dx = _offset(i, kh, kw)
    v = _take(x, _neighbour(points, height, width, dy, dx))
    return acc + v * kernel[i // kw, i % kw].astype(x.dtype)

  acc = jax.lax.fori_loop(0, kh * kw, body, jnp.zeros_like(x))
  scale = (kh * kw) / jnp.maximum(_counts(points, height, width, kh, kw), 1.0)
  return acc * scale[..., None].astype(x.dtype), scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sparse_conv(x, kernel, points, height, width):
  return _conv_forward(x, kernel, points, height, width)[0]


def _sparse_conv_fwd(x, kernel, points, height, width):
  out, scale = _conv_forward(x, kernel, points, height, width)
  return out, (x, kernel, points, scale)


def _sparse_conv_bwd(height, width, res, g):
  x, kernel, points, scale = res
  kh, kw, c = kernel.shape
  gs = g * scale[..., None].astype(g.dtype)  # cotangent of the un-normalised sum

  def body(i, carry):
    dx_acc, dk = carry
    dy, dxo = _offset(i, kh, kw)
    # d kernel[o] = sum_p gs[p] * x[p + o];  d x[q] += kernel[o] * gs[q - o].
    v = _take(x, _neighbour(points, height, width, dy, dxo))
    dk = dk.at[i].set(jnp.sum(gs * v, axis=(0, 1)).astype(dk.dtype))
    gback = _take(gs, _neighbour(points, height, width, -dy, -dxo))
    return dx_acc + gback * kernel[i // kw, i % kw].astype(g.dtype), dk

  init = (jnp.zeros_like(x), jnp.zeros((kh * kw, c), kernel.dtype))
  d_x, d_k = jax.lax.fori_loop(0, kh * kw, body, init)
  zero_points = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), points)
  return d_x, d_k.reshape(kh, kw, c), zero_points


_sparse_conv.defvjp(_sparse_conv_fwd, _sparse_conv_bwd)


def sparse_depthwise_conv(
    x: jax.Array, kernel: jax.Array, points: PointSet, height: int, width: int
) -> jax.Array:
  """Depthwise convolution over present points, normalised by count / (kh kw).

  out[p] = (kh kw / count_p) * sum_{o in window, p + o present} kernel[o] * x[p + o],
  with cross-correlation offsets o = (i - kh // 2, j - kw // 2) for kernel[i, j] (as
  `jax.lax.conv_general_dilated`), zero outside the grid, count_p >= 1 (p itself).

  Args:
    x: [B, P, C] point features.
    kernel: [kh, kw, C] depthwise kernel (odd sides).
    points: the PointSet of x.
    height, width: the grid the points live on (static).

  Returns:
    [B, P, C] in x's dtype.
  """
  if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
    raise ValueError(f"depthwise kernel sides must be odd, got {kernel.shape[:2]}")
  return _sparse_conv(x, kernel, points, int(height), int(width))


FFT_MIN_TAPS = 81  # 'auto' convolves through the FFT from 9 x 9 taps up


def _fft_correlate(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Zero-padded 'same' cross-correlation of [B, H, W, C] with [kh, kw, C] via rfft2.

  The signals are padded to H + kh - 1 by W + kw - 1, so the circular product is the
  linear convolution (with the flipped kernel) and nothing wraps around.
  """
  _, h, w, _ = x.shape
  kh, kw, _ = kernel.shape
  ph, pw = h + kh - 1, w + kw - 1
  xf = jnp.fft.rfft2(x.astype(jnp.float32), s=(ph, pw), axes=(1, 2))
  kf = jnp.fft.rfft2(kernel[::-1, ::-1].astype(jnp.float32), s=(ph, pw), axes=(0, 1))
  full = jnp.fft.irfft2(xf * kf[None], s=(ph, pw), axes=(1, 2))
  return full[:, kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w].astype(x.dtype)


def dense_depthwise_conv(
    grid: jax.Array, kernel: jax.Array, mask: jax.Array | None = None, impl: str = "auto"
) -> jax.Array:
  """The same operator on a dense [B, H, W, C] grid with an optional [B, H, W] mask.

  Absent pixels (mask 0) contribute nothing and are not counted; outputs at absent
  pixels are meaningless (the sparse version has none). With no mask every pixel is
  present and only the border windows are renormalised.

  impl: 'direct' (`lax.conv_general_dilated`), 'fft' (O(H W log(H W)) per channel
  whatever the kernel; sampling at 4x the training side resizes a kernel of 7 to 29) or
  'auto' (fft from `FFT_MIN_TAPS` taps up).
  """
  b, h, w, c = grid.shape
  kh, kw, _ = kernel.shape
  if impl not in ("auto", "direct", "fft"):
    raise ValueError(f"impl must be 'auto', 'direct' or 'fft', got {impl!r}")
  if impl == "auto":
    impl = "fft" if kh * kw >= FFT_MIN_TAPS else "direct"
  if mask is None:
    # Counts of a full grid: in-bounds rows times in-bounds columns of every window.
    def axis_count(n, k):
      i = np.arange(n)
      return np.minimum(i + k // 2, n - 1) - np.maximum(i - k // 2, 0) + 1

    cnt = jnp.asarray(np.outer(axis_count(h, kh), axis_count(w, kw))[None, :, :, None], grid.dtype)
    x = grid
  else:
    m = mask.astype(grid.dtype)[..., None]
    x = grid * m
  if impl == "fft":
    acc = _fft_correlate(x, kernel)
    if mask is not None:
      cnt = jnp.round(_fft_correlate(m, jnp.ones((kh, kw, 1), jnp.float32)))
  else:
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    acc = conv(x, kernel[:, :, None, :].astype(grid.dtype), feature_group_count=c)
    if mask is not None:
      cnt = conv(m, jnp.ones((kh, kw, 1, 1), grid.dtype))
  return acc * ((kh * kw) / jnp.maximum(cnt, 1.0))


def resize_kernel(kernel: jax.Array, kh: int, kw: int) -> jax.Array:
  """[k, k', C] kernel resized bilinearly to [kh, kw, C] over the same window of the domain.

  The taps are scaled by (k k') / (kh kw), the ratio of pixel areas, so the kernel as a
  function of the domain keeps its integral: the sum of taps is kept exactly for a constant
  kernel and approximately for a smooth one (not for a rough one, whose resampled taps
  differ). Shrinking is antialiased (a kernel of 7 taps read at 3 averages its taps
  instead of picking three of them).
  """
  k0, k1, c = kernel.shape
  if (kh, kw) == (k0, k1):
    return kernel
  shrink = kh < k0 or kw < k1
  out = jax.image.resize(kernel.astype(jnp.float32), (kh, kw, c), "linear", antialias=shrink)
  return (out * (k0 * k1) / (kh * kw)).astype(kernel.dtype)


def density_factors(taps: int, rate: float) -> tuple[float, float]:
  """(centre, other) tap factors of the count-normalised convolution's mean at density 1/rate.

  Trained on random subsets holding each pixel with probability q = 1 / rate, the
  convolution at a present point p is (taps / count_p) sum_{o present} w_o x_{p+o}, where
  count_p = 1 + Binomial(taps - 1, q) (p itself is always present). Its mean over subsets,
  for a full-grid input, is a plain convolution with the centre tap scaled by
  E[taps / count_p] and every other tap by q E[taps / (2 + Binomial(taps - 2, q))]: at
  q = 1/4 and 25 taps the centre weighs 4.0 times its full-grid share. Evaluating a
  rate-r model on the full grid with the raw kernel therefore feeds every block features
  it never saw in training; these factors give it the operator it was trained on, in
  expectation. Both are 1 at rate 1.
  """
  if rate < 1.0:
    raise ValueError(f"subsampling rate must be >= 1, got {rate}")
  q = 1.0 / rate

  def mean_inverse(n: int, offset: int) -> float:  # E[1 / (offset + Binomial(n, q))]
    return sum(math.comb(n, j) * q**j * (1.0 - q) ** (n - j) / (offset + j) for j in range(n + 1))

  if taps == 1:
    return 1.0, 1.0
  return taps * mean_inverse(taps - 1, 1), q * taps * mean_inverse(taps - 2, 2)


def density_matched_kernel(kernel: jax.Array, kh: int, kw: int, rate: float) -> jax.Array:
  """A [k, k', C] kernel trained at subsampling `rate`, for the full grid at kh x kw taps.

  The trained operator's mean (`density_factors`) is a point term, the centre tap times
  (centre - other), plus the kernel times `other` as a function of the domain. The second
  is resized with `resize_kernel`; the point term is added to the new centre tap unscaled,
  since a point evaluation does not change with the pixel size. At rate 1 this is
  `resize_kernel`.
  """
  k0, k1, _ = kernel.shape
  if rate == 1.0:
    return resize_kernel(kernel, kh, kw)
  centre, other = density_factors(k0 * k1, rate)
  point = (centre - other) * kernel[k0 // 2, k1 // 2].astype(jnp.float32)
  out = resize_kernel(kernel.astype(jnp.float32) * other, kh, kw)
  return out.at[kh // 2, kw // 2].add(point).astype(kernel.dtype)


def scaled_kernel_size(k: int, ratio: float) -> int:
  """The odd size nearest k * ratio, at least 3 (∞-Diff's kernel rule at another resolution)."""
  if abs(ratio - 1.0) < 1e-9:
    return int(k)
  target = k * ratio
  odd = 2 * int(math.floor((target - 1.0) / 2.0 + 0.5)) + 1
  return max(3, odd)


# --- points <-> coarse grid ---------------------------------------------------------------
def knn_window(height: int, width: int, num_points: int, expected: int = 12) -> int:
  """Even window side w such that a w x w window holds `expected` points on average (>= 4)."""
  density = num_points / float(height * width)
  side = math.sqrt(expected / density)
  return max(4, 2 * math.ceil(side / 2.0))


def points_to_grid(
    x: jax.Array,
    points: PointSet,
    height: int,
    width: int,
    grid_h: int,
    grid_w: int,
    *,
    k: int = 3,
    window: int | None = None,
) -> jax.Array:
  """Inverse-squared-distance interpolation of point features onto a grid_h x grid_w grid.

  Every grid node (cell centre in the [-1, 1]^2 domain) takes the weighted mean of its k
  nearest present points, weights 1 / d^2 (d in domain units; a point on the node takes
  all the weight). Candidates are the present points of the window x window pixels
  around the node, so the k found are the exact k nearest whenever the k-th nearest lies
  within window / 2 - 1/2 pixels; fewer than k present use those present; a node with
  none gets 0. `knn_window` sizes the window for the point density.

  Args:
    x: [B, P, C] point features.
    points: their PointSet on the height x width grid.
    height, width: the pixel grid (static).
    grid_h, grid_w: the coarse grid (static).
    k: neighbours per node.
    window: candidate window side (even); default `knn_window` for P points.

  Returns:
    [B, grid_h, grid_w, C] in x's dtype.
  """
  b, p, c = x.shape
  window = int(window or knn_window(height, width, p))
  r = window // 2
  # Node centres in continuous pixel-index units (pixel i has its centre at i).
  uy = (np.arange(grid_h) + 0.5) * height / grid_h - 0.5
  ux = (np.arange(grid_w) + 0.5) * width / grid_w - 0.5
  offs = np.arange(-r + 1, r + 1)
  cy = np.floor(uy)[:, None] + offs[None, :]  # [gh, window] candidate rows
  cx = np.floor(ux)[:, None] + offs[None, :]
  # Squared distances in domain units ((2 / H) per row, (2 / W) per column).
  dy2 = ((cy - uy[:, None]) * 2.0 / height) ** 2
  dx2 = ((cx - ux[:, None]) * 2.0 / width) ** 2
  d2 = (dy2[:, None, :, None] + dx2[None, :, None, :]).reshape(grid_h * grid_w, window**2)
  inside = ((cy >= 0) & (cy < height))[:, None, :, None] & ((cx >= 0) & (cx < width))[
      None, :, None, :
  ]
  inside = inside.reshape(grid_h * grid_w, window**2)
  flat = (np.clip(cy, 0, height - 1)[:, None, :, None] * width) + np.clip(cx, 0, width - 1)[
      None, :, None, :
  ]
  flat = flat.reshape(grid_h * grid_w, window**2).astype(np.int32)

  # The barrier keeps XLA from constant-folding the neighbour search when the points are
  # a compile-time constant (the full grid of sampling), which takes seconds.
  idmap = jax.lax.optimization_barrier(points.idmap)
  cand = jnp.take(idmap, jnp.asarray(flat.reshape(-1)), axis=1)  # [B, n * w^2]
  cand = cand.reshape(b, grid_h * grid_w, window**2)
  present = (cand >= 0) & jnp.asarray(inside)[None]
  d2j = jnp.asarray(d2, jnp.float32)[None]
  score = jnp.where(present, -d2j, -jnp.inf)
  kk = min(k, window**2)
  top, arg = jax.lax.top_k(score, kk)  # [B, n, k]
  ids = jnp.take_along_axis(cand, arg, axis=-1)
  ok = jnp.isfinite(top)
  wts = jnp.where(ok, 1.0 / jnp.maximum(-top, 1e-12), 0.0)
  wts = wts / jnp.maximum(jnp.sum(wts, axis=-1, keepdims=True), 1e-30)
  vals = jnp.take_along_axis(x, jnp.maximum(ids, 0).reshape(b, -1)[..., None], axis=1)
  vals = vals.reshape(b, grid_h * grid_w, kk, c)
  out = jnp.einsum("bnkc,bnk->bnc", vals, wts.astype(x.dtype))
  return out.reshape(b, grid_h, grid_w, c)


def grid_to_points(grid: jax.Array, points: PointSet, height: int, width: int) -> jax.Array:
  """Bilinear read-back of a [B, gh, gw, C] grid at the points' pixel centres: [B, P, C]."""
  coords = point_coords(points.pos, height, width)
  return fields.interpolate_latent(grid, coords, "bilinear")
