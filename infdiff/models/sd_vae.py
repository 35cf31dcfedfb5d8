"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) as a Flax Linen module.

Same architecture family as LDM's KL autoencoder (infdiff.models.ldm_autoencoder), whose
ResBlock, AttnBlock, conv and GroupNorm (eps 1e-6) are reused here:

Encoder: conv_in 3x3 -> per level i: `layers_per_block` ResBlocks(block_out_channels[i])
  (+ pad (0, 1, 0, 1) and 3x3 stride-2 conv, except at the last level) -> mid block
  (ResBlock, single-head attention over H*W, ResBlock) -> GroupNorm, SiLU, conv_out 3x3 to
  2 * latent_channels -> quant_conv 1x1 (if use_quant_conv).
Decoder: post_quant_conv 1x1 (if use_post_quant_conv) -> conv_in 3x3 -> mid block -> up
  blocks over reversed(block_out_channels), each `layers_per_block + 1` ResBlocks then
  nearest x2 + 3x3 conv (except the last) -> GroupNorm, SiLU, conv_out 3x3.

The attention's q/k/v/out linear layers are 1x1 convs here (identical maths); the loader
(infdiff.pretrained.sd_vae) reshapes the torch Linear weights. The param tree follows the
diffusers key structure: `encoder/down_blocks_0/resnets_1/conv1` is
`encoder.down_blocks.0.resnets.1.conv1`; the LDM blocks' inner names differ slightly
(`nin_shortcut` = `conv_shortcut`, attention `norm/q/k/v/proj_out` =
`group_norm/to_q/to_k/to_v/to_out.0`, `downsamplers_0` = `downsamplers.0.conv`,
`upsamplers_0` = `upsamplers.0.conv`).

Images are float32 [B, H, W, C] in [0, 1]; the model works on [-1, 1] inside. Latents are
unscaled: multiply by `scaling_factor` (after subtracting `shift_factor` if set) for the
diffusion model's latent space, as diffusers pipelines do. Odd sizes work: each
downsample maps a side s to floor(s / 2), exactly as torch does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infdiff.models import layers
from infdiff.models.ldm_autoencoder import AttnBlock, ResBlock, _downsample, conv, group_norm

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers DiagonalGaussianDistribution clamp


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` without timestep: ResBlock, (attention), ResBlock."""

  norm_groups: int = 32  # GroupNorm groups
  add_attention: bool = True  # the attention between the two ResBlocks
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = ResBlock(width, **kw, name="resnets_0")(x)
    if self.add_attention:
      x = AttnBlock(**kw, name="attentions_0")(x)
    return ResBlock(width, **kw, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`: `num_layers` ResBlocks, then an optional downsample."""

  out_channels: int  # width of every ResBlock
  num_layers: int = 2  # ResBlocks
  add_downsample: bool = True  # pad (0, 1, 0, 1) + 3x3 stride-2 conv
  norm_groups: int = 32  # GroupNorm groups
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResBlock(self.out_channels, **kw, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = _downsample(x, self.out_channels, self.dtype, self.param_dtype, "downsamplers_0")
    return x


class UpDecoderBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: `num_layers` ResBlocks, then optional nearest x2 + conv."""

  out_channels: int  # width of every ResBlock
  num_layers: int = 3  # ResBlocks
  add_upsample: bool = True  # nearest x2 + 3x3 conv
  norm_groups: int = 32  # GroupNorm groups
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResBlock(self.out_channels, **kw, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
      x = conv(self.out_channels, 3, self.dtype, self.param_dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """diffusers VAE `Encoder` (double_z): [B, H, W, in] in [-1, 1] -> [B, h, w, 2 latent]."""

  block_out_channels: Sequence[int] = (128, 256, 512, 512)  # width per level
  layers_per_block: int = 2  # ResBlocks per level
  latent_channels: int = 4  # C (the output has 2C: mean | logvar)
  norm_groups: int = 32  # GroupNorm groups
  mid_block_add_attention: bool = True  # attention in the mid block
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    dt, pdt = self.dtype, self.param_dtype
    widths = tuple(self.block_out_channels)
    h = conv(widths[0], 3, dt, pdt, name="conv_in")(x.astype(dt))
    for i, width in enumerate(widths):
      h = DownEncoderBlock(
          width,
          self.layers_per_block,
          add_downsample=i != len(widths) - 1,
          norm_groups=self.norm_groups,
          dtype=dt,
          param_dtype=pdt,
          name=f"down_blocks_{i}",
      )(h)
      h = nn.with_logical_constraint(h, layers.ACT_GRID)
    h = MidBlock(self.norm_groups, self.mid_block_add_attention, dt, pdt, name="mid_block")(h)
    h = nn.silu(group_norm(self.norm_groups, dt, pdt, "conv_norm_out")(h))
    return conv(2 * self.latent_channels, 3, dt, pdt, name="conv_out")(h)


class Decoder(nn.Module):
  """diffusers VAE `Decoder`: [B, h, w, latent] -> [B, H, W, out_channels] in [-1, 1] scale."""

  block_out_channels: Sequence[int] = (128, 256, 512, 512)  # width per level (encoder order)
  layers_per_block: int = 2  # the decoder has layers_per_block + 1 per level
  out_channels: int = 3  # image channels
  norm_groups: int = 32  # GroupNorm groups
  mid_block_add_attention: bool = True  # attention in the mid block
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, z):
    dt, pdt = self.dtype, self.param_dtype
    widths = tuple(reversed(tuple(self.block_out_channels)))
    h = conv(widths[0], 3, dt, pdt, name="conv_in")(z.astype(dt))
    h = MidBlock(self.norm_groups, self.mid_block_add_attention, dt, pdt, name="mid_block")(h)
    for i, width in enumerate(widths):
      h = UpDecoderBlock(
          width,
          self.layers_per_block + 1,
          add_upsample=i != len(widths) - 1,
          norm_groups=self.norm_groups,
          dtype=dt,
          param_dtype=pdt,
          name=f"up_blocks_{i}",
      )(h)
      h = nn.with_logical_constraint(h, layers.ACT_GRID)
    h = nn.silu(group_norm(self.norm_groups, dt, pdt, "conv_norm_out")(h))
    return conv(self.out_channels, 3, dt, pdt, name="conv_out")(h)


class SDVAE(nn.Module):
  """Stable Diffusion VAE (diffusers AutoencoderKL; SD1.x / SD2 / SDXL layouts).

  Methods (call with `model.apply(params, x, method=model.<name>)`):
    encode(images)  [B, H, W, in] in [0, 1] -> {'mean', 'logvar'}: [B, h, w, C] float32,
                    unscaled, logvar clamped to [-30, 20]; h = H // 2^(L-1) (floor at each
                    level). Runs only the encoder (+ quant_conv): params without the
                    decoder's entries suffice.
    moments(images) the raw encoder (+ quant_conv) output [B, h, w, 2C] (mean | logvar).
    decode(latent)  [B, h, w, C] unscaled -> images [B, h 2^(L-1), w 2^(L-1), out] on the
                    [0, 1] scale (0.5 * diffusers' output + 0.5), not clipped. Runs only
                    post_quant_conv + the decoder.
    __call__(images) decode(encode(images)['mean']) (used by init).
  """

  block_out_channels: Sequence[int] = (128, 256, 512, 512)  # width per level
  layers_per_block: int = 2  # encoder ResBlocks per level (decoder: + 1)
  latent_channels: int = 4  # C
  norm_num_groups: int = 32  # GroupNorm groups
  in_channels: int = 3  # image channels into the encoder
  out_channels: int = 3  # image channels out of the decoder
  mid_block_add_attention: bool = True  # attention in both mid blocks
  use_quant_conv: bool = True  # 1x1 conv (2C -> 2C) after the encoder
  use_post_quant_conv: bool = True  # 1x1 conv (C -> C) before the decoder
  scaling_factor: float = 0.18215  # latent scale for diffusion (SD1.x; SDXL 0.13025)
  shift_factor: float | None = None  # latent shift (SD3/FLUX VAEs); None for SD1.x/SDXL
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> SDVAE:
    """Builds the module from a diffusers AutoencoderKL config.json dict (see `from_config`)."""
    return from_config(config, **overrides)

  def setup(self):
    kw = dict(
        block_out_channels=tuple(self.block_out_channels),
        layers_per_block=self.layers_per_block,
        norm_groups=self.norm_num_groups,
        mid_block_add_attention=self.mid_block_add_attention,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    c, dt, pdt = self.latent_channels, self.dtype, self.param_dtype
    self.encoder = Encoder(latent_channels=c, **kw)
    if self.use_quant_conv:
      self.quant_conv = conv(2 * c, 1, dt, pdt)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(c, 1, dt, pdt)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)

  def moments(self, images: jax.Array) -> jax.Array:
    if images.shape[-1] != self.in_channels:
      raise ValueError(f"SDVAE expects {self.in_channels} image channels, got {images.shape}")
    x = images.astype(jnp.float32) * 2.0 - 1.0  # [0, 1] -> [-1, 1]
    h = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      h = self.quant_conv(h)
    return h.astype(jnp.float32)

  def encode(self, images: jax.Array) -> dict[str, jax.Array]:
    mean, logvar = jnp.split(self.moments(images), 2, axis=-1)
    return {"mean": mean, "logvar": jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)}

  def decode(self, latent: jax.Array) -> jax.Array:
    z = latent.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    x = self.decoder(z).astype(jnp.float32)
    return x * 0.5 + 0.5  # [-1, 1] -> [0, 1], not clipped

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images)["mean"])


# --------------------------------------------------------------------------- config

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


def from_config(config: Mapping[str, Any], **overrides) -> SDVAE:
  """Builds an SDVAE from a diffusers AutoencoderKL `config.json` dict.

  Defaults are diffusers' AutoencoderKL defaults for absent keys. Keys that do not change
  the network (sample_size, force_upcast, latents_mean/std, _diffusers_version, ...) are
  ignored.

  Args:
    config: the parsed config.json.
    **overrides: SDVAE fields to set afterwards (dtype, param_dtype, ...).

  Raises:
    ValueError: one line, for a config this port does not support (another class, block
      types other than DownEncoderBlock2D / UpDecoderBlock2D, act_fn other than silu,
      in_channels != out_channels, mismatched lengths, widths not divisible by the groups).
  """
  cfg = dict(config)
  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise ValueError(f"sd_vae supports diffusers AutoencoderKL configs, got _class_name {cls!r}")
  widths = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
  down = tuple(cfg.get("down_block_types", (DOWN_BLOCK,)))
  up = tuple(cfg.get("up_block_types", (UP_BLOCK,)))
  bad_down = sorted({b for b in down if b != DOWN_BLOCK})
  bad_up = sorted({b for b in up if b != UP_BLOCK})
  if bad_down or bad_up:
    raise ValueError(
        f"sd_vae supports only {DOWN_BLOCK} / {UP_BLOCK} blocks, got {bad_down + bad_up}"
    )
  if not widths or len(down) != len(widths) or len(up) != len(widths):
    raise ValueError(
        f"sd_vae config has {len(widths)} block_out_channels but {len(down)} down and "
        f"{len(up)} up block types"
    )
  act = cfg.get("act_fn", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"sd_vae supports act_fn 'silu' only, got {act!r}")
  in_ch, out_ch = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
  if in_ch != out_ch:
    raise ValueError(f"sd_vae maps images to images: in_channels {in_ch} != out_channels {out_ch}")
  groups = int(cfg.get("norm_num_groups", 32))
  if any(c % groups for c in widths):
    raise ValueError(f"sd_vae block_out_channels {widths} not divisible by {groups} groups")
  shift = cfg.get("shift_factor")
  fields = dict(
      block_out_channels=widths,
      layers_per_block=int(cfg.get("layers_per_block", 1)),
      latent_channels=int(cfg.get("latent_channels", 4)),
      norm_num_groups=groups,
      in_channels=in_ch,
      out_channels=out_ch,
      mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
      use_quant_conv=bool(cfg.get("use_quant_conv", True)),
      use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
      scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
      shift_factor=None if shift is None else float(shift),
  )
  fields.update(overrides)
  return SDVAE(**fields)


__all__ = ["SDVAE", "Decoder", "Encoder", "from_config"]
