"""RaPD stage 1: distillation losses, the adaptive weight, LPIPS path, logical names."""

import importlib.util
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infdiff import config_lib, fields
from infdiff.data import shapes, transforms
from infdiff.losses import distill
from infdiff.methods.rapd.stage1 import Method, _get, _set, noisy_latent, roughness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**presets):
  spec = importlib.util.spec_from_file_location("rapd_cfg", os.path.join(ROOT, "configs/rapd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  arg = ",".join(["demo"] + [f"{k}={v}" for k, v in presets.items()])
  c = mod.get_config(arg)
  s = c.rapd_stage1
  s.enc_size, s.target_window, s.batch_size = 16, 16, 2
  s.encoder.n_resblocks = 1
  if s.renderer.name == "cqar":
    s.renderer.dim = 16
  s.distill.teacher_grid = (2, 2)
  return c


def _batch(seed=0, b=2, r=16, p=16):
  rng = np.random.default_rng(seed)
  coord = np.broadcast_to(fields.crop_grid(2 * r, 2 * r, 4, 8, p, p), (b, p, p, 2))
  return {
      "image": jnp.asarray(rng.random((b, r, r, 3), np.float32)),
      "target": jnp.asarray(rng.random((b, p, p, 3), np.float32)),
      "coord": jnp.asarray(coord),
      "cell": jnp.full((b, 2), 1.0 / r, jnp.float32),
  }


def test_cosine_margin_and_distance_matrix_losses():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  # Identical features: cosine 1 -> relu(1 - m1 - 1) = 0; identical similarity matrices.
  assert float(distill.cosine_margin_loss(f, f, 0.5)) == pytest.approx(0.0, abs=1e-6)
  assert float(distill.distance_matrix_loss(f, f, 0.25)) == pytest.approx(0.0, abs=1e-6)
  # Opposite features: cosine -1 -> relu(1 - 0.5 + 1) = 1.5.
  assert float(distill.cosine_margin_loss(-f, f, 0.5)) == pytest.approx(1.5, abs=1e-5)
  # The margin of the DMS loss: a direct computation.
  g = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  ss = np.einsum("bnd,bmd->bnm", n(np.asarray(f)), n(np.asarray(f)))
  st = np.einsum("bnd,bmd->bnm", n(np.asarray(g)), n(np.asarray(g)))
  want = np.maximum(np.abs(ss - st) - 0.25, 0).mean()
  assert float(distill.distance_matrix_loss(f, g, 0.25)) == pytest.approx(want, rel=1e-5)


def test_adaptive_weight_equals_ratio_of_gradient_norms(tmp_path):
  from infdiff.pretrained import testing

  teacher = testing.write_tiny_dinov2(str(tmp_path / "dino"))
  c = _config(teacher=teacher)
  assert c.rapd_stage1.distill.weight == pytest.approx(0.1)
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  batch = _batch()
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  aux = m.prepare(None)
  loss, metrics = m.loss("model", params, aux, batch, jax.random.PRNGKey(1), 0)
  assert np.isfinite(float(loss))

  # Independently: full-parameter gradients of each loss, then the last conv's norms.
  p = params["model"]

  def rec(p):
    z = m.model.apply({"params": p}, batch["image"], method="encode")
    rgb = m.model.apply({"params": p}, z, batch["coord"], batch["cell"], method="render")
    return jnp.mean(jnp.abs(rgb - batch["target"]))

  def dis(p):
    z = m.model.apply({"params": p}, batch["image"], method="encode")
    h = m.model.apply({"params": p}, z, 2, 2, method="project")
    t = aux["teacher"]
    f = m.teacher.apply(t, batch["image"])["patch_tokens"].reshape(2, 4, -1)
    return distill.distill_loss(h, f, 0.5, 0.25)[0]

  g_rec = jax.grad(rec)(p)["enc"]["last_conv"]["kernel"]  # theta_L: the last conv's kernel
  g_dis = jax.grad(dis)(p)["enc"]["last_conv"]["kernel"]
  want = optax.tree.norm(g_rec) / (optax.tree.norm(g_dis) + 1e-6)
  assert float(metrics["w_ada"]) == pytest.approx(float(want), rel=1e-4)
  assert float(loss) == pytest.approx(float(rec(p) + 0.1 * want * dis(p)), rel=1e-4)
  # The weight carries no gradient: d loss / d params equals that of rec + const * dis.
  g_total = jax.grad(lambda p: m.loss("model", {"model": p}, aux, batch, None, 0)[0])(p)
  g_want = jax.grad(lambda p: rec(p) + 0.1 * float(want) * dis(p))(p)
  np.testing.assert_allclose(
      np.asarray(g_total["enc"]["head"]["kernel"]),
      np.asarray(g_want["enc"]["head"]["kernel"]),
      rtol=1e-3,
      atol=1e-6,
  )


def test_loss_runs_encoder_and_renderer_once(tmp_path, monkeypatch):
  """The whole distillation loss (w_ada included) traces one encode, render and project."""
  from infdiff.pretrained import testing

  c = _config(teacher=testing.write_tiny_dinov2(str(tmp_path / "dino")))
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  batch = _batch()
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  aux = m.prepare(None)
  calls = []
  apply = m.model.apply

  def counting_apply(variables, *args, method=None, **kw):
    calls.append(method)
    return apply(variables, *args, method=method, **kw)

  monkeypatch.setattr(m.model, "apply", counting_apply)
  grad = jax.grad(lambda p: m.loss("model", {"model": p}, aux, batch, None, 0)[0])
  jax.eval_shape(grad, params["model"])
  assert sorted(calls) == ["encode", "project", "render"]


def test_prepare_for_inference_skips_teacher_and_lpips(tmp_path):
  from infdiff.pretrained import testing

  c = _config(
      teacher=testing.write_tiny_dinov2(str(tmp_path / "dino")),
      lpips=testing.write_tiny_lpips_vgg16(str(tmp_path / "lpips")),
  )
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  assert set(m.prepare(None)) == {"teacher", "lpips"}
  assert set(m.prepare(None, training=True)) == {"teacher", "lpips"}
  assert m.prepare(None, training=False) == {}


def test_set_get_last_layer_roundtrip():
  tree = {"enc": {"last_conv": {"kernel": 1}, "head": 2}, "dec": 3}
  new = _set(flax.core.freeze(tree), ("enc", "last_conv"), {"kernel": 5})
  assert _get(new, ("enc", "last_conv")) == {"kernel": 5}
  assert new["enc"]["head"] == 2 and tree["enc"]["last_conv"] == {"kernel": 1}


def test_lpips_path_runs_with_random_weights(tmp_path):
  from infdiff.pretrained import testing

  lp = testing.write_tiny_lpips_vgg16(str(tmp_path / "lpips"))
  c = _config(lpips=lp)
  assert c.rapd_stage1.lpips_weight == 1.0
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  batch = _batch()
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  loss, metrics = m.loss("model", params, m.prepare(None), batch, None, 0)
  assert np.isfinite(float(metrics["lpips"])) and float(metrics["lpips"]) > 0
  assert float(loss) == pytest.approx(float(metrics["l1"] + metrics["lpips"]), rel=1e-5)


def test_roughness_known_answers():
  # A flat latent has no high frequencies; white noise has E(a - b)^2 = 2 var per axis.
  assert float(roughness(jnp.ones((2, 8, 8, 3)))) == pytest.approx(0.0, abs=1e-6)
  noise = jax.random.normal(jax.random.PRNGKey(0), (8, 64, 64, 4))
  assert float(roughness(noise)) == pytest.approx(1.0, abs=0.02)
  # A ramp a * i down the rows: steps a^2 along rows, 0 along columns, variance
  # a^2 (h^2 - 1) / 12, so roughness = 3 / (h^2 - 1), whatever a (scale-free).
  for a in (0.1, 7.0):
    ramp = jnp.broadcast_to(a * jnp.arange(8.0)[None, :, None, None], (2, 8, 5, 3))
    assert float(roughness(ramp)) == pytest.approx(3.0 / 63.0, rel=1e-5)


def test_smooth_weight_and_render_noise(tmp_path):
  c = _config()
  assert c.rapd_stage1.smooth_weight == 0.0  # off in every preset
  batch = _batch()
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  loss0, metrics = m.loss("model", params, m.prepare(None), batch, None, 0)
  assert float(loss0) == pytest.approx(float(metrics["l1"]), rel=1e-6)
  c.rapd_stage1.smooth_weight = 0.5
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  loss, metrics = m.loss("model", params, m.prepare(None), batch, None, 0)
  want = metrics["l1"] + 0.5 * metrics["roughness"]
  assert 0.0 < float(metrics["roughness"]) and float(loss) == pytest.approx(float(want), rel=1e-5)
  # Render noise: the training render reads a noised latent, a fresh draw per key.
  assert c.rapd_stage1.render_noise == 0.0  # off by default
  c.rapd_stage1.smooth_weight, c.rapd_stage1.render_noise = 0.0, 0.5
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  n1, _ = m.loss("model", params, m.prepare(None), batch, jax.random.PRNGKey(1), 0)
  n2, _ = m.loss("model", params, m.prepare(None), batch, jax.random.PRNGKey(2), 0)
  assert float(n1) != float(n2) and float(loss0) not in (float(n1), float(n2))
  c.rapd_stage1.render_noise = -0.1
  with pytest.raises(ValueError, match="render_noise"):
    Method(c, "rapd_stage1", str(tmp_path / "w"))


def test_noisy_latent_is_relative_per_image_noise_with_identity_gradient():
  # Channels of very different scales: the noise follows each channel's batch std.
  scale = jnp.asarray([0.01, 1.0, 100.0])
  z = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3)) * scale + 5.0
  out = noisy_latent(z, jax.random.PRNGKey(2), 0.4)
  rel = (out - z) / jnp.std(z, axis=(0, 1, 2))  # sigma_b * eps
  sig = np.asarray(jnp.std(rel, axis=(1, 2, 3)))  # one sigma per image
  assert np.all(sig >= 0.0) and np.all(sig <= 0.4 * 1.1) and np.ptp(sig) > 0.05
  # The same sigma in every channel of an image (relative, not absolute, noise).
  per_c = np.asarray(jnp.std(rel, axis=(1, 2)))  # [B, C]
  np.testing.assert_allclose(per_c, sig[:, None] * np.ones((1, 3)), rtol=0.15, atol=2e-3)
  # A fresh key draws fresh noise; the noise scale is constant to the gradient.
  assert not np.allclose(out, noisy_latent(z, jax.random.PRNGKey(3), 0.4))
  g = jax.grad(lambda x: jnp.sum(noisy_latent(x, jax.random.PRNGKey(2), 0.4) * z))(z)
  np.testing.assert_allclose(g, z, rtol=1e-6)


@pytest.mark.parametrize("renderer", ["cqar", "liif", "clif"])
def test_every_parameter_has_logical_names(tmp_path, renderer):
  c = _config(renderer=renderer)
  m = Method(c, "rapd_stage1", str(tmp_path))
  boxed = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), _batch())["model"])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def test_missing_teacher_path_is_one_line_error(tmp_path):
  c = _config()
  c.rapd_stage1.distill.weight = 0.1
  with pytest.raises(ValueError, match="teacher_path"):
    Method(c, "rapd_stage1", str(tmp_path))
  c.rapd_stage1.distill.weight = 0.1
  c.rapd_stage1.distill.teacher_path = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    Method(c, "rapd_stage1", str(tmp_path))


def test_shapes_distillation_target_is_the_semantic_map_of_the_crop(tmp_path):
  """distill.target='shapes': no teacher; each record carries the scene semantics of the
  crop the encoder sees, and the loss distils the projected latent against them."""
  c = _config()
  d = c.rapd_stage1.distill
  d.weight, d.target, d.m1, d.m2 = 0.5, "shapes", 0.0, 0.0
  m = Method(c, "rapd_stage1", str(tmp_path / "w"))
  assert m.teacher is None and m.teacher_dim == shapes.SEMANTIC_DIM and m.prepare(None) == {}
  src = shapes.ShapesSource(size=64, num_scenes=2)
  fn = m.data_transform("train")
  recs = [fn(src[i], np.random.default_rng(i), np.random.default_rng(0)) for i in range(2)]
  for i, rec in enumerate(recs):
    top, left, side, _ = rec["box"]
    assert side * 64 >= 16 and rec["semantic"].shape == (2, 2, shapes.SEMANTIC_DIM)
    want = shapes.semantic_map(shapes.crop_scene(src.scene(i), (top, left, side, side)), 2)
    np.testing.assert_allclose(rec["semantic"], want, rtol=0, atol=0)
  batch = {k: np.stack([r[k] for r in recs]) for k in ("image", "target", "coord", "cell")}
  batch["semantic"] = np.stack([r["semantic"] for r in recs])
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  assert params["model"]["proj"]["Dense_0"]["kernel"].shape[-1] == shapes.SEMANTIC_DIM
  loss, metrics = m.loss("model", params, m.prepare(None), batch, None, 0)
  # m1 = m2 = 0: L_distill = mean(1 - cos) + mean |sim_s - sim_t| > 0 for random weights.
  assert float(metrics["distill"]) > 0 and np.isfinite(float(loss))
  want = metrics["l1"] + 0.5 * metrics["w_ada"] * metrics["distill"]
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  # Feature groups: background and class only (the class one-hot where objects are).
  d.shapes_features = ("background", "class")
  m_bc = Method(c, "rapd_stage1", str(tmp_path / "wbc"))
  assert m_bc.teacher_dim == 1 + len(shapes.CLASSES)
  p_bc = jax.tree.map(lambda x: x, params)  # the projection restricted to those columns
  proj = p_bc["model"]["proj"]["Dense_0"]
  proj["kernel"], proj["bias"] = proj["kernel"][:, :5], proj["bias"][:5]
  out = jax.eval_shape(lambda p: m_bc.loss("model", p, {}, batch, None, 0), p_bc)
  assert out[0].shape == () and out[1]["distill"].shape == ()
  d.shapes_features = ("class", "shade")
  with pytest.raises(ValueError, match="unknown semantic feature group"):
    Method(c, "rapd_stage1", str(tmp_path / "wbad"))
  d.shapes_features = ()
  # No checkpoint directory is needed for this target; the plain crop reports no box.
  config_lib.check_required_paths(c)
  assert "box" not in transforms.MultiResCrop(16, 4.0, 16)(
      src[0], np.random.default_rng(0), np.random.default_rng(0)
  )
  c.data.source = "photos"
  with pytest.raises(ValueError, match="needs data.source=shapes"):
    Method(c, "rapd_stage1", str(tmp_path / "w2"))
  c.data.source, d.target = "shapes", "dino"
  with pytest.raises(ValueError, match="use 'dinov2' or 'shapes'"):
    Method(c, "rapd_stage1", str(tmp_path / "w3"))
