"""LPIPS v0.1 with a VGG16 trunk: a Linen port of the `lpips` package's LPIPS(net='vgg').

`apply(params, x, y)` takes two float32 [B, H, W, 3] batches in [0, 1] and returns the
distance [B]. Policy as lpips with `normalize=True`: scale to [-1, 1], then the
ScalingLayer, VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, unit-normalise
each over channels, squared differences, 1x1 linear heads, spatial mean, sum over layers.

Channel widths come from the checkpoint (torchvision VGG16: 64, 128, 256, 512, 512), so
reduced-width VGGs built with torchvision's `make_layers` load too.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.pretrained import common

SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
SCALE = (0.458, 0.448, 0.450)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# Convs per stage of VGG16 ('D' config); LPIPS taps the ReLU after each stage's last conv.
VGG16_DEPTHS = (2, 2, 3, 3, 3)


def torchvision_indices(depths=VGG16_DEPTHS) -> list[list[int]]:
  """Index of every conv in torchvision's `vgg.features` Sequential, per stage."""
  out, i = [], 0
  for s, n in enumerate(depths):
    if s > 0:
      i += 1  # the max-pool that opens every stage after the first
    stage = []
    for _ in range(n):
      stage.append(i)
      i += 2  # conv, relu
    out.append(stage)
  return out


class LpipsVgg16(nn.Module):
  """LPIPS distance with VGG16 features and learned per-layer linear heads."""

  widths: tuple[int, ...] = VGG16_WIDTHS  # VGG stage widths (taken from the checkpoint)
  depths: tuple[int, ...] = VGG16_DEPTHS  # convs per VGG stage
  eps: float = 1e-10  # lpips normalize_tensor epsilon
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  def features(self, x: jax.Array) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = []
    for s, (c, n) in enumerate(zip(self.widths, self.depths)):
      if s > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j in range(n):
        x = jax.nn.relu(common.conv2d(c, 3, padding=1, name=f"conv{s}_{j}", **kw)(x))
      feats.append(x)
    return feats

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    b = x.shape[0]
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32) * 2.0 - 1.0  # [2B, H, W, 3]
    both = (both - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    total = jnp.zeros((b,), jnp.float32)
    for s, f in enumerate(self.features(both.astype(self.dtype))):
      f = f.astype(jnp.float32)
      f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + self.eps)
      d = (f[:b] - f[b:]) ** 2  # [B, h, w, C]
      w = common.param(self, f"lin{s}", (f.shape[-1],), ("conv_in",), nn.initializers.ones_init())
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w.astype(jnp.float32)), axis=(1, 2))
    return total


# --------------------------------------------------------------------------- loading

VGG_FILE = "vgg16.safetensors"  # torchvision vgg16 state dict (features.*), converted
LIN_FILE = "lpips_vgg_v0.1.safetensors"  # lpips weights/v0.1/vgg.pth, converted
FILES = (VGG_FILE, LIN_FILE)


def convert(vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray], depths=VGG16_DEPTHS):
  """torchvision vgg16 + lpips linear-head state dicts -> (widths, params)."""
  params: dict[str, Any] = {}
  widths = []
  for s, stage in enumerate(torchvision_indices(depths)):
    for j, idx in enumerate(stage):
      params[f"conv{s}_{j}"] = common.conv(vgg, f"features.{idx}", "lpips_vgg16")
    widths.append(params[f"conv{s}_{len(stage) - 1}"]["kernel"].shape[-1])
    # lpips stores the head as lin{s}.model.1.weight ([1, C, 1, 1]; model.0 is Dropout).
    key = f"lin{s}.model.1.weight"
    if key not in lin:
      key = f"lin{s}.model.0.weight"  # heads saved without dropout
    params[f"lin{s}"] = common.take(lin, key, "lpips_vgg16").reshape(-1)
  return tuple(widths), {"params": params}


def load(path: str, **overrides) -> tuple[LpipsVgg16, dict[str, Any]]:
  """Loads a directory with vgg16.safetensors + lpips_vgg_v0.1.safetensors.

  Make them once from the .pth files with scripts/convert_to_safetensors.py.

  Args:
    path: checkpoint directory.
    **overrides: LpipsVgg16 fields to override (dtype, ...).

  Returns:
    (model, params) for `model.apply(params, x, y)` -> [B].
  """
  path = common.require_files("lpips_vgg16", path, FILES)
  vgg = common.read_safetensors("lpips_vgg16", path, [VGG_FILE])
  lin = common.read_safetensors("lpips_vgg16", path, [LIN_FILE])
  widths, params = convert(vgg, lin)
  model = LpipsVgg16(widths=widths, **overrides)
  x = jnp.zeros((1, 32, 32, 3))
  return model, common.check_params("lpips_vgg16", model, params, x, x)


def abstract(path: str, **overrides) -> tuple[LpipsVgg16, dict[str, Any]]:
  """`load` without reading the weights (`pretrained.abstract`): the full VGG16 widths, params
  as jax.ShapeDtypeStruct. `path` must be a directory; its files are not needed."""
  path = common.require_files("lpips_vgg16", path, [])
  model = LpipsVgg16(**overrides)
  x = jnp.zeros((1, 32, 32, 3))
  return model, common.init_shapes(model, x, x)
