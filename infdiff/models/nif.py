"""The neural-image-field autoencoder: encoder -> dense latent -> renderer at any grid.

Used by RaPD stage 1 (EDSR + CQAR + distillation branch) and, with another encoder or
renderer chosen by config, by the other field-based methods.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from infdiff.fields import pool_to_grid
from infdiff.models.edsr import EDSREncoder
from infdiff.models.projectors import DistillProjection
from infdiff.models.renderers import make_renderer


class NIFAutoencoder(nn.Module):
  """Image [B, r, r, 3] in [0, 1] -> latent [B, r, r, C] -> RGB at any query grid."""

  encoder: Any  # kwargs of EDSREncoder (features, n_resblocks, latent_channels, ...)
  renderer: Any  # {'name': 'cqar'|'liif'|'clif', **kwargs of that renderer}
  teacher_dim: int = 0  # width of the distillation teacher; 0 = no projection branch
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.enc = EDSREncoder(**dict(self.encoder), dtype=self.dtype, param_dtype=self.param_dtype)
    kw = dict(self.renderer)
    name = kw.pop("name")
    self.dec = make_renderer(name, **kw, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.teacher_dim:
      self.proj = DistillProjection(
          self.teacher_dim, dtype=self.dtype, param_dtype=self.param_dtype
      )

  def encode(self, image):  # [B, r, r, 3] -> [B, r, r, C]
    return self.enc(image)

  def render(self, latent, coords, cells):  # -> [B, H, W, 3]
    return self.dec(latent, coords, cells)

  def project(self, latent, h: int, w: int):  # [B, r, r, C] -> [B, h*w, D]
    pooled = pool_to_grid(latent, h, w)
    out = self.proj(pooled.astype(self.dtype))
    return out.reshape(out.shape[0], h * w, -1)

  def __call__(self, image, coords, cells, teacher_hw=None):
    z = self.encode(image)
    out = {"latent": z, "rgb": self.render(z, coords, cells)}
    if self.teacher_dim and teacher_hw is not None:
      out["student"] = self.project(z, *teacher_hw)
    return out
