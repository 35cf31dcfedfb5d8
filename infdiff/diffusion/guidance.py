"""Classifier-free guidance as a wrapper around any conditional model function.

  out = out_u + g (out_c - out_u)

with out_c the output for the condition, out_u the output for the unconditional input
(the empty text, the null label or code) and g the guidance scale; g = 1 is the plain
conditional model, g = 0 the unconditional one. The combination is linear in the output,
so it applies unchanged to flow velocities (RaPD), eps or v predictions (INFD, Patch-DM)
and x0 predictions; integrators never see it (`sampler.euler_sample` and the samplers in
`infdiff.diffusion.gaussian` take the guided function like any other model).

The conditional and unconditional inputs are concatenated along the batch and evaluated
in ONE model call of batch 2B, so a sampler makes one call per step whatever g is
(a traced g does not retrace). Passing uncond=None turns guidance off and keeps batch B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CondModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def combine(out_c: jax.Array, out_u: jax.Array, scale) -> jax.Array:
  """out_u + g (out_c - out_u) in float32; scale g is a scalar or per-sample [B]."""
  out_c, out_u = out_c.astype(jnp.float32), out_u.astype(jnp.float32)
  g = jnp.asarray(scale, jnp.float32)
  g = g.reshape(g.shape + (1,) * (out_c.ndim - g.ndim))
  return out_u + g * (out_c - out_u)


def bind_cfg(
    model_fn: CondModelFn, scale, cond: Any, uncond: Any = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Guided `(x, t) -> out` closing over the conditioning, for the `(x, t)` samplers.

  cond and uncond are concatenated here, once, so a sampler loop that calls the result
  at every step does not re-concatenate them.

  Args:
    model_fn: `(x [B, ...], t [B] or scalar, cond) -> out [B, ...]`.
    scale: guidance scale g, scalar or [B] (may be traced), or a function of the time t
      the guided function is called with (a guidance schedule, e.g. an interval).
    cond: conditioning pytree, every leaf with batch B first.
    uncond: unconditional pytree of the same structure and shapes, or None for plain
      conditional evaluation (batch B, no guidance).

  Returns:
    `fn(x [B, ...], t) -> out [B, ...]` float32: one call of model_fn per call, with
    batch 2B (conditional half first) when uncond is given.
  """
  if uncond is None:
    return lambda x, t: model_fn(x, t, cond).astype(jnp.float32)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def guided(x, t):
    t = jnp.asarray(t)
    t2 = t if t.ndim == 0 else jnp.concatenate([t, t], axis=0)
    out = model_fn(jnp.concatenate([x, x], axis=0), t2, both)
    out_c, out_u = jnp.split(out, 2, axis=0)
    return combine(out_c, out_u, scale(t) if callable(scale) else scale)

  return guided


def cfg(model_fn: CondModelFn, scale) -> Callable[..., jax.Array]:
  """Classifier-free guidance around a conditional model function.

  Args:
    model_fn: `(x [B, ...], t [B] or scalar, cond) -> out [B, ...]`.
    scale: guidance scale g, scalar or [B] (may be traced).

  Returns:
    `fn(x, t, cond, uncond=None) -> out_u + g (out_c - out_u)` float32 [B, ...], one
    model_fn call of batch 2B; with uncond=None, the conditional output (batch B).
  """

  def guided(x, t, cond, uncond=None):
    return bind_cfg(model_fn, scale, cond, uncond)(x, t)

  return guided
