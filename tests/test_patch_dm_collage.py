"""Patch-DM bookkeeping: padding, split/merge, collage geometry, positions."""

import jax.numpy as jnp
import numpy as np
import pytest

from infdiff.methods.patch_dm import collage


def test_split_merge_round_trip_and_tile_order():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  tiles = collage.split(x, 4)
  assert tiles.shape == (2, 2, 3, 4, 4, 3)
  np.testing.assert_array_equal(tiles[1, 1, 2], x[1, 4:8, 8:12])  # tile (i, j) = rows 4i..
  np.testing.assert_array_equal(collage.merge(tiles), x)


def test_padded_grid_round_trips_the_image():
  """Pad by p/2, cut the padded grid, merge and crop: the image exactly, zeros around."""
  p = 8
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 24, 3)), jnp.float32)
  padded = collage.pad_half(x, p)
  assert padded.shape == (1, 24, 32, 3)
  tiles = collage.split(padded, p)
  assert tiles.shape[1:3] == (3, 4)  # (H/p + 1) x (W/p + 1)
  back = collage.merge(tiles)
  np.testing.assert_array_equal(back[:, 4:20, 4:28], x)
  m = collage.padded_mask(16, 24, p)
  assert m.sum() == 16 * 24 and m[4:20, 4:28].all()
  np.testing.assert_array_equal(np.asarray(padded)[0][m == 0], 0.0)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_collage_quadrants_land_where_the_split_functions_put_them(r):
  """Each 2x2 block's collage = bottom-right of its top-left tile | bottom-left of the
  top-right / top-right of the bottom-left | top-left of the bottom-right."""
  h = r // 2
  tiles = jnp.asarray(np.random.default_rng(r).normal(size=(2, 3, 4, r, r, 5)), jnp.float32)
  out = collage.collage(tiles)
  assert out.shape == (2, 2, 3, r, r, 5)
  t = np.asarray(tiles)
  for i in range(2):
    for j in range(3):
      o = np.asarray(out[:, i, j])
      np.testing.assert_array_equal(o[:, :h, :h], t[:, i, j, h:, h:])  # P1: top-left tile
      np.testing.assert_array_equal(o[:, :h, h:], t[:, i, j + 1, h:, :h])  # P2: top-right
      np.testing.assert_array_equal(o[:, h:, :h], t[:, i + 1, j, :h, h:])  # P3: bottom-left
      np.testing.assert_array_equal(o[:, h:, h:], t[:, i + 1, j + 1, :h, :h])  # P4


def test_collage_of_padded_pixels_is_the_image_patch():
  """At the pixel level the collage of the padded grid is exactly the image's patches:
  the shifted patch (i, j) covers image patch (i, j)."""
  p = 8
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16, 24, 3)), jnp.float32)
  shifted = collage.collage(collage.split(collage.pad_half(x, p), p))
  np.testing.assert_array_equal(shifted, collage.split(x, p))


def test_positions_are_patch_centres():
  ipos = collage.image_positions(2, 3)
  ppos = collage.padded_positions(2, 3)
  assert ipos.shape == (2, 3, 2) and ppos.shape == (3, 4, 2)
  np.testing.assert_array_equal(ipos[1, 2], [1.5, 2.5])
  np.testing.assert_array_equal(ppos[2, 3], [2.0, 3.0])
  # Padded patch (i, j) is centred on the corner shared by image patches (i-1..i, j-1..j):
  # the shifted patch of the block at (i, j) sits half a patch further, at image patch (i, j).
  np.testing.assert_array_equal(ppos[:2, :3] + 0.5, ipos)


def test_check_patch_errors():
  collage.check_patch(64, 128, 16, levels=3)
  with pytest.raises(ValueError, match="multiples of 16"):
    collage.check_patch(64, 72, 16, levels=3)
  with pytest.raises(ValueError, match="even feature side"):
    collage.check_patch(64, 64, 8, levels=4)  # bottleneck side 8 / 2^3 = 1: odd
  with pytest.raises(ValueError, match="even feature side"):
    collage.collage(jnp.zeros((1, 2, 2, 3, 3, 1)))
