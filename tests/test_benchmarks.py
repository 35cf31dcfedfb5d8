"""Smoke tests: each benchmark script's main runs end to end at tiny sizes."""

import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common, render_memory, resolution_scaling, step_efficiency  # noqa: E402


def _tiny_config():
  c = common.load_config("demo")
  s1, s2 = c.rapd_stage1, c.rapd_stage2
  s1.enc_size = s1.target_window = 16
  s1.batch_size = 2
  s1.renderer.dim = 8
  s1.encoder.n_resblocks = 1
  s2.batch_size = 2
  s2.dit.update(depth=1, width=16, bottleneck=8, heads=2, repa_block=1)
  s2.text.update(depth=1, width=8, vocab_captions=50)
  s2.sample.num_steps = 2
  s2.sample.tile = 16
  return c


def test_step_efficiency_prints_finite_ratios(capsys):
  # Stage 1 only: the stage-2 step's compile alone would double the test's time.
  out = step_efficiency.main(["--quick", "--stages", "stage1"], config=_tiny_config())
  assert set(out) == {"stage1", "reference"}
  assert all(np.isfinite(v) and v > 0 for v in out.values())
  printed = capsys.readouterr().out
  assert "1024^3 matmul" in printed and "stage1 " in printed


def test_step_efficiency_dit_at_the_reference_shape_reports_its_relative_ratio(capsys):
  out = step_efficiency.main(["--quick", "--stages", "dit_ref"], config=_tiny_config())
  assert set(out) == {"dit_ref", "reference", "dit_ref/reference"}
  assert out["dit_ref/reference"] == out["dit_ref"] / out["reference"] > 0
  assert "of reference, >= 0.9" in capsys.readouterr().out


def test_resolution_scaling_reports_the_three_ratios():
  out = resolution_scaling.main(
      ["--quick", "--factors", "1,2", "--full_baseline_upto", "1", "--reduced_steps", "1"],
      config=_tiny_config(),
  )
  assert set(out) == {"denoise", "render_px", "speedup"}
  assert all(np.isfinite(v) and v > 0 for v in out.values())


@pytest.mark.parametrize("size", [64])
def test_render_memory_child_reports_peak_rss(size):
  out = render_memory.main(["--sizes", str(size), "--paper", "0"])
  assert out[f"demo {size}^2"] > 0


def test_subsampling_reports_finite_ratios_and_the_final_line(capsys):
  import re

  from benchmarks import subsampling

  out = subsampling.main(["--quick", "--rates", "1,2"])
  for key in ("speedup", "memory_reduction"):
    assert set(out[key]) == {1, 2}
    assert all(np.isfinite(v) and v > 0 for v in out[key].values())
  assert out["memory_reduction"][1] == pytest.approx(1.0)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert re.fullmatch(r"subsampling 2x: speedup=[0-9.]+ memory_reduction=[0-9.]+", last), last


def test_kernels_benchmark_says_no_gpu_in_one_line_and_runs_tiny_interpreted(capsys):
  from benchmarks import kernels as kernel_bench
  from infdiff import kernels

  assert kernel_bench.main([]) == 0
  assert capsys.readouterr().out.strip() == (
      "benchmarks.kernels: no GPU here (backend 'cpu'); nothing to time."
  )
  with kernels.interpret(True):
    assert kernel_bench.main(["--tiny", "--repeats", "1"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  rows = [ln.split() for ln in lines[2:]]
  assert "failed:" not in " ".join(lines), lines
  # Every case timed for both implementations; the kernel rows carry the two ratios.
  pallas = [r for r in rows if r[-5] == "pallas"]
  assert len(pallas) == 4 and all(float(x) > 0 for r in pallas for x in r[-4:]), lines


# RaPD stage 2 at demo presets shrunk further: the abstract Qwen3 and DINOv2 (tiny
# config.json files) and the abstract stage-1 run are all in the compiled step.
PAPER_SCALE_TINY = [
    "rapd_stage1.enc_size=16",
    "rapd_stage2.dit.depth=1",
    "rapd_stage2.dit.width=16",
    "rapd_stage2.dit.bottleneck=8",
    "rapd_stage2.dit.heads=2",
    "rapd_stage2.dit.repa_block=1",
    "rapd_stage2.text.max_length=8",
    "rapd_stage2.repa.hidden=16",
]


def test_paper_scale_compiles_a_step_on_abstract_frozen_networks_and_runs(capsys):
  from benchmarks import paper_scale

  sets = [a for s in PAPER_SCALE_TINY for a in ("--set", s)]
  argv = ["--tiny", "--stages", "rapd_stage2", "--devices", "2", "--jobs", "1", *sets]
  (row,) = paper_scale.main(argv)
  assert row["stage"] == "rapd_stage2" and row["mesh"] == (1, 2, 1)
  # Trainable DiT + REPA projector; frozen: the tiny Qwen3 (2 x 32 wide, vocab 64), DINOv2
  # and the stage-1 encoder, none of them loaded from weights.
  assert row["params"] > 1000 and row["frozen"] > 20_000
  assert row["device_flops"] > 0 and row["global_flops"] == 2 * row["device_flops"]
  assert min(row["args"], row["out"], row["temp"]) > 0 and row["peak"] < 2**30
  assert row["fits80"] and row["steps"] == 1500 and row["H100_s"] > 0
  out = capsys.readouterr().out
  assert "so it counts one device" in out
  assert re.search(r"^\| rapd_stage2 \| 2 \| 1x2x1 \| 16 \| float32 \|", out, re.M), out
