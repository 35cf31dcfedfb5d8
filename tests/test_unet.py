"""ADM / DiffAE UNet: the three papers' layouts at tiny widths, names, zero init, collage hook.

Speed: compiling a UNet's init costs more on CPU than its forward pass, so only a small
UNet is initialised for real (zero-init check); the others take their parameter shapes from
`jax.eval_shape` and random values from the host, and stack variants on the batch so that
each test compiles one forward.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff import config_lib
from infdiff import sharding as shard_lib
from infdiff.models import unet as unet_lib

B = 1
# Each paper's layout (levels, attention sides, input size, norm, ...) at tiny widths.
TINY = {
    "infd": dict(ch=8, norm_groups=4, head_channels=4),
    "patch_dm": dict(ch=8, norm_groups=4, cond_dim=8, code_dim=6),
    "infty_diff": dict(ch=8, out_channels=4, cond_dim=6),
}


def _model(name, **over):
  return unet_lib.UNet(**{**unet_lib.PRESETS[name], **TINY[name], **over})


def _inputs(model, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  s = model.image_size
  x = jax.random.normal(ks[0], (B, s, s, model.out_channels))  # [B, S, S, C]
  t = jax.random.randint(ks[1], (B,), 0, 1000)
  cond = jax.random.normal(ks[2], (B, model.cond_dim)) if model.cond_dim else None
  code = jax.random.normal(ks[3], (B, model.code_dim)) if model.code_dim else None
  return x, t, cond, code


# The tests check values, not speed: XLA's cheapest CPU pipeline halves compile times.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args, **kwargs):
  """fn(*args, **kwargs) as one XLA program compiled with `_FAST_COMPILE`."""
  return jax.jit(fn).lower(*args, **kwargs).compile(_FAST_COMPILE)(*args, **kwargs)


def _random_params(tree, seed):
  """Host-side random values of a (boxed, possibly abstract) variable tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape, np.float32)),
      nn.meta.unbox(tree),
  )


def _abstract(model, inputs):
  return jax.eval_shape(model.init, jax.random.key(0), *inputs)


@pytest.mark.parametrize("name", sorted(TINY))
def test_layout_runs_and_params_carry_logical_names(name):
  model = _model(name)
  inputs = _inputs(model)
  abstract = _abstract(model, inputs)
  leaves = jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(p, nn.LogicallyPartitioned) for p in leaves)
  rules = shard_lib.rules_from_config(config_lib.base_config().logical_axis_rules)
  known = {logical for logical, _ in rules}
  for p in leaves:
    assert len(p.names) == p.value.ndim
    assert {n for n in p.names if n is not None} <= known, p.names
  # The names resolve to shardings on a data x fsdp x tensor mesh.
  mesh = shard_lib.make_mesh((2, 2, 2))
  specs = [s.spec for s in jax.tree.leaves(shard_lib.logical_shardings(abstract, mesh, rules))]
  assert len(specs) == len(leaves) and any("fsdp" in str(s) for s in specs)

  # Levels and attention as in the paper: one attention block per ResBlock at the listed
  # sides (encoder num_res_blocks, decoder num_res_blocks + 1) plus the middle one.
  params = nn.meta.unbox(abstract)["params"]
  attn_stages = [k for k, v in params.items() if "attn" in v]
  sides = [model.image_size // 2**level for level in range(len(model.channel_mult))]
  levels_with_attn = sum(side in model.attention_resolutions for side in sides)
  assert len(attn_stages) == levels_with_attn * (2 * model.num_res_blocks + 1) + 1

  # The layout runs at the paper's input size and returns the input's shape.
  out = _run(model.apply, _random_params(abstract, 0), *inputs)
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3


def test_output_and_residual_branches_are_zero_at_init():
  model = unet_lib.UNet(
      image_size=8,
      ch=8,
      channel_mult=(1, 2),
      num_res_blocks=1,
      attention_resolutions=(4,),
      norm_groups=4,
      resblock_updown=True,
      dropout=0.1,
      cond_dim=4,
      code_dim=4,
  )
  inputs = _inputs(model)
  # 'unsafe_rbg' keys compile much faster than threefry on CPU; the values do not matter.
  key = jax.random.key(0, impl="unsafe_rbg")
  out, variables = _run(model.init_with_output, key, *inputs)
  assert out.shape == inputs[0].shape and float(jnp.abs(out).max()) == 0.0
  flat = {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(variables))
  }
  zero = [k for k, v in flat.items() if not np.any(np.asarray(v))]
  # Every ResBlock's conv2, every attention output projection and conv_out start at zero.
  kernels = [k for k in zero if k.endswith("['kernel']")]
  assert any("conv_out" in k for k in kernels)
  n_res = sum(k.endswith("['conv1']['kernel']") for k in flat)
  assert sum(k.endswith("['conv2']['kernel']") for k in kernels) == n_res == 3 + 2 + 3 + 2
  assert sum(k.endswith("['attn']['out']['kernel']") for k in kernels) == 1 + 1 + 2


def test_encode_decode_split_equals_call_and_skips_are_a_hook():
  model = _model("patch_dm", num_res_blocks=1)  # one block per level: a faster compile
  x, t, cond, code = _inputs(model)
  params = _random_params(_abstract(model, (x, t, cond, code)), 1)

  def run(params, x, t, cond, code):
    """The reference __call__ and four decodes from one encoding, stacked on the batch."""
    full = model.apply(params, x, t, cond, code)
    c = model.apply(params, t, cond, code, method="embed")
    skips, h = model.apply(params, x, c, method="encode")
    # 0: unchanged; 1: skips rolled (a stand-in for the collage); 2: bottleneck rolled;
    # 3: decoded with another conditioning (Patch-DM decodes at position + 0.5).
    rolled = [jnp.roll(s, s.shape[1] // 2, axis=1) for s in skips]
    skips4 = [jnp.concatenate([s, r, s, s]) for s, r in zip(skips, rolled)]
    h4 = jnp.concatenate([h, h, jnp.roll(h, 4, axis=2), h])
    c_shift = model.apply(params, t, cond + 0.5, code, method="embed")
    c4 = jax.tree.map(lambda a, b: jnp.concatenate([a, a, a, b]), c, c_shift)
    return full, skips, h, c, model.apply(params, skips4, h4, c4, method="decode")

  full, skips, h, c, outs = _run(run, params, x, t, cond, code)
  assert c.emb.shape == (B, 4 * model.ch) and c.code.shape == (B, model.code_dim)
  assert len(skips) == model.num_skips == 1 + 4 * 1 + 3
  assert skips[0].shape == (B, 64, 64, 8) and skips[-1].shape == (B, 8, 8, 64)
  assert h.shape == (B, 8, 8, 64)
  np.testing.assert_allclose(outs[0], full[0], atol=1e-5, rtol=1e-5)
  for i in (1, 2, 3):  # replaced features (or conditioning) change the output
    assert float(jnp.abs(outs[i] - full[0]).max()) > 1e-3, i
  with pytest.raises(ValueError, match="skips"):
    jax.eval_shape(lambda: model.apply(params, skips[:-1], h, c, method="decode"))


def test_conditioning_changes_the_output():
  model = _model("patch_dm", num_res_blocks=1)
  x, t, cond, code = _inputs(model)
  params = _random_params(_abstract(model, (x, t, cond, code)), 2)
  # Variants on the batch: 0 reference, 1 other code, 2 other position, 3 other time.
  x4 = jnp.concatenate([x] * 4)
  t4 = jnp.concatenate([t, t, t, 999 - t])
  cond4 = jnp.concatenate([cond, cond, -cond, cond])
  code4 = jnp.concatenate([code, -code, code, code])
  out = _run(model.apply, params, x4, t4, cond4, code4)
  for i in (1, 2, 3):
    assert float(jnp.abs(out[i] - out[0]).max()) > 1e-3, i
  with pytest.raises(ValueError, match="code_dim"):
    jax.eval_shape(lambda: model.apply(params, x, t, cond, jnp.ones((B, 3))))


def test_dropout_only_in_training():
  model = _model("patch_dm", num_res_blocks=1)
  inputs = _inputs(model)
  params = _random_params(_abstract(model, inputs), 3)
  train, infer = (
      jax.jit(functools.partial(model.apply, train=mode))
      .lower(params, *inputs, rngs={"dropout": jax.random.key(0)})
      .compile(_FAST_COMPILE)
      for mode in (True, False)
  )
  drop = lambda seed, mode: (train if mode else infer)(
      params, *inputs, rngs={"dropout": jax.random.key(seed)}
  )
  np.testing.assert_array_equal(drop(0, False), drop(1, False))  # rng unused
  np.testing.assert_array_equal(drop(0, True), drop(0, True))
  assert float(jnp.abs(drop(0, True) - drop(1, True)).max()) > 1e-3
  assert float(jnp.abs(drop(0, True) - drop(0, False)).max()) > 1e-3


def test_init_rejects_missing_conditioning():
  model = _model("patch_dm")
  x, t, cond, code = _inputs(model)
  with pytest.raises(ValueError, match="code_dim"):
    jax.eval_shape(model.init, jax.random.key(0), x, t, cond, None)
  with pytest.raises(ValueError, match="cond_dim"):
    jax.eval_shape(model.init, jax.random.key(0), x, t, None, code)
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(model.init, jax.random.key(0), x[:, :36, :36], t, cond, code)


def test_infty_diff_layout_uses_layer_norm_gelu_and_late_dropout():
  model = _model("infty_diff")
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *_inputs(model)))
  norm = abstract["params"]["down_0_0"]["norm1"]
  assert set(norm) == {"scale", "bias"} and norm["scale"].shape == (8,)
  assert model.activation == "gelu" and model.norm == "layer"

  bound = model.bind(_random_params(abstract, 0))
  rates = {}
  for level_stages in bound.down:
    block = level_stages[0]
    if isinstance(block, unet_lib.ResBlock):
      rates[block.out_channels] = max(rates.get(block.out_channels, 0.0), block.dropout)
  # Dropout 0.1 only at feature sides <= 16 (levels 3 and 4: 64 channels).
  assert rates == {8: 0.0, 16: 0.0, 32: 0.0, 64: 0.1}
