"""∞-Diff's operators: the DCT mollifier (infdiff.diffusion.mollifier) and sparse points.

Mollifier: the DCT-domain blur against a direct sampled-Gaussian blur with reflecting
padding (their gap is the Gaussian's spectrum beyond Nyquist, measured here), the Wiener
inverse, per-axis sigmas. Sparse (infdiff.models.sparse): the sparse depthwise
convolution and its custom VJP against the dense masked convolution, points <-> coarse
grid interpolation against brute force and analytic functions, kernel resizing, subsets.
All shapes are tiny (CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff.diffusion import mollifier
from infdiff.models import sparse


# --- mollifier ----------------------------------------------------------------------------
def _blur_axis(x: np.ndarray, axis: int, sigma: float) -> np.ndarray:
  """float64 sampled-Gaussian blur (sum 1, radius 8 sigma) along axis, symmetric padding."""
  if sigma <= 0:
    return x
  r = int(np.ceil(8 * sigma))
  t = np.arange(-r, r + 1)
  k = np.exp(-(t**2) / (2.0 * sigma**2))
  k /= k.sum()
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = np.pad(x, pad, mode="symmetric")  # half-sample reflection (repeats if r > n)
  n = x.shape[axis]
  out = np.zeros_like(x)
  for j, kv in enumerate(k):
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(j, j + n)
    out += kv * xp[tuple(sl)]
  return out


def _direct_blur(x: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
  return _blur_axis(_blur_axis(np.asarray(x, np.float64), 1, sigma_y), 2, sigma_x)


def _image(seed: int = 0, shape=(2, 12, 20, 3)) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=shape)


def _mollify64(x, sigma_y, sigma_x=None) -> np.ndarray:
  return np.asarray(mollifier.mollify(jnp.asarray(x, jnp.float32), sigma_y, sigma_x), np.float64)


@pytest.mark.parametrize("sigmas", [(1.5, 1.5), (2.0, 2.0), (1.5, 2.0), (2.0, 1.5)])
def test_mollify_equals_direct_gaussian_blur(sigmas):
  """DCT gains == sampled Gaussian with reflecting padding where aliasing is negligible."""
  x = _image()  # H = 12 != W = 20
  got = _mollify64(x, *sigmas)
  want = _direct_blur(x, *sigmas)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mollify_sigma_one_gap_is_the_beyond_nyquist_spectrum():
  """At sigma = 1 the band-limited and sampled Gaussians differ, by a small measured amount.

  The sampled kernel's response aliases exp(-omega^2 sigma^2 / 2) from beyond Nyquist,
  at most about exp(-pi^2 sigma^2 / 2) = 7.2e-3 per axis, so the 2-D gap in l2 is at most
  about twice that times ||x||. Measured on this [0, 1] image: max abs 7.4e-4 (l2 ratio
  4.3e-4); a unit-variance white-noise image gives about 4e-3 max abs.
  """
  x = _image()
  diff = _mollify64(x, 1.0) - _direct_blur(x, 1.0, 1.0)
  gap = np.abs(diff).max()
  assert 1e-4 < gap < 5e-3, gap
  assert np.linalg.norm(diff) <= 2.0 * np.exp(-(np.pi**2) / 2.0) * np.linalg.norm(x)


def test_gain_and_scaled_sigmas():
  """Gains are 1 at DC and sigma <= 0; scaling sigma with N keeps the damped indices."""
  np.testing.assert_array_equal(mollifier.gain(9, 0.0), np.ones(9, np.float32))
  g = mollifier.gain(16, 1.0)
  assert g[0] == 1.0 and np.all(np.diff(g) < 0)
  assert mollifier.scaled_sigmas(1.0, 64, 32, 32) == (2.0, 1.0)
  np.testing.assert_allclose(mollifier.gain(32, 2.0)[:16], mollifier.gain(16, 1.0), rtol=1e-6)


def _smooth_image(shape=(2, 12, 20, 3)) -> np.ndarray:
  """A sum of a few low DCT cosines per channel (the gains act on them exactly)."""
  _, h, w, c = shape
  yy = (np.arange(h)[:, None, None] + 0.5) / h
  xx = (np.arange(w)[None, :, None] + 0.5) / w
  amp = np.linspace(0.5, 1.0, c)
  f = 0.5 + amp * (0.4 * np.cos(np.pi * yy) * np.cos(2 * np.pi * xx) + 0.3 * np.cos(3 * np.pi * xx))
  f = f - 0.2 * amp * np.cos(2 * np.pi * yy)
  return np.broadcast_to(f, shape).astype(np.float32)


def test_wiener_inverts_the_mollifier_on_a_smooth_image():
  """wiener(mollify(x)) is much closer to x than mollify(x); sigma 0 is (nearly) identity."""
  x = _smooth_image()
  blurred = mollifier.mollify(jnp.asarray(x), 1.0)
  restored = mollifier.wiener(blurred, 1.0)
  err_blur = float(jnp.max(jnp.abs(blurred - x)))
  err_restored = float(jnp.max(jnp.abs(restored - x)))
  assert err_blur > 0.02, err_blur
  assert err_restored < 0.05 * err_blur, (err_restored, err_blur)
  # sigma 0: the blur is the identity, the Wiener gain 1 / (1 + eps^2).
  np.testing.assert_allclose(mollifier.mollify(jnp.asarray(x), 0.0), x, atol=1e-6)
  eps = mollifier.WIENER_EPS
  np.testing.assert_allclose(mollifier.wiener(jnp.asarray(x), 0.0), x / (1 + eps**2), atol=1e-6)


def test_mollify_acts_per_axis():
  """A blur along one axis only: a function constant along that axis is unchanged."""
  h, w = 12, 20
  f_of_y = np.sin(np.arange(h) * 1.3)[None, :, None, None] * np.ones((2, h, w, 3))
  np.testing.assert_allclose(_mollify64(f_of_y, 0.0, 2.0), f_of_y, atol=1e-5)
  along_y = _mollify64(f_of_y, 2.0, 0.0)
  assert np.abs(along_y - f_of_y).max() > 0.1
  np.testing.assert_allclose(along_y, _direct_blur(f_of_y, 2.0, 0.0), atol=1e-5)
  f_of_x = np.cos(np.arange(w) * 0.9)[None, None, :, None] * np.ones((2, h, w, 3))
  np.testing.assert_allclose(_mollify64(f_of_x, 2.0, 0.0), f_of_x, atol=1e-5)
  # On a random image each axis gets its own 1-D blur.
  x = _image(1)
  np.testing.assert_allclose(_mollify64(x, 0.0, 1.5), _direct_blur(x, 0.0, 1.5), atol=1e-5)
  np.testing.assert_allclose(_mollify64(x, 2.5, 0.0), _direct_blur(x, 2.5, 0.0), atol=1e-5)


# --- sparse depthwise convolution -----------------------------------------------------------
_H, _W, _C = 7, 10, 3


def _points(num: int, batch: int = 2, seed: int = 0):
  """(flat [B, P], PointSet) of num pixels per image of the _H x _W grid."""
  if num == _H * _W:
    pts = sparse.full_point_set(batch, _H, _W)
    return pts.idmap, pts
  flat = sparse.random_subset(jax.random.key(seed), batch, _H, _W, num)
  return flat, sparse.point_set(flat, _H, _W)


def _dense_reference(x, kernel, flat):
  """Scatter x onto the grid with a mask, dense depthwise conv, read back at the points."""
  b, _, c = x.shape
  rows = jnp.arange(b)[:, None]
  grid = jnp.zeros((b, _H * _W, c), x.dtype).at[rows, flat].set(x).reshape(b, _H, _W, c)
  mask = jnp.zeros((b, _H * _W), x.dtype).at[rows, flat].set(1.0).reshape(b, _H, _W)
  out = sparse.dense_depthwise_conv(grid, kernel, mask)
  return jnp.take_along_axis(out.reshape(b, _H * _W, c), flat[..., None], axis=1)


@pytest.mark.parametrize("num", [_H * _W, 35, 17, 1])
@pytest.mark.parametrize("ksize", [(5, 3), (3, 5)])
def test_sparse_conv_equals_dense_masked_conv(num, ksize):
  """Sparse conv == dense conv with the mask of the same points, at the points."""
  flat, pts = _points(num)
  rng = np.random.default_rng(num)
  x = jnp.asarray(rng.standard_normal((2, num, _C)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*ksize, _C)), jnp.float32)
  got = sparse.sparse_depthwise_conv(x, kernel, pts, _H, _W)
  np.testing.assert_allclose(got, _dense_reference(x, kernel, flat), atol=1e-5)
  if num == _H * _W:  # all present: also the unmasked dense conv, and gather_points
    grid = x.reshape(2, _H, _W, _C)
    want = sparse.gather_points(sparse.dense_depthwise_conv(grid, kernel), pts)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("num", [_H * _W, 17, 1])
def test_sparse_conv_count_normalisation(num):
  """Constant features and a kernel of ones give kh * kw * value whatever the neighbours."""
  _, pts = _points(num)
  x = jnp.full((2, num, _C), 1.5, jnp.float32)
  out = sparse.sparse_depthwise_conv(x, jnp.ones((5, 3, _C)), pts, _H, _W)
  np.testing.assert_allclose(out, np.full((2, num, _C), 15 * 1.5), rtol=1e-6)


@pytest.mark.parametrize("num", [23])
def test_sparse_conv_gradients_match_dense(num):
  """The custom VJP's gradients (features, kernel) == autodiff of the dense reference."""
  flat, pts = _points(num, seed=3)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, num, _C)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((5, 3, _C)), jnp.float32)
  wts = jnp.asarray(rng.standard_normal((2, num, _C)), jnp.float32)

  def loss_sparse(x, k, pts):
    return jnp.sum(jnp.tanh(sparse.sparse_depthwise_conv(x, k, pts, _H, _W)) * wts)

  def loss_dense(x, k):
    return jnp.sum(jnp.tanh(_dense_reference(x, k, flat)) * wts)

  want = jax.grad(loss_dense, argnums=(0, 1))(x, kernel)
  eager = jax.grad(loss_sparse, argnums=(0, 1))(x, kernel, pts)
  jitted = jax.jit(jax.grad(loss_sparse, argnums=(0, 1)))(x, kernel, pts)
  for got in (eager, jitted):
    for g, w in zip(got, want, strict=True):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(want[1]).max()) > 1e-2  # a non-trivial gradient


@pytest.mark.parametrize("masked", [False, True])
def test_fft_dense_conv_equals_direct(masked):
  """The FFT path (large resized kernels at sampling) equals lax's direct convolution."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 23, 17, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (11, 7, 4))
  m = jax.random.uniform(jax.random.PRNGKey(2), (2, 23, 17)) < 0.4 if masked else None
  a = sparse.dense_depthwise_conv(x, k, m, impl="direct")
  b = sparse.dense_depthwise_conv(x, k, m, impl="fft")
  np.testing.assert_allclose(b, a, atol=2e-5 * float(jnp.abs(a).max()))
  with pytest.raises(ValueError, match="impl"):
    sparse.dense_depthwise_conv(x, k, m, impl="winograd")


def test_sparse_conv_rejects_even_kernels():
  """An even kernel side has no centre tap: ValueError."""
  _, pts = _points(17)
  x = jnp.zeros((2, 17, 1))
  for shape in [(4, 3, 1), (3, 2, 1)]:
    with pytest.raises(ValueError, match="odd"):
      sparse.sparse_depthwise_conv(x, jnp.ones(shape), pts, _H, _W)


# --- points <-> coarse grid -----------------------------------------------------------------
def _analytic(coords: np.ndarray) -> np.ndarray:
  """[..., 2] domain coordinates -> [..., 2] smooth values."""
  y, x = coords[..., 0], coords[..., 1]
  return np.stack([np.sin(2.0 * y + 1.0) * np.cos(x), 0.5 * y - 0.3 * x * x], -1)


def _node_coords(gh: int, gw: int) -> np.ndarray:
  """[gh, gw, 2] cell-centre coordinates: centre of cell i of n at -1 + (2i + 1) / n."""
  cy = -1.0 + (2.0 * np.arange(gh) + 1.0) / gh
  cx = -1.0 + (2.0 * np.arange(gw) + 1.0) / gw
  return np.stack(np.meshgrid(cy, cx, indexing="ij"), -1)


_PH, _PW, _GH, _GW, _NUM = 16, 24, 5, 7, 96  # a quarter of the pixels, a 5 x 7 coarse grid


def _quarter_points() -> sparse.PointSet:
  return sparse.point_set(sparse.random_subset(jax.random.key(2), 2, _PH, _PW, _NUM), _PH, _PW)


def test_points_to_grid_constant_function():
  """A constant field interpolates to that constant on every node (default window)."""
  x = jnp.full((2, _NUM, 2), -0.7, jnp.float32)
  out = sparse.points_to_grid(x, _quarter_points(), _PH, _PW, _GH, _GW)
  assert out.shape == (2, _GH, _GW, 2)
  np.testing.assert_allclose(out, -0.7, rtol=1e-5)


def test_points_to_grid_nodes_on_pixel_centres():
  """Full grid, H = 3 Gh and W = 3 Gw: node (i, j) sits on pixel (3i + 1, 3j + 1)."""
  gh, gw = 4, 5
  h, w = 3 * gh, 3 * gw
  pts = sparse.full_point_set(1, h, w)
  coords = np.asarray(sparse.point_coords(pts.pos, h, w), np.float64)
  x = jnp.asarray(_analytic(coords), jnp.float32)
  out = np.asarray(sparse.points_to_grid(x, pts, h, w, gh, gw))
  want = np.asarray(x).reshape(1, h, w, 2)[:, 1::3, 1::3]
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(out[0], _analytic(_node_coords(gh, gw)), atol=1e-5)


def test_points_to_grid_matches_brute_force_knn():
  """k = 3 inverse-squared-distance weights == a brute-force search over all points."""
  h, w, k = _PH, _PW, 3
  pts = _quarter_points()
  coords = np.asarray(sparse.point_coords(pts.pos, h, w), np.float64)  # [B, P, 2]
  vals = np.random.default_rng(0).standard_normal((2, _NUM, 2))
  x = jnp.asarray(vals, jnp.float32)
  out = np.asarray(sparse.points_to_grid(x, pts, h, w, _GH, _GW, k=k, window=64))
  nodes = _node_coords(_GH, _GW).reshape(-1, 2)
  compared = 0
  for b in range(2):
    d2 = np.sum((nodes[:, None, :] - coords[b][None, :, :]) ** 2, -1)  # [n, P]
    order = np.argsort(d2, axis=1, kind="stable")
    for n in range(nodes.shape[0]):
      d = np.sqrt(d2[n, order[n, : k + 1]])
      if d[k] - d[k - 1] < 1e-9:  # 3rd and 4th nearest tie: either is a valid choice
        continue
      near = order[n, :k]
      wts = 1.0 / np.maximum(d2[n, near], 1e-12)
      want = (wts[:, None] * vals[b, near]).sum(0) / wts.sum()
      np.testing.assert_allclose(out[b].reshape(-1, 2)[n], want, atol=1e-5, rtol=1e-5)
      compared += 1
  assert compared >= nodes.shape[0]  # 67 of the 2 x 35 nodes have no tie


def test_grid_to_points_reproduces_linear_functions():
  """Bilinear read-back is exact for a linear field between the outermost cell centres."""
  gh, gw, h, w = _GH, _GW, _PH, _PW
  nodes = _node_coords(gh, gw)

  def lin(c):
    return 0.3 + 0.7 * c[..., 0:1] - 0.4 * c[..., 1:2]

  grid = jnp.asarray(np.broadcast_to(lin(nodes), (2, gh, gw, 1)), jnp.float32)
  pts = sparse.full_point_set(2, h, w)
  coords = np.asarray(sparse.point_coords(pts.pos, h, w), np.float64)
  got = np.asarray(sparse.grid_to_points(grid, pts, h, w), np.float64)
  lo, hi = nodes[0, 0], nodes[-1, -1]
  interior = np.all((coords >= lo) & (coords <= hi), axis=-1)
  assert interior.any() and not interior.all()
  np.testing.assert_allclose(got[interior], lin(coords)[interior], atol=1e-5)
  # Beyond the outermost centres: edge replication (the linear field at clamped coords).
  np.testing.assert_allclose(got, lin(np.clip(coords, lo, hi)), atol=1e-5)


def test_density_factors_exact_and_identity():
  """Rate 1 changes nothing; small cases against direct enumeration of the subsets."""
  assert sparse.density_factors(25, 1.0) == (1.0, 1.0)
  # 3 taps at q = 1/2: the two neighbours are present with probability 1/4 each pair.
  centre, other = sparse.density_factors(3, 2.0)
  np.testing.assert_allclose(centre, 3 * (0.25 / 1 + 0.5 / 2 + 0.25 / 3))
  np.testing.assert_allclose(other, 0.5 * 3 * (0.5 / 2 + 0.5 / 3))
  c4, o4 = sparse.density_factors(25, 4.0)
  assert 3.9 < c4 < 4.1 and 0.8 < o4 < 0.95  # the point's own value weighs ~4x on subsets
  with pytest.raises(ValueError, match="rate must be >= 1"):
    sparse.density_factors(9, 0.5)


def test_density_matched_kernel_is_the_mean_of_the_subset_operator():
  """Full-grid conv with the matched kernel == mean of the count-normalised conv over
  random quarter subsets (interior pixels, to within Monte-Carlo error); the raw kernel
  is far off."""
  h = w = 16
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, h, w, 2)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((5, 5, 2)), jnp.float32)
  conv = jax.jit(
      lambda v, flat: sparse.sparse_depthwise_conv(v, kernel, sparse.point_set(flat, h, w), h, w)
  )
  acc, hits = np.zeros((h * w, 2)), np.zeros((h * w, 1))
  for i in range(300):
    flat = sparse.random_subset(jax.random.PRNGKey(i), 1, h, w, h * w // 4)
    out = conv(sparse.gather_points(x, sparse.point_set(flat, h, w)), flat)
    f = np.asarray(flat[0])
    acc[f] += np.asarray(out[0])
    hits[f] += 1
  mean = (acc / hits).reshape(h, w, 2)[2:-2, 2:-2]
  matched = sparse.dense_depthwise_conv(x, sparse.density_matched_kernel(kernel, 5, 5, 4.0))
  raw = sparse.dense_depthwise_conv(x, kernel)
  err_matched = np.abs(np.asarray(matched[0, 2:-2, 2:-2]) - mean).mean()
  err_raw = np.abs(np.asarray(raw[0, 2:-2, 2:-2]) - mean).mean()
  assert err_matched < 0.35 * err_raw, (err_matched, err_raw)
  assert sparse.density_matched_kernel(kernel, 5, 5, 1.0) is kernel


def test_density_matched_kernel_keeps_the_point_term_when_resized():
  """At another size the point term (centre - other) x centre tap is added unscaled and
  the rest is the resized kernel times `other`."""
  kernel = jnp.asarray(np.random.default_rng(1).standard_normal((5, 5, 3)), jnp.float32)
  centre, other = sparse.density_factors(25, 4.0)
  got = sparse.density_matched_kernel(kernel, 11, 9, 4.0)
  want = sparse.resize_kernel(kernel * other, 11, 9)
  want = want.at[5, 4].add((centre - other) * kernel[2, 2])
  assert got.shape == (11, 9, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- kernels, subsets, point sets -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 3, 7, 7), (5, 3, 9, 5), (7, 7, 3, 3), (3, 5, 5, 9)])
def test_resize_kernel_shape_and_integral(shape):
  """Requested shape; a constant kernel keeps its sum exactly, a smooth one nearly."""
  k0, k1, kh, kw = shape
  const = jnp.full((k0, k1, 2), 0.25, jnp.float32)
  out = sparse.resize_kernel(const, kh, kw)
  assert out.shape == (kh, kw, 2) and out.dtype == const.dtype
  np.testing.assert_allclose(out.sum((0, 1)), const.sum((0, 1)), rtol=1e-5)
  # A smooth bump: the bilinear interpolant's integral, hence the sum, is nearly kept.
  ty = np.linspace(-1, 1, k0)[:, None]
  tx = np.linspace(-1, 1, k1)[None, :]
  bump = jnp.asarray((1.0 + 0.2 * ty + 0.1 * tx)[..., None] * np.ones(2), jnp.float32)
  np.testing.assert_allclose(
      sparse.resize_kernel(bump, kh, kw).sum((0, 1)), bump.sum((0, 1)), rtol=0.05
  )
  assert sparse.resize_kernel(const, k0, k1) is const  # same size: untouched


def test_scaled_kernel_size():
  """Odd size nearest k * ratio, at least 3, unchanged at ratio 1."""
  assert sparse.scaled_kernel_size(7, 1.0) == 7
  assert sparse.scaled_kernel_size(5, 4.0) == 21  # target 20: 19 and 21 tie, rounds up
  assert sparse.scaled_kernel_size(5, 2.0) == 11  # target 10
  assert sparse.scaled_kernel_size(7, 2.0) == 15  # target 14
  for k, r in [(3, 0.1), (7, 0.25), (5, 0.5), (3, 1e-3)]:
    assert sparse.scaled_kernel_size(k, r) == 3
  for k in (3, 5, 7):
    for r in np.linspace(0.2, 5.0, 25):
      size = sparse.scaled_kernel_size(k, float(r))
      assert size % 2 == 1 and size >= 3
      if k * r >= 2.0:  # below 2 the floor of 3 applies
        assert abs(size - k * r) <= 1.0 + 1e-9


def test_random_subset_sorted_distinct_and_per_row():
  """Per row: sorted distinct indices in range; rows (and keys) give different subsets."""
  h, w, num = 6, 8, 20
  flat = np.asarray(sparse.random_subset(jax.random.key(5), 4, h, w, num))
  assert flat.shape == (4, num) and flat.dtype == np.int32
  assert np.all(np.diff(flat, axis=1) > 0)
  assert flat.min() >= 0 and flat.max() < h * w
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.array_equal(flat[i], flat[j])
  other = np.asarray(sparse.random_subset(jax.random.key(6), 4, h, w, num))
  assert not np.array_equal(flat, other)


def test_point_set_idmap_consistent_with_pos():
  """idmap[flat[p]] == p, -1 elsewhere; pos == (flat // W, flat % W); full set agrees."""
  h, w = 5, 7
  flat = np.array([[3, 0, 34, 17, 20], [1, 2, 33, 8, 9]], np.int32)  # unsorted on purpose
  pts = sparse.point_set(jnp.asarray(flat), h, w)
  pos, idmap = np.asarray(pts.pos), np.asarray(pts.idmap)
  np.testing.assert_array_equal(pos, np.stack([flat // w, flat % w], -1))
  for b in range(2):
    want = np.full(h * w, -1)
    want[flat[b]] = np.arange(flat.shape[1])
    np.testing.assert_array_equal(idmap[b], want)
    np.testing.assert_array_equal(idmap[b][pos[b, :, 0] * w + pos[b, :, 1]], np.arange(5))
  full = sparse.full_point_set(2, h, w)
  ref = sparse.point_set(jnp.broadcast_to(jnp.arange(h * w), (2, h * w)), h, w)
  np.testing.assert_array_equal(full.pos, ref.pos)
  np.testing.assert_array_equal(full.idmap, ref.idmap)
  coords = np.asarray(sparse.point_coords(pts.pos, h, w))
  np.testing.assert_allclose(coords[0, 1], [-1 + 1 / h, -1 + 1 / w])  # pixel (0, 0)
