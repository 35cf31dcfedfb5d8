"""DiT denoiser, its attention/RoPE helpers, and the demo text path."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff.models import dit as dit_lib
from infdiff.models import layers
from infdiff.models import text as text_lib

LOGICAL_NAMES = {
    "batch",
    "height",
    "width",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv",
    "conv_in",
    "conv_out",
    "vocab",
    "norm",
    "latent",
    "rel_pos",
    None,
}

B, L, DT = 8, 6, 16
MODEL = dit_lib.DiT(
    patch=2,
    in_channels=4,
    bottleneck=16,
    width=32,
    depth=2,
    heads=4,
    text_blocks=1,
    text_dim=DT,
    repa_block=1,
)
# One jitted apply shared by the tests so each input shape compiles once.
_apply = jax.jit(MODEL.apply, static_argnames=("train", "return_repa"))


def _velocity(params, x, t, text, mask):
  return _apply(params, x, t, text, mask, return_repa=True)[0]


def _inputs(h=8, w=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (B, h, w, 4))
  t = jax.random.uniform(ks[1], (B,))
  text = jax.random.normal(ks[2], (B, L, DT))
  lengths = jnp.arange(B) % L  # sample 0 has no text: the unconditional input
  mask = (jnp.arange(L)[None] < lengths[:, None]).astype(jnp.int32)
  return x, t, text, mask


@pytest.fixture(scope="module")
def variables():
  return jax.jit(MODEL.init)(jax.random.key(0), *_inputs())


@pytest.fixture(scope="module")
def trained_like(variables):
  """Params perturbed away from the zero-initialised modulation and output layer."""
  rng = np.random.default_rng(1)  # on the host: no per-leaf compilations
  return jax.tree.map(
      lambda p: jnp.asarray(p + 0.2 * rng.standard_normal(p.shape, np.float32)),
      nn.meta.unbox(variables),
  )


def test_zero_init_output_and_repa_shape(variables):
  x, t, text, mask = _inputs()
  v, repa = _apply(variables, x, t, text, mask, return_repa=True)
  assert v.shape == x.shape and v.dtype == jnp.float32
  assert float(jnp.abs(v).max()) == 0.0
  assert repa.shape == (B, 16, MODEL.width)  # (8/2) * (8/2) tokens
  assert float(jnp.abs(repa).max()) > 0.0


@pytest.mark.parametrize("h,w", [(8, 8), (4, 12)])
def test_any_latent_size_with_same_params(trained_like, h, w):
  x, t, text, mask = _inputs(h, w)
  v, repa = _apply(trained_like, x, t, text, mask, return_repa=True)
  assert v.shape == (B, h, w, 4)
  assert bool(jnp.all(jnp.isfinite(v)))
  assert float(jnp.std(v)) > 1e-3
  assert repa.shape == (B, (h // 2) * (w // 2), MODEL.width)


def test_text_padding_is_ignored(trained_like):
  x, t, text, mask = _inputs()
  v = _velocity(trained_like, x, t, text, mask)
  noise = 10.0 * jax.random.normal(jax.random.key(9), text.shape)
  padded = jnp.where(mask[..., None] > 0, text, noise)
  np.testing.assert_allclose(_velocity(trained_like, x, t, padded, mask), v, atol=1e-5, rtol=1e-5)
  # ...while real tokens matter, except for samples whose text is all padding.
  diff = jnp.abs(_velocity(trained_like, x, t, text + noise, mask) - v).reshape(B, -1).max(-1)
  empty = np.asarray(mask.sum(-1) == 0)
  assert empty.any() and not empty.all()
  assert np.all(np.asarray(diff)[empty] < 1e-5)
  assert np.all(np.asarray(diff)[~empty] > 1e-3)
  # The timestep matters too.
  assert float(jnp.abs(_velocity(trained_like, x, 1.0 - t, text, mask) - v).max()) > 1e-3


def test_params_carry_logical_names(variables):
  leaves = jax.tree.leaves(variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)
  for p in leaves:
    assert len(p.names) == p.value.ndim
    assert set(p.names) <= LOGICAL_NAMES
    assert p.value.dtype == jnp.float32


def test_rope_depends_on_offset_only():
  cos, sin = layers.rope_2d(5, 7, 8)
  assert cos.shape == (35, 4)
  q = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, 1, 1, 8)), (1, 35, 1, 8))
  k = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (1, 1, 1, 8)), (1, 35, 1, 8))
  qr = layers.apply_rope(q, cos, sin)[0, :, 0].reshape(5, 7, 8)
  kr = layers.apply_rope(k, cos, sin)[0, :, 0].reshape(5, 7, 8)
  dot = lambda a, b: float(jnp.dot(qr[a], kr[b]))
  np.testing.assert_allclose(dot((0, 0), (1, 2)), dot((3, 4), (4, 6)), rtol=1e-4)
  np.testing.assert_allclose(dot((2, 5), (0, 1)), dot((4, 6), (2, 2)), rtol=1e-4)
  # Rows and columns are distinguished (offset (1, 0) is not offset (0, 1)).
  assert abs(dot((0, 0), (1, 0)) - dot((0, 0), (0, 1))) > 1e-4
  # Rotation keeps norms.
  np.testing.assert_allclose(
      jnp.linalg.norm(qr, axis=-1), jnp.linalg.norm(q[0, :, 0], axis=-1).reshape(5, 7), rtol=1e-5
  )


def test_attention_impls_agree():
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (3, 5, 2, 8))
  k = jax.random.normal(ks[1], (3, 7, 2, 8))
  v = jax.random.normal(ks[2], (3, 7, 2, 8))
  mask = jnp.array([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [0] * 7], bool)
  ref = layers.dot_product_attention(q, k, v, mask, impl="xla")
  np.testing.assert_allclose(
      layers.dot_product_attention(q, k, v, mask, impl="jax"), ref, atol=1e-5
  )
  assert float(jnp.abs(ref[2]).max()) == 0.0  # no valid key: no update
  # Only the two valid keys of sample 1 matter.
  np.testing.assert_allclose(
      ref[1], layers.dot_product_attention(q[1:2], k[1:2, :2], v[1:2, :2])[0], atol=1e-5
  )


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)])
def test_sharded_forward_matches_single_device(trained_like, variables, shape):
  mesh = jax.make_mesh(
      shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  rules = (
      ("act_batch", ("data", "fsdp")),  # activations are named apart from parameters
      ("act_mlp", "tensor"),
      ("act_heads", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
  )
  x, t, text, mask = _inputs()
  want = _velocity(trained_like, x, t, text, mask)

  specs = nn.get_partition_spec(variables)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  params = jax.device_put(trained_like, shardings)
  kernel = params["params"]["block_0"]["mlp"]["w1"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.shape == (32 // shape[1], 128 // shape[2])

  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  x, t, text, mask = jax.device_put((x, t, text, mask), batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(MODEL.apply)(params, x, t, text, mask)
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # reduction order differs


def test_word_vocab_round_trip(tmp_path):
  caps = ["A red cat.", "a red dog", "A blue cat sits", "red"]
  vocab = text_lib.WordVocab.build(caps, max_size=6)
  # Most frequent first, ties alphabetical ("a" and "red" 3x, "cat" 2x, "." first of 1x).
  assert vocab.words == ("<pad>", "<unk>", "a", "red", "cat", ".")
  ids, mask = vocab.encode(["Red cat!", "a zebra cat", ""], max_length=3)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  np.testing.assert_array_equal(ids, [[3, 4, 1], [2, 1, 4], [0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
  ids, mask = vocab.encode(["a red cat . red cat"], max_length=4)  # truncated
  np.testing.assert_array_equal(ids, [[2, 3, 4, 5]])
  ids, mask = vocab.encode(["cat"], max_length=4)  # padded
  np.testing.assert_array_equal(ids, [[4, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0]])
  assert vocab.decode(ids[0]) == "cat"
  path = str(tmp_path / "vocab.json")
  vocab.save(path)
  loaded = text_lib.WordVocab.load(path)
  assert loaded == vocab
  np.testing.assert_array_equal(loaded.encode(caps, 8)[0], vocab.encode(caps, 8)[0])


def test_small_text_encoder_feeds_dit(trained_like):
  caps = ["a red cat", "a blue dog", "", "red", "a cat", "dog", "blue blue cat", "a"]
  vocab = text_lib.WordVocab.build(caps, max_size=16)
  encoder = text_lib.build_text_encoder(
      "small", vocab_size=len(vocab), width=DT, heads=2, max_length=L
  )
  assert encoder.trainable and encoder.width == DT
  ids, mask = vocab.encode(caps, max_length=L)
  enc_vars = jax.jit(encoder.init)(jax.random.key(0), ids, mask)
  leaves = jax.tree.leaves(enc_vars, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert all(isinstance(p, nn.Partitioned) and len(p.names) == p.value.ndim for p in leaves)
  encode = jax.jit(encoder.encode)
  feats = encode(enc_vars, ids, mask)
  assert feats.hidden.shape == (B, L, DT)
  assert float(jnp.abs(feats.hidden[mask == 0]).max()) == 0.0
  # Padding ids beyond the text do not change the real tokens' features.
  ids2 = np.where(mask > 0, ids, len(vocab) - 1)
  np.testing.assert_allclose(encode(enc_vars, ids2, mask).hidden, feats.hidden, atol=1e-6)
  x, t, _, _ = _inputs()
  v = _velocity(trained_like, x, t, feats.hidden, feats.mask)
  assert v.shape == x.shape and bool(jnp.all(jnp.isfinite(v)))


def test_qwen3_adapter_wraps_apply_fn():
  def apply_fn(params, ids, mask):
    h = params["table"][ids]  # [B, L, D]
    return {"hidden_states": [h * 0.0, h]}

  adapter = text_lib.Qwen3Adapter(apply_fn, {"table": jnp.ones((10, 3))}, width=3)
  assert not adapter.trainable
  ids = jnp.array([[2, 3, 0]])
  mask = jnp.array([[1, 1, 0]])
  params = adapter.init(None, ids, mask)
  feats = adapter.encode(params, ids, mask)
  np.testing.assert_array_equal(feats.hidden, [[[1.0] * 3, [1.0] * 3, [0.0] * 3]])
  grad = jax.grad(lambda p: adapter.encode(p, ids, mask).hidden.sum())(params)
  assert float(jnp.abs(grad["table"]).max()) == 0.0  # frozen
  with pytest.raises(KeyError):
    text_lib.build_text_encoder("bert")


def test_pallas_flash_attention_matches_reference_values_and_gradients():
  """attention_impl='pallas' (JAX's flash-attention kernel, interpreted on CPU) equals the
  einsum reference for the unmasked image self-attention, forward and backward; masked
  attention under 'pallas' goes through jax.nn and equals the reference too."""
  from infdiff import kernels

  ks = jax.random.split(jax.random.key(5), 4)
  q, k, v = (jax.random.normal(ks[i], (2, 32, 2, 16)) for i in range(3))
  cot = jax.random.normal(ks[3], (2, 32, 2, 16))

  def loss(impl, q, k, v):
    return jnp.sum(layers.dot_product_attention(q, k, v, impl=impl) * cot)

  with kernels.interpret(True):
    out = layers.dot_product_attention(q, k, v, impl="pallas")
    grads = jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2))(q, k, v)
    mask = jnp.array([[1] * 32, [1] * 5 + [0] * 27], bool)
    masked = layers.dot_product_attention(q, k, v, mask, impl="pallas")
  np.testing.assert_allclose(out, layers.dot_product_attention(q, k, v), atol=1e-5)
  ref_grads = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5)
  np.testing.assert_allclose(masked, layers.dot_product_attention(q, k, v, mask), atol=1e-5)


def test_attention_impl_that_cannot_run_here_is_one_line():
  with pytest.raises(ValueError, match="needs a GPU or TPU"):
    layers.check_attention_impl("pallas")
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    layers.check_attention_impl("cudnn")
  with pytest.raises(ValueError, match="must be one of"):
    layers.check_attention_impl("flash")
  with pytest.raises(ValueError, match="multiples of 16"):
    from infdiff import kernels

    with kernels.interpret(True):
      q = jnp.zeros((1, 20, 1, 8))
      layers.dot_product_attention(q, q, q, impl="pallas")


def test_conv_head_starts_at_zero_and_draws_across_patch_seams():
  model = MODEL.clone(conv_head=3)
  x, t, text, mask = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), x, t, text, mask)
  assert float(jnp.abs(model.apply(variables, x, t, text, mask)).max()) == 0.0
  rng = np.random.default_rng(2)
  params = jax.tree.map(
      lambda p: jnp.asarray(p + 0.2 * rng.standard_normal(p.shape, np.float32)),
      nn.meta.unbox(variables),
  )
  v, inter = model.apply(params, x, t, text, mask, capture_intermediates=True)
  assert v.shape == x.shape
  # Known answer: v = conv3x3(silu(unpatchify(final tokens))) with zero padding.
  tokens = inter["intermediates"]["final"]["__call__"][0]  # [B, N, p*p*3]
  feats = jax.nn.silu(layers.unpatchify(tokens, 8, 8, 2))
  conv = params["params"]["final_conv"]
  want = (
      jax.lax.conv_general_dilated(
          feats,
          conv["kernel"],
          (1, 1),
          ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      + conv["bias"]
  )
  np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-5)
  assert conv["kernel"].shape == (3, 3, 3, 4)


def test_pooled_text_adds_the_masked_mean_caption_to_the_condition():
  model = MODEL.clone(pooled_text=True)
  x, t, text, mask = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), x, t, text, mask)
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda p: jnp.asarray(p + 0.2 * rng.standard_normal(p.shape, np.float32)),
      nn.meta.unbox(variables),
  )
  v, inter = model.apply(params, x, t, text, mask, capture_intermediates=True)
  # Known answer: the first pooled layer sees the mean of the real tokens (zero for the
  # all-padding, unconditional sample).
  m = np.asarray(mask, np.float32)[..., None]
  mean = (np.asarray(text) * m).sum(1) / np.maximum(m.sum(1), 1.0)
  layer = params["params"]["pooled_mlp_0"]
  want = mean @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"])
  got = inter["intermediates"]["pooled_mlp_0"]["__call__"][0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Padding stays ignored.
  noise = 10.0 * jax.random.normal(jax.random.key(9), text.shape)
  padded = jnp.where(mask[..., None] > 0, text, noise)
  np.testing.assert_allclose(model.apply(params, x, t, padded, mask), v, atol=1e-5, rtol=1e-5)
  # With the pooled output layer zeroed, the model is the plain DiT with the same params.
  zero_out = jax.tree.map(jnp.zeros_like, params["params"]["pooled_mlp_1"])
  zeroed = {"params": {**params["params"], "pooled_mlp_1": zero_out}}
  plain = {"params": {k: p for k, p in params["params"].items() if not k.startswith("pooled")}}
  np.testing.assert_allclose(
      model.apply(zeroed, x, t, text, mask), MODEL.apply(plain, x, t, text, mask), atol=1e-5
  )
  assert float(jnp.abs(model.apply(zeroed, x, t, text, mask) - v).max()) > 1e-3
