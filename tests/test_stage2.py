"""RaPD end to end on a tiny config: both stages, the sample CLI, size-independent denoising."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    *tiny.STAGE1,
    *tiny.steps(4),
    "--config.log_every=2",
    "--config.checkpoint_every=4",
    "--config.rapd_stage2.batch_size=4",
    "--config.rapd_stage2.dit.depth=1",
    "--config.rapd_stage2.dit.width=32",
    "--config.rapd_stage2.dit.bottleneck=16",
    "--config.rapd_stage2.dit.heads=2",
    "--config.rapd_stage2.dit.repa_block=1",
    "--config.rapd_stage2.text.depth=1",
    "--config.rapd_stage2.text.width=16",
    "--config.rapd_stage2.text.vocab_captions=200",
    "--config.rapd_stage2.sample.num_steps=3",
    "--config.rapd_stage2.sample.batch_size=2",
    "--config.rapd_stage2.sample.tile=32",
    "--config.rapd_stage2.sample.max_size=1024",
    "--config.rapd_stage2.sample.sizes=(16,32)",
]


_env = tiny.subprocess_env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("rapd")
  cmd = [sys.executable, "-m", "infdiff.main", "--config=configs/rapd.py:demo", f"--workdir={w}"]
  proc = subprocess.run(cmd + TINY, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return w


def _sample(w, out, *extra):
  cmd = [sys.executable, "-m", "infdiff.sample", f"--workdir={w}", f"--out={out}", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)


def test_demo_writes_sample_grids(run_dir):
  for s in (16, 32):
    assert (run_dir / "samples" / f"grid_{s}x{s}.png").exists()
  assert (run_dir / "rapd_stage2" / "vocab.json").exists()


def test_sample_cli_same_seed_gives_identical_files(run_dir, tmp_path):
  args = [
      "--prompt=a red circle",
      "--prompt=",
      "--size=16x16",
      "--size=40x24",
      "--num=2",
      "--seed=3",
  ]
  digests = []
  for k in range(2):
    out = tmp_path / f"o{k}"
    proc = _sample(run_dir, out, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert names == sorted(f"{i:03d}_{s}.png" for s in ("16x16", "40x24") for i in range(4))
    digests.append({n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names})
  assert digests[0] == digests[1]
  from PIL import Image

  assert Image.open(tmp_path / "o0" / "000_40x24.png").size == (40, 24)
  # Different seeds differ.
  proc = _sample(run_dir, tmp_path / "o2", *args[:-1], "--seed=4")
  assert proc.returncode == 0
  other = hashlib.sha256((tmp_path / "o2" / "000_16x16.png").read_bytes()).hexdigest()
  assert other != digests[0]["000_16x16.png"]


@pytest.mark.parametrize("size", ["0x16", "16", "-4x4", "axb", "4096x16"])
def test_sample_cli_bad_size_exits_2(run_dir, tmp_path, size):
  proc = _sample(run_dir, tmp_path / "o", "--prompt=a red circle", f"--size={size}")
  assert proc.returncode == 2
  lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "size" in lines[0]


def test_sample_cli_missing_checkpoint_exits_2(tmp_path):
  proc = _sample(tmp_path / "nothing", tmp_path / "o", "--size=16x16")
  assert proc.returncode == 2
  lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_denoiser_cost_does_not_depend_on_output_size(run_dir):
  from infdiff import runs

  gen = runs.load_generator(str(run_dir))
  gen.instrument = True
  counts = []
  for size in (64, 512):
    before = gen.denoiser_calls
    z = gen.latents(["a red circle"], seed=0)
    img = gen.render(z, size, size)
    assert img.shape == (1, size, size, 3) and np.isfinite(img).all()
    counts.append(gen.denoiser_calls - before)
  assert gen.trace_count == 1
  assert counts[0] == counts[1] == gen.num_steps


def test_stage2_with_qwen3_text_and_repa_through_the_ports(run_dir, tmp_path):
  """The paper path: frozen Qwen3 text encoder and REPA on DINOv2, tiny random weights."""
  import json

  import flax.linen as nn
  import jax
  import ml_collections

  from infdiff.methods.rapd.stage2 import Method
  from infdiff.pretrained import testing

  qwen = testing.write_tiny_qwen3(str(tmp_path / "qwen3"))
  dino = testing.write_tiny_dinov2(str(tmp_path / "dino"))
  c = ml_collections.ConfigDict(json.loads((run_dir / "rapd_stage2" / "config.json").read_text()))
  s = c.rapd_stage2
  s.stage1_workdir = str(run_dir)
  s.text.encoder, s.text.path, s.text.max_length = "qwen3", qwen, 8
  s.repa.weight, s.repa.teacher_path, s.repa.hidden = 0.5, dino, 16
  m = Method(c, "rapd_stage2", str(tmp_path / "s2"))
  assert not m.text.encoder.trainable
  ids, mask = m.text.tokenize_batch(["a red circle", "a blue square and a green triangle"])
  assert ids.shape == (2, 8) and mask.sum(1).min() > 0
  r = m.latent_size
  batch = {
      "image": np.random.default_rng(0).random((2, r, r, 3), np.float32),
      "text_ids": ids,
      "text_mask": mask,
  }
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  assert "text" not in params["model"] and "repa" in params["model"]
  loss, metrics = m.loss("model", params, m.prepare(None), batch, jax.random.PRNGKey(1), 0)
  assert np.isfinite(float(loss)) and -1.0 <= float(metrics["repa"]) <= 1.0
  assert float(loss) == pytest.approx(float(metrics["flow"] + 0.5 * metrics["repa"]), rel=1e-5)


def test_stage2_repa_on_the_shapes_semantic_target(run_dir, tmp_path):
  """REPA without weights: the data pipeline adds per-token scene semantics as the target."""
  import json

  import flax.linen as nn
  import jax
  import ml_collections

  from infdiff.data import shapes
  from infdiff.methods.rapd.stage2 import Method

  c = ml_collections.ConfigDict(json.loads((run_dir / "rapd_stage2" / "config.json").read_text()))
  s = c.rapd_stage2
  s.stage1_workdir = str(run_dir)
  s.repa.weight, s.repa.target, s.repa.hidden = 0.5, "shapes", 16
  m = Method(c, "rapd_stage2", str(tmp_path / "s2"))
  src = shapes.ShapesSource(size=64, num_scenes=4)
  fn = m.data_transform("train")
  recs = [fn(src[i], np.random.default_rng(i), np.random.default_rng(0)) for i in range(2)]
  g = m.latent_size // s.dit.patch
  assert recs[0]["semantic"].shape == (g, g, shapes.SEMANTIC_DIM)
  np.testing.assert_allclose(
      recs[1]["semantic"], shapes.semantic_map(src.scene(1), g), rtol=0, atol=0
  )
  batch = {
      k: np.stack([r[k] for r in recs]) for k in ("image", "text_ids", "text_mask", "semantic")
  }
  params = {"model": nn.unbox(m.init(jax.random.PRNGKey(0), batch)["model"])}
  assert params["model"]["repa"]["fc3"]["kernel"].shape[-1] == shapes.SEMANTIC_DIM
  loss, metrics = m.loss("model", params, m.prepare(None), batch, jax.random.PRNGKey(1), 0)
  assert -1.0 <= float(metrics["repa"]) <= 1.0
  assert float(loss) == pytest.approx(float(metrics["flow"] + 0.5 * metrics["repa"]), rel=1e-5)
  # Foreground weighting: the same features and targets, tokens weighted by object coverage.
  s.repa.foreground = True
  m_fg = Method(c, "rapd_stage2", str(tmp_path / "s2fg"))
  _, fg = m_fg.loss("model", params, m_fg.prepare(None), batch, jax.random.PRNGKey(1), 0)
  assert float(fg["flow"]) == pytest.approx(float(metrics["flow"]), rel=1e-6)
  assert abs(float(fg["repa"]) - float(metrics["repa"])) > 1e-4
  s.repa.target = "dinov2"
  with pytest.raises(ValueError, match="foreground=True needs"):
    Method(c, "rapd_stage2", str(tmp_path / "s2c"))
  s.repa.target = "shapes"
  c.data.source = "photos"
  with pytest.raises(ValueError, match="needs data.source=shapes"):
    Method(c, "rapd_stage2", str(tmp_path / "s2b"))
