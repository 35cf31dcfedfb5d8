"""The Pallas window-attention kernel (interpret mode on CPU) against its XLA reference.

Inputs are built with numpy: eager jax ops would each compile, which costs more here
than the kernels.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff import fields, kernels
from infdiff.kernels import window_attention as wattn
from infdiff.models import swin
from infdiff.models.renderers import make_renderer

TOL = 1e-5


def _masks(b, h, wd, w, s, seed=7):
  """Key mask [B, nW, N] and region labels [nW, N] (None unshifted) of an h x wd grid.

  The grid is padded to window multiples (partly padded border windows), a few more keys
  are dropped at random, and sample 0's first window has no key at all.
  """
  hp, wp = -(-h // w) * w, -(-wd // w) * w
  valid = np.zeros((b, hp, wp), bool)
  valid[:, :h, :wd] = np.random.default_rng(seed).random((b, h, wd)) < 0.8
  valid = np.roll(valid, (-s, -s), axis=(1, 2))  # as the block shifts its tokens
  key_mask = swin.window_partition(valid[..., None], w)[..., 0]  # [B, nW, N]
  key_mask[0, 0] = False
  region = swin.shifted_window_labels(hp, wp, w, s) if s else None
  return key_mask, region


def _inputs(b, nw, nh, n, hd, seed=0, dtype=np.float32):
  """q, k, v, bias and an output cotangent g, standard normal."""
  rng = np.random.default_rng(seed)
  q, k, v, g = (rng.standard_normal((b, nw, nh, n, hd)).astype(dtype) for _ in range(4))
  return q, k, v, rng.standard_normal((nh, n, n)).astype(dtype), g


def _value_and_grads(impl, key_mask, region, g, block_windows):
  def loss(q, k, v, bias):
    out = wattn.window_attention(
        q, k, v, bias, key_mask, region, impl=impl, block_windows=block_windows
    )
    return jnp.sum(out * g), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _max_rel_err(a, b):
  """Largest |a - b| of any leaf, relative to max(1, max |b|) of that leaf."""
  errs = [
      float(jnp.abs(x - y).max()) / max(1.0, float(jnp.abs(y).max()))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]
  return max(errs)


@pytest.mark.parametrize(
    "heads,w,shift,grid,block_windows",
    [
        (1, 4, 0, (7, 9), 4),  # nW = 6 padded to 8 windows
        (2, 4, 2, (7, 9), 4),
        (2, 4, 2, (5, 5), 8),  # a block larger than nW
        (4, 8, 0, (9, 11), 4),  # N = 64
        (2, 8, 4, (9, 11), 3),  # N = 64; nW = 4 padded to 6
        (4, 6, 3, (7, 8), 2),  # N = 36 padded to 64 inside the kernel
    ],
)
def test_values_and_gradients_match_reference(heads, w, shift, grid, block_windows):
  b, hd = 2, 4
  key_mask, region = _masks(b, *grid, w, shift)
  q, k, v, bias, g = _inputs(b, key_mask.shape[1], heads, w * w, hd)
  (ref_loss, ref_out), ref_grads = _value_and_grads("xla", key_mask, region, g, 1)(q, k, v, bias)
  with kernels.interpret(True):
    fn = _value_and_grads("pallas", key_mask, region, g, block_windows)
    (loss, out), grads = fn(q, k, v, bias)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
  np.testing.assert_allclose(loss, ref_loss, atol=TOL * 10, rtol=TOL)
  for name, got, want in zip("q k v bias".split(), grads, ref_grads):
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"d{name}")


def test_bfloat16_inputs_stay_close():
  key_mask, region = _masks(1, 7, 9, 4, 2)
  q, k, v, bias, _ = _inputs(1, key_mask.shape[1], 2, 16, 8, dtype=jnp.bfloat16)
  attend = lambda impl: jax.jit(lambda *a: wattn.window_attention(*a, key_mask, region, impl=impl))(
      q, k, v, bias
  )
  ref = attend("xla")
  with kernels.interpret(True):
    out = attend("pallas")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=3e-2)


def _module_grads(attn, params, x, valid):
  """((loss, (output, intermediates)), (d params, d x)) of a scalar loss on attn's output."""

  def loss(p, x):
    y, state = attn.apply({"params": p}, x, valid, mutable=["intermediates"])
    return jnp.sum(y * jnp.cos(y)), (y, state)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("heads,w,shift", [(1, 4, 0), (4, 8, 4)])
def test_window_attention_module_values_and_param_gradients(heads, w, shift):
  h, wd, dim = 7, 10, 8
  hp, wp = -(-h // w) * w, -(-wd // w) * w
  x = np.zeros((2, hp, wp, dim), np.float32)
  x[:, :h, :wd] = np.random.default_rng(0).standard_normal((2, h, wd, dim))
  valid = np.zeros((2, hp, wp), bool)
  valid[:, :h, :wd] = True
  valid[1, :3, :2] = False
  kw = dict(dim=dim, num_heads=heads, window=w, shift=shift, rpb_init_slope=0.5)
  ref_attn = swin.WindowAttention(**kw)
  params = nn.unbox(jax.jit(ref_attn.init)(jax.random.key(1), x, valid))["params"]
  (_, (ref_y, ref_state)), ref_g = _module_grads(ref_attn, params, x, valid)
  with kernels.interpret(True):
    attn = swin.WindowAttention(**kw, attention_impl="pallas")
    shapes = jax.eval_shape(attn.init, jax.random.key(1), x, valid)["params"]
    (_, (y, state)), g = _module_grads(attn, params, x, valid)
  assert jax.tree.map(lambda a: a.shape, nn.unbox(shapes)) == jax.tree.map(jnp.shape, params)
  # The weights are sown on the XLA path only: the kernel never materialises them.
  assert jax.tree.leaves(ref_state) and not jax.tree.leaves(state)
  np.testing.assert_allclose(y, ref_y, atol=TOL, rtol=0)
  # Parameter gradients sum over every token: compared relative to their size.
  assert _max_rel_err(g, ref_g) < TOL, _max_rel_err(g, ref_g)
  assert float(jnp.abs(g[0]["rel_pos_bias"]).max()) > 1e-3  # the bias table does learn


def test_cqar_render_pallas_equals_xla():
  b, hq, wq = 2, 11, 13  # not multiples of the window
  latent = np.random.default_rng(0).standard_normal((b, 6, 5, 4)).astype(np.float32)
  coords = np.broadcast_to(np.float32(fields.coord_grid(hq, wq)), (b, hq, wq, 2))
  cells = np.broadcast_to(np.float32(fields.cell_size(hq, wq)), (b, 2))
  valid = np.ones((b, hq, wq), bool)
  valid[0, :, 9:] = False
  tiny = dict(dim=16, depth=2, num_heads=2, window=4, rpb_init_slope=1.0)
  ref = make_renderer("cqar", **tiny)
  assert ref.attention_impl == "xla"
  variables = jax.jit(ref.init)(jax.random.key(1), latent, coords, cells, valid)
  want = jax.jit(ref.apply)(variables, latent, coords, cells, valid)
  with kernels.interpret(True):
    model = make_renderer("cqar", **tiny, attention_impl="pallas")
    got = jax.jit(model.apply)(variables, latent, coords, cells, valid)
  assert got.shape == (b, hq, wq, 3)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_pallas_without_gpu_or_interpret_is_one_line_error():
  if kernels.native():
    pytest.skip("a GPU/TPU backend runs the kernel natively")
  x = jnp.zeros((1, 4, 4, 8))
  valid = jnp.ones((1, 4, 4), bool)
  attn = swin.WindowAttention(dim=8, num_heads=2, window=4, attention_impl="pallas")
  with kernels.interpret(False):
    with pytest.raises(ValueError, match="attention_impl='pallas' needs a GPU or TPU") as err:
      attn.init(jax.random.key(0), x, valid)
    assert "\n" not in str(err.value)
    q = jnp.zeros((1, 1, 2, 16, 4))
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
      wattn.window_attention(
          q, q, q, jnp.zeros((2, 16, 16)), jnp.ones((1, 1, 16), bool), impl="pallas"
      )


def test_unknown_impl_raises():
  x = jnp.zeros((1, 4, 4, 8))
  valid = jnp.ones((1, 4, 4), bool)
  attn = swin.WindowAttention(dim=8, num_heads=2, window=4, attention_impl="triton")
  with pytest.raises(ValueError, match="attention_impl must be one of 'xla', 'pallas'"):
    attn.init(jax.random.key(0), x, valid)
  q = jnp.zeros((1, 1, 2, 16, 4))
  with pytest.raises(ValueError, match="got 'cuda'"):
    wattn.window_attention(q, q, q, jnp.zeros((2, 16, 16)), jnp.ones((1, 1, 16), bool), impl="cuda")


@pytest.mark.parametrize("n,hd,shifted", [(64, 64, True), (16, 4, False), (36, 8, True)])
def test_kernel_lowers_to_triton_for_gpu(n, hd, shifted):
  """Forward and backward lower through Pallas' Triton backend for CUDA (no GPU needed).

  This runs the Pallas-to-Triton lowering (its power-of-two and 2-D matmul rules), not the
  Triton compiler itself.
  """
  b, nw, nh = 2, 5, 4
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  args = (f32(b, nw, nh, n, hd),) * 3 + (f32(nh, n, n),)
  key_mask = jax.ShapeDtypeStruct((b, nw, n), jnp.bool_)
  region = jax.ShapeDtypeStruct((nw, n), jnp.int32)

  def grads(q, k, v, bias, key_mask, region):
    loss = lambda *a: jnp.sum(
        wattn.window_attention_pallas(*a, key_mask, region if shifted else None, interpret=False)
        ** 2
    )
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  try:
    lowered = jax.jit(grads).trace(*args, key_mask, region).lower(lowering_platforms=("cuda",))
  except (ImportError, NotImplementedError) as e:  # a jaxlib built without Triton
    pytest.skip(f"this jaxlib cannot lower Pallas to Triton: {e}")
  calls = re.findall(r"custom_call @([\w$.]+)", lowered.as_text())
  assert calls.count("__gpu$xla.gpu.triton") == 2, calls  # forward and backward kernels
