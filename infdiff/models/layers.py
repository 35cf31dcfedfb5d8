"""Layers shared by the denoisers and encoders: attention, MLPs, embeddings, factories.

Pure helpers (no parameters): `dot_product_attention`, the 2D RoPE tables `rope_2d` /
`apply_rope`, the sinusoidal `timestep_embedding` and `position_embedding`, and
`patchify` / `unpatchify`.

Linen layers: `HeadProjection` / `OutProjection` (per-head linear maps), `Attention`
(optional RMSNorm on Q/K, RoPE, output gate, zero-initialised output) and `SwiGLU`.
Factories: `dense`, `layer_norm` and `conv`, whose parameters carry logical axis names.

Naming convention (as in maxtext): parameters use 'embed', 'mlp', 'heads', 'kv',
'conv_in', 'conv_out', 'norm', ...; activations use separate `act_*` names
('act_batch', 'act_len', 'act_height', 'act_width', 'act_embed', 'act_mlp',
'act_heads', 'act_kv', 'act_latent'), so parameter and activation sharding are set
independently in the config's `logical_axis_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Any

# Activation axes of token sequences and of 2-D feature grids.
ACT_TOKENS = ("act_batch", "act_len", "act_embed")  # [B, L, E]
ACT_GRID = ("act_batch", "act_height", "act_width", "act_embed")  # [B, H, W, C]
# Attention output before the output projection: heads may be tensor-sharded.
_ACT_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")  # [B, L, H, D]


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
      (lets XLA pick a fused kernel on GPU), "cudnn" for its cuDNN flash attention (GPU
      only), "pallas" for the flash-attention kernels JAX ships under
      `jax.experimental.pallas.ops` (Triton on GPU, Mosaic on TPU; interpret mode in tests,
      `infdiff.kernels`). The Pallas kernels take no key mask across two sequences, so
      masked attention (text tokens, a few dozen) runs through `jax.nn.dot_product_attention`
      under "pallas"; the image tokens' self-attention, the long one, runs in the kernel.

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
  elif impl in ("jax", "cudnn") or (impl == "pallas" and mask is not None):
    bias_mask = None if mask is None else mask[:, None, None, :]
    backend = "cudnn" if impl == "cudnn" else None
    out = jax.nn.dot_product_attention(q, k, v, mask=bias_mask, scale=scale, implementation=backend)
  elif impl == "pallas":
    out = _pallas_flash_attention(q, k, v, scale)
  else:
    raise ValueError(f"unknown attention impl {impl!r}")
  if mask is not None:
    # A row with no valid key would otherwise average the (padding) values.
    out = out * jnp.any(mask, axis=-1)[:, None, None, None].astype(out.dtype)
  return out


ATTENTION_IMPLS = ("xla", "jax", "cudnn", "pallas")


def check_attention_impl(impl: str, option: str = "attention_impl") -> str:
  """Validates a dense-attention switch: one line when the choice cannot run here."""
  from infdiff import kernels

  if impl == "cudnn" and jax.default_backend() not in ("gpu", "cuda"):
    raise ValueError(
        f"{option}='cudnn' needs an NVIDIA GPU (this backend is {jax.default_backend()!r});"
        f" use {option}='xla' or 'jax'"
    )
  return kernels.check_impl(option, impl, ATTENTION_IMPLS)


def _flash_block(n: int) -> int:
  """The largest power of two <= 128 dividing n (the Pallas kernels tile the sequence)."""
  for b in (128, 64, 32, 16):
    if n % b == 0:
      return b
  raise ValueError(
      f"attention_impl='pallas' needs sequence lengths that are multiples of 16, got {n}; "
      "use attention_impl='jax'"
  )


def _pallas_flash_attention(q, k, v, scale):
  """Unmasked [B, L, H, D] attention through the Pallas flash-attention ops JAX ships."""
  from infdiff import kernels

  kernels.check_impl("attention_impl", "pallas", ATTENTION_IMPLS)
  bq, bk = _flash_block(q.shape[1]), _flash_block(k.shape[1])
  if jax.default_backend() == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

    t = lambda a: jnp.swapaxes(a, 1, 2)  # the TPU kernel is head-major
    sizes = tpu_fa.BlockSizes.get_default()
    out = tpu_fa.flash_attention(t(q), t(k), t(v), sm_scale=scale, block_sizes=sizes)
    return t(out)
  from jax.experimental.pallas.ops.gpu import attention as gpu_fa

  sizes = gpu_fa.BlockSizes(
      block_q=bq, block_k=bk, block_q_dkv=bq, block_kv_dkv=bk, block_q_dq=bq, block_kv_dq=bk
  )
  return gpu_fa.mha(
      q, k, v, None, sm_scale=scale, block_sizes=sizes, interpret=kernels.interpret_mode()
  )


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
  """Sinusoidal embedding of (scaled) times t [B] -> [B, dim] float32, [cos | sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


def position_embedding(pos, dim: int, max_period: float = 10000.0):
  """Sin-cos features of 2-D positions, one half per axis (Patch-DM's patch position).

  Args:
    pos: [B, 2] positions (row, col), e.g. a patch centre in patch units.
    dim: output width, a multiple of 4.
    max_period: longest period of the sinusoids.

  Returns:
    [B, dim] float32: `[timestep_embedding(row, dim/2) | timestep_embedding(col, dim/2)]`.
  """
  if dim % 4:
    raise ValueError(f"position_embedding needs dim % 4 == 0, got {dim}")
  rows = timestep_embedding(pos[:, 0], dim // 2, max_period)
  cols = timestep_embedding(pos[:, 1], dim // 2, max_period)
  return jnp.concatenate([rows, cols], -1)


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


# ---------------------------------------------------------------------------------------
# Factories whose parameters carry logical axis names.


def dense(
    features: int,
    axes: Sequence[str | None],
    dtype: Dtype,
    param_dtype: Dtype,
    *,
    zero: bool = False,
    init: Initializer | None = None,
    name: str | None = None,
    use_bias: bool = True,
) -> nn.Dense:
  """nn.Dense whose kernel carries `axes` (in, out) and bias `axes[-1]`.

  Args:
    features: output width.
    axes: logical names of the kernel's (input, output) axes.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    zero: zero-initialise the kernel (residual branches that start as the identity).
    init: kernel initialiser when not `zero`; default Xavier-uniform.
    name: submodule name.
    use_bias: add a (zero-initialised) bias.

  Returns:
    The layer.
  """
  if zero:
    init = nn.initializers.zeros_init()
  elif init is None:
    init = nn.initializers.xavier_uniform()
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(init, tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
      name=name,
  )


def layer_norm(
    dtype: Dtype,
    param_dtype: Dtype = jnp.float32,
    *,
    affine: bool = True,
    epsilon: float = 1e-6,
    name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm over the last axis; scale and bias (if `affine`) carry 'norm'.

  `affine=False` is the DiT's AdaLN norm, whose scale and shift come from the timestep.
  """
  if not affine:
    return nn.LayerNorm(epsilon=epsilon, use_bias=False, use_scale=False, dtype=dtype, name=name)
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


def conv(
    features: int,
    kernel: int,
    dtype: Dtype,
    param_dtype: Dtype,
    *,
    strides: int = 1,
    zero: bool = False,
    name: str | None = None,
) -> nn.Conv:
  """NHWC k x k conv, zero padding (k - 1) / 2 each side, kernel axes
  (None, None, 'conv_in', 'conv_out') and bias 'conv_out'.

  With stride 2 and k = 3 an input side n gives ceil(n / 2), as torch's
  `Conv2d(k=3, stride=2, padding=1)`.
  """
  pad = (kernel - 1) // 2
  init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


# ---------------------------------------------------------------------------------------
# Attention and MLP layers.


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
  zero: bool = False  # zero-initialised kernel (the residual branch starts at zero)
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x):
    if self.zero:
      init = nn.initializers.zeros_init()
    else:
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
  spending its softmax mass on a sink token. With `gated=False, qk_norm=False,
  zero_out=True` this is the plain attention of an ADM UNet block.
  """

  heads: int = 24  # number of attention heads
  head_dim: int = 64  # per-head width (width / heads)
  out_features: int = 1536  # output width (model width)
  gated: bool = True  # output gate sigmoid(W_g x) on the attention result
  qk_norm: bool = True  # RMSNorm on queries and keys (stabilises large-scale training)
  zero_out: bool = False  # zero-initialised output projection (ADM's zero proj_out)
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
    out = nn.with_logical_constraint(out, _ACT_HEADS)
    return OutProjection(
        self.out_features,
        zero=self.zero_out,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="out",
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
    a = dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, name="w1")(x)
    b = dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, name="w3")(x)
    h = nn.silu(a) * b  # [B, L, hidden]
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    return dense(width, ("mlp", "embed"), self.dtype, self.param_dtype, name="w2")(h)
