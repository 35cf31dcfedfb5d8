"""Sample CLI: images from any run with a `Generator` stage, at every requested size.

Latent methods (RaPD) denoise one latent per image and render it at every size; pixel
methods sample at each size directly. Prompts apply to text-conditioned generators only.

python -m infdiff.sample --workdir=W --prompt="a red circle" --size=256x256 \
    --size=1024x512 --num=4 --seed=0 --out=DIR

Writes DIR/{index:03d}_{W}x{H}.png, index running over prompts x num (prompt-major).
An empty prompt samples unconditionally.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from infdiff import cli, utils

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when it runs as a program: notebooks call `run` and
  import this module next to other CLIs that define the same names."""
  flags.DEFINE_string("workdir", None, "Run directory with a generator stage (e.g. rapd_stage2).")
  flags.DEFINE_multi_string("prompt", [""], "Prompt; repeat for several. '' = unconditional.")
  flags.DEFINE_multi_string("size", ["256x256"], "Output size WxH; repeat for several.")
  flags.DEFINE_integer("num", 1, "Images per prompt.")
  flags.DEFINE_integer("seed", 0, "Noise seed; the same seed gives identical files.")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
  flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
  flags.DEFINE_integer("steps", None, "Sampler steps (default: the run's config).")
  flags.DEFINE_integer(
      "step", None, "Checkpoint step to read (default: the newest readable one, with a warning)."
  )
  flags.DEFINE_multi_string(
      "sampler_option",
      [],
      "key=value sampler option of the run's generator (e.g. deblur=true for ∞-Diff); repeat.",
  )
  flags.mark_flags_as_required(["workdir"])


def run(
    workdir,
    prompts,
    sizes,
    num,
    seed,
    out,
    cfg_scale=None,
    steps=None,
    step=None,
    sampler_options=None,
) -> list[str]:
  """Library form of the CLI; returns the written paths."""
  from infdiff import runs, sampling

  if num <= 0:
    raise ValueError(f"--num must be positive, got {num}")
  # Sampling options go to the method only when given (an unconditional method takes no
  # cfg_scale, and says so in one line).
  options = {k: v for k, v in (("cfg_scale", cfg_scale), ("num_steps", steps)) if v is not None}
  options.update(sampler_options or {})
  gen = runs.load_generator(workdir, "sampling", step=step, **options)
  parsed = [cli.parse_size(s, 1, gen.max_size) for s in sizes]
  prompts = gen.check_conditions(prompts)
  out = out or os.path.join(runs.run_root(workdir), "samples")
  paths = []
  # One size at a time: a latent generator denoises once and renders each size in turn.
  for (w, h), images in gen.iter_sample(prompts, num, seed, parsed):
    for i, img in enumerate(images):
      path = os.path.join(out, f"{i:03d}_{w}x{h}.png")
      sampling.save_png(path, img)
      paths.append(path)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  utils.quiet_library_logs()
  with cli.one_line_errors():
    # Check sizes before loading anything, so a typo fails at once.
    for s in FLAGS.size:
      cli.parse_size(s, 1, 1 << 30)
    paths = run(
        FLAGS.workdir,
        FLAGS.prompt,
        FLAGS.size,
        FLAGS.num,
        FLAGS.seed,
        FLAGS.out,
        FLAGS.cfg_scale,
        FLAGS.steps,
        FLAGS.step,
        cli.parse_options(FLAGS.sampler_option),
    )
  print(f"wrote {len(paths)} images to {os.path.dirname(paths[0]) if paths else FLAGS.out}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_one_line)
  sys.exit(0)
