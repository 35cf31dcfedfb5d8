"""A GAN-style method with two parameter groups runs through the one trainer step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infdiff import config_lib, train
from infdiff import sharding as shard_lib
from infdiff.methods.base import Method


class _MLP(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    x = nn.tanh(nn.Dense(16, kernel_init=init)(x))
    return nn.Dense(self.width, kernel_init=init)(x)


class ToyGAN(Method):
  groups = ("model", "disc")
  ema_groups = ("model",)

  def __init__(self, config):
    super().__init__(config, "toy", "/tmp")
    self.gen, self.disc = _MLP(2), _MLP(1)
    self.seen_gen = []

  def init(self, rng, batch):
    r1, r2 = jax.random.split(rng)
    z = batch["z"]
    return {
        "model": self.gen.init(r1, z)["params"],
        "disc": self.disc.init(r2, batch["x"])["params"],
    }

  def optimizer_config(self, group):
    return self.cfg.optim_disc if group == "disc" else self.cfg.optim

  def loss(self, group, params, aux, batch, rng, step):
    fake = self.gen.apply({"params": params["model"]}, batch["z"])
    d_fake = self.disc.apply({"params": params["disc"]}, fake)
    if group == "model":  # non-saturating generator loss
      return jnp.mean(jax.nn.softplus(-d_fake)), {}
    d_real = self.disc.apply({"params": params["disc"]}, batch["x"])
    loss = jnp.mean(jax.nn.softplus(-d_real)) + jnp.mean(jax.nn.softplus(d_fake))
    # What the discriminator saw of the generator: checked below.
    return loss, {"fake_mean": jnp.mean(fake)}


def test_two_groups_update_in_order_with_their_own_optimisers():
  c = config_lib.base_config()
  c.ema_decay = 0.9
  c.toy = ml_collections.ConfigDict()
  c.toy.optim = config_lib.optim_config(lr=1e-2, total_steps=10)
  c.toy.optim_disc = config_lib.optim_config(lr=0.0, total_steps=10)  # frozen by lr=0
  method = ToyGAN(c)
  rng = np.random.default_rng(0)
  batch = {
      "z": rng.normal(size=(8, 4)).astype(np.float32),
      "x": rng.normal(size=(8, 2)).astype(np.float32),
  }
  mesh = shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = shard_lib.rules_from_config(c.logical_axis_rules)
  state, _, txs = train.build_state(method, c, mesh, rules, batch)
  step = jax.jit(train.make_train_step(method, txs, c))
  new, metrics = step(state, batch, {})
  # The generator moved; the discriminator (lr 0) did not.
  moved = jax.tree.leaves(
      jax.tree.map(
          lambda a, b: float(jnp.abs(a - b).max()), new.params["model"], state.params["model"]
      )
  )
  still = jax.tree.leaves(
      jax.tree.map(
          lambda a, b: float(jnp.abs(a - b).max()), new.params["disc"], state.params["disc"]
      )
  )
  assert max(moved) > 0 and max(still) == 0
  # The discriminator loss was computed with the generator after its update this step.
  fake_new = method.gen.apply({"params": new.params["model"]}, batch["z"])
  np.testing.assert_allclose(float(metrics["disc/fake_mean"]), float(jnp.mean(fake_new)), rtol=1e-5)
  assert set(new.ema) == {"model"} and int(new.step) == 1
