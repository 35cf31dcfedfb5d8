"""Initial Patch-DM semantic codes from CLIP image embeddings (paper §5.1: ViT-B/16).

Every training image (the whole image, as the main stage's transform gives it) is
embedded by the local CLIP port (`infdiff.pretrained.load('clip', DIR)`, with CLIP's own
preprocessing: centre crop, resize to the tower's input). The code width must equal
CLIP's projection width (the paper: 512-d codes from ViT-B/16's 512-d embeddings);
otherwise a one-line error names both. The table then trains jointly as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from infdiff.data import decode, pipeline, sources, transforms


def embed_training_images(config, clip_dir: str, code_dim: int, batch: int = 32) -> np.ndarray:
  """[N, code_dim] CLIP image embeddings of the N training images, in source order."""
  from infdiff import pretrained

  clip, params = pretrained.load("clip", clip_dir)
  if int(clip.projection_dim) != int(code_dim):
    raise ValueError(
        f"patch_dm.code.clip_init: CLIP's embeddings are {clip.projection_dim}-d but "
        f"patch_dm.code.dim={code_dim}; set the code width to {clip.projection_dim}"
    )
  cfg = config.patch_dm
  transform = transforms.ResizeTo(int(cfg.image_height), int(cfg.image_width))
  source = pipeline.source_from_config(config.data, split="train")
  embed = jax.jit(lambda p, x: clip.apply(p, images=x)["image_embeds"])
  rng = np.random.default_rng(0)
  blank = np.full((int(cfg.image_height), int(cfg.image_width), 3), 0.5, np.float32)
  out, skipped = [], 0
  for start in range(0, len(source), batch):
    imgs = []
    for i in range(start, min(start + batch, len(source))):
      try:
        record = sources.load_record(source[i], min_size=1, max_pixels=int(config.data.max_pixels))
        imgs.append(transform(record, rng, rng)["image"])
      except decode.DecodeError:  # the loader skips it too; its code stays a grey image's
        skipped += 1
        imgs.append(blank)
    out.append(np.asarray(jax.device_get(embed(params, jnp.asarray(np.stack(imgs))))))
  codes = np.concatenate(out).astype(np.float32)
  logging.info(
      "patch_dm: %d codes initialised from CLIP image embeddings (%d undecodable images "
      "got a grey image's)",
      len(codes),
      skipped,
  )
  return codes
