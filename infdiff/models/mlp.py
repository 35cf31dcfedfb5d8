"""DiffAE's MLP-skip network: the latent denoiser of ∞-Diff's diffusion autoencoder.

  emb = MLP(timestep_embedding(t, time_dim))                         [B, width]
  h = x;  for layer i < L - 1:
      h = Linear(concat(h, x) if i > 0 else h)  (the input re-enters every layer)
      h = SiLU(LayerNorm(h * (1 + Linear_i(emb))))
  out = Linear(concat(h, x)) -> [B, dim]

(DiffAE's MLPSkipNet: 10 layers of width 2048, time-conditioned by multiplication, skip
connections from the input to every hidden layer.)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from infdiff.models import layers
from infdiff.models.layers import Dtype


class MLPSkipNet(nn.Module):
  """[B, dim] noisy latent, [B] timestep -> [B, dim] (eps)."""

  dim: int
  num_layers: int = 10
  width: int = 2048
  time_dim: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t):
    dt, pdt = self.dtype, jnp.float32
    temb = layers.timestep_embedding(t, self.time_dim).astype(dt)
    emb = layers.dense(self.width, (None, "mlp"), dt, pdt, name="time_0")(temb)
    emb = layers.dense(self.width, ("mlp", "embed"), dt, pdt, name="time_1")(nn.silu(emb))
    x = x.astype(dt)
    h = x
    for i in range(self.num_layers - 1):
      if i:
        h = jnp.concatenate([h, x], axis=-1)
      h = layers.dense(self.width, (None, "mlp"), dt, pdt, name=f"layer_{i}")(h)
      cond = layers.dense(self.width, ("embed", "mlp"), dt, pdt, name=f"cond_{i}")(nn.silu(emb))
      h = h * (1.0 + cond)
      h = nn.silu(layers.layer_norm(dt, pdt, epsilon=1e-5, name=f"norm_{i}")(h))
    h = jnp.concatenate([h, x], axis=-1)
    out = layers.dense(self.dim, ("mlp", None), dt, pdt, zero=True, name="out")(h)
    return out.astype(jnp.float32)
