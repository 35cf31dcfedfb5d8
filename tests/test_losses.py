"""The adaptive loss weight (infdiff.losses.adaptive): value, clipping, stop-gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infdiff.losses import adaptive

_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.normal(size=(6, 3)), jnp.float32)  # inputs [N, 3]
PARAMS = {
    "w1": jnp.asarray(_RNG.normal(size=(3, 4)), jnp.float32),  # the layer theta
    "w2": jnp.asarray(_RNG.normal(size=(4, 2)), jnp.float32),  # after it, branch a
    "w3": jnp.asarray(_RNG.normal(size=(4, 5)), jnp.float32),  # after it, branch b
}


def _features(p, theta):
  return jnp.tanh(X @ theta), {"mean": jnp.mean(X @ theta)}  # [N, 4]


def _loss_a(p, h):
  return jnp.mean(jnp.sin(h @ p["w2"]) ** 2), {"a": 1.0}


def _loss_b(p, h):
  return jnp.mean(jnp.abs(h @ p["w3"] - 0.3)), {"b": 2.0}


def _weight(p, **kw):
  return adaptive.adaptive_weight(
      lambda t: _features(p, t),
      lambda h: _loss_a(p, h),
      lambda h: _loss_b(p, h),
      p["w1"],
      **kw,
  )


def test_equals_two_pass_gradient_norms():
  p = PARAMS
  out = _weight(p, eps=1e-4)
  # Two passes, the way it is usually written: jax.grad of each loss through the model.
  g_a = jax.grad(lambda t: _loss_a(p, _features(p, t)[0])[0])(p["w1"])
  g_b = jax.grad(lambda t: _loss_b(p, _features(p, t)[0])[0])(p["w1"])
  want = optax.tree.norm(g_a) / (optax.tree.norm(g_b) + 1e-4)
  assert 0.0 < float(want) < 1e4  # not clipped: the comparison is of the ratio itself
  assert float(out.weight) == pytest.approx(float(want), rel=1e-5)
  # The returned losses and aux are those of the one forward.
  h, aux = _features(p, p["w1"])
  assert float(out.loss_a) == pytest.approx(float(_loss_a(p, h)[0]), rel=1e-6)
  assert float(out.loss_b) == pytest.approx(float(_loss_b(p, h)[0]), rel=1e-6)
  assert float(out.aux["mean"]) == pytest.approx(float(aux["mean"]), rel=1e-6)
  assert out.aux_a == {"a": 1.0} and out.aux_b == {"b": 2.0}


def test_pytree_theta_matches_the_global_norm():
  p = PARAMS
  theta = {"kernel": p["w1"], "bias": jnp.full((4,), 0.1)}
  feats = lambda t: (jnp.tanh(X @ t["kernel"] + t["bias"]), None)
  out = adaptive.adaptive_weight(feats, lambda h: _loss_a(p, h), lambda h: _loss_b(p, h), theta)
  g_a = jax.grad(lambda t: _loss_a(p, feats(t)[0])[0])(theta)
  g_b = jax.grad(lambda t: _loss_b(p, feats(t)[0])[0])(theta)
  want = optax.tree.norm(g_a) / (optax.tree.norm(g_b) + 1e-6)
  assert float(out.weight) == pytest.approx(float(want), rel=1e-5)


def test_clipped_at_zero_and_at_the_maximum():
  p = PARAMS
  theta = p["w1"]
  feats = lambda t: (jnp.tanh(X @ t), None)
  depends = lambda h: (jnp.mean(h**2), None)
  constant = lambda h: (jnp.sum(p["w2"]) + 0.0 * jnp.sum(jax.lax.stop_gradient(h)), None)
  # L_a does not move theta: w is exactly 0, the lower clip.
  w0 = adaptive.adaptive_weight(feats, constant, depends, theta).weight
  assert float(w0) == 0.0
  # L_b does not move theta: ||g_a|| / eps is far above the clip, which holds it at max.
  unclipped = float(optax.tree.norm(jax.grad(lambda t: depends(feats(t)[0])[0])(theta))) / 1e-6
  assert unclipped > 1e4
  w_max = adaptive.adaptive_weight(feats, depends, constant, theta).weight
  assert float(w_max) == 1e4
  w_cfg = adaptive.adaptive_weight(feats, depends, constant, theta, max_weight=7.0).weight
  assert float(w_cfg) == 7.0


def test_weight_is_stop_gradient():
  def weight_of(p):
    return _weight(p).weight

  grads = jax.grad(weight_of)(PARAMS)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  # The losses themselves keep their gradients to theta and the closed-over parameters.
  g_loss = jax.grad(lambda p: _weight(p).loss_a + _weight(p).loss_b)(PARAMS)
  want = jax.grad(
      lambda p: _loss_a(p, _features(p, p["w1"])[0])[0] + _loss_b(p, _features(p, p["w1"])[0])[0]
  )(PARAMS)
  for k in PARAMS:
    np.testing.assert_allclose(g_loss[k], want[k], rtol=1e-5, atol=1e-7)


def test_reconstruction_term_known_answers_and_bad_kind():
  import ml_collections

  from infdiff.losses.perceptual import LPIPSTerm

  term = LPIPSTerm(ml_collections.ConfigDict({"lpips_weight": 0.0}), "vae", training=True)
  pred = jnp.zeros((1, 2, 2, 3))
  target = jnp.full((1, 2, 2, 3), 0.5).at[0, 0, 0, 0].set(1.0)  # errors 0.5 x 11, 1.0 x 1
  l1, m1 = term.reconstruction({}, pred, target, "l1")
  l2, m2 = term.reconstruction({}, pred, target, "l2")
  # On the [-1, 1] scale: |2 e| and (2 e)^2 averaged over the 12 values.
  np.testing.assert_allclose(l1, 2 * (11 * 0.5 + 1.0) / 12, rtol=1e-6)
  np.testing.assert_allclose(l2, 4 * (11 * 0.25 + 1.0) / 12, rtol=1e-6)
  assert set(m1) == {"l1"} and set(m2) == {"l2"}
  assert term.with_l1({}, pred, target)[0] == l1
  with pytest.raises(ValueError, match="must be 'l1' or 'l2'"):
    term.reconstruction({}, pred, target, "huber")
