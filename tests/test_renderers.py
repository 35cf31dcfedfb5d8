"""Tests for the EDSR encoder, the Swin helpers and the three renderers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff import fields, render
from infdiff.models import swin
from infdiff.models.edsr import LAST_CONV, EDSREncoder
from infdiff.models.renderers import CLIF, CQAR, LIIF, cqar_tokens, make_renderer, unfold_3x3

TINY = {
    "cqar": dict(dim=16, depth=2, num_heads=2, window=4),
    "liif": dict(hidden=(16, 16)),
    "clif": dict(features=8),
}


def _queries(b, h, w):
  coords = jnp.broadcast_to(jnp.asarray(fields.coord_grid(h, w)), (b, h, w, 2))
  cells = jnp.broadcast_to(jnp.asarray(fields.cell_size(h, w)), (b, 2))
  return coords, cells


def _assert_all_partitioned(variables):
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
  # Every spec resolves (no leaf without names).
  jax.tree_util.tree_map(lambda s: s, nn.get_partition_spec(variables))


def test_window_partition_roundtrip_and_layout():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  win = swin.window_partition(x, 4)
  assert win.shape == (2, 6, 16, 3)
  # Window 4 = second row of windows, second column: rows 4:8, cols 4:8, row-major.
  np.testing.assert_array_equal(win[1, 4], x[1, 4:8, 4:8].reshape(16, 3))
  np.testing.assert_array_equal(swin.window_reverse(win, 4, 8, 12), x)


def test_relative_position_index_matches_direct_computation():
  w = 5
  idx = swin.relative_position_index(w)
  assert idx.shape == (w * w, w * w)
  for p in range(w * w):
    for q in range(w * w):
      dy = p // w - q // w
      dx = p % w - q % w
      assert idx[p, q] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)


def test_relative_position_bias_reaches_attention():
  """With zero query weights the logits are the bias alone: weights = softmax(bias)."""
  w, heads = 4, 2
  attn = swin.WindowAttention(dim=8, num_heads=heads, window=w, shift=0)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
  valid = jnp.ones((1, 8, 8), bool)
  variables = nn.unbox(jax.jit(attn.init)(jax.random.key(1), x, valid))
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["query"]["kernel"] = jnp.zeros_like(params["query"]["kernel"])
  params["query"]["bias"] = jnp.zeros_like(params["query"]["bias"])
  table = np.asarray(params["rel_pos_bias"])  # [(2w-1)^2, heads]
  _, state = attn.apply({"params": params}, x, valid, mutable=["intermediates"])
  weights = np.asarray(state["intermediates"]["attention_weights"][0])  # [1, nW, h, N, N]
  bias = np.zeros((heads, w * w, w * w))
  for p in range(w * w):
    for q in range(w * w):
      dy, dx = p // w - q // w, p % w - q % w
      bias[:, p, q] = table[(dy + w - 1) * (2 * w - 1) + (dx + w - 1)]
  expected = np.exp(bias - bias.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  for win in range(weights.shape[1]):
    np.testing.assert_allclose(weights[0, win], expected, rtol=1e-5, atol=1e-6)


def _swin_slice_labels(hp, wp, w, s):
  """The Swin paper's construction: label slices of the shifted grid, then partition."""
  img = np.zeros((hp, wp), int)
  cnt = 0
  for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
    for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
      img[hs, ws] = cnt
      cnt += 1
  return swin.window_partition(img[None, :, :, None], w)[0, ..., 0]  # [nW, N]


@pytest.mark.parametrize("hp,wp", [(8, 12), (16, 8)])
def test_shifted_window_mask_matches_brute_force(hp, wp):
  w, s = 4, 2
  mask = swin.shifted_window_mask(hp, wp, w, s)
  lab = _swin_slice_labels(hp, wp, w, s)
  np.testing.assert_array_equal(mask, lab[:, :, None] == lab[:, None, :])
  np.testing.assert_array_equal(np.asarray(swin.shifted_window_mask(hp, wp, w, s, jnp)), mask)
  # Independently: a pair may attend iff its unshifted positions share a window of the
  # lattice offset by w/2 (the regions of the shifted partition).
  nwx = wp // w
  for win in range(mask.shape[0]):
    for p in range(w * w):
      for q in range(w * w):
        pos = []
        for t in (p, q):
          y = (win // nwx) * w + t // w
          x = (win % nwx) * w + t % w
          oy, ox = (y + s) % hp, (x + s) % wp  # position before the cyclic shift
          pos.append(((oy + s) // w, (ox + s) // w))
        assert mask[win, p, q] == (pos[0] == pos[1])


def test_shifted_attention_weights_are_exactly_zero_across_regions():
  w, s, hp, wp = 4, 2, 8, 12
  attn = swin.WindowAttention(dim=8, num_heads=2, window=w, shift=s)
  x = jnp.sin(jnp.arange(hp * wp * 8, dtype=jnp.float32)).reshape(1, hp, wp, 8)
  valid = jnp.ones((1, hp, wp), bool)
  variables = jax.jit(attn.init)(jax.random.key(0), x, valid)
  _, state = attn.apply(variables, x, valid, mutable=["intermediates"])
  weights = np.asarray(state["intermediates"]["attention_weights"][0])[0]  # [nW, h, N, N]
  allowed = _swin_slice_labels(hp, wp, w, s)
  allowed = allowed[:, :, None] == allowed[:, None, :]  # [nW, N, N]
  forbidden = np.broadcast_to(~allowed[:, None], weights.shape)
  assert forbidden.any()
  assert np.all(weights[forbidden] == 0.0)
  assert np.all(weights[~forbidden] > 0.0)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_padding_tokens_do_not_change_real_tokens():
  w, hp, wp, h, wd = 4, 12, 16, 9, 13
  blocks = [swin.SwinBlock(dim=8, num_heads=2, window=w, shift=sh) for sh in (0, 2, 0)]
  valid = jnp.zeros((1, hp, wp), bool).at[:, :h, :wd].set(True)
  x1 = jax.random.normal(jax.random.key(0), (1, hp, wp, 8))
  noise = 100.0 * jax.random.normal(jax.random.key(1), x1.shape)
  x2 = jnp.where(valid[..., None], x1, noise)

  params = jax.jit(
      lambda: [blk.init(jax.random.key(10 + i), x1, valid) for i, blk in enumerate(blocks)]
  )()

  @jax.jit
  def run(x):
    for blk, p in zip(blocks, params):
      x = blk.apply(p, x, valid)
    return x

  y1, y2 = np.asarray(run(x1)), np.asarray(run(x2))
  assert np.abs(y1[:, h:] - y2[:, h:]).max() > 1e-3  # padding itself did change
  np.testing.assert_allclose(y1[:, :h, :wd], y2[:, :h, :wd], atol=1e-5)


@pytest.mark.parametrize("name", ["cqar", "liif", "clif"])
def test_renderer_shapes_finite_and_partitioned(name):
  latent = jax.random.normal(jax.random.key(0), (2, 6, 5, 4))
  coords, cells = _queries(2, 11, 13)  # not a multiple of the CQAR window
  model = make_renderer(name, **TINY[name])
  variables = jax.jit(model.init)(jax.random.key(1), latent, coords, cells)
  _assert_all_partitioned(variables)
  bf = make_renderer(name, **TINY[name], dtype=jnp.bfloat16)

  @jax.jit
  def both(v):
    return model.apply(v, latent, coords, cells), bf.apply(v, latent, coords, cells)

  rgb, rgb_bf = both(variables)
  assert rgb.shape == (2, 11, 13, 3) and rgb.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(rgb)))
  # The two samples have different latents, so the outputs differ.
  assert np.abs(np.asarray(rgb[0] - rgb[1])).max() > 1e-4
  # bf16 compute: float32 params, float32 output close to the float32 render.
  shapes = jax.eval_shape(bf.init, jax.random.key(1), latent, coords, cells)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  assert rgb_bf.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(rgb_bf), np.asarray(rgb), atol=0.1)


def test_make_renderer_unknown_name_lists_known():
  with pytest.raises(ValueError, match="clif.*cqar.*liif"):
    make_renderer("siren")
  # Another renderer's fields (e.g. --config.rapd_stage1.renderer.name=clif on the CQAR
  # config) are a one-line error naming them, not a TypeError from the dataclass.
  with pytest.raises(ValueError, match=r"'clif' has no field\(s\) depth, dim.*renderer=clif"):
    make_renderer("clif", dim=64, depth=2, features=8)


def test_halos_and_alignment():
  assert CQAR().halo() == 16 and CQAR().tile_align() == 8
  assert CQAR(depth=2, window=8).halo() == 8
  assert CLIF().halo() == 8 > CLIF().receptive_radius() == 6
  assert LIIF().halo() == 0 and LIIF().tile_align() == 1
  # Unfolding widens the latent neighbourhood, not the output one: still no halo.
  assert LIIF(unfold=True).halo() == 0 and LIIF(unfold=True).tile_align() == 1


def test_cqar_tokens_by_hand():
  """Token contents for a 2x3 latent queried at 5x4 (h != w and H != W catch a transpose)."""
  h, w, c = 2, 3, 2
  # Feature of latent cell (r, k) encodes its position: [100 + 10 r + k, -(100 + 10 r + k)],
  # and the second sample adds 1000, so a wrong cell or a wrong batch row shows.
  ident = 100.0 + 10.0 * np.arange(h)[:, None] + np.arange(w)[None, :]  # [h, w]
  latent = np.stack([ident, -ident], -1)[None] + np.array([0.0, 1000.0])[:, None, None, None]
  coords = np.broadcast_to(fields.coord_grid(5, 4), (2, 5, 4, 2))
  # Sample 0 is the whole 5x4 render; sample 1 the same window of a 10x8 render's grid
  # would have another cell: give it cell (2/10, 2/8) to check the per-sample cell.
  cells = np.array([[2 / 5, 2 / 4], [2 / 10, 2 / 8]], np.float32)
  tok = np.asarray(cqar_tokens(jnp.asarray(latent, jnp.float32), jnp.asarray(coords), cells))
  assert tok.shape == (2, 5, 4, c + 6)

  # Rows: x = -0.8, -0.4, 0, 0.4, 0.8 against latent row centres -0.5, 0.5 (0 lies on the
  # border and goes to the upper cell). Columns: -0.75, -0.25, 0.25, 0.75 against column
  # centres -2/3, 0, 2/3.
  row_cell = [0, 0, 1, 1, 1]
  col_cell = [0, 1, 1, 2]
  row_off = [-0.3, 0.1, -0.5, -0.1, 0.3]  # (x - v) * h / 2, h / 2 = 1
  col_off = [-0.125, -0.375, 0.375, 0.125]  # (x - v) * w / 2, w / 2 = 1.5
  rows_x = [-0.8, -0.4, 0.0, 0.4, 0.8]
  cols_x = [-0.75, -0.25, 0.25, 0.75]
  cell_units = [(0.4, 0.75), (0.2, 0.375)]  # c * (h, w) / 2
  for b in range(2):
    for i in range(5):
      for j in range(4):
        f = 100.0 + 10.0 * row_cell[i] + col_cell[j]
        want = [
            f + 1000.0 * b,
            -f + 1000.0 * b,
            row_off[i],
            col_off[j],
            *cell_units[b],
            rows_x[i],
            cols_x[j],
        ]
        np.testing.assert_allclose(tok[b, i, j], want, atol=1e-6, err_msg=f"query {b, i, j}")


def test_unfold_3x3_by_hand():
  b, h, w, c = 2, 3, 4, 2
  latent = np.asarray(jax.random.normal(jax.random.key(0), (b, h, w, c)))
  got = np.asarray(unfold_3x3(jnp.asarray(latent)))
  assert got.shape == (b, h, w, 9 * c)
  want = np.zeros((b, h, w, 9 * c), np.float32)
  for i in range(h):
    for j in range(w):
      for ch in range(c):
        for dy in range(3):
          for dx in range(3):
            y, x = i + dy - 1, j + dx - 1
            inside = 0 <= y < h and 0 <= x < w  # zero padding beyond the border (LIIF)
            want[:, i, j, ch * 9 + dy * 3 + dx] = latent[:, y, x, ch] if inside else 0.0
  np.testing.assert_array_equal(got, want)


def test_liif_unfold_feeds_the_unfolded_latent():
  """LIIF(unfold=True) on z equals the plain LIIF on unfold_3x3(z) with the same weights."""
  latent = jax.random.normal(jax.random.key(0), (2, 6, 5, 4))
  coords, cells = _queries(2, 11, 13)
  unfolded = LIIF(hidden=(16, 16), unfold=True)
  variables = jax.jit(unfolded.init)(jax.random.key(1), latent, coords, cells)
  assert variables["params"]["fc0"]["kernel"].value.shape == (9 * 4 + 4, 16)
  got = unfolded.apply(variables, latent, coords, cells)
  want = LIIF(hidden=(16, 16)).apply(variables, unfold_3x3(latent), coords, cells)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_liif_unfold_tiled_equals_untiled():
  model = LIIF(hidden=(16,), unfold=True, rgb_base="bicubic")
  latent = jax.random.normal(jax.random.key(0), (2, 7, 9, 4))
  hh, ww = 75, 97
  coords, cells = _queries(2, hh, ww)
  variables = jax.jit(model.init)(jax.random.key(1), latent, coords[:, :8, :8], cells)
  full = np.asarray(jax.jit(model.apply)(variables, latent, coords, cells))
  fn = render.RendererFn(model)
  tiled = render.render_image(fn, variables, latent, hh, ww, tile=32)
  np.testing.assert_allclose(tiled, full, atol=1e-5, rtol=0)
  # A crop needs no halo either: the unfolding reaches into the latent, which every tile
  # sees whole.
  raw = render.render_crop(fn, variables, latent, hh, ww, 30, 41, 20, 25)
  np.testing.assert_allclose(np.asarray(raw), full[:, 30:50, 41:66], atol=1e-5)


def test_liif_is_continuous_across_latent_cell_borders():
  """The local ensemble removes the jumps of a nearest-feature lookup at cell borders."""
  latent = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
  model = LIIF(hidden=(32,))
  border, eps = 0.0, 1e-4  # x = 0 is a latent cell border (and a shifted-ensemble seam)
  ys = jnp.array([-0.3, 0.25, 0.5])  # 0.25 / 0.5 hit cell centre / border along rows
  pts = jnp.stack(
      [jnp.stack([ys, jnp.full(3, border + d)], -1) for d in (-eps, eps, 0.25 - eps, 0.25 + eps)],
      1,
  )[
      None
  ]  # [1, 3, 4, 2]
  cells = jnp.full((1, 2), 0.1)
  variables = jax.jit(model.init)(jax.random.key(1), latent, pts, cells)
  rgb = np.asarray(jax.jit(model.apply)(variables, latent, pts, cells))[0]  # [3, 4, 3]
  assert np.abs(rgb[:, 0] - rgb[:, 1]).max() < 1e-2
  assert np.abs(rgb[:, 2] - rgb[:, 3]).max() < 1e-2
  # The same lookup without the ensemble (offset and feature of one cell) jumps there.
  q = [fields.nearest_latent(latent, pts[:, :, k]) for k in (0, 1)]
  assert np.abs(np.asarray(q[0].feature - q[1].feature)).max() > 1e-2


def test_edsr_encoder():
  # Without a projection the body's final conv is the last layer and carries the name.
  plain = EDSREncoder(features=8, n_resblocks=2)
  image = jax.random.uniform(jax.random.key(0), (2, 10, 10, 3))
  shapes = nn.unbox(jax.eval_shape(plain.init, jax.random.key(1), image))["params"]
  assert shapes[LAST_CONV]["kernel"].shape == (3, 3, 8, 8)
  assert jax.eval_shape(plain.apply, {"params": shapes}, image).shape == (2, 10, 10, 8)

  enc = EDSREncoder(features=8, n_resblocks=2, latent_channels=6)
  variables = jax.jit(enc.init)(jax.random.key(1), image)
  _assert_all_partitioned(variables)
  params = nn.unbox(variables)["params"]
  assert params[LAST_CONV]["kernel"].shape == (3, 3, 8, 6)
  apply = jax.jit(lambda p, x: enc.apply({"params": p}, x))
  assert apply(params, image).shape == (2, 10, 10, 6)

  # The last conv's kernel gets a gradient (the stage-1 adaptive weight relies on it).
  g = jax.jit(jax.grad(lambda p: jnp.mean(apply(p, image) ** 2)))(params)[LAST_CONV]
  assert float(jnp.linalg.norm(g["kernel"])) > 0.0
  # [0, 1] input is mapped to [-1, 1] inside: mid-grey becomes exactly 0, which the
  # zero-bias init maps to an exactly zero latent.
  np.testing.assert_array_equal(np.asarray(apply(params, jnp.full_like(image, 0.5))), 0.0)


def test_edsr_latent_stride_reads_space_to_depth_blocks():
  """downsample=f: the last conv sees each f x f block of the body output as channels."""
  enc = EDSREncoder(features=4, n_resblocks=1, latent_channels=5, downsample=2)
  image = jax.random.uniform(jax.random.key(0), (2, 8, 12, 3))
  params = nn.unbox(enc.init(jax.random.key(1), image))["params"]
  assert params[LAST_CONV]["kernel"].shape == (3, 3, 4 * 2 * 2, 5)
  z, inter = enc.apply({"params": params}, image, capture_intermediates=True)
  assert z.shape == (2, 4, 6, 5)
  body = (
      inter["intermediates"]["body_conv"]["__call__"][0]
      + inter["intermediates"]["head"]["__call__"][0]
  )  # [2, 8, 12, 4], EDSR's global skip
  # Block (i, j) of the body output becomes channels ordered (row in block, col, channel).
  blocks = np.asarray(body).reshape(2, 4, 2, 6, 2, 4).transpose(0, 1, 3, 2, 4, 5)
  blocks = blocks.reshape(2, 4, 6, 16)
  k = params[LAST_CONV]
  want = (
      jax.lax.conv_general_dilated(
          jnp.asarray(blocks),
          k["kernel"],
          (1, 1),
          "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      + k["bias"]
  )
  np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    enc.apply({"params": params}, image[:, :7])
  with pytest.raises(ValueError, match="latent_channels"):
    EDSREncoder(features=4, n_resblocks=1, downsample=2).init(jax.random.key(1), image)


@pytest.mark.parametrize("kind,method", [("bicubic", "cubic"), ("bilinear", "linear")])
def test_interpolate_latent_matches_resize_and_hits_cell_centres(kind, method):
  latent = jax.random.normal(jax.random.key(0), (2, 8, 10, 3))
  coords, _ = _queries(2, 32, 40)
  got = np.asarray(fields.interpolate_latent(latent, coords, kind))
  want = np.asarray(jax.image.resize(latent, (2, 32, 40, 3), method, antialias=False))
  # jax renormalises the kernel at the border, we replicate the edge: compare inside.
  np.testing.assert_allclose(got[:, 8:-8, 8:-8], want[:, 8:-8, 8:-8], atol=1e-5)
  if kind == "bilinear":  # two taps never leave the grid after clamping: equal everywhere
    np.testing.assert_allclose(got, want, atol=1e-5)
  centres, _ = _queries(2, 8, 10)
  np.testing.assert_allclose(fields.interpolate_latent(latent, centres, kind), latent, atol=1e-5)
  with pytest.raises(ValueError, match="bilinear.*bicubic"):
    fields.interpolate_latent(latent, coords, "lanczos")


@pytest.mark.parametrize(
    "name,extra", [("cqar", {}), ("liif", {}), ("liif", {"unfold": True}), ("clif", {})]
)
def test_rgb_base_adds_interpolated_projection(name, extra):
  """rgb_base adds bicubic(Linear(z)) at the queries; CQAR's zero head starts as the base.

  With LIIF's unfolding the base still projects the latent itself, not the unfolded one.
  """
  latent = jax.random.normal(jax.random.key(0), (2, 6, 5, 4))
  coords, cells = _queries(2, 11, 13)
  plain = make_renderer(name, **TINY[name], **extra)
  based = make_renderer(name, **TINY[name], **extra, rgb_base="bicubic")
  variables = based.init(jax.random.key(1), latent, coords, cells)
  params = nn.unbox(variables)["params"]
  proj = params.pop("rgb_base")
  base = fields.interpolate_latent(latent @ proj["kernel"] + proj["bias"], coords, "bicubic")
  if name == "cqar":
    assert np.all(np.asarray(params["head"]["kernel"]) == 0)
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
  got = based.apply({"params": {**params, "rgb_base": proj}}, latent, coords, cells)
  want = plain.apply({"params": params}, latent, coords, cells) + base
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(np.asarray(base)).max() > 1e-2  # the base is not trivially zero
