"""∞-Diff's denoiser: sparse neural operator blocks on raw points around a grid UNet.

Layout (METHODS.md: ∞-Diff; paper Fig. 4, App. A), for point values x [B, P, 3] on an
H x W pixel grid (`infdiff.models.sparse.PointSet`):

  h = Linear(3 -> nf)(x)
  down: num_blocks x SparseBlock, each output kept as a skip           [B, P, nf]
  g = points_to_grid(Linear(nf -> grid_channels)(h))                   [B, G, G, Cg]
      (inverse-squared-distance from the k = 3 nearest points)
  g = UNet(g, t, cond=z)   the core UNet: channel LayerNorm, GELU, attention at the coarse
                           levels, time (+ z) embedding                [B, G, G, Cg]
  h = Linear(Cg -> nf)(grid_to_points(g))   bilinear read-back at the pixel centres
  up: num_blocks x [h = Linear(concat(h, skip)); SparseBlock]
  out = Linear(nf -> 3)(GELU(LayerNorm(h)))  (zero-initialised)        [B, P, 3]

SparseBlock (pre-norm, two residual branches):
  u = LN(h) * (1 + scale_t) + shift_t, then * (1 + MLP(z)) when conditioned on z
  h = h + depthwise_conv(u)      over the present points, / (count / k^2)
  u = LN(h) * (1 + scale_t') + shift_t'  (* (1 + MLP'(z)))
  h = h + Linear(GELU(Linear(u, 2 nf)), nf)

The inner grid is G x G whatever the sampling resolution (the paper fixes it at 128^2);
at another resolution the depthwise kernels are resized (`sparse.resize_kernel`) to
the odd size nearest k * N'/N for a model trained at N (`train_side`).

`SparseEncoder` is the same down path without time modulation, the UNet's encoder half,
then LayerNorm, GELU, a global mean and a Linear to z (DiffAE's semantic encoder).

When every pixel is present in raster order (`dense=True`, as in sampling) the sparse
convolution runs as the equal dense depthwise convolution (`sparse.dense_depthwise_conv`),
which is faster on a full grid; the result is the same operator (tests check both).

On the full grid the kernels are density-matched to the training rate (`train_rate`,
`sparse.density_matched_kernel`): the count normalisation weighs a point's own value
k^2 / count times, about 4x at rate 4 with k = 5, so a model trained on subsets and
run on every pixel with its raw kernels sees features it never saw in training (on the
demo, the full-grid v error at t = 400 was 1.5x the training-subset error; matched, it is
below it). The paper evaluates the raw kernels; `train_rate = 1` does that.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infdiff import kernels
from infdiff.kernels import sparse_conv
from infdiff.models import layers, sparse
from infdiff.models.layers import Dtype
from infdiff.models.unet import ACTIVATIONS, Conditioning, UNet

_POINTS = ("act_batch", "act_len", "act_embed")  # [B, P, C]


def _gelu(x):
  return ACTIVATIONS["gelu"](x)


class SparseBlock(nn.Module):
  """One sparse residual block (module docstring); [B, P, C] in and out."""

  channels: int
  kernel_size: int = 7
  mlp_mult: int = 2
  sparse_conv_impl: str = "xla"  # 'xla' | 'pallas' (infdiff.kernels.sparse_conv)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _modulate(self, u, emb, zemb, name):
    c, dt, pdt = self.channels, self.dtype, self.param_dtype
    if emb is not None:
      mod = layers.dense(2 * c, ("embed", None), dt, pdt, zero=True, name=f"{name}_t")(emb)
      scale, shift = jnp.split(mod[:, None, :], 2, axis=-1)
      u = u * (1.0 + scale) + shift
    if zemb is not None:
      zs = layers.dense(c, ("embed", None), dt, pdt, zero=True, name=f"{name}_z")(zemb)
      u = u * (1.0 + zs[:, None, :])
    return u

  @nn.compact
  def __call__(
      self,
      h,
      points,
      height,
      width,
      emb=None,
      zemb=None,
      kernel_hw=None,
      dense=False,
      match_rate=1.0,
  ):
    """h [B, P, C] at `points`; `dense`: every pixel present in raster order, where the
    kernel is the mean of the one trained at subsampling `match_rate`
    (`sparse.density_matched_kernel`; 1.0: the kernel as trained)."""
    c, dt, pdt, k = self.channels, self.dtype, self.param_dtype, self.kernel_size
    impl = kernels.check_impl("sparse_conv_impl", self.sparse_conv_impl)
    u = layers.layer_norm(dt, pdt, epsilon=1e-6, name="norm1")(h)
    u = self._modulate(u, emb, zemb, "mod1")
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(1.0 / k), (None, None, "embed")),
        (k, k, c),
        pdt,
    )
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (c,), pdt
    )
    kh, kw = kernel_hw or (k, k)
    if dense:
      kernel = sparse.density_matched_kernel(jnp.asarray(kernel, dt), kh, kw, match_rate)
      b = u.shape[0]
      grid = u.reshape(b, height, width, c)
      v = sparse.dense_depthwise_conv(grid, kernel).reshape(b, height * width, c)
    else:
      kernel = sparse.resize_kernel(jnp.asarray(kernel, dt), kh, kw)
      v = sparse_conv.sparse_depthwise_conv(u, kernel, points, height, width, impl=impl)
    h = h + v + jnp.asarray(bias, dt)
    u = layers.layer_norm(dt, pdt, epsilon=1e-6, name="norm2")(h)
    u = self._modulate(u, emb, zemb, "mod2")
    u = layers.dense(self.mlp_mult * c, ("embed", "mlp"), dt, pdt, name="mlp_0")(u)
    u = layers.dense(c, ("mlp", "embed"), dt, pdt, zero=True, name="mlp_1")(_gelu(u))
    return nn.with_logical_constraint(h + u, _POINTS)


def kernel_size_at(kernel_size: int, height: int, width: int, train_side: int) -> tuple[int, int]:
  """The (kh, kw) kernel at an H x W sampling grid of a model trained at train_side."""
  return (
      sparse.scaled_kernel_size(kernel_size, height / train_side),
      sparse.scaled_kernel_size(kernel_size, width / train_side),
  )


def _grid_unet(m, out_channels: int, dropout: float, dropout_resolution: int, cond_dim: int):
  """The core UNet with ∞-Diff's settings (channel LayerNorm, GELU) from module m's fields."""
  return UNet(
      image_size=m.grid_size,
      ch=m.ch,
      channel_mult=tuple(m.channel_mult),
      num_res_blocks=m.num_res_blocks,
      attention_resolutions=tuple(m.attention_resolutions),
      head_channels=m.head_channels,
      norm="layer",
      activation="gelu",
      dropout=dropout,
      dropout_resolution=dropout_resolution,
      out_channels=out_channels,
      cond_dim=cond_dim,
      dtype=m.dtype,
      name="unet",
  )


class SparseOperatorUNet(nn.Module):
  """The ∞-Diff denoiser (module docstring). Predicts the mollified noise T eps."""

  nf: int = 64  # point-level width
  num_blocks: int = 3  # sparse blocks down (and as many up)
  kernel_size: int = 7  # depthwise kernel side at the training resolution
  train_side: int = 256  # training resolution N (kernels are resized at other sides)
  # Subsampling rate of training; on the full grid (dense=True) the depthwise kernels are
  # the mean of the count-normalised operator at that rate (`sparse.density_factors`).
  train_rate: float = 1.0
  grid_size: int = 128  # inner grid side G
  grid_channels: int = 128  # channels interpolated to / from the grid
  knn: int = 3  # nearest points per grid node
  ch: int = 128  # grid UNet base width
  channel_mult: Sequence[int] = (1, 2, 4, 8, 8)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16, 8)  # grid sides with attention
  head_channels: int = 0  # 0: 4 heads
  dropout: float = 0.1
  dropout_resolution: int = 16  # dropout at grid sides <= this
  z_dim: int = 0  # diffusion-autoencoder latent width (0: unconditional)
  out_channels: int = 3
  # The sparse depthwise convolution: 'xla' (reference) or 'pallas' (GPU kernels).
  sparse_conv_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, points, height: int, width: int, t, z=None, train=False, dense=False):
    """x [B, P, 3] at `points` of an H x W grid, t [B] int, z [B, z_dim] -> [B, P, 3] float32."""
    dt, pdt, nf = self.dtype, jnp.float32, self.nf
    if self.z_dim and z is None:
      raise ValueError(f"the denoiser is conditioned on z (z_dim={self.z_dim}); pass z")
    kernel_hw = kernel_size_at(self.kernel_size, height, width, self.train_side)
    temb = layers.timestep_embedding(t, nf).astype(dt)
    emb = layers.dense(4 * nf, (None, "mlp"), dt, pdt, name="time_0")(temb)
    emb = layers.dense(4 * nf, ("mlp", "embed"), dt, pdt, name="time_1")(_gelu(emb))
    emb = _gelu(emb)
    zemb = None
    if self.z_dim:
      zemb = _gelu(layers.dense(4 * nf, (None, "embed"), dt, pdt, name="z_0")(z.astype(dt)))

    block = lambda name: SparseBlock(
        nf, self.kernel_size, sparse_conv_impl=self.sparse_conv_impl, dtype=dt, name=name
    )
    common = dict(emb=emb, zemb=zemb, kernel_hw=kernel_hw, dense=dense, match_rate=self.train_rate)
    h = layers.dense(nf, (None, "embed"), dt, pdt, name="in_proj")(x.astype(dt))
    skips = []
    for i in range(self.num_blocks):
      h = block(f"down_{i}")(h, points, height, width, **common)
      skips.append(h)

    g = layers.dense(self.grid_channels, ("embed", None), dt, pdt, name="to_grid")(h)
    g = sparse.points_to_grid(g, points, height, width, self.grid_size, self.grid_size, k=self.knn)
    unet = _grid_unet(self, self.grid_channels, self.dropout, self.dropout_resolution, self.z_dim)
    g = unet(g, t, cond=z, train=train)
    h = layers.dense(nf, (None, "embed"), dt, pdt, name="from_grid")(
        sparse.grid_to_points(g.astype(dt), points, height, width)
    )
    for i in range(self.num_blocks):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = layers.dense(nf, (None, "embed"), dt, pdt, name=f"skip_{i}")(h)
      h = block(f"up_{i}")(h, points, height, width, **common)
    h = _gelu(layers.layer_norm(dt, pdt, epsilon=1e-6, name="norm_out")(h))
    out = layers.dense(self.out_channels, ("embed", None), dt, pdt, zero=True, name="out")(h)
    return out.astype(jnp.float32)


class SparseEncoder(nn.Module):
  """Diffusion-autoencoder encoder: the denoiser's down path without modulation -> z."""

  z_dim: int = 1024
  nf: int = 64
  num_blocks: int = 3
  kernel_size: int = 7
  train_side: int = 256
  train_rate: float = 1.0  # as SparseOperatorUNet's
  grid_size: int = 128
  grid_channels: int = 128
  knn: int = 3
  ch: int = 128
  channel_mult: Sequence[int] = (1, 2, 4, 8, 8)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16, 8)
  head_channels: int = 0
  sparse_conv_impl: str = "xla"  # as SparseOperatorUNet's
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, points, height: int, width: int, train=False, dense=False):
    """x [B, P, 3] clean values at `points` of an H x W grid -> z [B, z_dim] float32."""
    dt, pdt, nf = self.dtype, jnp.float32, self.nf
    kernel_hw = kernel_size_at(self.kernel_size, height, width, self.train_side)
    h = layers.dense(nf, (None, "embed"), dt, pdt, name="in_proj")(x.astype(dt))
    for i in range(self.num_blocks):
      h = SparseBlock(
          nf, self.kernel_size, sparse_conv_impl=self.sparse_conv_impl, dtype=dt, name=f"down_{i}"
      )(h, points, height, width, kernel_hw=kernel_hw, dense=dense, match_rate=self.train_rate)
    g = layers.dense(self.grid_channels, ("embed", None), dt, pdt, name="to_grid")(h)
    g = sparse.points_to_grid(g, points, height, width, self.grid_size, self.grid_size, k=self.knn)
    unet = _grid_unet(self, self.grid_channels, 0.0, 0, 0)
    # No time: every ResBlock's embedding input is zero, so its projection is a learned
    # constant (the blocks are unmodulated).
    c = Conditioning(jnp.zeros((x.shape[0], 4 * self.ch), dt), None)
    _, g = unet.encode(g, c, train)
    g = _gelu(layers.layer_norm(dt, pdt, epsilon=1e-6, name="norm_out")(g))
    z = layers.dense(self.z_dim, ("embed", None), dt, pdt, name="out")(jnp.mean(g, axis=(1, 2)))
    return z.astype(jnp.float32)


def count_params(tree) -> int:
  return sum(int(v.size) for v in jax.tree.leaves(tree))
