"""RaPD's latent normalisation, latent statistics and the Generator contract's checks."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff.methods import base, latents
from infdiff.methods.rapd import stage1, stage2


def test_denormalise_inverts_normalise():
  rng = np.random.default_rng(0)
  aux = {
      "mean": rng.normal(size=(5,)).astype(np.float32),
      "std": rng.uniform(0.1, 3.0, size=(5,)).astype(np.float32),
  }
  z = rng.normal(3.0, 2.0, size=(2, 4, 6, 5)).astype(np.float32)
  x = stage2.Method.normalise(aux, jnp.asarray(z))
  # The normalised latent is what stage 2 models: zero mean, unit std per channel
  # when the statistics are the latent's own.
  np.testing.assert_allclose(x, (z - aux["mean"]) / aux["std"], rtol=1e-6)
  back = np.asarray(stage2.Method.denormalise(aux, x))
  np.testing.assert_allclose(back, z, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(z).max())


def test_latent_statistics_are_the_encoders_channel_moments(tmp_path):
  """`latent_statistics` equals numpy's per-channel mean/std of the encoder's latents."""
  from test_train import _tiny_config

  config = _tiny_config()
  config.rapd_stage1.stats_images = 10  # not a multiple of the batch: the last is cut
  config.rapd_stage1.stats_batch_size = 4
  method = stage1.Method(config, "rapd_stage1", str(tmp_path))
  r = int(config.rapd_stage1.enc_size)
  rng = np.random.default_rng(1)
  batches = [rng.uniform(size=(4, r, r, 3)).astype(np.float32) for _ in range(4)]
  image = jnp.asarray(batches[0])
  coords = jnp.zeros((4, r, r, 2))
  cells = jnp.zeros((4, 2))
  params = method.model.init(jax.random.PRNGKey(0), image, coords, cells)["params"]
  state = types.SimpleNamespace(ema={}, params={"model": params})
  ctx = types.SimpleNamespace(
      state=state, make_loader=lambda **kw: iter([{"image": b} for b in batches])
  )
  stats = latents.latent_statistics(method, ctx)
  images = np.concatenate(batches)[:10]
  z = np.asarray(method.model.apply({"params": params}, jnp.asarray(images), method="encode"))
  z = z.reshape(-1, z.shape[-1]).astype(np.float64)
  assert stats["count"] == len(z)
  np.testing.assert_allclose(stats["mean"], z.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["std"], z.std(0), rtol=1e-4)
  json.dumps(stats)  # written as JSON beside the checkpoints


class _Uncond(base.LatentGenerator):
  native_size = (2, 2)

  def latents(self, conditions, num=1, seed=0):
    return np.zeros((len(conditions) * num, 2, 2, 1))

  def render(self, latents, height, width):
    return np.zeros((len(latents), height, width, 3), np.float32)


def test_an_unconditional_generator_refuses_prompts():
  gen = _Uncond()
  out = gen.sample([""], 3, 0, [(8, 4), (2, 2)])
  assert out[(8, 4)].shape == (3, 4, 8, 3) and out[(2, 2)].shape == (3, 2, 2, 3)
  with pytest.raises(ValueError, match="unconditional"):
    gen.sample(["a red circle"], 1, 0, [(8, 8)])
