"""Patch bookkeeping and feature collage for Patch-DM (METHODS.md: Patch-DM; paper Fig. 2-3).

Frames and positions. An H x W image is an nh x nw grid of p x p *image patches*
(nh = H / p). Padding it by p / 2 on every side gives the *padded grid* of
(nh + 1) x (nw + 1) patches, each straddling four image patches. Positions are patch
centres in patch units of the image frame (row, col):

  image patch (i, j)    centre (i + 0.5, j + 0.5)
  padded patch (i, j)   centre (i, j)

Feature collage. The UNet encoder runs on padded patches. At every level a feature map of
side r (= p / 2^l) is one tile of a mosaic; tiling the padded grid's maps gives an
(nh + 1) r x (nw + 1) r mosaic, and cropping r / 2 from every side leaves the nh r x nw r
mosaic of the *shifted* patches: each is the centre of a 2 x 2 block of padded patches,
made of their inner quarters (the paper's split functions P1..P4: bottom-right of the
top-left patch, bottom-left of the top-right, top-right of the bottom-left, top-left of
the bottom-right), and it covers exactly image patch (i, j). The decoder turns the
collaged maps into the noise of image patch (i, j), at position (i + 0.5, j + 0.5).
Training uses the same operation on one 2 x 2 block (nh = nw = 1).

All functions are shape-static and work on [B, ...] arrays (features channels-last).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infdiff.models import layers


def check_patch(height: int, width: int, patch: int, levels: int = 1) -> None:
  """One-line ValueError unless H, W are multiples of p and p / 2^(levels-1) is even."""
  if patch % 2 or (patch // 2 ** (levels - 1)) % 2 or patch % 2 ** (levels - 1):
    raise ValueError(
        f"patch {patch} must give an even feature side at each of {levels} levels "
        f"(a multiple of {2**levels})"
    )
  if height % patch or width % patch or height <= 0 or width <= 0:
    raise ValueError(
        f"{width}x{height} is not a whole number of {patch}x{patch} patches; "
        f"sizes must be positive multiples of {patch} (e.g. {patch * max(1, width // patch)}x"
        f"{patch * max(1, height // patch)})"
    )


def pad_half(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, H + p, W + p, C], zeros p / 2 wide on every side."""
  h = patch // 2
  return jnp.pad(x, ((0, 0), (h, h), (h, h), (0, 0)))


def split(x: jax.Array, side: int) -> jax.Array:
  """[B, n * s, m * s, C] -> [B, n, m, s, s, C] (tile (i, j) = rows i s.., cols j s..)."""
  b, hh, ww, c = x.shape
  if hh % side or ww % side:
    raise ValueError(f"{hh}x{ww} is not a grid of {side}x{side} tiles")
  return x.reshape(b, hh // side, side, ww // side, side, c).transpose(0, 1, 3, 2, 4, 5)


def merge(tiles: jax.Array) -> jax.Array:
  """Inverse of `split`: [B, n, m, s, s, C] -> [B, n * s, m * s, C]."""
  b, n, m, s, s2, c = tiles.shape
  return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(b, n * s, m * s2, c)


def collage(tiles: jax.Array) -> jax.Array:
  """Feature maps of the padded grid [B, n + 1, m + 1, r, r, C] -> the shifted patches'
  collaged maps [B, n, m, r, r, C] (module docstring; r even)."""
  r = tiles.shape[3]
  if r % 2:
    raise ValueError(f"feature collage needs an even feature side, got {r}")
  mosaic = merge(tiles)
  h = r // 2
  return split(mosaic[:, h : mosaic.shape[1] - h, h : mosaic.shape[2] - h], r)


def image_positions(nh: int, nw: int) -> np.ndarray:
  """Centres of the nh x nw image patches [nh, nw, 2] (row, col), patch units."""
  rows, cols = np.meshgrid(np.arange(nh) + 0.5, np.arange(nw) + 0.5, indexing="ij")
  return np.stack([rows, cols], -1).astype(np.float32)


def padded_positions(nh: int, nw: int) -> np.ndarray:
  """Centres of the (nh + 1) x (nw + 1) padded patches [nh + 1, nw + 1, 2], patch units."""
  rows, cols = np.meshgrid(np.arange(nh + 1), np.arange(nw + 1), indexing="ij")
  return np.stack([rows, cols], -1).astype(np.float32)


def padded_mask(height: int, width: int, patch: int) -> np.ndarray:
  """[H + p, W + p] float32: 1 on the image, 0 on the half-patch padding."""
  h = patch // 2
  m = np.zeros((height + patch, width + patch), np.float32)
  m[h : h + height, h : h + width] = 1.0
  return m


def position_features(pos, dim: int):
  """[..., 2] patch-centre positions (patch units) -> [..., dim] sin-cos features.

  The sinusoids are of position x 16: with the largest period 10^4 they separate the
  quarter-patch steps of a 64-patch-wide canvas well (choice; the paper says sinusoidal).
  """
  flat = pos.reshape(-1, 2)
  return layers.position_embedding(flat * 16.0, dim).reshape(*pos.shape[:-1], dim)
