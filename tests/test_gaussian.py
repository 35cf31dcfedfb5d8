"""Gaussian diffusion: schedules, q_sample, parameterisations, losses, DDPM/DDIM, inversion.

The samplers are checked end to end with the exact eps of a noised 1-D Gaussian mixture
as the model (as tests/test_flow.py does with a learned velocity): any error in the
posterior, the DDIM update or a parameterisation shows up as wrong weights or moments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff.diffusion import gaussian as gd

_INFD = dict(beta_start=0.0015, beta_end=0.0195)


@pytest.fixture(scope="module")
def infd_schedule():
  return gd.make_schedule("linear", 1000, **_INFD)


# --- schedules -------------------------------------------------------------------------
def test_linear_schedules_endpoints_and_monotone():
  for (b0, b1), sched in [
      ((0.0015, 0.0195), gd.make_schedule("linear", 1000, **_INFD)),
      ((1e-4, 0.02), gd.make_schedule("linear", 1000)),  # Patch-DM / DDPM defaults
  ]:
    betas, abar = np.asarray(sched.betas), np.asarray(sched.alphas_cumprod)
    assert sched.num_steps == 1000 and betas.dtype == abar.dtype == np.float32
    np.testing.assert_allclose([betas[0], betas[-1]], [b0, b1], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), (b1 - b0) / 999, rtol=1e-3)
    np.testing.assert_allclose(abar[0], 1.0 - b0, rtol=1e-6)
    np.testing.assert_allclose(abar, np.cumprod(1.0 - np.linspace(b0, b1, 1000)), rtol=1e-5)
    assert np.all(np.diff(abar) < 0) and 0.0 < abar[-1] < 1e-4


def test_cosine_and_constant_schedules():
  sched = gd.make_schedule("cosine", 1000)
  betas, abar = np.asarray(sched.betas), np.asarray(sched.alphas_cumprod)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  # Unclipped, abar_t is f((t + 1) / T) / f(0); only the last beta hits the 0.999 clip.
  t = np.arange(990)
  np.testing.assert_allclose(abar[t], f((t + 1) / 1000) / f(0.0), rtol=1e-4, atol=1e-7)
  assert betas[-1] == np.float32(0.999) and np.all(betas[:-1] < 0.999)
  assert np.all(np.diff(betas) > 0) and np.all(np.diff(abar) < 0)
  const = gd.make_schedule("constant", 1000, beta=0.008)
  np.testing.assert_allclose(const.betas, 0.008)
  np.testing.assert_allclose(const.alphas_cumprod, 0.992 ** np.arange(1, 1001), rtol=1e-4)


def test_unknown_names_are_one_line_value_errors():
  with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'") as e:
    gd.make_schedule("quadratic", 10)
  assert "\n" not in str(e.value)
  sched = gd.make_schedule("linear", 10)
  with pytest.raises(ValueError, match="unknown parameterization"):
    gd.to_x0_eps(sched, jnp.zeros((1, 2)), jnp.zeros((1,), int), jnp.zeros((1, 2)), "score")
  with pytest.raises(ValueError, match="unknown loss"):
    gd.regression_loss(jnp.zeros((1,)), jnp.zeros((1,)), "huber")
  with pytest.raises(ValueError):
    gd.schedule_from_betas(np.array([0.1, 1.5]))


def test_ddim_timesteps():
  ts = gd.ddim_timesteps(1000, 200)
  assert ts.shape == (200,) and ts[0] == 999 and ts[-1] == 0
  assert np.all(np.diff(ts) < 0)  # strictly decreasing: no level visited twice
  assert np.all(np.abs(np.diff(ts) + 999 / 199) < 1)  # evenly spaced up to rounding
  np.testing.assert_array_equal(gd.ddim_timesteps(7, 7), np.arange(6, -1, -1))
  np.testing.assert_array_equal(gd.ddim_timesteps(1000, 1), [999])
  for n in range(1, 38):
    assert len(np.unique(gd.ddim_timesteps(37, n))) == n
  with pytest.raises(ValueError):
    gd.ddim_timesteps(10, 11)


# --- q_sample, parameterisations, losses ------------------------------------------------
def test_q_sample_moments(infd_schedule):
  n = 20000
  t = jnp.array([0, 100, 500, 999])
  x0 = jnp.array([[1.5, -2.0], [1.5, -2.0], [0.7, 3.0], [0.7, 3.0]])
  noise = jax.random.normal(jax.random.key(0), (n,) + x0.shape)
  xt = jax.vmap(lambda z: gd.q_sample(infd_schedule, x0, t, z))(noise)  # [n, 4, 2]
  abar = np.asarray(infd_schedule.alphas_cumprod)[np.asarray(t)][:, None]
  mean, var = np.sqrt(abar) * np.asarray(x0), np.broadcast_to(1.0 - abar, x0.shape)
  se = np.sqrt(var / n)
  assert np.all(np.abs(np.asarray(xt.mean(0)) - mean) < 4.5 * se)
  np.testing.assert_allclose(np.asarray(xt.var(0)), var, rtol=0.05)


def test_parameterizations_round_trip(infd_schedule):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  b = 64
  x0 = jax.random.normal(k1, (b, 3, 3, 2))
  eps = jax.random.normal(k2, (b, 3, 3, 2))
  t = jax.random.randint(k3, (b,), 0, 1000).at[:2].set(jnp.array([0, 999]))
  xt = gd.q_sample(infd_schedule, x0, t, eps)
  a = np.sqrt(np.asarray(infd_schedule.alphas_cumprod, np.float64)[np.asarray(t)])
  a = a[:, None, None, None]
  v_ref = a * np.asarray(eps) - np.sqrt(1 - a**2) * np.asarray(x0)
  np.testing.assert_allclose(gd.model_target(infd_schedule, x0, eps, t, "v"), v_ref, atol=1e-6)
  for p in gd.PARAMETERIZATIONS:
    out = gd.model_target(infd_schedule, x0, eps, t, p)
    x0_hat, eps_hat = gd.to_x0_eps(infd_schedule, xt, t, out, p)
    # 'eps' divides by sqrt(abar) ~ 5e-3 at t = 999 and 'x0' by sqrt(1 - abar) ~ 4e-2
    # at t = 0, which amplifies float32 rounding of x_t; hence 1e-3, not 1e-6.
    np.testing.assert_allclose(x0_hat, x0, atol=1e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-3)
    np.testing.assert_allclose(
        gd.model_target(infd_schedule, x0_hat, eps_hat, t, p), out, atol=1e-3
    )
  # Away from the ill-conditioned ends every conversion is accurate to float precision.
  mid = (t > 50) & (t < 900)
  for p in gd.PARAMETERIZATIONS:
    out = gd.model_target(infd_schedule, x0, eps, t, p)
    x0_hat, eps_hat = gd.to_x0_eps(infd_schedule, xt, t, out, p)
    np.testing.assert_allclose(x0_hat[mid], x0[mid], atol=5e-5)
    np.testing.assert_allclose(eps_hat[mid], eps[mid], atol=5e-5)


def test_regression_loss_reductions():
  pred = jnp.zeros((3, 2, 2))
  target = jnp.stack([jnp.full((2, 2), 1.0), jnp.full((2, 2), 2.0), jnp.full((2, 2), -3.0)])
  np.testing.assert_allclose(gd.regression_loss(pred, target, "mse", per_example=True), [1, 4, 9])
  np.testing.assert_allclose(gd.regression_loss(pred, target, "l1", per_example=True), [1, 2, 3])
  np.testing.assert_allclose(gd.regression_loss(pred, target, "mse"), 14.0 / 3.0, rtol=1e-6)
  np.testing.assert_allclose(gd.regression_loss(pred, target, "l1", jnp.array([0, 1, 1])), 2.5)
  # A per-position mask: the weighted mean over the kept elements only.
  mask = jnp.zeros((3, 2, 2)).at[0, 0, 0].set(1.0).at[2].set(1.0)
  np.testing.assert_allclose(gd.regression_loss(pred, target, "mse", mask), (1 + 4 * 9) / 5)
  np.testing.assert_allclose(
      gd.regression_loss(pred, target, "l1", mask, per_example=True), [1, 0, 3]
  )


@pytest.mark.parametrize("parameterization", gd.PARAMETERIZATIONS)
def test_training_loss_is_zero_for_the_exact_model(infd_schedule, parameterization):
  # A model that knows x0 recovers eps from x_t exactly, so its loss vanishes only if
  # q_sample and the target use the same t and the same noise.
  x0 = jax.random.normal(jax.random.key(2), (256, 4))
  sched = infd_schedule

  def exact(x, t):
    a = jnp.sqrt(sched.alphas_cumprod[t])[:, None]
    eps = (x - a * x0) / jnp.sqrt(1.0 - a**2)
    return gd.model_target(sched, x0, eps, t, parameterization)

  loss = gd.training_loss(exact, sched, x0, jax.random.key(3), parameterization=parameterization)
  assert float(loss) < 1e-6
  zero = lambda x, t: jnp.zeros_like(x)
  if parameterization == "eps":  # E[eps^2] = 1, E|eps| = sqrt(2 / pi)
    rng = jax.random.key(4)
    per = gd.training_loss(zero, sched, x0, rng, per_example=True)
    assert per.shape == (256,)
    np.testing.assert_allclose(float(per.mean()), 1.0, atol=0.05)
    l1 = gd.training_loss(zero, sched, x0, rng, loss="l1")
    np.testing.assert_allclose(float(l1), np.sqrt(2 / np.pi), atol=0.03)


def test_sample_timesteps_uniform():
  t = gd.sample_timesteps(jax.random.key(5), 100000, 10)
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 9
  np.testing.assert_allclose(np.bincount(np.asarray(t)) / 1e5, 0.1, atol=0.005)


# --- sampling a Gaussian mixture with its exact eps -----------------------------------
_W = np.array([0.5, 0.3, 0.2], np.float32)
_M = np.array([-2.0, 0.5, 2.5], np.float32)
_S = np.array([0.3, 0.4, 0.3], np.float32)


def _mixture_eps(sched):
  """E[eps | x_t] of the 1-D mixture: -sqrt(1 - abar) * score of the noised density."""

  def eps_fn(x, t):  # x [B, 1], t [B]
    a = sched.alphas_cumprod[t][:, None]
    var = a * _S**2 + 1.0 - a  # [B, K], component variances of x_t
    mu = jnp.sqrt(a) * _M
    resp = jax.nn.softmax(jnp.log(_W) - 0.5 * jnp.log(var) - 0.5 * (x - mu) ** 2 / var, -1)
    score = -jnp.sum(resp * (x - mu) / var, axis=-1, keepdims=True)
    return -jnp.sqrt(1.0 - a) * score

  return eps_fn


def _with_parameterization(sched, eps_fn, p):
  """The same exact model, reporting its prediction in parameterisation p."""

  def fn(x, t):
    eps = eps_fn(x, t)
    a = jnp.sqrt(sched.alphas_cumprod[t])[:, None]
    x0 = (x - jnp.sqrt(1.0 - a**2) * eps) / a
    return {"eps": eps, "x0": x0, "v": a * eps - jnp.sqrt(1.0 - a**2) * x0}[p]

  return fn


_SAMPLERS = {
    "ddpm": lambda f, s, z, r: gd.ddpm_sample(f, s, z, r),
    "ddim_eta0": lambda f, s, z, r: gd.ddim_sample(f, s, z, r, num_steps=100, eta=0.0),
    "ddim_eta1": lambda f, s, z, r: gd.ddim_sample(f, s, z, r, num_steps=200, eta=1.0),
}


@pytest.mark.parametrize("sampler", sorted(_SAMPLERS))
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_reproduce_mixture(sampler, schedule):
  sched = gd.make_schedule(schedule, 1000, **(_INFD if schedule == "linear" else {}))
  n = 8000
  noise = jax.random.normal(jax.random.key(6), (n, 1))
  fn = jax.jit(lambda z, r: _SAMPLERS[sampler](_mixture_eps(sched), sched, z, r))
  x = np.asarray(fn(noise, jax.random.key(7)))[:, 0]
  assert np.all(np.isfinite(x))
  label = np.argmin(np.abs(x[:, None] - _M), axis=1)
  np.testing.assert_allclose(np.bincount(label, minlength=3) / n, _W, atol=0.025)
  np.testing.assert_allclose([x[label == k].mean() for k in range(3)], _M, atol=0.05)
  mean = np.sum(_W * _M)
  var = np.sum(_W * (_S**2 + _M**2)) - mean**2
  np.testing.assert_allclose(x.mean(), mean, atol=0.06)
  np.testing.assert_allclose(x.var(), var, rtol=0.05)


def test_parameterizations_sample_the_same(infd_schedule):
  sched = infd_schedule
  noise = jax.random.normal(jax.random.key(8), (256, 1))
  eps_fn = _mixture_eps(sched)
  for sample in (
      lambda f, p: gd.ddim_sample(f, sched, noise, num_steps=50, parameterization=p),
      lambda f, p: gd.ddpm_sample(f, sched, noise, jax.random.key(9), parameterization=p),
  ):
    ref = sample(eps_fn, "eps")
    for p in ("x0", "v"):
      out = sample(_with_parameterization(sched, eps_fn, p), p)
      np.testing.assert_allclose(out, ref, atol=2e-3)


# A Gaussian target N(_GM, _GS^2): its exact eps is linear in x.
_GM, _GS = 0.5, 0.4


def _gaussian_eps(sched):
  def eps_fn(x, t):
    a = sched.alphas_cumprod[t][:, None]
    return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * _GM) / (a * _GS**2 + 1.0 - a)

  return eps_fn


def test_ddim_eta1_on_every_step_is_ddpm(infd_schedule):
  # Same posterior mean and "fixed small" variance, and the same per-step noise keys.
  # The Gaussian target's eps is linear, so float rounding is not amplified (with the
  # mixture's, samples near a boundary between components differ by up to 1e-2).
  noise = jax.random.normal(jax.random.key(10), (64, 1))
  eps_fn = _gaussian_eps(infd_schedule)
  rng = jax.random.key(11)
  ddpm = gd.ddpm_sample(eps_fn, infd_schedule, noise, rng)
  ddim = gd.ddim_sample(eps_fn, infd_schedule, noise, rng, num_steps=1000, eta=1.0)
  np.testing.assert_allclose(ddim, ddpm, atol=1e-4)
  other = gd.ddpm_sample(eps_fn, infd_schedule, noise, jax.random.key(12))
  assert float(jnp.abs(other - ddpm).max()) > 0.1  # the noise does matter


# --- DDIM determinism and inversion ----------------------------------------------------
def test_ddim_eta0_is_deterministic_and_invertible(infd_schedule):
  sched = infd_schedule
  eps_fn = _gaussian_eps(sched)
  x0 = _GM + _GS * jax.random.normal(jax.random.key(13), (512, 1))
  invert = jax.jit(
      lambda x, n, k: gd.ddim_invert(eps_fn, sched, x, num_steps=n, fixed_point_iters=k),
      static_argnums=(1, 2),
  )
  sample = jax.jit(
      lambda z, r, n: gd.ddim_sample(eps_fn, sched, z, r, num_steps=n), static_argnums=(2,)
  )
  x_t = invert(x0, 200, 2)
  # The inverted data is noise: the exact flow maps the target onto N(0, ~1).
  assert abs(float(x_t.mean())) < 0.1 and abs(float(x_t.std()) - 1.0) < 0.1
  back = sample(x_t, jax.random.key(0), 200)
  np.testing.assert_array_equal(back, sample(x_t, jax.random.key(1), 200))  # rng unused
  np.testing.assert_allclose(back, x0, atol=1e-4)
  # The plain inversion (eps read at the lower level) converges at first order.
  errs = [float(jnp.abs(sample(invert(x0, n, 0), None, n) - x0).max()) for n in (100, 1000)]
  assert errs[1] < 1e-2 and errs[1] < errs[0] / 5


# --- hooks, clipping, tracing --------------------------------------------------------------
def test_clip_x0():
  sched = gd.make_schedule("linear", 50)
  const = lambda x, t: jnp.full_like(x, 5.0)  # an x0-model that always says 5
  noise = jax.random.normal(jax.random.key(14), (8, 3))
  for clip, want in ((None, 5.0), (1.0, 1.0)):
    out = gd.ddim_sample(const, sched, noise, num_steps=10, parameterization="x0", clip_x0=clip)
    np.testing.assert_allclose(out, want, atol=1e-5)
    out = gd.ddpm_sample(
        const, sched, noise, jax.random.key(15), parameterization="x0", clip_x0=clip
    )
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_transform_hooks():
  sched = gd.make_schedule("linear", 30)
  eps_fn = _gaussian_eps(sched)
  noise = jax.random.normal(jax.random.key(16), (16, 1))
  seen = []

  def transform(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t)
    return jnp.clip(x, -0.05, 0.05)

  out = gd.ddim_sample(eps_fn, sched, noise, num_steps=7, transform=transform)
  assert np.all(np.abs(np.asarray(out)) <= np.float32(0.05))  # the returned sample too
  assert seen == list(gd.ddim_timesteps(30, 7))  # once per step, after the model at t
  # noise_transform acts on the fresh noise only: zero noise makes DDPM deterministic.
  zero = lambda z: jnp.zeros_like(z)
  a = gd.ddpm_sample(eps_fn, sched, noise, jax.random.key(1), noise_transform=zero)
  b = gd.ddpm_sample(eps_fn, sched, noise, jax.random.key(2), noise_transform=zero)
  np.testing.assert_array_equal(a, b)
  c = gd.ddpm_sample(eps_fn, sched, noise, jax.random.key(1))
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_samplers_trace_the_model_once():
  sched = gd.make_schedule("cosine", 20)
  traces, calls = [], []

  def model_fn(x, t):
    traces.append(x.shape)
    jax.debug.callback(lambda: calls.append(1))
    assert t.shape == (x.shape[0],) and t.dtype == jnp.int32
    return 0.1 * x

  noise = jnp.ones((3, 2))
  ddim = jax.jit(lambda z, r, eta: gd.ddim_sample(model_fn, sched, z, r, num_steps=7, eta=eta))
  ddim(noise, jax.random.key(0), 0.5).block_until_ready()
  ddim(noise, jax.random.key(0), 1.0).block_until_ready()  # a new eta: no retrace
  assert len(traces) == 1 and len(calls) == 14
  traces.clear(), calls.clear()
  jax.jit(lambda z, r: gd.ddpm_sample(model_fn, sched, z, r))(noise, jax.random.key(0))
  assert len(traces) == 1 and len(calls) == 20
  traces.clear(), calls.clear()
  gd.ddim_invert(model_fn, sched, noise, num_steps=5, fixed_point_iters=2).block_until_ready()
  assert len(traces) == 1 and len(calls) == 15
  with pytest.raises(ValueError, match="rng"):
    gd.ddim_sample(model_fn, sched, noise, num_steps=3, eta=1.0)
