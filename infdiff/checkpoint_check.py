"""Checks a run's checkpoints: reads every saved step of every stage.

python -m infdiff.checkpoint_check --workdir=W

Prints one line per stage and step, newest first: `readable`, or `unreadable: <reason>`;
steps set aside by a resume (`<step>.unreadable`) and partial saves (Orbax temporary
directories, ignored on resume) are listed too. Exits 1 if the newest step of a stage is
unreadable (training would resume from an older one), 2 on misuse, else 0.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from infdiff import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when it runs as a program: tests import this module next
  to other CLIs (`infdiff.evaluate`) that define the same names."""
  flags.DEFINE_string("workdir", None, "Run directory (one subdirectory per stage) or a stage.")
  flags.mark_flags_as_required(["workdir"])


def check(workdir: str) -> tuple[list[str], bool]:
  """(report lines, whether every stage's newest step is readable)."""
  from infdiff import checkpoint as ckpt_lib
  from infdiff import runs

  dirs = runs.stage_dirs(workdir)
  if not dirs:
    raise ckpt_lib.CheckpointError(f"no trained stage in {workdir} (no <stage>/config.json)")
  lines, ok = [], True
  for stage, stage_dir in dirs.items():
    directory = os.path.join(stage_dir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    steps = sorted((int(n) for n in names if n.isdigit()), reverse=True)
    if not steps:
      lines.append(f"{stage}: no checkpoint yet")
    for i, step in enumerate(steps):
      try:
        ckpt_lib.restore_params_only(directory, step=step)
        lines.append(f"{stage} step {step}: readable")
      except ckpt_lib.CheckpointError as e:
        lines.append(f"{stage} step {step}: unreadable: {ckpt_lib.reason(e)}")
        ok = ok and i > 0
    for n in sorted(names):
      if ".unreadable" in n:
        lines.append(f"{stage} {n}: set aside by a resume (not read)")
      elif ".orbax-checkpoint-tmp" in n:
        lines.append(f"{stage} {n}: partial save (ignored on resume)")
  return lines, ok


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from infdiff import utils

  logging.set_verbosity(logging.ERROR)
  utils.quiet_library_logs()
  with cli.one_line_errors():
    lines, ok = check(FLAGS.workdir)
  print("\n".join(lines))
  return 0 if ok else 1


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_one_line)
  sys.exit(0)
