"""Conditions for `python -m infdiff.guide` taken from one held-out image of a run's data.

python scripts/guide_inputs.py --workdir=W --canvas=128 --out=D [--index=0]

Renders held-out image `index` at canvas x canvas and writes, under D:
  lowres.png   the whole image area-downsampled by `--factor` (super-resolution condition)
  crop.png     its pixels in the box (top, left, side, side) (known high-resolution crop)
  left.png     its left half (inpainting: the right half is unknown)
  ring_*.png   the four bands around a centred hole of side `--hole` (inpainting of a
               masked block: `ring` repeats --crop for each band)
  truth.png    the full canvas, for reference (also the known centre of an outpainting)
and prints the guide flags for each condition: --lowres, --crop and --colours (the mean
colour of each quadrant of the canvas).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from infdiff import fields, sampling
from infdiff.evaluators import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (its data config names the held-out set).")
flags.DEFINE_integer("canvas", 128, "Canvas side in pixels.")
flags.DEFINE_integer("factor", 8, "Downsampling factor of lowres.png.")
flags.DEFINE_integer("crop", 32, "Side of the known crop.")
flags.DEFINE_integer("index", 0, "Held-out image index.")
flags.DEFINE_integer("hole", 0, "Side of the centred unknown block for ring_*.png (0: half).")
flags.DEFINE_string("out", None, "Output directory.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  s = FLAGS.canvas
  source = common.held_out_source(common.run_data_config(FLAGS.workdir))
  img = common.full_image(source, FLAGS.index, s, s)  # [s, s, 3] in [0, 1]
  os.makedirs(FLAGS.out, exist_ok=True)
  sampling.save_png(os.path.join(FLAGS.out, "truth.png"), img)
  low = np.asarray(fields.area_downsample(img, s // FLAGS.factor, s // FLAGS.factor))
  sampling.save_png(os.path.join(FLAGS.out, "lowres.png"), low)
  top = left = (s - FLAGS.crop) // 2
  crop = img[top : top + FLAGS.crop, left : left + FLAGS.crop]
  sampling.save_png(os.path.join(FLAGS.out, "crop.png"), crop)
  sampling.save_png(os.path.join(FLAGS.out, "left.png"), img[:, : s // 2])
  hole = FLAGS.hole or s // 2
  h0 = (s - hole) // 2
  ring = []
  for name, (t, le, h, w) in (
      ("top", (0, 0, h0, s)),
      ("bottom", (h0 + hole, 0, s - h0 - hole, s)),
      ("left", (h0, 0, hole, h0)),
      ("right", (h0, h0 + hole, hole, s - h0 - hole)),
  ):
    path = os.path.join(FLAGS.out, f"ring_{name}.png")
    sampling.save_png(path, img[t : t + h, le : le + w])
    ring.append(f"--crop={t},{le},{path}")
  half = s // 2
  boxes = []
  for t in (0, half):
    for le in (0, half):
      mean = img[t : t + half, le : le + half].reshape(-1, 3).mean(0)
      hexc = "#" + "".join(f"{int(round(float(v) * 255)):02x}" for v in mean)
      boxes.append(f"{t},{le},{half},{half},{hexc}")
  print(
      json.dumps(
          {
              "lowres": f"--lowres={os.path.join(FLAGS.out, 'lowres.png')}",
              "crop": f"--crop={top},{left},{os.path.join(FLAGS.out, 'crop.png')}",
              "half": f"--crop=0,0,{os.path.join(FLAGS.out, 'left.png')}",
              "ring": " ".join(ring),
              "colours": f"--colours={';'.join(boxes)}",
              "canvas": f"--canvas={s}x{s}",
          }
      )
  )


if __name__ == "__main__":
  app.run(main)
