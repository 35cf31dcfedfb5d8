"""(Shifted-)window multi-head attention: the XLA reference and a fused Pallas kernel.

Both compute, for every window and head independently,

    out = softmax(where(allowed, q k^T + bias, MASK_LOGIT)) v

with the softmax in float32 and forbidden entries' weights exactly 0. The query scale is
expected to be folded into q already. Layout (infdiff/models/swin.py):

- q, k, v: [B, nW, nh, N, hd], N = w*w tokens per window, head-major;
- bias: [nh, N, N] relative-position bias, shared by all windows and the batch;
- key_mask: [B, nW, N] bool, True where the key token is real (padding is never a key);
- region: optional [nW, N] integer labels; query p may attend key q of the same window
  only if their labels are equal (the shifted-window mask as labels instead of an
  [nW, N, N] mask).

The Pallas kernel ('pallas') runs a grid over (batch, blocks of `block_windows` windows);
one program loops over its windows and handles all heads of each, so the two small
matmuls, the bias add, the masking and the softmax of a window stay in registers and the
[B, nW, nh, N, N] weights never reach memory. It is written for the Triton lowering on
GPUs: N and hd are zero-padded to powers of two (at least 16) in the wrapper, every tensor
the kernel loads is 1-D or 2-D with power-of-two sides, and all matmuls are 2-D. The
backward is a second kernel of the same shape that recomputes the softmax from q, k, the
bias and the masks (nothing but the inputs is saved) and writes dq, dk, dv and, per
program, the bias gradient summed over its windows; the wrapper sums those partial bias
gradients over the batch and the window blocks ([B, nW / block_windows, nh, N, N] floats,
block_windows times fewer than the reference's weights).

A program keeps a whole window's [N, N] scores of one head in registers, which suits CQAR's
windows (w <= 8, N <= 64); much larger windows would want the keys tiled as in flash
attention.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from infdiff import kernels

# Logit assigned to forbidden pairs. A finite value (not -inf) keeps fully masked rows
# (queries that are themselves padding) finite: their softmax is uniform and unused,
# instead of NaN that could leak through 0 * NaN into later layers.
MASK_LOGIT = -1e30

_MIN_TILE = 16  # smallest side of a Triton matmul operand


def masked_attention_weights(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """Softmax over the last axis with forbidden entries set to exactly 0.

  Args:
    logits: [..., Nq, Nk] pre-softmax scores (any float dtype; softmax runs in float32).
    allowed: bool, broadcastable to logits.

  Returns:
    float32 weights of logits' shape; rows sum to 1 over allowed keys.
  """
  logits = jnp.where(allowed, logits.astype(jnp.float32), MASK_LOGIT)
  return jax.nn.softmax(logits, axis=-1)


def allowed_pairs(key_mask: jax.Array, region: jax.Array | None = None) -> jax.Array:
  """The dense "may attend" mask of `key_mask` and optional `region` labels.

  Args:
    key_mask: [B, nW, N] bool, True for real key tokens.
    region: optional [nW, N] integer region labels.

  Returns:
    bool [B, nW, 1, 1, N] (no region) or [B, nW, 1, N, N], broadcastable to the logits
    [B, nW, nh, N, N].
  """
  allowed = key_mask[:, :, None, None, :]
  if region is not None:
    allowed = allowed & (region[:, :, None] == region[:, None, :])[None, :, None]
  return allowed


def window_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, allowed: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Window attention in XLA: batched einsums around `masked_attention_weights`.

  Args:
    q: [B, nW, nh, N, hd] queries, scale folded in.
    k: [B, nW, nh, N, hd] keys.
    v: [B, nW, nh, N, hd] values.
    bias: [nh, N, N] relative-position bias.
    allowed: bool broadcastable to [B, nW, nh, N, N], True where query may attend key.

  Returns:
    out [B, nW, nh, N, hd] in q's dtype, and the float32 weights [B, nW, nh, N, N].
  """
  logits = jnp.einsum("bwhqe,bwhke->bwhqk", q, k)  # [B, nW, nh, N, N]
  logits = logits + bias.astype(logits.dtype)
  weights = masked_attention_weights(logits, allowed)  # [B, nW, nh, N, N]
  out = jnp.einsum("bwhqk,bwhke->bwhqe", weights.astype(q.dtype), v)  # [B, nW, nh, N, hd]
  return out, weights


def window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    key_mask: jax.Array,
    region: jax.Array | None = None,
    *,
    impl: str = "xla",
    block_windows: int = 8,
) -> jax.Array:
  """Masked window attention by the implementation `impl` ('xla' | 'pallas').

  Args:
    q: [B, nW, nh, N, hd] queries, scale folded in.
    k: [B, nW, nh, N, hd] keys.
    v: [B, nW, nh, N, hd] values.
    bias: [nh, N, N] relative-position bias (learned; receives a gradient).
    key_mask: [B, nW, N] bool, True for real key tokens.
    region: optional [nW, N] integer labels; a pair may attend only within a label.
    impl: 'xla' (`window_attention_reference`) or 'pallas' (`window_attention_pallas`).
    block_windows: windows per Pallas program (ignored by 'xla').

  Returns:
    [B, nW, nh, N, hd] in q's dtype.
  """
  if kernels.check_impl("attention_impl", impl) == "xla":
    return window_attention_reference(q, k, v, bias, allowed_pairs(key_mask, region))[0]
  return window_attention_pallas(q, k, v, bias, key_mask, region, block_windows=block_windows)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one kernel launch (hashable: a nondiff argument of custom_vjp)."""

  n: int  # real tokens per window (the padded side is the arrays' own)
  block_windows: int  # windows per program
  interpret: bool  # Pallas interpret mode


def _next_pow2(x: int) -> int:
  return max(_MIN_TILE, 1 << (x - 1).bit_length())


def window_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    key_mask: jax.Array,
    region: jax.Array | None = None,
    *,
    block_windows: int = 8,
    interpret: bool | None = None,
) -> jax.Array:
  """Window attention as a fused Pallas kernel (forward and backward); see the module doc.

  Args:
    q, k, v, bias, key_mask, region: as `window_attention`.
    block_windows: windows per program (the grid is B x ceil(nW / block_windows)).
    interpret: Pallas interpret mode; None follows `kernels.interpret_mode()`. Does not
      check that the backend can run the kernel (`window_attention` does).

  Returns:
    [B, nW, nh, N, hd] in q's dtype; differentiable w.r.t. q, k, v and bias.
  """
  b, nw, nh, n, hd = q.shape
  if bias.shape != (nh, n, n):
    raise ValueError(f"bias must be [{nh}, {n}, {n}], got {list(bias.shape)}")
  if key_mask.shape != (b, nw, n):
    raise ValueError(f"key_mask must be [{b}, {nw}, {n}], got {list(key_mask.shape)}")
  if region is not None and region.shape != (nw, n):
    raise ValueError(f"region must be [{nw}, {n}], got {list(region.shape)}")
  wb = max(1, min(block_windows, nw))
  nwp, np_, hdp = -(-nw // wb) * wb, _next_pow2(n), _next_pow2(hd)
  interpret = kernels.interpret_mode() if interpret is None else bool(interpret)
  cfg = _Config(n=n, block_windows=wb, interpret=interpret)

  # Zero padding: extra windows (all keys masked), tokens (never keys, sliced off as
  # queries) and head channels (add nothing to the dot products).
  pad_qkv = lambda x: jnp.pad(x, ((0, 0), (0, nwp - nw), (0, 0), (0, np_ - n), (0, hdp - hd)))
  qp, kp, vp = pad_qkv(q), pad_qkv(k), pad_qkv(v)  # [B, nWp, nh, Np, hdp]
  biasp = jnp.pad(bias, ((0, 0), (0, np_ - n), (0, np_ - n)))  # [nh, Np, Np]
  km = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, nwp - nw), (0, np_ - n)))
  lab = None
  if region is not None:
    lab = jnp.pad(region.astype(jnp.int32), ((0, nwp - nw), (0, np_ - n)))  # [nWp, Np]
  out = _attention(qp, kp, vp, biasp, km, lab, cfg)  # [B, nWp, nh, Np, hdp]
  return out[:, :nw, :, :n, :hd]


# ---------------------------------------------------------------------------------------
# Kernels. Refs are blocks of one program: q/k/v/out [WB, nh, Np, hdp], bias [nh, Np, Np],
# key mask [WB, Np] int32, region labels [WB, Np] int32 (optional), d_bias [nh, Np, Np].


def _allowed(km_ref, lab_ref, i):
  """[Np, Np] bool mask of window i of the block."""
  keys = km_ref[i] != 0  # [Np]
  allowed = jnp.broadcast_to(keys[None, :], (keys.shape[0], keys.shape[0]))
  if lab_ref is not None:
    lab = lab_ref[i]  # [Np]
    allowed = allowed & (lab[:, None] == lab[None, :])
  return allowed


def _probs(q, k, bias, allowed, n):
  """Float32 softmax weights [Np, Np] of one window and head, as the reference computes.

  Padded keys (index >= n) get -inf, below MASK_LOGIT, so that a fully masked query row
  is uniform over the n real keys exactly as in the reference.
  """
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = jnp.where(allowed, s + bias.astype(jnp.float32), MASK_LOGIT)  # [Np, Np]
  np_ = s.shape[1]
  if n < np_:
    real = jnp.arange(np_, dtype=jnp.int32) < n  # [Np]
    s = jnp.where(real[None, :], s, -jnp.inf)
  e = jnp.exp(s - jnp.max(s, axis=1)[:, None])
  return e / jnp.sum(e, axis=1)[:, None]


def _fwd_kernel(*refs, cfg: _Config, num_heads: int, has_region: bool):
  if has_region:
    q_ref, k_ref, v_ref, bias_ref, km_ref, lab_ref, o_ref = refs
  else:
    (q_ref, k_ref, v_ref, bias_ref, km_ref, o_ref), lab_ref = refs, None

  def window(i, carry):
    allowed = _allowed(km_ref, lab_ref, i)
    for h in range(num_heads):
      v = v_ref[i, h]  # [Np, hdp]
      p = _probs(q_ref[i, h], k_ref[i, h], bias_ref[h], allowed, cfg.n)
      o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [Np, hdp]
      o_ref[i, h] = o.astype(o_ref.dtype)
    return carry

  lax.fori_loop(0, cfg.block_windows, window, 0)


def _bwd_kernel(*refs, cfg: _Config, num_heads: int, has_region: bool):
  if has_region:
    q_ref, k_ref, v_ref, bias_ref, km_ref, lab_ref, do_ref = refs[:7]
  else:
    (q_ref, k_ref, v_ref, bias_ref, km_ref, do_ref), lab_ref = refs[:6], None
  dq_ref, dk_ref, dv_ref, db_ref = refs[-4:]
  t = lambda a, b: lax.dot_general(  # a^T b
      a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )

  # Heads outside, windows inside: the bias gradient of one head is a loop carry (in
  # registers) and is stored once, instead of a read-modify-write per window.
  for h in range(num_heads):

    def window(i, db, h=h):
      allowed = _allowed(km_ref, lab_ref, i)
      q, k, v, do = q_ref[i, h], k_ref[i, h], v_ref[i, h], do_ref[i, h]  # [Np, hdp]
      p = _probs(q, k, bias_ref[h], allowed, cfg.n)  # [Np, Np]
      dv = t(p.astype(do.dtype), do)  # [Np, hdp]
      dp = lax.dot_general(  # do v^T: [Np, Np]
          do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
      )
      ds = p * (dp - jnp.sum(p * dp, axis=1)[:, None])
      ds = jnp.where(allowed, ds, 0.0)  # d logits; forbidden entries get none
      dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
      dk = t(ds.astype(q.dtype), q)
      dq_ref[i, h] = dq.astype(dq_ref.dtype)
      dk_ref[i, h] = dk.astype(dk_ref.dtype)
      dv_ref[i, h] = dv.astype(dv_ref.dtype)
      return db + ds

    db0 = jnp.zeros(db_ref.shape[1:], jnp.float32)  # [Np, Np]
    db_ref[h] = lax.fori_loop(0, cfg.block_windows, window, db0).astype(db_ref.dtype)


def _specs(x_shape, wb, has_region):
  """BlockSpecs of (q, k, v, bias, key mask[, labels]) and of a q-shaped array."""
  _, _, nh, np_, hdp = x_shape
  qkv = pl.BlockSpec((None, wb, nh, np_, hdp), lambda b, j: (b, j, 0, 0, 0))
  specs = [
      qkv,
      qkv,
      qkv,
      pl.BlockSpec((nh, np_, np_), lambda b, j: (0, 0, 0)),
      pl.BlockSpec((None, wb, np_), lambda b, j: (b, j, 0)),
  ]
  if has_region:
    specs.append(pl.BlockSpec((wb, np_), lambda b, j: (j, 0)))
  return specs, qkv


def _compiler_params(np_):
  return pl_triton.CompilerParams(num_warps=4 if np_ <= 64 else 8, num_stages=1)


def _forward(q, k, v, bias, km, lab, cfg: _Config):
  b, nwp, nh, np_, _ = q.shape
  has_region = lab is not None
  in_specs, qkv = _specs(q.shape, cfg.block_windows, has_region)
  kernel = functools.partial(_fwd_kernel, cfg=cfg, num_heads=nh, has_region=has_region)
  args = (q, k, v, bias, km) + ((lab,) if has_region else ())
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(b, nwp // cfg.block_windows),
      in_specs=in_specs,
      out_specs=qkv,
      compiler_params=_compiler_params(np_),
      interpret=cfg.interpret,
      name="window_attention_fwd",
  )(*args)


def _backward(q, k, v, bias, km, lab, do, cfg: _Config):
  b, nwp, nh, np_, _ = q.shape
  nblocks = nwp // cfg.block_windows
  has_region = lab is not None
  in_specs, qkv = _specs(q.shape, cfg.block_windows, has_region)
  kernel = functools.partial(_bwd_kernel, cfg=cfg, num_heads=nh, has_region=has_region)
  args = (q, k, v, bias, km) + ((lab,) if has_region else ()) + (do,)
  dq, dk, dv, db = pl.pallas_call(
      kernel,
      out_shape=(
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct(k.shape, k.dtype),
          jax.ShapeDtypeStruct(v.shape, v.dtype),
          jax.ShapeDtypeStruct((b, nblocks, nh, np_, np_), jnp.float32),
      ),
      grid=(b, nblocks),
      in_specs=in_specs + [qkv],
      out_specs=(
          qkv,
          qkv,
          qkv,
          pl.BlockSpec((None, None, nh, np_, np_), lambda b, j: (b, j, 0, 0, 0)),
      ),
      compiler_params=_compiler_params(np_),
      interpret=cfg.interpret,
      name="window_attention_bwd",
  )(*args)
  return dq, dk, dv, db.sum(axis=(0, 1)).astype(bias.dtype)  # d_bias [nh, Np, Np]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, bias, km, lab, cfg):
  return _forward(q, k, v, bias, km, lab, cfg)


def _attention_fwd(q, k, v, bias, km, lab, cfg):
  return _forward(q, k, v, bias, km, lab, cfg), (q, k, v, bias, km, lab)


def _attention_bwd(cfg, res, do):
  q, k, v, bias, km, lab = res
  dq, dk, dv, dbias = _backward(q, k, v, bias, km, lab, do, cfg)
  return dq, dk, dv, dbias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
