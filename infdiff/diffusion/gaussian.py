"""Discrete-time Gaussian diffusion as pure functions (INFD, ∞-Diff and Patch-DM).

Conventions (ADM's, which INFD, ∞-Diff and Patch-DM all build on):

  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s <= t} (1 - beta_s),

with integer training timesteps t in {0, ..., T - 1}; t = 0 is the first noised level and
t = T - 1 the noisiest. Samplers take a model function `model_fn(x, t) -> output` with
x [B, ...] float32 and t [B] int32 (the training timestep of every sample) and return x_0
samples. The output's meaning is its parameterisation:

  'eps': the noise eps;   'x0': the clean x_0;   'v': sqrt(abar) eps - sqrt(1 - abar) x_0.

All math is float32; schedules are built in float64 and then rounded once. Sampling
loops are `jax.lax.fori_loop`s with static step counts, so the model is traced once and
a jitted sampler compiles once per input shape (`eta` and `clip_x0` may be traced).

Conditioning is closed over by `model_fn`; classifier-free guidance wraps any model
function (`infdiff.diffusion.guidance.bind_cfg`), so it costs one model call per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
Transform = Callable[[jax.Array, jax.Array], jax.Array]

PARAMETERIZATIONS = ("eps", "x0", "v")


# --- schedules -------------------------------------------------------------------------
class Schedule(NamedTuple):
  """A discrete noise schedule of T steps (a pytree: pass it to jitted functions).

  Attributes:
    betas: [T] float32, beta_t = 1 - abar_t / abar_{t-1}.
    alphas_cumprod: [T] float32, abar_t, decreasing from close to 1 toward 0.
    one_minus_alphas_cumprod: [T] float32, 1 - abar_t computed in float64: in float32,
      1 - abar_0 would keep only ~3 significant digits (abar_0 = 1 - 1e-4), and the
      posterior coefficients at the last sampling steps divide by it.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  one_minus_alphas_cumprod: jax.Array

  @property
  def num_steps(self) -> int:
    """T, the number of training timesteps (static: it is an array shape)."""
    return self.betas.shape[0]


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Betas linear in t from beta_start to beta_end (DDPM; Patch-DM uses the defaults).

  INFD uses 0.0015 -> 0.0195. These are the endpoints for exactly `num_steps` steps:
  ADM's code multiplies them by 1000 / T when T != 1000; pass scaled values to match it.
  """
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule, abar(u) = f(u) / f(0), f(u) = cos^2((u + s)/(1 + s) pi/2).

  beta_t = 1 - abar((t + 1) / T) / abar(t / T), clipped at max_beta because abar(1) = 0
  would make the last beta exactly 1 (no signal left, x_0 not recoverable from x_T).
  """
  u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def constant_betas(num_steps: int, beta: float = 0.008) -> np.ndarray:
  """The same beta at every step (∞-Diff's latent model: 0.008 with T = 1000)."""
  return np.full((num_steps,), beta, np.float64)


_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "constant": constant_betas}


def schedule_from_betas(betas) -> Schedule:
  """Builds a Schedule from [T] betas in (0, 1] (cumulative product taken in float64)."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("betas must be a 1-D array with values in (0, 1]")
  abar = np.cumprod(1.0 - betas)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(f32(betas), f32(abar), f32(1.0 - abar))


def make_schedule(name: str, num_steps: int, **kw) -> Schedule:
  """Noise schedule by name: 'linear', 'cosine' or 'constant'.

  Args:
    name: schedule name.
    num_steps: T, the number of training timesteps.
    **kw: the schedule's own arguments, e.g. `beta_start=0.0015, beta_end=0.0195` (INFD),
      `beta=0.008` (∞-Diff latent), `s=0.008` (cosine).

  Returns:
    The Schedule.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in _SCHEDULES:
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(_SCHEDULES)}")
  return schedule_from_betas(_SCHEDULES[name](num_steps, **kw))


# --- parameterisations -----------------------------------------------------------------
def _check_parameterization(parameterization: str):
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
        f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}"
    )


def _bcast(v, x):
  """Reshapes per-sample v [B] to broadcast against x [B, ...]."""
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _abar(schedule: Schedule, t) -> tuple[jax.Array, jax.Array]:
  """(abar_t, 1 - abar_t) at integer timesteps t (any shape); t = -1 is clean data."""
  t = jnp.asarray(t, jnp.int32)
  i, clean = jnp.maximum(t, 0), t < 0
  abar = jnp.where(clean, 1.0, schedule.alphas_cumprod[i])
  return abar, jnp.where(clean, 0.0, schedule.one_minus_alphas_cumprod[i])


def _signal_noise(schedule: Schedule, t, x):
  """(sqrt(abar_t), sqrt(1 - abar_t)) broadcast against x [B, ...]; t [B] int."""
  abar, one_minus = _abar(schedule, t)
  return jnp.sqrt(_bcast(abar, x)), jnp.sqrt(_bcast(one_minus, x))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

  Args:
    schedule: the noise schedule.
    x0: [B, ...] clean data.
    t: [B] int timesteps in [0, T).
    noise: [B, ...] standard normal noise.

  Returns:
    x_t [B, ...] float32.
  """
  x0 = x0.astype(jnp.float32)
  a, s = _signal_noise(schedule, t, x0)
  return a * x0 + s * noise.astype(jnp.float32)


def to_x0_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array, parameterization: str
) -> tuple[jax.Array, jax.Array]:
  """Converts a model output at (x_t, t) to the implied (x_0, eps), both float32 [B, ...].

  With a = sqrt(abar_t), s = sqrt(1 - abar_t) and x_t = a x_0 + s eps:
    eps: x_0 = (x_t - s eps) / a
    x0:  eps = (x_t - a x_0) / s
    v:   x_0 = a x_t - s v,  eps = s x_t + a v   (exact since a^2 + s^2 = 1)
  'eps' divides by a and 'x0' by s, so they are ill-conditioned at the noisy and the
  clean end respectively; 'v' never divides.
  """
  _check_parameterization(parameterization)
  x_t = x_t.astype(jnp.float32)
  out = output.astype(jnp.float32)
  a, s = _signal_noise(schedule, t, x_t)
  if parameterization == "eps":
    return (x_t - s * out) / a, out
  if parameterization == "x0":
    return out, (x_t - a * out) / s
  return a * x_t - s * out, s * x_t + a * out


def model_target(
    schedule: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array, parameterization: str
) -> jax.Array:
  """What a model of the given parameterisation should output for x_t = q_sample(x0, t, eps).

  The inverse of `to_x0_eps`. Returns float32 [B, ...].
  """
  _check_parameterization(parameterization)
  x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
  if parameterization == "eps":
    return eps
  if parameterization == "x0":
    return x0
  a, s = _signal_noise(schedule, t, x0)
  return a * eps - s * x0


# --- training --------------------------------------------------------------------------
def sample_timesteps(rng: jax.Array, batch: int, num_steps: int) -> jax.Array:
  """Uniform integer training timesteps [batch] int32 in [0, num_steps)."""
  return jax.random.randint(rng, (batch,), 0, num_steps, jnp.int32)


def regression_loss(
    pred: jax.Array,
    target: jax.Array,
    kind: str = "mse",
    mask: jax.Array | None = None,
    per_example: bool = False,
) -> jax.Array:
  """Mean squared ('mse') or absolute ('l1') error in float32.

  Args:
    pred: [B, ...] model output.
    target: [B, ...] target of the same shape.
    kind: 'mse' (INFD, ∞-Diff's main model, Patch-DM) or 'l1' (∞-Diff's latent model).
    mask: optional weights broadcastable to pred after right-padding its shape, e.g. [B]
      or [B, H, W, 1] (Patch-DM's padded border, ∞-Diff's point subset); the means are
      then weighted means.
    per_example: if True return [B] means over each example's elements; else the scalar
      mean over all elements (weighted: sum(w err) / sum(w), so examples with more valid
      elements weigh more, as in `flow.flow_matching_loss`).

  Returns:
    [B] or scalar.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "mse":
    err = jnp.square(diff)
  elif kind == "l1":
    err = jnp.abs(diff)
  else:
    raise ValueError(f"unknown loss {kind!r}; expected 'mse' or 'l1'")
  w = jnp.ones_like(err) if mask is None else jnp.broadcast_to(_bcast(mask, err), err.shape)
  axes = tuple(range(1, err.ndim)) if per_example else None
  return jnp.sum(err * w, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), 1e-8)


def training_loss(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    rng: jax.Array,
    *,
    parameterization: str = "eps",
    loss: str = "mse",
    mask: jax.Array | None = None,
    per_example: bool = False,
) -> jax.Array:
  """Denoising loss at uniformly random timesteps (the simple DDPM objective).

  Draws t ~ U{0, ..., T - 1} and eps ~ N(0, I), evaluates `model_fn(q_sample(x0, t, eps),
  t)` and compares it with `model_target` of the parameterisation. Methods whose inputs
  are built differently (∞-Diff mollifies x_t and gathers a point subset) compose
  `sample_timesteps`, `q_sample`, `model_target` and `regression_loss` themselves.

  Args:
    model_fn: `(x_t [B, ...], t [B] int32) -> output [B, ...]`.
    schedule: the noise schedule.
    x0: [B, ...] clean data.
    rng: key (split here into the timestep and noise keys).
    parameterization: 'eps', 'x0' or 'v'.
    loss: 'mse' or 'l1'.
    mask: optional weights, see `regression_loss`.
    per_example: return [B] per-example losses instead of the scalar mean.

  Returns:
    [B] or scalar float32.
  """
  kt, kn = jax.random.split(rng)
  t = sample_timesteps(kt, x0.shape[0], schedule.num_steps)
  eps = jax.random.normal(kn, x0.shape, jnp.float32)
  out = model_fn(q_sample(schedule, x0, t, eps), t)
  target = model_target(schedule, x0, eps, t, parameterization)
  return regression_loss(out, target, loss, mask, per_example)


# --- sampling --------------------------------------------------------------------------
def _denoise(model_fn, schedule, x, t, parameterization, clip_x0):
  """(x0, eps) predicted at state x [B, ...] and timestep t (scalar int, traced)."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  x0, eps = to_x0_eps(schedule, x, tb, model_fn(x, tb), parameterization)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    # Re-derive eps so that (x0, eps) stay consistent with x_t (as ADM's DDIM does).
    a, s = _signal_noise(schedule, tb, x)
    eps = (x - a * x0) / s
  return x0, eps, tb


def _step_noise(rng, i, x, noise_transform):
  # One key per step from fold_in(rng, i): DDPM and DDIM draw identical noise for the
  # same step index, and keys are never reused across steps.
  z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
  return z if noise_transform is None else noise_transform(z)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    noise: jax.Array,
    rng: jax.Array,
    *,
    parameterization: str = "eps",
    clip_x0: float | jax.Array | None = None,
    transform: Transform | None = None,
    noise_transform: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """Ancestral sampling through all T steps, x_{T-1} -> ... -> x_0 (T model calls).

  Each step draws x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) with the true posterior's mean
  `(beta_t sqrt(abar_{t-1}) x0_hat + (1 - abar_{t-1}) sqrt(1 - beta_t) x_t) / (1 - abar_t)`
  and the "fixed small" variance `beta_t (1 - abar_{t-1}) / (1 - abar_t)`, the true
  posterior variance (Ho et al.: optimal when x_0 is a point; "fixed large" beta_t is
  optimal for x_0 ~ N(0, I); both sample alike). Fixed small is the choice here because
  its last step (t = 0) has variance 0 and returns x0_hat without leftover noise.

  Args:
    model_fn: `(x [B, ...], t [B] int32) -> output [B, ...]`.
    schedule: the noise schedule.
    noise: [B, ...] x_{T-1}, standard normal (mollified for ∞-Diff).
    rng: key for the per-step noise (step i uses fold_in(rng, i)).
    parameterization: 'eps', 'x0' or 'v'.
    clip_x0: if given, x0_hat is clipped to [-clip_x0, clip_x0] at every step.
    transform: optional `(x, t) -> x`, applied to the new state right after every step,
      i.e. to x_{t-1} (including the returned x_0) with t [B] the timestep the model was
      just evaluated at. It sees the state after the fresh noise was added.
    noise_transform: optional `z -> z` applied to the fresh per-step noise before it is
      added (∞-Diff's sampler mollifies only this noise, `mean + sigma T z`, since its
      mean is already mollified; applying T to the whole state would blur it again).

  Returns:
    x_0 samples [B, ...] in noise's dtype.
  """
  _check_parameterization(parameterization)
  num = schedule.num_steps

  def step(i, x):
    t = num - 1 - i
    x0, _, tb = _denoise(model_fn, schedule, x, t, parameterization, clip_x0)
    beta = schedule.betas[t]
    _, om_t = _abar(schedule, t)
    a_prev, om_prev = _abar(schedule, t - 1)
    c0 = beta * jnp.sqrt(a_prev) / om_t
    ct = om_prev * jnp.sqrt(1.0 - beta) / om_t
    var = beta * om_prev / om_t  # 0 at t = 0
    x = c0 * x0 + ct * x + jnp.sqrt(var) * _step_noise(rng, i, x, noise_transform)
    return x if transform is None else transform(x, tb)

  x = jax.lax.fori_loop(0, num, step, noise.astype(jnp.float32))
  return x.astype(noise.dtype)


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """The evenly spaced DDIM subsequence [num_steps] int32, decreasing from T - 1 to 0.

  `round(linspace(T - 1, 0, num_steps))`: it always starts at the noisiest level and ends
  at t = 0 (ADM's "ddimN" stride would stop at T - T/N and skip the noisiest levels);
  num_steps = T gives every step, num_steps = 1 only T - 1.
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
  ts = np.floor(np.linspace(num_train_steps - 1, 0, num_steps) + 0.5).astype(np.int32)
  return ts


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    noise: jax.Array,
    rng: jax.Array | None = None,
    *,
    num_steps: int,
    eta: float | jax.Array = 0.0,
    parameterization: str = "eps",
    clip_x0: float | jax.Array | None = None,
    transform: Transform | None = None,
    noise_transform: Callable[[jax.Array], jax.Array] | None = None,
    loop: str = "fori",
) -> jax.Array:
  """DDIM sampling on `ddim_timesteps(T, num_steps)` (num_steps model calls).

  From level t to the next level s (s = -1, i.e. abar = 1, after the last one):
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
  eta = 0 is deterministic (the probability-flow discretisation ∞-Diff samples with);
  eta = 1 with num_steps = T is the same chain as `ddpm_sample` (and draws the same
  noise for the same rng); INFD samples with 200 steps and eta = 1.

  Args:
    model_fn: `(x [B, ...], t [B] int32) -> output [B, ...]`.
    schedule: the noise schedule.
    noise: [B, ...] the starting state at level T - 1, standard normal.
    rng: key for the per-step noise; needed unless eta is the Python number 0.
    num_steps: number of steps = model calls (static).
    eta: noise scale in [0, 1], scalar (may be traced).
    parameterization: 'eps', 'x0' or 'v'.
    clip_x0: if given, x0_hat is clipped to [-clip_x0, clip_x0] at every step and eps_hat
      re-derived from the clipped x0_hat.
    transform: optional `(x, t) -> x`, applied to the new state right after every step
      (including the returned x_0), t [B] being the timestep the model was just evaluated
      at. It sees the state after the fresh noise was added.
    noise_transform: optional `z -> z` applied to the fresh noise before it is added
      (see `ddpm_sample`); unused when eta = 0.
    loop: 'fori' (`lax.fori_loop`, traceable: the whole sampler jits as one program) or
      'python' (a host loop over the same step: model_fn may then call its own jitted
      functions of fixed shapes, e.g. Patch-DM's patch batches, which then compile once
      whatever the canvas size).

  Returns:
    x_0 samples [B, ...] in noise's dtype.
  """
  _check_parameterization(parameterization)
  if loop not in ("fori", "python"):
    raise ValueError(f"loop must be 'fori' or 'python', got {loop!r}")
  deterministic = isinstance(eta, (int, float)) and eta == 0
  if not deterministic and rng is None:
    raise ValueError("ddim_sample with eta != 0 needs an rng")
  ts = ddim_timesteps(schedule.num_steps, num_steps)
  levels = jnp.asarray(np.append(ts, -1), jnp.int32)  # level after step i is levels[i + 1]

  def step(i, x):
    t, s = levels[i], levels[i + 1]
    x0, eps, tb = _denoise(model_fn, schedule, x, t, parameterization, clip_x0)
    _, om_t = _abar(schedule, t)
    a_s, om_s = _abar(schedule, s)
    if deterministic:
      x = jnp.sqrt(a_s) * x0 + jnp.sqrt(om_s) * eps
    else:
      # 1 - abar_t / abar_s written as a difference of the float64-accurate 1 - abar.
      sigma = eta * jnp.sqrt(om_s / om_t * (om_t - om_s) / a_s)
      # max(., 0): float rounding at eta = 1 must not give the sqrt a negative number.
      dir_scale = jnp.sqrt(jnp.maximum(om_s - sigma**2, 0.0))
      z = _step_noise(rng, i, x, noise_transform)
      x = jnp.sqrt(a_s) * x0 + dir_scale * eps + sigma * z
    return x if transform is None else transform(x, tb)

  x = noise.astype(jnp.float32)
  if loop == "python":
    for i in range(num_steps):
      x = step(i, x)
  else:
    x = jax.lax.fori_loop(0, num_steps, step, x)
  return x.astype(noise.dtype)


def ddim_invert(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    *,
    num_steps: int,
    parameterization: str = "eps",
    fixed_point_iters: int = 0,
) -> jax.Array:
  """Deterministic DDIM inversion (eta = 0): x_0 -> x_{T-1}, the reverse of `ddim_sample`.

  Walks the levels of `ddim_timesteps(T, num_steps)` upward. The sampling step from level
  t down to p is x_p = sqrt(abar_p) x0_hat + sqrt(1 - abar_p) eps_hat(x_t), so its inverse
  is
    x_t = sqrt(abar_t) (x_p - sqrt(1 - abar_p) e) / sqrt(abar_p) + sqrt(1 - abar_t) e,
  with e = eps_hat(x_t, t), which needs the unknown x_t. The usual inversion takes
  e = eps_hat(x_p, t), an error that vanishes as the steps get finer (O(1 / num_steps)
  over the chain). `fixed_point_iters` > 0 re-evaluates e at the latest estimate of x_t
  that many more times; the iteration contracts by a factor O(step size), so a few
  iterations make the step exact for smooth models (a linear schedule, 200 steps and two
  iterations give a round trip to ~2e-5 on a Gaussian target, against 3e-2 without). A
  step that is not small in signal-to-noise ratio does not contract: the cosine
  schedule's last steps (beta clipped at 0.999, abar_{T-1} ~ 2e-9 at T = 1000) limit its
  round trip to ~1e-3 however many iterations are used.

  Args:
    model_fn: `(x [B, ...], t [B] int32) -> output [B, ...]`.
    schedule: the noise schedule.
    x0: [B, ...] clean data.
    num_steps: number of levels (static); use the sampler's value.
    parameterization: 'eps', 'x0' or 'v'.
    fixed_point_iters: extra model calls per step that refine the step (static).

  Returns:
    x_{T-1} [B, ...] in x0's dtype; `ddim_sample(..., eta=0)` maps it back to x0.
    It costs num_steps * (1 + fixed_point_iters) model calls, traced once.
  """
  _check_parameterization(parameterization)
  ts = ddim_timesteps(schedule.num_steps, num_steps)[::-1]
  levels = jnp.asarray(np.append(-1, ts), jnp.int32)  # step i goes levels[i] -> levels[i + 1]

  def step(i, x_p):
    p, t = levels[i], levels[i + 1]
    tb = jnp.full((x_p.shape[0],), t, jnp.int32)
    a_p, om_p = _abar(schedule, p)
    a_t, om_t = _abar(schedule, t)

    def refine(_, x_t):
      # The output is read at level t, where the sampler will read it.
      _, e = to_x0_eps(schedule, x_t, tb, model_fn(x_t, tb), parameterization)
      x0_hat = (x_p - jnp.sqrt(om_p) * e) / jnp.sqrt(a_p)
      return jnp.sqrt(a_t) * x0_hat + jnp.sqrt(om_t) * e

    # The first evaluation at x_p itself is the plain inversion step.
    return jax.lax.fori_loop(0, 1 + fixed_point_iters, refine, x_p)

  x = jax.lax.fori_loop(0, num_steps, step, x0.astype(jnp.float32))
  return x.astype(x0.dtype)
