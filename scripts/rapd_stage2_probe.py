"""Probes of RaPD stage 2 with the identity as stage 1: the same DiT, flow matching, text
encoder, trainer and Euler sampler, on 32^2 RGB pixels instead of the NIF latent.

python scripts/rapd_stage2_probe.py --stage1=runs/long --workdir=runs/probe_pixels
python scripts/rapd_stage2_probe.py --stage1=runs/long --workdir=runs/probe_memorise \
    --scenes=4 --steps=1500

Trains `configs/rapd.py:long`'s stage 2 (`--steps` steps, ShapesEval of `--num` prompts per
category every 1500 steps and at the end) with the latent replaced by the image itself,
normalised as (x - 0.5) / 0.25, and "rendering" by bilinear resizing. Two questions:
  - does the latent make stage 2 harder than pixels? (compare ShapesEval with the latent
    run of the same steps);
  - is the pipeline right at all? With `--scenes=4` the model must reproduce the four
    training scenes from their captions (the final grid uses those captions).
`--stage1` is a finished stage-1 run; only its encoder size is used (and its vocabulary
data config). Not a method: nothing here is reachable from `infdiff.main`.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
from absl import app, flags

from infdiff import train
from infdiff.data import shapes
from infdiff.methods.rapd import pipeline, stage2

FLAGS = flags.FLAGS
flags.DEFINE_string("stage1", None, "A finished RaPD run (its rapd_stage1 is loaded).")
flags.DEFINE_string("workdir", None, "Output run directory.")
flags.DEFINE_integer("steps", 3000, "Stage-2 steps.")
flags.DEFINE_integer("scenes", 0, "Training scenes (0: the data config's).")
flags.DEFINE_integer("num", 16, "ShapesEval prompts per category.")
flags.mark_flags_as_required(["stage1", "workdir"])

MEAN, STD = 0.5, 0.25  # pixel normalisation standing in for the latent statistics


def _config():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("rapd_config", f"{root}/configs/rapd.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("long")
  c.stages = ("rapd_stage2",)
  c.rapd_stage2.stage1_workdir = FLAGS.stage1
  c.total_steps = FLAGS.steps
  c.evals.shapes_eval.num = FLAGS.num
  if FLAGS.scenes:
    c.data.source_kwargs.num_scenes = FLAGS.scenes
    source = shapes.ShapesSource(size=64, num_scenes=FLAGS.scenes)
    c.rapd_stage2.sample.prompts = tuple(source[i]["caption"] for i in range(FLAGS.scenes))
  return c


def _identity_stage1() -> None:
  """Stage 2 on pixels: 3 'latent' channels, the image as the latent, bilinear render."""
  init = stage2.Method.__init__

  def pixel_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.latent_mean = np.full(3, MEAN, np.float32)
    self.latent_std = np.full(3, STD, np.float32)
    self.latent_size = self.image_size
    self.dit = stage2.build_dit(self.cfg, self.text.encoder.width, 3)

  def render(self, z, height, width):
    z = np.asarray(z, np.float32)
    out = jax.image.resize(z, (z.shape[0], height, width, 3), "linear")
    return np.clip(np.asarray(out), 0.0, 1.0)

  stage2.Method.__init__ = pixel_init
  stage2.Method.normalised_latent = lambda self, aux, image: (image - aux["mean"]) / aux["std"]
  pipeline.TextToImage.render = render


def main(argv):
  del argv
  _identity_stage1()
  train.train_and_evaluate(_config(), FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
