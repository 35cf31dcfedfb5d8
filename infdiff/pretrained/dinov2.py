"""DINOv2 ViT (S/B/L/G) as a Linen port of transformers' Dinov2Model.

Input policy: images are float32 [B, H, W, 3] in [0, 1]. The port resizes them (torch
`interpolate(mode='bicubic', antialias=True)`, close to the PIL bicubic of the HF image
processor) to `image_size` when that is set, else to the nearest multiple of the patch
size per side (no resize when H and W already are multiples), then normalises with the
ImageNet mean/std. Position embeddings are resized to the patch grid as transformers 5
does: torch bicubic (A = -0.75, align_corners=False, no antialias) to size (H / p, W / p),
in float32. The original DINOv2 code and transformers 4 instead pass
`scale_factor = (g + 0.1) / n` (the "+0.1 offset"), which samples at slightly different
positions; set `pos_interp_offset=0.1` for that behaviour.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.pretrained import common

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Layer(nn.Module):
  """Pre-norm ViT block with LayerScale; MLP or SwiGLU FFN (ViT-G)."""

  hidden_size: int = 768  # model width D
  num_heads: int = 12  # attention heads
  mlp_ratio: float = 4.0  # FFN hidden = D * mlp_ratio (SwiGLU: 2/3 of it, rounded to 8)
  use_swiglu_ffn: bool = False  # ViT-G uses a SwiGLU FFN
  qkv_bias: bool = True  # bias on q/k/v projections
  layer_norm_eps: float = 1e-6  # LayerNorm epsilon
  hidden_act: str = "gelu"  # MLP activation (exact erf GELU)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, nh = self.hidden_size, self.num_heads
    b, n, _ = x.shape
    y = common.layer_norm(self.layer_norm_eps, name="norm1", **kw)(x)
    q = common.dense(d, ("embed", "heads"), use_bias=self.qkv_bias, name="q_proj", **kw)(y)
    k = common.dense(d, ("embed", "heads"), use_bias=self.qkv_bias, name="k_proj", **kw)(y)
    v = common.dense(d, ("embed", "heads"), use_bias=self.qkv_bias, name="v_proj", **kw)(y)
    q, k, v = (t.reshape(b, n, nh, d // nh) for t in (q, k, v))  # [B, N, heads, Dh]
    y = common.dot_attention(q, k, v).reshape(b, n, d)
    y = common.dense(d, ("heads", "embed"), name="o_proj", **kw)(y)
    ls1 = common.param(self, "layer_scale1", (d,), ("embed",), nn.initializers.ones_init())
    x = x + y * ls1.astype(y.dtype)

    y = common.layer_norm(self.layer_norm_eps, name="norm2", **kw)(x)
    hidden = int(d * self.mlp_ratio)
    if self.use_swiglu_ffn:
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
      g = common.dense(hidden, ("embed", "mlp"), name="gate_proj", **kw)(y)
      u = common.dense(hidden, ("embed", "mlp"), name="up_proj", **kw)(y)
      y = common.dense(d, ("mlp", "embed"), name="down_proj", **kw)(jax.nn.silu(g) * u)
    else:
      y = common.dense(hidden, ("embed", "mlp"), name="fc1", **kw)(y)
      y = common.activation(self.hidden_act)(y)
      y = common.dense(d, ("mlp", "embed"), name="fc2", **kw)(y)
    ls2 = common.param(self, "layer_scale2", (d,), ("embed",), nn.initializers.ones_init())
    return x + y * ls2.astype(y.dtype)


class Dinov2(nn.Module):
  """DINOv2 backbone. Returns {'cls_token': [B, D], 'patch_tokens': [B, h, w, D]}.

  Both outputs are after the final LayerNorm (HF `last_hidden_state`).
  """

  hidden_size: int = 768  # model width D (S 384, B 768, L 1024, G 1536)
  num_layers: int = 12  # transformer blocks
  num_heads: int = 12  # attention heads
  patch_size: int = 14  # square patch side in pixels
  pretrain_image_size: int = 518  # image side the position table was trained for
  mlp_ratio: float = 4.0  # FFN width ratio
  use_swiglu_ffn: bool = False  # SwiGLU FFN (ViT-G)
  qkv_bias: bool = True  # bias on q/k/v
  layer_norm_eps: float = 1e-6  # LayerNorm epsilon
  hidden_act: str = "gelu"  # MLP activation
  image_size: tuple[int, int] | None = None  # resize inputs to (H, W); None: nearest multiple of p
  resize_antialias: bool = True  # antialias the input resize (matters when downsampling)
  pos_interp_offset: float = 0.0  # 0: transformers 5 (size-based); 0.1: original DINOv2 code
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  def target_size(self, h: int, w: int) -> tuple[int, int]:
    """Pixel size the network sees for an h x w input."""
    if self.image_size is not None:
      return tuple(self.image_size)
    p = self.patch_size
    nearest = lambda n: max(1, int(n / p + 0.5)) * p  # halves round up
    return nearest(h), nearest(w)

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, p = self.hidden_size, self.patch_size
    b, h_in, w_in, _ = images.shape
    h, w = self.target_size(h_in, w_in)
    x = common.resize(images.astype(jnp.float32), (h, w), "bicubic", self.resize_antialias)
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    gh, gw = h // p, w // p
    x = common.conv2d(d, p, strides=p, name="patch_embed", **kw)(x.astype(self.dtype))
    x = x.reshape(b, gh * gw, d)  # [B, N, D], row-major patches as torch flatten(2)

    n_pos = (self.pretrain_image_size // p) ** 2
    pos = common.param(self, "position_embeddings", (n_pos + 1, d), (None, "embed"))
    cls = common.param(self, "cls_token", (d,), ("embed",))
    pos_patch = interpolate_pos_embed(pos[1:], gh, gw, self.pos_interp_offset)  # [N, D]
    x = x + pos_patch.astype(x.dtype)[None]
    c = jnp.broadcast_to((cls + pos[0]).astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([c, x], axis=1)  # [B, 1 + N, D]
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    for i in range(self.num_layers):
      x = Dinov2Layer(
          hidden_size=d,
          num_heads=self.num_heads,
          mlp_ratio=self.mlp_ratio,
          use_swiglu_ffn=self.use_swiglu_ffn,
          qkv_bias=self.qkv_bias,
          layer_norm_eps=self.layer_norm_eps,
          hidden_act=self.hidden_act,
          name=f"layer_{i}",
          **kw,
      )(x)
    x = common.layer_norm(self.layer_norm_eps, name="layernorm", **kw)(x)
    return {"cls_token": x[:, 0], "patch_tokens": x[:, 1:].reshape(b, gh, gw, d)}


def interpolate_pos_embed(pos: jax.Array, gh: int, gw: int, offset: float = 0.0) -> jax.Array:
  """Resizes a square [n*n, D] position table to [gh*gw, D] like HF Dinov2.

  HF returns the table untouched when the grid already matches, else torch bicubic
  (align_corners=False, A = -0.75, no antialias) in float32: to size (gh, gw) when
  offset == 0 (transformers 5), else with scale_factor ((gh + offset) / n, (gw + offset) / n)
  (original DINOv2 code and transformers 4, offset 0.1).
  """
  n = int(round(pos.shape[0] ** 0.5))
  if (gh, gw) == (n, n):
    return pos
  grid = pos.astype(jnp.float32).reshape(1, n, n, -1)
  factor = None if offset == 0 else ((gh + offset) / n, (gw + offset) / n)
  out = common.resize(grid, (gh, gw), "bicubic", antialias=False, scale_factor=factor)
  return out.reshape(gh * gw, -1).astype(pos.dtype)


# --------------------------------------------------------------------------- loading

FILES = ("config.json", "model.safetensors")


def model_from_config(cfg: dict[str, Any], **overrides) -> Dinov2:
  image_size = cfg.get("image_size", 518)
  image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
  patch = cfg.get("patch_size", 14)
  patch = patch[0] if isinstance(patch, (list, tuple)) else patch
  fields = dict(
      hidden_size=cfg["hidden_size"],
      num_layers=cfg["num_hidden_layers"],
      num_heads=cfg["num_attention_heads"],
      patch_size=patch,
      pretrain_image_size=image_size,
      mlp_ratio=cfg.get("mlp_ratio", 4.0),
      use_swiglu_ffn=cfg.get("use_swiglu_ffn", False),
      qkv_bias=cfg.get("qkv_bias", True),
      layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
      hidden_act=cfg.get("hidden_act", "gelu"),
  )
  fields.update(overrides)
  return Dinov2(**fields)


# Hub checkpoints (and older transformers) use the original names; newer transformers
# versions may write the renamed ones. Both are accepted.
_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("mlp.weights_out", "mlp.down_proj"),
)


def _canonical(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state.items():
    k = k.removeprefix("dinov2.")
    for old, new in _RENAMES:
      k = k.replace(old, new)
    if "mlp.weights_in." in k:  # fused SwiGLU input: [gate; up] along the output dim
      g, u = np.split(v, 2, axis=0)
      out[k.replace("weights_in", "gate_proj")] = g
      out[k.replace("weights_in", "up_proj")] = u
      continue
    out[k] = v
  return out


def convert(state: dict[str, np.ndarray], model: Dinov2) -> dict[str, Any]:
  """HF Dinov2Model state dict -> params of `model`."""
  s = _canonical(state)
  t = lambda key: common.take(s, key, "dinov2")
  params: dict[str, Any] = {
      "patch_embed": common.conv(s, "embeddings.patch_embeddings.projection", "dinov2"),
      "position_embeddings": t("embeddings.position_embeddings")[0],
      "cls_token": t("embeddings.cls_token").reshape(-1),
      "layernorm": common.norm(s, "layernorm", "dinov2"),
  }
  for i in range(model.num_layers):
    pre = f"encoder.layer.{i}"
    layer = {
        "norm1": common.norm(s, f"{pre}.norm1", "dinov2"),
        "norm2": common.norm(s, f"{pre}.norm2", "dinov2"),
        "layer_scale1": t(f"{pre}.layer_scale1.lambda1"),
        "layer_scale2": t(f"{pre}.layer_scale2.lambda1"),
        "o_proj": common.linear(s, f"{pre}.attention.o_proj", "dinov2"),
    }
    for n in ("q_proj", "k_proj", "v_proj"):
      layer[n] = common.linear(s, f"{pre}.attention.{n}", "dinov2", bias=model.qkv_bias)
    names = ("gate_proj", "up_proj", "down_proj") if model.use_swiglu_ffn else ("fc1", "fc2")
    for n in names:
      layer[n] = common.linear(s, f"{pre}.mlp.{n}", "dinov2")
    params[f"layer_{i}"] = layer
  return {"params": params}


def load(path: str, **overrides) -> tuple[Dinov2, dict[str, Any]]:
  """Loads an HF DINOv2 directory (config.json + model.safetensors).

  Args:
    path: checkpoint directory, e.g. a local copy of facebook/dinov2-base.
    **overrides: Dinov2 fields to override (image_size, dtype, ...).

  Returns:
    (model, params) for `model.apply(params, images)`.
  """
  path = common.require_files("dinov2", path, FILES)
  cfg = common.read_json(f"{path}/config.json")
  model = model_from_config(cfg, **overrides)
  state = common.read_sharded_safetensors("dinov2", path)
  params = convert(state, model)
  p = model.patch_size
  return model, common.check_params("dinov2", model, params, jnp.zeros((1, p, p, 3)))


def abstract(path: str, **overrides) -> tuple[Dinov2, dict[str, Any]]:
  """`load` from config.json alone: params as jax.ShapeDtypeStruct (`pretrained.abstract`)."""
  path = common.require_files("dinov2", path, ["config.json"])
  model = model_from_config(common.read_json(f"{path}/config.json"), **overrides)
  p = model.patch_size
  return model, common.init_shapes(model, jnp.zeros((1, p, p, 3)))
