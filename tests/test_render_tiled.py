"""Tiled rendering reproduces the untiled render; crops follow the coordinate convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff import fields, render
from infdiff.models.renderers import make_renderer

H, W = 333, 517  # odd sizes: neither a multiple of the tile nor of the CQAR window
TINY = {
    "cqar": dict(dim=8, depth=4, num_heads=2, window=8),  # halo 16, align 8
    "clif": dict(features=8, rgb_base="bilinear"),  # halo 8; the base needs no halo
    "liif": dict(hidden=(16,), rgb_base="bicubic"),  # halo 0
}


class CountingFn:
  """Renderer apply function that counts how often it is traced."""

  def __init__(self, module):
    self.inner = render.RendererFn(module)
    self.halo = self.inner.halo
    self.tile_align = self.inner.tile_align
    self.traces = 0

  def __call__(self, *args):
    self.traces += 1
    return self.inner(*args)


@pytest.fixture(scope="module", params=["cqar", "clif", "liif"])
def setup(request):
  """(name, module, variables, latent, untiled H x W render) for one renderer."""
  name = request.param
  model = make_renderer(name, **TINY[name])
  latent = jax.random.normal(jax.random.key(0), (2, 7, 9, 4))  # [B, h, w, C]
  coords = jnp.broadcast_to(jnp.asarray(fields.coord_grid(H, W)), (2, H, W, 2))
  cells = jnp.broadcast_to(jnp.asarray(fields.cell_size(H, W)), (2, 2))
  variables = jax.jit(model.init)(jax.random.key(1), latent, coords[:, :8, :8], cells)
  full = np.asarray(jax.jit(model.apply)(variables, latent, coords, cells))  # [B, H, W, 3]
  return name, model, variables, latent, full


def test_tiled_equals_untiled_and_traces_once(setup):
  name, model, variables, latent, full = setup
  fn = CountingFn(model)
  # 15 tiles in calls of 4: the last call is padded.
  tiled = render.render_image(fn, variables, latent, H, W, tile=128, tiles_per_call=4)
  assert tiled.shape == (2, H, W, 3)
  np.testing.assert_allclose(tiled, full, atol=1e-4, rtol=0)
  # A second output size reuses the compiled tile renderer.
  other = render.render_image(fn, variables, latent, 200, 150, tile=128, tiles_per_call=4)
  assert other.shape == (2, 200, 150, 3) and np.all(np.isfinite(other))
  assert fn.traces == 1


def test_crop_of_large_render_matches_full_render(setup):
  name, model, variables, latent, full = setup
  top, left, h, w = 37, 101, 50, 77
  fn = render.RendererFn(model)
  # tile=100 is rounded up to the CQAR window lattice (104); origins stay on the lattice.
  crop = render.render_image(fn, variables, latent, H, W, tile=100, crop=(top, left, h, w))
  np.testing.assert_allclose(crop, full[:, top : top + h, left : left + w], atol=1e-4, rtol=0)
  if name == "liif":
    # Pointwise: the raw crop call needs no halo.
    raw = render.render_crop(fn, variables, latent, H, W, top, left, h, w)
    np.testing.assert_allclose(np.asarray(raw), full[:, top : top + h, left : left + w], atol=1e-5)


def test_halo_is_necessary(setup):
  """With less context than `halo()` the tiles of CQAR/CLIF disagree with the full render;
  pointwise LIIF is exact with no halo at all."""
  name, model, variables, latent, full = setup
  small = {"cqar": 8, "clif": 4, "liif": 0}[name]
  window = (100, 100, 60, 60)  # holds the seams at row 128 and column 128
  fn = render.RendererFn(model)
  tiled = render.render_image(fn, variables, latent, H, W, tile=128, halo=small, crop=window)
  err = np.abs(tiled - full[:, 100:160, 100:160]).max()
  if name == "liif":
    assert err <= 1e-5
  else:
    assert err > 1e-3


def test_render_crop_of_a_virtual_large_image_uses_its_grid():
  model = make_renderer("liif", **TINY["liif"])
  latent = jax.random.normal(jax.random.key(0), (1, 7, 9, 4))
  full_h, full_w, top, left, h, w = 1024, 768, 513, 375, 6, 10
  coords = jnp.asarray(fields.coord_grid(full_h, full_w)[top : top + h, left : left + w])[None]
  cells = jnp.asarray(fields.cell_size(full_h, full_w))[None]
  variables = jax.jit(model.init)(jax.random.key(1), latent, coords, cells)
  expected = jax.jit(model.apply)(variables, latent, coords, cells)
  fn = render.RendererFn(model)
  got = render.render_crop(fn, variables, latent, full_h, full_w, top, left, h, w)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
  # The tile's validity flags the queries outside the image, and only those.
  _, valid = render.tile_inputs(10, 12, -2, 9, 5, 6)
  expected_valid = np.zeros((5, 6), bool)
  expected_valid[2:, :3] = True
  np.testing.assert_array_equal(valid, expected_valid)


def test_render_image_rejects_crop_outside_image():
  fn = render.RendererFn(make_renderer("liif", **TINY["liif"]))
  with pytest.raises(ValueError, match="not inside"):
    render.render_image(fn, {}, jnp.zeros((1, 4, 4, 4)), 64, 64, crop=(60, 0, 8, 8))


def test_out_of_memory_becomes_one_line_naming_the_setting():
  import jax

  from infdiff import cli, render

  with pytest.raises(render.OutOfMemory, match=r"ran out of memory .* lower --tile"):
    with render.memory_hint("rendering 4 latents at 4096x4096", "--tile"):
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 29.7G\nmore")
  assert render.OutOfMemory in cli.USER_ERRORS  # the CLIs print it as one line, exit 2
  with pytest.raises(jax.errors.JaxRuntimeError):  # other runtime errors pass through
    with render.memory_hint("rendering", "--tile"):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")


def test_render_latents_streams_chunks_into_one_output():
  import jax.numpy as jnp

  from infdiff import render

  def apply_fn(params, latent, coords, cells, valid=None):  # pointwise: mean latent + coords
    del params, cells, valid
    m = jnp.mean(latent, axis=(1, 2, 3))[:, None, None, None]  # [B, 1, 1, 1]
    return m + jnp.concatenate([coords, coords[..., :1]], -1)

  z = np.random.default_rng(0).normal(size=(7, 2, 2, 3)).astype(np.float32)
  out = render.render_latents(apply_fn, None, z, 5, 9, batch=3, tile=4)
  assert out.shape == (7, 5, 9, 3)
  for i in range(7):
    ref = render.render_image(apply_fn, None, jnp.asarray(z[i : i + 1]), 5, 9, tile=4)
    np.testing.assert_allclose(out[i : i + 1], ref, atol=1e-6)
  u8 = render.render_latents(
      apply_fn, None, z, 5, 9, batch=3, tile=4, out=np.zeros((7, 5, 9, 3), np.uint8)
  )
  assert u8.dtype == np.uint8 and u8.max() > 0
