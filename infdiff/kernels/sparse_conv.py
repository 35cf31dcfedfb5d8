"""∞-Diff's sparse depthwise convolution as Pallas kernels, beside its XLA reference.

`sparse_depthwise_conv(..., impl='xla')` is `infdiff.models.sparse.sparse_depthwise_conv`
(a loop over the kh x kw offsets, each a gather through the grid's id map). With
impl='pallas' the same operator runs as Pallas kernels over a neighbour table built in
XLA from the point set (O(P K) int32, K = kh kw):

  nb     [B, K, P'] int32    id of every point's neighbour at offset k, -1 where absent
                             or off the grid (`sparse._neighbour` at every offset)
  scale  [B, P'] float32     K / count, count = present neighbours (`sparse._counts`)

P' is P padded to whole blocks of points (padded rows have no neighbours), and the
channels are padded to whole channel blocks; both block sides are powers of two, as
the Triton lowering needs.

Forward (`_gather_conv`): grid (B, P' / Pb, C' / Cb). A program owns Pb points and Cb
channels of one image; its input block is the whole [P', Cb] column of x for that image.
For each offset k it reads the Pb neighbour ids nb[k], gathers their rows from that
block (a load with an integer index vector: a gather in Triton; absent ids are masked,
so nothing is read for them), and accumulates the rows times the tap kernel[k] in
float32; the sum is multiplied by the scale of its points.

Backward (a custom VJP; the table is rebuilt rather than saved, as the reference saves
only its input). The neighbour relation is symmetric (q is p's neighbour at offset o iff
p is q's at -o, and offset -o has index K - 1 - k), so with gs = g * scale
  dx[q] = sum_k kernel[K - 1 - k] * gs[nb[q, k]]
is the forward kernel on gs with the taps reversed and no scale: gathers, no scatters.
  d kernel[k] = sum_p gs[p] * x[nb[p, k]]
is `_tap_grads`: grid (B, P' / (G Pb), C' / Cb), each program looping over G blocks of
points and adding, per offset, the channel sums of gs times the gathered rows into its
own [K, Cb] block of partial sums; XLA sums the partials over images and blocks.

The kernels are written for the Triton lowering (NVIDIA GPUs; Mosaic TPU has no such
gathers, so 'pallas' on a TPU is an error). Elsewhere they run in Pallas interpret mode
(`infdiff.kernels.interpret`), which is how the tests check them against the reference
on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from infdiff import kernels
from infdiff.models import sparse
from infdiff.models.sparse import PointSet

BLOCK_POINTS = 128  # points per program (or the next power of two >= P, if smaller)
BLOCK_CHANNELS = 64  # channels per program (likewise)
TAP_GRAD_BLOCKS = 8  # at most this many point blocks per program of the kernel gradient


def sparse_depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    points: PointSet,
    height: int,
    width: int,
    *,
    impl: str = "xla",
    block_points: int = BLOCK_POINTS,
    block_channels: int = BLOCK_CHANNELS,
) -> jax.Array:
  """Depthwise convolution over present points, normalised by count / (kh kw).

  out[p] = (kh kw / count_p) * sum_{o in window, p + o present} kernel[o] * x[p + o]
  (`infdiff.models.sparse.sparse_depthwise_conv`, which impl='xla' calls).

  Args:
    x: [B, P, C] point features.
    kernel: [kh, kw, C] depthwise kernel (odd sides).
    points: the PointSet of x.
    height, width: the grid the points live on (static).
    impl: 'xla' (the reference) or 'pallas' (the kernels of the module docstring).
    block_points, block_channels: Pallas block sides (powers of two), upper bounds.

  Returns:
    [B, P, C] in x's dtype.
  """
  kernels.check_impl("sparse_conv_impl", impl)
  if impl == "xla":
    return sparse.sparse_depthwise_conv(x, kernel, points, height, width)
  if jax.default_backend() == "tpu" and not kernels.interpret_mode():
    raise ValueError("sparse_conv_impl='pallas' has Triton (GPU) kernels only; use 'xla' on TPU")
  if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
    raise ValueError(f"depthwise kernel sides must be odd, got {kernel.shape[:2]}")
  for name, v in (("block_points", block_points), ("block_channels", block_channels)):
    if v < 1 or v & (v - 1):
      raise ValueError(f"{name} must be a power of two, got {v}")
  blocks = (_block(x.shape[1], block_points), _block(x.shape[2], block_channels))
  return _pallas_conv(x, kernel, points, int(height), int(width), blocks)


def _block(n: int, limit: int) -> int:
  """The power-of-two block side for n rows: min(limit, next power of two >= n)."""
  return min(limit, pl.next_power_of_2(max(n, 1)))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# --- XLA set-up: neighbour table, count scale, padding ---------------------------------------
def neighbour_table(points: PointSet, height: int, width: int, kh: int, kw: int) -> jax.Array:
  """[B, K, P] int32 id of every point's neighbour at offset k (raster over kh x kw), or -1.

  Offset k is (k // kw - kh // 2, k % kw - kw // 2), as in the reference's loop.
  """
  k = np.arange(kh * kw)
  dys = jnp.asarray(k // kw - kh // 2, jnp.int32)
  dxs = jnp.asarray(k % kw - kw // 2, jnp.int32)
  nb = jax.vmap(lambda dy, dx: sparse._neighbour(points, height, width, dy, dx))(dys, dxs)
  return jnp.transpose(nb, (1, 0, 2))  # [K, B, P] -> [B, K, P]


def count_scale(nb: jax.Array) -> jax.Array:
  """[B, P] float32 K / count of the table's present neighbours (count >= 1 for a point)."""
  count = jnp.sum((nb >= 0).astype(jnp.float32), axis=1)
  return nb.shape[1] / jnp.maximum(count, 1.0)


def _pad_to(a: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad, constant_values=value)


# --- Pallas kernels ---------------------------------------------------------------------------
def _gather_rows(x_ref, ids):
  """x_ref's rows at ids [n] (zero where ids < 0): [n, Cb], one masked gather."""
  rows = jnp.maximum(ids, 0)[:, None]  # [n, 1]
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, x_ref.shape[1]), 1)  # [1, Cb]
  return plt.load(x_ref.at[rows, cols], mask=(ids >= 0)[:, None], other=0)


def _gather_conv_kernel(*refs, num_taps: int, scaled: bool):
  """out[p] = (scale[p] *) sum_k taps[k] * x[nb[k, p]] for one block of points and channels."""
  if scaled:
    nb_ref, taps_ref, x_ref, scale_ref, o_ref = refs  # [K, Pb] [K, Cb] [P', Cb] [Pb] [Pb, Cb]
  else:
    nb_ref, taps_ref, x_ref, o_ref = refs

  def body(k, acc):
    v = _gather_rows(x_ref, nb_ref[k, :]).astype(jnp.float32)  # [Pb, Cb]
    return acc + v * taps_ref[k, :].astype(jnp.float32)[None, :]

  acc = jax.lax.fori_loop(0, num_taps, body, jnp.zeros(o_ref.shape, jnp.float32))
  if scaled:
    acc = acc * scale_ref[...][:, None]
  o_ref[...] = acc.astype(o_ref.dtype)


def _gather_conv(x, taps, nb, scale, blocks):
  """Padded [B, P', C'] x, [K, C'] taps, [B, K, P'] nb, [B, P'] scale or None -> [B, P', C']."""
  b, pp, cp = x.shape
  k = taps.shape[0]
  pb, cb = blocks
  in_specs = [
      pl.BlockSpec((None, k, pb), lambda i, j, c: (i, 0, j)),  # nb
      pl.BlockSpec((k, cb), lambda i, j, c: (0, c)),  # taps
      pl.BlockSpec((None, pp, cb), lambda i, j, c: (i, 0, c)),  # x: the image's whole column
  ]
  args = [nb, taps, x]
  if scale is not None:
    in_specs.append(pl.BlockSpec((None, pb), lambda i, j, c: (i, j)))
    args.append(scale)
  return pl.pallas_call(
      functools.partial(_gather_conv_kernel, num_taps=k, scaled=scale is not None),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(b, pp // pb, cp // cb),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, pb, cb), lambda i, j, c: (i, j, c)),
      interpret=kernels.interpret_mode(),
      compiler_params=plt.CompilerParams(),  # Triton on GPUs (not Mosaic GPU)
      name="sparse_depthwise_conv",
  )(*args)


def _tap_grads_kernel(nb_ref, x_ref, gs_ref, dk_ref, *, num_taps: int, pb: int, group: int):
  """dk[k] += sum_p gs[p] * x[nb[k, p]] over `group` blocks of pb points.

  nb_ref [K, group pb], x_ref [P', Cb], gs_ref [group pb, Cb], dk_ref [K, Cb] float32.
  """

  def clear(k, carry):
    dk_ref[k, :] = jnp.zeros(dk_ref.shape[1:], jnp.float32)
    return carry

  jax.lax.fori_loop(0, num_taps, clear, 0)

  def block(j, carry):
    rows = pl.ds(pl.multiple_of(j * pb, pb), pb)
    gs = gs_ref[rows, :].astype(jnp.float32)  # [pb, Cb]

    def tap(k, carry):
      v = _gather_rows(x_ref, nb_ref[k, rows]).astype(jnp.float32)
      dk_ref[k, :] = dk_ref[k, :] + jnp.sum(gs * v, axis=0)
      return carry

    return jax.lax.fori_loop(0, num_taps, tap, carry)

  jax.lax.fori_loop(0, group, block, 0)


def _tap_grads(x, gs, nb, blocks):
  """Padded x, gs [B, P', C'] and nb [B, K, P'] -> [K, C'] float32 sum_p gs[p] * x[nb[:, p]]."""
  b, pp, cp = x.shape
  k = nb.shape[1]
  pb, cb = blocks
  nblocks = pp // pb
  group = max(g for g in range(1, TAP_GRAD_BLOCKS + 1) if nblocks % g == 0)
  rows = group * pb
  partial = pl.pallas_call(
      functools.partial(_tap_grads_kernel, num_taps=k, pb=pb, group=group),
      out_shape=jax.ShapeDtypeStruct((b, nblocks // group, k, cp), jnp.float32),
      grid=(b, nblocks // group, cp // cb),
      in_specs=[
          pl.BlockSpec((None, k, rows), lambda i, j, c: (i, 0, j)),  # nb
          pl.BlockSpec((None, pp, cb), lambda i, j, c: (i, 0, c)),  # x: the whole column
          pl.BlockSpec((None, rows, cb), lambda i, j, c: (i, j, c)),  # gs
      ],
      out_specs=pl.BlockSpec((None, None, k, cb), lambda i, j, c: (i, j, 0, c)),
      interpret=kernels.interpret_mode(),
      compiler_params=plt.CompilerParams(),  # Triton on GPUs (not Mosaic GPU)
      name="sparse_depthwise_conv_tap_grads",
  )(nb, x, gs)
  return jnp.sum(partial, axis=(0, 1))


# --- the custom VJP ---------------------------------------------------------------------------
def _setup(points, height, width, kh, kw, pp):
  """Padded table [B, K, P'] and scale [B, P'] (unpadded scale [B, P] too)."""
  nb = neighbour_table(points, height, width, kh, kw)
  scale = count_scale(nb)
  return _pad_to(nb, 2, pp, -1), scale, _pad_to(scale, 1, pp)


def _padded_sizes(x, blocks):
  _, p, c = x.shape
  return _round_up(p, blocks[0]), _round_up(c, blocks[1])


def _forward(x, kernel, points, height, width, blocks):
  kh, kw, c = kernel.shape
  p = x.shape[1]
  pp, cp = _padded_sizes(x, blocks)
  nb, scale, scale_p = _setup(points, height, width, kh, kw, pp)
  taps = _pad_to(kernel.reshape(kh * kw, c), 1, cp)
  xp = _pad_to(_pad_to(x, 1, pp), 2, cp)
  out = _gather_conv(xp, taps, nb, scale_p, blocks)
  return out[:, :p, :c], scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_conv(x, kernel, points, height, width, blocks):
  return _forward(x, kernel, points, height, width, blocks)[0]


def _pallas_conv_fwd(x, kernel, points, height, width, blocks):
  out, scale = _forward(x, kernel, points, height, width, blocks)
  return out, (x, kernel, points, scale)


def _pallas_conv_bwd(height, width, blocks, res, g):
  x, kernel, points, scale = res
  kh, kw, c = kernel.shape
  p = x.shape[1]
  pp, cp = _padded_sizes(x, blocks)
  nb = _pad_to(neighbour_table(points, height, width, kh, kw), 2, pp, -1)
  gs = g * scale[..., None].astype(g.dtype)  # cotangent of the un-normalised sum
  gs = _pad_to(_pad_to(gs, 1, pp), 2, cp)
  xp = _pad_to(_pad_to(x, 1, pp), 2, cp)
  # dx[q] = sum_k kernel[K - 1 - k] * gs[nb[q, k]]: the forward gather with reversed taps.
  taps_rev = _pad_to(kernel.reshape(kh * kw, c)[::-1], 1, cp)
  d_x = _gather_conv(gs, taps_rev, nb, None, blocks)[:, :p, :c].astype(x.dtype)
  d_k = _tap_grads(xp, gs, nb, blocks)[:, :c].reshape(kh, kw, c).astype(kernel.dtype)
  zero_points = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), points)
  return d_x, d_k, zero_points


_pallas_conv.defvjp(_pallas_conv_fwd, _pallas_conv_bwd)
