"""Text-conditioned DiT denoiser for RaPD stage 2 (RaPD App. B.5, Table 5).

The denoiser predicts the flow-matching velocity of a normalised NIF latent
`x [B, h, w, C]` at time `t` (t = 0 noise, t = 1 data) given text tokens.

Layout (B.5):
  patchify p x p -> Linear(p*p*C -> bottleneck) -> Linear(bottleneck -> width)
  text: Linear(Dt -> width) -> `text_blocks` refinement blocks (self-attention over
    the text tokens with the padding mask, AdaLN from the timestep)
  `depth` DiT blocks, each AdaLN-modulated by the timestep (zero-initialised
    modulation, so every block starts as the identity, as in DiT):
    gated self-attention on image tokens with 2D RoPE and RMSNorm on Q/K,
    gated cross-attention image queries -> text keys/values (padding mask),
    SwiGLU FFN
  final AdaLN LayerNorm + zero-initialised Linear, unpatchify.

The token count depends only on the latent size (h/p * w/p) and the 2D RoPE is
computed from the token grid on the fly, so one set of parameters runs at any latent
size. Text tokens that are padding are never attended to; a sample whose text is all
padding (the unconditional input of classifier-free guidance) gets a zero
cross-attention update.

Every parameter carries logical axis names and activations `act_*` names; the mesh
rules live in configs. Attention, SwiGLU, RoPE, the timestep embedding and patchify are
shared layers from `infdiff.models.layers`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from infdiff.models import layers
from infdiff.models.layers import (
    Attention,
    Dtype,
    SwiGLU,
    patchify,
    rope_2d,
    timestep_embedding,
    unpatchify,
)

_ACT_AXES = layers.ACT_TOKENS  # [B, L, width] activations
# AdaLN modulation kernels [width, k * width] are sharded on 'embed' only: their output
# is split into k chunks that modulate activations whose embed dim is not tensor-sharded,
# so column sharding would only add an all-gather. (Sharding the columns on 'tensor',
# whose shard boundaries then cut through chunks, also gave wrong results from the XLA
# CPU partitioner on a data x fsdp x tensor mesh.)
_MOD_AXES = ("embed", None)


def modulate(x, shift, scale):
  """AdaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _layer_norm(dtype, name=None):
  """Affine-free LayerNorm: AdaLN supplies scale and shift (as in DiT)."""
  return layers.layer_norm(dtype, affine=False, epsilon=1e-6, name=name)


# ---------------------------------------------------------------------------------------
# Blocks.


class TextBlock(nn.Module):
  """Text-refinement block: AdaLN self-attention over text tokens + SwiGLU."""

  width: int = 1536  # model width
  heads: int = 24  # attention heads
  mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * width
  impl: str = "xla"  # attention implementation
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, c, mask):
    """x [B, L, E] text tokens, c [B, E] timestep condition, mask [B, L] bool."""
    mod = layers.dense(
        6 * self.width, _MOD_AXES, self.dtype, self.param_dtype, zero=True, name="adaln"
    )
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod(nn.silu(c)), 6, axis=-1)
    h = modulate(_layer_norm(self.dtype)(x), shift1, scale1)
    h = Attention(
        self.heads,
        self.width // self.heads,
        self.width,
        impl=self.impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="attn",
    )(h, mask=mask)
    x = x + gate1[:, None] * h
    h = modulate(_layer_norm(self.dtype)(x), shift2, scale2)
    h = SwiGLU(int(self.width * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")(h)
    x = x + gate2[:, None] * h
    return nn.with_logical_constraint(x, _ACT_AXES)


class DiTBlock(nn.Module):
  """Image block: gated RoPE self-attention, gated cross-attention to text, SwiGLU.

  All three sub-layers are AdaLN-modulated (shift, scale, gate) by the timestep; the
  modulation is zero-initialised so the block starts as the identity.
  """

  width: int = 1536  # model width
  heads: int = 24  # attention heads
  mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * width
  impl: str = "xla"  # attention implementation
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, c, text, text_mask, rope):
    """x [B, N, E] image tokens, c [B, E], text [B, L, E], text_mask [B, L], rope tables."""
    mod = layers.dense(
        9 * self.width, _MOD_AXES, self.dtype, self.param_dtype, zero=True, name="adaln"
    )
    chunks = jnp.split(mod(nn.silu(c)), 9, axis=-1)
    attn = lambda name: Attention(
        self.heads,
        self.width // self.heads,
        self.width,
        impl=self.impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    h = modulate(_layer_norm(self.dtype)(x), chunks[0], chunks[1])
    x = x + chunks[2][:, None] * attn("self_attn")(h, rope=rope)
    h = modulate(_layer_norm(self.dtype)(x), chunks[3], chunks[4])
    x = x + chunks[5][:, None] * attn("cross_attn")(h, context=text, mask=text_mask)
    h = modulate(_layer_norm(self.dtype)(x), chunks[6], chunks[7])
    h = SwiGLU(int(self.width * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")(h)
    x = x + chunks[8][:, None] * h
    return nn.with_logical_constraint(x, _ACT_AXES)


class DiT(nn.Module):
  """RaPD stage-2 denoiser: velocity of a latent given time and text (see module doc).

  Defaults are the paper's (Table 5, App. B.5); `text_dim` = 2048 is Qwen3-1.7B's width.
  """

  patch: int = 16  # patch size p on the latent grid
  in_channels: int = 16  # latent channels C
  bottleneck: int = 1024  # width of the linear patch bottleneck
  width: int = 1536  # model width
  depth: int = 16  # number of DiT blocks
  heads: int = 24  # attention heads (head_dim = width / heads, a multiple of 4)
  text_blocks: int = 4  # text-refinement blocks
  text_dim: int = 2048  # input text-token width
  mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * width (choice)
  repa_block: int = 8  # return image tokens after this many blocks for REPA (1-based)
  rope_theta: float = 10000.0  # RoPE base period
  time_scale: float = 1000.0  # t in [0, 1] is scaled by this before the sinusoid (choice)
  time_freq_dim: int = 256  # width of the sinusoidal timestep features
  # "xla" reference, "jax" (jax.nn.dot_product_attention), "cudnn" or "pallas" (flash
  # attention on GPU/TPU; layers.dot_product_attention)
  attention_impl: str = "xla"
  remat: bool = False  # rematerialise each block in the backward pass (saves memory)
  # Convolutional output head (not in RaPD; 0 = off, the paper's linear head): the final
  # Linear gives p*p*conv_head features per token, unpatchified to a [h, w, conv_head]
  # grid, then SiLU and a zero-initialised 3 x 3 conv to C, so every output cell also sees
  # the neighbouring tokens' features and the patch seams can be drawn across.
  conv_head: int = 0
  # Pooled caption in the AdaLN condition (not in RaPD; SD3 adds a pooled text vector to
  # its timestep embedding): the masked mean of the text tokens through a two-layer MLP is
  # added to the timestep condition of every block, so global properties of the caption
  # (how many objects) reach each block without cross-attention. An all-padding caption
  # (the unconditional input) pools to the zero vector, so the MLP adds a constant there.
  # False = the paper's timestep-only condition.
  pooled_text: bool = False
  dtype: Dtype = jnp.float32  # compute dtype (bf16 in the paper)
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, t, text, text_mask, train: bool = False, return_repa: bool = False):
    """Predicts the velocity.

    Args:
      x: [B, h, w, C] noisy normalised latent; h and w multiples of `patch`.
      t: [B] time in [0, 1], t = 1 is data.
      text: [B, L, text_dim] text-encoder hidden states.
      text_mask: [B, L] int or bool, nonzero for real tokens; all zeros means
        unconditional.
      train: unused (the model has no dropout); kept so all denoisers share a call.
      return_repa: also return the image-token features after block `repa_block`.

    Returns:
      v [B, h, w, C] float32, or (v, repa_features [B, N, width]) with N = hw / p^2.
    """
    del train
    layers.check_attention_impl(self.attention_impl)
    b, h, w, c = x.shape
    if c != self.in_channels:
      raise ValueError(f"expected {self.in_channels} latent channels, got {c}")
    if not 1 <= self.repa_block <= self.depth:
      raise ValueError(f"repa_block {self.repa_block} outside 1..{self.depth}")
    p = self.patch
    dt, pdt = self.dtype, self.param_dtype

    tokens = patchify(x.astype(dt), p)  # [B, N, p*p*C]
    tokens = layers.dense(self.bottleneck, (None, "mlp"), dt, pdt, name="patch_bottleneck")(tokens)
    tokens = layers.dense(self.width, ("mlp", "embed"), dt, pdt, name="patch_embed")(tokens)
    tokens = nn.with_logical_constraint(tokens, _ACT_AXES)  # [B, N, width]

    temb = timestep_embedding(t * self.time_scale, self.time_freq_dim)  # [B, F]
    temb = layers.dense(self.width, (None, "embed"), dt, pdt, name="time_mlp_0")(temb.astype(dt))
    cond = layers.dense(self.width, ("mlp", "embed"), dt, pdt, name="time_mlp_1")(nn.silu(temb))

    mask = text_mask.astype(bool)  # [B, L]
    if self.pooled_text:
      m = mask[..., None].astype(dt)
      pooled = (text.astype(dt) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # [B, text_dim]
      pooled = layers.dense(self.width, (None, "embed"), dt, pdt, name="pooled_mlp_0")(pooled)
      cond = cond + layers.dense(self.width, ("mlp", "embed"), dt, pdt, name="pooled_mlp_1")(
          nn.silu(pooled)
      )
    ctx = layers.dense(self.width, (None, "embed"), dt, pdt, name="text_proj")(text.astype(dt))
    ctx = nn.with_logical_constraint(ctx, _ACT_AXES)  # [B, L, width]
    for i in range(self.text_blocks):
      ctx = TextBlock(
          self.width, self.heads, self.mlp_ratio, self.attention_impl, dt, pdt, name=f"text_{i}"
      )(ctx, cond, mask)

    rope = rope_2d(h // p, w // p, self.width // self.heads, self.rope_theta)
    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    repa = None
    for i in range(self.depth):
      tokens = block_cls(
          self.width, self.heads, self.mlp_ratio, self.attention_impl, dt, pdt, name=f"block_{i}"
      )(tokens, cond, ctx, mask, rope)
      if i + 1 == self.repa_block:
        repa = tokens

    mod = layers.dense(2 * self.width, _MOD_AXES, dt, pdt, zero=True, name="final_mod")
    shift, scale = jnp.split(mod(nn.silu(cond)), 2, axis=-1)
    out = modulate(_layer_norm(dt, name="final_norm")(tokens), shift, scale)
    if self.conv_head:
      k = self.conv_head
      out = layers.dense(p * p * k, ("embed", None), dt, pdt, name="final")(out)
      out = nn.silu(unpatchify(out, h, w, p))  # [B, h, w, k]
      out = layers.conv(c, 3, dt, pdt, zero=True, name="final_conv")(out)
      v = out.astype(jnp.float32)  # [B, h, w, C]
    else:
      out = layers.dense(p * p * c, ("embed", None), dt, pdt, zero=True, name="final")(out)
      v = unpatchify(out, h, w, p).astype(jnp.float32)  # [B, h, w, C]
    if return_repa:
      return v, repa
    return v
