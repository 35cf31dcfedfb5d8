"""Discriminators for adversarial autoencoder training.

`PatchGAN` is the pix2pix / taming `NLayerDiscriminator` used by LDM and INFD
(METHODS.md: INFD): it scores overlapping patches of its input, one logit per patch.

    conv k4 s2 (ndf) -> LeakyReLU(0.2)
    n_layers - 1 x [conv k4 s2 (ndf * min(2^n, 8), no bias) -> BatchNorm -> LeakyReLU]
    conv k4 s1 (ndf * min(2^n_layers, 8), no bias) -> BatchNorm -> LeakyReLU
    conv k4 s1 (1)

All convs pad 1 each side. Initialisation as taming's `weights_init`: conv kernels
N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0; conv biases 0 (taming keeps torch's
default there; choice). BatchNorm uses batch statistics in training (`train=True`, stats in
the 'batch_stats' collection, momentum 0.9 = torch's 0.1, eps 1e-5) and the running ones
otherwise. Under a data-parallel jit the batch statistics are those of the global batch
(the arrays are global), i.e. synchronised BatchNorm. Flax keeps the biased batch
variance as running variance where torch keeps the unbiased one (N / (N - 1) apart).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)

  return init


class PatchGAN(nn.Module):
  """[B, H, W, C] images (in [-1, 1]) -> [B, H', W', 1] patch logits."""

  ndf: int = 64  # width of the first conv (INFD / LDM: 64)
  n_layers: int = 3  # stride-2 convs (INFD / LDM: 3)
  kernel: int = 4  # conv kernel size (4)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype

  def _conv(self, features, stride, bias, name):
    return nn.Conv(
        features,
        (self.kernel, self.kernel),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(_normal(0.0, 0.02), _CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )

  def _bn(self, train, name):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(_normal(1.0, 0.02), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )

  @nn.compact
  def __call__(self, x, train: bool = True) -> jax.Array:
    """Patch logits; `train` selects batch (True) or running (False) BatchNorm statistics."""
    act = lambda t: nn.leaky_relu(t, 0.2)
    h = act(self._conv(self.ndf, 2, True, "conv0")(x.astype(self.dtype)))
    mult = 1
    for n in range(1, self.n_layers):
      mult = min(2**n, 8)
      h = self._conv(self.ndf * mult, 2, False, f"conv{n}")(h)
      h = act(self._bn(train, f"norm{n}")(h))
    mult = min(2**self.n_layers, 8)
    h = self._conv(self.ndf * mult, 1, False, f"conv{self.n_layers}")(h)
    h = act(self._bn(train, f"norm{self.n_layers}")(h))
    out = self._conv(1, 1, True, "conv_out")(h)  # [B, H', W', 1]
    return out.astype(jnp.float32)
