"""Flow-matching math, the Euler/CFG sampler, and an end-to-end 2-D mixture check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infdiff.diffusion import flow
from infdiff.diffusion.sampler import euler_sample, time_grid


def test_shift_known_values_and_properties():
  np.testing.assert_allclose(flow.shift_t(0.5, 3.0), 0.25, rtol=1e-6)
  np.testing.assert_allclose(flow.shift_t(0.5, 32.0), 1.0 / 33.0, rtol=1e-6)
  np.testing.assert_allclose(flow.shift_t(0.8, 4.0), 0.8 / (0.8 + 0.8), rtol=1e-6)
  t = jnp.linspace(0.0, 1.0, 101)
  for s in (0.5, 1.0, 3.0, 32.0):
    st = flow.shift_t(t, s)
    assert float(st[0]) == 0.0 and float(st[-1]) == 1.0
    assert np.all(np.diff(np.asarray(st)) > 0)
  np.testing.assert_allclose(flow.shift_t(t, 1.0), t, atol=1e-7)
  # s > 1 moves every interior time toward noise, and more so for larger s.
  inner = t[1:-1]
  assert np.all(flow.shift_t(inner, 3.0) < inner)
  assert np.all(flow.shift_t(inner, 32.0) < flow.shift_t(inner, 3.0))
  samples = flow.sample_train_t(jax.random.key(0), (20000,), shift=32.0)
  assert float(jnp.median(samples)) < 0.05  # logit-normal median 0.5 -> 1/33
  assert float(jnp.min(samples)) > 0.0 and float(jnp.max(samples)) < 1.0


def test_time_grid():
  ts = time_grid(25, 32.0)
  assert ts.shape == (26,)
  assert float(ts[0]) == 0.0 and float(ts[-1]) == 1.0
  assert np.all(np.diff(np.asarray(ts)) > 0)
  np.testing.assert_allclose(time_grid(4, 1.0), [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)


def test_interpolate_and_loss():
  k1, k2 = jax.random.split(jax.random.key(1))
  x1 = jax.random.normal(k1, (3, 4, 4, 2))
  eps = jax.random.normal(k2, (3, 4, 4, 2))
  t = jnp.array([0.0, 0.5, 1.0])
  xt = flow.interpolate(x1, eps, t)
  np.testing.assert_allclose(xt[0], eps[0], atol=1e-6)
  np.testing.assert_allclose(xt[1], 0.5 * (x1[1] + eps[1]), atol=1e-6)
  np.testing.assert_allclose(xt[2], x1[2], atol=1e-6)
  assert float(flow.flow_matching_loss(x1 - eps, x1, eps)) == 0.0
  # A constant error of 1 on sample 0 only: per-sample mask picks it out.
  v = (x1 - eps).at[0].add(1.0)
  np.testing.assert_allclose(flow.flow_matching_loss(v, x1, eps), 1.0 / 3.0, rtol=1e-5)
  np.testing.assert_allclose(flow.flow_matching_loss(v, x1, eps, jnp.array([1, 0, 0])), 1.0)
  np.testing.assert_allclose(flow.flow_matching_loss(v, x1, eps, jnp.array([0, 1, 1])), 0.0)


def test_velocity_from_x_prediction():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x1 = jax.random.normal(k1, (4, 3, 3, 2))
  eps = jax.random.normal(k2, x1.shape)
  t = jnp.array([0.0, 0.3, 0.9, 0.99])
  xt = flow.interpolate(x1, eps, t)
  # 'v' passes the output through; 'x' given the true x1 gives the true velocity x1 - eps
  # wherever t <= t_max, and divides by 1 - t_max beyond it.
  out = jax.random.normal(k3, x1.shape)
  np.testing.assert_array_equal(flow.velocity_from_output(out, xt, t, "v"), out)
  v = flow.velocity_from_output(x1, xt, t, "x", t_max=0.95)
  np.testing.assert_allclose(v[:3], (x1 - eps)[:3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(v[3], (x1[3] - xt[3]) / 0.05, rtol=1e-4, atol=1e-5)
  assert float(flow.flow_matching_loss(v[:3], x1[:3], eps[:3])) < 1e-8
  with pytest.raises(ValueError, match="unknown flow prediction 'eps'"):
    flow.velocity_from_output(out, xt, t, "eps")


def test_drop_text_rate():
  keep = flow.drop_text(jax.random.key(2), jnp.zeros((10000, 7)), 0.1)
  assert keep.shape == (10000,) and keep.dtype == jnp.bool_
  assert abs(float(jnp.mean(keep)) - 0.9) < 0.02
  assert bool(jnp.all(flow.drop_text(jax.random.key(3), jnp.zeros((64,)), 0.0)))


def test_repa_loss():
  a = jax.random.normal(jax.random.key(4), (2, 5, 8))
  np.testing.assert_allclose(flow.repa_loss(a, 3.0 * a), -1.0, atol=1e-6)
  np.testing.assert_allclose(flow.repa_loss(a, -a), 1.0, atol=1e-6)
  b = jax.random.normal(jax.random.key(5), (2, 5, 8))
  assert -1.0 < float(flow.repa_loss(a, b)) < 1.0
  grad_target = jax.grad(lambda y: flow.repa_loss(a, y))(b)
  assert float(jnp.abs(grad_target).max()) == 0.0  # the teacher is frozen


def test_repa_loss_token_weights():
  # Token 0 aligned, token 1 opposite: weights pick the mean of the cosines they select.
  a = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  b = jnp.array([[[2.0, 0.0], [0.0, -1.0]]])
  np.testing.assert_allclose(flow.repa_loss(a, b), 0.0, atol=1e-6)
  np.testing.assert_allclose(flow.repa_loss(a, b, jnp.array([[1.0, 0.0]])), -1.0, atol=1e-6)
  np.testing.assert_allclose(flow.repa_loss(a, b, jnp.array([[3.0, 1.0]])), -0.5, atol=1e-6)


def test_euler_cfg_exact_on_constant_velocity():
  # With a time-independent velocity the Euler steps sum to exactly one unit of time.
  def velocity_fn(x, t, cond):
    assert x.shape[0] == t.shape[0] == cond.shape[0]
    return jnp.broadcast_to(cond[:, None, None, None], x.shape)

  noise = jax.random.normal(jax.random.key(6), (2, 4, 4, 3))
  cond, uncond = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
  out = euler_sample(velocity_fn, noise, num_steps=7, shift=32.0, cond=cond)
  np.testing.assert_allclose(out, noise + cond[:, None, None, None], atol=1e-5)
  g = 3.0
  out = euler_sample(
      velocity_fn, noise, num_steps=7, shift=32.0, cfg_scale=g, cond=cond, uncond=uncond
  )
  want = uncond + g * (cond - uncond)
  np.testing.assert_allclose(out, noise + want[:, None, None, None], atol=1e-5)


def test_euler_cfg_interval_guides_only_inside_it():
  # Constant velocities: the result is noise + the sum over steps of (step length) x
  # (guided velocity), with g inside [lo, hi] and g = 1 (the conditional velocity) outside.
  def velocity_fn(x, t, cond):
    return jnp.broadcast_to(cond[:, None], x.shape)

  noise = jnp.zeros((2, 3))
  cond, uncond = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
  g, lo, hi = 3.0, 0.25, 0.6
  kw = dict(num_steps=10, shift=1.0, cfg_scale=g, cond=cond, uncond=uncond)
  out = euler_sample(velocity_fn, noise, cfg_interval=(lo, hi), **kw)
  ts = np.linspace(0.0, 1.0, 11)[:-1]  # step start times; each step is 0.1 long
  inside = float(np.sum((ts >= lo - 1e-6) & (ts <= hi + 1e-6)) * 0.1)  # 0.3, 0.4, 0.5, 0.6
  want = cond + inside * (g - 1.0) * (cond - uncond)
  np.testing.assert_allclose(out, np.broadcast_to(want[:, None], (2, 3)), atol=1e-5)
  # The whole range is plain CFG; an interval no step starts in is conditional sampling.
  full = euler_sample(velocity_fn, noise, cfg_interval=(0.0, 1.0), **kw)
  np.testing.assert_allclose(full, euler_sample(velocity_fn, noise, **kw), atol=1e-6)
  none = euler_sample(velocity_fn, noise, cfg_interval=(2.0, 3.0), **kw)
  np.testing.assert_allclose(none, np.broadcast_to(cond[:, None], (2, 3)), atol=1e-5)


def _gaussian_velocity(s2):
  """Exact velocity when the data is N(0, s2): x1_hat = E[x1 | x_t], eps_hat from x_t."""

  def velocity_fn(x, t, cond):
    del cond
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    x1 = t * s2 * x / (t**2 * s2 + (1.0 - t) ** 2)
    return x1 - (x - t * x1) / (1.0 - t)

  return velocity_fn


def test_stochastic_steps_keep_the_distribution_and_batch_independence():
  s2 = 0.25
  velocity_fn = _gaussian_velocity(s2)
  n = 4000
  noise = jax.random.normal(jax.random.key(7), (n, 1))
  keys = jax.random.split(jax.random.key(8), n)
  kw = dict(num_steps=200, shift=1.0)
  ode = euler_sample(velocity_fn, noise, **kw)
  np.testing.assert_allclose(ode, euler_sample(velocity_fn, noise, eta=0.0, keys=keys, **kw))
  sde = euler_sample(velocity_fn, noise, eta=1.0, keys=keys, **kw)
  for out in (ode, sde):
    assert abs(float(jnp.var(out)) - s2) < 0.025  # 4000 samples: std error of var ~ 0.006
  # Stochastic: the noise moved the samples (an ODE is a deterministic map of noise).
  assert float(jnp.mean(jnp.abs(sde - ode))) > 0.1
  # Sample i's result depends only on its own noise and key, not on the batch.
  part = euler_sample(velocity_fn, noise[5:9], eta=1.0, keys=keys[5:9], **kw)
  np.testing.assert_allclose(part, sde[5:9], atol=1e-5)
  # A point mass at c: x1_hat = c at every step, so any eta ends exactly at c.
  c = 0.7
  point = lambda x, t, cond: (c - x) / (1.0 - t.reshape((-1, 1)))
  out = euler_sample(point, noise[:16], num_steps=5, shift=3.0, eta=0.5, keys=keys[:16])
  np.testing.assert_allclose(out, c, atol=1e-5)
  with pytest.raises(ValueError, match="needs per-sample keys"):
    euler_sample(velocity_fn, noise, eta=1.0, **kw)


def test_euler_traces_denoiser_once_and_calls_it_num_steps_times():
  traces, calls, times = [], [], []

  def record(t):
    calls.append(1)
    times.append(float(t[0]))

  def velocity_fn(x, t, cond):
    traces.append(x.shape)
    jax.debug.callback(record, t)
    return -x + cond[:, None]

  sample = jax.jit(
      lambda n, c, u, g: euler_sample(
          velocity_fn, n, num_steps=5, shift=2.0, cfg_scale=g, cond=c, uncond=u
      )
  )
  noise = jnp.ones((3, 2))
  c, u = jnp.zeros((3,)), jnp.ones((3,))
  sample(noise, c, u, 2.0).block_until_ready()
  sample(noise, c, u, 4.0).block_until_ready()  # a new guidance scale: no retrace
  assert traces == [(6, 2)]  # one trace, cond and uncond batched together
  assert len(calls) == 10
  np.testing.assert_allclose(times[:5], np.asarray(time_grid(5, 2.0))[:-1], rtol=1e-6)


class _MixtureVelocity(nn.Module):
  """Tiny class-conditional velocity MLP; label `classes` is the null label."""

  classes: int = 3
  hidden: int = 128

  @nn.compact
  def __call__(self, x, t, label):
    freqs = jnp.arange(1, 9, dtype=jnp.float32) * jnp.pi
    temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    lemb = nn.Embed(self.classes + 1, 32)(label)
    h = jnp.concatenate([x, temb, lemb], -1)
    for _ in range(3):
      h = nn.silu(nn.Dense(self.hidden)(h))
    return nn.Dense(2)(h)


_MEANS = np.array([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]], np.float32)
_WEIGHTS = np.array([0.5, 0.3, 0.2], np.float32)
_STD = 0.3


def _nearest(x):
  d = np.linalg.norm(np.asarray(x)[:, None] - _MEANS[None], axis=-1)
  return np.argmin(d, axis=1)


def _train_mixture(shift: float = 1.0, scale: float = 1.0):
  """Trains _MixtureVelocity on the mixture times `scale`, at times shifted by `shift`."""
  model = _MixtureVelocity()
  null = model.classes
  batch, steps = 512, 3000
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), int))
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.05))

  def loss_fn(params, rng):
    kc, kn, ke, kt, kd = jax.random.split(rng, 5)
    label = jax.random.choice(kc, 3, (batch,), p=jnp.asarray(_WEIGHTS))
    x1 = scale * (jnp.asarray(_MEANS)[label] + _STD * jax.random.normal(kn, (batch, 2)))
    eps = jax.random.normal(ke, (batch, 2))
    t = flow.sample_train_t(kt, (batch,), shift=shift)
    keep = flow.drop_text(kd, label, 0.2)
    v = model.apply(params, flow.interpolate(x1, eps, t), t, jnp.where(keep, label, null))
    return flow.flow_matching_loss(v, x1, eps)

  @jax.jit
  def train(params, rng):
    def step(carry, i):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(rng, i))
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
    return params, losses

  params, losses = train(params, jax.random.key(1))
  assert float(losses[-200:].mean()) < float(losses[:200].mean())
  return model, params


@pytest.fixture(scope="module")
def mixture_model():
  return _train_mixture()


def test_flow_matching_reproduces_mixture_weights(mixture_model):
  model, params = mixture_model
  n = 4000
  fn = lambda x, t, c: model.apply(params, x, t, c)
  sample = jax.jit(lambda noise, c: euler_sample(fn, noise, num_steps=50, shift=1.0, cond=c))
  noise = jax.random.normal(jax.random.key(7), (n, 2))
  x = sample(noise, jnp.full((n,), model.classes))
  freq = np.bincount(_nearest(x), minlength=3) / n
  np.testing.assert_allclose(freq, _WEIGHTS, atol=0.05)
  # The samples sit on the components, not between them.
  dist = np.linalg.norm(np.asarray(x) - _MEANS[_nearest(x)], axis=-1)
  assert np.mean(dist < 3 * _STD) > 0.9


def test_flow_matching_cfg_selects_class(mixture_model):
  model, params = mixture_model
  n = 1000
  fn = lambda x, t, c: model.apply(params, x, t, c)
  noise = jax.random.normal(jax.random.key(8), (n, 2))
  for k in range(3):
    x = euler_sample(
        fn,
        noise,
        num_steps=50,
        shift=1.0,
        cfg_scale=2.0,
        cond=jnp.full((n,), k),
        uncond=jnp.full((n,), model.classes),
    )
    assert np.mean(_nearest(x) == k) > 0.95


def test_flow_matching_with_shift_32_reproduces_mixture_weights():
  # RaPD's shift s = 32 end to end: shifted logit-normal training times and the Euler
  # sampler's shifted grid (25 steps, as RaPD samples). A shift divides the
  # signal-to-noise ratio t^2 / (1 - t)^2 by s^2 and scaling the data by c multiplies it
  # by c^2, so s = 32 is the matched shift for data of scale 32 (the role of the dense
  # high-resolution latent). On the unit-scale mixture s = 32 leaves almost no training
  # times near the data (P(t' > 0.6) ~ 5e-5) and the learned flow misses the components.
  scale = 32.0
  model, params = _train_mixture(shift=32.0, scale=scale)
  n = 4000
  fn = lambda x, t, c: model.apply(params, x, t, c)
  noise = jax.random.normal(jax.random.key(9), (n, 2))
  null = jnp.full((n,), model.classes)
  sample = jax.jit(lambda z, c, s: euler_sample(fn, z, num_steps=25, shift=s, cond=c))
  x = np.asarray(sample(noise, null, 32.0)) / scale
  freq = np.bincount(_nearest(x), minlength=3) / n
  np.testing.assert_allclose(freq, _WEIGHTS, atol=0.05)
  on_component = lambda x: np.mean(np.linalg.norm(x - _MEANS[_nearest(x)], axis=-1) < 3 * _STD)
  assert on_component(x) > 0.9
  # The sampler's grid must carry the training shift: the unshifted grid puts its steps
  # where the model was barely trained and lands far fewer samples on the components.
  assert on_component(np.asarray(sample(noise, null, 1.0)) / scale) < 0.8
