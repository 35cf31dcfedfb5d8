"""Parameter counts of INFD's networks from a config, without allocating them.

python scripts/infd_params.py                       # paper scale (configs/infd.py)
python scripts/infd_params.py --config=configs/infd.py:demo

Prints one row per part (encoder, codebook, decoder, CLIF, PatchGAN, latent UNet), the
sum of the parts, the count of the whole parameter tree (they must agree), and the
paper's Table 1 count for what generation uses: decoder + renderer (INFD: 35.7M; LDM's
decoder alone: 33.0M).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from infdiff import fields
from infdiff.methods import latent_ddpm as ldm
from infdiff.methods.infd import autoencoder

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/infd.py", "INFD config.", lock_config=True)

PAPER_DECODER_RENDERER = 35.7e6  # Table 1: INFD, decoder + renderer
PAPER_LDM_DECODER = 33.0e6  # Table 1: LDM's decoder


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def count(config) -> dict:
  """{part: parameters} plus 'sum_of_parts', 'total' and 'decoder_renderer'."""
  c = config.infd_ae
  model, disc = autoencoder.build_model(c), autoencoder.build_disc(c)
  s = int(c.enc_size)
  image = jnp.zeros((1, s, s, 3), jnp.float32)
  coords = jnp.asarray(fields.coord_grid(8, 8))[None]
  cells = jnp.asarray(fields.cell_size(8, 8))[None]
  unbox = lambda v: jax.tree.map(
      lambda x: x.value if hasattr(x, "value") else x,
      v,
      is_leaf=lambda x: hasattr(x, "value"),
  )
  ae = unbox(jax.eval_shape(lambda r: model.init(r, image, coords, cells), jax.random.key(0)))
  ae = ae["params"]
  dv = unbox(jax.eval_shape(lambda r: disc.init(r, jnp.zeros((1, 32, 32, 3))), jax.random.key(0)))
  side = s // 2 ** (len(c.ae.ch_mult) - 1)
  unet = ldm.build_unet(config.infd_ldm, side, int(c.ae.z_channels))
  x = jnp.zeros((1, side, side, int(c.ae.z_channels)))
  uv = unbox(
      jax.eval_shape(lambda r: unet.init(r, x, jnp.zeros((1,), jnp.int32)), jax.random.key(0))
  )
  parts = {
      "encoder": _count(ae["encoder"]) + _count(ae["quant_conv"]),
      "codebook": _count(ae.get("quantizer", {})),
      "decoder": _count(ae["post_quant_conv"]) + _count(ae["decoder"]),
      "renderer": _count(ae["renderer"]),
      "discriminator": _count(dv["params"]),
      "latent_unet": _count(uv["params"]),
  }
  out = dict(parts)
  out["sum_of_parts"] = sum(parts.values())
  out["total"] = _count(ae) + _count(dv["params"]) + _count(uv["params"])
  out["decoder_renderer"] = parts["decoder"] + parts["renderer"]
  return out


def main(argv):
  del argv
  counts = count(FLAGS.config)
  for k, v in counts.items():
    print(f"{k:>18s} {v / 1e6:10.3f}M")
  print(
      f"decoder + renderer {counts['decoder_renderer'] / 1e6:.2f}M vs the paper's "
      f"{PAPER_DECODER_RENDERER / 1e6:.1f}M; decoder {counts['decoder'] / 1e6:.2f}M vs LDM's "
      f"{PAPER_LDM_DECODER / 1e6:.1f}M"
  )
  print(json.dumps(counts))


if __name__ == "__main__":
  app.run(main)
