"""Scale consistency of stage-1 renders: does a k x render, box-filtered, match the 1x one?

Protocol (r = stage-1 enc_size): held-out images are prepared as in `recon` (4r crop,
area-downsampled to the r^2 encoder input) and encoded. Each latent is rendered at r^2
(1x) and at (k r)^2 for k in (2, 4); the k x render is area-downsampled to r^2
(`metrics.scale_consistency_psnr`) and compared with the 1x render. Renders are clipped
to [0, 1] first, as images would be. An ideal any-resolution renderer integrates one
continuous image over each pixel, so both agree; goal: PSNR >= 35 dB.
Rows '<k>x', column 'psnr' (mean over images) and 'min_psnr' (the worst image).
"""

from __future__ import annotations

import numpy as np

from infdiff import runs
from infdiff.evaluators import common, metrics, recon
from infdiff.fields import area_downsample
from infdiff.methods import base

SCALES = (2, 4)
NEEDS = base.AUTOENCODER
DEFAULT_NUM = 16
validate = recon.validate  # --size is refused: sizes follow from the encoder input
GOAL_DB = 35.0


def evaluate(
    ae: base.FieldAutoencoder,
    source,
    *,
    num: int = DEFAULT_NUM,
    seed: int = 0,
    scales=SCALES,
    tile: int | None = None,
):
  """The scale-consistency table of one autoencoder (module docstring)."""
  r = recon.square_input(ae)
  n = common.num_images(source, num)
  big = recon.crops(source, n, 4 * r, seed)  # [N, 4r, 4r, 3]
  inputs = np.stack([np.asarray(area_downsample(im, r, r)) for im in big])  # [N, r, r, 3]
  z = ae.encode(inputs)
  one = np.clip(ae.render(z, r, r, tile=tile), 0.0, 1.0)  # [N, r, r, 3]
  rows = {}
  for k in scales:
    img_k = np.clip(ae.render(z, k * r, k * r, tile=tile), 0.0, 1.0)  # [N, kr, kr, 3]
    p = np.asarray(metrics.scale_consistency_psnr(img_k, one))  # [N]
    rows[f"{k}x"] = {"psnr": float(np.mean(p)), "min_psnr": float(np.min(p))}
  return common.Result(
      "scale_consistency",
      rows,
      meta={"num_images": n, "enc_size": r, "seed": seed, "goal_db": GOAL_DB},
      note=f"{n} held-out images; render at k*{r} box-filtered to {r} vs render at {r}; "
      f"goal >= {GOAL_DB:.0f} dB.",
  )


def cli(args: common.EvalArgs) -> common.Result:
  """`python -m infdiff.evaluate --metric=scale_consistency`."""
  ae = runs.load_autoencoder(args.workdir, "--metric=scale_consistency", step=args.step)
  source = common.held_out_source(common.run_data_config(args.workdir, args.data))
  return evaluate(ae, source, num=args.num or DEFAULT_NUM, seed=args.seed, tile=args.tile)


class Evaluator(common.PeriodicEvaluator):
  """Periodic scale consistency during stage 1 (ecfg: every, num, seed, tile)."""

  def evaluate(self, ctx):
    tile = int(common.ecfg_get(self.ecfg, "tile", common.DEFAULT_TILE))
    ae = common.autoencoder_from_ctx(ctx)
    return evaluate(ae, self.source(ctx), num=self.num, seed=self.seed, tile=tile)
