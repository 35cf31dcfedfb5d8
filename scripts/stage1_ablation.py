r"""RaPD stage-1 renderer ablation: the same recipe with each renderer, one table.

Trains stage 1 of `configs/rapd.py:<preset>,renderer=<name>` for every renderer into
OUT/<name> (same data, steps, optimiser and seed; an existing finished run is reused),
evaluates held-out reconstruction (`--metric=recon`) and scale consistency
(`--metric=scale_consistency`) with `infdiff.evaluate`, and prints one Markdown table:

  python scripts/stage1_ablation.py --out=runs/ablation
  python scripts/stage1_ablation.py --out=runs/ablation --renderers=cqar,clif \
      --data=photos --override=--config.data.eval_fraction=0.25

On a 2-core CPU each demo renderer takes about 5 minutes to train and 1 to evaluate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("out", None, "Directory for the runs (one subdirectory per renderer).")
flags.DEFINE_string("preset", "demo", "Presets of configs/rapd.py besides renderer=.")
flags.DEFINE_list("renderers", ["cqar", "liif", "clif"], "Renderers to compare.")
flags.DEFINE_string("data", None, "config.data.source for training and evaluation.")
flags.DEFINE_multi_string("override", [], "Extra --config.FIELD=VALUE flags for every run.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], log: str) -> None:
  with open(log, "a") as f:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    sys.exit(f"error: {' '.join(cmd[2:4])} failed (exit {proc.returncode}); see {log}")


def _train_and_evaluate(name: str) -> dict:
  workdir = os.path.join(FLAGS.out, name)
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "ablation.log")
  preset = ",".join(filter(None, [FLAGS.preset, f"renderer={name}"]))
  data = [f"--config.data.source={FLAGS.data}"] if FLAGS.data else []
  train = [sys.executable, "-m", "infdiff.main", f"--config=configs/rapd.py:{preset}"]
  train += [f"--workdir={workdir}", "--config.stages=('rapd_stage1',)", *data, *FLAGS.override]
  print(f"[{name}] training stage 1 into {workdir} (log: {log})", flush=True)
  _run(train, log)  # resumes, or returns at once when the run is finished
  out = {}
  for metric in ("recon", "scale_consistency"):
    print(f"[{name}] evaluating {metric}", flush=True)
    _run(
        [sys.executable, "-m", "infdiff.evaluate", f"--workdir={workdir}", f"--metric={metric}"],
        log,
    )
    with open(os.path.join(workdir, "eval", f"{metric}.json")) as f:
      out[metric] = json.load(f)
  return out


def main(argv):
  del argv
  if not FLAGS.out:
    sys.exit("error: --out is required (directory for the ablation runs)")
  results = {name: _train_and_evaluate(name) for name in FLAGS.renderers}
  first = next(iter(results.values()))
  print(f"\nStage-1 renderer ablation ({first['recon']['note']})\n")
  print(
      "| renderer | 1x PSNR | 2x PSNR | 4x PSNR | 2x SSIM | 4x SSIM | scale consistency 2x / 4x |"
  )
  print("|---|---|---|---|---|---|---|")
  for name, res in results.items():
    r, s = res["recon"]["rows"], res["scale_consistency"]["rows"]
    print(
        f"| {name} | {r['1x']['model_psnr']:.2f} | {r['2x']['model_psnr']:.2f} "
        f"| {r['4x']['model_psnr']:.2f} | {r['2x']['model_ssim']:.4f} "
        f"| {r['4x']['model_ssim']:.4f} | {s['2x']['psnr']:.2f} / {s['4x']['psnr']:.2f} dB |"
    )
  r = first["recon"]["rows"]
  print(
      f"| bicubic of the encoder input | – | {r['2x']['bicubic_psnr']:.2f} "
      f"| {r['4x']['bicubic_psnr']:.2f} | {r['2x']['bicubic_ssim']:.4f} "
      f"| {r['4x']['bicubic_ssim']:.4f} | – |"
  )


if __name__ == "__main__":
  app.run(main)
