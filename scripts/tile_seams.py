"""Tile seams of any run's autoencoder: tiled render vs one-tile render of the same latent.

python scripts/tile_seams.py --workdir=W [--size=128] [--tile=32] [--num=8]

Encodes `num` held-out images of the run's data (its held-out split), renders each latent
at size x size once in a single tile and once in tiles of `tile` (the renderer's halo
included), and prints the largest and mean absolute differences (images in [0, 1]) and
the same numbers along the tile borders only. A renderer whose output at a point depends
only on a bounded neighbourhood (norm-free CLIF, CQAR, LIIF) gives 0 up to float error;
GroupNorm CLIF normalises with per-tile statistics, so its tiles differ.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from infdiff import runs
from infdiff.evaluators import common, recon

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory with an autoencoder stage.")
flags.DEFINE_integer("size", 128, "Render side.")
flags.DEFINE_integer("tile", 32, "Tile side of the tiled render.")
flags.DEFINE_integer("num", 8, "Held-out images.")
flags.DEFINE_integer("seed", 0, "Crop seed.")
flags.mark_flags_as_required(["workdir"])


def measure(ae, images: np.ndarray, size: int, tile: int) -> dict:
  """{'max', 'mean', 'border_max', 'border_mean'} of |tiled - untiled| over the renders."""
  z = ae.encode(images)
  whole = ae.render(z, size, size, tile=size)
  tiled = ae.render(z, size, size, tile=tile)
  diff = np.abs(tiled - whole)  # [N, S, S, 3]
  border = np.zeros((size, size), bool)
  for k in range(tile, size, tile):  # the two pixel rows / columns on each side of a seam
    border[k - 1 : k + 1] = True
    border[:, k - 1 : k + 1] = True
  return {
      "max": float(diff.max()),
      "mean": float(diff.mean()),
      "border_max": float(diff[:, border].max()) if border.any() else 0.0,
      "border_mean": float(diff[:, border].mean()) if border.any() else 0.0,
  }


def main(argv):
  del argv
  ae = runs.load_autoencoder(FLAGS.workdir, "tile seams")
  source = common.held_out_source(common.run_data_config(FLAGS.workdir))
  r = ae.input_size[0]
  n = common.num_images(source, FLAGS.num)
  images = recon.crops(source, n, r, FLAGS.seed)
  out = measure(ae, images, FLAGS.size, FLAGS.tile)
  print(json.dumps({"workdir": FLAGS.workdir, "size": FLAGS.size, "tile": FLAGS.tile, **out}))


if __name__ == "__main__":
  app.run(main)
