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

Every parameter carries logical axis names; the mesh rules live in configs.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_ACT_AXES = ("batch", "length", "embed")
# AdaLN modulation kernels [width, k * width] are sharded on 'embed' only: their output
# is split into k chunks that modulate activations whose embed dim is not tensor-sharded,
# so column sharding would only add an all-gather. (Sharding the columns on 'tensor',
# whose shard boundaries then cut through chunks, also gave wrong results from the XLA
# CPU partitioner on a data x fsdp x tensor mesh.)
_MOD_AXES = ("embed", None)


# ---------------------------------------------------------------------------------------
# Pure helpers.


def dot_product_attention(q, k, v, mask=None, impl: str = "xla"):
  """Multi-head attention with an optional key-padding mask.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, H, D] keys.
    v: [B, Lk, H, D] values.
    mask: optional [B, Lk] bool, True where the key is a real token.
    impl: "xla" for the einsum-softmax reference, "jax" for `jax.nn.dot_product_attention`
      (lets XLA pick a fused kernel on GPU).

  Returns:
    [B, Lq, H, D] in q's dtype. Queries whose keys are all masked get zeros, so an
    all-padding text contributes nothing (the unconditional branch of CFG).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  if impl == "xla":
    # Softmax in float32 whatever the compute dtype: bf16 logits lose the small
    # differences that decide attention over long sequences.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  elif impl == "jax":
    bias_mask = None if mask is None else mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=bias_mask, scale=scale)
  else:
    raise ValueError(f"unknown attention impl {impl!r}")
  if mask is not None:
    # A row with no valid key would otherwise average the (padding) values.
    out = out * jnp.any(mask, axis=-1)[:, None, None, None].astype(out.dtype)
  return out


def rope_2d(h: int, w: int, head_dim: int, theta: float = 10000.0):
  """Axial 2D rotary tables for an h x w token grid.

  Half of the rotated pairs turn with the row index, half with the column index, so
  the dot product of a query and a key depends on their (row, col) offset only.
  Positions are integer token indices: tokens keep the same spacing at every latent
  size, which is what lets the model run on grids it was not trained on.

  Args:
    h: token rows.
    w: token columns.
    head_dim: per-head width, a multiple of 4.
    theta: RoPE base period.

  Returns:
    (cos, sin), each [h * w, head_dim // 2] float32, row-major over the grid.
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got {head_dim}")
  quarter = head_dim // 4
  freqs = theta ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)  # [D/4]
  rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  rows = rows.reshape(-1).astype(jnp.float32)
  cols = cols.reshape(-1).astype(jnp.float32)
  angles = jnp.concatenate([rows[:, None] * freqs, cols[:, None] * freqs], -1)  # [N, D/2]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """Rotates x [B, N, H, D] by tables [N, D/2] (pairs (x[k], x[k + D/2]))."""
  half = x.shape[-1] // 2
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
  return out.astype(x.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (scaled) times t [B] -> [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


def patchify(x, p: int):
  """[B, h, w, C] -> [B, (h/p)*(w/p), p*p*C], tokens row-major over the patch grid."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"latent {h}x{w} is not divisible by patch {p}")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, h: int, w: int, p: int):
  """Inverse of `patchify`: [B, N, p*p*C] -> [B, h, w, C]."""
  b, _, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def modulate(x, shift, scale):
  """AdaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _dense(features, axes, dtype, param_dtype, *, zero=False, name=None, use_bias=True):
  """Linear layer whose kernel and bias carry logical axis names."""
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
      name=name,
  )


def _layer_norm(dtype, name=None):
  """Affine-free LayerNorm: AdaLN supplies scale and shift (as in DiT)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


# ---------------------------------------------------------------------------------------
# Layers (shared with infdiff.models.text).


# nn.DenseGeneral is not used for the per-head projections: it initialises a flattened
# kernel, and under a mesh the boxed 3-axis logical names then meet a rank-2 array.


class HeadProjection(nn.Module):
  """Linear map to attention heads: [B, L, E] -> [B, L, heads, head_dim]."""

  heads: int = 24  # attention heads
  head_dim: int = 64  # per-head width
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
        (x.shape[-1], self.heads, self.head_dim),
        self.param_dtype,
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")),
        (self.heads, self.head_dim),
        self.param_dtype,
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum("ble,ehd->blhd", x, kernel) + bias


class OutProjection(nn.Module):
  """Linear map from attention heads: [B, L, heads, head_dim] -> [B, L, features]."""

  features: int = 1536  # output width
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
        (*x.shape[-2:], self.features),
        self.param_dtype,
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        (self.features,),
        self.param_dtype,
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum("blhd,hde->ble", x, kernel) + bias


class Attention(nn.Module):
  """Multi-head attention with RMSNorm on Q/K, optional RoPE and an output gate.

  The output gate is `attn(x) * sigmoid(W_g x)`, applied per head channel before the
  output projection (gated attention); it lets a head switch itself off instead of
  spending its softmax mass on a sink token.
  """

  heads: int = 24  # number of attention heads
  head_dim: int = 64  # per-head width (width / heads)
  out_features: int = 1536  # output width (model width)
  gated: bool = True  # output gate sigmoid(W_g x) on the attention result
  qk_norm: bool = True  # RMSNorm on queries and keys (stabilises large-scale training)
  impl: str = "xla"  # "xla" einsum reference or "jax" (jax.nn.dot_product_attention)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x, context=None, mask=None, rope=None):
    """Attends from x [B, Lq, E] to context [B, Lk, E'] (x itself when None).

    Args:
      x: [B, Lq, E] query tokens.
      context: [B, Lk, E'] key/value tokens; None for self-attention.
      mask: [B, Lk] bool key-padding mask or None.
      rope: (cos, sin) tables [Lq, head_dim/2] for self-attention, or None.

    Returns:
      [B, Lq, out_features].
    """
    context = x if context is None else context

    def proj(name):
      return HeadProjection(
          self.heads, self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name
      )

    q = proj("query")(x)  # [B, Lq, H, D]
    k = proj("key")(context)  # [B, Lk, H, D]
    v = proj("value")(context)  # [B, Lk, H, D]
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(
          epsilon=1e-6,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
          name=name,
      )
      q = norm("query_norm")(q)
      k = norm("key_norm")(k)
    if rope is not None:
      q = apply_rope(q, *rope)
      k = apply_rope(k, *rope)
    out = dot_product_attention(q, k, v, mask=mask, impl=self.impl)  # [B, Lq, H, D]
    if self.gated:
      gate = proj("gate")(x)
      out = out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(out.dtype)
    return OutProjection(
        self.out_features, dtype=self.dtype, param_dtype=self.param_dtype, name="out"
    )(out)


class SwiGLU(nn.Module):
  """Gated FFN `W2(silu(W1 x) * W3 x)`."""

  hidden: int = 6144  # FFN hidden width
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    """x [B, L, E] -> [B, L, E]."""
    width = x.shape[-1]
    a = _dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, name="w1")(x)
    b = _dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, name="w3")(x)
    h = nn.silu(a) * b  # [B, L, hidden]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return _dense(width, ("mlp", "embed"), self.dtype, self.param_dtype, name="w2")(h)


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
    mod = _dense(6 * self.width, _MOD_AXES, self.dtype, self.param_dtype, zero=True, name="adaln")
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
    mod = _dense(9 * self.width, _MOD_AXES, self.dtype, self.param_dtype, zero=True, name="adaln")
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
  attention_impl: str = "xla"  # "xla" reference or "jax" (jax.nn.dot_product_attention)
  remat: bool = False  # rematerialise each block in the backward pass (saves memory)
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
    b, h, w, c = x.shape
    if c != self.in_channels:
      raise ValueError(f"expected {self.in_channels} latent channels, got {c}")
    if not 1 <= self.repa_block <= self.depth:
      raise ValueError(f"repa_block {self.repa_block} outside 1..{self.depth}")
    p = self.patch
    dt, pdt = self.dtype, self.param_dtype

    tokens = patchify(x.astype(dt), p)  # [B, N, p*p*C]
    tokens = _dense(self.bottleneck, (None, "mlp"), dt, pdt, name="patch_bottleneck")(tokens)
    tokens = _dense(self.width, ("mlp", "embed"), dt, pdt, name="patch_embed")(tokens)
    tokens = nn.with_logical_constraint(tokens, _ACT_AXES)  # [B, N, width]

    temb = timestep_embedding(t * self.time_scale, self.time_freq_dim)  # [B, F]
    temb = _dense(self.width, (None, "embed"), dt, pdt, name="time_mlp_0")(temb.astype(dt))
    cond = _dense(self.width, ("mlp", "embed"), dt, pdt, name="time_mlp_1")(nn.silu(temb))

    mask = text_mask.astype(bool)  # [B, L]
    ctx = _dense(self.width, (None, "embed"), dt, pdt, name="text_proj")(text.astype(dt))
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

    mod = _dense(2 * self.width, _MOD_AXES, dt, pdt, zero=True, name="final_mod")
    shift, scale = jnp.split(mod(nn.silu(cond)), 2, axis=-1)
    out = modulate(_layer_norm(dt, name="final_norm")(tokens), shift, scale)
    out = _dense(p * p * c, ("embed", None), dt, pdt, zero=True, name="final")(out)
    v = unpatchify(out, h, w, p).astype(jnp.float32)  # [B, h, w, C]
    if return_repa:
      return v, repa
    return v
