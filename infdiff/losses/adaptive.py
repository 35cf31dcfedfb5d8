"""Adaptive loss weight from gradient norms at one layer (VQGAN / taming form).

    w = ||d L_a / d theta|| / (||d L_b / d theta|| + eps),   clipped to [0, max_weight],

under stop_gradient, with theta one named layer's kernel. It scales L_b so that both
losses move theta about equally: RaPD Eq. 9 (L_a = reconstruction, L_b = distillation,
theta = the encoder's last conv, eps 1e-6); INFD's generator loss (L_a = L1 + LPIPS,
L_b = the GAN term, theta = the renderer's output conv, eps 1e-4, max 1e4).

Both norms come from one forward pass, whose losses the caller then uses for its total
loss. The forward is split where the two losses part ("features": RaPD's latent z, a
GAN generator's output image): one `jax.vjp` of theta -> features, one of each loss
from the features, and a single batched pullback of the two feature cotangents to theta.
A single `jax.vjp` of theta -> (L_a, L_b) pulled back with (1, 0) and (0, 1) needs the
same forward but sends a zero cotangent through each loss's branch (JAX and XLA do not
drop concrete zeros): for RaPD stage 1 that was a second backward pass through the
renderer, more XLA FLOPs than re-running the forward per loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdaptiveWeight(NamedTuple):
  weight: jax.Array  # [] float32 w, under stop_gradient
  loss_a: jax.Array  # [] L_a of the one forward (differentiable)
  loss_b: jax.Array  # [] L_b of the one forward (differentiable)
  aux: Any  # auxiliary output of features_fn
  aux_a: Any  # auxiliary output of loss_a_fn (e.g. metrics)
  aux_b: Any  # auxiliary output of loss_b_fn


def adaptive_weight(
    features_fn: Callable[[Any], tuple[Any, Any]],
    loss_a_fn: Callable[[Any], tuple[jax.Array, Any]],
    loss_b_fn: Callable[[Any], tuple[jax.Array, Any]],
    theta,
    *,
    eps: float = 1e-6,
    max_weight: float = 1e4,
) -> AdaptiveWeight:
  """The adaptive weight of L_b relative to L_a at theta, and both losses.

  Every input other than theta is closed over by the three functions and stays
  differentiable by an outer `jax.grad`, through `loss_a` and `loss_b` (not `weight`).

  Args:
    features_fn: theta -> (features, aux): the shared forward pass with the layer's
      parameters set to theta, up to where the losses part (any pytree of arrays).
    loss_a_fn: features -> (L_a, aux_a), L_a a scalar.
    loss_b_fn: features -> (L_b, aux_b), L_b a scalar.
    theta: the layer's parameters the gradient norms are taken at (array or pytree).
    eps: added to ||d L_b / d theta|| (RaPD 1e-6, VQGAN/INFD 1e-4).
    max_weight: upper clip of w (VQGAN: 1e4); the lower clip is 0.

  Returns:
    AdaptiveWeight(weight, loss_a, loss_b, aux, aux_a, aux_b).
  """
  features, pull_features, aux = jax.vjp(features_fn, theta, has_aux=True)
  loss_a, pull_a, aux_a = jax.vjp(loss_a_fn, features, has_aux=True)
  loss_b, pull_b, aux_b = jax.vjp(loss_b_fn, features, has_aux=True)
  (ct_a,) = pull_a(jnp.ones_like(loss_a))  # d L_a / d features
  (ct_b,) = pull_b(jnp.ones_like(loss_b))
  # d L_a / d theta and d L_b / d theta: one pullback of the stacked cotangents.
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), ct_a, ct_b)  # leaves [2, ...]
  (grads,) = jax.vmap(pull_features)(stacked)
  norms = jax.vmap(optax.tree.norm)(grads).astype(jnp.float32)  # [2]
  w = jnp.clip(norms[0] / (norms[1] + eps), 0.0, max_weight)
  return AdaptiveWeight(jax.lax.stop_gradient(w), loss_a, loss_b, aux, aux_a, aux_b)
