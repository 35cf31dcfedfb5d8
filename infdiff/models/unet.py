"""ADM / DiffAE-style UNet denoiser (INFD stage 2, Patch-DM patch UNet, ∞-Diff grid UNet).

Layout (ADM's UNetModel; L = len(channel_mult), feature side s_l = image_size / 2^l):
  embed   emb = MLP(timestep_embedding(t * time_scale, ch))             [B, emb_mult * ch]
              (+ MLP(cond) when cond_dim > 0: Patch-DM's position, ∞-Diff's z)
          code passes through unchanged (Patch-DM's semantic code, [B, code_dim])
  encode  conv_in(ch) -> per level l: num_res_blocks x [ResBlock(ch * mult[l])
          (+ attention if s_l in attention_resolutions)], then a downsample except at the
          last level -> middle ResBlock, attention (if mid_attention), ResBlock.
          The outputs of conv_in, of every level stage and of every downsample are skips.
  decode  per level from the deepest: num_res_blocks + 1 x [concat(h, skips.pop()) ->
          ResBlock (+ attention)], then an upsample except at level 0 -> norm -> act ->
          zero-initialised conv_out.

ResBlock (BigGAN/ADM):
  h = conv1(act(norm1(x)))            (resample 'down'/'up' between act and conv1)
  h = norm2(h) * (1 + scale) + shift  (scale, shift = Dense(act(emb)); scale_shift=True)
      or norm2(h + Dense(act(emb)))   (scale_shift=False, LDM's default)
  h = h * (1 + Dense(code))           (only when a code is given, Patch-DM)
  out = skip(x) + conv2(dropout(act(h)))   conv2 zero-initialised, skip = 1x1 conv if the
                                           channel count changes (identity otherwise)
Norms are GroupNorm (`norm='group'`, ADM) or a LayerNorm over channels (`norm='layer'`,
∞-Diff); the activation is SiLU or GELU. Attention blocks are `x + Attn(norm(x))` over
the H*W positions with a zero-initialised output projection, so every residual branch and
the whole network output start at zero.

Feature collage (Patch-DM) works through the three methods, each callable on its own with
`model.apply(variables, ..., method="embed" | "encode" | "decode")`:

  c = embed(t, cond, code)              -> Conditioning(emb [B, E], code [B, K] or None)
  skips, h = encode(x, c, train)        x [B, H, W, C_in]
  out = decode(skips, h, c, train)      -> [B, H, W, out_channels] float32
  __call__(x, t, cond, code, train) == decode(*encode(x, embed(t, cond, code)), ...)

With n_l = ch * channel_mult[l], `skips` is a list of 1 + L * num_res_blocks + (L - 1)
arrays in encoder order: skips[0] = conv_in's [B, H, W, ch]; then, for each level l,
num_res_blocks arrays [B, H/2^l, W/2^l, n_l] and (l < L - 1) the downsample's
[B, H/2^(l+1), W/2^(l+1), n_l]. The bottleneck h (middle-block output) is
[B, H/2^(L-1), W/2^(L-1), n_{L-1}]. A caller may replace any of them (same shapes) before
`decode`, e.g. tile the skips of 2 x 2 neighbouring patches and crop the shifted patch,
and may decode with a different Conditioning (Patch-DM decodes the shifted patch at
position + 0.5).

Parameter and activation axes carry logical names (see `infdiff.models.layers`); the mesh
rules live in the config. `PRESETS` holds the three papers' configurations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from infdiff.models import layers
from infdiff.models.layers import Dtype

_EMB_AXES = ("act_batch", "act_embed")  # [B, E] embedding activations

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch nn.GELU (erf)
}

# The papers' networks (widths as published). `image_size` is the input side the
# attention and dropout resolutions refer to; the network runs at any side divisible by
# 2^(len(channel_mult) - 1).
PRESETS: dict[str, dict[str, Any]] = {
    # INFD stage 2: ADM/LDM UNet on the 64 x 64 x 3 latent (official LDM-style config;
    # LDM's UNetModel defaults: no scale-shift norm, conv resampling, no dropout).
    "infd": dict(
        image_size=64,
        ch=224,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        head_channels=32,
        scale_shift=False,
    ),
    # Patch-DM: DiffAE's BeatGANs UNet on 64 x 64 patches, position MLP + 512-d code.
    "patch_dm": dict(
        image_size=64,
        ch=64,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,  # DiffAE default (choice: the paper does not say)
        resblock_updown=True,
        dropout=0.1,
        cond_dim=128,  # sin-cos(row) | sin-cos(col), 64 each (choice)
        code_dim=512,
    ),
    # ∞-Diff: inner grid UNet on the 128^2 grid of 128 features (256^2 data), z 1024.
    "infty_diff": dict(
        image_size=128,
        ch=128,
        channel_mult=(1, 2, 4, 8, 8),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        norm="layer",
        activation="gelu",
        dropout=0.1,
        dropout_resolution=16,
        out_channels=128,
        cond_dim=1024,  # z of the diffusion autoencoder, added to the time embedding (choice)
    ),
}


class Conditioning(NamedTuple):
  """What every ResBlock is conditioned on (returned by `UNet.embed`)."""

  emb: jax.Array  # [B, E] time (+ cond) embedding, E = emb_mult * ch
  code: jax.Array | None  # [B, code_dim] multiplicative code, or None


def _norm(kind: str, groups: int, eps: float, dtype, param_dtype, name: str | None = None):
  """GroupNorm ('group') or LayerNorm over channels ('layer'), affine, 'norm' axes."""
  if kind == "layer":
    return layers.layer_norm(dtype, param_dtype, epsilon=eps, name=name)
  if kind == "group":
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )
  raise ValueError(f"norm must be 'group' or 'layer', got {kind!r}")


def _downsample_pool(x):
  """[B, H, W, C] -> [B, H/2, W/2, C] by 2 x 2 average pooling."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample_nearest(x):
  """[B, H, W, C] -> [B, 2H, 2W, C] by nearest-neighbour repetition."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


_RESAMPLE = {"none": lambda x: x, "down": _downsample_pool, "up": _upsample_nearest}


class ResBlock(nn.Module):
  """Timestep-modulated residual block (see the module docstring); [B, H, W, C] in/out."""

  out_channels: int  # output channels
  norm: str = "group"  # 'group' (GroupNorm) or 'layer' (LayerNorm over channels)
  norm_groups: int = 32  # GroupNorm groups
  norm_eps: float = 1e-5  # norm epsilon
  activation: str = "silu"  # key of ACTIVATIONS
  scale_shift: bool = True  # norm2(h) * (1 + scale) + shift; False: norm2(h + Dense(emb))
  dropout: float = 0.0  # dropout before the zero conv
  resample: str = "none"  # 'none', 'down' (2x2 average) or 'up' (nearest x2), BigGAN-style
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, c: Conditioning, train: bool = False):
    """x [B, H, W, Cin], c the Conditioning -> [B, H', W', out_channels]."""
    act = ACTIVATIONS[self.activation]
    resample = _RESAMPLE[self.resample]
    dt, pdt, out = self.dtype, self.param_dtype, self.out_channels
    norm = functools.partial(_norm, self.norm, self.norm_groups, self.norm_eps, dt, pdt)

    h = act(norm(name="norm1")(x))
    h = resample(h)
    x = resample(x)
    h = layers.conv(out, 3, dt, pdt, name="conv1")(h)  # [B, H', W', out]

    emb = act(c.emb)
    if self.scale_shift:
      mod = layers.dense(2 * out, ("embed", None), dt, pdt, name="emb_proj")(emb)
      scale, shift = jnp.split(mod[:, None, None, :], 2, axis=-1)
      h = norm(name="norm2")(h) * (1.0 + scale) + shift
    else:
      h = h + layers.dense(out, ("embed", None), dt, pdt, name="emb_proj")(emb)[:, None, None]
      h = norm(name="norm2")(h)
    if c.code is not None:
      code = layers.dense(out, (None, "conv_out"), dt, pdt, name="code_proj")(c.code.astype(dt))
      h = h * (1.0 + code[:, None, None, :])
    h = nn.Dropout(self.dropout)(act(h), deterministic=not train)
    h = layers.conv(out, 3, dt, pdt, zero=True, name="conv2")(h)

    if x.shape[-1] != out:
      x = layers.conv(out, 1, dt, pdt, name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """x + Attention(norm(x)) over the H*W positions, zero-initialised output projection."""

  heads: int  # attention heads
  norm: str = "group"  # 'group' or 'layer'
  norm_groups: int = 32  # GroupNorm groups
  norm_eps: float = 1e-5  # norm epsilon
  impl: str = "xla"  # "xla" reference or "jax" (jax.nn.dot_product_attention)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, c: Conditioning | None = None, train: bool = False):
    """x [B, H, W, C] -> [B, H, W, C]; c and train are unused (uniform stage call)."""
    del c, train
    b, hh, ww, ch = x.shape
    if ch % self.heads:
      raise ValueError(f"{ch} channels do not split into {self.heads} heads")
    norm = _norm(self.norm, self.norm_groups, self.norm_eps, self.dtype, self.param_dtype, "norm")
    h = norm(x)
    h = layers.Attention(
        heads=self.heads,
        head_dim=ch // self.heads,
        out_features=ch,
        gated=False,
        qk_norm=False,
        zero_out=True,
        impl=self.impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="attn",
    )(h.reshape(b, hh * ww, ch))
    return x + h.reshape(b, hh, ww, ch)


class Downsample(nn.Module):
  """3 x 3 stride-2 conv: [B, H, W, C] -> [B, H/2, W/2, C]."""

  channels: int  # output channels
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, c: Conditioning | None = None, train: bool = False):
    del c, train
    return layers.conv(self.channels, 3, self.dtype, self.param_dtype, strides=2, name="conv")(x)


class Upsample(nn.Module):
  """Nearest x2 then 3 x 3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

  channels: int  # output channels
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, c: Conditioning | None = None, train: bool = False):
    del c, train
    x = _upsample_nearest(x)
    return layers.conv(self.channels, 3, self.dtype, self.param_dtype, name="conv")(x)


class UNet(nn.Module):
  """ADM / DiffAE UNet with an encode / decode split for feature collage.

  See the module docstring for the layout and shapes; `PRESETS` for the papers' values.
  Parameter names: `time_0`, `time_1` (time MLP), `cond_0`, `cond_1` (cond MLP),
  `conv_in`, `down_{i}_{j}` (layer j of encoder stage i), `mid_{j}`, `up_{i}_{j}`,
  `norm_out`, `conv_out`; encoder stages are in skip order, decoder stages consume them
  in reverse (ADM's input_blocks / middle_block / output_blocks).
  """

  image_size: int = 64  # input side that attention_resolutions / dropout_resolution refer to
  ch: int = 128  # base channels (level l has ch * channel_mult[l])
  channel_mult: Sequence[int] = (1, 2, 4, 8)  # per-level channel multipliers
  num_res_blocks: int = 2  # ResBlocks per encoder level (decoder: num_res_blocks + 1)
  attention_resolutions: Sequence[int] = (16,)  # feature sides (at image_size) with attention
  mid_attention: bool = True  # attention between the two middle ResBlocks
  num_heads: int = 4  # attention heads, when head_channels is 0
  head_channels: int = 0  # channels per head (INFD: 32); 0 uses num_heads
  resblock_updown: bool = False  # resample inside ResBlocks; else stride-2 conv / nearest+conv
  norm: str = "group"  # 'group' (GroupNorm, ADM) or 'layer' (channel LayerNorm, ∞-Diff)
  norm_groups: int = 32  # GroupNorm groups
  norm_eps: float = 1e-5  # norm epsilon (torch GroupNorm / LayerNorm default)
  activation: str = "silu"  # 'silu' (ADM) or 'gelu' (∞-Diff)
  scale_shift: bool = True  # ADM use_scale_shift_norm; False adds emb before norm2 (LDM)
  dropout: float = 0.0  # ResBlock dropout rate
  dropout_resolution: int = 0  # dropout only at feature sides <= this (∞-Diff: 16); 0 = all
  out_channels: int = 3  # output channels (2 x input for an ADM with learned variance)
  emb_mult: int = 4  # embedding width = emb_mult * ch
  time_scale: float = 1.0  # t is multiplied by this before the sinusoid (1 for DDPM steps)
  cond_dim: int = 0  # width of `cond`, MLP'd and added to the time embedding; 0 = none
  code_dim: int = 0  # width of the multiplicative `code` (Patch-DM: 512); 0 = none
  # "xla" reference, "jax" (jax.nn.dot_product_attention), "cudnn" or "pallas" (flash
  # attention on GPU/TPU; layers.dot_product_attention)
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  def setup(self):
    layers.check_attention_impl(self.attention_impl)
    dt, pdt = self.dtype, self.param_dtype
    levels = len(self.channel_mult)
    if self.norm not in ("group", "layer") or self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown norm {self.norm!r} or activation {self.activation!r}")
    emb_dim = self.emb_mult * self.ch
    self.time_0 = layers.dense(emb_dim, (None, "mlp"), dt, pdt)
    self.time_1 = layers.dense(emb_dim, ("mlp", "embed"), dt, pdt)
    if self.cond_dim:
      self.cond_0 = layers.dense(emb_dim, (None, "mlp"), dt, pdt)
      self.cond_1 = layers.dense(emb_dim, ("mlp", "embed"), dt, pdt)

    norm_kw = dict(norm=self.norm, norm_groups=self.norm_groups, norm_eps=self.norm_eps)
    common = dict(dtype=dt, param_dtype=pdt)

    def res(out, side, resample="none"):
      rate = self.dropout
      if self.dropout_resolution and side > self.dropout_resolution:
        rate = 0.0
      return ResBlock(
          out,
          activation=self.activation,
          scale_shift=self.scale_shift,
          dropout=rate,
          resample=resample,
          **norm_kw,
          **common,
      )

    def attn(channels):
      heads = channels // self.head_channels if self.head_channels else self.num_heads
      if self.head_channels and channels % self.head_channels:
        raise ValueError(f"{channels} channels are not a multiple of {self.head_channels}")
      return AttentionBlock(heads, impl=self.attention_impl, **norm_kw, **common)

    self.conv_in = layers.conv(self.ch, 3, dt, pdt)
    down = []
    for level, mult in enumerate(self.channel_mult):
      side, width = self.image_size // 2**level, self.ch * mult
      for _ in range(self.num_res_blocks):
        stage = [res(width, side)]
        if side in self.attention_resolutions:
          stage.append(attn(width))
        down.append(stage)
      if level < levels - 1:
        if self.resblock_updown:
          down.append([res(width, side, "down")])
        else:
          down.append([Downsample(width, **common)])
    self.down = down

    side, width = self.image_size // 2 ** (levels - 1), self.ch * self.channel_mult[-1]
    mid = [res(width, side)]
    if self.mid_attention:
      mid.append(attn(width))
    mid.append(res(width, side))
    self.mid = mid

    up = []
    for level in reversed(range(levels)):
      side, width = self.image_size // 2**level, self.ch * self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        stage = [res(width, side)]
        if side in self.attention_resolutions:
          stage.append(attn(width))
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            stage.append(res(width, side, "up"))
          else:
            stage.append(Upsample(width, **common))
        up.append(stage)
    self.up = up

    self.norm_out = _norm(self.norm, self.norm_groups, self.norm_eps, dt, pdt)
    self.conv_out = layers.conv(self.out_channels, 3, dt, pdt, zero=True)

  @property
  def num_skips(self) -> int:
    """Length of the skip list: 1 + L * num_res_blocks + (L - 1)."""
    levels = len(self.channel_mult)
    return 1 + levels * self.num_res_blocks + levels - 1

  def embed(self, t, cond=None, code=None) -> Conditioning:
    """Conditioning of every ResBlock.

    Args:
      t: [B] timesteps (integer DDPM steps, or times scaled by `time_scale`).
      cond: [B, cond_dim] vector MLP'd and added to the time embedding (Patch-DM: the
        patch position's `layers.position_embedding`; ∞-Diff: z), or None to leave it out
        (e.g. the unconditional branch of CFG). Required at init when cond_dim > 0.
      code: [B, code_dim] multiplicative code, or None to leave it out. Required at init
        when code_dim > 0.

    Returns:
      Conditioning(emb [B, emb_mult * ch] in `dtype`, code).
    """
    if self.is_initializing() and (bool(self.cond_dim) != (cond is not None)):
      raise ValueError(f"cond_dim={self.cond_dim}: init needs cond iff cond_dim > 0")
    if self.is_initializing() and (bool(self.code_dim) != (code is not None)):
      raise ValueError(f"code_dim={self.code_dim}: init needs code iff code_dim > 0")
    act = ACTIVATIONS[self.activation]
    temb = layers.timestep_embedding(t * self.time_scale, self.ch).astype(self.dtype)
    emb = self.time_1(act(self.time_0(temb)))  # [B, E]
    if cond is not None:
      if cond.shape[-1] != self.cond_dim:
        raise ValueError(f"cond has width {cond.shape[-1]}, expected cond_dim={self.cond_dim}")
      emb = emb + self.cond_1(act(self.cond_0(cond.astype(self.dtype))))
    if code is not None and code.shape[-1] != self.code_dim:
      raise ValueError(f"code has width {code.shape[-1]}, expected code_dim={self.code_dim}")
    return Conditioning(nn.with_logical_constraint(emb, _EMB_AXES), code)

  def encode(self, x, c: Conditioning, train: bool = False):
    """Encoder and middle block.

    Args:
      x: [B, H, W, C_in]; H and W multiples of 2^(L-1).
      c: Conditioning from `embed`.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      (skips, h): the list of `num_skips` skip features and the bottleneck; shapes in
      the module docstring.
    """
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"input {x.shape[1]}x{x.shape[2]} is not divisible by {factor}")
    h = nn.with_logical_constraint(self.conv_in(x.astype(self.dtype)), layers.ACT_GRID)
    skips = [h]
    for stage in self.down:
      for layer in stage:
        h = layer(h, c, train)
      h = nn.with_logical_constraint(h, layers.ACT_GRID)
      skips.append(h)
    for layer in self.mid:
      h = layer(h, c, train)
    return skips, nn.with_logical_constraint(h, layers.ACT_GRID)

  def decode(self, skips, h, c: Conditioning, train: bool = False):
    """Decoder and output head.

    Args:
      skips: `num_skips` skip features in encoder order (as `encode` returns them).
      h: bottleneck [B, H/2^(L-1), W/2^(L-1), ch * channel_mult[-1]].
      c: Conditioning from `embed` (may differ from the encoder's).
      train: enables dropout.

    Returns:
      [B, H, W, out_channels] float32.
    """
    skips = list(skips)
    if len(skips) != self.num_skips:
      raise ValueError(f"expected {self.num_skips} skips, got {len(skips)}")
    for stage in self.up:
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      for layer in stage:
        h = layer(h, c, train)
      h = nn.with_logical_constraint(h, layers.ACT_GRID)
    h = ACTIVATIONS[self.activation](self.norm_out(h))
    return self.conv_out(h).astype(jnp.float32)

  def __call__(self, x, t, cond=None, code=None, train: bool = False):
    """Predicts the denoiser target (eps / v / x0, the method's choice).

    Args:
      x: [B, H, W, C_in] noisy input; H and W multiples of 2^(len(channel_mult) - 1).
      t: [B] timesteps.
      cond: optional [B, cond_dim] (see `embed`).
      code: optional [B, code_dim] (see `embed`).
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      [B, H, W, out_channels] float32.
    """
    c = self.embed(t, cond, code)
    skips, h = self.encode(x, c, train)
    return self.decode(skips, h, c, train)
