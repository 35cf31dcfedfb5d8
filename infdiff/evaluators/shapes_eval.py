"""ShapesEval: GenEval-style compositional accuracy of a text-to-image run, at any size.

Protocol: `num` held-out prompts per category from `shapes.eval_prompts(num, seed)` (a
seed stream disjoint from both dataset splits), one stage-2 sample per prompt (noise
from `seed`), the same latent rendered at every requested size (default 64x64 and
256x256: 2x and 8x the demo's 32^2 latent), each image scored by the programmatic
detector (`shapes_detector`). Rows: the six categories and 'overall' (the mean of the
per-category accuracies, as GenEval reports); one column per size.
"""

from __future__ import annotations

from infdiff import runs
from infdiff.data import shapes
from infdiff.evaluators import common, shapes_detector
from infdiff.methods import base

DEFAULT_SIZES = ((64, 64), (256, 256))
DEFAULT_NUM = 8  # prompts per category


def evaluate(gen, *, num: int = DEFAULT_NUM, seed: int = 0, sizes=DEFAULT_SIZES) -> common.Result:
  """Accuracy per category and overall for a text-conditioned `Generator` (module docstring)."""
  if num <= 0:
    raise ValueError(f"--num must be positive, got {num}")
  prompts = shapes.eval_prompts(num, seed=seed)
  rows: dict[str, dict[str, float]] = {c: {} for c in (*shapes.CATEGORIES, "overall")}
  # One size at a time: only one size's images are held in memory.
  for wh, imgs in gen.iter_sample([c for _, c, _ in prompts], 1, seed, sizes):
    res = shapes_detector.shapes_eval(list(imgs), prompts)
    for cat, acc in res["per_category"].items():
      rows[cat][common.size_name(wh)] = acc
    rows["overall"][common.size_name(wh)] = res["overall"]
  return common.Result(
      "shapes_eval",
      rows,
      meta={
          "num_per_category": num,
          "num_images": len(prompts),
          "seed": seed,
          "sizes": [common.size_name(s) for s in sizes],
      },
      note=f"{num} prompts per category, one sample each; accuracy in [0, 1].",
  )


NEEDS = base.GENERATOR


def cli(args: common.EvalArgs) -> common.Result:
  """`python -m infdiff.evaluate --metric=shapes_eval`: needs a text-conditioned Generator."""
  gen = runs.load_generator(
      args.workdir, "--metric=shapes_eval", step=args.step, **args.sampler_options
  )
  if not gen.conditional:
    raise ValueError("--metric=shapes_eval needs a text-conditioned generator (it scores prompts)")
  return evaluate(
      gen, num=args.num or DEFAULT_NUM, seed=args.seed, sizes=args.sizes or DEFAULT_SIZES
  )


class Evaluator(common.PeriodicEvaluator):
  """Periodic ShapesEval during stage 2 (ecfg: every, num, seed, sizes)."""

  default_num = 2

  def __init__(self, ecfg):
    super().__init__(ecfg)
    self.sizes = common.ecfg_sizes(ecfg, DEFAULT_SIZES)

  def evaluate(self, ctx):
    gen = common.generator_from_ctx(ctx)
    return evaluate(gen, num=self.num, seed=self.seed, sizes=self.sizes)
