"""LDM-style convolutional encoder/decoder and INFD's neural-field autoencoder.

Encoder (LDM `Encoder`; METHODS.md: INFD):
  conv_in(ch) -> per level l: num_res_blocks x ResBlock(ch * ch_mult[l]) (+ attention where
  the feature side is in attn_resolutions), then, except at the last level, a stride-2
  downsample (pad (0, 1, 0, 1), 3x3 stride-2 conv) -> middle ResBlock, attention,
  ResBlock -> GroupNorm, swish, conv_out(z_channels, or 2 z_channels for a KL bottleneck).
Decoder (LDM `Decoder` without its final norm/conv):
  conv_in(ch * ch_mult[-1]) -> middle ResBlock, attention, ResBlock -> per level from the
  deepest: num_res_blocks + 1 x ResBlock(ch * ch_mult[l]) (+ attention), then, except at
  level 0, nearest x2 + 3x3 conv -> phi [B, H, W, ch * ch_mult[0]].
ResBlock: `skip(x) + conv2(dropout(swish(GN(conv1(swish(GN(x)))))))`, skip a 1x1 conv when
the width changes. Attention: single head over the H*W positions, 1x1 q/k/v/proj convs.
GroupNorm eps 1e-6 everywhere (LDM's `Normalize`). Convs use PyTorch's default
initialisation (kaiming-uniform with a = sqrt(5), i.e. variance 1/3 fan-in uniform) with
zero biases (choice: the official code keeps torch's defaults; zero biases are simpler).

`INFDAutoencoder` wires encoder -> 1x1 quant_conv -> bottleneck (VQ or KL) -> 1x1
post_quant_conv -> decoder -> phi -> renderer (CLIF) at any query grid. Image space
inside the model is [-1, 1] (LDM/INFD): `encode` takes [0, 1] images and maps them,
`render` returns the renderer's raw output, which training supervises against [-1, 1]
targets; callers map it back with (rgb + 1) / 2 (infdiff.methods.infd.pipeline does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infdiff.models import layers
from infdiff.models.quantize import DiagonalGaussian, Quantized, VectorQuantizer
from infdiff.models.renderers import make_renderer

NORM_EPS = 1e-6  # LDM's GroupNorm epsilon
# PyTorch's default Conv2d initialisation: kaiming_uniform(a=sqrt(5)) = U(+-sqrt(1/fan_in)).
_TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features, kernel, dtype, param_dtype, *, strides=1, padding=None, name=None) -> nn.Conv:
  """NHWC conv with logical axes (None, None, 'conv_in', 'conv_out'); symmetric padding
  (k - 1) / 2 unless `padding` is given."""
  pad = (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)) if padding is None else padding,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          _TORCH_CONV_INIT, (None, None, "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def group_norm(groups, dtype, param_dtype, name=None) -> nn.GroupNorm:
  """GroupNorm (eps 1e-6) whose scale and bias carry the 'norm' axis."""
  return nn.GroupNorm(
      num_groups=groups,
      epsilon=NORM_EPS,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


class ResBlock(nn.Module):
  """LDM `ResnetBlock` without a timestep: [B, H, W, Cin] -> [B, H, W, out_channels]."""

  out_channels: int  # output width
  norm_groups: int = 32  # GroupNorm groups
  dropout: float = 0.0  # dropout before conv2
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt, pdt, out = self.dtype, self.param_dtype, self.out_channels
    h = nn.swish(group_norm(self.norm_groups, dt, pdt, "norm1")(x))
    h = conv(out, 3, dt, pdt, name="conv1")(h)
    h = nn.swish(group_norm(self.norm_groups, dt, pdt, "norm2")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(out, 3, dt, pdt, name="conv2")(h)
    if x.shape[-1] != out:
      x = conv(out, 1, dt, pdt, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """LDM `AttnBlock`: x + proj(softmax(q k^T / sqrt(C)) v), one head over H*W positions."""

  norm_groups: int = 32  # GroupNorm groups
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    dt, pdt = self.dtype, self.param_dtype
    h = group_norm(self.norm_groups, dt, pdt, "norm")(x)
    q, k, v = (conv(c, 1, dt, pdt, name=n)(h).reshape(b, hh * ww, 1, c) for n in "qkv")
    out = layers.dot_product_attention(q, k, v)  # [B, HW, 1, C]
    out = conv(c, 1, dt, pdt, name="proj_out")(out.reshape(b, hh, ww, c))
    return x + out


def _downsample(x, features, dtype, param_dtype, name):
  """LDM `Downsample` with conv: pad (0, 1) bottom/right, 3x3 stride-2 conv, no padding."""
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  return conv(features, 3, dtype, param_dtype, strides=2, padding="VALID", name=name)(x)


class Encoder(nn.Module):
  """Image [B, H, W, in] -> [B, H / 2^(L-1), W / 2^(L-1), z_channels (x2 if double_z)]."""

  ch: int = 128  # base width (LDM VQ-f4: 128)
  ch_mult: Sequence[int] = (1, 2, 4)  # width multiplier per level; L levels, factor 2^(L-1)
  num_res_blocks: int = 2  # ResBlocks per level
  attn_resolutions: Sequence[int] = ()  # feature sides with attention inside the levels
  z_channels: int = 3  # latent width
  double_z: bool = False  # output mean and log-variance (KL bottleneck)
  norm_groups: int = 32  # GroupNorm groups
  dropout: float = 0.0  # ResBlock dropout
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt, pdt = self.dtype, self.param_dtype
    block = functools.partial(
        ResBlock, norm_groups=self.norm_groups, dropout=self.dropout, dtype=dt, param_dtype=pdt
    )
    attn = functools.partial(AttnBlock, norm_groups=self.norm_groups, dtype=dt, param_dtype=pdt)
    h = conv(self.ch, 3, dt, pdt, name="conv_in")(x.astype(dt))  # [B, H, W, ch]
    last = len(self.ch_mult) - 1
    for lvl, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = block(self.ch * mult, name=f"down{lvl}_block{i}")(h, train)
        # LDM compares a nominal resolution; the actual feature side is the same thing.
        if h.shape[1] in tuple(self.attn_resolutions):
          h = attn(name=f"down{lvl}_attn{i}")(h)
      if lvl != last:
        h = _downsample(h, h.shape[-1], dt, pdt, f"down{lvl}_downsample")
      h = nn.with_logical_constraint(h, layers.ACT_GRID)
    width = h.shape[-1]
    h = block(width, name="mid_block1")(h, train)
    h = attn(name="mid_attn")(h)
    h = block(width, name="mid_block2")(h, train)
    h = nn.swish(group_norm(self.norm_groups, dt, pdt, "norm_out")(h))
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return conv(out, 3, dt, pdt, name="conv_out")(h)


class Decoder(nn.Module):
  """Latent [B, h, w, z_channels] -> phi [B, h 2^(L-1), w 2^(L-1), ch * ch_mult[0]].

  LDM's decoder without its final GroupNorm / swish / conv_out (INFD removes the last
  layer; the renderer consumes phi).
  """

  ch: int = 128  # base width
  ch_mult: Sequence[int] = (1, 2, 4)  # as the encoder's
  num_res_blocks: int = 2  # the decoder has num_res_blocks + 1 per level
  attn_resolutions: Sequence[int] = ()  # feature sides with attention inside the levels
  norm_groups: int = 32  # GroupNorm groups
  dropout: float = 0.0  # ResBlock dropout
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, z, train: bool = False):
    dt, pdt = self.dtype, self.param_dtype
    block = functools.partial(
        ResBlock, norm_groups=self.norm_groups, dropout=self.dropout, dtype=dt, param_dtype=pdt
    )
    attn = functools.partial(AttnBlock, norm_groups=self.norm_groups, dtype=dt, param_dtype=pdt)
    width = self.ch * self.ch_mult[-1]
    h = conv(width, 3, dt, pdt, name="conv_in")(z.astype(dt))
    h = block(width, name="mid_block1")(h, train)
    h = attn(name="mid_attn")(h)
    h = block(width, name="mid_block2")(h, train)
    for lvl in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[lvl], name=f"up{lvl}_block{i}")(h, train)
        if h.shape[1] in tuple(self.attn_resolutions):
          h = attn(name=f"up{lvl}_attn{i}")(h)
      if lvl != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
        h = conv(h.shape[-1], 3, dt, pdt, name=f"up{lvl}_upsample")(h)
      h = nn.with_logical_constraint(h, layers.ACT_GRID)
    return h  # phi


class INFDAutoencoder(nn.Module):
  """INFD stage 1: image -> latent z -> (VQ | KL) -> decoder -> phi -> CLIF at any grid.

  Methods (call with `apply(variables, ..., method=name)`):
    moments(image)      [B, S, S, 3] in [0, 1] -> quant_conv output [B, h, w, C] (VQ) or
                        [B, h, w, 2C] (KL: mean | logvar).
    encode(image)       -> the un-quantised latent z [B, h, w, C] (KL: the mean); this
                        is what the latent diffusion stage models.
    quantize(z)         VQ: the `Quantized` tuple (zq straight-through, loss, indices,
                        perplexity, ...); KL: `Quantized(z, 0, ...)` (identity).
    decode_quantized(zq) post_quant_conv + decoder -> phi [B, H, W, F].
    decode(z)           quantise (VQ) then decode_quantized: the decode of a diffusion
                        sample, like LDM's `decode`.
    render(phi, coords, cells, valid=None) -> raw RGB [B, Hq, Wq, 3] in [-1, 1] scale.
    __call__(image, coords, cells) -> the whole chain (used by `init`).
  """

  ae: Any  # Encoder/Decoder fields: ch, ch_mult, num_res_blocks, attn_resolutions, ...
  renderer_cfg: Any  # {'name': 'clif', **fields of that renderer}
  bottleneck: str = "vq"  # 'vq' | 'kl'
  num_codes: int = 8192  # VQ codebook size
  beta: float = 0.25  # VQ codebook-term weight (LDM legacy)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  def setup(self):
    if self.bottleneck not in ("vq", "kl"):
      raise ValueError(f"bottleneck must be 'vq' or 'kl', got {self.bottleneck!r}")
    kw = dict(self.ae)
    kw = dict(
        ch=int(kw["ch"]),
        ch_mult=tuple(kw["ch_mult"]),
        num_res_blocks=int(kw["num_res_blocks"]),
        attn_resolutions=tuple(kw.get("attn_resolutions", ())),
        norm_groups=int(kw.get("norm_groups", 32)),
        dropout=float(kw.get("dropout", 0.0)),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    zc = int(dict(self.ae)["z_channels"])
    kl = self.bottleneck == "kl"
    self.encoder = Encoder(**kw, z_channels=zc, double_z=kl)
    # LDM's 1x1 convs around the bottleneck (embed_dim = z_channels here, as in VQ-f4).
    self.quant_conv = conv(2 * zc if kl else zc, 1, self.dtype, self.param_dtype)
    if not kl:
      self.quantizer = VectorQuantizer(self.num_codes, self.beta, self.param_dtype)
    self.post_quant_conv = conv(zc, 1, self.dtype, self.param_dtype)
    self.decoder = Decoder(**kw)
    rkw = dict(self.renderer_cfg)
    self.renderer = make_renderer(
        rkw.pop("name"), **rkw, dtype=self.dtype, param_dtype=self.param_dtype
    )

  def moments(self, image, train: bool = False):
    x = image.astype(jnp.float32) * 2.0 - 1.0  # [0, 1] -> the model's [-1, 1]
    return self.quant_conv(self.encoder(x, train)).astype(jnp.float32)

  def encode(self, image):
    m = self.moments(image)
    return DiagonalGaussian.from_moments(m).mean if self.bottleneck == "kl" else m

  def quantize(self, z) -> Quantized:
    if self.bottleneck == "kl":
      zero = jnp.zeros((), jnp.float32)
      return Quantized(z, zero, jnp.zeros(z.shape[:-1], jnp.int32), zero, zero, zero)
    return self.quantizer(z)

  def decode_quantized(self, zq, train: bool = False):
    return self.decoder(self.post_quant_conv(zq.astype(self.dtype)), train)

  def decode(self, z):
    return self.decode_quantized(self.quantize(z).zq)

  def render(self, phi, coords, cells, valid=None) -> jax.Array:
    return self.renderer(phi, coords, cells, valid)

  def __call__(self, image, coords, cells):
    return self.render(self.decode(self.encode(image)), coords, cells)
