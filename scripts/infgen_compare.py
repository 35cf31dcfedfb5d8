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
Columns: PSNR and SSIM against the ground truth at (k r)^2, and sharpness, the mean
gradient magnitude of the output divided by that of the ground truth (1 = as sharp as the
truth, < 1 blurred). Writes W/eval/infgen_compare.json.
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
flags.mark_flags_as_required(["workdir"])


def sharpness(img: np.ndarray, ref: np.ndarray) -> float:
  """Mean gradient magnitude of `img` over that of `ref` ([N, H, W, 3])."""

  def grad(x):
    gy, gx = np.diff(x, axis=1)[:, :, :-1], np.diff(x, axis=2)[:, :-1]
    return float(np.mean(np.sqrt(gy**2 + gx**2)))

  return grad(img) / max(grad(ref), 1e-12)


def vae_of(path: str):
  """The VAE (`pipeline.VAEAutoencoder`) whose encoder the infgen stage froze."""
  run = runs.load_run(path, "infgen")
  return pipeline.VAEAutoencoder(run.method.vae, run.method._vae_params, run.method.cfg.enc_size)


def compare(workdir: str, num: int, scales, seed: int = 0) -> dict:
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
  return {"rows": rows, "num": n, "enc_size": r, "latent": list(z.shape[1:])}


def main(argv):
  del argv
  scales = [int(k) for k in FLAGS.scales]
  out = compare(FLAGS.workdir, FLAGS.num, scales, FLAGS.seed)
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
