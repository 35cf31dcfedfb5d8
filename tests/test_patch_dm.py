"""Patch-DM end to end on a tiny config: both stages, resume, sample, evaluate seams."""

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.patch_dm.image_height=16",
    "--config.patch_dm.image_width=16",
    "--config.patch_dm.patch=8",
    "--config.patch_dm.batch_size=2",
    "--config.patch_dm.pos_dim=8",
    "--config.patch_dm.code.dim=8",
    "--config.patch_dm.unet.ch=8",
    "--config.patch_dm.unet.channel_mult=(1,2)",
    "--config.patch_dm.unet.attention_resolutions=(4,)",
    "--config.patch_dm.unet.norm_groups=4",
    "--config.patch_dm.sample.num_steps=3",
    "--config.patch_dm.sample.batch_size=2",
    "--config.patch_dm.sample.patch_batch=4",
    "--config.patch_dm.sample.sizes=((16,16),(32,16))",
    "--config.patch_dm.sample.num=2",
    "--config.patch_dm_codes.batch_size=2",
    "--config.patch_dm_codes.codes_per_step=4",
    "--config.patch_dm_codes.mlp.width=16",
    "--config.patch_dm_codes.mlp.num_layers=3",
    "--config.patch_dm_codes.sample.num_steps=3",
    "--config.data.shapes_size=16",
    "--config.data.source_kwargs.num_scenes=8",
    "--config.data.num_threads=1",
    "--config.log_every=2",
]

_env = tiny.subprocess_env


def steps(n: int) -> list[str]:
  return [f"--config.total_steps={n}", f"--config.patch_dm.total_steps={n}"]


def main_cmd(workdir, config="configs/patch_dm.py:demo"):
  return [sys.executable, "-m", "infdiff.main", f"--config={config}", f"--workdir={workdir}"]


def run_main(workdir, *extra, config="configs/patch_dm.py:demo", check=True):
  cmd = main_cmd(workdir, config=config) + TINY + list(extra)
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def _cli(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("patch_dm")
  run_main(w, *steps(4), "--config.checkpoint_every=4")
  return w


def _load_config(arg):
  import importlib.util

  path = os.path.join(ROOT, "configs/patch_dm.py")
  spec = importlib.util.spec_from_file_location("patch_dm_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_demo_trains_both_stages_and_writes_grids(run_dir):
  for stage in ("patch_dm", "patch_dm_codes"):
    assert "4" in os.listdir(run_dir / stage / "checkpoints")
  for name in ("16x16", "32x16"):
    assert (run_dir / "samples" / f"grid_{name}.png").exists()


def test_sample_cli_sizes_same_seed_identical_and_bad_size_one_line(run_dir, tmp_path):
  args = ["--size=16x16", "--size=32x16", "--num=2", "--seed=0"]
  digests = []
  for k in range(2):
    out = tmp_path / f"o{k}"
    proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={out}", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert names == sorted(f"{i:03d}_{s}.png" for s in ("16x16", "32x16") for i in range(2))
    digests.append({n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names})
  assert digests[0] == digests[1]
  from PIL import Image

  assert Image.open(tmp_path / "o0" / "001_32x16.png").size == (32, 16)
  proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={tmp_path}", "--size=20x16")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "multiples of 8" in lines[0], proc.stderr


def test_patch_functions_compile_once_for_every_canvas(run_dir):
  from infdiff import runs

  gen = runs.load_generator(str(run_dir))
  out = dict(gen.iter_sample([""], 1, 0, [(16, 16), (32, 32), (48, 16)]))
  assert out[(32, 32)].shape == (1, 32, 32, 3) and out[(48, 16)].shape == (1, 16, 48, 3)
  assert gen.patch_traces == {"encode": 1, "decode": 1}
  assert all(np.isfinite(v).all() for v in out.values())


def test_host_and_traced_denoisers_agree(run_dir):
  """The jitted-patch host path and the traceable path (guidance) are one function."""
  from infdiff import runs

  gen = runs.load_generator(str(run_dir))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 24, 3)), jnp.float32)
  t = jnp.asarray([500, 500], jnp.int32)
  code = gen.codes([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
  for mode in ("feature", "none"):
    gen.collage = mode
    host = gen.denoiser(gen.params, 16, 24, host=True)(x, t, code)
    traced = jax.jit(gen.denoiser(gen.params, 16, 24))(x, t, code)
    np.testing.assert_allclose(host, traced, atol=1e-5)


def test_masked_loss_ignores_the_padding(run_dir, monkeypatch):
  """The originals' MSE is weighted by the padded-image mask (zero on the half-patch
  padding, which every 2 x 2 block of a 3 x 3 padded grid touches); the shifted patch,
  always inside the image, is unmasked."""
  from infdiff import runs
  from infdiff.diffusion import gaussian

  run = runs.load_run(str(run_dir), "patch_dm")
  m = run.method
  calls = []
  real = gaussian.regression_loss

  def spy(pred, target, kind="mse", mask=None, per_example=False):
    calls.append((pred.shape, None if mask is None else np.asarray(mask)))
    return real(pred, target, kind, mask, per_example)

  monkeypatch.setattr(gaussian, "regression_loss", spy)
  img = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
  batch = {"image": img, "index": jnp.asarray([0, 1], jnp.int32)}
  for seed in range(4):  # different blocks
    loss, metrics = m.loss("model", run.params, {}, batch, jax.random.PRNGKey(seed), 0)
    assert np.isfinite(float(loss)) and set(metrics) == {"mse_shift", "mse_orig"}
  shifted = [c for c in calls if c[0] == (2, 8, 8, 3)]
  originals = [c for c in calls if c[0] == (8, 8, 8, 3)]
  assert len(shifted) == len(originals) == 4
  assert all(mask is None for _, mask in shifted)
  for _, mask in originals:
    assert mask.shape == (8, 8, 8, 1) and set(np.unique(mask)) == {0.0, 1.0}
    # A 16 x 16 image padded by 4 is 24 x 24 (3 x 3 patches of 8): every 2 x 2 block's
    # 16 x 16 window holds 12 x 12 image pixels, per image.
    assert mask.reshape(2, -1).sum(1).tolist() == [144.0, 144.0]


def test_evaluate_seams_compares_three_samplers(run_dir):
  proc = _cli("infdiff.evaluate", f"--workdir={run_dir}", "--metric=seams", "--num=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads((run_dir / "eval" / "seams.json").read_text())["rows"]
  assert list(rows) == ["feature_collage", "independent", "pixel_shift"]
  for r in rows.values():
    assert set(r) == {"boundary_ratio", "swd"} and np.isfinite(r["boundary_ratio"])


def test_beyond_patch_modes_and_guidance_prior(run_dir):
  from infdiff import runs

  gen = runs.load_generator(str(run_dir), positions="extend", guidance_scale=2.0)
  out = dict(gen.iter_sample([""], 1, 0, [(32, 32)]))
  assert out[(32, 32)].shape == (1, 32, 32, 3) and np.isfinite(out[(32, 32)]).all()
  # extend: the training frame (2 x 2 patches) in the centre of a 4 x 4 canvas keeps its
  # positions, the ring around it has none.
  pos, keep = gen._positions(jnp.asarray([[0.5, 0.5], [1.5, 1.5], [3.5, 0.5]]), 4, 4)
  np.testing.assert_allclose(pos[1], [0.5, 0.5])
  np.testing.assert_array_equal(np.asarray(keep)[:, 0], [0.0, 1.0, 0.0])
  prior = gen.guidance_view(16, 16)
  noise, code = prior.initial_state([jax.random.PRNGKey(0)])
  assert noise.shape == (1, 16, 16, 3) and code.shape == (1, 8)
  eps = prior.model_fn()(noise, jnp.asarray([10], jnp.int32), code)
  assert eps.shape == noise.shape
  with pytest.raises(ValueError, match="multiples of 8"):
    gen.guidance_view(12, 16)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  n, total = 2, 12  # killed after step 2, so that most of the run is still to come
  only = ["--config.stages=('patch_dm',)", f"--config.checkpoint_every={n}", *steps(total)]
  only += ["--config.patch_dm.sample.sizes=((16,16),)"]
  ref = tmp_path / "ref"
  run_main(ref, *only)
  ref_state, _ = ckpt_lib.restore_params_only(str(ref / "patch_dm" / "checkpoints"))
  killed = tmp_path / "killed"
  ckdir = killed / "patch_dm" / "checkpoints"
  cmd = main_cmd(killed) + TINY + only
  rc, saved = tiny.kill_after_checkpoint(cmd, ckdir, n, ROOT)
  if total in saved:
    pytest.skip("the run finished before it could be killed; nothing to resume")
  assert rc == -signal.SIGKILL
  run_main(killed, *only)
  state, step = ckpt_lib.restore_params_only(str(ckdir))
  assert step == total
  chex.assert_trees_all_equal(state["params"], ref_state["params"])
  chex.assert_trees_all_equal(state["ema"], ref_state["ema"])


def test_encoder_codes_switch_trains(tmp_path):
  w = tmp_path / "enc"
  run_main(w, *steps(2), "--config.patch_dm.code.source=encoder")
  assert (w / "samples" / "grid_16x16.png").exists()


def test_codes_stage_on_missing_main_run_is_one_line(tmp_path):
  target = tmp_path / "nothing"
  proc = run_main(
      tmp_path / "w",
      *steps(2),
      "--config.stages=('patch_dm_codes',)",
      f"--config.patch_dm_codes.stage1_workdir={target}",
      check=False,
  )
  assert proc.returncode != 0
  err = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
  assert len(err) == 1 and "patch_dm" in err[0] and str(target) in err[0], proc.stderr[-2000:]


def test_configs_carry_the_papers_numbers():
  c = _load_config(None).patch_dm
  assert (c.image_width, c.image_height, c.patch, c.code.dim) == (1024, 512, 64, 512)
  assert (c.unet.ch, tuple(c.unet.channel_mult), c.unet.num_res_blocks) == (64, (1, 2, 4, 8), 2)
  assert tuple(c.unet.attention_resolutions) == (16,) and c.unet.dropout == 0.1
  assert (c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.num_steps) == (1e-4, 0.02, 1000)
  assert (c.optim.lr, c.optim.grad_clip, c.ema_decay) == (1e-4, 1.0, 0.9999)
  assert (c.cfg.drop_code, c.cfg.drop_pos, c.sample.num_steps) == (0.1, 0.5, 50)
  codes = _load_config("codes").patch_dm_codes
  assert (codes.mlp.num_layers, codes.mlp.width, codes.diffusion.loss) == (10, 2048, "l1")
  assert _load_config("demo").stages == ("patch_dm", "patch_dm_codes")
  assert _load_config("codes").stages == ("patch_dm_codes",)


def test_outpainting_by_replacement_keeps_the_known_pixels(run_dir, tmp_path):
  """guide --step_rule=replace: the known centre is written back at every step (the
  last step writes it exactly); the unguided reference is free there."""
  from PIL import Image

  from infdiff import guide, sampling

  known = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
  path = tmp_path / "centre.png"
  sampling.save_png(str(path), known)
  report = guide.run(
      str(run_dir),
      "32x32",
      crops=[f"8,8,{path}"],
      scale=1.0,
      step_rule="replace",
      num=1,
      seed=0,
      out=str(tmp_path),
      sampler_options={"positions": "extend"},
  )
  (label,) = report
  assert report[label]["guided_psnr_mean"] > 40 > report[label]["unguided_psnr_mean"]
  got = np.asarray(Image.open(tmp_path / "guided_000.png"), np.float32) / 255.0
  np.testing.assert_allclose(got[8:24, 8:24], known, atol=1.5 / 255)
  with pytest.raises(ValueError, match="crop"):
    guide.run(str(run_dir), "32x32", colours="0,0,8,8,#ff0000", step_rule="replace")


def test_guide_inputs_ring_bands_tile_the_canvas_around_the_hole(run_dir, tmp_path):
  script = os.path.join(ROOT, "scripts", "guide_inputs.py")
  proc = subprocess.run(
      [
          sys.executable,
          script,
          f"--workdir={run_dir}",
          "--canvas=16",
          "--hole=8",
          f"--out={tmp_path}",
      ],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  flags = json.loads(proc.stdout.strip().splitlines()[-1])["ring"].split()
  assert len(flags) == 4
  from PIL import Image

  covered = np.zeros((16, 16), int)
  for f in flags:
    t, le, path = f.split("=", 1)[1].split(",", 2)
    w, h = Image.open(path).size
    covered[int(t) : int(t) + h, int(le) : int(le) + w] += 1
  assert covered[4:12, 4:12].sum() == 0 and (covered + np.pad(np.ones((8, 8)), 4) == 1).all()


def test_clip_init_fills_the_code_table_from_image_embeddings(tmp_path):
  """clip_init=DIR: the table starts as CLIP embeddings of the training images (tiny
  random-weight CLIP written here); a width mismatch is one line."""
  from infdiff import runs
  from infdiff.pretrained import testing

  clip_dir = testing.write_tiny_clip(tmp_path / "clip")
  w = tmp_path / "w"
  only = ["--config.stages=('patch_dm',)", f"--config.patch_dm.code.clip_init={clip_dir}"]
  run_main(w, *steps(1), *only, "--config.patch_dm.code.dim=24")
  table = np.asarray(runs.load_run(str(w), "patch_dm").params["model"]["codes"])
  assert table.shape == (8, 24) and np.abs(table).mean() > 0.1  # not the 0.02 random init
  proc = run_main(tmp_path / "w2", *steps(1), *only, check=False)
  assert proc.returncode != 0
  err = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
  assert len(err) == 1 and "24-d" in err[0] and "code.dim=8" in err[0], proc.stderr[-2000:]


PAPER_TINY = [
    "--config.data.source=shapes",
    "--config.data.shapes_size=32",
    "--config.data.num_threads=1",
    "--config.patch_dm.image_height=32",
    "--config.patch_dm.image_width=32",
    "--config.patch_dm.patch=16",
    "--config.patch_dm.batch_size=2",
    "--config.patch_dm.pos_dim=8",
    "--config.patch_dm.code.dim=8",
    "--config.patch_dm.unet.ch=8",
    "--config.patch_dm.unet.norm_groups=4",
    "--config.patch_dm.unet.attention_resolutions=(2,)",
    "--config.patch_dm.sample.num_steps=2",
    "--config.patch_dm.sample.sizes=((32,32),)",
    "--config.patch_dm.sample.num=1",
    "--config.patch_dm_codes.batch_size=2",
    "--config.patch_dm_codes.codes_per_step=4",
    "--config.patch_dm_codes.mlp.width=16",
    "--config.patch_dm_codes.sample.num_steps=2",
    "--config.total_steps=1",
]


def test_paper_configuration_runs_one_step_of_each_stage(tmp_path):
  """configs/patch_dm.py at paper scale (4 UNet levels, 2 ResBlocks, dropout, eps), widths
  and sizes shrunk; then :codes on it."""
  w = tmp_path / "main"
  cmd = main_cmd(w, config="configs/patch_dm.py") + PAPER_TINY
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (w / "patch_dm" / "checkpoints" / "1").is_dir()
  w2 = tmp_path / "codes"
  cmd = main_cmd(w2, config="configs/patch_dm.py:codes") + PAPER_TINY
  cmd += [f"--config.patch_dm_codes.stage1_workdir={w}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (w2 / "samples" / "grid_32x32.png").exists()
