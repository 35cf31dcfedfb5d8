"""infdiff.kernels.sparse_conv: the Pallas sparse depthwise convolution against its reference.

On CPU the kernels run in Pallas interpret mode: values and gradients (features, kernel)
equal the XLA reference (`infdiff.models.sparse.sparse_depthwise_conv`) at several point
densities, kernel shapes, odd grids and a channel count that is not a power of two, with
blocks small enough that every case spans several blocks of points and of channels; the
full point set equals the dense convolution; the ∞-Diff denoiser gives the same output
with either implementation. Without interpret mode on CPU 'pallas' is a one-line error.
The kernels' lowering through Triton for CUDA is checked without a GPU. Tiny shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff import kernels
from infdiff.kernels import sparse_conv
from infdiff.models import sparse
from infdiff.models.sparse_unet import SparseOperatorUNet

_B, _H, _W, _C = 2, 9, 11, 5  # odd grid, C not a power of two
_BLOCKS = dict(block_points=16, block_channels=4)  # several blocks of points and channels


def _points(density: float, seed: int = 0) -> sparse.PointSet:
  """A PointSet of about density * H * W pixels per image (every pixel at density 1)."""
  if density == 1.0:
    return sparse.full_point_set(_B, _H, _W)
  num = max(1, round(density * _H * _W))
  flat = sparse.random_subset(jax.random.key(seed), _B, _H, _W, num)
  return sparse.point_set(flat, _H, _W)


def _inputs(num: int, ksize, seed: int):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((_B, num, _C)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*ksize, _C)) / np.prod(ksize), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((_B, num, _C)), jnp.float32)
  return x, kernel, ct


def _value_and_grads(impl, x, kernel, ct, pts, **blocks):
  """(out, d x, d kernel) of <ct, conv(x, kernel)>, under one jit."""

  def f(x, kernel, ct, pts):
    conv = lambda x, k: sparse_conv.sparse_depthwise_conv(x, k, pts, _H, _W, impl=impl, **blocks)
    out, vjp = jax.vjp(conv, x, kernel)
    return (out, *vjp(ct))

  return jax.jit(f)(x, kernel, ct, pts)


@pytest.mark.parametrize(
    "density, ksize",
    [(1.0, (3, 3)), (0.5, (5, 5)), (0.5, (3, 5)), (0.1, (3, 3)), (0.1, (5, 5))],
)
def test_pallas_equals_xla_values_and_gradients(density, ksize):
  pts = _points(density, seed=int(10 * density))
  x, kernel, ct = _inputs(pts.pos.shape[1], ksize, seed=len(ksize) + ksize[1])
  want = _value_and_grads("xla", x, kernel, ct, pts)
  with kernels.interpret(True):
    got = _value_and_grads("pallas", x, kernel, ct, pts, **_BLOCKS)
  for name, g, w in zip(("out", "d_x", "d_kernel"), got, want, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    # d_kernel sums B P terms (|d_kernel| up to ~80 here) in another order: float32 rounding.
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-6, err_msg=name)
  assert float(jnp.abs(want[2]).max()) > 1e-2  # a non-trivial kernel gradient


def test_full_point_set_equals_dense_conv_with_default_blocks():
  """Every pixel present: the dense depthwise convolution on the grid (one padded block)."""
  pts = _points(1.0)
  x, kernel, _ = _inputs(_H * _W, (5, 3), seed=3)
  with kernels.interpret(True):
    got = sparse_conv.sparse_depthwise_conv(x, kernel, pts, _H, _W, impl="pallas")
  grid = x.reshape(_B, _H, _W, _C)
  want = sparse.gather_points(sparse.dense_depthwise_conv(grid, kernel), pts)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_neighbour_table_and_scale():
  """The table's ids are the points at each offset; the scale is taps / present neighbours."""
  pts = _points(0.5, seed=4)
  nb = sparse_conv.neighbour_table(pts, _H, _W, 3, 5)  # [B, 15, P]
  pos = np.asarray(pts.pos)
  for k in range(15):
    dy, dx = k // 5 - 1, k % 5 - 2
    ids = np.asarray(nb[:, k])
    ok = ids >= 0
    got = np.take_along_axis(pos, np.maximum(ids, 0)[..., None], axis=1)
    np.testing.assert_array_equal(got[ok], (pos + np.array([dy, dx]))[ok])
  assert (np.asarray(nb[:, 7]) == np.arange(pos.shape[1])).all()  # the centre is the point
  want = 15.0 / np.asarray(sparse._counts(pts, _H, _W, 3, 5))
  np.testing.assert_array_equal(np.asarray(sparse_conv.count_scale(nb)), want)


def _tiny_unet(impl: str) -> SparseOperatorUNet:
  return SparseOperatorUNet(
      nf=8,
      num_blocks=1,
      kernel_size=3,
      train_side=_H,
      grid_size=4,
      grid_channels=8,
      ch=8,
      channel_mult=(1,),
      num_res_blocks=1,
      attention_resolutions=(),
      dropout=0.0,
      sparse_conv_impl=impl,
  )


def test_sparse_unet_pallas_equals_xla():
  pts = _points(0.5, seed=5)
  p = pts.pos.shape[1]
  x = jax.random.normal(jax.random.key(0), (_B, p, 3))
  t = jnp.array([10, 500])
  # Random parameters of the right shapes (no compiled init; the output layer is not zero).
  shapes = jax.eval_shape(lambda: _tiny_unet("xla").init(jax.random.key(1), x, pts, _H, _W, t))
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
  want = jax.jit(_tiny_unet("xla").apply, static_argnums=(3, 4))(params, x, pts, _H, _W, t)
  with kernels.interpret(True):
    net = _tiny_unet("pallas")
    got = jax.jit(net.apply, static_argnums=(3, 4))(params, x, pts, _H, _W, t)
  assert float(jnp.abs(want).max()) > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(kernels.native(), reason="the backend runs Pallas natively")
def test_pallas_without_interpret_on_cpu_is_one_line():
  pts = _points(0.5)
  x, kernel, _ = _inputs(pts.pos.shape[1], (3, 3), seed=0)
  with kernels.interpret(False):
    with pytest.raises(ValueError, match="sparse_conv_impl='pallas' needs a GPU") as err:
      sparse_conv.sparse_depthwise_conv(x, kernel, pts, _H, _W, impl="pallas")
    assert "\n" not in str(err.value)
    t = jnp.zeros((_B,), jnp.int32)
    with pytest.raises(ValueError, match="sparse_conv_impl='pallas' needs a GPU"):
      jax.eval_shape(
          lambda: _tiny_unet("pallas").init(jax.random.key(0), x[..., :3], pts, _H, _W, t)
      )


def test_bad_impl_and_blocks_are_errors():
  pts = _points(1.0)
  x, kernel, _ = _inputs(_H * _W, (3, 3), seed=0)
  with pytest.raises(ValueError, match="sparse_conv_impl must be one of"):
    sparse_conv.sparse_depthwise_conv(x, kernel, pts, _H, _W, impl="triton")
  with kernels.interpret(True):
    with pytest.raises(ValueError, match="power of two"):
      sparse_conv.sparse_depthwise_conv(x, kernel, pts, _H, _W, impl="pallas", block_points=24)
    with pytest.raises(ValueError, match="odd"):
      sparse_conv.sparse_depthwise_conv(x, jnp.ones((2, 3, _C)), pts, _H, _W, impl="pallas")


def test_kernels_lower_through_triton_for_cuda(monkeypatch):
  """Forward and both backward kernels lower to verified Triton modules (no GPU needed).

  This checks the Pallas Triton lowering (power-of-two tensors, gathers, loops); Triton's
  own compilation to PTX happens in XLA on a GPU and is not covered.
  """
  try:
    from jax._src.pallas.triton import lowering
  except ImportError as e:  # a jaxlib without the Triton dialect
    pytest.skip(f"no Pallas Triton lowering in this jaxlib: {e}")
  lower_module = lowering.lower_jaxpr_to_triton_module
  verified = []

  def lower_and_verify(*args, **kwargs):
    result = lower_module(*args, **kwargs)
    with result.module.context:
      verified.append(result.module.operation.verify())
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  h, w, c, num = 16, 16, 40, 100

  def grads(x, kernel, flat, ct):
    pts = sparse.point_set(flat, h, w)
    conv = lambda x, k: sparse_conv.sparse_depthwise_conv(x, k, pts, h, w, impl="pallas")
    out, vjp = jax.vjp(conv, x, kernel)
    return (out, *vjp(ct))

  args = (
      jax.ShapeDtypeStruct((2, num, c), jnp.bfloat16),
      jax.ShapeDtypeStruct((5, 3, c), jnp.float32),
      jax.ShapeDtypeStruct((2, num), jnp.int32),
      jax.ShapeDtypeStruct((2, num, c), jnp.bfloat16),
  )
  # check_impl accepts 'pallas' here only in interpret mode: bypass it for the lowering.
  monkeypatch.setattr(kernels, "check_impl", lambda option, impl, choices=None: impl)
  with kernels.interpret(False):
    text = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, d x, d kernel
  assert verified == [True, True, True]
