"""Host malloc settings (infdiff/host_malloc.py): train-step time and page faults, off vs on.

    python -m benchmarks.host_malloc [--preset long] [--steps 10] [--rounds 2] [--quick]

Each measurement is a fresh subprocess (the settings must be in place before the JAX
backend starts) that builds the real jitted, donated RaPD stage-1 and stage-2 train steps
(`common.demo_runs` at the preset's sizes, freshly initialised parameters) and times
`--steps` steps after a warm-up, reading its own minor page faults and user / system CPU
time around them. Subprocesses alternate off, on, off, on, ... (`--rounds` pairs) and the
table gives medians and the ratios off / on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common


def _config(preset: str):
  """configs/rapd.py:<preset>, or 'tiny': the demo at smoke-test sizes."""
  if preset != "tiny":
    return common.load_config(preset)
  c = common.load_config("demo")
  s1, s2 = c.rapd_stage1, c.rapd_stage2
  s1.update(enc_size=16, target_window=16, batch_size=2)
  s1.renderer.dim, s1.encoder.n_resblocks = 8, 1
  s2.batch_size = 2
  s2.dit.update(depth=1, width=16, bottleneck=8, heads=2, repa_block=1)
  s2.text.update(depth=1, width=8, vocab_captions=50)
  return c


def _child(preset: str, steps: int, stages: list[str]) -> dict:
  from infdiff import host_malloc

  applied = host_malloc.configure()  # first: before anything starts the JAX backend
  import jax

  config = _config(preset)
  out = {"applied": applied, "backend": jax.default_backend()}
  with tempfile.TemporaryDirectory() as tmp:
    config, s1, m2 = common.demo_runs(tmp, config, stage1_step="stage1" in stages)
    s2 = common.StepBench(m2, config, common.stage2_batch(m2))
    for name, bench in (("stage1", s1), ("stage2", s2)):
      if name not in stages:
        continue
      bench.run(2)  # compile and warm up
      r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      bench.run(steps)
      r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      out[name] = {
          "seconds": (t1 - t0) / steps,
          "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
          "sys_share": (r1.ru_stime - r0.ru_stime)
          / max(r1.ru_stime - r0.ru_stime + r1.ru_utime - r0.ru_utime, 1e-9),
      }
  out["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return out


def measure(mode: str, preset: str, steps: int, stages: list[str]) -> dict:
  """One fresh subprocess with INFDIFF_HOST_MALLOC=mode; its JSON result."""
  env = dict(os.environ, INFDIFF_HOST_MALLOC=mode, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.host_malloc", "--child", f"--preset={preset}"]
  cmd += [f"--steps={steps}", f"--stages={','.join(stages)}"]
  res = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True, check=False)
  if res.returncode:
    raise RuntimeError(f"benchmark subprocess failed: {res.stderr.strip().splitlines()[-1:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="long", help="configs/rapd.py preset whose sizes are timed")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per stage and subprocess")
  ap.add_argument("--stages", default="stage1,stage2", help="train steps to time")
  ap.add_argument("--rounds", type=int, default=2, help="off/on subprocess pairs")
  ap.add_argument(
      "--quick", action="store_true", help="tiny sizes, stage 2, 2 steps, 1 round (smoke test)"
  )
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.quick:
    args.preset, args.steps, args.rounds, args.stages = "tiny", 2, 1, "stage2"
  stages = args.stages.split(",")
  if args.child:
    print(json.dumps(_child(args.preset, args.steps, stages)), flush=True)
    return {}

  common.header(f"host malloc settings off / on ({args.preset} sizes, {os.cpu_count()} cores)")
  runs = {"off": [], "on": []}
  for _ in range(args.rounds):
    for mode in ("off", "on"):
      runs[mode].append(measure(mode, args.preset, args.steps, stages))
  if not all(r["applied"] for r in runs["on"]):
    print("the settings could not be applied here (not glibc?); nothing to compare")
    return {}
  ratios = {}
  print(f"{'step':8s} {'mode':4s} {'s/step':>8s} {'faults/step':>12s} {'sys share':>10s}")
  for stage in stages:
    med = {}
    for mode in ("off", "on"):
      med[mode] = {
          k: statistics.median(r[stage][k] for r in runs[mode]) for k in runs[mode][0][stage]
      }
      m = med[mode]
      print(f"{stage:8s} {mode:4s} {m['seconds']:8.3f} {m['faults']:12.0f} {m['sys_share']:10.2f}")
    ratios[stage] = med["off"]["seconds"] / med["on"]["seconds"]
    print(
        f"{stage}: speed-up off/on {ratios[stage]:.2f}x, page faults off/on "
        f"{med['off']['faults'] / max(med['on']['faults'], 1.0):.0f}x"
    )
  rss = {m: max(r["max_rss_gib"] for r in runs[m]) for m in runs}
  print(f"peak RSS: off {rss['off']:.2f} GiB, on {rss['on']:.2f} GiB")
  return ratios


if __name__ == "__main__":
  main()
