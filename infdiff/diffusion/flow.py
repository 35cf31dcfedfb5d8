"""Rectified flow matching in the convention t = 0 noise, t = 1 data (RaPD Eq. 1, 7, 10).

  x_t = t * x_1 + (1 - t) * eps,   eps ~ N(0, I),   target velocity v = x_1 - eps.

Training times are logit-normal, `t = sigmoid(n)`, n ~ N(mu, sigma), then shifted by
`t' = t / (t + s (1 - t))`; s > 1 moves mass toward heavy noise (small t), which the
dense NIF latent needs (s = 32 in RaPD, Table 5). The sampler uses the same shift on its
time grid (`infdiff.diffusion.sampler`).

Caption dropout: a dropped sample gets the empty text, i.e. all of its text tokens are
padding (`mask * keep[:, None]`). Sampling uses the same empty text as the
unconditional branch of CFG, so no learned null embedding is needed and the two stay
consistent by construction.

All functions are pure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_normal_t(rng: jax.Array, shape, mu: float = 0.0, sigma: float = 1.0) -> jax.Array:
  """t = sigmoid(n), n ~ N(mu, sigma^2). Returns float32 of `shape`, in (0, 1)."""
  return jax.nn.sigmoid(mu + sigma * jax.random.normal(rng, shape, jnp.float32))


def shift_t(t, s):
  """Timestep shift `t / (t + s (1 - t))` (SD3's shift with t = 1 as data).

  Monotone on [0, 1], fixes 0 and 1, identity for s = 1; s > 1 pushes t toward 0
  (more noise).
  """
  return t / (t + s * (1.0 - t))


def sample_train_t(
    rng: jax.Array, shape, mu: float = 0.0, sigma: float = 1.0, shift: float = 1.0
) -> jax.Array:
  """Training times: shifted logit-normal. Returns float32 of `shape`."""
  return shift_t(logit_normal_t(rng, shape, mu, sigma), shift)


def _bcast(t, x):
  """Reshapes per-sample t [B] to broadcast against x [B, ...]."""
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x1, eps, t):
  """x_t = t * x1 + (1 - t) * eps, with t [B] (or scalar) broadcast over x1 [B, ...]."""
  t = _bcast(t, x1)
  return t * x1 + (1.0 - t) * eps


def velocity_target(x1, eps):
  """The conditional velocity d x_t / dt = x1 - eps."""
  return x1 - eps


PREDICTIONS = ("v", "x")


def velocity_from_output(out, xt, t, predict: str = "v", t_max: float = 0.95):
  """The velocity implied by a denoiser output.

  'v': the output is the velocity (RaPD). 'x': the output is the clean data x_1 (Li & He
  2025, "Back to Basics: Let Denoising Generative Models Denoise"), and the velocity is
  (x_1_hat - x_t) / (1 - t), with 1 - t clipped below at 1 - t_max so the division stays
  bounded near the data end. Training and sampling both go through this function, so the
  loss stays a velocity loss whatever the network predicts.

  Args:
    out: [B, ...] denoiser output.
    xt: [B, ...] its input.
    t: [B] (or scalar) time, t = 1 is data.
    predict: 'v' or 'x'.
    t_max: the clip for 'x'.

  Returns:
    v [B, ...] float32.
  """
  if predict == "v":
    return out.astype(jnp.float32)
  if predict == "x":
    one_minus_t = jnp.maximum(1.0 - _bcast(t, xt).astype(jnp.float32), 1.0 - t_max)
    return (out.astype(jnp.float32) - xt.astype(jnp.float32)) / one_minus_t
  raise ValueError(f"unknown flow prediction {predict!r}; use one of {PREDICTIONS}")


def flow_matching_loss(v_pred, x1, eps, mask=None):
  """Mean squared velocity error against x1 - eps (RaPD Eq. 10), in float32.

  The mean is over all elements (a per-element mean keeps the loss scale independent of
  the latent size, so loss weights such as REPA's 0.5 do not need retuning per size).

  Args:
    v_pred: [B, ...] predicted velocity.
    x1: [B, ...] data.
    eps: [B, ...] noise.
    mask: optional weights broadcastable to x1 after right-padding its shape, e.g. [B]
      per-sample or [B, h, w, 1] per-position; the loss is then the weighted mean.

  Returns:
    Scalar loss.
  """
  err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x1, eps).astype(jnp.float32))
  if mask is None:
    return jnp.mean(err)
  w = jnp.broadcast_to(_bcast(mask, err), err.shape)
  return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1e-8)


def drop_text(rng: jax.Array, mask_or_ids, p: float) -> jax.Array:
  """Caption dropout for classifier-free guidance.

  Args:
    rng: key.
    mask_or_ids: [B, ...] any per-sample array (only the batch size is used).
    p: probability of dropping a sample's text (0.1 in RaPD, a choice).

  Returns:
    keep [B] bool. Apply it as `text_mask * keep[:, None]`: a dropped sample's text is
    all padding, the same empty text that the sampler passes as the unconditional input.
  """
  return jax.random.uniform(rng, (mask_or_ids.shape[0],)) >= p


def repa_loss(proj_feats, target_feats, weights=None):
  """REPA alignment: negative mean cosine similarity over batch and tokens.

  Args:
    proj_feats: [B, N, D] projected denoiser features.
    target_feats: [B, N, D] frozen teacher features (no gradient flows into them).
    weights: optional [B, N] non-negative token weights; the mean is then weighted.

  Returns:
    Scalar in [-1, 1]; -1 when every (weighted) token is aligned.
  """
  a = proj_feats.astype(jnp.float32)
  b = jax.lax.stop_gradient(target_feats).astype(jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-6)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-6)
  cos = jnp.sum(a * b, axis=-1)  # [B, N]
  if weights is None:
    return -jnp.mean(cos)
  w = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
  return -jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1e-8)
