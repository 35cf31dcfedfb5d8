"""Projection heads that map a network's features to a frozen teacher's width."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class RepaProjector(nn.Module):
  """MLP from denoiser width to teacher width (REPA's projector: Linear-SiLU-Linear x2)."""

  hidden: int
  out: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, N, width] -> [B, N, out]
    def dense(f, axes, name):
      return nn.Dense(
          f,
          dtype=self.dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
          name=name,
      )

    x = nn.silu(dense(self.hidden, ("embed", "mlp"), "fc1")(x))
    x = nn.silu(dense(self.hidden, ("mlp", "embed"), "fc2")(x))
    return dense(self.out, ("embed", "mlp"), "fc3")(x)


class DistillProjection(nn.Module):
  """The 1x1 projection branch from latent channels to the teacher width."""

  teacher_dim: int  # width of the teacher's patch tokens (768 for ViT-B/14)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):  # [B, h, w, C] -> [B, h, w, D]
    return nn.Dense(
        self.teacher_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("latent", "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(pooled)
