"""INFD inference: the stage-1 `FieldAutoencoder` and the pure functions the latent stage uses.

Encoding maps [0, 1] images of the encoder's input size to the un-quantised latent z
[N, h, w, C] (h = enc_size / 4 for VQ-f4; the KL mean for a KL bottleneck): what the
latent DDPM models. Rendering decodes each latent once to phi (quantise, post_quant_conv,
decoder; LDM's decode of a diffusion sample) at the decoder's grid, then draws phi with
CLIF at any H x W through the tiled renderer (infdiff/render.py), tiles of `tile` pixels
with a halo of max(render_pad, CLIF.halo()) pixels, so memory is bounded by a chunk of
phi maps plus a few tiles. CLIF with norm='none' tiles seamlessly (tiled == untiled);
norm='group' (the paper's) differs slightly at tile seams (GroupNorm statistics per tile).
Renders are returned in [0, 1], not clipped (the model's [-1, 1] mapped by (x + 1) / 2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import render as render_lib
from infdiff.methods import base
from infdiff.models.renderers import renderer_from_config

DEFAULT_TILE = 256  # render tile side when the caller gives none (INFD: 256)
DEFAULT_BATCH = 8  # latents per compiled encode/decode call


def to_unit(rgb: jax.Array) -> jax.Array:
  """The model's [-1, 1] image scale -> [0, 1] (not clipped)."""
  return (rgb + 1.0) * 0.5


@dataclasses.dataclass(frozen=True)
class UnitRenderer(render_lib.RendererFn):
  """The CLIF as a tiled-render apply_fn: output in [0, 1], halo >= `pad` (INFD's 8)."""

  pad: int = 8  # tile halo in output pixels (config render_pad)

  def __call__(self, variables, latent, coords, cells, valid=None) -> jax.Array:
    return to_unit(self.module.apply(variables, latent, coords, cells, valid))

  @property
  def halo(self) -> int:
    return max(int(self.pad), self.module.halo())


def decode(model, params, z: jax.Array) -> jax.Array:
  """Pure: un-quantised latents z [B, h, w, C] -> phi [B, H, W, F] (VQ quantises first).

  Args:
    model: the stage's `INFDAutoencoder` (`Method.model`).
    params: its parameter tree (`Method.inference_params(run.params)`).
    z: latents.
  """
  return model.apply({"params": params}, z, method="decode")


def render_points(model, params, phi, coords, cells) -> jax.Array:
  """Pure, differentiable, untiled: phi, coords [B, H, W, 2], cells [B, 2] -> rgb [B, H, W, 3]
  in [0, 1] (not clipped). For small renders (e.g. a box for guidance); use
  `Autoencoder.render` for large ones."""
  return to_unit(model.apply({"params": params}, phi, coords, cells, method="render"))


class Autoencoder(base.FieldAutoencoder):
  """INFD stage 1 as a `FieldAutoencoder`, plus the functions the latent stage needs.

  Jitted functions are built once per instance; the parameters are call arguments, so a
  training-time evaluator reuses the compiled code as the parameters change.

  Attributes:
    input_size: (enc_size, enc_size), the encoder's input.
    latent_shape: (h, w, C) of one latent.
    params: the INFDAutoencoder parameter tree in use.
  """

  def __init__(self, model, cfg, params, *, tile=None, batch=None, select=lambda p: p):
    self.model = model  # INFDAutoencoder
    self.cfg = cfg  # the infd_ae config section
    self.select = select  # the method's parameters -> the model's tree
    self.params = select(params)
    e = int(cfg.enc_size)
    self.input_size = (e, e)
    f = 2 ** (len(cfg.ae.ch_mult) - 1)
    self.latent_shape = (e // f, e // f, int(cfg.ae.z_channels))
    self.tile = int(tile or DEFAULT_TILE)
    self.batch = int(batch or DEFAULT_BATCH)
    module = renderer_from_config(cfg.renderer, dtype=jnp.dtype(cfg.dtype))
    self.renderer = UnitRenderer(module, pad=int(cfg.get("render_pad", 8)))
    self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    self._decode = jax.jit(lambda p, z: decode(model, p, z))

  def set_params(self, params, aux=None) -> None:
    del aux
    self.params = self.select(params)

  # --- the FieldAutoencoder contract ---------------------------------------------------
  def encode(self, images: np.ndarray) -> np.ndarray:
    """[N, enc, enc, 3] in [0, 1] -> un-quantised latents [N, h, w, C], `batch` per call."""
    return self.encode_in_chunks(self._encode, self.params, images, self.batch)

  def render(self, latents, height: int, width: int, *, tile: int | None = None, out=None):
    """[N, h, w, C] latents -> [N, height, width, 3] float32 in [0, 1] (not clipped).

    Each chunk of `batch` latents is decoded to phi once, then rendered in tiles straight
    into `out` (optional preallocated float32 or uint8 array).
    """
    n = len(latents)
    if out is None:
      out = np.empty((n, height, width, 3), np.float32)  # [N, H, W, 3]
    elif out.shape != (n, height, width, 3):
      raise ValueError(f"out has shape {out.shape}, expected {(n, height, width, 3)}")
    tile = int(tile or self.tile)
    b = max(1, min(self.batch, n))
    variables = {"params": self.params["renderer"]}
    with render_lib.memory_hint(
        f"rendering {n} latents at {width}x{height}", "--tile or the render batch"
    ):
      for s in range(0, n, b):
        chunk = np.asarray(latents[s : s + b], np.float32)
        k = len(chunk)
        phi = self._decode(self.params, jnp.asarray(base.pad_batch(chunk, b)))  # [b, H', W', F]
        if k == b:
          render_lib.render_image(
              self.renderer, variables, phi, height, width, tile=tile, out=out[s : s + k]
          )
        else:
          img = render_lib.render_image(self.renderer, variables, phi, height, width, tile=tile)
          if out.dtype == np.uint8:
            out[s : s + k] = np.clip(img[:k], 0.0, 1.0) * 255.0 + 0.5
          else:
            out[s : s + k] = img[:k]
    return out

  # --- pure functions for the latent stage ---------------------------------------------
  def decode_fn(self):
    """`(z [B, h, w, C]) -> phi`, pure and differentiable, the current parameters closed
    over (quantises first for VQ, like LDM's decode of a diffusion sample)."""
    model, params = self.model, self.params
    return lambda z: decode(model, params, z)

  def render_points_fn(self):
    """`(phi, coords [B, H, W, 2], cells [B, 2]) -> rgb [B, H, W, 3]` in [0, 1], pure,
    differentiable and untiled, the current parameters closed over."""
    model, params = self.model, self.params
    return lambda phi, coords, cells: render_points(model, params, phi, coords, cells)
