"""The seams metric: `boundary_ratio` on synthetic images, and the CLI with a fake
patch-based generator plugged into `runs.load_generator` (no training)."""

import json
import types

import ml_collections
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from infdiff import evaluate, runs
from infdiff.evaluators import METRICS, metric_module, seams
from infdiff.methods import base

P = 8  # patch side of the tests


def _smooth(rng, n, h, w, terms=24):
  """Stationary smooth images: sums of random low-frequency sinusoids, in [0, 1]."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  out = np.zeros([n, h, w, 3], np.float32)
  for i in range(n):
    for c in range(3):
      for _ in range(terms):
        fy, fx = rng.uniform(-0.15, 0.15, 2)  # cycles per pixel: smooth
        out[i, :, :, c] += np.sin(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
  return 0.5 + 0.4 * out / np.abs(out).max()


def _per_patch(rng, n, h, w, rows=True, cols=True, shift=0):
  """[n, h, w, 1] offsets constant on P x P patches (the grid shifted by `shift`)."""
  gy = (np.arange(h) + shift) // P if rows else np.zeros(h, int)
  gx = (np.arange(w) + shift) // P if cols else np.zeros(w, int)
  table = rng.uniform(-1.0, 1.0, [n, gy.max() + 1, gx.max() + 1, 1]).astype(np.float32)
  return table[:, gy][:, :, gx]


# ---------------------------------------------------------------------------------------
# boundary_ratio.


def test_exact_value_on_a_hand_made_row_and_column():
  row = np.array([0.0, 1.0, 3.0, 4.0], np.float32)  # patch 2: the seam pair (1, 3) differs by 2
  img = row[None, None, :, None]  # [1, 1, 4, 1]
  assert seams.boundary_ratio(img, 2) == pytest.approx(2.0, rel=1e-5)
  assert seams.boundary_ratio(img.transpose(0, 2, 1, 3), 2) == pytest.approx(2.0, rel=1e-5)
  # The image border is no boundary: a jump at the last pair counts as 'elsewhere'.
  edge = np.array([0.0, 0.0, 0.0, 1.0], np.float32)[None, None, :, None]
  assert seams.boundary_ratio(edge, 2) < 1e-3


def test_seamless_images_give_about_one():
  rng = np.random.default_rng(0)
  noise = rng.uniform(0, 1, [4, 32, 48, 3]).astype(np.float32)
  assert seams.boundary_ratio(noise, P) == pytest.approx(1.0, abs=0.05)
  assert seams.boundary_ratio(_smooth(rng, 4, 32, 48), P) == pytest.approx(1.0, abs=0.15)
  assert seams.boundary_ratio(np.full([2, 32, 32, 3], 0.3), P) == pytest.approx(1.0)


def test_independent_flat_patches_give_a_huge_ratio():
  rng = np.random.default_rng(1)
  flat = 0.5 + 0.5 * _per_patch(rng, 3, 32, 32) * np.ones(3, np.float32)
  assert seams.boundary_ratio(flat, P) > 1e3


def test_a_constant_offset_per_patch_raises_the_ratio():
  rng = np.random.default_rng(2)
  smooth = _smooth(rng, 4, 32, 32)
  clean = seams.boundary_ratio(smooth, P)
  offset = seams.boundary_ratio(smooth + 0.2 * _per_patch(rng, 4, 32, 32), P)
  assert offset > 1.5 * clean
  # The same offsets off the patch grid are no seams: the ratio drops instead.
  shifted = seams.boundary_ratio(smooth + 0.2 * _per_patch(rng, 4, 32, 32, shift=P // 2), P)
  assert shifted < clean


def test_a_seam_in_one_direction_raises_the_ratio():
  rng = np.random.default_rng(3)
  smooth = _smooth(rng, 4, 32, 32)
  clean = seams.boundary_ratio(smooth, P)
  rows_only = smooth + 0.2 * _per_patch(rng, 4, 32, 32, cols=False)  # seams between rows
  cols_only = smooth + 0.2 * _per_patch(rng, 4, 32, 32, rows=False)
  assert seams.boundary_ratio(rows_only, P) > 1.2 * clean
  assert seams.boundary_ratio(cols_only, P) > 1.2 * clean
  both = smooth + 0.2 * _per_patch(rng, 4, 32, 32)
  assert seams.boundary_ratio(both, P) > seams.boundary_ratio(rows_only, P)


def test_images_without_an_interior_boundary_are_refused():
  with pytest.raises(ValueError, match="no interior boundary"):
    seams.boundary_ratio(np.zeros([1, P, P, 3]), P)
  assert seams.boundary_ratio(np.zeros([1, P, 2 * P, 3]), P) == pytest.approx(1.0)  # one seam
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    seams.boundary_ratio(np.zeros([32, 32, 3]), P)
  with pytest.raises(ValueError, match=">= 2"):
    seams.boundary_ratio(np.zeros([1, 32, 32, 3]), 1)


# ---------------------------------------------------------------------------------------
# The CLI with a fake patch-based generator.


class _PatchGen(base.Generator):
  """Unconditional stand-in: collage='none' draws independent flat patches, anything
  else seamless smooth images."""

  native_size = (P, P)

  def __init__(self, options, patch=P, samplers=None):
    self.options = dict(options)
    if patch is not None:
      self.patch_size = patch
    if samplers is not None:
      self.seam_samplers = samplers

  def iter_sample(self, conditions, num, seed, sizes):
    conditions = self.check_conditions(conditions)
    n = len(conditions) * num
    for w, h in sizes:
      rng = np.random.default_rng(seed)
      if self.options.get("collage") == "none":
        colours = rng.uniform(0, 1, [n, h // P, w // P, 3]).astype(np.float32)
        yield (w, h), np.repeat(np.repeat(colours, P, axis=1), P, axis=2)
      else:
        yield (w, h), _smooth(rng, n, h, w, terms=8)


SAMPLERS = {"collage": {"collage": "feature"}, "independent": {"collage": "none"}}


@pytest.fixture
def workdir(tmp_path):
  """A run directory with a config (held-out data: shapes) and no checkpoint."""
  stage = tmp_path / "run" / "rapd_stage2"
  stage.mkdir(parents=True)
  config = {"stages": ["rapd_stage2"], "data": {"source": "shapes", "shapes_size": 32}}
  (stage / "config.json").write_text(json.dumps(config))
  return tmp_path / "run"


@pytest.fixture
def fake_runs(monkeypatch):
  """Plugs a fake generator into runs.load_generator; returns the calls it receives."""
  calls = []
  spec = {"patch": P, "samplers": SAMPLERS}

  def load_generator(path, purpose="sampling", step=None, **options):
    calls.append({"path": str(path), "purpose": purpose, "step": step, "options": options})
    return _PatchGen(options, patch=spec["patch"], samplers=spec["samplers"])

  monkeypatch.setattr(runs, "load_generator", load_generator)
  return types.SimpleNamespace(calls=calls, spec=spec)


def _main(workdir, *sizes, options=(), **flag_values):
  """`python -m infdiff.evaluate --metric=seams ...` in process (the fake needs that). The
  CLI's flags are defined for the call and removed after it, so that other CLIs imported
  later in this process can define the same names."""
  before = set(flags.FLAGS)
  evaluate.define_flags()
  try:
    with flagsaver.flagsaver(
        workdir=str(workdir),
        metric="seams",
        size=list(sizes),
        sampler_option=list(options),
        **flag_values,
    ):
      return evaluate.main(["evaluate"])
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)


def _one_line_error(capsys, fn):
  with pytest.raises(SystemExit) as e:
    fn()
  assert e.value.code == 2
  lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_registered():
  assert METRICS["seams"] == "seams" and metric_module("seams") is seams
  assert seams.NEEDS == base.GENERATOR


def test_cli_rows_per_sampler_and_json(workdir, fake_runs, capsys):
  assert _main(workdir, options=["num_steps=3"], num=2, seed=1) == 0
  out = capsys.readouterr().out
  assert out.split()[:3] == ["seams", "boundary_ratio", "swd"]
  assert "wrote " in out
  # First the run's generator (patch_size, seam_samplers), then one load per sampler,
  # each with its own options on top of --sampler_option.
  assert [c["options"] for c in fake_runs.calls] == [
      {"num_steps": 3},
      {"num_steps": 3, "collage": "feature"},
      {"num_steps": 3, "collage": "none"},
  ]
  assert all(c["purpose"] == "--metric=seams" for c in fake_runs.calls)
  res = json.loads((workdir / "eval" / "seams.json").read_text())
  assert res["metric"] == "seams" and res["columns"] == ["boundary_ratio", "swd"]
  assert list(res["rows"]) == ["collage", "independent"]
  assert res["sizes"] == ["32x32"] and res["patch_size"] == P  # default: 4 x 4 patches
  assert res["num_images"] == 2 and res["seed"] == 1 and res["data"] == "shapes"
  assert res["sampler_options"]["independent"] == {"num_steps": 3, "collage": "none"}
  collage, independent = res["rows"]["collage"], res["rows"]["independent"]
  assert collage["boundary_ratio"] == pytest.approx(1.0, abs=0.3)
  assert independent["boundary_ratio"] > 1e3
  assert collage["swd"] > 0 and independent["swd"] > 0


def test_several_sizes_name_rows_by_size(workdir, fake_runs):
  args = evaluate.make_args(str(workdir), "seams", ["32x32", "32x16", "32x32"], num=2)
  result, path = evaluate.run(args)
  assert list(result.rows) == [
      "collage@32x32",
      "collage@32x16",
      "independent@32x32",
      "independent@32x16",
  ]
  assert json.loads(open(path).read())["sizes"] == ["32x32", "32x16"]
  assert "seams/independent@32x16/boundary_ratio" in result.scalars()


def test_without_seam_samplers_one_default_row(workdir, fake_runs):
  fake_runs.spec["samplers"] = None
  result, _ = evaluate.run(evaluate.make_args(str(workdir), "seams", ["16x32"], num=2))
  assert list(result.rows) == ["default"] and set(result.rows["default"]) == {
      "boundary_ratio",
      "swd",
  }
  assert len(fake_runs.calls) == 1  # the run's generator is the one row


def test_size_off_the_patch_grid_is_one_line(workdir, fake_runs, capsys):
  line = _one_line_error(capsys, lambda: _main(workdir, "36x32", num=2))
  assert "multiples of the patch size 8" in line and "32x32" in line
  assert "8x8" in _one_line_error(capsys, lambda: _main(workdir, "8x8", num=2))  # too small
  assert not (workdir / "eval" / "seams.json").exists()


def test_generator_without_patch_size_is_one_line(workdir, fake_runs, capsys):
  fake_runs.spec["patch"] = None
  line = _one_line_error(capsys, lambda: _main(workdir, num=2))
  assert "needs a patch-based generator (one with a patch_size)" in line
  assert str(workdir) in line and line.endswith("has none")


def test_sampler_option_set_by_a_sampler_is_one_line(workdir, fake_runs, capsys):
  line = _one_line_error(capsys, lambda: _main(workdir, options=["collage=shift"], num=2))
  assert "--sampler_option=collage" in line


def test_periodic_evaluator_scores_the_training_sampler():
  gen = _PatchGen({"collage": "none"})
  method = types.SimpleNamespace(
      provides=(base.GENERATOR,), stage="patch_dm", inference=lambda params, aux: gen
  )
  ctx = types.SimpleNamespace(
      method=method,
      state=types.SimpleNamespace(ema=None, params={}),
      aux=None,
      config=ml_collections.ConfigDict({"data": {"source": "shapes", "shapes_size": 32}}),
  )
  ev = seams.Evaluator(ml_collections.ConfigDict({"every": 1, "num": 2, "sizes": [32]}))
  scalars = ev.run(ctx, step=1)
  assert set(scalars) == {"seams/default/boundary_ratio", "seams/default/swd"}
  assert scalars["seams/default/boundary_ratio"] > 1e3
