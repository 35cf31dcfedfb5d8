"""The FID InceptionV3 (pytorch-fid `pt_inception-2015-12-05`) as a Linen port.

`apply(params, images)` takes float32 [B, H, W, 3] in [0, 1] and returns
{'pool': [B, 2048]}, the final average-pool features FID statistics are computed from.
Policy as pytorch-fid's InceptionV3(resize_input=True, normalize_input=True): torch
bilinear resize to 299 x 299 (align_corners=False, no antialias), then scale to [-1, 1].
The FID variant differs from torchvision's Inception3 in its pooling: average pools skip
the zero padding (count_include_pad=False) and Mixed_7c pools with max instead of average.

`width_divisor` divides every channel width (1 for the real network); the parity fixtures
use a narrow network built from the same pytorch-fid/torchvision block classes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.pretrained import common

FID_SIZE = 299  # pytorch-fid resize target


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

  features: int = 32  # output channels
  kernel: tuple[int, int] = (3, 3)  # kernel (kh, kw)
  strides: int = 1  # stride
  padding: tuple[int, int] = (0, 0)  # symmetric zero padding (ph, pw)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ph, pw = self.padding
    pad = ((ph, ph), (pw, pw))
    x = common.conv2d(
        self.features,
        self.kernel,
        strides=self.strides,
        padding=pad,
        use_bias=False,
        name="conv",
        **kw,
    )(x)
    x = nn.BatchNorm(
        use_running_average=True,
        epsilon=1e-3,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name="bn",
        **kw,
    )(x)
    return jax.nn.relu(x)


def _avg3(x):
  """3x3 stride-1 average pool that ignores the zero padding (TF semantics)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionFid(nn.Module):
  """FID InceptionV3 up to the 2048-d average pool."""

  width_divisor: int = 1  # divides every channel width (1 = the real network)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  def _c(self, n: int) -> int:
    return n // self.width_divisor

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self._c

    def conv(name, feats, k, s=1, p=(0, 0)):
      k = (k, k) if isinstance(k, int) else k
      return BasicConv(c(feats), k, s, p, name=name, **kw)

    x = common.resize(images.astype(jnp.float32), (FID_SIZE, FID_SIZE), "bilinear", False)
    x = (2.0 * x - 1.0).astype(self.dtype)  # [B, 299, 299, 3]
    x = conv("Conv2d_1a_3x3", 32, 3, 2)(x)
    x = conv("Conv2d_2a_3x3", 32, 3)(x)
    x = conv("Conv2d_2b_3x3", 64, 3, 1, (1, 1))(x)
    x = _max3s2(x)
    x = conv("Conv2d_3b_1x1", 80, 1)(x)
    x = conv("Conv2d_4a_3x3", 192, 3)(x)
    x = _max3s2(x)

    def block_a(name, x, pool_features):
      p = lambda n: f"{name}_{n}"
      b1 = conv(p("branch1x1"), 64, 1)(x)
      b5 = conv(p("branch5x5_2"), 64, 5, 1, (2, 2))(conv(p("branch5x5_1"), 48, 1)(x))
      bd = conv(p("branch3x3dbl_1"), 64, 1)(x)
      bd = conv(p("branch3x3dbl_2"), 96, 3, 1, (1, 1))(bd)
      bd = conv(p("branch3x3dbl_3"), 96, 3, 1, (1, 1))(bd)
      bp = conv(p("branch_pool"), pool_features, 1)(_avg3(x))
      return jnp.concatenate([b1, b5, bd, bp], axis=-1)

    def block_b(name, x):
      p = lambda n: f"{name}_{n}"
      b3 = conv(p("branch3x3"), 384, 3, 2)(x)
      bd = conv(p("branch3x3dbl_1"), 64, 1)(x)
      bd = conv(p("branch3x3dbl_2"), 96, 3, 1, (1, 1))(bd)
      bd = conv(p("branch3x3dbl_3"), 96, 3, 2)(bd)
      return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)

    def block_c(name, x, c7):
      p = lambda n: f"{name}_{n}"
      b1 = conv(p("branch1x1"), 192, 1)(x)
      b7 = conv(p("branch7x7_1"), c7, 1)(x)
      b7 = conv(p("branch7x7_2"), c7, (1, 7), 1, (0, 3))(b7)
      b7 = conv(p("branch7x7_3"), 192, (7, 1), 1, (3, 0))(b7)
      bd = conv(p("branch7x7dbl_1"), c7, 1)(x)
      bd = conv(p("branch7x7dbl_2"), c7, (7, 1), 1, (3, 0))(bd)
      bd = conv(p("branch7x7dbl_3"), c7, (1, 7), 1, (0, 3))(bd)
      bd = conv(p("branch7x7dbl_4"), c7, (7, 1), 1, (3, 0))(bd)
      bd = conv(p("branch7x7dbl_5"), 192, (1, 7), 1, (0, 3))(bd)
      bp = conv(p("branch_pool"), 192, 1)(_avg3(x))
      return jnp.concatenate([b1, b7, bd, bp], axis=-1)

    def block_d(name, x):
      p = lambda n: f"{name}_{n}"
      b3 = conv(p("branch3x3_2"), 320, 3, 2)(conv(p("branch3x3_1"), 192, 1)(x))
      b7 = conv(p("branch7x7x3_1"), 192, 1)(x)
      b7 = conv(p("branch7x7x3_2"), 192, (1, 7), 1, (0, 3))(b7)
      b7 = conv(p("branch7x7x3_3"), 192, (7, 1), 1, (3, 0))(b7)
      b7 = conv(p("branch7x7x3_4"), 192, 3, 2)(b7)
      return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)

    def block_e(name, x, max_pool):
      p = lambda n: f"{name}_{n}"
      b1 = conv(p("branch1x1"), 320, 1)(x)
      b3 = conv(p("branch3x3_1"), 384, 1)(x)
      b3 = jnp.concatenate(
          [
              conv(p("branch3x3_2a"), 384, (1, 3), 1, (0, 1))(b3),
              conv(p("branch3x3_2b"), 384, (3, 1), 1, (1, 0))(b3),
          ],
          axis=-1,
      )
      bd = conv(p("branch3x3dbl_1"), 448, 1)(x)
      bd = conv(p("branch3x3dbl_2"), 384, 3, 1, (1, 1))(bd)
      bd = jnp.concatenate(
          [
              conv(p("branch3x3dbl_3a"), 384, (1, 3), 1, (0, 1))(bd),
              conv(p("branch3x3dbl_3b"), 384, (3, 1), 1, (1, 0))(bd),
          ],
          axis=-1,
      )
      if max_pool:  # FIDInceptionE_2 (Mixed_7c): max pool, as the TF graph does
        pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
      else:
        pooled = _avg3(x)
      bp = conv(p("branch_pool"), 192, 1)(pooled)
      return jnp.concatenate([b1, b3, bd, bp], axis=-1)

    x = block_a("Mixed_5b", x, 32)
    x = block_a("Mixed_5c", x, 64)
    x = block_a("Mixed_5d", x, 64)
    x = block_b("Mixed_6a", x)
    x = block_c("Mixed_6b", x, 128)
    x = block_c("Mixed_6c", x, 160)
    x = block_c("Mixed_6d", x, 160)
    x = block_c("Mixed_6e", x, 192)
    x = block_d("Mixed_7a", x)
    x = block_e("Mixed_7b", x, max_pool=False)
    x = block_e("Mixed_7c", x, max_pool=True)  # [B, 8, 8, 2048 / width_divisor]
    return {"pool": jnp.mean(x.astype(jnp.float32), axis=(1, 2))}


# --------------------------------------------------------------------------- loading

FILE = "pt_inception-2015-12-05.safetensors"  # pytorch-fid weights, converted
FILES = (FILE,)


def convert(state: dict[str, np.ndarray]) -> tuple[int, dict[str, Any]]:
  """pytorch-fid / torchvision Inception3 state dict -> (width_divisor, variables)."""
  width = common.take(state, "Conv2d_1a_3x3.conv.weight", "inception_fid").shape[0]
  if 32 % width:
    raise common.CheckpointFormatError(
        f"inception_fid: first conv width {width} does not divide 32"
    )
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  prefixes = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".conv.weight")})
  for pre in prefixes:
    if pre.startswith("AuxLogits"):
      continue
    t = lambda n, pre=pre: common.take(state, f"{pre}.bn.{n}", "inception_fid")
    name = pre.replace(".", "_")  # Mixed_5b.branch1x1 -> Mixed_5b_branch1x1
    params[name] = {
        "conv": common.conv(state, f"{pre}.conv", "inception_fid", bias=False),
        "bn": {"scale": t("weight"), "bias": t("bias")},
    }
    stats[name] = {"bn": {"mean": t("running_mean"), "var": t("running_var")}}
  return 32 // width, {"params": params, "batch_stats": stats}


def load(path: str, **overrides) -> tuple[InceptionFid, dict[str, Any]]:
  """Loads a directory with pt_inception-2015-12-05.safetensors.

  Make it once from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` with
  scripts/convert_to_safetensors.py.

  Args:
    path: checkpoint directory.
    **overrides: InceptionFid fields to override (dtype, ...).

  Returns:
    (model, variables) for `model.apply(variables, images)` -> {'pool': [B, 2048]}.
  """
  path = common.require_files("inception_fid", path, FILES)
  div, variables = convert(common.read_safetensors("inception_fid", path, FILES))
  model = InceptionFid(width_divisor=div, **overrides)
  return model, common.check_params("inception_fid", model, variables, jnp.zeros((1, 8, 8, 3)))


def abstract(path: str, **overrides) -> tuple[InceptionFid, dict[str, Any]]:
  """`load` without reading the weights (`pretrained.abstract`): the full-width network,
  variables as jax.ShapeDtypeStruct. `path` must be a directory; its files are not needed."""
  path = common.require_files("inception_fid", path, [])
  model = InceptionFid(**overrides)
  return model, common.init_shapes(model, jnp.zeros((1, 8, 8, 3)))
