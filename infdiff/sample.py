"""Sample CLI: one denoised latent per image, rendered at every requested size.

python -m infdiff.sample --workdir=W --prompt="a red circle" --size=256x256 \
    --size=1024x512 --num=4 --seed=0 --out=DIR

Writes DIR/{index:03d}_{W}x{H}.png, index running over prompts x num (prompt-major).
An empty prompt samples unconditionally.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

from infdiff import cli, utils

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory of a finished stage-2 run.")
flags.DEFINE_multi_string("prompt", [""], "Prompt; repeat for several. '' = unconditional.")
flags.DEFINE_multi_string("size", ["256x256"], "Output size WxH; repeat for several.")
flags.DEFINE_integer("num", 1, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Noise seed; the same seed gives identical files.")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the run's config).")
flags.DEFINE_integer("steps", None, "Euler steps (default: the run's config).")
flags.mark_flags_as_required(["workdir"])

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(text: str, max_size: int) -> tuple[int, int]:
  """'WxH' -> (W, H); a one-line ValueError for anything else or out of range."""
  m = _SIZE.match(text.strip())
  if not m:
    raise ValueError(f"bad --size {text!r}: expected WxH with positive integers, e.g. 512x256")
  w, h = int(m.group(1)), int(m.group(2))
  if w <= 0 or h <= 0:
    raise ValueError(f"bad --size {text!r}: width and height must be positive")
  if w > max_size or h > max_size:
    raise ValueError(f"bad --size {text!r}: larger than the configured maximum {max_size}")
  return w, h


def run(workdir, prompts, sizes, num, seed, out, cfg_scale=None, steps=None) -> list[str]:
  """Library form of the CLI; returns the written paths."""
  from infdiff import sampling

  gen = sampling.Generator.from_workdir(workdir, num_steps=steps, cfg_scale=cfg_scale)
  max_size = int(gen.method.cfg.sample.max_size)
  parsed = [parse_size(s, max_size) for s in sizes]
  if num <= 0:
    raise ValueError(f"--num must be positive, got {num}")
  out = out or os.path.join(workdir, "samples")
  z = gen.latents(prompts, seed=seed, num_per_prompt=num)
  paths = []
  for w, h in parsed:
    images = gen.render(z, h, w)
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
      parse_size(s, 1 << 30)
    paths = run(
        FLAGS.workdir,
        FLAGS.prompt,
        FLAGS.size,
        FLAGS.num,
        FLAGS.seed,
        FLAGS.out,
        FLAGS.cfg_scale,
        FLAGS.steps,
    )
  print(f"wrote {len(paths)} images to {os.path.dirname(paths[0]) if paths else FLAGS.out}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
  sys.exit(0)
