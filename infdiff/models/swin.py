"""Swin-style window attention over a 2-D grid of tokens (CQAR's blocks).

Layout conventions: token grids are [B, H, W, D] with H and W multiples of the window
size `w`; a window partition is [B, nW, w*w, D] with windows in row-major order and the
tokens of a window in row-major order.

Masking: attention is restricted by two boolean masks, both "True = may attend":
- the shifted-window mask: after a cyclic shift by `shift`, a window can hold tokens
  that were far apart before the shift (the wrapped border strips); they must not
  attend to each other (Swin, RaPD Eq. 16).
- a key mask: padding tokens (grid positions that are not real output pixels) are
  never used as keys, so real tokens' outputs do not depend on them.

Together they make the partition equivalent to an infinite lattice of windows (origin 0
for regular blocks, origin w/2 for shifted blocks) restricted to the real tokens. That
is what lets tiled rendering reproduce an untiled render exactly (see infdiff/render.py).

The attention itself (logits, bias, masked softmax, weighted values) is
`infdiff.kernels.window_attention`: the XLA reference or a fused Pallas kernel, picked by
`attention_impl`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff import kernels
from infdiff.kernels import window_attention as wattn
from infdiff.models import layers


def window_partition(x: jax.Array, w: int) -> jax.Array:
  """Splits a token grid into non-overlapping w x w windows (numpy or jax arrays).

  Args:
    x: [B, H, W, D] with H and W multiples of w.
    w: window size.

  Returns:
    [B, (H/w)*(W/w), w*w, D], windows row-major, tokens row-major inside a window.
  """
  b, h, wd, d = x.shape
  x = x.reshape(b, h // w, w, wd // w, w, d)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // w) * (wd // w), w * w, d)


def window_reverse(windows: jax.Array, w: int, h: int, wd: int) -> jax.Array:
  """Inverse of `window_partition`: [B, nW, w*w, D] -> [B, h, wd, D]."""
  b, _, _, d = windows.shape
  x = windows.reshape(b, h // w, wd // w, w, w, d)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, wd, d)


def relative_position_index(w: int) -> np.ndarray:
  """Index into the (2w-1)^2 relative-position table for every token pair of a window.

  Returns:
    [w*w, w*w] int32, entry (p, q) = (dy + w - 1) * (2w - 1) + (dx + w - 1) with
    (dy, dx) = pos(p) - pos(q), tokens numbered row-major inside the window.
  """
  pos = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
  rel = pos[:, None, :] - pos[None, :, :] + (w - 1)  # [N, N, 2] in [0, 2w-2]
  return (rel[..., 0] * (2 * w - 1) + rel[..., 1]).astype(np.int32)


def _strip_labels(n: int, w: int, shift: int) -> np.ndarray:
  """Per-row (or column) region label of a cyclically shifted axis of length n.

  Position p of the shifted axis holds the token originally at (p + shift) mod n; that
  token belongs to window (orig + shift) // w of the lattice offset by -shift. The
  wrapped strip [n - shift, n) of the shifted axis (original [0, shift)) gets label 0 and
  the strip next to it (original [n - shift, n)) gets n // w, so the two strips merged
  into the last window never match.
  """
  orig = (np.arange(n) + shift) % n
  return (orig + shift) // w


def shifted_window_labels(hp: int, wp: int, w: int, shift: int, xp=np):
  """Region label of every token of each window after a cyclic shift by `shift`.

  Args:
    hp: padded grid height (multiple of w).
    wp: padded grid width (multiple of w).
    w: window size.
    shift: cyclic shift applied to the grid (0 for regular blocks, w // 2 for shifted).
    xp: np for a host array (tests), jnp to build it inside a traced function from
      two 1-D constants instead of embedding an [nW, N] constant in the program.

  Returns:
    [nW, w*w] integer labels, equal for two tokens of a window iff they come from the same
    region of the unshifted grid. All equal within a window when shift == 0.
  """
  ly = xp.asarray(_strip_labels(hp, w, shift))
  lx = xp.asarray(_strip_labels(wp, w, shift))
  labels = ly[:, None] * (wp + 1) + lx[None, :]  # [hp, wp] unique per region
  return window_partition(labels[None, :, :, None], w)[0, ..., 0]  # [nW, N]


def shifted_window_mask(hp: int, wp: int, w: int, shift: int, xp=np):
  """Which token pairs of each window may attend after a cyclic shift by `shift`.

  Args: as `shifted_window_labels`.

  Returns:
    [nW, w*w, w*w] bool, True where query p and key q come from the same region of the
    unshifted grid. All True when shift == 0.
  """
  lab = shifted_window_labels(hp, wp, w, shift, xp)  # [nW, N]
  return lab[:, :, None] == lab[:, None, :]


def key_padding_mask(valid: jax.Array, w: int, shift: int) -> jax.Array:
  """Per-window key mask from a per-token validity grid.

  Args:
    valid: [B, Hp, Wp] bool, True for real tokens (unshifted layout).
    w: window size.
    shift: cyclic shift of the block (applied here exactly as to the tokens).

  Returns:
    [B, nW, 1, w*w] bool, True where the key token is real.
  """
  if shift:
    valid = jnp.roll(valid, (-shift, -shift), axis=(1, 2))
  return window_partition(valid[..., None], w)[..., 0][:, :, None, :]


def pad_to_multiple(x: jax.Array, w: int, value=0) -> jax.Array:
  """Pads axes 1 and 2 of x ([B, H, W, ...]) at the end up to multiples of w."""
  ph, pw = -x.shape[1] % w, -x.shape[2] % w
  if ph == 0 and pw == 0:
    return x
  pads = [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pads, constant_values=value)


def _dense(features, axes, dtype, param_dtype, name, use_bias=True):
  return layers.dense(features, axes, dtype, param_dtype, name=name, use_bias=use_bias)


def layer_norm(dtype, param_dtype, name):
  """LayerNorm (eps 1e-5, as Swin) whose scale and bias carry the 'norm' logical axis."""
  return layers.layer_norm(dtype, param_dtype, epsilon=1e-5, name=name)


class _Weights(nn.Module):
  """Holds one projection's kernel and bias (the layout nn.DenseGeneral would create) and
  returns them, so that the parent can fuse several projections into one matmul."""

  kernel_shape: tuple[int, ...]  # kernel shape
  kernel_axes: tuple[str, ...]  # logical names of the kernel axes
  bias_axes: tuple[str, ...]  # logical names of the bias axes (the kernel's output axes)
  in_axes: int = 1  # number of leading (input) kernel axes, for the fan-in of the init
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self):
    n = len(self.kernel_shape)
    init = nn.initializers.xavier_uniform(
        in_axis=tuple(range(self.in_axes)), out_axis=tuple(range(self.in_axes, n))
    )
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(init, self.kernel_axes),
        self.kernel_shape,
        self.param_dtype,
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
        self.kernel_shape[self.in_axes :],
        self.param_dtype,
    )
    return kernel, bias


def relative_bias_init(w: int, num_heads: int, slope: float):
  """Initialiser of the [(2w-1)^2, heads] bias table, indexed (dy+w-1)*(2w-1)+(dx+w-1).

  trunc-normal(0.02) (Swin) minus `slope * 2^-h * |(dy, dx)|` for head h. With slope > 0
  attention starts local instead of uniform over the window, which a short run needs:
  uniform attention blurs every token with its whole window.
  """
  d = np.arange(-(w - 1), w, dtype=np.float32)
  dist = np.sqrt(d[:, None] ** 2 + d[None, :] ** 2).reshape(-1)  # [(2w-1)^2]
  prior = dist[:, None] * (slope * 2.0 ** -np.arange(num_heads, dtype=np.float32))[None, :]

  def init(key, shape, dtype=jnp.float32):
    base = nn.initializers.truncated_normal(0.02)(key, shape, dtype)
    return base - jnp.asarray(prior, dtype) if slope else base

  return init


class WindowAttention(nn.Module):
  """(Shifted-)window multi-head self-attention with a learned relative position bias.

  Parameters are laid out as nn.DenseGeneral would ('query', 'key', 'value': kernel
  [D, heads, head_dim]; 'out': kernel [heads, head_dim, D]), but the three input
  projections run as one fused matmul straight into the head-major layout
  [B, nW, heads, N, head_dim] that the batched attention matmuls want: on CPU the
  narrow per-projection matmuls and the transposes around token-major einsums cost
  more than the attention itself.

  The attention proper runs as `attention_impl` selects: 'xla' (batched einsums; the
  weights are sown as intermediates 'attention_weights') or 'pallas' (one fused kernel,
  infdiff/kernels/window_attention.py; the weights are never materialised, so nothing is
  sown). Both have the same parameters and, in float32, the same outputs to rounding.
  """

  dim: int = 256  # model width D
  num_heads: int = 4  # attention heads; head dim = dim // num_heads
  window: int = 8  # window size w (tokens per side)
  shift: int = 0  # cyclic shift; 0 for regular blocks, window // 2 for shifted ones
  # Locality prior of the bias table at init: -slope * 2^-h * distance for head h (ALiBi-
  # style); 0 keeps Swin's trunc-normal(0.02). Still learned; only the start differs.
  rpb_init_slope: float = 0.0
  attention_impl: str = "xla"  # 'xla' | 'pallas' (fused kernel; GPU, or interpret mode)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """Attends within windows.

    Args:
      x: [B, Hp, Wp, D] tokens, Hp and Wp multiples of the window.
      valid: [B, Hp, Wp] bool, False for padding tokens (never used as keys).

    Returns:
      [B, Hp, Wp, D].
    """
    impl = kernels.check_impl("attention_impl", self.attention_impl)
    b, hp, wp, d = x.shape
    w, s, nh = self.window, self.shift, self.num_heads
    if d % nh:
      raise ValueError(f"dim {d} is not divisible by num_heads {nh}")
    hd = d // nh
    if s:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))
    xw = window_partition(x, w)  # [B, nW, N, D]

    in_proj = lambda name: _Weights(
        (d, nh, hd), ("embed", "heads", "kv"), ("heads", "kv"), 1, self.param_dtype, name=name
    )()
    (kq, bq), (kk, bk), (kv, bv) = in_proj("query"), in_proj("key"), in_proj("value")
    scale = hd**-0.5  # folded into the query weights: one pass less over the queries
    kernel = jnp.stack([kq * scale, kk, kv], axis=1)  # [D, 3, nh, hd]
    bias = jnp.stack([bq * scale, bk, bv], axis=0)  # [3, nh, hd]
    xw, kernel, bias = nn.dtypes.promote_dtype(xw, kernel, bias, dtype=self.dtype)
    qkv = jnp.einsum("bwnd,dthe->tbwhne", xw, kernel) + bias[:, None, None, :, None, :]
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, nW, nh, N, hd]

    table = self.param(
        "rel_pos_bias",
        nn.with_logical_partitioning(
            relative_bias_init(w, nh, self.rpb_init_slope), ("rel_pos", "heads")
        ),
        ((2 * w - 1) ** 2, nh),
        self.param_dtype,
    )
    idx = relative_position_index(w)
    rel = jnp.asarray(table)[idx].transpose(2, 0, 1)  # [nh, N, N]

    key_mask = key_padding_mask(valid, w, s)[:, :, 0]  # [B, nW, N]
    region = shifted_window_labels(hp, wp, w, s, xp=jnp) if s else None  # [nW, N]
    if impl == "xla":
      allowed = wattn.allowed_pairs(key_mask, region)  # [B, nW, 1, 1 or N, N]
      out, weights = wattn.window_attention_reference(q, k, v, rel, allowed)
      # Sown on the XLA path only: the Pallas kernel never materialises the weights.
      self.sow("intermediates", "attention_weights", weights)  # [B, nW, nh, N, N]
    else:
      out = wattn.window_attention(q, k, v, rel, key_mask, region, impl=impl)
    # out: [B, nW, nh, N, hd]

    ko, bo = _Weights(
        (nh, hd, d), ("heads", "kv", "embed"), ("embed",), 2, self.param_dtype, name="out"
    )()
    out, ko, bo = nn.dtypes.promote_dtype(out, ko, bo, dtype=self.dtype)
    out = jnp.einsum("bwhqe,hef->bwqf", out, ko) + bo  # [B, nW, N, D]
    out = window_reverse(out, w, hp, wp)
    if s:
      out = jnp.roll(out, (s, s), axis=(1, 2))
    return out


class GatedFFN(nn.Module):
  """W2(GELU(W1 x) * W3 x) (RaPD Eq. 17)."""

  dim: int = 256  # model width D
  expansion: int = 4  # hidden width = expansion * dim (choice)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.expansion * self.dim
    a = _dense(hidden, ("embed", "mlp"), self.dtype, self.param_dtype, "w1")(x)
    g = _dense(hidden, ("embed", "mlp"), self.dtype, self.param_dtype, "w3")(x)
    return _dense(self.dim, ("mlp", "embed"), self.dtype, self.param_dtype, "w2")(nn.gelu(a) * g)


class SwinBlock(nn.Module):
  """x = x + WMSA(LN(x)); x = x + GatedFFN(LN(x)) (RaPD Eqs. 13-14)."""

  dim: int = 256  # model width D
  num_heads: int = 4  # attention heads
  window: int = 8  # window size w
  shift: int = 0  # cyclic shift (0 or window // 2)
  expansion: int = 4  # gated FFN expansion factor (choice)
  rpb_init_slope: float = 0.0  # locality prior of the bias table at init (WindowAttention)
  attention_impl: str = "xla"  # 'xla' | 'pallas' window attention (WindowAttention)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """Args: x [B, Hp, Wp, D]; valid [B, Hp, Wp] bool. Returns [B, Hp, Wp, D]."""
    h = layer_norm(self.dtype, self.param_dtype, "norm1")(x)
    x = x + WindowAttention(
        self.dim,
        self.num_heads,
        self.window,
        self.shift,
        rpb_init_slope=self.rpb_init_slope,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="attn",
    )(h, valid)
    h = layer_norm(self.dtype, self.param_dtype, "norm2")(x)
    x = x + GatedFFN(
        self.dim, self.expansion, dtype=self.dtype, param_dtype=self.param_dtype, name="ffn"
    )(h)
    return nn.with_logical_constraint(x, layers.ACT_GRID)
