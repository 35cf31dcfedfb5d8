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


# --- mutable model state and placed frozen inputs through the real trainer -----------


class _BNDisc(nn.Module):
  """Dense -> BatchNorm (batch statistics) -> Dense, with a counter of training calls."""

  @nn.compact
  def __call__(self, x):  # [B, F] -> [B, 1]
    calls = self.variable("counter", "calls", lambda: jnp.zeros((), jnp.int32))
    if not self.is_initializing():
      calls.value += 1
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=False, momentum=0.5)(x)
    return nn.Dense(1)(nn.relu(x))


class ToyBN(Method):
  """A GAN whose discriminator keeps BatchNorm statistics (the INFD pattern).

  Only the discriminator's own step updates its state (the generator step returns the
  plain (loss, metrics)), so the counter equals the number of steps taken.
  """

  groups = ("model", "disc")
  ema_groups = ("model",)
  finals = []  # (state, aux) of every finished train_stage, appended by finalize

  def __init__(self, config, stage="toy", workdir="/tmp"):
    super().__init__(config, stage, workdir)
    self.gen, self.disc = _MLP(4), _BNDisc()

  def data_transform(self, split):
    from infdiff.data import transforms

    return transforms.RandomResizedSquare(size=4)

  def prepare(self, mesh, training=True):
    del mesh, training
    return {
        # Split over 'fsdp' by the logical rule ('embed', 'fsdp'); the other is replicated.
        "boxed": nn.LogicallyPartitioned(
            np.arange(32, dtype=np.float32).reshape(8, 4), ("embed", None)
        ),
        "plain": np.full((3,), 0.5, np.float32),
    }

  def init(self, rng, batch):
    r1, r2 = jax.random.split(rng)
    x = self._real(batch)
    disc = self.disc.init(r2, x)
    return {
        "params": {"model": self.gen.init(r1, x)["params"], "disc": disc["params"]},
        "state": {"disc": {"batch_stats": disc["batch_stats"], "counter": disc["counter"]}},
    }

  def _real(self, batch):
    x = batch["image"]
    return x.reshape(x.shape[0], -1)[:, :4] * 2.0 - 1.0  # [B, 4]

  def loss(self, group, params, aux, batch, rng, step, state):
    real = self._real(batch)
    fake = self.gen.apply({"params": params["model"]}, real[::-1] + jnp.sum(aux["plain"]))
    disc_vars = {"params": params["disc"], **state["disc"]}
    if group == "model":
      d_fake, _ = self.disc.apply(disc_vars, fake, mutable=["batch_stats", "counter"])
      return jnp.mean(jax.nn.softplus(-d_fake)), {}
    both = jnp.concatenate([real, jax.lax.stop_gradient(fake)])
    d, updates = self.disc.apply(disc_vars, both, mutable=["batch_stats", "counter"])
    d_real, d_fake = jnp.split(d, 2)
    loss = jnp.mean(jax.nn.softplus(-d_real)) + jnp.mean(jax.nn.softplus(d_fake))
    loss = loss + 0.0 * jnp.sum(aux["boxed"])
    if self.cfg.nan_disc:
      loss = loss * jnp.nan
    return loss, {}, {"disc": dict(updates)}

  def optimizer_config(self, group):
    return self.cfg.optim

  def finalize(self, ctx):
    ToyBN.finals.append((ctx.state, ctx.aux))


def _toy_config(steps):
  from infdiff.data.pipeline import default_data_config

  c = config_lib.base_config()
  c.stages = ("toy",)
  c.total_steps = steps
  c.log_every = steps
  c.checkpoint_every = steps
  c.ema_decay = 0.9
  c.mesh = (2, 4, 1)  # 8 simulated devices: data 2 x fsdp 4
  c.compilation_cache_dir = ""
  c.data = default_data_config()
  c.data.source = "shapes"
  c.data.shapes_size = 8
  c.data.num_threads = 1
  c.toy = ml_collections.ConfigDict()
  c.toy.batch_size = 8
  c.toy.optim = config_lib.optim_config(lr=1e-2, total_steps=steps)
  c.toy.nan_disc = False
  return c


def _stage(config, workdir):
  ToyBN.finals.clear()
  state = train.train_stage(config, "toy", str(workdir))
  ((_, aux),) = ToyBN.finals
  return state, aux


def test_mutable_state_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
  import chex

  from infdiff import checkpoint as ckpt_lib

  monkeypatch.setattr(train, "get_method_class", lambda name: ToyBN)
  state, aux = _stage(_toy_config(3), tmp_path / "a")
  disc = jax.device_get(state.model_state["disc"])
  assert int(disc["counter"]["calls"]) == 3  # the disc loss ran 3 times in training
  stats = disc["batch_stats"]["BatchNorm_0"]
  assert np.abs(stats["mean"]).max() > 0 and np.abs(stats["var"] - 1).max() > 0  # moved
  assert set(state.ema) == {"model"}

  # Saved with the rest of the state.
  saved, step = ckpt_lib.restore_params_only(str(tmp_path / "a" / "checkpoints"))
  assert step == 3
  chex.assert_trees_all_equal(saved["model_state"]["disc"], disc)

  # Resumed: 3 more steps continue from the saved statistics, as one 6-step run does.
  resumed, _ = _stage(_toy_config(6), tmp_path / "a")
  straight, _ = _stage(_toy_config(6), tmp_path / "b")
  assert int(jax.device_get(resumed.model_state["disc"]["counter"]["calls"])) == 6
  chex.assert_trees_all_close(
      jax.device_get(resumed.model_state), jax.device_get(straight.model_state), rtol=1e-6
  )
  chex.assert_trees_all_close(
      jax.device_get(resumed.params), jax.device_get(straight.params), rtol=1e-6
  )

  # Frozen inputs: the boxed leaf is split over fsdp (4 ways), the plain one replicated.
  boxed, plain = aux["boxed"], aux["plain"]
  assert boxed.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert {s.data.shape for s in boxed.addressable_shards} == {(2, 4)}
  assert plain.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(boxed), np.arange(32).reshape(8, 4))


def test_nonfinite_step_keeps_model_state():
  c = _toy_config(1)
  c.toy.nan_disc = True
  method = ToyBN(c)
  batch = {"image": np.random.default_rng(0).random((8, 4, 4, 3), np.float32)}
  mesh = shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = shard_lib.rules_from_config(c.logical_axis_rules)
  state, _, txs = train.build_state(method, c, mesh, rules, batch)
  aux = nn.unbox(method.prepare(mesh))
  new, metrics = jax.jit(train.make_train_step(method, txs, c))(state, batch, aux)
  assert float(metrics["nonfinite_skipped"]) == 1.0 and int(new.nonfinite) == 1
  chex_equal = jax.tree.map(
      np.array_equal, jax.device_get(new.model_state), jax.device_get(state.model_state)
  )
  assert all(jax.tree.leaves(chex_equal))
  # A finite step does write the updates.
  c.toy.nan_disc = False
  state, _, txs = train.build_state(ToyBN(c), c, mesh, rules, batch)
  new, _ = jax.jit(train.make_train_step(ToyBN(c), txs, c))(state, batch, aux)
  assert int(new.model_state["disc"]["counter"]["calls"]) == 1


def test_stage_ema_decay_overrides_the_run_and_zero_keeps_none():
  c = _toy_config(1)
  batch = {"image": np.random.default_rng(0).random((8, 4, 4, 3), np.float32)}
  mesh = shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = shard_lib.rules_from_config(c.logical_axis_rules)
  aux = nn.unbox(ToyBN(c).prepare(mesh))
  assert train.stage_ema_decay(c, "toy") == 0.9  # the stage does not set one
  c.toy.ema_decay = 0.05  # below the warm-up value at step 0 (0.1), so it is the one used
  method = ToyBN(c)
  state, _, txs = train.build_state(method, c, mesh, rules, batch)
  new, _ = jax.jit(train.make_train_step(method, txs, c))(state, batch, aux)
  ema, before, after = (jax.device_get(t["model"]) for t in (new.ema, state.params, new.params))
  want = jax.tree.map(lambda b, a: 0.05 * b + 0.95 * a, before, after)
  jax.tree.map(lambda e, w: np.testing.assert_allclose(e, w, rtol=1e-6), ema, want)

  c.toy.ema_decay = 0.0
  method = ToyBN(c)
  state, _, txs = train.build_state(method, c, mesh, rules, batch)
  new, _ = jax.jit(train.make_train_step(method, txs, c))(state, batch, aux)
  assert state.ema == {} and new.ema == {}
