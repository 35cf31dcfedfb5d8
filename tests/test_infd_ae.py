"""INFD stage 1 (infd_ae): bottlenecks, GAN losses, PatchGAN, INFDPatch, resolution balancing,
GroupNorm CLIF, a 3-step run through the trainer and the FieldAutoencoder of the saved run."""

import importlib.util
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from infdiff import fields, train
from infdiff import render as render_lib
from infdiff.data import pipeline, sources, transforms
from infdiff.losses import gan
from infdiff.models.discriminators import PatchGAN
from infdiff.models.quantize import DiagonalGaussian, VectorQuantizer
from infdiff.models.renderers import CLIF, make_renderer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shrinks configs/infd.py:demo (ch 8 and 4 GroupNorm groups; 16^2 inputs and patches,
# r_max 32, a 16-code codebook, a one-layer PatchGAN).
TINY = {
    "enc_size": 16,
    "patch": 16,
    "r_max": 32,
    "batch_size": 2,
    "ae.ch": 8,
    "ae.num_res_blocks": 1,
    "ae.ch_mult": (1, 2),
    "ae.norm_groups": 4,
    "renderer.features": 8,
    "renderer.norm_groups": 4,
    "vq.num_codes": 16,
    "gan.ndf": 8,
    "gan.n_layers": 1,
    "gan.weight": 0.75,  # the paper's GAN term (the demo trains without it)
    "renderer.rgb_base": "none",
}


def _config(preset="demo,bottleneck=vq,clif_norm=group"):
  spec = importlib.util.spec_from_file_location("infd_cfg", os.path.join(ROOT, "configs/infd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(preset)
  for key, value in TINY.items():
    *path, last = key.split(".")
    sec = c.infd_ae
    for p in path:
      sec = sec[p]
    sec[last] = value
  c.stages = ("infd_ae",)
  return c


def _batch(seed=0, b=2, e=16, p=16, r=24):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.random((b, e, e, 3), np.float32),
      "target": rng.random((b, p, p, 3), np.float32),
      "coord": np.broadcast_to(fields.crop_grid(r, r, 3, 5, p, p), (b, p, p, 2)).copy(),
      "cell": np.full((b, 2), 2.0 / r, np.float32),
  }


# ------------------------------------------------------------------------- bottlenecks


def test_vq_straight_through_and_legacy_loss_by_hand():
  beta = 0.25
  vq = VectorQuantizer(num_codes=3, beta=beta)
  codes = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # [K, C]
  z = jnp.array([[[[0.2, 0.1], [0.9, 0.3]], [[0.1, 1.6], [0.6, -0.2]]]])  # [1, 2, 2, 2]
  out = vq.apply({"params": {"codebook": codes}}, z)
  # Nearest codes by hand: (0.2, 0.1) -> 0, (0.9, 0.3) -> 1, (0.1, 1.6) -> 2, (0.6, -0.2) -> 1.
  np.testing.assert_array_equal(np.asarray(out.indices), [[[0, 1], [2, 1]]])
  zq = np.array([[[[0, 0], [1, 0]], [[0, 2], [1, 0]]]], np.float32)
  np.testing.assert_allclose(np.asarray(out.zq), zq, atol=1e-6)  # forward value = the codes
  mse = np.mean((zq - np.asarray(z)) ** 2)  # = (0.05 + 0.1 + 0.17 + 0.2) / 8
  assert float(out.commitment) == pytest.approx(mse, rel=1e-5)
  assert float(out.codebook) == pytest.approx(mse, rel=1e-5)
  assert float(out.loss) == pytest.approx((1 + beta) * mse, rel=1e-5)
  # Codes 0 and 2 used once, code 1 twice: exp(entropy of (1/4, 1/2, 1/4)).
  assert float(out.perplexity) == pytest.approx(np.exp(1.5 * np.log(2.0)), rel=1e-5)

  # Straight-through: d zq / d z is the identity.
  w = jax.random.normal(jax.random.key(0), z.shape)
  g = jax.grad(lambda z: jnp.sum(w * vq.apply({"params": {"codebook": codes}}, z).zq))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)

  # Which term carries beta (LDM legacy): the encoder gets the unweighted commitment
  # gradient 2 (z - zq) / N, the codebook beta times 2 (zq - z) / N at the chosen codes.
  def loss(codes, z):
    return vq.apply({"params": {"codebook": codes}}, z).loss

  g_codes, g_z = jax.grad(loss, argnums=(0, 1))(codes, z)
  n = z.size
  np.testing.assert_allclose(np.asarray(g_z), 2 * (np.asarray(z) - zq) / n, rtol=1e-5, atol=1e-7)
  want = np.zeros((3, 2), np.float32)
  flat_z, flat_q = np.asarray(z).reshape(-1, 2), zq.reshape(-1, 2)
  for k, zz, qq in zip([0, 1, 2, 1], flat_z, flat_q):
    want[k] += beta * 2 * (qq - zz) / n
  np.testing.assert_allclose(np.asarray(g_codes), want, rtol=1e-5, atol=1e-7)


def test_kl_against_closed_form_and_clip():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar[0, 0, 0, 0] = 40.0  # clipped to 20
  post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
  lv = np.clip(logvar, -30.0, 20.0)
  per = 0.5 * (mean**2 + np.exp(lv) - 1.0 - lv)
  assert float(post.kl()) == pytest.approx(float(per.reshape(3, -1).sum(-1).mean()), rel=1e-5)
  assert float(post.logvar.max()) == 20.0
  # KL of N(0, I) itself is 0; samples have the posterior's moments.
  zero = DiagonalGaussian.from_moments(jnp.zeros((1, 4, 4, 6)))
  assert float(zero.kl()) == 0.0
  s = DiagonalGaussian(jnp.full((1, 64, 64, 2), 3.0), jnp.full((1, 64, 64, 2), np.log(4.0)))
  x = np.asarray(s.sample(jax.random.key(0)))
  assert abs(x.mean() - 3.0) < 0.05 and abs(x.std() - 2.0) < 0.05


def test_hinge_and_generator_losses_on_known_logits():
  real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2 -> mean 2.5 / 3
  fake = jnp.array([-2.0, 0.0, 1.0, 3.0])  # relu(1 + x): 0, 1, 2, 4 -> mean 7 / 4
  assert float(gan.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 7 / 4))
  assert float(gan.generator_loss(fake)) == pytest.approx(-0.5)
  assert float(gan.gan_active(4, 5)) == 0.0 and float(gan.gan_active(5, 5)) == 1.0


def test_patchgan_shape_init_and_batch_stats():
  d = PatchGAN(ndf=8, n_layers=2)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  v = nn.unbox(d.init(jax.random.key(1), x, train=False))
  # 32 -k4s2-> 16 -k4s2-> 8 -k4s1-> 7 -k4s1-> 6.
  assert d.apply(v, x, train=False).shape == (2, 6, 6, 1)
  assert v["params"]["conv1"]["kernel"].shape == (4, 4, 8, 16)
  assert "bias" not in v["params"]["conv1"] and "bias" in v["params"]["conv0"]
  k = np.concatenate([np.ravel(v["params"][f"conv{i}"]["kernel"]) for i in range(3)])
  assert abs(k.std() - 0.02) < 0.003 and abs(k.mean()) < 0.002
  scale = np.asarray(v["params"]["norm1"]["scale"])
  assert np.all(np.abs(scale - 1) < 0.1) and np.any(scale != 1)
  # Training mode: batch statistics; the running ones move from (0, 1).
  logits, upd = d.apply(v, x, train=True, mutable=["batch_stats"])
  for name in ("norm1", "norm2"):
    assert np.abs(np.asarray(upd["batch_stats"][name]["mean"])).max() > 0
    assert np.abs(np.asarray(upd["batch_stats"][name]["var"]) - 1).max() > 0
  # Batch statistics: output of an example depends on the rest of the batch in training
  # mode, not in evaluation mode.
  other = x.at[1].multiply(5.0)
  assert not np.allclose(d.apply(v, other, train=True, mutable=["batch_stats"])[0][0], logits[0])
  np.testing.assert_allclose(
      d.apply(v, other, train=False)[0], d.apply(v, x, train=False)[0], atol=1e-6
  )


# ------------------------------------------------------------------------- data


def test_infd_patch_coordinates_recover_the_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 57, 3), dtype=np.uint8)  # non-square: centre 40^2
  square = image[:, 8:48]
  np.testing.assert_array_equal(transforms.center_square(image), square)
  t = transforms.INFDPatch(enc_size=8, r_max=32, patch=8)
  sides, tops = set(), set()
  for seed in range(12):
    out = t({"image": image, "caption": "c"}, np.random.default_rng(seed), None)
    assert out["image"].shape == (8, 8, 3) and out["target"].shape == (8, 8, 3)
    assert out["coord"].shape == (8, 8, 2) and out["caption"] == "c"
    assert all(out[k].dtype == np.float32 for k in ("image", "target", "coord", "cell"))
    r = int(round(2.0 / out["cell"][0]))
    assert 8 <= r <= 32 and float(out["cell"][1]) == pytest.approx(2.0 / r)
    # The window position from its first coordinate: -1 + (2 top + 1) / r.
    top, left = ((out["coord"][0, 0] + 1.0) * r - 1.0) / 2.0
    top, left = int(round(top)), int(round(left))
    np.testing.assert_allclose(out["coord"], fields.crop_grid(r, r, top, left, 8, 8), atol=1e-6)
    full = transforms.resize_square(square, r)  # the whole r x r image
    np.testing.assert_allclose(out["target"], full[top : top + 8, left : left + 8], atol=1e-5)
    np.testing.assert_allclose(out["image"], transforms.resize_square(square, 8), atol=1e-6)
    sides.add(r)
    tops.add(top)
  assert len(sides) > 3 and len(tops) > 3  # r and the window vary

  fix = transforms.INFDPatch(enc_size=8, r_max=32, patch=8, fix_r=True)
  for seed in range(3):
    out = fix({"image": image}, np.random.default_rng(seed), None)
    assert float(out["cell"][0]) == pytest.approx(2.0 / 32)  # r = min(40, 32)
  small = np.full((6, 9, 3), 128, np.uint8)  # short side < enc_size: upscaled, r = enc_size
  out = t({"image": small}, np.random.default_rng(0), None)
  assert float(out["cell"][0]) == pytest.approx(2.0 / 8)
  np.testing.assert_allclose(out["target"], 128 / 255, atol=1e-5)
  with pytest.raises(ValueError, match="patch"):
    transforms.INFDPatch(enc_size=8, r_max=32, patch=16)


def _side_of(record, rng, batch_rng):
  del rng, batch_rng
  return {"side": np.int32(min(record["image"].shape[:2]))}


def test_hires_balancing_fraction(tmp_path):
  rng = np.random.default_rng(0)
  sizes = [20] * 9 + [40, 48]  # 9 low-resolution images, 2 of short side >= 32
  records = [{"image": rng.integers(0, 255, (s, s + 3, 3), np.uint8)} for s in sizes]
  bal = sources.balance_by_size(records, min_side=32, fraction=0.5, seed=0)
  assert isinstance(bal, sources.BalancedSource)
  assert len(bal) == 18 and bal.hires_fraction == 0.5  # max(9 / 0.5, 2 / 0.5)
  assert set(bal.index_map.tolist()) == set(range(11))  # every image appears
  loader = pipeline.make_loader(
      {"num_threads": 1}, _side_of, global_batch_size=6, seed=0, num_epochs=1, source=bal
  )
  sides = np.concatenate([b["side"] for b in loader])
  assert len(sides) == 18 and np.mean(sides >= 32) == 0.5  # exactly half, over one epoch
  # Nothing to balance: all on one side of min_side, or fraction 0.
  low = records[:9]
  assert sources.balance_by_size(low, 32, 0.5) is low
  assert sources.balance_by_size(records, 32, 0.0) is records

  # File sources know their sizes from the header scan; the method wraps only training.
  from PIL import Image

  for i, s in enumerate([20, 20, 20, 40]):
    Image.fromarray(rng.integers(0, 255, (s, s, 3), np.uint8)).save(tmp_path / f"{i}.png")
  src = sources.make_source(f"folder:{tmp_path}", split="all")
  assert sorted(src.sizes) == [(20, 20)] * 3 + [(40, 40)]
  from infdiff.methods.infd.autoencoder import Method

  m = Method(_config(), "infd_ae", str(tmp_path / "w"), training=False)
  wrapped = m.data_source(src, "train")
  assert isinstance(wrapped, sources.BalancedSource) and wrapped.hires_fraction == 0.5
  assert m.data_source(src, "eval") is src


# ------------------------------------------------------------------------- CLIF


def _reference_clif_none(params, latent, coords, cells, n_blocks):
  """The norm-free CLIF written out with lax convolutions."""
  q = fields.nearest_latent(latent, coords)
  rel = cells * jnp.array(latent.shape[1:3], jnp.float32) / 2.0
  x = jnp.concatenate([q.feature, q.offset, jnp.broadcast_to(rel[:, None, None], coords.shape)], -1)

  def conv(name, x):
    k, b = params[name]["kernel"], params[name]["bias"]
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn) + b

  x = conv("conv_in", x)
  for i in range(n_blocks):
    x = x + conv(f"block{i}_conv2", jax.nn.relu(conv(f"block{i}_conv1", x)))
  return conv("conv_out", x)


def test_clif_group_norm_and_unchanged_norm_free():
  lat = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  coords = jnp.broadcast_to(fields.coord_grid(13, 11), (2, 13, 11, 2))
  cells = jnp.broadcast_to(fields.cell_size(13, 11), (2, 2))
  none = CLIF(features=8)
  v = nn.unbox(none.init(jax.random.key(1), lat, coords, cells))
  assert sorted(v["params"]) == [
      "block0_conv1",
      "block0_conv2",
      "block1_conv1",
      "block1_conv2",
      "conv_in",
      "conv_out",
  ]
  out = none.apply(v, lat, coords, cells)
  ref = _reference_clif_none(v["params"], lat, coords, cells, 2)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)

  group = make_renderer("clif", features=8, norm="group", norm_groups=4)
  vg = nn.unbox(group.init(jax.random.key(1), lat, coords, cells))
  assert {"block0_norm1", "block1_norm2", "norm_out"} <= set(vg["params"])
  assert vg["params"]["norm_out"]["scale"].shape == (8,)
  outg = group.apply(vg, lat, coords, cells)
  assert outg.shape == out.shape == (2, 13, 11, 3)
  # Same convolution weights, different function.
  shared = {k: vg["params"][k] for k in v["params"]}
  assert not np.allclose(
      np.asarray(group.apply({"params": {**vg["params"], **shared}}, lat, coords, cells)), out
  )
  # Statistics over real pixels only: one tile covering the image plus a halo of
  # non-pixels equals the untiled render; smaller tiles differ (GroupNorm per tile).
  fn = render_lib.RendererFn(group)
  one = render_lib.render_image(fn, vg, lat, 13, 11, tile=13, halo=8)
  np.testing.assert_allclose(one, np.asarray(outg), atol=1e-5)
  tiles = render_lib.render_image(fn, vg, lat, 13, 11, tile=4, halo=8)
  assert 0 < np.abs(tiles - np.asarray(outg)).max() < 1.0
  with pytest.raises(ValueError, match="norm"):
    CLIF(features=8, norm="batch").init(jax.random.key(1), lat, coords, cells)


# ------------------------------------------------------------------------- method


def test_kl_bottleneck_loss(tmp_path):
  from infdiff.methods.infd.autoencoder import Method
  from infdiff.pretrained import testing

  lpips = testing.write_tiny_lpips_vgg16(str(tmp_path / "lpips"))
  c = _config(f"demo,bottleneck=kl,lpips={lpips}")
  assert c.infd_ae.lpips_weight == 1.0
  c.infd_ae.gan.weight = 0.0
  m = Method(c, "infd_ae", str(tmp_path))
  aux = m.prepare(None)
  assert set(aux) == {"lpips"} and m.prepare(None, training=False) == {}
  batch = _batch()
  # An rbg key: XLA compiles its random bits much faster than threefry's on CPU.
  v = jax.jit(m.init)(jax.random.key(0, impl="rbg"), batch)
  params, state = nn.unbox(v["params"]), v["state"]

  @jax.jit
  def run(params, state, rng):
    loss, metrics, upd = m.loss("model", params, aux, batch, rng, 0, state=state)
    z = m.model.apply({"params": params["model"]}, batch["image"], method="encode")
    post = DiagonalGaussian.from_moments(
        m.model.apply({"params": params["model"]}, batch["image"], method="moments")
    )
    return loss, metrics, upd, z, post

  loss, metrics, upd, z, post = run(params, state, jax.random.key(1))
  assert upd == {} and float(metrics["kl"]) > 0 and float(metrics["lpips"]) > 0
  assert float(metrics["nll"]) == pytest.approx(float(metrics["l1"] + metrics["lpips"]), rel=1e-6)
  want = metrics["nll"] + 1e-6 / (16 * 16 * 3) * metrics["kl"]  # LDM's balance, per value
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  assert z.shape == (2, 8, 8, 3)  # the posterior mean (ch_mult (1, 2): factor 2)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(post.mean))
  # The training forward samples: another key, another loss.
  assert float(run(params, state, jax.random.key(2))[0]) != float(loss)


def _event_scalars(logdir) -> dict:
  """{(tag, step): value} of the TensorBoard event files in `logdir` (TFRecord framing)."""
  import struct

  from tensorboardX.proto import event_pb2

  out = {}
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4  # length, its crc, data, data crc
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


def test_three_steps_through_the_trainer_checkpoint_and_autoencoder(tmp_path):
  from infdiff import checkpoint as ckpt_lib
  from infdiff import runs

  w = tmp_path / "run"
  overrides = [f"--config.infd_ae.{k}={v}" for k, v in TINY.items()]
  cmd = [
      sys.executable,
      "-m",
      "infdiff.main",
      "--config=configs/infd.py:demo,clif_norm=none,bottleneck=vq",
      f"--workdir={w}",
      "--config.stages=('infd_ae',)",
      "--config.infd_ae.total_steps=3",
      "--config.infd_ae.gan.start=1",  # step 1 (index 0) without GAN terms
      "--config.checkpoint_every=1",
      "--config.log_every=1",
      "--config.data.num_threads=1",
      *overrides,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=tiny.subprocess_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "disc/d_loss" in (w / "train.log").read_text()
  ev = _event_scalars(w / "infd_ae")

  # The GAN terms switch on at gan.start; the generator loss is composed as documented.
  assert ev[("model/gan_on", 1)] == 0.0 and ev[("disc/loss", 1)] == 0.0 < ev[("disc/d_loss", 1)]
  for t in (2, 3):
    assert ev[("model/gan_on", t)] == 1.0 and ev[("model/w_ada", t)] > 0
    want = ev[("model/nll", t)] + ev[("model/codebook", t)]
    want += 0.75 * ev[("model/w_ada", t)] * ev[("model/g_adv", t)]
    assert ev[("model/loss", t)] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ev[("disc/loss", t)] == pytest.approx(ev[("disc/d_loss", t)])

  # Batch statistics moved, and are checkpointed with the run.
  saved, step = ckpt_lib.restore_params_only(str(w / "infd_ae" / "checkpoints"))
  assert step == 3 and set(saved["params"]) == {"model", "disc"} and not saved["ema"]
  stats = saved["model_state"]["disc"]["batch_stats"]["norm1"]
  assert np.abs(stats["mean"]).max() > 0 and np.abs(stats["var"] - 1).max() > 0
  before, _ = ckpt_lib.restore_params_only(str(w / "infd_ae" / "checkpoints"), step=2)

  # Step 3's discriminator loss scored the generator after step 3's update (saved at 3)
  # with the discriminator before its own update (saved at 2), on step 3's batch.
  run = runs.load_run(str(w))
  m = run.method
  loader = train._make_loader(
      run.config,
      run.config.infd_ae,
      m.data_transform("train"),
      "train",
      run.config.seed,
      source_fn=m.data_source,
  )
  batch = [next(loader) for _ in range(3)][-1]

  @jax.jit
  def logits_fake(gen, disc):
    rgb, _ = m._generate(gen, batch, None)
    out, _ = m.disc.apply(
        {"params": disc, **before["model_state"]["disc"]}, rgb, True, mutable=["batch_stats"]
    )
    return jnp.mean(out)

  new = float(logits_fake(saved["params"]["model"], before["params"]["disc"]))
  old = float(logits_fake(before["params"]["model"], before["params"]["disc"]))
  assert ev[("disc/logits_fake", 3)] == pytest.approx(new, rel=1e-4, abs=1e-6)
  assert abs(new - old) > 1e-5  # the check would see the older generator

  # The FieldAutoencoder of the saved run.
  assert run.stage == "infd_ae" and run.step == 3
  ae = run.inference(tile=16, batch=2)
  assert ae.input_size == (16, 16) and ae.latent_shape == (8, 8, 3)
  images = np.random.default_rng(0).random((3, 16, 16, 3), np.float32)
  z = ae.encode(images)  # two calls: a batch of 2, then 1 padded to 2
  assert z.shape == (3, 8, 8, 3)
  p = m.inference_params(run.params)
  z_direct = jax.jit(lambda x: m.model.apply({"params": p}, x, method="encode"))(images)
  np.testing.assert_allclose(z, np.asarray(z_direct), atol=1e-5)  # un-quantised
  tiled = ae.render(z, 33, 47)  # tiles of 16 with a halo of 8
  assert tiled.shape == (3, 33, 47, 3) and tiled.dtype == np.float32
  phi = jax.jit(ae.decode_fn())(z)
  assert phi.shape == (3, 16, 16, 8)
  coords = jnp.broadcast_to(fields.coord_grid(33, 47), (3, 33, 47, 2))
  cells = jnp.broadcast_to(fields.cell_size(33, 47), (3, 2))
  untiled = np.asarray(jax.jit(ae.render_points_fn())(phi, coords, cells))
  np.testing.assert_allclose(tiled, untiled, atol=1e-5)  # norm 'none': seamless
  chex.assert_trees_all_equal(jax.device_get(run.params["model"]), saved["params"]["model"])


def test_decode_and_render_are_differentiable_at_the_default_factor(tmp_path):
  from infdiff.methods.infd.autoencoder import Method

  c = _config()
  c.infd_ae.ae.ch_mult = (1, 2, 4)  # the paper's f4: 16^2 images -> 4^2 latents
  m = Method(c, "infd_ae", str(tmp_path), training=False)
  batch = _batch(b=1)
  params = nn.unbox(jax.jit(m.init)(jax.random.key(0, impl="rbg"), batch)["params"])
  ae = m.make_inference(params, {}, tile=8, batch=1)
  assert ae.latent_shape == (4, 4, 3)
  z = ae.encode(batch["image"])
  assert z.shape == (1, 4, 4, 3)
  coords = jnp.asarray(fields.crop_grid(40, 40, 8, 4, 6, 10))[None]  # a box of a 40^2 render
  cells = jnp.asarray(fields.cell_size(40, 40))[None]

  @jax.jit
  def grad(z):
    f = lambda z: jnp.mean(ae.render_points_fn()(ae.decode_fn()(z), coords, cells))
    return jax.value_and_grad(f)(z)

  value, g = grad(jnp.asarray(z))
  assert g.shape == z.shape and np.isfinite(np.asarray(g)).all() and np.abs(g).max() > 0
  assert 0.0 < float(value) < 1.0  # [0, 1] scale: (rgb + 1) / 2 of a near-zero init render


def test_paper_configuration_shapes_and_logical_names(tmp_path):
  """configs/infd.py at paper scale, abstractly: 256^2 -> 64x64x3 -> phi 256^2x128 -> CLIF
  with 132 input channels; an 8192 x 3 codebook; every parameter has logical names."""
  from infdiff.methods.infd.autoencoder import Method

  spec = importlib.util.spec_from_file_location("infd_cfg", os.path.join(ROOT, "configs/infd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  m = Method(mod.get_config("lpips=none"), "infd_ae", str(tmp_path))
  batch = {
      "image": jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
      "target": jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
      "coord": jax.ShapeDtypeStruct((1, 256, 256, 2), jnp.float32),
      "cell": jax.ShapeDtypeStruct((1, 2), jnp.float32),
  }
  v = jax.eval_shape(m.init, jax.random.key(0), batch)
  boxed = v["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  p = nn.unbox(boxed)
  assert p["model"]["quantizer"]["codebook"].shape == (8192, 3)
  assert p["model"]["renderer"]["conv_in"]["kernel"].shape == (3, 3, 132, 256)
  assert p["model"]["renderer"]["norm_out"]["scale"].shape == (256,)
  assert p["disc"]["conv3"]["kernel"].shape == (4, 4, 256, 512)  # ndf 64, 3 layers
  assert set(v["state"]["disc"]["batch_stats"]) == {"norm1", "norm2", "norm3"}

  def shapes(params, image):
    z = m.model.apply({"params": params}, image, method="encode")
    return z, m.model.apply({"params": params}, z, method="decode")

  z, phi = jax.eval_shape(shapes, p["model"], batch["image"])
  assert z.shape == (1, 64, 64, 3) and phi.shape == (1, 256, 256, 128)
  assert m.make_inference(p, {}).latent_shape == (64, 64, 3)
