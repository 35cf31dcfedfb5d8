"""Loads a diffusers AutoencoderKL directory (the `vae` folder of SD1.x / SD2 / SDXL).

The module is infdiff.models.sd_vae.SDVAE; this file maps the torch state dict onto its
param tree. Every flax param path names its torch key: `down_blocks_0` -> `down_blocks.0`,
`downsamplers_0` -> `downsamplers.0.conv`, `nin_shortcut` -> `conv_shortcut`, attention
`norm/q/k/v/proj_out` -> `group_norm/to_q/to_k/to_v/to_out.0` (or the older
`group_norm/query/key/value/proj_attn` spelling, detected per attention block). Conv
weights [O, I, kh, kw] become [kh, kw, I, O]; the attention Linear weights [out, in]
become 1x1 conv kernels [1, 1, in, out]. Tensors left over after the conversion (an
attention block the config turned off, a stray key) are an error, like missing ones.
"""

from __future__ import annotations

import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.models.sd_vae import SDVAE, from_config
from infdiff.pretrained import common

KIND = "sd_vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"  # the Hub's fp16 variant
FILES = ("config.json", WEIGHTS)

# flax attention names -> torch, current and legacy (diffusers < 0.14) spellings.
ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTN_NAMES = {**ATTN_NAMES, "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
_RENAMES = {
    "nin_shortcut": "conv_shortcut",
    "downsamplers_0": "downsamplers.0.conv",
    "upsamplers_0": "upsamplers.0.conv",
}


def _module_prefix(path: tuple[str, ...]) -> str:
  """Flax module path (without the leaf) -> torch module prefix (attention not included)."""
  parts = []
  for p in path:
    p = _RENAMES.get(p, p)
    m = re.fullmatch(r"(down_blocks|up_blocks|resnets|attentions)_(\d+)", p)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
  return ".".join(parts)


def _attn_names(state, prefix: str) -> dict[str, str]:
  if f"{prefix}.to_q.weight" in state or f"{prefix}.query.weight" not in state:
    return ATTN_NAMES
  return LEGACY_ATTN_NAMES


def convert(state: dict[str, np.ndarray], model: SDVAE) -> dict[str, Any]:
  """diffusers AutoencoderKL state dict -> {'params': ...} for `model` (float32 numpy).

  Raises:
    CheckpointFormatError: a tensor the model needs is missing, or the checkpoint holds
      tensors the model has no place for (one line).
  """
  side = 2 ** (len(tuple(model.block_out_channels)) - 1)
  x = jnp.zeros((1, side, side, model.in_channels))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x)))["params"]
  used: set[str] = set()
  params: dict[str, Any] = {}
  for key_path, _ in jax.tree_util.tree_leaves_with_path(shapes):
    path = tuple(k.key for k in key_path)
    *mods, leaf = path
    if "attentions_0" in mods:  # [..., 'attentions_0', 'q'|..., leaf]
      i = mods.index("attentions_0")
      prefix = _module_prefix(tuple(mods[: i + 1]))
      module = f"{prefix}.{_attn_names(state, prefix)[mods[i + 1]]}"
    else:
      module = _module_prefix(tuple(mods))
    name = f"{module}.{'bias' if leaf == 'bias' else 'weight'}"
    w = common.take(state, name, KIND)
    used.add(name)
    if leaf == "kernel":
      if w.ndim == 2:  # torch Linear [out, in] -> 1x1 conv [1, 1, in, out]
        w = w.T[None, None]
      elif w.ndim == 4:  # torch Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
        w = w.transpose(2, 3, 1, 0)
    node = params
    for m in mods:
      node = node.setdefault(m, {})
    node[leaf] = w
  extra = sorted(set(state) - used)
  if extra:
    raise common.CheckpointFormatError(
        f"{KIND} checkpoint has {len(extra)} tensors its config does not use, e.g. {extra[:3]}"
    )
  return {"params": params}


def load(path: str, **overrides) -> tuple[SDVAE, dict[str, Any]]:
  """Loads a local diffusers AutoencoderKL directory.

  Args:
    path: directory with config.json and diffusion_pytorch_model.safetensors (the
      `vae` folder of an SD1.x/SDXL checkpoint; diffusion_pytorch_model.fp16.safetensors
      is used when only that variant is present).
    **overrides: SDVAE fields to override (dtype, ...).

  Returns:
    (model, params): `model.apply(params, images, method=model.encode)` ->
    {'mean', 'logvar'}; `model.apply(params, latent, method=model.decode)` -> images.
  """
  path = os.fspath(path)
  files = FILES
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, WEIGHTS)):
    if os.path.isfile(os.path.join(path, WEIGHTS_FP16)):
      files = ("config.json", WEIGHTS_FP16)
  path = common.require_files(KIND, path, files)
  model = _model(path, **overrides)
  state = common.read_safetensors(KIND, path, files[1:])
  params = convert(state, model)
  return model, common.check_params(KIND, model, params, _example(model))


def abstract(path: str, **overrides) -> tuple[SDVAE, dict[str, Any]]:
  """`load` from config.json alone: params as jax.ShapeDtypeStruct (`pretrained.abstract`)."""
  path = common.require_files(KIND, os.fspath(path), ["config.json"])
  model = _model(path, **overrides)
  return model, common.init_shapes(model, _example(model))


def _model(path: str, **overrides) -> SDVAE:
  try:
    return from_config(common.read_json(os.path.join(path, "config.json")), **overrides)
  except ValueError as e:
    raise common.CheckpointFormatError(f"{KIND} checkpoint at {path}: {e}") from e


def _example(model: SDVAE) -> jax.Array:
  """The smallest image `init` takes: one latent cell."""
  side = 2 ** (len(tuple(model.block_out_channels)) - 1)
  return jnp.zeros((1, side, side, model.in_channels))
