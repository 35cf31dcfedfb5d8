"""Qwen3 as a frozen text encoder: a Linen port of transformers' Qwen3Model.

Returns the last hidden states after the final RMSNorm ([B, L, D], HF `last_hidden_state`).
Padding is on the right (see `infdiff.pretrained.tokenize`): with a causal mask, a valid
token never sees a pad token, and positions count from 0 at the first token, so the hidden
states of valid positions are the same with or without padding. Pad positions hold
unspecified values; consumers must mask them.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.pretrained import common


class RMSNorm(nn.Module):
  """Qwen3 RMSNorm: statistics in float32, weight applied after casting back."""

  eps: float = 1e-6  # added to the mean square
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = common.param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones_init())
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return w.astype(self.dtype) * xf.astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF 'rotate_half' layout. x [B, L, H, Dh], positions [B, L]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Qwen3Layer(nn.Module):
  """Decoder block: RMSNorm -> GQA with q/k RMSNorm and RoPE -> RMSNorm -> SwiGLU."""

  hidden_size: int = 2048  # model width D
  intermediate_size: int = 6144  # SwiGLU hidden width
  num_heads: int = 16  # query heads
  num_kv_heads: int = 8  # key/value heads (GQA groups)
  head_dim: int = 128  # per-head width
  rms_norm_eps: float = 1e-6  # RMSNorm epsilon
  rope_theta: float = 1_000_000.0  # RoPE base
  attention_bias: bool = False  # bias on q/k/v/o
  hidden_act: str = "silu"  # gate activation
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, _ = x.shape
    nh, nkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
    y = RMSNorm(self.rms_norm_eps, name="input_layernorm", **kw)(x)
    ab = self.attention_bias
    q = common.dense(nh * dh, ("embed", "heads"), use_bias=ab, name="q_proj", **kw)(y)
    k = common.dense(nkv * dh, ("embed", "heads"), use_bias=ab, name="k_proj", **kw)(y)
    v = common.dense(nkv * dh, ("embed", "heads"), use_bias=ab, name="v_proj", **kw)(y)
    q = RMSNorm(self.rms_norm_eps, name="q_norm", **kw)(q.reshape(b, n, nh, dh))
    k = RMSNorm(self.rms_norm_eps, name="k_norm", **kw)(k.reshape(b, n, nkv, dh))
    v = v.reshape(b, n, nkv, dh)
    q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    # GQA: query head h reads kv head h // (nh / nkv), as HF repeat_kv.
    k = jnp.repeat(k, nh // nkv, axis=2)
    v = jnp.repeat(v, nh // nkv, axis=2)
    y = common.dot_attention(q, k, v, bias).reshape(b, n, nh * dh)
    x = x + common.dense(self.hidden_size, ("heads", "embed"), use_bias=ab, name="o_proj", **kw)(y)

    y = RMSNorm(self.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    ff = self.intermediate_size
    g = common.dense(ff, ("embed", "mlp"), use_bias=False, name="gate_proj", **kw)(y)
    u = common.dense(ff, ("embed", "mlp"), use_bias=False, name="up_proj", **kw)(y)
    y = common.activation(self.hidden_act)(g) * u
    return x + common.dense(
        self.hidden_size, ("mlp", "embed"), use_bias=False, name="down_proj", **kw
    )(y)


class Qwen3(nn.Module):
  """Qwen3 decoder used as a text encoder: (input_ids, attention_mask) -> [B, L, D]."""

  vocab_size: int = 151936  # token table rows
  hidden_size: int = 2048  # model width D (Qwen3-1.7B: 2048)
  intermediate_size: int = 6144  # SwiGLU hidden width
  num_layers: int = 28  # decoder blocks
  num_heads: int = 16  # query heads
  num_kv_heads: int = 8  # key/value heads
  head_dim: int = 128  # per-head width
  rms_norm_eps: float = 1e-6  # RMSNorm epsilon
  rope_theta: float = 1_000_000.0  # RoPE base (from config)
  attention_bias: bool = False  # bias on attention projections
  hidden_act: str = "silu"  # gate activation
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n = input_ids.shape
    table = common.param(
        self, "embed_tokens", (self.vocab_size, self.hidden_size), ("vocab", "embed")
    )
    x = jnp.take(table, input_ids, axis=0).astype(self.dtype)  # [B, L, D]
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    if attention_mask is None:
      attention_mask = jnp.ones((b, n), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    causal = jnp.tril(jnp.ones((n, n), bool))
    allowed = causal[None] & (attention_mask[:, None, :] > 0)  # [B, L, S]
    # A large finite negative instead of -inf keeps fully-masked pad rows NaN-free.
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B, 1, L, S]
    for i in range(self.num_layers):
      x = Qwen3Layer(
          hidden_size=self.hidden_size,
          intermediate_size=self.intermediate_size,
          num_heads=self.num_heads,
          num_kv_heads=self.num_kv_heads,
          head_dim=self.head_dim,
          rms_norm_eps=self.rms_norm_eps,
          rope_theta=self.rope_theta,
          attention_bias=self.attention_bias,
          hidden_act=self.hidden_act,
          name=f"layer_{i}",
          **kw,
      )(x, positions, bias)
    return RMSNorm(self.rms_norm_eps, name="norm", **kw)(x)


# --------------------------------------------------------------------------- loading


def model_from_config(cfg: dict[str, Any], **overrides) -> Qwen3:
  rope_params = cfg.get("rope_parameters") or {}
  theta = cfg.get("rope_theta", rope_params.get("rope_theta", 1_000_000.0))
  scaling = cfg.get("rope_scaling") or rope_params
  if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
    raise common.CheckpointFormatError(f"qwen3: rope scaling {scaling} is not supported")
  heads = cfg["num_attention_heads"]
  fields = dict(
      vocab_size=cfg["vocab_size"],
      hidden_size=cfg["hidden_size"],
      intermediate_size=cfg["intermediate_size"],
      num_layers=cfg["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads", heads),
      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
      rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      attention_bias=cfg.get("attention_bias", False),
      hidden_act=cfg.get("hidden_act", "silu"),
  )
  fields.update(overrides)
  return Qwen3(**fields)


def convert(state: dict[str, np.ndarray], model: Qwen3) -> dict[str, Any]:
  """HF Qwen3Model / Qwen3ForCausalLM state dict -> params (lm_head is dropped)."""
  s = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head")}
  ab = model.attention_bias
  params: dict[str, Any] = {
      "embed_tokens": common.take(s, "embed_tokens.weight", "qwen3"),
      "norm": {"scale": common.take(s, "norm.weight", "qwen3")},
  }
  for i in range(model.num_layers):
    pre = f"layers.{i}"
    layer: dict[str, Any] = {}
    for n in ("input_layernorm", "post_attention_layernorm"):
      layer[n] = {"scale": common.take(s, f"{pre}.{n}.weight", "qwen3")}
    for n in ("q_norm", "k_norm"):
      layer[n] = {"scale": common.take(s, f"{pre}.self_attn.{n}.weight", "qwen3")}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      layer[n] = common.linear(s, f"{pre}.self_attn.{n}", "qwen3", bias=ab)
    for n in ("gate_proj", "up_proj", "down_proj"):
      layer[n] = common.linear(s, f"{pre}.mlp.{n}", "qwen3", bias=False)
    params[f"layer_{i}"] = layer
  return {"params": params}


def load(path: str, **overrides) -> tuple[Qwen3, dict[str, Any]]:
  """Loads an HF Qwen3 directory (config.json + model.safetensors[.index.json + shards]).

  Args:
    path: checkpoint directory, e.g. a local copy of Qwen/Qwen3-1.7B.
    **overrides: Qwen3 fields to override (dtype, ...).

  Returns:
    (model, params) for `model.apply(params, input_ids, attention_mask)`.
  """
  has_index = os.path.isfile(os.path.join(os.fspath(path), "model.safetensors.index.json"))
  weights = "model.safetensors.index.json" if has_index else "model.safetensors"
  path = common.require_files("qwen3", path, ["config.json", weights])
  model = model_from_config(common.read_json(f"{path}/config.json"), **overrides)
  params = convert(common.read_sharded_safetensors("qwen3", path), model)
  return model, common.check_params("qwen3", model, params, jnp.zeros((1, 2), jnp.int32))


def abstract(path: str, **overrides) -> tuple[Qwen3, dict[str, Any]]:
  """`load` from config.json alone: params as jax.ShapeDtypeStruct (`pretrained.abstract`)."""
  path = common.require_files("qwen3", path, ["config.json"])
  model = model_from_config(common.read_json(f"{path}/config.json"), **overrides)
  return model, common.init_shapes(model, jnp.zeros((1, 2), jnp.int32))
