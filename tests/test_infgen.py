"""InfGen: the decoder's pieces, the training windows, and a tiny run of all three stages
(vae -> infgen -> latent_ddpm) through the trainer and the sample / evaluate CLIs."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from infdiff import checkpoint as ckpt_lib
from infdiff import fields
from infdiff import render as render_lib
from infdiff.data import transforms
from infdiff.models import infgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.vae.enc_size=32",
    "--config.vae.model.block_out_channels=(8,8,8,8)",
    "--config.vae.model.norm_num_groups=4",
    "--config.vae.batch_size=2",
    "--config.vae.stats_images=8",
    "--config.vae.stats_batch_size=4",
    "--config.infgen.enc_size=32",
    "--config.infgen.r_min=16",
    "--config.infgen.r_max=64",
    "--config.infgen.patch=16",
    "--config.infgen.batch_size=2",
    "--config.infgen.decoder.width=16",
    "--config.infgen.decoder.pos_dim=16",
    "--config.infgen.decoder.heads=2",
    "--config.infgen.decoder.up_channels=(16,8,8)",
    "--config.infgen.decoder.norm_groups=4",
    "--config.latent_ddpm.batch_size=2",
    "--config.latent_ddpm.unet.ch=8",
    "--config.latent_ddpm.unet.norm_groups=4",
    "--config.latent_ddpm.unet.head_channels=8",
    "--config.latent_ddpm.unet.attention_resolutions=()",
    "--config.latent_ddpm.sample.num_steps=3",
    "--config.latent_ddpm.sample.batch_size=2",
    "--config.latent_ddpm.sample.tile=32",
    "--config.latent_ddpm.sample.sizes=(32,64)",
    "--config.latent_ddpm.sample.num=2",
    "--config.data.num_threads=1",
    "--config.log_every=2",
]

_env = tiny.subprocess_env


def steps(n: int) -> list[str]:
  return [f"--config.{s}total_steps={n}" for s in ("", "vae.", "infgen.")]


def main_cmd(workdir, config="configs/infgen.py:demo"):
  return [sys.executable, "-m", "infdiff.main", f"--config={config}", f"--workdir={workdir}"]


def run_main(workdir, *extra, config="configs/infgen.py:demo", check=True):
  cmd = main_cmd(workdir, config) + TINY + list(extra)
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def _cli(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)


def _decoder(**kw):
  base = dict(
      width=16,
      depth=2,
      heads=2,
      pos_dim=16,
      up_channels=(16, 8, 8),
      layers_per_block=1,
      norm_groups=4,
      tail_norm="layer",
      mid_attention=False,
  )
  return infgen.InfGenDecoder(**{**base, **kw})


def _init(model, latent_side=4, grid=32):
  lat = jax.random.normal(jax.random.PRNGKey(0), (1, latent_side, latent_side, 4))
  coords = jnp.asarray(fields.coord_grid(grid, grid))[None]
  cells = jnp.asarray(fields.cell_size(grid, grid))[None]
  return lat, model.init(jax.random.PRNGKey(1), lat, coords, cells)


# --- the decoder ------------------------------------------------------------------------


def test_mask_and_latent_tokens_at_the_same_place_share_their_position_code():
  # An 8x8 latent decoded at 64x64: the mask token of block (i, j) sits at the centre of
  # latent cell (i, j). At 128x128 the mask tokens of the 2x2 blocks around that centre
  # differ from it, and their mean position is the cell centre again.
  h = 8
  lat_pos = jnp.asarray(fields.coord_grid(h, h))[None]
  for out in (64, 128):
    centres = infgen.block_centres(jnp.asarray(fields.coord_grid(out, out))[None], 8)
    k = out // 64
    same = centres[:, k // 2 :: k, k // 2 :: k] if k > 1 else centres
    if k == 1:
      np.testing.assert_allclose(infgen.pos_code(same, 32, h), infgen.pos_code(lat_pos, 32, h))
    else:
      pooled = centres.reshape(1, h, k, h, k, 2).mean((2, 4))
      np.testing.assert_allclose(pooled, lat_pos, atol=1e-6)
      assert not np.allclose(infgen.pos_code(same, 32, h), infgen.pos_code(lat_pos, 32, h))
  # One projection serves both token sets.
  _, v = _init(_decoder())
  assert "pos" in v["params"] and not any(k.startswith("pos_") for k in v["params"])


def test_position_code_tells_neighbouring_tokens_apart_at_4096():
  c = jnp.asarray(fields.coord_grid(512, 1))[:, 0]  # token centres of a 4096-px side
  code = infgen.pos_code(c, 256, 64)
  d = np.linalg.norm(np.asarray(code[1:] - code[:-1]), axis=-1)
  assert d.min() > 0.05, d.min()


def test_chunked_cross_attention_equals_unchunked():
  model = _decoder(query_chunk=5)
  lat, v = _init(model, grid=48)
  coords = jnp.asarray(fields.coord_grid(48, 40))[None]
  cells = jnp.asarray(fields.cell_size(48, 40))[None]
  a = model.apply(v, lat, coords, cells)
  b = model.clone(query_chunk=0).apply(v, lat, coords, cells)
  assert a.shape == (1, 48, 40, 3)
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "tail_norm,mid_attention,full_res",
    [("layer", False, 0), ("none", False, 2), ("group", True, 0)],
)
def test_tiled_decode_equals_the_whole_decode(tail_norm, mid_attention, full_res):
  model = _decoder(tail_norm=tail_norm, mid_attention=mid_attention, full_res_blocks=full_res)
  lat, v = _init(model)
  fn = render_lib.RendererFn(model)
  assert model.halo() % 8 == 0 and model.halo() >= model.receptive_radius()
  h, w = 213, 171  # odd, non-square: the last token row and column are partly outside
  whole = render_lib.render_image(fn, v, lat, h, w, tile=4096)
  tiled = render_lib.render_image(fn, v, lat, h, w, tile=24)
  assert whole.shape == (1, h, w, 3)
  if tail_norm != "group":  # every op is local: tiles are exact
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
  else:  # tile-local GroupNorm statistics and attention: exact only for one tile
    one = render_lib.render_image(fn, v, lat, h, w, tile=216)
    np.testing.assert_allclose(one, whole, atol=1e-5)
    assert np.abs(tiled - whole).max() > 1e-3


def test_grids_off_the_token_lattice_are_a_one_line_error():
  model = _decoder()
  lat, v = _init(model)
  coords = jnp.asarray(fields.coord_grid(20, 16))[None]
  with pytest.raises(ValueError, match="multiples of 8, got 20x16"):
    model.apply(v, lat, coords, jnp.asarray(fields.cell_size(20, 16))[None])


# --- the training windows ----------------------------------------------------------------


def test_field_patch_windows_are_aligned_windows_of_the_stretched_image():
  t = transforms.FieldPatch(enc_size=32, r_min=16, r_max=96, patch=16, max_aspect=2.0)
  img = (np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)
  sizes = set()
  for seed in range(40):
    rng = np.random.default_rng(seed)
    h, w = t.target_size(np.random.default_rng(seed))
    out = t({"image": img, "id": 0}, rng, rng)
    sizes.add((h, w))
    assert h % 8 == 0 and w % 8 == 0 and 16 <= min(h, w) and max(h, w) <= 96
    assert 0.5 - 0.1 <= w / h <= 2.0 + 0.1
    assert out["image"].shape == (32, 32, 3) and out["target"].shape == (16, 16, 3)
    np.testing.assert_allclose(out["cell"], fields.cell_size(h, w))
    # The window is a crop of the full grid on the 8-lattice, and of the resized image.
    top = round(((out["coord"][0, 0, 0] + 1) * h - 1) / 2)
    left = round(((out["coord"][0, 0, 1] + 1) * w - 1) / 2)
    assert top % 8 == 0 and left % 8 == 0
    np.testing.assert_allclose(out["coord"], fields.crop_grid(h, w, top, left, 16, 16), atol=1e-6)
    full = transforms.resized_window(img, (h, w), 0, 0, max(h, w))[:h, :w]
    np.testing.assert_allclose(out["target"], full[top : top + 16, left : left + 16], atol=1e-5)
  assert len({w / h for h, w in sizes}) > 5  # many sizes and aspect ratios


def test_windows_larger_than_small_targets_overhang_them_and_mark_their_pixels():
  t = transforms.FieldPatch(enc_size=32, r_min=16, r_max=48, patch=32, max_aspect=2.0)
  img = (np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)
  seen = 0
  for seed in range(40):
    h, w = t.target_size(np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    out = t({"image": img, "id": 0}, rng, rng)
    valid = out["valid"]
    assert out["target"].shape == (32, 32, 3) and valid.shape == (32, 32)
    if h >= 32 and w >= 32:
      assert valid.all()
      continue
    seen += 1
    top = round(((out["coord"][0, 0, 0] + 1) * h - 1) / 2)
    left = round(((out["coord"][0, 0, 1] + 1) * w - 1) / 2)
    assert (top == 0 or h > 32) and (left == 0 or w > 32)
    vh, vw = min(h - top, 32), min(w - left, 32)
    assert valid[:vh, :vw].all() and valid.sum() == vh * vw  # top left, the target's part
    assert np.all(out["target"][~valid] == 0)
    full = transforms.resized_window(img, (h, w), 0, 0, max(h, w))[:h, :w]
    np.testing.assert_allclose(
        out["target"][:vh, :vw], full[top : top + vh, left : left + vw], atol=1e-5
    )
    # The queries continue the target's pixel lattice past its border.
    np.testing.assert_allclose(out["coord"], fields.crop_grid(h, w, top, left, 32, 32), atol=1e-6)
  assert seen > 5
  # Only a window that can overhang carries `valid` (batches of other configs unchanged).
  t2 = transforms.FieldPatch(enc_size=32, r_min=16, r_max=48, patch=16)
  assert "valid" not in t2({"image": img, "id": 0}, rng, rng)


def test_masked_reconstruction_is_the_loss_of_the_marked_pixels():
  import ml_collections

  from infdiff.losses.perceptual import LPIPSTerm

  term = LPIPSTerm(ml_collections.ConfigDict(dict(lpips_weight=0.0)), "infgen", True)
  pred, target = jax.random.uniform(jax.random.PRNGKey(0), (2, 2, 16, 16, 3))
  valid = np.zeros((2, 16, 16), bool)
  valid[0, :8, :16] = True
  valid[1] = True
  for kind in ("l1", "l2"):
    got = term.reconstruction({}, pred, target, kind, jnp.asarray(valid))[0]
    err = np.abs(np.asarray(pred - target)) * 2 if kind == "l1" else np.square(pred - target) * 4
    want = np.concatenate([np.ravel(err[0, :8]), np.ravel(err[1])]).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_log_uniform_sizes_draw_each_octave_equally_often():
  kw = dict(enc_size=32, r_min=32, r_max=256, patch=32, max_aspect=1.0)
  draws = lambda dist: np.array(
      [
          transforms.FieldPatch(**kw, size_dist=dist).target_size(np.random.default_rng(i))[0]
          for i in range(4000)
      ]
  )
  log, uni = draws("log"), draws("uniform")
  assert log.min() == 32 and log.max() == 256 and np.all(log % 8 == 0)
  # Octaves 32-64, 64-128, 128-256: a third each under 'log'; 1/7, 2/7, 4/7 under 'uniform'.
  octave = lambda x: np.histogram(x, bins=[32, 64, 128, 257])[0] / len(x)
  np.testing.assert_allclose(octave(log), [1 / 3] * 3, atol=0.04)
  np.testing.assert_allclose(octave(uni), [1 / 7, 2 / 7, 4 / 7], atol=0.04)
  with pytest.raises(ValueError, match="size_dist must be"):
    transforms.FieldPatch(**kw, size_dist="gauss")


def test_zero_initialised_cross_blocks_start_as_the_identity():
  block = infgen.CrossBlock(16, 2, zero_init=True)
  x, y = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 5, 16))
  v = block.init(jax.random.PRNGKey(1), x, y[:, :3])
  np.testing.assert_array_equal(block.apply(v, x, y[:, :3]), x)
  other = infgen.CrossBlock(16, 2)
  assert (
      np.abs(other.apply(other.init(jax.random.PRNGKey(1), x, y[:, :3]), x, y[:, :3]) - x).max()
      > 0.1
  )


# --- a tiny run of the three stages --------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("infgen")
  run_main(w, *steps(4), "--config.checkpoint_every=4")
  return w


def test_demo_trains_three_stages_and_writes_grids(run_dir):
  for stage in ("vae", "infgen", "latent_ddpm"):
    assert "4" in os.listdir(run_dir / stage / "checkpoints"), stage
  assert (run_dir / "vae" / "latent_stats.json").exists()
  for s in (32, 64):
    assert (run_dir / "samples" / f"grid_{s}x{s}.png").exists()


def test_sample_cli_decodes_with_infgen_at_any_size_deterministically(run_dir, tmp_path):
  args = ["--size=64x64", "--size=256x128", "--size=333x517", "--num=2", "--seed=0"]
  digests = []
  for k in range(2):
    out = tmp_path / f"o{k}"
    proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={out}", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    sizes = ("64x64", "256x128", "333x517")
    assert names == sorted(f"{i:03d}_{s}.png" for s in sizes for i in range(2))
    digests.append({n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names})
  assert digests[0] == digests[1]
  from PIL import Image

  assert Image.open(tmp_path / "o0" / "001_333x517.png").size == (333, 517)
  assert Image.open(tmp_path / "o0" / "000_256x128.png").size == (256, 128)


def test_the_generator_decodes_its_latents_with_infgen(run_dir):
  from infdiff import runs
  from infdiff.methods.infgen import pipeline

  gen = runs.load_generator(str(run_dir))
  assert isinstance(gen.autoencoder, pipeline.InfGenAutoencoder)
  assert gen.latent_shape == (4, 4, 4)
  z = gen.latents([""], num=1, seed=3)
  for h, w in ((32, 32), (64, 64), (40, 72)):
    assert gen.render(z, h, w).shape == (1, h, w, 3)


def test_evaluate_recon_and_scale_consistency_through_the_contracts(run_dir):
  for metric in ("recon", "scale_consistency"):
    proc = _cli("infdiff.evaluate", f"--workdir={run_dir}", f"--metric={metric}", "--num=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((run_dir / "eval" / f"{metric}.json").read_text())["rows"]
    model = [v for r in rows.values() for k, v in r.items() if not k.startswith("bicubic")]
    assert model and all(np.isfinite(v) for v in model), rows


def test_infgen_resumes_bit_identically_after_sigkill(run_dir, tmp_path):
  n = 3
  only = [
      "--config.stages=('infgen',)",
      f"--config.infgen.vae_workdir={run_dir}",
      f"--config.checkpoint_every={n}",
      *steps(2 * n),
  ]
  ref = tmp_path / "ref"
  run_main(ref, *only)
  ref_state, _ = ckpt_lib.restore_params_only(str(ref / "infgen" / "checkpoints"))
  killed = tmp_path / "killed"
  ckdir = killed / "infgen" / "checkpoints"
  rc, saved = tiny.kill_after_checkpoint(main_cmd(killed) + TINY + only, ckdir, n, ROOT)
  if 2 * n in saved:
    pytest.skip("the run finished before it could be killed; nothing to resume")
  assert rc == -signal.SIGKILL
  run_main(killed, *only)
  state, step = ckpt_lib.restore_params_only(str(ckdir))
  assert step == 2 * n
  chex.assert_trees_all_equal(state["params"], ref_state["params"])
  chex.assert_trees_all_equal(state["ema"], ref_state["ema"])


def test_infgen_on_a_stable_diffusion_vae_directory(tmp_path):
  from infdiff.pretrained import testing

  vae = testing.write_tiny("sd_vae", tmp_path / "sd_vae", block_out_channels=[8, 8, 8, 8])
  lpips = testing.write_tiny("lpips_vgg16", tmp_path / "lpips")
  w = tmp_path / "w"
  run_main(
      w,
      *steps(2),
      "--config.stages=('infgen',)",
      "--config.infgen.vae_source=sd",
      f"--config.infgen.vae_path={vae}",
      "--config.infgen.lpips_weight=1.0",  # the paper-scale loss: L1 + LPIPS
      f"--config.infgen.lpips_path={lpips}",
  )
  from infdiff import runs

  ae = runs.load_autoencoder(str(w))
  z = ae.encode(np.zeros((1, 32, 32, 3), np.float32))
  assert z.shape == (1, 4, 4, 4)
  assert ae.render(z, 48, 24).shape == (1, 48, 24, 3)


def test_paper_configuration_without_directories_refuses_to_start(tmp_path):
  proc = subprocess.run(
      main_cmd(tmp_path / "w", "configs/infgen.py"), cwd=ROOT, env=_env(), capture_output=True,
      text=True,
  )  # fmt: skip
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert "vae=DIR" in last and "lpips" in last, proc.stderr[-2000:]


def test_latent_ddpm_without_its_decoder_run_is_one_line(run_dir, tmp_path):
  proc = run_main(
      tmp_path / "w",
      *steps(2),
      "--config.stages=('latent_ddpm',)",
      f"--config.latent_ddpm.stage1_workdir={run_dir}",
      f"--config.latent_ddpm.decoder_workdir={tmp_path / 'nothing'}",
      check=False,
  )
  assert proc.returncode != 0
  err = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
  assert len(err) == 1 and "infgen" in err[0], proc.stderr[-2000:]
