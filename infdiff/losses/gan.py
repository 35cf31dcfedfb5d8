"""Adversarial losses on discriminator logits (pure functions; VQGAN / LDM forms).

The adaptive weight of the generator term (VQGAN's `calculate_adaptive_weight`) is
`infdiff.losses.adaptive.adaptive_weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss `0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))`."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator adversarial loss `-mean D(fake)` (the hinge GAN's generator term)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def gan_active(step, start: int) -> jax.Array:
  """1.0 from `step >= start` on, else 0.0 (VQGAN's `adopt_weight`); `step` may be traced."""
  return (jnp.asarray(step) >= start).astype(jnp.float32)
