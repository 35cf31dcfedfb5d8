"""InfGen's any-resolution decoder of a fixed-size VAE latent (supplement Table 1).

    rgb = decoder(latent, coords, cells, valid=None)        (the renderer interface)

latent y [B, h, w, C] (the VAE's unscaled latent) -> post_quant_conv 3x3 (C -> D) ->
conv_in 3x3 (D -> D) -> latent tokens [B, h*w, D] + pos(latent cell centres).
The query grid coords [B, H, W, 2] (H, W multiples of `factor`, 8) gives one mask token
per factor x factor block of output pixels: a learned vector + pos(block centre).
N pre-LN blocks {cross-attention (queries: mask tokens; keys/values: the latent tokens),
output Linear, MLP} update the mask tokens only; they never attend to each other, so any
subset of them (a tile, a chunk) is computed exactly as in the whole grid. Reshaped to
[B, H/8, W/8, D], a mid block (ResBlock, attention, ResBlock) and len(up_channels) up
blocks (layers_per_block + 1 ResBlocks each, then nearest x2 + 3x3 conv while the factor
is not reached: (512, 256, 128) is the table's three x2 blocks) -> norm, SiLU, conv_out
-> RGB, returned on the [0, 1] scale (0.5 x + 0.5 of the [-1, 1] output, not clipped).

Choices the supplement leaves open (configs/infgen.py says so too):
- pos(): a fixed 2-D sin-cos code of continuous coordinates in [-1, 1] (pixel-centre
  convention, METHODS.md), the same function for both token sets, so a mask token and a
  latent token at the same place share a code at any output size. Frequencies are
  geometric from pi / 2 to pi * max(h, w) (half a latent cell), pos_dim / 4 per axis and
  sin/cos each; the code is projected to D by one shared Linear.
- Pre-LN blocks, `heads` heads, GELU MLP of mlp_ratio * D.
- Cross-attention runs over chunks of `query_chunk` mask tokens (`jax.lax.map`), so its
  memory is bounded whatever the output size; the chunked result equals the unchunked one.

Tiling (infdiff/render.py): the convolutional tail has a finite receptive field, `halo()`
output pixels; tiles and their origins are multiples of `factor` (`tile_align()`).
Queries flagged invalid (beyond the image border) are zeroed before every conv at every
level (a token is valid when any of its pixels is), which reproduces the zero padding of
the untiled render. With tail_norm='layer' or 'none' and mid_attention=False every op is
local, so tiles equal the untiled render exactly. With the SD blocks' GroupNorm
(tail_norm='group') and the mid block's attention, both are taken over the tile's valid
positions: a tile that covers the image equals the untiled render; smaller tiles
approximate it, as diffusers' tiled VAE decode does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infdiff import fields
from infdiff.models import layers
from infdiff.models.ldm_autoencoder import NORM_EPS, conv

FACTOR = 8  # output pixels per latent cell and per mask token (SD's KL-f8 VAE)


def pos_code(coords: jax.Array, dim: int, latent_side: int) -> jax.Array:
  """Fixed sin-cos code of continuous 2-D coordinates (row, col) in [-1, 1].

  Args:
    coords: [..., 2].
    dim: code width, a multiple of 4 (dim / 4 frequencies per axis, sin and cos each).
    latent_side: max(h, w) of the latent; the highest frequency is pi * latent_side.

  Returns:
    [..., dim] float32: [sin(w_k y), cos(w_k y), sin(w_k x), cos(w_k x)].
  """
  if dim % 4:
    raise ValueError(f"pos_code needs dim % 4 == 0, got {dim}")
  n = dim // 4
  lo, hi = math.log(math.pi / 2.0), math.log(math.pi * max(int(latent_side), 1))
  freqs = jnp.exp(jnp.linspace(lo, hi, n)) if n > 1 else jnp.array([math.exp(lo)])
  ang = coords.astype(jnp.float32)[..., None] * freqs  # [..., 2, n]
  y, x = ang[..., 0, :], ang[..., 1, :]
  return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], -1)


def block_centres(coords: jax.Array, factor: int) -> jax.Array:
  """[B, H, W, 2] pixel coordinates -> [B, H/f, W/f, 2] centres of the f x f blocks."""
  b, h, w, _ = coords.shape
  if h % factor or w % factor:
    raise ValueError(
        f"the InfGen decoder renders grids whose sides are multiples of {factor}, got {h}x{w}"
    )
  return coords.reshape(b, h // factor, factor, w // factor, factor, 2).mean((2, 4))


def pool_valid(valid: jax.Array | None, factor: int) -> jax.Array | None:
  """[B, H, W] bool -> [B, H/f, W/f]: a block is valid when any of its pixels is."""
  if valid is None or factor == 1:
    return valid
  b, h, w = valid.shape
  return valid.reshape(b, h // factor, factor, w // factor, factor).any((2, 4))


def chunked_attention(q, k, v, chunk: int) -> jax.Array:
  """`layers.dot_product_attention` over chunks of `chunk` queries (`jax.lax.map`).

  q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]; the same as one call, with the
  logits of only `chunk` queries alive at a time.
  """
  b, lq, nh, d = q.shape
  if chunk <= 0 or lq <= chunk:
    return layers.dot_product_attention(q, k, v)
  n = -(-lq // chunk)
  qp = jnp.pad(q, ((0, 0), (0, n * chunk - lq), (0, 0), (0, 0)))
  qc = qp.reshape(b, n, chunk, nh, d).transpose(1, 0, 2, 3, 4)  # [n, B, chunk, H, D]
  out = jax.lax.map(lambda qi: layers.dot_product_attention(qi, k, v), qc)
  return out.transpose(1, 0, 2, 3, 4).reshape(b, n * chunk, nh, d)[:, :lq]


class CrossBlock(nn.Module):
  """Pre-LN cross-attention block: x + Linear(MHA(LN(x), LN(y))), then x + MLP(LN(x))."""

  width: int  # token width D
  heads: int  # attention heads
  mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * D
  query_chunk: int = 4096  # mask tokens per attention chunk (0: all at once)
  zero_init: bool = False  # zero output Linears: the block starts as the identity
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, y):
    d, nh = self.width, self.heads
    dt, pdt = self.dtype, self.param_dtype
    b, lq, _ = x.shape
    lk = y.shape[1]
    ln = lambda name: layers.layer_norm(dt, pdt, name=name)
    dense = lambda n, axes, name: layers.dense(n, axes, dt, pdt, name=name)
    out = lambda n, axes, name: layers.dense(n, axes, dt, pdt, zero=self.zero_init, name=name)
    hq, hy = ln("norm_q")(x), ln("norm_kv")(y)
    q = dense(d, ("embed", "heads"), "to_q")(hq).reshape(b, lq, nh, d // nh)
    k = dense(d, ("embed", "heads"), "to_k")(hy).reshape(b, lk, nh, d // nh)
    v = dense(d, ("embed", "heads"), "to_v")(hy).reshape(b, lk, nh, d // nh)
    a = chunked_attention(q, k, v, self.query_chunk).reshape(b, lq, d)
    x = x + out(d, ("heads", "embed"), "to_out")(a)
    h = dense(int(self.mlp_ratio * d), ("embed", "mlp"), "mlp_in")(ln("norm_mlp")(x))
    x = x + out(d, ("mlp", "embed"), "mlp_out")(nn.gelu(h))
    return nn.with_logical_constraint(x, layers.ACT_TOKENS)


class InfGenDecoder(nn.Module):
  """Fixed-size latent + query grid -> RGB at the grid (module docstring)."""

  latent_channels: int = 4  # C of the VAE latent
  width: int = 512  # token and mid-block width D (Table 1: 512)
  depth: int = 4  # N cross-attention blocks (not given; choice)
  heads: int = 8  # attention heads (not given; choice)
  mlp_ratio: float = 4.0  # MLP hidden / D
  pos_dim: int = 256  # width of the sin-cos position code before its Linear
  up_channels: Sequence[int] = (512, 256, 128)  # up-block widths (Table 1: x8 in 3 blocks)
  layers_per_block: int = 2  # up blocks have layers_per_block + 1 ResBlocks (SD: 2)
  norm_groups: int = 32  # GroupNorm groups of the tail
  # 'group' (SD blocks), 'layer' (per pixel; exact tiles) or 'none' (no normalisation in
  # the tail; exact tiles, and a pixel's feature magnitude reaches conv_out)
  tail_norm: str = "group"
  mid_attention: bool = True  # attention in the mid block (SD's UNetMidBlock2D)
  # ResBlocks at the output resolution after the last up block (not in Table 1, whose three
  # up blocks end with their x2 upsampler; SD's own decoder has a fourth block there)
  full_res_blocks: int = 0
  query_chunk: int = 4096  # mask tokens per cross-attention chunk
  # 'none' (the paper's mask tokens) or 'bicubic': each mask token also gets the bicubic
  # interpolation of the latent tokens' conv_in features at its centre (not in InfGen; a
  # local shortcut, so tiles stay exact)
  query_init: str = "none"
  zero_init: bool = False  # cross blocks' output Linears start at zero (identity blocks)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @property
  def factor(self) -> int:
    return FACTOR

  def _levels(self) -> list[int]:
    """Downsampling factor (relative to the output) of each up block's ResBlocks."""
    ups = int(math.log2(self.factor))
    if len(self.up_channels) < ups:
      raise ValueError(f"up_channels needs at least {ups} blocks for x{self.factor}")
    return [max(self.factor >> i, 1) for i in range(len(self.up_channels))]

  def receptive_radius(self) -> int:
    """Output pixels each side an output pixel depends on through the convolutional tail
    (one per 3x3 conv at its level's factor; attention and GroupNorm aside)."""
    f = self.factor
    r = 4 * f  # mid block: 2 ResBlocks of 2 convs at 1/f
    for lvl in self._levels():
      r += 2 * (self.layers_per_block + 1) * lvl
      if lvl > 1:
        r += lvl // 2  # the upsample conv at the next level
    r += 2 * self.full_res_blocks
    return r + 1  # conv_out

  def halo(self) -> int:
    """Tile halo: the receptive radius rounded up to the token lattice."""
    return -(-self.receptive_radius() // self.factor) * self.factor

  def tile_align(self) -> int:
    return self.factor

  def _norm(self, name):
    dt, pdt = self.dtype, self.param_dtype
    if self.tail_norm == "layer":
      norm = layers.layer_norm(dt, pdt, epsilon=NORM_EPS, name=name)
      return lambda t, mask: norm(t)
    if self.tail_norm == "none":
      return lambda t, mask: t
    if self.tail_norm != "group":
      raise ValueError(f"tail_norm must be 'group', 'layer' or 'none', got {self.tail_norm!r}")
    gn = nn.GroupNorm(
        num_groups=self.norm_groups,
        epsilon=NORM_EPS,
        dtype=dt,
        param_dtype=pdt,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )
    return lambda t, mask: gn(t, mask=None if mask is None else jnp.broadcast_to(mask, t.shape))

  def _resblock(self, x, out, mask, name):
    dt, pdt = self.dtype, self.param_dtype
    z = (lambda t: t) if mask is None else (lambda t: t * mask.astype(t.dtype))
    h = nn.swish(self._norm(f"{name}_norm1")(x, mask))
    h = conv(out, 3, dt, pdt, name=f"{name}_conv1")(z(h))
    h = nn.swish(self._norm(f"{name}_norm2")(h, mask))
    h = conv(out, 3, dt, pdt, name=f"{name}_conv2")(z(h))
    if x.shape[-1] != out:
      x = conv(out, 1, dt, pdt, name=f"{name}_shortcut")(x)
    return z(x + h)

  def _attention(self, x, mask, name):
    b, hh, ww, c = x.shape
    dt, pdt = self.dtype, self.param_dtype
    h = self._norm(f"{name}_norm")(x, mask).reshape(b, hh * ww, c)
    q, k, v = (
        layers.dense(c, ("embed", "heads"), dt, pdt, name=f"{name}_to_{n}")(h).reshape(
            b, hh * ww, 1, c
        )
        for n in "qkv"
    )
    keys = None if mask is None else mask.reshape(b, hh * ww)
    a = layers.dot_product_attention(q, k, v, keys).reshape(b, hh, ww, c)
    out = x + layers.dense(c, ("heads", "embed"), dt, pdt, name=f"{name}_to_out")(a)
    return out if mask is None else out * mask.astype(out.dtype)

  @nn.compact
  def __call__(self, latent, coords, cells, valid=None) -> jax.Array:
    """Renders a grid of queries (renderer interface; module docstring)."""
    del cells  # the block centres carry the output grid's spacing
    dt, pdt, d, f = self.dtype, self.param_dtype, self.width, self.factor
    b = latent.shape[0]
    side = max(latent.shape[1:3])
    # One position embedding for both token sets: Linear(pos_code(coordinates)).
    pos_proj = layers.dense(d, (None, "embed"), dt, pdt, name="pos")
    position = lambda c: pos_proj(pos_code(c, self.pos_dim, side).astype(dt))
    # Latent tokens [B, h*w, D].
    h, w = latent.shape[1:3]
    y = conv(d, 3, dt, pdt, name="post_quant_conv")(latent.astype(dt))
    y = conv(d, 3, dt, pdt, name="conv_in")(y)
    feats = y  # [B, h, w, D]
    y = (y + position(jnp.asarray(fields.coord_grid(h, w)))).reshape(b, h * w, d)
    # Mask tokens [B, H/f * W/f, D]: a learned vector + the code of the block centre.
    centres = block_centres(coords, f)  # [B, H/f, W/f, 2]
    gh, gw = centres.shape[1:3]
    init = nn.initializers.normal(0.02)
    mask_token = self.param("mask_token", nn.with_logical_partitioning(init, ("embed",)), (d,), pdt)
    x = mask_token.astype(dt) + position(centres).reshape(b, gh * gw, d)
    if self.query_init == "bicubic":
      base = fields.interpolate_latent(feats.astype(jnp.float32), centres, "bicubic")
      x = x + base.astype(dt).reshape(b, gh * gw, d)
    elif self.query_init != "none":
      raise ValueError(f"query_init must be 'none' or 'bicubic', got {self.query_init!r}")
    for i in range(self.depth):
      block = CrossBlock(
          d,
          self.heads,
          self.mlp_ratio,
          self.query_chunk,
          self.zero_init,
          dt,
          pdt,
          name=f"cross_{i}",
      )
      x = block(x, y)
    x = x.reshape(b, gh, gw, d)
    x = nn.with_logical_constraint(x, layers.ACT_GRID)
    # Validity per level: a position is real when any output pixel under it is.
    masks = {}
    for lvl in (f, *self._levels(), 1):
      m = pool_valid(valid, lvl)
      masks[lvl] = None if m is None else m[..., None]
    x = x if masks[f] is None else x * masks[f].astype(x.dtype)
    x = self._resblock(x, d, masks[f], "mid_block1")
    if self.mid_attention:
      x = self._attention(x, masks[f], "mid_attn")
    x = self._resblock(x, d, masks[f], "mid_block2")
    for i, (ch, lvl) in enumerate(zip(self.up_channels, self._levels())):
      for j in range(self.layers_per_block + 1):
        x = self._resblock(x, ch, masks[lvl], f"up{i}_block{j}")
      if lvl > 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        x = conv(ch, 3, dt, pdt, name=f"up{i}_upsample")(x)
        m = masks[lvl // 2]
        x = x if m is None else x * m.astype(x.dtype)
      x = nn.with_logical_constraint(x, layers.ACT_GRID)
    for j in range(self.full_res_blocks):
      x = self._resblock(x, self.up_channels[-1], masks[1], f"full_block{j}")
    x = nn.swish(self._norm("norm_out")(x, masks[1]))
    x = x if masks[1] is None else x * masks[1].astype(x.dtype)
    rgb = conv(3, 3, dt, pdt, name="conv_out")(x).astype(jnp.float32)
    return rgb * 0.5 + 0.5
