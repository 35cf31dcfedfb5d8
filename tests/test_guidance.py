"""Classifier-free guidance wrapper: the formula, one batched call, any integrator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff.diffusion import gaussian as gd
from infdiff.diffusion import guidance
from infdiff.diffusion.sampler import euler_sample, time_grid


def _model(x, t, cond):
  """A nonlinear conditional model with a pytree condition (like (hidden, mask))."""
  h, m = cond["h"], cond["m"]
  scale = (1.0 + t.astype(jnp.float32))[:, None, None, None]
  return jnp.tanh(x * scale + h[:, None, None, :]) * m[:, None, None, None] + 0.1 * x


@pytest.fixture
def inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  b = 4
  x = jax.random.normal(k1, (b, 3, 3, 2))
  t = jnp.arange(b)
  cond = {"h": jax.random.normal(k2, (b, 2)), "m": jnp.ones((b,))}
  uncond = {"h": jax.random.normal(k3, (b, 2)), "m": jnp.zeros((b,))}
  return x, t, cond, uncond


def test_scale_one_is_the_conditional_model(inputs):
  x, t, cond, uncond = inputs
  out = guidance.cfg(_model, 1.0)(x, t, cond, uncond)
  np.testing.assert_allclose(out, _model(x, t, cond), rtol=1e-6, atol=1e-6)
  # Without an unconditional input there is nothing to guide: the conditional model.
  np.testing.assert_array_equal(guidance.cfg(_model, 5.0)(x, t, cond), _model(x, t, cond))


@pytest.mark.parametrize("scale", [0.0, 3.0, [0.0, 1.0, 2.5, 7.0]])
def test_guided_output_formula(inputs, scale):
  x, t, cond, uncond = inputs
  c, u = _model(x, t, cond), _model(x, t, uncond)
  g = np.asarray(scale, np.float32).reshape(-1, 1, 1, 1)
  want = u + g * (c - u)
  out = guidance.cfg(_model, jnp.asarray(scale))(x, t, cond, uncond)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guidance.bind_cfg(_model, scale, cond, uncond)(x, t), out)


def test_one_batched_call_with_conditional_half_first(inputs):
  x, t, cond, uncond = inputs
  seen = []

  def model_fn(x, t, c):
    seen.append((x.shape, t.shape, c["h"].shape))
    return _model(x, t, c)

  guidance.bind_cfg(model_fn, 2.0, cond, uncond)(x, t)
  assert seen == [((8, 3, 3, 2), (8,), (8, 2))]
  # A scalar t is passed through unchanged (models that broadcast it themselves):
  # c = 0.5 + 1, u = 0.5 + 0, guided = u + 2 (c - u) = 2.5.
  fn = guidance.bind_cfg(lambda x, t, c: x * t + c, 2.0, jnp.ones((4, 1)), jnp.zeros((4, 1)))
  np.testing.assert_allclose(fn(jnp.ones((4, 1)), jnp.float32(0.5)), 2.5)


def test_gaussian_sampler_makes_one_model_call_per_step():
  sched = gd.make_schedule("linear", 100)
  traces, calls = [], []

  def model_fn(x, t, label):
    traces.append(x.shape)
    jax.debug.callback(lambda: calls.append(1))
    return 0.1 * x + label[:, None]

  @jax.jit
  def sample(noise, cond, uncond, g):
    fn = guidance.bind_cfg(model_fn, g, cond, uncond)
    return gd.ddim_sample(fn, sched, noise, num_steps=9)

  noise = jnp.ones((3, 2))
  sample(noise, jnp.ones((3,)), jnp.zeros((3,)), 2.0).block_until_ready()
  sample(noise, jnp.ones((3,)), jnp.zeros((3,)), 5.0).block_until_ready()  # no retrace
  assert traces == [(6, 2)] and len(calls) == 18


def test_guided_ddim_on_a_class_conditional_mixture():
  # Exact eps of a 1-D mixture (unconditional) and of its components (conditional):
  # g = 1 samples the chosen component exactly, g > 1 stays on it.
  weights, means, std = jnp.array([0.6, 0.4]), jnp.array([-1.5, 1.5]), 0.3
  sched = gd.make_schedule("cosine", 1000)

  def eps_fn(x, t, label):  # label 2 = unconditional
    a = sched.alphas_cumprod[t][:, None]
    var = a * std**2 + 1.0 - a
    mu = jnp.sqrt(a) * means
    logw = jnp.where(label[:, None] == 2, jnp.log(weights), jnp.log(jax.nn.one_hot(label, 2)))
    resp = jax.nn.softmax(logw - 0.5 * (x - mu) ** 2 / var, -1)
    return jnp.sqrt(1.0 - a) * jnp.sum(resp * (x - mu), -1, keepdims=True) / var

  n = 2000
  noise = jax.random.normal(jax.random.key(1), (n, 1))
  for k in (0, 1):
    for g in (1.0, 3.0):
      fn = guidance.bind_cfg(eps_fn, g, jnp.full((n,), k), jnp.full((n,), 2))
      x = np.asarray(gd.ddim_sample(fn, sched, noise, num_steps=50))[:, 0]
      assert np.mean(np.abs(x - float(means[k])) < 3 * std) > 0.99
      if g == 1.0:
        np.testing.assert_allclose(x.mean(), means[k], atol=0.03)
        np.testing.assert_allclose(x.std(), std, rtol=0.1)


def test_euler_sampler_uses_the_same_guidance(inputs):
  # euler_sample's CFG is exactly bind_cfg's: the same Euler steps with the guided
  # velocity written out by hand agree to float precision.
  x, _, cond, uncond = inputs
  vf = lambda x, t, c: _model(x, (t * 3).astype(jnp.int32), c)
  out = euler_sample(vf, x, num_steps=4, shift=3.0, cfg_scale=2.5, cond=cond, uncond=uncond)
  ts = np.asarray(time_grid(4, 3.0))
  want = x
  for i in range(4):
    tb = jnp.full((4,), ts[i])
    c, u = vf(want, tb, cond), vf(want, tb, uncond)
    want = want + (ts[i + 1] - ts[i]) * (u + 2.5 * (c - u))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
