"""Latent bottlenecks of LDM-style autoencoders: vector quantisation and a diagonal Gaussian.

VectorQuantizer (LDM's legacy `VectorQuantizer`, METHODS.md: INFD): every latent vector
z [C] is replaced by its nearest code e_k of a learned codebook [K, C] (Euclidean),
passed on straight-through, `z + sg(e_k - z)`, so the decoder's gradient reaches the
encoder unchanged. The loss trains the codebook and commits the encoder:

    loss = mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2)

with beta (0.25) on the *codebook* term: LDM's `legacy=True` form, which swapped the two
terms of the VQ-VAE paper (`beta` on the commitment term there).

DiagonalGaussian (LDM's `DiagonalGaussianDistribution`): moments [.., 2C] -> mean and
log-variance (clipped to [-30, 20]); `kl` is KL(q || N(0, I)) summed over the latent
dimensions of each example, averaged over the batch, as LDM's KL autoencoders do.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clip of the log-variance


class Quantized(NamedTuple):
  """Output of `VectorQuantizer`; leading dims follow the input."""

  zq: jax.Array  # [B, h, w, C] straight-through quantised latent z + sg(e_k - z)
  loss: jax.Array  # [] commitment + beta * codebook
  indices: jax.Array  # [B, h, w] int32 index k of the nearest code
  perplexity: jax.Array  # [] exp(entropy) of the code usage in this batch (K at most)
  commitment: jax.Array  # [] mean((sg(zq) - z)^2)
  codebook: jax.Array  # [] mean((zq - sg(z))^2)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest code (Euclidean) for each vector of z [..., C]; codebook [K, C].

  Distances `|z|^2 + |e|^2 - 2 z.e` in float32 (LDM's expansion). The [N, K] distance
  matrix is materialised: 1 GiB for a batch of 8 at 64 x 64 with K = 8192, which is what
  LDM holds too; argmin has no gradient, so nothing of it is kept for the backward pass.
  """
  flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)  # [N, C]
  e = codebook.astype(jnp.float32)  # [K, C]
  d = jnp.sum(flat**2, -1, keepdims=True) + jnp.sum(e**2, -1)[None] - 2.0 * flat @ e.T  # [N, K]
  return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def vq_loss(z: jax.Array, zq: jax.Array, beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """LDM legacy VQ loss: (commitment + beta * codebook, commitment, codebook).

  Args:
    z: encoder output [..., C].
    zq: the selected codes (not straight-through) [..., C].
    beta: weight of the codebook term (LDM: 0.25).
  """
  sg = jax.lax.stop_gradient
  commitment = jnp.mean(jnp.square(sg(zq) - z))  # moves the encoder toward its code
  codebook = jnp.mean(jnp.square(zq - sg(z)))  # moves the code toward the encoder output
  return commitment + beta * codebook, commitment, codebook


def perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
  """exp(entropy) of the code usage frequencies of `indices` (1 = one code, K = uniform)."""
  counts = jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  p = counts / indices.size
  return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


class VectorQuantizer(nn.Module):
  """Nearest-code quantiser with a learned codebook (see the module docstring)."""

  num_codes: int = 8192  # K (INFD / LDM VQ-f4: 8192)
  beta: float = 0.25  # weight of the codebook term (LDM legacy quantiser)
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, z: jax.Array) -> Quantized:
    """z [B, h, w, C] -> Quantized (float32)."""
    c = z.shape[-1]
    k = self.num_codes
    # LDM/taming initialise the embedding uniformly in [-1/K, 1/K].
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
    codebook = self.param(
        "codebook", nn.with_logical_partitioning(init, (None, "latent")), (k, c), self.param_dtype
    )  # [K, C]
    z = z.astype(jnp.float32)
    idx = nearest_code(z, codebook)  # [B, h, w]
    zq = jnp.take(codebook.astype(jnp.float32), idx, axis=0)  # [B, h, w, C]
    loss, commitment, codebook_term = vq_loss(z, zq, self.beta)
    st = z + jax.lax.stop_gradient(zq - z)  # straight-through: d st / d z = identity
    return Quantized(st, loss, idx, perplexity(idx, k), commitment, codebook_term)


class DiagonalGaussian(NamedTuple):
  """q(z | x) = N(mean, exp(logvar)) per latent element."""

  mean: jax.Array  # [B, h, w, C]
  logvar: jax.Array  # [B, h, w, C], clipped to LOGVAR_RANGE

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """Splits moments [..., 2C] into (mean, logvar) along the last axis (LDM's order)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """mean + std * eps, eps ~ N(0, I) (reparameterised)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over the latent dimensions, averaged over the batch: []."""
    per = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.mean(jnp.sum(per.reshape(per.shape[0], -1), axis=-1))
