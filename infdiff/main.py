"""Entry point: `python -m infdiff.main --config=configs/rapd.py:demo --workdir=W`.

Flags only; everything else lives in importable modules (flax examples/imagenet style).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from infdiff import cli, config_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when it runs as a program: tests and notebooks may import
  this module next to other CLIs that define the same names."""
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file, optionally with a preset: configs/rapd.py:demo",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with cli.one_line_errors():  # every missing checkpoint directory at once, before any stage
    config_lib.check_required_paths(FLAGS.config, FLAGS["config"].config_filename)
  import jax

  if FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
  from infdiff import train

  with cli.one_line_errors(FLAGS.workdir):
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Preempted as e:
      logging.info("%s; rerun the same command to resume.", e)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_one_line)
