"""Stage-1 train step in the official LIIF training setting, for a side-by-side timing.

Builds, through the trainer (`infdiff.train.make_train_step` under jit with a donated
state), the stage-1 step of `configs/rapd.py:demo,renderer=liif` set to the networks of
LIIF's `train_edsr-baseline-liif` configuration:

  encoder   EDSR-baseline, 64 features x 16 residual blocks, no upsampler (no latent conv)
  renderer  LIIF MLP 4 x 256, local ensemble and cell decoding, feature unfolding off,
            no residual base
  data      batch 16 of 48^2 inputs, 48 x 48 = 2304 queries per image
  loss      L1, Adam; no LPIPS, no distillation

and prints its parameter count, seconds per step and FLOP/s as a ratio to a float32
1024^3 matmul timed in the same run (benchmarks/common.paired_rate). The official PyTorch
code in that setting takes 3.6-3.8 s per step on the 2-core CPU these numbers were taken on
(torch 2.13, 2 threads; benchmarks/README.md); run it beside this script to compare on
another machine.

Usage: python -m benchmarks.liif_step [--repeats 5] [--steps 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np

from benchmarks import common

PEER_PARAMS = 1_436_251  # the official LIIF edsr-baseline model (torch parameter count)


def liif_config(quick: bool = False):
  """configs/rapd.py:demo,renderer=liif with LIIF's edsr-baseline training setting."""
  config = common.load_config("demo,renderer=liif")
  s1 = config.rapd_stage1
  s1.encoder.features, s1.encoder.n_resblocks = (8, 1) if quick else (64, 16)
  s1.encoder.latent_channels = None  # EDSR-baseline without its upsampler: 64 channels
  s1.renderer.hidden = (16,) * 2 if quick else (256,) * 4
  s1.renderer.unfold = False
  s1.renderer.rgb_base = "none"
  s1.enc_size = s1.target_window = 8 if quick else 48
  s1.batch_size = 2 if quick else 16
  s1.lpips_weight = 0.0
  s1.distill.weight = 0.0
  s1.smooth_weight = 0.0
  s1.dtype = "float32"
  return config


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=5, help="timed repeats (ratio per repeat)")
  ap.add_argument("--steps", type=int, default=2, help="steps per repeat")
  ap.add_argument("--quick", action="store_true", help="tiny networks (smoke test)")
  args = ap.parse_args(argv)
  common.header("LIIF edsr-baseline stage-1 step (official setting) vs matmul")
  config = liif_config(args.quick)
  with tempfile.TemporaryDirectory() as tmp:
    method = common.stage1_method(config, tmp)
    bench = common.StepBench(method, config, common.stage1_batch(config.rapd_stage1))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(bench.state.params))
    flops = bench.flops()
    r = common.paired_rate(lambda: bench.run(args.steps), flops * args.steps, args.repeats)
  sec = r["seconds"] / args.steps
  print(f"parameters {params:,} (official LIIF edsr-baseline: {PEER_PARAMS:,})")
  print(
      f"seconds/step {sec:.3f} | GFLOP/step {flops / 1e9:.2f} | GFLOP/s {r['rate'] / 1e9:.1f} "
      f"| matmul GFLOP/s {r['mm_rate'] / 1e9:.1f} | ratio {r['ratio']:.2f}"
  )
  return {"seconds": sec, "ratio": r["ratio"], "params": params}


if __name__ == "__main__":
  main()
