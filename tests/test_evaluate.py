"""The evaluation CLI and evaluators on one tiny finished RaPD run (trained with config.evals)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_stage2 import TINY

from infdiff.methods import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A config file that adds periodic evaluators to the demo preset (the locked config does
# not accept new keys from the command line).
EVAL_CONFIG = """
import importlib.util
import ml_collections

_spec = importlib.util.spec_from_file_location("rapd_config", {rapd!r})
_rapd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rapd)


def get_config(arg=None):
  c = _rapd.get_config(arg)
  c.evals = ml_collections.ConfigDict(dict(
      recon=dict(metric="recon", stage="rapd_stage1", every=2, num=2),
      shapes=dict(metric="shapes_eval", stage="rapd_stage2", every=4, num=1, sizes=(16, 32)),
  ))
  return c
"""


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per subprocess: faster start
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp("evalrun")
  cfg = base / "rapd_evals.py"
  cfg.write_text(EVAL_CONFIG.format(rapd=os.path.join(ROOT, "configs", "rapd.py")))
  w = base / "run"
  cmd = [sys.executable, "-m", "infdiff.main", f"--config={cfg}:demo", f"--workdir={w}"]
  proc = subprocess.run(cmd + TINY, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return w


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  from infdiff.pretrained import testing

  return testing.write_tiny("inception_fid", tmp_path_factory.mktemp("inception"))


def _evaluate(w, *extra):
  cmd = [sys.executable, "-m", "infdiff.evaluate", f"--workdir={w}", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)


def _run_in_process(w, metric, *sizes, **kw):
  """The CLI's library path (flag values -> validated args -> metric -> JSON)."""
  from infdiff import evaluate

  result, path = evaluate.run(evaluate.make_args(str(w), metric, sizes, **kw))
  with open(path) as f:
    return result, json.load(f)


def test_training_logs_evaluator_scalars(run_dir):
  log = (run_dir / "train.log").read_text()
  # recon every 2 of 4 steps in stage 1, ShapesEval at the end of stage 2.
  assert log.count("[rapd_stage1] eval at step") == 2
  assert "recon/4x/model_psnr" in log and "recon/2x/bicubic_ssim" in log
  assert "[rapd_stage2] eval at step 4" in log and "shapes_eval/overall/32x32" in log
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "rapd_stage1"))


def test_recon_cli_table_and_json(run_dir):
  proc = _evaluate(run_dir, "--metric=recon", "--num=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  header = lines[0].split()
  assert header[:5] == ["recon", "model_psnr", "model_ssim", "bicubic_psnr", "bicubic_ssim"]
  assert [ln.split()[0] for ln in lines[1:4]] == ["1x", "2x", "4x"]
  out = json.loads((run_dir / "eval" / "recon.json").read_text())
  assert out["metric"] == "recon" and out["num_images"] == 2 and out["data"] == "shapes"
  assert list(out["rows"]) == ["1x", "2x", "4x"]
  for row in out["rows"].values():
    assert set(row) == {"model_psnr", "model_ssim", "bicubic_psnr", "bicubic_ssim"}
    assert 0.0 < row["model_psnr"] < 100.0 and -1.0 <= row["model_ssim"] <= 1.0
  # At 1x the baseline is the encoder input itself: infinite PSNR is stored as null.
  assert out["rows"]["1x"]["bicubic_psnr"] is None
  assert out["rows"]["1x"]["bicubic_ssim"] == pytest.approx(1.0)
  # Upsampling loses detail, so the baseline gets worse with scale.
  assert out["rows"]["4x"]["bicubic_psnr"] < out["rows"]["2x"]["bicubic_psnr"]


def test_generation_and_consistency_metrics_write_json(run_dir):
  res, out = _run_in_process(run_dir, "scale_consistency", num=2)
  assert list(out["rows"]) == ["2x", "4x"] and set(out["rows"]["2x"]) == {"psnr", "min_psnr"}
  assert out["rows"]["2x"]["min_psnr"] <= out["rows"]["2x"]["psnr"]

  res, out = _run_in_process(run_dir, "shapes_eval", "16x16", "32x24", num=1)
  assert list(out["rows"]) == [
      "single_object",
      "two_object",
      "counting",
      "colors",
      "position",
      "color_attr",
      "overall",
  ]
  assert out["columns"] == ["16x16", "32x24"] and out["num_images"] == 6
  for size in out["columns"]:
    accs = [out["rows"][c][size] for c in out["rows"] if c != "overall"]
    assert all(a in (0.0, 1.0) for a in accs)  # one image per category
    assert out["rows"]["overall"][size] == pytest.approx(np.mean(accs))

  res, out = _run_in_process(run_dir, "swd", "32x32", num=3)
  assert list(out["rows"]) == ["swd_32", "swd_16", "swd_mean"]
  assert out["rows"]["swd_mean"]["32x32"] > 0
  assert "swd/swd_mean/32x32" in res.scalars()


def test_fid_family_cli_and_cache(run_dir, inception, tmp_path):
  from infdiff.pretrained import testing

  _, out = _run_in_process(run_dir, "fid", "32x32", num=4, inception=inception)
  assert out["rows"]["fid"]["32x32"] > 0
  cache = run_dir / "eval" / "ref_fid_shapes_32x32.npz"
  assert cache.exists()
  stamp = cache.stat().st_mtime_ns
  _run_in_process(run_dir, "fid", "32x32", num=4, inception=inception)
  assert cache.stat().st_mtime_ns == stamp  # reused
  _run_in_process(run_dir, "fid", "32x32", num=3, inception=inception)
  assert cache.stat().st_mtime_ns != stamp  # other num: recomputed

  _, out = _run_in_process(run_dir, "pfid", "32x32", num=2, inception=inception, patch=16)
  assert out["patch"] == 16 and out["rows"]["pfid"]["32x32"] > 0
  clip = testing.write_tiny("clip", tmp_path / "clip")
  _, out = _run_in_process(run_dir, "fid_clip", "32x32", num=3, clip=clip)
  assert out["rows"]["fid_clip"]["32x32"] > 0
  assert (run_dir / "eval" / "ref_fid_clip_shapes_32x32.npz").exists()


class _RealImages(base.LatentGenerator):
  """A generator stand-in whose 'samples' are the held-out images themselves."""

  conditional = True
  native_size = (32, 32)

  def __init__(self, source):
    self.source = source

  def latents(self, conditions, num=1, seed=0):
    del seed
    return np.arange(len(conditions) * num)

  def render(self, z, h, w):
    from infdiff.evaluators import common

    return np.stack([common.full_image(self.source, int(i), h, w) for i in z])


@pytest.mark.parametrize("metric", ["fid", "pfid"])
def test_fid_of_a_set_against_itself_is_zero(run_dir, inception, tmp_path, metric):
  from infdiff.evaluators import common, fid

  source = common.held_out_source(common.run_data_config(str(run_dir)))
  net = fid.FeatureNet(metric, inception)
  kw = dict(num=6, sizes=[(32, 32)], patch=16, crops=2, cache_dir=str(tmp_path))
  same = fid.evaluate(metric, _RealImages(source), source, net, **kw).rows[metric]["32x32"]
  from infdiff import runs

  gen = runs.load_generator(str(run_dir))
  other = fid.evaluate(metric, gen, source, net, **kw).rows[metric]["32x32"]
  assert abs(same) < 1e-4 * other
  assert other > 0


def _one_line_error(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  return lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--metric=psnr"], "unknown metric"),
        (["--metric=swd", "--size=64"], "size"),
        (["--metric=recon", "--size=64x64"], "--size"),
        (["--metric=swd", "--size=66x66"], "divisible"),
        (["--metric=fid"], "--inception"),
        (["--metric=fid_clip", "--size=32x32"], "--clip"),
    ],
)
def test_cli_misuse_exits_2_with_one_line(run_dir, args, needle):
  assert needle in _one_line_error(_evaluate(run_dir, *args))


def test_cli_missing_checkpoint_exits_2(tmp_path):
  (tmp_path / "empty").mkdir()
  assert "no " in _one_line_error(_evaluate(tmp_path / "empty", "--metric=recon"))
  line = _one_line_error(_evaluate(tmp_path / "nothing", "--metric=scale_consistency"))
  assert "nothing" in line


def test_held_out_split_falls_back_to_all_for_tiny_folders():
  from infdiff.data.pipeline import default_data_config
  from infdiff.evaluators import common

  # The 9 built-in photos hold none out at the default eval fraction.
  src = common.held_out_source(common.with_source(default_data_config(), "photos"))
  assert len(src) == 9


def test_recon_crops_cycle_over_a_small_held_out_folder(tmp_path):
  from PIL import Image

  from infdiff.data import sources
  from infdiff.evaluators import recon

  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  source = sources.folder_source(str(tmp_path), split="all", eval_fraction=0.0)
  assert len(source) == 1
  out = recon.crops(source, 3, 64, seed=0)
  assert out.shape == (3, 64, 64, 3)
  # Three positions in the one image, not three copies of one crop.
  assert np.abs(out[0] - out[1]).max() > 0.1 and np.abs(out[1] - out[2]).max() > 0.1


@pytest.mark.parametrize(
    "keep, metric, needle",
    [
        ("rapd_stage2", "recon", "autoencoder"),
        ("rapd_stage2", "scale_consistency", "autoencoder"),
        ("rapd_stage1", "shapes_eval", "generator"),
        ("rapd_stage1", "swd", "generator"),
    ],
)
def test_a_metric_that_does_not_apply_names_what_it_needs(run_dir, tmp_path, keep, metric, needle):
  import shutil

  only = tmp_path / f"only_{keep}"
  shutil.copytree(run_dir / keep, only / keep)
  line = _one_line_error(_evaluate(only, f"--metric={metric}"))
  assert needle in line and metric in line and keep in line, line


def test_contracts_from_a_run_directory(run_dir):
  from infdiff import runs

  ae = runs.load_autoencoder(str(run_dir))
  assert isinstance(ae, base.FieldAutoencoder)
  gen = runs.load_generator(str(run_dir))
  assert isinstance(gen, base.LatentGenerator) and gen.conditional
  # A stage directory works as well as the run directory, and its root is the run.
  assert runs.run_root(str(run_dir / "rapd_stage1")) == os.path.normpath(str(run_dir))
  r = ae.input_size[0]
  x = np.random.default_rng(0).uniform(size=(11, r, r, 3)).astype(np.float32)
  z = ae.encode(x)  # 11 images through fixed-size chunks
  assert z.shape[:3] == (11, r, r)
  img = ae.render(z, 2 * r, 3 * r)  # [N, H, W, 3] for (height, width)
  assert img.shape == (11, 2 * r, 3 * r, 3)
  # Streaming over latents in chunks gives what rendering each latent alone gives.
  one = ae.render(z[7:8], 2 * r, 3 * r)
  np.testing.assert_allclose(img[7:8], one, atol=1e-5)
  with pytest.raises(ValueError, match="takes"):
    ae.encode(x[:, :-1])
  with pytest.raises(ValueError, match="no option"):
    runs.load_generator(str(run_dir), no_such_option=1)


def _script(name):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_trajectory_from_t0_1_scores_the_reconstructions(run_dir, capsys):
  """t0 = 1 starts at the data latent itself: the score is that of the reconstructions."""
  from infdiff import runs
  from infdiff.data import shapes
  from infdiff.evaluators import shapes_detector

  _script("rapd_trajectory").main([f"--workdir={run_dir}", "--num=2", "--cfg=4", "--t0=0,1"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
  assert [(float(r[0]), float(r[1])) for r in rows] == [(4.0, 0.0), (4.0, 1.0)]
  ae = runs.load_autoencoder(str(run_dir))
  r = ae.input_size[0]
  prompts = shapes.eval_prompts(2)
  gt = np.stack([shapes.render_scene(s, r, r) for _, _, s in prompts])
  rec = np.clip(ae.render(ae.encode(gt), r, r), 0.0, 1.0)
  assert float(rows[1][-1]) == pytest.approx(
      shapes_detector.shapes_eval(list(rec), prompts)["overall"], abs=1e-3
  )


def test_caption_coverage_of_the_shapes_vocabulary(run_dir, capsys):
  _script("caption_coverage").main([f"--workdir={run_dir}", "--num=2", "--captions=300"])
  out = capsys.readouterr().out
  assert "missing from the vocabulary: none" in out
  assert "all 28 possible: 28" in out


def test_result_json_round_trip():
  from infdiff.evaluators import common

  r = common.Result("m", {"a": {"x": 1.5, "y": float("inf")}}, {"num": 3}, "note")
  back = common.Result.from_json(json.loads(json.dumps(r.to_json())))
  assert back.metric == "m" and back.meta == {"num": 3} and back.note == "note"
  assert back.rows["a"]["x"] == 1.5 and np.isnan(back.rows["a"]["y"])  # inf is stored as null


class _DrawsGenerator:
  """A stand-in generator: each sample is one object of `draw(prompted class)`, red."""

  conditional = True

  def __init__(self, draw):
    self.draw = draw

  def latents(self, captions, seed=0):
    del seed
    return [c.split()[-1] for c in captions]

  def render(self, z, h, w):
    from infdiff.data import shapes

    scenes = [
        {
            "background": [0.85, 0.85, 0.85],
            "objects": [
                {"class": self.draw(c), "colour": "red", "centre": [0.1, -0.2], "size": 0.4}
            ],
        }
        for c in z
    ]
    return np.stack([shapes.render_scene(s, h, w) for s in scenes])


def test_class_confusion_known_answers():
  mod = _script("shapes_class_confusion")
  right = mod.confusion(_DrawsGenerator(lambda c: c), num=3, colour="red", size=32)
  for cls, row in right.items():
    assert row[cls] == 3 and sum(row.values()) == 3
  circles = mod.confusion(_DrawsGenerator(lambda c: "circle"), num=2, colour="red", size=32)
  assert all(row["circle"] == 2 and sum(row.values()) == 2 for row in circles.values())
  missing = mod.confusion(_DrawsGenerator(lambda c: c), num=2, colour="blue", size=32)
  assert all(row["missing"] == 2 for row in missing.values())
  with pytest.raises(ValueError, match="unknown colour"):
    mod.confusion(_DrawsGenerator(lambda c: c), num=1, colour="pink", size=32)
