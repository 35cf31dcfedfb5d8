"""INFD end to end on a tiny config: both stages, resume, the sample and evaluate CLIs."""

import hashlib
import os
import signal
import subprocess
import sys

import chex
import numpy as np
import pytest
import tiny

from infdiff import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.infd_ae.enc_size=16",
    "--config.infd_ae.r_max=32",
    "--config.infd_ae.patch=16",
    "--config.infd_ae.ae.ch=8",
    "--config.infd_ae.ae.norm_groups=4",
    "--config.infd_ae.vq.num_codes=16",
    "--config.infd_ae.renderer.features=8",
    "--config.infd_ae.renderer.norm_groups=4",
    "--config.infd_ae.gan.ndf=4",
    "--config.infd_ae.gan.weight=0.75",  # the paper's GAN term (the demo trains without it)
    "--config.infd_ae.batch_size=2",
    "--config.infd_ae.stats_images=8",
    "--config.infd_ae.stats_batch_size=4",
    "--config.infd_ldm.batch_size=2",
    "--config.infd_ldm.unet.ch=8",
    "--config.infd_ldm.unet.norm_groups=4",
    "--config.infd_ldm.unet.head_channels=8",
    "--config.infd_ldm.sample.num_steps=3",
    "--config.infd_ldm.sample.batch_size=2",
    "--config.infd_ldm.sample.tile=32",
    "--config.infd_ldm.sample.sizes=(16,32)",
    "--config.infd_ldm.sample.num=2",
    "--config.data.num_threads=1",
    "--config.log_every=2",
]

_env = tiny.subprocess_env


def steps(n: int) -> list[str]:
  return [f"--config.total_steps={n}", f"--config.infd_ae.total_steps={n}"]


def main_cmd(workdir, *extra, config="configs/infd.py:demo"):
  return [sys.executable, "-m", "infdiff.main", f"--config={config}", f"--workdir={workdir}"]


def run_main(workdir, *extra, config="configs/infd.py:demo", check=True):
  cmd = main_cmd(workdir, config=config) + TINY + list(extra)
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("infd")
  run_main(w, *steps(4), "--config.checkpoint_every=4")
  return w


def _cli(module, *args):
  cmd = [sys.executable, "-m", module, *args]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)


def test_demo_trains_both_stages_and_writes_grids(run_dir):
  for stage in ("infd_ae", "infd_ldm"):
    steps_saved = os.listdir(run_dir / stage / "checkpoints")
    assert "4" in steps_saved, steps_saved
  for s in (16, 32):
    assert (run_dir / "samples" / f"grid_{s}x{s}.png").exists()


def test_discriminator_batch_stats_are_trained_and_checkpointed(run_dir):
  state, step = ckpt_lib.restore_params_only(str(run_dir / "infd_ae" / "checkpoints"))
  assert step == 4
  assert set(state["params"]) == {"model", "disc"}
  stats = state["model_state"]["disc"]["batch_stats"]
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(stats)]
  assert leaves
  # Running means start at 0 and variances at 1: four train-mode updates move them.
  assert any(np.abs(x).max() > 0 and not np.allclose(x, 1.0) for x in leaves)


def test_sample_cli_any_size_same_seed_identical(run_dir, tmp_path):
  args = ["--size=64x64", "--size=333x517", "--num=2", "--seed=0"]
  digests = []
  for k in range(2):
    out = tmp_path / f"o{k}"
    proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={out}", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert names == sorted(f"{i:03d}_{s}.png" for s in ("64x64", "333x517") for i in range(2))
    digests.append({n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names})
  assert digests[0] == digests[1]
  from PIL import Image

  assert Image.open(tmp_path / "o0" / "001_333x517.png").size == (333, 517)


def test_sample_cli_refuses_prompts(run_dir, tmp_path):
  proc = _cli("infdiff.sample", f"--workdir={run_dir}", f"--out={tmp_path}", "--prompt=a cat")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "unconditional" in lines[0], proc.stderr


def test_ddim_compiles_once_for_any_output_size(run_dir):
  from infdiff import runs

  gen = runs.load_generator(str(run_dir))
  z = gen.latents([""], num=3, seed=1)  # 3 samples, batch 2: two calls, one compile
  assert z.shape == (3, *gen.latent_shape)
  for h, w in ((16, 16), (40, 24), (333, 517)):
    img = gen.render(z[:1], h, w)
    assert img.shape == (1, h, w, 3) and np.isfinite(img).all()
  gen.latents([""], num=1, seed=2)
  assert gen.trace_count == 1
  # A sample depends on its seed and index only, not on the batch it was computed in.
  np.testing.assert_allclose(gen.latents([""], num=1, seed=1)[0], z[0], atol=1e-5)


def test_evaluate_recon_and_swd_through_the_contracts(run_dir):
  import json

  for metric, extra in (("recon", ["--num=2"]), ("scale_consistency", ["--num=2"])):
    proc = _cli("infdiff.evaluate", f"--workdir={run_dir}", f"--metric={metric}", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "eval" / f"{metric}.json").read_text())
  proc = _cli("infdiff.evaluate", f"--workdir={run_dir}", "--metric=swd", "--num=4", "--size=16x16")
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_evaluate_fid_and_pfid_through_the_contracts(run_dir, tmp_path):
  import json

  from infdiff.pretrained import testing

  inception = testing.write_tiny("inception_fid", tmp_path / "inception")
  for metric, extra in (("fid", []), ("pfid", ["--patch=16"])):
    proc = _cli(
        "infdiff.evaluate",
        f"--workdir={run_dir}",
        f"--metric={metric}",
        "--num=3",
        "--size=32x32",
        f"--inception={inception}",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((run_dir / "eval" / f"{metric}.json").read_text())
    assert out["rows"][metric]["32x32"] > 0


def test_ldm_on_missing_or_wrong_autoencoder_is_one_line(tmp_path):
  for target in (tmp_path / "nothing", tmp_path):
    proc = run_main(
        tmp_path / "w",
        *steps(2),
        "--config.stages=('infd_ldm',)",
        f"--config.infd_ldm.stage1_workdir={target}",
        check=False,
    )
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "infd_ae" in err[0] and str(target) in err[0], proc.stderr[-2000:]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  n = 3
  only_ae = ["--config.stages=('infd_ae',)", f"--config.checkpoint_every={n}", *steps(2 * n)]
  ref = tmp_path / "ref"
  run_main(ref, *only_ae)
  ref_state, _ = ckpt_lib.restore_params_only(str(ref / "infd_ae" / "checkpoints"))

  killed = tmp_path / "killed"
  ckdir = killed / "infd_ae" / "checkpoints"
  cmd = main_cmd(killed) + TINY + only_ae
  rc, saved = tiny.kill_after_checkpoint(cmd, ckdir, n, ROOT)
  if 2 * n in saved:
    pytest.skip("the run finished before it could be killed; nothing to resume")
  assert rc == -signal.SIGKILL
  run_main(killed, *only_ae)
  state, step = ckpt_lib.restore_params_only(str(ckdir))
  assert step == 2 * n
  chex.assert_trees_all_equal(state["params"], ref_state["params"])
  chex.assert_trees_all_equal(state["model_state"], ref_state["model_state"])


PAPER_TINY = [
    "--config.data.source=shapes",
    "--config.data.shapes_size=64",
    "--config.data.num_threads=1",
    "--config.infd_ae.enc_size=32",
    "--config.infd_ae.r_max=64",
    "--config.infd_ae.patch=32",
    "--config.infd_ae.batch_size=2",
    "--config.infd_ae.ae.ch=8",
    "--config.infd_ae.ae.norm_groups=4",
    "--config.infd_ae.vq.num_codes=16",
    "--config.infd_ae.renderer.features=8",
    "--config.infd_ae.renderer.norm_groups=4",
    "--config.infd_ae.gan.ndf=4",
    "--config.infd_ldm.batch_size=2",
    "--config.infd_ldm.unet.ch=8",
    "--config.infd_ldm.unet.norm_groups=4",
    "--config.infd_ldm.unet.head_channels=8",
    # the paper's end-of-run work (10,000-image latent statistics, 16 samples of 200 DDIM
    # steps at 256-1024) shrunk too; the code path is the same
    "--config.infd_ae.stats_images=4",
    "--config.infd_ae.stats_batch_size=4",
    "--config.infd_ldm.sample.num_steps=2",
    "--config.infd_ldm.sample.sizes=(32,)",
    "--config.infd_ldm.sample.num=1",
    "--config.infd_ldm.sample.batch_size=1",
    "--config.total_steps=1",
]


def test_paper_configuration_runs_one_step_of_each_stage(tmp_path):
  """configs/infd.py at paper scale, same code path, only the widths shrunk."""
  w = tmp_path / "ae"
  cmd = main_cmd(w, config="configs/infd.py:lpips=none") + PAPER_TINY
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (w / "infd_ae" / "checkpoints" / "1").is_dir()
  w2 = tmp_path / "ldm"
  cmd = main_cmd(w2, config="configs/infd.py:ldm") + PAPER_TINY
  cmd += [f"--config.infd_ldm.stage1_workdir={w}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (w2 / "infd_ldm" / "checkpoints" / "1").is_dir()


def test_paper_configuration_without_lpips_directory_refuses_to_start(tmp_path):
  cmd = main_cmd(tmp_path / "w", config="configs/infd.py") + PAPER_TINY
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 2
  assert "lpips" in proc.stderr.strip().splitlines()[-1].lower(), proc.stderr[-2000:]


def test_parameter_count_is_the_sum_of_its_parts():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import importlib.util

  import infd_params

  spec = importlib.util.spec_from_file_location("infd_cfg", os.path.join(ROOT, "configs/infd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  counts = infd_params.count(mod.get_config("demo,bottleneck=vq"))
  assert counts["sum_of_parts"] == counts["total"] > 0
  assert all(counts[k] > 0 for k in ("encoder", "codebook", "decoder", "renderer", "latent_unet"))
  # The codebook is exactly num_codes x z_channels.
  assert counts["codebook"] == 256 * 3


def test_demo_stage_steps_and_schedules_are_independent():
  import importlib.util

  spec = importlib.util.spec_from_file_location("infd_cfg", os.path.join(ROOT, "configs/infd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("demo")
  assert (c.infd_ae.total_steps, c.total_steps) == (2000, 1000)
  assert (c.infd_ae.optim.decay_steps, c.infd_ldm.optim.decay_steps) == (2000, 1000)
  c.infd_ae.total_steps = 300  # an override moves stage 1's schedule only
  assert (c.infd_ae.optim.decay_steps, c.total_steps, c.infd_ldm.optim.decay_steps) == (
      300,
      1000,
      1000,
  )
