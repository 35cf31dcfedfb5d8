"""InfGen inference: the two `FieldAutoencoder`s of the method.

- `VAEAutoencoder` (stage `vae`): the SD-layout VAE's encoder (posterior mean) and its own
  decoder at the native size, bicubically resized to the requested size. This is the
  "VAE decoder, then interpolation" baseline the supplement compares with (Figs. 10-13);
  it also lets a latent DDPM on the VAE draw samples without InfGen.
- `InfGenAutoencoder` (stage `infgen`): the same frozen encoder, and InfGen's decoder
  drawing the latent at any H x W through the tiled renderer (infdiff/render.py): tiles
  of `tile` output pixels with the decoder's halo, cross-attention over query chunks, so
  memory is bounded by one tile whatever the output size.

Both take and give latents in the VAE's own units (no scaling factor): a latent DDPM
divides its samples by its scale before rendering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import fields
from infdiff import render as render_lib
from infdiff.methods import base

DEFAULT_TILE = 256  # render tile side (output pixels) when the caller gives none
DEFAULT_BATCH = 8  # latents per compiled encode / decode call


class FrozenEncoder:
  """The SD-layout VAE's encoder as a pure function: images in [0, 1] -> mean, logvar."""

  def __init__(self, vae, variables, image_size: int):
    self.vae = vae  # infdiff.models.sd_vae.SDVAE
    self.variables = variables  # {'params': tree}
    self.image_size = int(image_size)
    self.factor = 2 ** (len(vae.block_out_channels) - 1)  # SD: 8
    side = self.image_size // self.factor  # the encoder floors at each stride-2 level
    self.latent_shape = (side, side, int(vae.latent_channels))

  def moments(self, variables, images):
    out = self.vae.apply(variables, images, method=self.vae.encode)
    return out["mean"].astype(jnp.float32), out["logvar"].astype(jnp.float32)


class _Encoding(base.FieldAutoencoder):
  """Shared encode: the posterior mean of `batch` images per compiled call."""

  def _init_encoder(self, encoder: FrozenEncoder, batch):
    self.encoder = encoder
    self.input_size = (encoder.image_size, encoder.image_size)
    self.latent_shape = encoder.latent_shape
    self.batch = int(batch or DEFAULT_BATCH)
    self._encode = jax.jit(lambda v, x: encoder.moments(v, x)[0])

  def encode(self, images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] in [0, 1] -> posterior means [N, S/8, S/8, C] (unscaled)."""
    return self.encode_in_chunks(self._encode, self.encoder.variables, images, self.batch)


class VAEAutoencoder(_Encoding):
  """The VAE itself: decode at the native size, then bicubic resize to the requested size."""

  def __init__(self, vae, params, image_size: int, *, batch=None, tile=None):
    del tile  # a native decode has no tiles
    self.vae = vae
    self.params = params
    self._init_encoder(FrozenEncoder(vae, {"params": params}, image_size), batch)
    self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    self._resize = jax.jit(
        lambda x, h, w: jax.image.resize(x, (x.shape[0], h, w, 3), "bicubic"),
        static_argnums=(1, 2),
    )

  def set_params(self, params, aux=None) -> None:
    del aux
    self.params = params.get("model", params)  # the stage's {group: params} or the tree
    self.encoder.variables = {"params": self.params}

  def decode_native(self, latents) -> np.ndarray:
    """[N, h, w, C] -> the VAE decoder's [N, 8h, 8w, 3] in [0, 1] (not clipped)."""
    out = []
    b = max(1, min(self.batch, len(latents)))
    for s in range(0, len(latents), b):
      chunk = np.asarray(latents[s : s + b], np.float32)
      x = self._decode(self.params, jnp.asarray(base.pad_batch(chunk, b)))
      out.append(np.asarray(x)[: len(chunk)])
    return np.concatenate(out)

  def render(self, latents, height: int, width: int, *, tile=None):
    """Native decode, then bicubic (antialiased when shrinking) to height x width."""
    del tile
    img = self.decode_native(latents)
    if img.shape[1:3] == (height, width):
      return img
    return np.asarray(self._resize(jnp.asarray(img), int(height), int(width)))

  # Guidance (`base.GuidablePrior` of a latent DDPM on this VAE): pixels are the field.
  def decode_fn(self):
    vae, params = self.vae, self.params
    return lambda z: vae.apply({"params": params}, z, method=vae.decode)

  def render_points_fn(self):
    return lambda img, coords, cells: fields.interpolate_latent(img, coords, "bicubic")


class InfGenAutoencoder(_Encoding):
  """The frozen VAE encoder and InfGen's decoder, tiled at any output size."""

  def __init__(self, decoder, params, encoder: FrozenEncoder, *, tile=None, batch=None):
    self.decoder = decoder  # infdiff.models.infgen.InfGenDecoder
    self.params = params  # the decoder's parameter tree
    self._init_encoder(encoder, batch)
    self.tile = int(tile or DEFAULT_TILE)
    self.renderer = render_lib.RendererFn(decoder)

  def set_params(self, params, aux=None) -> None:
    del aux
    self.params = params.get("model", params)  # the stage's {group: params} or the tree

  def render(self, latents, height: int, width: int, *, tile=None, out=None):
    """[N, h, w, C] unscaled latents -> [N, height, width, 3] in [0, 1] (not clipped)."""
    with render_lib.memory_hint(
        f"decoding {len(latents)} latents at {width}x{height}", "--tile or the render batch"
    ):
      return render_lib.render_latents(
          self.renderer,
          {"params": self.params},
          np.asarray(latents, np.float32),
          int(height),
          int(width),
          batch=self.batch,
          tile=int(tile or self.tile),
          out=out,
      )

  # Guidance (`base.GuidablePrior` of a latent DDPM on this VAE): the latent is the field.
  def decode_fn(self):
    return lambda z: z

  def render_points_fn(self):
    decoder, params = self.decoder, self.params
    return lambda z, coords, cells: decoder.apply({"params": params}, z, coords, cells)
