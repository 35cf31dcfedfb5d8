"""Probe of RaPD stage 2 with a convolutional denoiser in place of the DiT.

python scripts/rapd_stage2_unet_probe.py --stage1=S --workdir=W [--steps=1500] [--ch=32]
    [--categories=single_object] [--num=16] [--config.<field>=...]

Trains `configs/rapd.py:long`'s stage 2 on the stage-1 run S (the same latent, flow
matching, text encoder, trainer and Euler sampler) with the DiT swapped for infdiff's ADM
UNet (`infdiff.models.unet.UNet`: levels of ch x (1, 2, 2), one ResBlock per level,
attention at 8^2), conditioned on the mean of the text-encoder tokens through its cond MLP
(no cross-attention). Then prints `scripts/shapes_class_confusion.py`'s table for the run.
The question: is the DiT's lack of a convolutional prior what keeps stage 2 from drawing
the prompted class within a CPU budget? Not a method: nothing here is reachable from
`infdiff.main`, and its runs load only through this script.
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from infdiff import runs, train
from infdiff.methods.rapd import stage2
from infdiff.models.unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", f"{ROOT}/configs/rapd.py:long")
flags.DEFINE_string("stage1", None, "A finished RaPD run (its rapd_stage1 is loaded).")
flags.DEFINE_string("workdir", None, "Output run directory.")
flags.DEFINE_integer("steps", 1500, "Stage-2 steps.")
flags.DEFINE_integer("ch", 32, "UNet base channels.")
flags.DEFINE_list("categories", ["single_object"], "Training scene categories ('all': six).")
flags.DEFINE_integer("num", 16, "Samples per class of the confusion table.")
flags.mark_flags_as_required(["stage1", "workdir"])


class PooledTextUNet(nn.Module):
  """The DiT's call signature over a UNet: the masked mean of the text tokens is `cond`."""

  in_channels: int
  text_dim: int
  ch: int = 32

  @nn.compact
  def __call__(self, x, t, text, text_mask, train: bool = False, return_repa: bool = False):
    if return_repa:
      raise ValueError("the UNet probe has no REPA features")
    m = text_mask.astype(jnp.float32)[..., None]  # all zeros: the CFG-dropped caption
    pooled = (text * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    net = UNet(
        image_size=x.shape[1],
        ch=self.ch,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=4,
        norm_groups=16,
        out_channels=self.in_channels,
        cond_dim=self.text_dim,
    )
    return net(x, t * 1000.0, pooled, train=train)


def _patch_denoiser() -> None:
  stage2.build_dit = lambda cfg, text_width, channels: PooledTextUNet(
      channels, text_width, FLAGS.ch
  )


def _config():
  c = FLAGS.config  # configs/rapd.py:long unless --config says otherwise
  c.stages = ("rapd_stage2",)
  c.rapd_stage2.stage1_workdir = FLAGS.stage1
  c.total_steps = FLAGS.steps
  if FLAGS.categories != ["all"]:
    c.data.shapes_categories = tuple(FLAGS.categories)
  return c


def main(argv):
  del argv
  _patch_denoiser()
  train.train_and_evaluate(_config(), FLAGS.workdir)
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  from shapes_class_confusion import confusion, print_table

  print_table(
      confusion(runs.load_generator(FLAGS.workdir), FLAGS.num, "red", 32), FLAGS.num, "red", 32
  )


if __name__ == "__main__":
  app.run(main)
