"""Semantic distillation of a latent against a frozen vision teacher (RaPD Sec. 3.2).

The cosine-margin and distance-matrix-similarity losses (the VA-VAE "VF loss" pair). The
adaptive weight that balances them against reconstruction (RaPD Eq. 9) is
`infdiff.losses.adaptive.adaptive_weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x, eps=1e-6):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def cosine_margin_loss(student, teacher, margin: float):
  """mean_i relu(1 - m1 - cos(h_i, f_i)). student, teacher: [B, N, D]."""
  cos = jnp.sum(_normalize(student) * _normalize(teacher), axis=-1)  # [B, N]
  return jnp.mean(jax.nn.relu(1.0 - margin - cos))


def distance_matrix_loss(student, teacher, margin: float):
  """mean_{i,j} relu(|cos(h_i, h_j) - cos(f_i, f_j)| - m2) over positions of each image."""
  hs, ft = _normalize(student), _normalize(teacher)
  sim_s = jnp.einsum("bnd,bmd->bnm", hs, hs)  # [B, N, N]
  sim_t = jnp.einsum("bnd,bmd->bnm", ft, ft)
  return jnp.mean(jax.nn.relu(jnp.abs(sim_s - sim_t) - margin))


def distill_loss(student, teacher, m1: float = 0.5, m2: float = 0.25):
  """L_distill = L_cos + L_dms; returns (loss, metrics)."""
  l_cos = cosine_margin_loss(student, teacher, m1)
  l_dms = distance_matrix_loss(student, teacher, m2)
  return l_cos + l_dms, {"distill_cos": l_cos, "distill_dms": l_dms}
