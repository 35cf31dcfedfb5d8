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

from absl import app, flags

from infdiff import guide

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
  got = guide.held_out_inputs(
      FLAGS.workdir,
      FLAGS.canvas,
      FLAGS.out,
      factor=FLAGS.factor,
      crop=FLAGS.crop,
      index=FLAGS.index,
      hole=FLAGS.hole,
  )
  s = FLAGS.canvas
  print(
      json.dumps(
          {
              "lowres": f"--lowres={got['lowres']}",
              "crop": f"--crop={got['crop']}",
              "half": f"--crop={got['half']}",
              "ring": " ".join(f"--crop={c}" for c in got["ring"]),
              "colours": f"--colours={got['colours']}",
              "canvas": f"--canvas={s}x{s}",
          }
      )
  )


if __name__ == "__main__":
  app.run(main)
