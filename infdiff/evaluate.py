"""Evaluation CLI: one metric on a run directory, printed as a table and saved as JSON.

python -m infdiff.evaluate --workdir=W --metric=NAME [--size=WxH ...] [--data=SOURCE] \
    [--num=N] [--seed=S] [--inception=PATH] [--clip=PATH] [--lpips=PATH] [--step=N] \
    [--sampler_option=KEY=VALUE ...]

Metrics (protocols in each module's docstring under infdiff/evaluators/), on any run
whose stages provide the contract a metric needs (infdiff.methods.base):
  recon              autoencoder PSNR/SSIM (+ LPIPS with --lpips) at 1x, 2x, 4x vs bicubic
  scale_consistency  autoencoder render at k x box-filtered vs render at 1x (k = 2, 4)
  shapes_eval        GenEval-style accuracy of text-to-image samples on held-out prompts
  swd                multi-scale sliced Wasserstein distance, generated vs held-out
  seams              patch-based generators: boundary gradient ratio and SWD per sampler
  fid / pfid         Frechet Inception distance of whole images / P x P crops (--inception)
  fid_clip           Frechet distance of CLIP image embeddings (--clip)
--data takes the same strings as config.data.source ('shapes', 'photos', 'folder:/path',
'captions:/path', 'tfds:name'; default: the run's), and its held-out split is used.
Writes W/eval/<metric>.json. Misuse exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from infdiff import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when it runs as a program (as `infdiff.guide`'s): tests
  and notebooks import this module next to other CLIs that define the same names."""
  flags.DEFINE_string(
      "workdir", None, "Run directory (one subdirectory per stage) or a stage directory."
  )
  flags.DEFINE_string("metric", None, "Metric to compute; see the module docstring.")
  flags.DEFINE_multi_string("size", [], "Output size WxH; repeat for several (metric default).")
  flags.DEFINE_string("data", None, "Data source string (default: the run's config.data.source).")
  flags.DEFINE_integer("num", None, "Images (shapes_eval: prompts per category); metric default.")
  flags.DEFINE_integer("seed", 0, "Seed of crops, sampling noise and random projections.")
  flags.DEFINE_string("inception", None, "FID Inception checkpoint directory (fid, pfid).")
  flags.DEFINE_string("clip", None, "CLIP checkpoint directory (fid_clip).")
  flags.DEFINE_string("lpips", None, "VGG16-LPIPS checkpoint directory (optional for recon).")
  flags.DEFINE_integer("patch", 64, "pfid: crop side P.")
  flags.DEFINE_integer("crops_per_image", 4, "pfid: random crops per image.")
  flags.DEFINE_integer("tile", 128, "Render tile side (static shape; bounds render memory).")
  flags.DEFINE_integer(
      "step", None, "Checkpoint step to read (default: the newest readable one, with a warning)."
  )
  flags.DEFINE_multi_string(
      "sampler_option",
      [],
      "key=value sampler option of the run's generator (e.g. deblur=true for ∞-Diff); repeat.",
  )
  flags.mark_flags_as_required(["workdir", "metric"])


MAX_SIDE = 16384  # largest side accepted by --size


def make_args(
    workdir: str,
    metric: str,
    sizes=(),
    *,
    data=None,
    num=None,
    seed=0,
    inception=None,
    clip=None,
    lpips=None,
    patch=64,
    crops_per_image=4,
    tile=128,
    step=None,
    sampler_options=None,
):
  """Validated `EvalArgs` (everything that can be checked before loading a model)."""
  from infdiff import cli as cli_lib
  from infdiff.evaluators import common, metric_module

  module = metric_module(metric)
  parsed = [cli_lib.parse_size(s, 1, MAX_SIDE) for s in sizes]
  if num is not None and num <= 0:
    raise ValueError(f"--num must be positive, got {num}")
  if patch <= 0 or crops_per_image <= 0 or tile <= 0:
    raise ValueError("--patch, --crops_per_image and --tile must be positive")
  args = common.EvalArgs(
      workdir=workdir,
      metric=metric,
      sizes=parsed,
      data=data,
      num=num,
      seed=seed,
      inception=inception,
      clip=clip,
      lpips=lpips,
      patch=patch,
      crops_per_image=crops_per_image,
      tile=tile,
      step=step,
      sampler_options=dict(sampler_options or {}),
  )
  if hasattr(module, "validate"):
    module.validate(args)  # each metric checks its own arguments
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no run directory {workdir}")
  return args


def run(args) -> tuple[object, str]:
  """Library form of the CLI: computes the metric, writes its JSON. Returns (result, path)."""
  from infdiff import runs
  from infdiff.evaluators import common, metric_module

  result = metric_module(args.metric).cli(args)
  data = args.data or str(common.run_data_config(args.workdir).source)
  result.meta = {"workdir": os.path.abspath(args.workdir), "data": data, **result.meta}
  path = common.write_result(runs.run_root(args.workdir), result)
  return result, path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from infdiff import utils

  utils.quiet_library_logs()  # checkpoint restores log ~20 INFO lines each
  with cli.one_line_errors():
    args = make_args(
        FLAGS.workdir,
        FLAGS.metric,
        FLAGS.size,
        data=FLAGS.data,
        num=FLAGS.num,
        seed=FLAGS.seed,
        inception=FLAGS.inception,
        clip=FLAGS.clip,
        lpips=FLAGS.lpips,
        patch=FLAGS.patch,
        crops_per_image=FLAGS.crops_per_image,
        tile=FLAGS.tile,
        step=FLAGS.step,
        sampler_options=cli.parse_options(FLAGS.sampler_option),
    )
    result, path = run(args)
  print(result.table())
  print(f"wrote {path} (peak RSS {cli.peak_rss_gib():.2f} GiB)")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_one_line)
  sys.exit(0)
