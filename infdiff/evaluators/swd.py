"""Multi-scale sliced Wasserstein distance between generated and held-out real images.

Protocol: the first `num` held-out records give the prompts (their captions; '' samples
unconditionally) and the real images; one sample per prompt (noise from `seed`) is
rendered at each size and compared with the real images at the same size (centre crop
to the aspect ratio, then resized; shapes scenes rendered at that size) by
`metrics.sliced_wasserstein` (ProGAN's SWD on Laplacian pyramids down to 16 pixels).
Rows: one per pyramid level 'swd_<res>' and 'swd_mean' (x 1e3); one column per size.
"""

from __future__ import annotations

import numpy as np

from infdiff import runs
from infdiff.evaluators import common, metrics
from infdiff.methods import base

DEFAULT_SIZES = ((64, 64),)
DEFAULT_NUM = 64
MIN_RES = 16  # coarsest pyramid level (ProGAN)


def check_size(w: int, h: int, min_res: int = MIN_RES) -> None:
  """One-line ValueError unless the Laplacian pyramid of an h x w image is well formed."""
  res, levels = min(h, w), 0
  while res >= min_res:
    levels, res = levels + 1, res // 2
  if levels == 0:
    raise ValueError(f"size {w}x{h} too small for SWD: the short side must be >= {min_res}")
  f = 2 ** (levels - 1)
  if h % f or w % f:
    raise ValueError(f"size {w}x{h} for SWD: both sides must be divisible by {f}")


def real_images(source, n: int, w: int, h: int) -> np.ndarray:
  return np.stack([common.full_image(source, i, h, w) for i in range(n)])  # [N, h, w, 3]


def evaluate(gen, source, *, num: int = DEFAULT_NUM, seed: int = 0, sizes=DEFAULT_SIZES):
  """SWD per pyramid level and size (module docstring)."""
  for w, h in sizes:
    check_size(w, h)
  n = common.num_images(source, num)
  images = common.generate(gen, common.captions(source, n), sizes, seed)
  rows: dict[str, dict[str, float]] = {}
  for (w, h), fake in images.items():
    res = metrics.sliced_wasserstein(fake, real_images(source, n, w, h), rng=seed, min_res=MIN_RES)
    for k, v in res.items():
      rows.setdefault(k, {})[f"{w}x{h}"] = v
  rows["swd_mean"] = rows.pop("swd_mean")  # last row
  return common.Result(
      "swd",
      rows,
      meta={"num_images": n, "seed": seed, "sizes": [common.size_name(s) for s in sizes]},
      note=f"{n} generated vs {n} held-out images; SWD x 1e3 per pyramid level.",
  )


NEEDS = base.GENERATOR


def validate(args: common.EvalArgs) -> None:
  for w, h in args.sizes:
    check_size(w, h)


def cli(args: common.EvalArgs) -> common.Result:
  """`python -m infdiff.evaluate --metric=swd`: needs a Generator run."""
  sizes = args.sizes or DEFAULT_SIZES
  for w, h in sizes:
    check_size(w, h)
  source = common.held_out_source(common.run_data_config(args.workdir, args.data))
  gen = runs.load_generator(args.workdir, "--metric=swd", step=args.step, **args.sampler_options)
  return evaluate(gen, source, num=args.num or DEFAULT_NUM, seed=args.seed, sizes=sizes)


class Evaluator(common.PeriodicEvaluator):
  """Periodic SWD during stage 2 (ecfg: every, num, seed, sizes)."""

  default_num = 16

  def __init__(self, ecfg):
    super().__init__(ecfg)
    self.sizes = common.ecfg_sizes(ecfg, DEFAULT_SIZES)

  def evaluate(self, ctx):
    gen = common.generator_from_ctx(ctx)
    return evaluate(gen, self.source(ctx), num=self.num, seed=self.seed, sizes=self.sizes)
