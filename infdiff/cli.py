"""Command-line helpers shared by main, sample and evaluate: one-line errors."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback

from absl import flags

from infdiff.checkpoint import CheckpointError
from infdiff.render import OutOfMemory

# Errors caused by the user's input (config, data, paths, numerics): reported on one
# line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    CheckpointError,
    FloatingPointError,
    KeyError,
    OutOfMemory,
)

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(text: str, min_side: int = 1, max_side: int = 1 << 15) -> tuple[int, int]:
  """'WxH' -> (W, H); a one-line ValueError for anything else or out of range."""
  m = _SIZE.match(str(text).strip())
  if not m:
    raise ValueError(f"bad --size {text!r}: expected WxH with positive integers, e.g. 512x256")
  w, h = int(m.group(1)), int(m.group(2))
  if min(w, h) < min_side or max(w, h) > max_side:
    raise ValueError(f"bad --size {text!r}: sides must lie in [{min_side}, {max_side}]")
  return w, h


def peak_rss_gib() -> float:
  """Peak resident memory of this process so far, GiB (Linux ru_maxrss is in KiB)."""
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def _one_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  text = msg[0] if msg else type(e).__name__
  if isinstance(e, KeyError):
    text = f"unknown key {text}"
  return text


def parse_flags_one_line(argv):
  """absl flag parsing where any error (unknown config field, bad preset) is one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, config errors raised while loading the config
    cause = e.__cause__ or e.__context__
    text = _one_line(e)
    if cause is not None and not text:
      text = _one_line(cause)
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors(workdir: str | None = None):
  """Turns user errors into `error: <one line>` on stderr and exit status 2.

  The full traceback still goes to `workdir/error.log` for debugging.
  """
  try:
    yield
  except USER_ERRORS as e:
    if workdir:
      with contextlib.suppress(OSError):
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "error.log"), "a") as f:
          traceback.print_exc(file=f)
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)
