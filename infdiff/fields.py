"""Continuous coordinates on the image domain [-1, 1]^2.

Conventions (see METHODS.md): for an H x W grid the coordinate of pixel (i, j) is its
centre `(-1 + (2i + 1) / H, -1 + (2j + 1) / W)`, ordered (row, col), and its cell is
`(2 / H, 2 / W)`. A crop is the same grid restricted to a sub-rectangle, so a crop of a
large render equals the matching window of the full render. Latent grids use the same
formula with their own (h, w).

All functions here are pure and work on numpy or jax arrays (`xp` follows the input).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def coord_grid(h: int, w: int, dtype=np.float32) -> np.ndarray:
  """Pixel-centre coordinates of an h x w grid. Returns [h, w, 2] as (row, col)."""
  ys = -1.0 + (2.0 * np.arange(h) + 1.0) / h
  xs = -1.0 + (2.0 * np.arange(w) + 1.0) / w
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).astype(dtype)


def cell_size(h: int, w: int, dtype=np.float32) -> np.ndarray:
  """Cell of one pixel of an h x w grid over [-1, 1]^2. Returns [2]."""
  return np.array([2.0 / h, 2.0 / w], dtype=dtype)


def crop_grid(full_h: int, full_w: int, top: int, left: int, h: int, w: int, dtype=np.float32):
  """Coordinates of the window [top:top+h, left:left+w] of a full_h x full_w grid.

  Returns [h, w, 2]; equal to `coord_grid(full_h, full_w)[top:top+h, left:left+w]`
  without materialising the full grid (it may be 4K x 4K or larger).
  """
  ys = -1.0 + (2.0 * (top + np.arange(h)) + 1.0) / full_h
  xs = -1.0 + (2.0 * (left + np.arange(w)) + 1.0) / full_w
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).astype(dtype)


def coord_to_index(coord, size):
  """Index of the grid cell (size cells over [-1, 1]) that contains `coord`.

  Coordinates exactly on a cell border go to the upper cell; values outside the
  domain are clamped to the border cells.
  """
  xp = _xp(coord)
  idx = xp.floor((coord + 1.0) * size / 2.0).astype(xp.int32)
  return xp.clip(idx, 0, size - 1)


class NearestQuery(NamedTuple):
  """Result of a nearest-latent lookup; leading dims follow the queries."""

  feature: jax.Array  # [B, ..., C] latent feature of the nearest cell z(v*)
  center: jax.Array  # [B, ..., 2] centre v* of that cell
  offset: jax.Array  # [B, ..., 2] (x_q - v*) in latent-cell units, in [-0.5, 0.5]


def nearest_latent(latent: jax.Array, coords: jax.Array, shift=(0.0, 0.0)) -> NearestQuery:
  """Nearest latent feature for each query coordinate.

  Args:
    latent: [B, h, w, C] feature grid whose cells follow the pixel-centre convention.
    coords: [B, ..., 2] query coordinates (row, col) in [-1, 1].
    shift: (dy, dx) in latent-cell units added to the query before the lookup; LIIF's
      local ensemble uses shifts of +-0.5 cell to visit the four neighbours.

  Returns:
    NearestQuery with features, cell centres and offsets in latent-cell units,
    offset = (x_q - v*) * (h, w) / 2.
  """
  b, h, w, c = latent.shape
  size = jnp.array([h, w], coords.dtype)
  q = coords + jnp.asarray(shift, coords.dtype) * 2.0 / size
  iy = coord_to_index(q[..., 0], h)
  ix = coord_to_index(q[..., 1], w)
  flat = latent.reshape(b, h * w, c)
  lin = (iy * w + ix).reshape(b, -1)
  feat = jnp.take_along_axis(flat, lin[..., None], axis=1).reshape(*coords.shape[:-1], c)
  center = jnp.stack([-1.0 + (2.0 * iy + 1.0) / h, -1.0 + (2.0 * ix + 1.0) / w], -1)
  center = center.astype(coords.dtype)
  offset = (coords - center) * size / 2.0
  return NearestQuery(feat, center, offset)


def _keys_cubic(t, a: float = -0.5):
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t in [0, 1)."""

  def inner(x):  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

  def outer(x):  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

  return jnp.stack([outer(t + 1.0), inner(t), inner(1.0 - t), outer(2.0 - t)], axis=-1)


def interpolate_latent(latent: jax.Array, coords: jax.Array, kind: str = "bicubic") -> jax.Array:
  """Samples a grid at arbitrary coordinates by bilinear or bicubic interpolation.

  Cell centres follow the pixel-centre convention, so at a cell centre the result is that
  cell's value. Samples beyond the outermost centres use edge replication (PyTorch's
  `interpolate(..., align_corners=False)` border rule); bicubic is Keys' kernel with
  a = -0.5, the kernel of PIL, PyTorch and `jax.image.resize(method='cubic')`.

  Args:
    latent: [B, h, w, C] grid.
    coords: [B, ..., 2] query coordinates (row, col).
    kind: 'bilinear' or 'bicubic'.

  Returns:
    [B, ..., C] interpolated values, in the latent's dtype.
  """
  if kind not in ("bilinear", "bicubic"):
    raise ValueError(f"unknown interpolation {kind!r}; use 'bilinear' or 'bicubic'")
  b, h, w, c = latent.shape
  taps = 4 if kind == "bicubic" else 2

  def axis(coord, size):
    u = (coord + 1.0) * size / 2.0 - 0.5  # continuous index, centres at integers
    i0 = jnp.floor(u)
    t = u - i0
    first = i0.astype(jnp.int32) - (1 if kind == "bicubic" else 0)
    idx = jnp.clip(first[..., None] + jnp.arange(taps), 0, size - 1)  # [..., taps]
    wts = _keys_cubic(t) if kind == "bicubic" else jnp.stack([1.0 - t, t], axis=-1)
    return idx, wts

  iy, wy = axis(coords[..., 0], h)
  ix, wx = axis(coords[..., 1], w)
  lin = (iy[..., :, None] * w + ix[..., None, :]).reshape(b, -1)  # [B, Q * taps^2]
  vals = jnp.take_along_axis(latent.reshape(b, h * w, c), lin[..., None], axis=1)
  vals = vals.reshape(*coords.shape[:-1], taps, taps, c)
  wgt = (wy[..., :, None] * wx[..., None, :]).astype(latent.dtype)
  return jnp.einsum("...ijc,...ij->...c", vals, wgt)


def random_coord_subset(rng: jax.Array, h: int, w: int, n: int):
  """n distinct pixel indices of an h x w grid, sampled uniformly without replacement.

  The shape is static (n), so a jitted step sees one shape whatever the sample.
  Returns (flat_index [n], coords [n, 2]).
  """
  if n > h * w:
    raise ValueError(f"cannot draw {n} distinct coordinates from a {h}x{w} grid")
  flat = jax.random.permutation(rng, h * w)[:n]
  iy, ix = flat // w, flat % w
  coords = jnp.stack([-1.0 + (2.0 * iy + 1.0) / h, -1.0 + (2.0 * ix + 1.0) / w], -1)
  return flat, coords.astype(jnp.float32)


def area_downsample(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Exact box-filter (area) resampling of [H, W, C] to [out_h, out_w, C], any ratio.

  Each output pixel is the area-weighted mean of the input pixels its footprint covers,
  which is what an ideal camera integrating over the pixel would record. Works for
  non-integer ratios (separable, with fractional overlap weights).
  """
  xp = _xp(image)
  h, w = image.shape[:2]
  my = area_matrix(h, out_h)
  mx = area_matrix(w, out_w)
  if xp is jnp:
    my, mx = jnp.asarray(my), jnp.asarray(mx)
  out = xp.einsum("oh,hwc->owc", my, image.astype(xp.float32))
  return xp.einsum("pw,owc->opc", mx, out)


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] overlap weights of output cells over input cells, rows sum to 1."""
  edges_in = np.arange(n_in + 1) / n_in
  edges_out = np.arange(n_out + 1) / n_out
  lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
  hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
  m = np.clip(hi - lo, 0.0, None) * n_out
  return m.astype(np.float32)


def pool_to_grid(latent, h: int, w: int):
  """Average-pools [B, H, W, C] to the teacher's patch grid [B, h, w, C] (area weights)."""
  my = jnp.asarray(area_matrix(latent.shape[1], h))
  mx = jnp.asarray(area_matrix(latent.shape[2], w))
  return jnp.einsum("oh,pw,bhwc->bopc", my, mx, latent.astype(jnp.float32))
