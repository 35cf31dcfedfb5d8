"""Where RaPD sampling fails on `shapes`: denoising held-out scenes from partly noised latents.

python scripts/rapd_trajectory.py --workdir=W [--num=8] [--step=N] [--cfg=1,4]
    [--t0=0,0.05,0.1,0.2,0.3]

For held-out ShapesEval scenes: encode the ground truth at the encoder size, normalise,
noise it to time t0 (t = 0 is noise, t = 1 data: x = t0 x_1 + (1 - t0) eps), then
integrate the learned velocity from t0 to 1 with the run's Euler sampler (its shift and
number of steps, the time grid mapped onto [t0, 1]) and CFG, render at the encoder size
and score with the ShapesEval detector. t0 = 0 is plain sampling from noise. A model that
scores well from t0 = 0.3 but not from 0 finishes scenes whose layout is already in the
latent but does not form layouts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import runs
from infdiff.data import shapes
from infdiff.diffusion import flow, guidance
from infdiff.evaluators import shapes_detector


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a RaPD run with a finished stage 2")
  ap.add_argument("--num", type=int, default=8, help="held-out prompts per category")
  ap.add_argument("--step", type=int, default=None, help="stage-2 checkpoint (default newest)")
  ap.add_argument("--cfg", type=_floats, default=[1.0, 4.0], help="guidance scales")
  ap.add_argument("--t0", type=_floats, default=[0.0, 0.05, 0.1, 0.2, 0.3], help="start times")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  run = runs.load_run(args.workdir, stage="rapd_stage2", step=args.step)
  m, aux = run.method, run.aux
  p = run.params["model"]
  gen = m.make_inference(run.params, aux)
  size = m.image_size
  prompts = shapes.eval_prompts(args.num, seed=args.seed)
  gt = np.stack([shapes.render_scene(s, size, size) for _, _, s in prompts])
  ids, mask = (jnp.asarray(a) for a in m.text.tokenize_batch([c for _, c, _ in prompts]))
  x1 = m.normalised_latent(aux, jnp.asarray(gt))  # [N, r, r, C]
  cond = (m.encode_text(p, aux, ids, mask).hidden, mask)
  empty = jnp.zeros_like(mask)
  uncond = (m.encode_text(p, aux, ids, empty).hidden, empty)
  eps = jax.random.normal(jax.random.PRNGKey(args.seed + 1), x1.shape, jnp.float32)
  grid = np.asarray(flow.shift_t(np.linspace(0.0, 1.0, gen.num_steps + 1), gen.shift))

  def velocity_fn(x, t, c):
    out = m.dit.apply({"params": p["dit"]}, x, t, c[0], c[1])
    return flow.velocity_from_output(out, x, t, m.cfg.flow.get("predict", "v"))

  cats = list(shapes.CATEGORIES)
  print(
      f"ShapesEval at {size}x{size} after denoising from t0 ({args.num} prompts per category, "
      f"{gen.num_steps} Euler steps, shift {gen.shift:g}, stage-2 step {run.step})"
  )
  print(f"{'cfg':>5} {'t0':>6}" + "".join(f"{c[:13]:>14}" for c in cats) + f"{'overall':>10}")
  for g in args.cfg:
    velocity = jax.jit(guidance.bind_cfg(velocity_fn, g, cond, uncond))
    for t0 in args.t0:
      x = flow.interpolate(x1, eps, t0)
      ts = t0 + (1.0 - t0) * grid
      for i in range(gen.num_steps):
        x = x + float(ts[i + 1] - ts[i]) * velocity(x, jnp.full((len(x),), ts[i], jnp.float32))
      images = gen.render(np.asarray(m.denormalise(aux, x)), size, size)
      res = shapes_detector.shapes_eval(list(images), prompts)
      row = "".join(f"{res['per_category'][c]:>14.3f}" for c in cats)
      print(f"{g:>5g} {t0:>6g}{row}{res['overall']:>10.3f}", flush=True)


if __name__ == "__main__":
  main()
