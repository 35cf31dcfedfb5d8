"""CLIP (vision + text towers) as a Linen port of transformers' CLIPModel.

`apply(params, images=None, input_ids=None, attention_mask=None)` returns a dict with
`image_embeds` [B, P] and/or `text_embeds` [B, P]: the projected features of
`CLIPModel.get_image_features` / `get_text_features`, NOT L2-normalised (normalise
yourself for cosine similarities).

Image policy: float32 [B, H, W, 3] in [0, 1]; the largest centred square is cropped, then
resized to the model's `image_size` (224 for openai/clip-vit-*) with torch bicubic +
antialias (close to the HF processor's PIL bicubic shortest-side resize + centre crop),
then normalised with CLIP's mean/std.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.pretrained import common

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLayer(nn.Module):
  """Pre-norm transformer block with biased q/k/v/out projections."""

  hidden_size: int = 768  # width D
  intermediate_size: int = 3072  # MLP hidden
  num_heads: int = 12  # attention heads
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  hidden_act: str = "quick_gelu"  # MLP activation
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, d = x.shape
    nh = self.num_heads
    y = common.layer_norm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
    q = common.dense(d, ("embed", "heads"), name="q_proj", **kw)(y).reshape(b, n, nh, d // nh)
    k = common.dense(d, ("embed", "heads"), name="k_proj", **kw)(y).reshape(b, n, nh, d // nh)
    v = common.dense(d, ("embed", "heads"), name="v_proj", **kw)(y).reshape(b, n, nh, d // nh)
    y = common.dot_attention(q, k, v, bias).reshape(b, n, d)
    x = x + common.dense(d, ("heads", "embed"), name="out_proj", **kw)(y)
    y = common.layer_norm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
    y = common.dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(y)
    y = common.dense(d, ("mlp", "embed"), name="fc2", **kw)(common.activation(self.hidden_act)(y))
    return x + y


class ClipVision(nn.Module):
  """Vision tower: patch conv, class token, pre-LN, blocks, post-LN on the class token."""

  hidden_size: int = 768  # width
  intermediate_size: int = 3072  # MLP hidden
  num_layers: int = 12  # blocks
  num_heads: int = 12  # heads
  patch_size: int = 32  # patch side
  image_size: int = 224  # input side the position table was trained for
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  hidden_act: str = "quick_gelu"  # MLP activation
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels: normalised [B, S, S, 3] with S = image_size. Returns pooled [B, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, p = self.hidden_size, self.patch_size
    b = pixels.shape[0]
    x = common.conv2d(d, p, strides=p, use_bias=False, name="patch_embedding", **kw)(pixels)
    x = x.reshape(b, -1, d)  # [B, N, D]
    n_pos = (self.image_size // p) ** 2 + 1
    cls = common.param(self, "class_embedding", (d,), ("embed",))
    pos = common.param(self, "position_embedding", (n_pos, d), (None, "embed"))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + pos.astype(x.dtype)[None]
    x = common.layer_norm(self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    for i in range(self.num_layers):
      x = ClipLayer(
        d, self.intermediate_size, self.num_heads, self.layer_norm_eps, self.hidden_act,
        name=f"layer_{i}", **kw,
      )(x)  # fmt: skip
    return common.layer_norm(self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class ClipText(nn.Module):
  """Text tower: causal transformer, final LN, pooled at the end-of-text token."""

  vocab_size: int = 49408  # token table rows
  hidden_size: int = 512  # width
  intermediate_size: int = 2048  # MLP hidden
  num_layers: int = 12  # blocks
  num_heads: int = 8  # heads
  max_position_embeddings: int = 77  # context length
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  hidden_act: str = "quick_gelu"  # MLP activation
  eos_token_id: int = 2  # 2 = legacy configs: pool at argmax(input_ids) as HF does
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n = input_ids.shape
    d = self.hidden_size
    tok = common.param(self, "token_embedding", (self.vocab_size, d), ("vocab", "embed"))
    pos = common.param(
        self, "position_embedding", (self.max_position_embeddings, d), (None, "embed")
    )
    x = (jnp.take(tok, input_ids, axis=0) + pos[:n][None]).astype(self.dtype)  # [B, L, D]
    allowed = jnp.tril(jnp.ones((n, n), bool))[None]
    if attention_mask is not None:
      allowed = allowed & (attention_mask[:, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B|1, 1, L, S]
    for i in range(self.num_layers):
      x = ClipLayer(
        d, self.intermediate_size, self.num_heads, self.layer_norm_eps, self.hidden_act,
        name=f"layer_{i}", **kw,
      )(x, bias)  # fmt: skip
    x = common.layer_norm(self.layer_norm_eps, name="final_layer_norm", **kw)(x)
    if self.eos_token_id == 2:
      idx = jnp.argmax(input_ids, axis=-1)
    else:  # first occurrence of the end-of-text id
      idx = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    return x[jnp.arange(b), idx]


class Clip(nn.Module):
  """CLIPModel features: {'image_embeds': [B, P], 'text_embeds': [B, P]} (unnormalised)."""

  vision: dict[str, Any] | None = None  # ClipVision fields
  text: dict[str, Any] | None = None  # ClipText fields
  projection_dim: int = 512  # joint embedding width P
  resize_antialias: bool = True  # antialias the image resize
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = ClipVision(**(self.vision or {}), **kw)
    self.text_model = ClipText(**(self.text or {}), **kw)
    p = self.projection_dim
    self.visual_projection = common.dense(p, ("embed", None), use_bias=False, **kw)
    self.text_projection = common.dense(p, ("embed", None), use_bias=False, **kw)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [0, 1] -> normalised [B, S, S, 3], S = vision image_size."""
    s = self.vision_model.image_size
    x = common.center_crop_square(images.astype(jnp.float32))
    x = common.resize(x, (s, s), "bicubic", self.resize_antialias)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)

  def __call__(self, images=None, input_ids=None, attention_mask=None) -> dict[str, jax.Array]:
    out = {}
    if images is not None:
      pooled = self.vision_model(self.preprocess(images).astype(self.dtype))
      out["image_embeds"] = self.visual_projection(pooled)
    if input_ids is not None:
      out["text_embeds"] = self.text_projection(self.text_model(input_ids, attention_mask))
    return out


# --------------------------------------------------------------------------- loading

FILES = ("config.json", "model.safetensors")


def model_from_config(cfg: dict[str, Any], **overrides) -> Clip:
  v, t = cfg["vision_config"], cfg["text_config"]
  vision = dict(
      hidden_size=v["hidden_size"],
      intermediate_size=v["intermediate_size"],
      num_layers=v["num_hidden_layers"],
      num_heads=v["num_attention_heads"],
      patch_size=v["patch_size"],
      image_size=v["image_size"],
      layer_norm_eps=v.get("layer_norm_eps", 1e-5),
      hidden_act=v.get("hidden_act", "quick_gelu"),
  )
  text = dict(
      vocab_size=t["vocab_size"],
      hidden_size=t["hidden_size"],
      intermediate_size=t["intermediate_size"],
      num_layers=t["num_hidden_layers"],
      num_heads=t["num_attention_heads"],
      max_position_embeddings=t.get("max_position_embeddings", 77),
      layer_norm_eps=t.get("layer_norm_eps", 1e-5),
      hidden_act=t.get("hidden_act", "quick_gelu"),
      eos_token_id=t.get("eos_token_id", 2),
  )
  fields = dict(vision=vision, text=text, projection_dim=cfg.get("projection_dim", 512))
  fields.update(overrides)
  return Clip(**fields)


def _tower(s, prefix: str, n_layers: int) -> dict[str, Any]:
  out = {}
  for i in range(n_layers):
    pre = f"{prefix}.encoder.layers.{i}"
    layer = {n: common.norm(s, f"{pre}.{n}", "clip") for n in ("layer_norm1", "layer_norm2")}
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      layer[n] = common.linear(s, f"{pre}.self_attn.{n}", "clip")
    for n in ("fc1", "fc2"):
      layer[n] = common.linear(s, f"{pre}.mlp.{n}", "clip")
    out[f"layer_{i}"] = layer
  return out


def convert(state: dict[str, np.ndarray], model: Clip) -> dict[str, Any]:
  """HF CLIPModel state dict -> params of `model`."""
  s = state
  t = lambda key: common.take(s, key, "clip")
  vm = "vision_model"
  vision = _tower(s, vm, model.vision["num_layers"])
  vision.update(
      patch_embedding=common.conv(s, f"{vm}.embeddings.patch_embedding", "clip", bias=False),
      class_embedding=t(f"{vm}.embeddings.class_embedding"),
      position_embedding=t(f"{vm}.embeddings.position_embedding.weight"),
      pre_layrnorm=common.norm(s, f"{vm}.pre_layrnorm", "clip"),
      post_layernorm=common.norm(s, f"{vm}.post_layernorm", "clip"),
  )
  tm = "text_model"
  text = _tower(s, tm, model.text["num_layers"])
  text.update(
      token_embedding=t(f"{tm}.embeddings.token_embedding.weight"),
      position_embedding=t(f"{tm}.embeddings.position_embedding.weight"),
      final_layer_norm=common.norm(s, f"{tm}.final_layer_norm", "clip"),
  )
  params = {
      "vision_model": vision,
      "text_model": text,
      "visual_projection": common.linear(s, "visual_projection", "clip", bias=False),
      "text_projection": common.linear(s, "text_projection", "clip", bias=False),
  }
  return {"params": params}


def _example() -> dict[str, jax.Array]:
  """Inputs for `init` (both towers); the parameter shapes do not depend on their sizes."""
  return dict(images=jnp.zeros((1, 8, 8, 3)), input_ids=jnp.zeros((1, 2), jnp.int32))


def load(path: str, **overrides) -> tuple[Clip, dict[str, Any]]:
  """Loads an HF CLIP directory (config.json + model.safetensors).

  Args:
    path: checkpoint directory, e.g. a local copy of openai/clip-vit-base-patch32.
    **overrides: Clip fields to override (dtype, ...).

  Returns:
    (model, params) for `model.apply(params, images=..., input_ids=..., attention_mask=...)`.
  """
  path = common.require_files("clip", path, FILES)
  model = model_from_config(common.read_json(f"{path}/config.json"), **overrides)
  params = convert(common.read_sharded_safetensors("clip", path), model)
  return model, common.check_params("clip", model, params, **_example())


def abstract(path: str, **overrides) -> tuple[Clip, dict[str, Any]]:
  """`load` from config.json alone: params as jax.ShapeDtypeStruct (`pretrained.abstract`)."""
  path = common.require_files("clip", path, ["config.json"])
  model = model_from_config(common.read_json(f"{path}/config.json"), **overrides)
  return model, common.init_shapes(model, **_example())
