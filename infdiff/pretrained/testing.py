"""Tiny random-weight checkpoints in the real file layouts, written without torch.

For tests elsewhere that need a teacher or a metric network (e.g. a training step with a
DINOv2 teacher):

    path = infdiff.pretrained.testing.write_tiny_dinov2(tmp_path / "dinov2")
    model, params = infdiff.pretrained.load("dinov2", path)

or `write_tiny(kind, path)` for any kind.

Each writer takes the directory (created if needed), a seed and config overrides, and
returns the directory. Key names and shapes are those of the public checkpoints (HF
Hub names for DINOv2/Qwen3/CLIP, diffusers AutoencoderKL names for the SD VAE,
torchvision/lpips/pytorch-fid state dicts converted by scripts/convert_to_safetensors.py),
so the same loader code path runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from infdiff.pretrained import common
from infdiff.pretrained import lpips as lpips_lib

WORDS = (
    "a photo of cat dog red blue green big small the on in with tree house sky car bird"
).split()


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


def _w(rng, *shape, scale=0.1) -> np.ndarray:
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def _ln(rng, d) -> tuple[np.ndarray, np.ndarray]:
  return (1.0 + _w(rng, d)).astype(np.float32), _w(rng, d)


def _write(
    path,
    config: dict[str, Any] | None,
    tensors: dict[str, np.ndarray],
    name: str = "model.safetensors",
    weights_dtype: str = "float32",
):
  """Writes config.json and the tensors, stored as `weights_dtype` ('bfloat16' like LLMs)."""
  os.makedirs(path, exist_ok=True)
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
  dtype = common.ml_dtypes.bfloat16 if weights_dtype == "bfloat16" else np.dtype(weights_dtype)
  stored = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
  common.save_safetensors(stored, os.path.join(path, name))
  return os.fspath(path)


def tiny_dinov2_config(**overrides) -> dict[str, Any]:
  """HF Dinov2Config fields of a tiny model (patch 4, 3x3 pretrain grid)."""
  cfg = dict(
      model_type="dinov2",
      architectures=["Dinov2Model"],
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      mlp_ratio=2,
      patch_size=4,
      image_size=12,
      num_channels=3,
      qkv_bias=True,
      layer_norm_eps=1e-6,
      hidden_act="gelu",
      layerscale_value=1.0,
      use_swiglu_ffn=False,
  )
  cfg.update(overrides)
  return cfg


def write_tiny_dinov2(path, seed: int = 0, **overrides) -> str:
  """Writes config.json + model.safetensors of a tiny random DINOv2 (Hub key names)."""
  cfg = tiny_dinov2_config(**overrides)
  r = _rng(seed)
  d, p = cfg["hidden_size"], cfg["patch_size"]
  n = (cfg["image_size"] // p) ** 2
  t = {
      "embeddings.cls_token": _w(r, 1, 1, d, scale=1.0),
      "embeddings.mask_token": np.zeros((1, d), np.float32),
      "embeddings.position_embeddings": _w(r, 1, n + 1, d, scale=1.0),
      "embeddings.patch_embeddings.projection.weight": _w(r, d, 3, p, p, scale=0.3),
      "embeddings.patch_embeddings.projection.bias": _w(r, d),
  }
  t["layernorm.weight"], t["layernorm.bias"] = _ln(r, d)
  hidden = int(d * cfg["mlp_ratio"])
  for i in range(cfg["num_hidden_layers"]):
    pre = f"encoder.layer.{i}"
    for n_ in ("norm1", "norm2"):
      t[f"{pre}.{n_}.weight"], t[f"{pre}.{n_}.bias"] = _ln(r, d)
    for n_ in ("query", "key", "value"):
      t[f"{pre}.attention.attention.{n_}.weight"] = _w(r, d, d, scale=d**-0.5)
      t[f"{pre}.attention.attention.{n_}.bias"] = _w(r, d)
    t[f"{pre}.attention.output.dense.weight"] = _w(r, d, d, scale=d**-0.5)
    t[f"{pre}.attention.output.dense.bias"] = _w(r, d)
    t[f"{pre}.layer_scale1.lambda1"] = (0.5 + _w(r, d)).astype(np.float32)
    t[f"{pre}.layer_scale2.lambda1"] = (0.5 + _w(r, d)).astype(np.float32)
    if cfg["use_swiglu_ffn"]:
      hidden_sw = (int(hidden * 2 / 3) + 7) // 8 * 8
      t[f"{pre}.mlp.weights_in.weight"] = _w(r, 2 * hidden_sw, d, scale=d**-0.5)
      t[f"{pre}.mlp.weights_in.bias"] = _w(r, 2 * hidden_sw)
      t[f"{pre}.mlp.weights_out.weight"] = _w(r, d, hidden_sw, scale=hidden_sw**-0.5)
      t[f"{pre}.mlp.weights_out.bias"] = _w(r, d)
    else:
      t[f"{pre}.mlp.fc1.weight"] = _w(r, hidden, d, scale=d**-0.5)
      t[f"{pre}.mlp.fc1.bias"] = _w(r, hidden)
      t[f"{pre}.mlp.fc2.weight"] = _w(r, d, hidden, scale=hidden**-0.5)
      t[f"{pre}.mlp.fc2.bias"] = _w(r, d)
  return _write(path, cfg, t)


def write_word_tokenizer(path, pad_token: str, specials=(), template: tuple | None = None) -> str:
  """Writes a tiny WordLevel tokenizer.json (+ tokenizer_config.json) over WORDS.

  Args:
    path: directory.
    pad_token: pad token string (added to the vocab).
    specials: extra special tokens, added before the pad token.
    template: optional (bos, eos) the post-processor wraps every sequence with.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  vocab = {"[UNK]": 0}
  for w in WORDS:
    vocab[w] = len(vocab)
  for s in (*specials, pad_token):
    if s not in vocab:
      vocab[s] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  if template is not None:
    bos, eos = template
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": pad_token, "model_max_length": 128}, f)
  return os.fspath(path)


def tiny_qwen3_config(vocab_size: int, **overrides) -> dict[str, Any]:
  """HF Qwen3Config fields of a tiny model (GQA 4 query / 2 kv heads)."""
  cfg = dict(
      model_type="qwen3",
      architectures=["Qwen3ForCausalLM"],
      vocab_size=vocab_size,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
      max_position_embeddings=256,
      attention_bias=False,
      hidden_act="silu",
      tie_word_embeddings=True,
      use_sliding_window=False,
  )
  cfg.update(overrides)
  return cfg


def write_tiny_qwen3(path, seed: int = 0, weights_dtype: str = "float32", **overrides) -> str:
  """Writes config.json + model.safetensors + tokenizer of a tiny random Qwen3.

  `weights_dtype='bfloat16'` stores the weights as the Qwen3 Hub checkpoints do.
  """
  write_word_tokenizer(path, "<|endoftext|>", specials=("<|im_start|>", "<|im_end|>"))
  from tokenizers import Tokenizer

  vocab = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size()
  cfg = tiny_qwen3_config(vocab, **overrides)
  r = _rng(seed)
  d, dh = cfg["hidden_size"], cfg["head_dim"]
  nh, nkv, ff = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
  t = {"model.embed_tokens.weight": _w(r, cfg["vocab_size"], d, scale=1.0)}
  t["model.norm.weight"] = _ln(r, d)[0]
  for i in range(cfg["num_hidden_layers"]):
    pre = f"model.layers.{i}"
    t[f"{pre}.input_layernorm.weight"] = _ln(r, d)[0]
    t[f"{pre}.post_attention_layernorm.weight"] = _ln(r, d)[0]
    t[f"{pre}.self_attn.q_norm.weight"] = _ln(r, dh)[0]
    t[f"{pre}.self_attn.k_norm.weight"] = _ln(r, dh)[0]
    t[f"{pre}.self_attn.q_proj.weight"] = _w(r, nh * dh, d, scale=d**-0.5)
    t[f"{pre}.self_attn.k_proj.weight"] = _w(r, nkv * dh, d, scale=d**-0.5)
    t[f"{pre}.self_attn.v_proj.weight"] = _w(r, nkv * dh, d, scale=d**-0.5)
    t[f"{pre}.self_attn.o_proj.weight"] = _w(r, d, nh * dh, scale=(nh * dh) ** -0.5)
    if cfg["attention_bias"]:
      for n_, width in (
          ("q_proj", nh * dh),
          ("k_proj", nkv * dh),
          ("v_proj", nkv * dh),
          ("o_proj", d),
      ):
        t[f"{pre}.self_attn.{n_}.bias"] = _w(r, width)
    t[f"{pre}.mlp.gate_proj.weight"] = _w(r, ff, d, scale=d**-0.5)
    t[f"{pre}.mlp.up_proj.weight"] = _w(r, ff, d, scale=d**-0.5)
    t[f"{pre}.mlp.down_proj.weight"] = _w(r, d, ff, scale=ff**-0.5)
  return _write(path, cfg, t, weights_dtype=weights_dtype)


def tiny_clip_config(
    vocab_size: int, bos_token_id: int, eos_token_id: int, **overrides
) -> dict[str, Any]:
  """HF CLIPConfig fields of a tiny model (image 16, patch 4)."""
  text = dict(
      vocab_size=vocab_size,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      layer_norm_eps=1e-5,
      hidden_act="quick_gelu",
      bos_token_id=bos_token_id,
      eos_token_id=eos_token_id,
      pad_token_id=eos_token_id,
  )
  vision = dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=16,
      patch_size=4,
      num_channels=3,
      layer_norm_eps=1e-5,
      hidden_act="quick_gelu",
  )
  cfg = dict(
      model_type="clip",
      architectures=["CLIPModel"],
      text_config=text,
      vision_config=vision,
      projection_dim=24,
      logit_scale_init_value=2.6592,
  )
  cfg.update(overrides)
  return cfg


def _clip_tower(r, t, prefix, n_layers, d, ff):
  for i in range(n_layers):
    pre = f"{prefix}.encoder.layers.{i}"
    for n_ in ("layer_norm1", "layer_norm2"):
      t[f"{pre}.{n_}.weight"], t[f"{pre}.{n_}.bias"] = _ln(r, d)
    for n_ in ("q_proj", "k_proj", "v_proj", "out_proj"):
      t[f"{pre}.self_attn.{n_}.weight"] = _w(r, d, d, scale=d**-0.5)
      t[f"{pre}.self_attn.{n_}.bias"] = _w(r, d)
    t[f"{pre}.mlp.fc1.weight"] = _w(r, ff, d, scale=d**-0.5)
    t[f"{pre}.mlp.fc1.bias"] = _w(r, ff)
    t[f"{pre}.mlp.fc2.weight"] = _w(r, d, ff, scale=ff**-0.5)
    t[f"{pre}.mlp.fc2.bias"] = _w(r, d)


def write_tiny_clip(path, seed: int = 0, **overrides) -> str:
  """Writes config.json + model.safetensors + tokenizer of a tiny random CLIP."""
  bos, eos = "<|startoftext|>", "<|endoftext|>"
  write_word_tokenizer(path, eos, specials=(bos, eos), template=(bos, eos))
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  ids = tok.token_to_id(bos), tok.token_to_id(eos)
  cfg = tiny_clip_config(tok.get_vocab_size(), *ids, **overrides)
  v, tc = cfg["vision_config"], cfg["text_config"]
  r = _rng(seed)
  t: dict[str, np.ndarray] = {}
  dv, p = v["hidden_size"], v["patch_size"]
  n_pos = (v["image_size"] // p) ** 2 + 1
  t["vision_model.embeddings.class_embedding"] = _w(r, dv, scale=1.0)
  t["vision_model.embeddings.patch_embedding.weight"] = _w(r, dv, 3, p, p, scale=0.3)
  t["vision_model.embeddings.position_embedding.weight"] = _w(r, n_pos, dv, scale=1.0)
  for n_ in ("pre_layrnorm", "post_layernorm"):
    t[f"vision_model.{n_}.weight"], t[f"vision_model.{n_}.bias"] = _ln(r, dv)
  _clip_tower(r, t, "vision_model", v["num_hidden_layers"], dv, v["intermediate_size"])
  dt = tc["hidden_size"]
  t["text_model.embeddings.token_embedding.weight"] = _w(r, tc["vocab_size"], dt, scale=1.0)
  t["text_model.embeddings.position_embedding.weight"] = _w(r, tc["max_position_embeddings"], dt)
  t["text_model.final_layer_norm.weight"], t["text_model.final_layer_norm.bias"] = _ln(r, dt)
  _clip_tower(r, t, "text_model", tc["num_hidden_layers"], dt, tc["intermediate_size"])
  t["visual_projection.weight"] = _w(r, cfg["projection_dim"], dv, scale=dv**-0.5)
  t["text_projection.weight"] = _w(r, cfg["projection_dim"], dt, scale=dt**-0.5)
  t["logit_scale"] = np.array(cfg["logit_scale_init_value"], np.float32)
  return _write(path, cfg, t)


def write_tiny_lpips_vgg16(path, seed: int = 0, widths=(8, 16, 32, 64, 64)) -> str:
  """Writes vgg16.safetensors + lpips_vgg_v0.1.safetensors of a narrow random VGG16."""
  r = _rng(seed)
  vgg: dict[str, np.ndarray] = {}
  c_in = 3
  for s, stage in enumerate(lpips_lib.torchvision_indices()):
    for idx in stage:
      c = widths[s]
      vgg[f"features.{idx}.weight"] = _w(r, c, c_in, 3, 3, scale=(2.0 / (9 * c_in)) ** 0.5)
      vgg[f"features.{idx}.bias"] = _w(r, c, scale=0.01)
      c_in = c
  lin = {f"lin{s}.model.1.weight": np.abs(_w(r, 1, c, 1, 1)) for s, c in enumerate(widths)}
  _write(path, None, vgg, lpips_lib.VGG_FILE)
  return _write(path, None, lin, lpips_lib.LIN_FILE)


def inception_shapes(width_divisor: int) -> dict[str, tuple[int, ...]]:
  """Conv weight shapes ([O, I, kh, kw]) of the FID InceptionV3, keyed by module prefix."""
  import flax.linen as nn
  import jax

  from infdiff.pretrained import inception

  model = inception.InceptionFid(width_divisor=width_divisor)
  init = lambda: nn.unbox(model.init(jax.random.key(0), jax.numpy.zeros((1, 8, 8, 3))))
  shapes = jax.eval_shape(init)
  out = {}
  for name, mod in shapes["params"].items():
    kh, kw, i, o = mod["conv"]["kernel"].shape
    out[name] = (o, i, kh, kw)
  return out


def _inception_prefix(name: str) -> str:
  # Mixed_5b_branch1x1 -> Mixed_5b.branch1x1 (the torch module path)
  return name[:8] + "." + name[9:] if name.startswith("Mixed_") else name


def write_tiny_inception_fid(path, seed: int = 0, width_divisor: int = 8) -> str:
  """Writes pt_inception-2015-12-05.safetensors of a narrow random FID InceptionV3."""
  from infdiff.pretrained import inception

  r = _rng(seed)
  t: dict[str, np.ndarray] = {}
  for name, (o, i, kh, kw) in inception_shapes(width_divisor).items():
    pre = _inception_prefix(name)
    t[f"{pre}.conv.weight"] = _w(r, o, i, kh, kw, scale=(2.0 / (i * kh * kw)) ** 0.5)
    t[f"{pre}.bn.weight"] = (1.0 + _w(r, o)).astype(np.float32)
    t[f"{pre}.bn.bias"] = _w(r, o)
    t[f"{pre}.bn.running_mean"] = _w(r, o)
    t[f"{pre}.bn.running_var"] = (1.0 + np.abs(_w(r, o))).astype(np.float32)
  return _write(path, None, t, inception.FILE)


def tiny_sd_vae_config(**overrides) -> dict[str, Any]:
  """diffusers AutoencoderKL config.json fields of a tiny VAE (2 levels, factor 2)."""
  cfg = dict(
      _class_name="AutoencoderKL",
      _diffusers_version="0.36.0",
      in_channels=3,
      out_channels=3,
      block_out_channels=[8, 16],
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=4,
      act_fn="silu",
      sample_size=32,
      scaling_factor=0.18215,
      force_upcast=True,
      use_quant_conv=True,
      use_post_quant_conv=True,
      mid_block_add_attention=True,
  )
  cfg.update(overrides)
  n = len(cfg["block_out_channels"])
  cfg.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
  cfg.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
  return cfg


def _sd_conv(r, t, name, c_out, c_in, k):
  t[f"{name}.weight"] = _w(r, c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5)
  t[f"{name}.bias"] = _w(r, c_out)


def _sd_norm(r, t, name, c):
  t[f"{name}.weight"], t[f"{name}.bias"] = _ln(r, c)


def _sd_resnet(r, t, pre, c_in, c_out):
  _sd_norm(r, t, f"{pre}.norm1", c_in)
  _sd_conv(r, t, f"{pre}.conv1", c_out, c_in, 3)
  _sd_norm(r, t, f"{pre}.norm2", c_out)
  _sd_conv(r, t, f"{pre}.conv2", c_out, c_out, 3)
  if c_in != c_out:
    _sd_conv(r, t, f"{pre}.conv_shortcut", c_out, c_in, 1)


def _sd_mid(r, t, pre, c, attention: bool, legacy: bool):
  _sd_resnet(r, t, f"{pre}.resnets.0", c, c)
  if attention:
    names = (
        ("query", "key", "value", "proj_attn") if legacy else ("to_q", "to_k", "to_v", "to_out.0")
    )
    _sd_norm(r, t, f"{pre}.attentions.0.group_norm", c)
    for n_ in names:
      t[f"{pre}.attentions.0.{n_}.weight"] = _w(r, c, c, scale=c**-0.5)
      t[f"{pre}.attentions.0.{n_}.bias"] = _w(r, c)
  _sd_resnet(r, t, f"{pre}.resnets.1", c, c)


def write_tiny_sd_vae(path, seed: int = 0, legacy_keys: bool = False, **overrides) -> str:
  """Writes config.json + diffusion_pytorch_model.safetensors of a tiny random SD VAE.

  Key names are diffusers AutoencoderKL's; `legacy_keys` spells the mid-block attention
  the old way (query/key/value/proj_attn instead of to_q/to_k/to_v/to_out.0).
  """
  cfg = tiny_sd_vae_config(**overrides)
  r = _rng(seed)
  widths, n = list(cfg["block_out_channels"]), cfg["layers_per_block"]
  c, attn = cfg["latent_channels"], cfg["mid_block_add_attention"]
  t: dict[str, np.ndarray] = {}
  _sd_conv(r, t, "encoder.conv_in", widths[0], cfg["in_channels"], 3)
  c_in = widths[0]
  for i, width in enumerate(widths):
    for j in range(n):
      _sd_resnet(r, t, f"encoder.down_blocks.{i}.resnets.{j}", c_in, width)
      c_in = width
    if i != len(widths) - 1:
      _sd_conv(r, t, f"encoder.down_blocks.{i}.downsamplers.0.conv", width, width, 3)
  _sd_mid(r, t, "encoder.mid_block", widths[-1], attn, legacy_keys)
  _sd_norm(r, t, "encoder.conv_norm_out", widths[-1])
  _sd_conv(r, t, "encoder.conv_out", 2 * c, widths[-1], 3)
  if cfg["use_quant_conv"]:
    _sd_conv(r, t, "quant_conv", 2 * c, 2 * c, 1)
  if cfg["use_post_quant_conv"]:
    _sd_conv(r, t, "post_quant_conv", c, c, 1)
  up = widths[::-1]
  _sd_conv(r, t, "decoder.conv_in", up[0], c, 3)
  _sd_mid(r, t, "decoder.mid_block", up[0], attn, legacy_keys)
  c_in = up[0]
  for i, width in enumerate(up):
    for j in range(n + 1):
      _sd_resnet(r, t, f"decoder.up_blocks.{i}.resnets.{j}", c_in, width)
      c_in = width
    if i != len(up) - 1:
      _sd_conv(r, t, f"decoder.up_blocks.{i}.upsamplers.0.conv", width, width, 3)
  _sd_norm(r, t, "decoder.conv_norm_out", widths[0])
  _sd_conv(r, t, "decoder.conv_out", cfg["out_channels"], widths[0], 3)
  return _write(path, cfg, t, name="diffusion_pytorch_model.safetensors")


WRITERS = {
    "dinov2": write_tiny_dinov2,
    "qwen3": write_tiny_qwen3,
    "clip": write_tiny_clip,
    "lpips_vgg16": write_tiny_lpips_vgg16,
    "inception_fid": write_tiny_inception_fid,
    "sd_vae": write_tiny_sd_vae,
}


def write_tiny(kind: str, path, seed: int = 0, **overrides) -> str:
  """Writes the tiny random checkpoint of `kind` (see WRITERS) and returns its directory."""
  return WRITERS[kind](path, seed, **overrides)
