"""Shared layers (infdiff.models.layers): same numbers and parameter trees as before the move."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff import config_lib
from infdiff.models import layers

# Golden values computed with the layers' previous home (infdiff/models/dit.py, commit
# a6e3508) before they moved; unchanged numbers mean unchanged checkpoints and samples.
_TIMESTEP_GOLDEN = [
    [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    [-0.9899925, 0.9903207, 0.99997914, 0.14112, 0.13879807, 0.00646326],
    [0.9996499, -0.72866553, -0.54926383, -0.02646075, 0.68486977, 0.83564895],
]
_ATTENTION_GOLDEN = [  # Attention(2, 4, 6), init key 0, output rows 0..2 of sample 0
    [0.18218954, -0.14997213, 0.13218038, -0.07215584, 0.3059476, 0.3223273],
    [0.17847082, -0.14964496, 0.08830896, -0.01769225, 0.22484732, 0.25440764],
    [0.18276575, -0.14448611, 0.08192398, 0.00241497, 0.18895172, 0.23228556],
]
_SWIGLU_GOLDEN = [  # SwiGLU(7), init key 1, rows 0..1 of sample 1
    [-0.23802812, 0.05510671, -0.32596254, 0.43161997, 0.2970612],
    [-0.20149487, 0.05692899, -0.25354442, 0.33779502, 0.23550059],
]


def _tokens():
  return (jnp.arange(2 * 12 * 5, dtype=jnp.float32) / 10).reshape(2, 12, 5)


def test_timestep_embedding_matches_previous_numbers():
  emb = layers.timestep_embedding(jnp.array([0.0, 3.0, 999.0]), 6)
  np.testing.assert_allclose(emb, _TIMESTEP_GOLDEN, rtol=1e-5, atol=1e-6)
  # [cos | sin] of t * 10000^(-k / half).
  t, k = 7.0, np.arange(3)
  want = np.concatenate([np.cos(t * 1e4 ** (-k / 3)), np.sin(t * 1e4 ** (-k / 3))])
  np.testing.assert_allclose(layers.timestep_embedding(jnp.array([t]), 6)[0], want, rtol=1e-5)


def test_position_embedding_is_per_axis_timestep_embedding():
  pos = jnp.array([[0.0, 2.5], [3.0, -1.0]])
  emb = layers.position_embedding(pos, 8)
  assert emb.shape == (2, 8)
  np.testing.assert_array_equal(emb[:, :4], layers.timestep_embedding(pos[:, 0], 4))
  np.testing.assert_array_equal(emb[:, 4:], layers.timestep_embedding(pos[:, 1], 4))


def test_patchify_round_trip_and_layout():
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
  tokens = layers.patchify(x, 2)
  assert tokens.shape == (2, 6, 12)
  # Token 1 is the patch at grid (row 0, col 1), flattened (row, col, channel).
  np.testing.assert_array_equal(tokens[:, 1], x[:, 0:2, 2:4].reshape(2, 12))
  np.testing.assert_array_equal(layers.unpatchify(tokens, 6, 4, 2), x)


def test_attention_and_swiglu_match_previous_numbers_and_trees():
  x = _tokens()
  attn = layers.Attention(heads=2, head_dim=4, out_features=6)
  variables = attn.init(jax.random.key(0), x)
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(variables))["params"]
  assert shapes == {
      "query": {"kernel": (5, 2, 4), "bias": (2, 4)},
      "key": {"kernel": (5, 2, 4), "bias": (2, 4)},
      "value": {"kernel": (5, 2, 4), "bias": (2, 4)},
      "gate": {"kernel": (5, 2, 4), "bias": (2, 4)},
      "query_norm": {"scale": (4,)},
      "key_norm": {"scale": (4,)},
      "out": {"kernel": (2, 4, 6), "bias": (6,)},
  }
  np.testing.assert_allclose(
      attn.apply(variables, jnp.sin(x))[0, :3], _ATTENTION_GOLDEN, rtol=1e-5, atol=1e-6
  )

  mlp = layers.SwiGLU(hidden=7)
  variables = mlp.init(jax.random.key(1), x)
  assert set(variables["params"]) == {"w1", "w2", "w3"}
  np.testing.assert_allclose(
      mlp.apply(variables, jnp.cos(x))[1, :2], _SWIGLU_GOLDEN, rtol=1e-5, atol=1e-6
  )


def test_zero_out_attention_starts_at_zero_and_still_learns():
  x = _tokens()
  attn = layers.Attention(2, 4, 6, gated=False, qk_norm=False, zero_out=True)
  variables = attn.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"query", "key", "value", "out"}
  assert float(jnp.abs(attn.apply(variables, x)).max()) == 0.0
  grad = jax.grad(lambda v: jnp.sum(attn.apply(v, x) ** 2 + attn.apply(v, x)))(variables)
  assert float(jnp.abs(nn.meta.unbox(grad)["params"]["out"]["kernel"]).max()) > 0.0


def test_factories_carry_logical_names_known_to_the_rules():
  rules = config_lib.base_config().logical_axis_rules
  known = {name for name, _ in rules}

  class M(nn.Module):

    @nn.compact
    def __call__(self, x):  # x [B, H, W, 4]
      x = layers.conv(6, 3, jnp.float32, jnp.float32, strides=2, name="conv")(x)
      x = layers.layer_norm(jnp.float32, name="ln")(x)
      x = layers.layer_norm(jnp.float32, affine=False, name="ln_plain")(x)
      return layers.dense(5, ("embed", "mlp"), jnp.float32, jnp.float32, zero=True)(x)

  x = jnp.ones((1, 5, 5, 4))
  out, variables = M().init_with_output(jax.random.key(0), x)
  assert out.shape == (1, 3, 3, 5)  # ceil(5 / 2): padding 1 as torch's k3 s2 p1
  assert float(jnp.abs(out).max()) == 0.0  # zero dense
  assert "ln_plain" not in variables["params"]  # affine-free: no parameters
  leaves = jax.tree.leaves(variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert len(leaves) == 6
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
    assert {n for n in leaf.names if n is not None} <= known
  # Activation names resolve too (with_logical_constraint would replicate unknown names).
  assert {*layers.ACT_TOKENS, *layers.ACT_GRID, "act_mlp", "act_heads", "act_kv"} <= known
