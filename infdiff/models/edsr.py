"""EDSR-style encoder without downsampling (RaPD stage 1, LIIF's EDSR-baseline body).

image [B, r, r, 3] in [0, 1] -> latent [B, r, r, C] (or [B, r/f, r/f, C] with the
optional latent stride f, a demo substitute, not RaPD). The last conv layer is always the
submodule named `LAST_CONV` ('last_conv'): the stage-1 loss takes the gradient norms of
the reconstruction and distillation losses at that layer's kernel,
`params['last_conv']['kernel']`, to balance them adaptively (RaPD Eq. 9).
"""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

# Name of the encoder's final conv layer; its kernel is theta_L of RaPD Eq. 9.
LAST_CONV = "last_conv"


def conv3x3(features: int, dtype, param_dtype, name: str | None = None) -> nn.Conv:
  """3x3 'SAME' conv whose kernel carries (None, None, 'conv_in', 'conv_out')."""
  return nn.Conv(
      features,
      (3, 3),
      padding="SAME",
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
          (None, None, "conv_in", "conv_out"),
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      name=name,
  )


class ResBlock(nn.Module):
  """x + res_scale * conv(relu(conv(x))), no normalisation (EDSR)."""

  features: int = 16  # channels
  res_scale: float = 1.0  # residual scaling (EDSR-baseline 1.0; large EDSR uses 0.1)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = conv3x3(self.features, self.dtype, self.param_dtype, "conv1")(x)
    h = conv3x3(self.features, self.dtype, self.param_dtype, "conv2")(nn.relu(h))
    return x + self.res_scale * h


class EDSREncoder(nn.Module):
  """conv3x3 -> n_resblocks ResBlocks -> conv3x3 (+ global skip) [-> conv3x3 to latent].

  Defaults follow RaPD Table 5 (16 channels, 8 residual blocks, C = 16).
  """

  features: int = 16  # body width (Table 5: 16)
  n_resblocks: int = 8  # residual blocks (Table 5: 8)
  latent_channels: int | None = None  # C; None -> latent is the body output (C = features)
  # Latent stride f (not in RaPD, whose latent keeps the image resolution): the last conv
  # reads f x f space-to-depth blocks of the body output, so the latent is [B, r/f, r/f, C].
  # Needs latent_channels.
  downsample: int = 1
  res_scale: float = 1.0  # residual scaling inside blocks (choice: EDSR-baseline's 1.0)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """Encodes an image.

    Args:
      image: [B, r, r, 3] RGB in [0, 1]. Mapped to [-1, 1] inside (LIIF's input
        normalisation), so callers pass raw [0, 1] images.

    Returns:
      [B, r / f, r / f, C] float32 latent (f = downsample; 1 keeps the input size).
    """
    x = (2.0 * image - 1.0).astype(self.dtype)
    head = conv3x3(self.features, self.dtype, self.param_dtype, "head")(x)
    h = head
    for i in range(self.n_resblocks):
      h = ResBlock(self.features, self.res_scale, self.dtype, self.param_dtype, name=f"block{i}")(h)
    project = self.latent_channels is not None
    body_name = "body_conv" if project else LAST_CONV
    # EDSR's global skip: the body learns a correction to the head features.
    h = conv3x3(self.features, self.dtype, self.param_dtype, body_name)(h) + head
    f = int(self.downsample)
    if f > 1:
      if not project:
        raise ValueError("encoder.downsample > 1 needs encoder.latent_channels")
      if image.shape[1] % f or image.shape[2] % f:
        raise ValueError(
            f"encoder.downsample={f} needs an input side divisible by it, got "
            f"{image.shape[1]}x{image.shape[2]}"
        )
      h = einops.rearrange(h, "b (h p) (w q) c -> b h w (p q c)", p=f, q=f)
    if project:
      h = conv3x3(self.latent_channels, self.dtype, self.param_dtype, LAST_CONV)(h)
    h = nn.with_logical_constraint(h, ("act_batch", "act_height", "act_width", "act_latent"))
    return h.astype(jnp.float32)
