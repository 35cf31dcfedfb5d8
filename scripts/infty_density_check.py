"""∞-Diff: does the subset-trained denoiser carry over to the full grid?

python scripts/infty_density_check.py --workdir=W [--num=16] [--seeds=3]

For `num` held-out scenes of the run's shapes data at the training side N, noised to
several t with fresh noise (`seeds` draws each), prints the denoiser's mean squared error
against its target (T eps or the mollified v) three ways:

  subset     on a random N^2 / rate subset of the pixels, as in training
  full_raw   on every pixel with the raw trained kernels (what the paper evaluates)
  full       on every pixel with the density-matched kernels (`sparse.density_factors`),
             what infdiff samples with

A model that generalises from subsets to the full grid has full <= subset.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from infdiff import runs
from infdiff.data import shapes
from infdiff.diffusion import gaussian
from infdiff.models import sparse

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "∞-Diff run directory (unconditional main stage).")
flags.DEFINE_integer("num", 16, "Held-out scenes.")
flags.DEFINE_integer("seeds", 3, "Noise draws per timestep.")
flags.DEFINE_list("timesteps", ["50", "200", "400", "600", "800", "950"], "Timesteps.")
flags.mark_flags_as_required(["workdir"])


def errors(method, params, x0, t_int: int, seed: int) -> dict:
  """{'subset', 'full_raw', 'full'} MSE at timestep t_int for one noise draw."""
  n, b = method.image_size, x0.shape[0]
  key = jax.random.PRNGKey(seed)
  t = jnp.full((b,), t_int, jnp.int32)
  both = method.mollify(jnp.concatenate([x0, jax.random.normal(key, x0.shape)], -1))
  tx0, teps = both[..., :3], both[..., 3:]
  x_t = gaussian.q_sample(method.schedule, tx0, t, teps)
  target = gaussian.model_target(method.schedule, tx0, teps, t, method.parameterization)
  out = {}
  sub = sparse.point_set(
      sparse.random_subset(jax.random.fold_in(key, 1), b, n, n, method.points), n, n
  )
  full = sparse.full_point_set(b, n, n)
  for name, pts, dense, net in (
      ("subset", sub, False, method.net),
      ("full_raw", full, True, method.net.clone(train_rate=1.0)),
      ("full", full, True, method.net),
  ):
    pred = net.apply({"params": params}, sparse.gather_points(x_t, pts), pts, n, n, t, dense=dense)
    out[name] = float(jnp.mean((pred - sparse.gather_points(target, pts)) ** 2))
  return out


def main(argv):
  del argv
  run = runs.load_run(FLAGS.workdir, "infty_diff")
  m = run.method
  if m.z_dim:
    raise SystemExit("error: this check takes an unconditional run (z_dim=0)")
  rng = np.random.default_rng(123)
  n = m.image_size
  imgs = np.stack([shapes.render_scene(shapes.sample_scene(rng), n, n) for _ in range(FLAGS.num)])
  x0 = jnp.asarray(imgs) * 2.0 - 1.0
  p = run.params["model"]["net"]
  print(f"rate {m.cfg.rate}, {m.parameterization}-prediction, kernel {m.cfg.net.kernel_size}")
  for t in (int(v) for v in FLAGS.timesteps):
    rows = [errors(m, p, x0, t, s) for s in range(FLAGS.seeds)]
    mean = {k: round(float(np.mean([r[k] for r in rows])), 5) for k in rows[0]}
    print(json.dumps({"t": t, **mean}))


if __name__ == "__main__":
  app.run(main)
