"""Stage-1 reconstruction at output scales 1x, 2x and 4x, against a bicubic baseline.

Protocol (r = stage-1 enc_size):
  1. For each held-out image take a square crop of side 4r (a random position from
     `seed`; an image whose short side is under 4r is first enlarged bicubically so
     that it fits). Shapes scenes are rendered directly at 4r x 4r (exact at any size).
  2. Ground truth at scale k: the crop area-downsampled to (k r)^2 (k = 4 is the crop).
  3. Encoder input: the crop area-downsampled to r^2 (what stage 1 was trained to see).
  4. Model: encode, then render the latent at (k r)^2 with tiled rendering, clipped to
     [0, 1]. Baseline: bicubic upsampling of the encoder input to (k r)^2
     (`metrics.bicubic_upsample`, clipped). At 1x the baseline is the input itself.
  5. PSNR and SSIM per image (data range 1), averaged; LPIPS too when a VGG16-LPIPS
     checkpoint is given.
Rows 1x / 2x / 4x; columns model_* and bicubic_*.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import runs
from infdiff.evaluators import common, metrics
from infdiff.fields import area_downsample
from infdiff.methods import base

SCALES = (1, 2, 4)
NEEDS = base.AUTOENCODER
DEFAULT_NUM = 16


def validate(args: common.EvalArgs) -> None:
  if args.sizes:
    raise ValueError(
        f"--size does not apply to {args.metric}: it renders at 1x, 2x, 4x of the encoder input"
    )


def _lpips_fn(path: str | None):
  if not path:
    return None
  from infdiff import pretrained

  model, params = pretrained.load("lpips_vgg16", path)
  fn = jax.jit(lambda a, b: model.apply(params, a, b))

  def lpips(a, b):
    out = [
        np.asarray(fn(jnp.asarray(a[s : s + 8]), jnp.asarray(b[s : s + 8])))
        for s in range(0, len(a), 8)
    ]
    return np.concatenate(out)

  return lpips


def crops(source, num: int, side: int, seed: int) -> np.ndarray:
  """[num, side, side, 3] held-out crops (step 1 of the protocol).

  Crop j comes from image j % len(source) at a position drawn from (seed, j), so a small
  held-out set (e.g. the one colour photo the built-in `photos` hold out) gives `num`
  different crops instead of `len(source)`.
  """
  return np.stack(
      [
          common.square_crop(source, j % len(source), side, np.random.default_rng([seed, j]))
          for j in range(num)
      ]
  )


def evaluate(
    ae: base.FieldAutoencoder,
    source,
    *,
    num: int = DEFAULT_NUM,
    seed: int = 0,
    scales=SCALES,
    lpips=None,
    tile: int | None = None,
) -> common.Result:
  """The reconstruction table of one stage-1 model on held-out images (module docstring).

  Args:
    ae: the autoencoder.
    source: held-out data source.
    num: number of crops: shapes scenes (at most the source's size), or random crops
      cycling over the held-out files.
    seed: crop positions.
    scales: output scales k.
    lpips: optional `(a, b) -> [N]` LPIPS distances.
    tile: render tile side (None: the autoencoder's default).

  Returns:
    Result with rows '<k>x' and columns model_psnr, model_ssim, bicubic_psnr,
    bicubic_ssim (+ model_lpips, bicubic_lpips).
  """
  r = square_input(ae)
  images = common.num_images(source, num)
  # Analytic scenes are whole images (one crop each); file images give num random crops.
  n = images if hasattr(source, "scene") else num
  big = crops(source, n, max(scales) * r, seed)  # [N, 4r, 4r, 3]

  def down(x, s):  # [N, S, S, 3] -> [N, s, s, 3], exact box filter per image
    return np.stack([np.asarray(area_downsample(im, s, s)) for im in x])

  inputs = down(big, r)  # [N, r, r, 3]
  z = ae.encode(inputs)
  rows = {}
  for k in scales:
    s = k * r
    gt = down(big, s)  # [N, kr, kr, 3]
    model = np.clip(ae.render(z, s, s, tile=tile), 0.0, 1.0)
    bicubic = np.asarray(metrics.bicubic_upsample(inputs, s, s))
    row = {}
    for name, img in (("model", model), ("bicubic", bicubic)):
      row[f"{name}_psnr"] = float(np.mean(np.asarray(metrics.psnr(img, gt))))
      row[f"{name}_ssim"] = float(np.mean(np.asarray(metrics.ssim(img, gt))))
    if lpips is not None:
      row["model_lpips"] = float(np.mean(lpips(model, gt)))
      row["bicubic_lpips"] = float(np.mean(lpips(bicubic, gt)))
    rows[f"{k}x"] = row
  # Order columns: model first, then the baseline.
  order = [f"{m}_{q}" for m in ("model", "bicubic") for q in ("psnr", "ssim", "lpips")]
  rows = {k: {c: v[c] for c in order if c in v} for k, v in rows.items()}
  return common.Result(
      "recon",
      rows,
      meta={
          "num_images": images,
          "num_crops": n,
          "enc_size": r,
          "crop": max(scales) * r,
          "seed": seed,
      },
      note=(
          f"{n} crops of {images} held-out images, crop {max(scales) * r}^2, "
          f"encoder input {r}^2; PSNR dB."
      ),
  )


def square_input(ae: base.FieldAutoencoder) -> int:
  """The side r of an autoencoder with a square encoder input (the protocol's r)."""
  h, w = ae.input_size
  if h != w:
    raise ValueError(f"the protocol needs a square encoder input, this one is {w}x{h}")
  return int(h)


def cli(args: common.EvalArgs) -> common.Result:
  """`python -m infdiff.evaluate --metric=recon`: the run's autoencoder on held-out data."""
  ae = runs.load_autoencoder(args.workdir, "--metric=recon", step=args.step)
  source = common.held_out_source(common.run_data_config(args.workdir, args.data))
  lpips = _lpips_fn(args.lpips)
  return evaluate(
      ae, source, num=args.num or DEFAULT_NUM, seed=args.seed, lpips=lpips, tile=args.tile
  )


class Evaluator(common.PeriodicEvaluator):
  """Periodic recon during stage 1 (ecfg: every, num, seed, lpips_path, tile)."""

  def __init__(self, ecfg):
    super().__init__(ecfg)
    self._lpips = _lpips_fn(common.ecfg_get(ecfg, "lpips_path", ""))

  def evaluate(self, ctx):
    tile = int(common.ecfg_get(self.ecfg, "tile", common.DEFAULT_TILE))
    ae = common.autoencoder_from_ctx(ctx)
    return evaluate(
        ae, self.source(ctx), num=self.num, seed=self.seed, lpips=self._lpips, tile=tile
    )
