"""∞-Diff end to end on a tiny config: both stages, resume, sample, evaluate, guide."""

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
    "--config.infty_diff.image_size=16",
    "--config.infty_diff.batch_size=2",
    "--config.infty_diff.z_dim=8",
    "--config.infty_diff.net.nf=8",
    "--config.infty_diff.net.num_blocks=1",
    "--config.infty_diff.net.kernel_size=3",
    "--config.infty_diff.net.grid_size=8",
    "--config.infty_diff.net.grid_channels=8",
    "--config.infty_diff.net.unet.ch=8",
    "--config.infty_diff.net.unet.channel_mult=(1,2)",
    "--config.infty_diff.net.unet.attention_resolutions=(4,)",
    "--config.infty_diff.stats_images=8",
    "--config.infty_diff.stats_batch_size=4",
    "--config.infty_diff.sample.num_steps=3",
    "--config.infty_diff.sample.batch_size=2",
    "--config.infty_diff.sample.sizes=(16,32)",
    "--config.infty_diff.sample.num=2",
    "--config.infty_diff_latent.batch_size=4",
    "--config.infty_diff_latent.mlp.width=16",
    "--config.infty_diff_latent.mlp.num_layers=3",
    "--config.infty_diff_latent.sample.num_steps=3",
    "--config.data.shapes_size=16",
    "--config.data.num_threads=1",
    "--config.log_every=2",
]

_env = tiny.subprocess_env


def steps(n: int) -> list[str]:
  return [f"--config.total_steps={n}", f"--config.infty_diff.total_steps={n}"]


def main_cmd(workdir, config="configs/infty_diff.py:demo,z=64"):
  return [sys.executable, "-m", "infdiff.main", f"--config={config}", f"--workdir={workdir}"]


def run_main(workdir, *extra, config="configs/infty_diff.py:demo,z=64", check=True):
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
  w = tmp_path_factory.mktemp("infty")
  run_main(w, *steps(4), "--config.checkpoint_every=4")
  return w


def _load_config(arg):
  import importlib.util

  path = os.path.join(ROOT, "configs/infty_diff.py")
  spec = importlib.util.spec_from_file_location("infty_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_demo_trains_both_stages_and_writes_grids(run_dir):
  for stage in ("infty_diff", "infty_diff_latent"):
    assert "4" in os.listdir(run_dir / stage / "checkpoints")
  stats = json.loads((run_dir / "infty_diff" / "latent_stats.json").read_text())
  assert len(stats["mean"]) == len(stats["std"]) == 8 and stats["count"] == 8
  for s in (16, 32):
    assert (run_dir / "samples" / f"grid_{s}x{s}.png").exists()


def test_sample_cli_any_size_same_seed_identical(run_dir, tmp_path):
  args = ["--size=16x16", "--size=48x48", "--size=333x517", "--num=2", "--seed=0"]
  digests = []
  for k in range(2):
    out = tmp_path / f"o{k}"
    proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={out}", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    want = sorted(f"{i:03d}_{s}.png" for s in ("16x16", "48x48", "333x517") for i in range(2))
    assert names == want
    digests.append({n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names})
  assert digests[0] == digests[1]
  from PIL import Image

  assert Image.open(tmp_path / "o0" / "001_333x517.png").size == (333, 517)


def test_sample_cli_refuses_prompts_in_one_line(run_dir, tmp_path):
  proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={tmp_path}", "--prompt=a cat")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "unconditional" in lines[0], proc.stderr


def test_sampling_at_two_sizes_uses_the_same_parameters_with_resized_kernels(run_dir):
  from infdiff import runs
  from infdiff.models import sparse_unet

  gen = runs.load_generator(str(run_dir))
  assert sparse_unet.kernel_size_at(3, 16, 16, 16) == (3, 3)
  assert sparse_unet.kernel_size_at(3, 32, 32, 16) == (7, 7)  # odd size nearest 3 x 2 (>= 3)
  assert sparse_unet.kernel_size_at(7, 48, 24, 16) == (21, 11)
  out = dict(gen.iter_sample([""], 1, 3, [(16, 16), (32, 32)]))
  assert out[(16, 16)].shape == (1, 16, 16, 3) and out[(32, 32)].shape == (1, 32, 32, 3)
  assert gen.trace_count == 2  # one compile per canvas size, the same parameters
  # The sample is a function: at 32 its 2x2 means stay close to the 16 sample (same z, a
  # different noise draw, so only loosely; random networks give near-constant images).
  assert all(np.isfinite(v).all() for v in out.values())
  # Repeating a size reuses the compiled sampler.
  dict(gen.iter_sample([""], 3, 4, [(16, 16)]))
  assert gen.trace_count == 2


def test_train_step_compiles_once_per_subset_size(run_dir):
  from infdiff import runs
  from infdiff.models import sparse

  run = runs.load_run(str(run_dir), "infty_diff")
  m = run.method
  n, b = m.image_size, 2
  traces = []

  def loss(p, img, rng):
    traces.append(1)
    return m.loss("model", p, {}, {"image": img}, rng, 0)[0]

  grad = jax.jit(jax.grad(loss))
  img = jnp.asarray(np.random.default_rng(0).random((b, n, n, 3)), jnp.float32)
  for i in range(3):  # new subsets, timesteps and noise every call: one trace
    g = grad(run.params, img, jax.random.PRNGKey(i))
  assert len(traces) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  assert m.points == n * n // 4
  # The subset changes with the key and differs between the images of a batch.
  a = sparse.random_subset(jax.random.PRNGKey(0), 2, n, n, m.points)
  c = sparse.random_subset(jax.random.PRNGKey(1), 2, n, n, m.points)
  assert not np.array_equal(a[0], a[1]) and not np.array_equal(a, c)


def test_evaluate_swd_through_the_generator_contract(run_dir):
  args = [f"--workdir={run_dir}", "--metric=swd", "--num=4", "--size=16x16"]
  values = []
  for extra in ([], ["--sampler_option=deblur=true"]):
    proc = _cli("infdiff.evaluate", *args, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    values.append(json.loads((run_dir / "eval" / "swd.json").read_text())["rows"])
  assert values[0] != values[1]  # the Wiener-deblurred images are other images
  proc = _cli("infdiff.evaluate", *args, "--sampler_option=sharpen=2")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "sharpen" in lines[0], proc.stderr


def test_guide_cli_runs_through_the_canvas_prior(run_dir, tmp_path):
  from infdiff import guide, sampling

  known = np.random.default_rng(0).random((32, 16, 3)).astype(np.float32)
  path = tmp_path / "left.png"
  sampling.save_png(str(path), known)
  report = guide.run(
      str(run_dir), "32x32", crops=[f"0,0,{path}"], scale=2.0, num=1, seed=0, out=str(tmp_path)
  )
  (label,) = report
  assert np.isfinite(report[label]["guided_psnr_mean"])
  assert (tmp_path / "guided_000.png").exists() and (tmp_path / "unguided_000.png").exists()


def test_inpainting_guidance_gradient_touches_only_the_known_half(run_dir):
  """The crop condition renders its own box: its gradient w.r.t. the canvas is local."""
  from infdiff import runs
  from infdiff.diffusion import dps

  gen = runs.load_generator(str(run_dir))
  prior = gen.guidance_view(32, 32)
  assert prior.latent_shape == (32, 32, 3)
  noise, z = prior.initial_state([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
  assert noise.shape == (2, 32, 32, 3) and z.shape == (2, 8)
  known = jnp.asarray(np.random.default_rng(0).random((32, 16, 3)), jnp.float32)
  cond = dps.Crop(dps.Box(0, 0, 32, 16, 32, 32), known)
  x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  cost = lambda x: jnp.sum(dps.latent_costs(prior.field_fn(), prior.render_fn(), (cond,), x))
  g = np.abs(np.asarray(jax.grad(cost)(x0)))
  assert g[:, :, :16].min() > 0 and g[:, :, 16:].max() == 0
  # Rendering at the canvas grid reads the canvas pixels exactly.
  rgb = dps.render_box(prior.render_fn(), x0, dps.Box.whole(32, 32), 32, 32, 2)
  np.testing.assert_allclose(rgb, (x0 + 1) / 2, atol=1e-6)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  n = 3
  only = ["--config.stages=('infty_diff',)", f"--config.checkpoint_every={n}", *steps(2 * n)]
  ref = tmp_path / "ref"
  run_main(ref, *only)
  ref_state, _ = ckpt_lib.restore_params_only(str(ref / "infty_diff" / "checkpoints"))

  killed = tmp_path / "killed"
  ckdir = killed / "infty_diff" / "checkpoints"
  cmd = main_cmd(killed) + TINY + only
  rc, saved = tiny.kill_after_checkpoint(cmd, ckdir, n, ROOT)
  if 2 * n in saved:
    pytest.skip("the run finished before it could be killed; nothing to resume")
  assert rc == -signal.SIGKILL
  run_main(killed, *only)
  state, step = ckpt_lib.restore_params_only(str(ckdir))
  assert step == 2 * n
  chex.assert_trees_all_equal(state["params"], ref_state["params"])
  chex.assert_trees_all_equal(state["ema"], ref_state["ema"])


def test_latent_stage_on_missing_main_run_is_one_line(tmp_path):
  target = tmp_path / "nothing"
  proc = run_main(
      tmp_path / "w",
      *steps(2),
      "--config.stages=('infty_diff_latent',)",
      f"--config.infty_diff_latent.stage1_workdir={target}",
      check=False,
  )
  assert proc.returncode != 0
  err = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
  assert len(err) == 1 and "infty_diff" in err[0] and str(target) in err[0], proc.stderr[-2000:]


def test_unconditional_model_samples_from_the_main_stage(tmp_path):
  w = tmp_path / "uncond"
  run_main(w, *steps(2), "--config.infty_diff.z_dim=0", "--config.stages=('infty_diff',)")
  assert (w / "samples" / "grid_32x32.png").exists()
  assert not (w / "infty_diff" / "latent_stats.json").exists()
  # The subset-vs-full-grid check runs on it and prints its three errors per timestep.
  script = os.path.join(ROOT, "scripts", "infty_density_check.py")
  proc = subprocess.run(
      [sys.executable, script, f"--workdir={w}", "--num=2", "--seeds=1", "--timesteps=500"],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(row) == {"t", "subset", "full_raw", "full"}


PAPER_TINY = [
    "--config.data.source=shapes",
    "--config.data.shapes_size=32",
    "--config.data.num_threads=1",
    "--config.infty_diff.image_size=32",
    "--config.infty_diff.batch_size=2",
    "--config.infty_diff.net.nf=8",
    "--config.infty_diff.net.grid_size=16",
    "--config.infty_diff.net.grid_channels=8",
    "--config.infty_diff.net.unet.ch=8",
    "--config.infty_diff.net.unet.attention_resolutions=(2,1)",
    "--config.infty_diff.z_dim=16",
    "--config.infty_diff.stats_images=4",
    "--config.infty_diff.stats_batch_size=4",
    "--config.infty_diff_latent.batch_size=4",
    "--config.infty_diff_latent.mlp.width=16",
    "--config.infty_diff_latent.sample.num_steps=2",
    "--config.infty_diff.sample.num_steps=2",
    "--config.infty_diff.sample.sizes=(32,)",
    "--config.infty_diff.sample.num=1",
    "--config.infty_diff.sample.batch_size=1",
    "--config.total_steps=1",
]


def test_paper_configuration_runs_one_step_of_each_stage(tmp_path):
  """configs/infty_diff.py at paper scale (5 UNet levels, 3 blocks, kernel 7), widths shrunk."""
  w = tmp_path / "main"
  proc = subprocess.run(
      main_cmd(w, config="configs/infty_diff.py") + PAPER_TINY,
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (w / "infty_diff" / "checkpoints" / "1").is_dir()
  w2 = tmp_path / "latent"
  cmd = main_cmd(w2, config="configs/infty_diff.py:latent") + PAPER_TINY
  cmd += [f"--config.infty_diff_latent.stage1_workdir={w}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (w2 / "infty_diff_latent" / "checkpoints" / "1").is_dir()


def test_configs_carry_the_papers_numbers():
  c = _load_config(None).infty_diff
  assert (c.image_size, c.rate, c.batch_size, c.z_dim) == (256, 4.0, 32, 1024)
  assert (c.net.nf, c.net.num_blocks, c.net.kernel_size, c.net.grid_size) == (64, 3, 7, 128)
  assert tuple(c.net.unet.channel_mult) == (1, 2, 4, 8, 8)
  assert (c.optim.lr, c.optim.b2, c.ema_decay, c.ema_every) == (5e-5, 0.99, 0.995, 10)
  assert tuple(c.optim.grad_clip_per) == ("net", "encoder")
  lat = _load_config("latent").infty_diff_latent
  assert (lat.mlp.num_layers, lat.mlp.width, lat.diffusion.beta, lat.diffusion.loss) == (
      10,
      2048,
      0.008,
      "l1",
  )
  assert _load_config("demo").stages == ("infty_diff",)
  assert _load_config("demo,z=64").stages == ("infty_diff", "infty_diff_latent")
  assert _load_config("demo,rate=8").infty_diff.rate == 8.0
