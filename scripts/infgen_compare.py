"""InfGen against interpolation: decoding a fixed-size VAE latent at 1x, 2x and 4x.

python scripts/infgen_compare.py --workdir=W [--num=32] [--scales=1,2,4]

W is a run with an `infgen` stage (its frozen VAE comes from the run's `vae` stage or an
SD directory). For each of `num` held-out images (shapes: scenes rendered analytically at
each size; files: a random square crop, area-filtered to each size), with r the VAE's
input side and z the posterior mean of the r x r image:
  infgen         InfGen's decoder draws z at (k r)^2.
  vae+bicubic    the VAE's decoder at r^2, then bicubic upsampling to (k r)^2
                 (interpolating the generated image: the supplement's Figs. 10-13).
  vae(latent↑)   the VAE's decoder on z bicubically upsampled to k times its side
                 (interpolating the latent).
Columns: PSNR and SSIM against the ground truth at (k r)^2, and sharpness, the gradient
energy (mean squared finite difference) of the output over that of the ground truth
(1 = edges as steep as the truth's, < 1 blurred, > 1 ringing or noise). Writes W/eval/infgen_compare.json.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from infdiff import runs
from infdiff.evaluators import common, metrics
from infdiff.methods.infgen import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory with an infgen stage.")
flags.DEFINE_integer("num", 32, "Held-out images.")
flags.DEFINE_list("scales", ["1", "2", "4"], "Output scales k (output side k r).")
flags.DEFINE_integer("seed", 0, "Crop seed.")
flags.DEFINE_string(
    "figure",
    "",
    "Also write a figure here: ground truth, InfGen and VAE + bicubic at the largest scale for 4 images, and 4 generated samples decoded by InfGen.",
)
flags.mark_flags_as_required(["workdir"])


def sharpness(img: np.ndarray, ref: np.ndarray) -> float:
  """Gradient energy of `img` over that of `ref` ([N, H, W, 3]): mean squared finite
  difference. A step edge blurred over w pixels keeps its total variation but its energy
  falls as 1 / w, so blur gives < 1; ringing and noise give > 1."""

  def energy(x):
    gy, gx = np.diff(x, axis=1)[:, :, :-1], np.diff(x, axis=2)[:, :-1]
    return float(np.mean(gy**2 + gx**2))

  return energy(img) / max(energy(ref), 1e-12)


def vae_of(path: str):
  """The VAE (`pipeline.VAEAutoencoder`) whose encoder the infgen stage froze."""
  run = runs.load_run(path, "infgen")
  return pipeline.VAEAutoencoder(run.method.vae, run.method._vae_params, run.method.cfg.enc_size)


def compare(workdir: str, num: int, scales, seed: int = 0, figure: str = "") -> dict:
  ae = runs.load_run(workdir, "infgen").inference()
  vae = vae_of(workdir)
  r = ae.input_size[0]
  source = common.held_out_source(common.run_data_config(workdir))
  n = min(num, len(source)) if hasattr(source, "scene") else num
  rng = lambda j: np.random.default_rng([seed, j])
  big = max(scales) * r
  crops = [common.square_crop(source, j % len(source), big, rng(j)) for j in range(n)]

  def at(side):  # the ground truth at side^2 (shapes: rendered at that size)
    if hasattr(source, "scene"):
      return np.stack([common.square_crop(source, j, side, rng(j)) for j in range(n)])
    return np.stack([common.resize(c, side, side) for c in crops])

  inputs = at(r)
  z = ae.encode(inputs)  # [N, h, w, C]
  h = z.shape[1]
  native = vae.decode_native(z)
  rows = {}
  for k in scales:
    s = k * r
    gt = at(s)
    outs = {
        "infgen": ae.render(z, s, s),
        "vae+bicubic": np.asarray(metrics.bicubic_upsample(native, s, s)),
        "vae(latent↑)": vae.decode_native(
            np.asarray(jax.image.resize(jnp.asarray(z), (n, k * h, k * h, z.shape[-1]), "cubic"))
        ),
    }
    row = {}
    for name, img in outs.items():
      img = np.clip(img, 0.0, 1.0)
      row[f"{name} psnr"] = float(np.mean(np.asarray(metrics.psnr(img, gt))))
      row[f"{name} ssim"] = float(np.mean(np.asarray(metrics.ssim(img, gt))))
      row[f"{name} sharp"] = sharpness(img, gt)
    rows[f"{k}x ({s}^2)"] = row
    if figure and k == max(scales):
      write_figure(figure, workdir, gt[:4], outs["infgen"][:4], outs["vae+bicubic"][:4], s)
  return {"rows": rows, "num": n, "enc_size": r, "latent": list(z.shape[1:])}


def write_figure(path, workdir, gt, infgen, bicubic, side):
  """Rows: truth, InfGen, VAE + bicubic (held-out), then generated samples via InfGen."""
  from infdiff import sampling

  gen = runs.load_generator(workdir)
  samples = gen.render(gen.latents([""], num=4, seed=0), side, side)
  rows = [gt, infgen, bicubic, samples]
  gap = 4
  n = len(gt)
  canvas = np.ones((4 * side + 3 * gap, n * side + (n - 1) * gap, 3), np.float32)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = i * (side + gap), j * (side + gap)
      canvas[y : y + side, x : x + side] = np.clip(img, 0.0, 1.0)
  sampling.save_png(path, canvas)
  print(f"wrote {path}")


def main(argv):
  del argv
  scales = [int(k) for k in FLAGS.scales]
  out = compare(FLAGS.workdir, FLAGS.num, scales, FLAGS.seed, FLAGS.figure)
  names = ("infgen", "vae+bicubic", "vae(latent↑)")
  print(f"{out['num']} held-out images, VAE input {out['enc_size']}^2, latent {out['latent']}")
  print("| scale | " + " | ".join(f"{m} PSNR / SSIM / sharp" for m in names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for key, row in out["rows"].items():
    cells = [
        f"{row[m + ' psnr']:.2f} / {row[m + ' ssim']:.3f} / {row[m + ' sharp']:.2f}" for m in names
    ]
    print(f"| {key} | " + " | ".join(cells) + " |")
  path = os.path.join(runs.run_root(FLAGS.workdir), "eval", "infgen_compare.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
