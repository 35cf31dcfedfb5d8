"""Command-line helpers shared by main, sample and evaluate: one-line errors."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback

from absl import flags
from ml_collections.config_flags import config_flags

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


def parse_options(entries) -> dict:
  """['key=value', ...] -> {key: value} with ints, floats and true/false parsed.

  Sampler options of a run's generator (`Method.make_inference`), e.g. ∞-Diff's
  `deblur=true`; the method refuses options it does not have in one line.
  """
  out = {}
  for entry in entries or ():
    key, sep, value = str(entry).partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise ValueError(f"--sampler_option takes key=value, got {entry!r}")
    v = value.strip()
    if v.lower() in ("true", "false"):
      out[key] = v.lower() == "true"
      continue
    for cast in (int, float):
      try:
        out[key] = cast(v)
        break
      except ValueError:
        continue
    else:
      out[key] = v
  return out


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


# config_flags re-raises an error of get_config (e.g. an unknown preset) as this line
# followed by the traceback.
_WRAPPED = "Error whilst parsing config file:"


def _innermost(e: BaseException) -> BaseException:
  seen = {id(e)}
  while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
    seen.add(id(inner))
    e = inner
  return e


def _config_flags(flag_values) -> list[str]:
  """Names of the flags that load a config file (config_flags.DEFINE_config_file)."""
  return [
      name
      for name in flag_values
      if isinstance(flag_values[name].parser, config_flags.ConfigFileFlagParser)
  ]


def _missing_config_file(argv, flag_values) -> str | None:
  """`--config=FILE[:preset]` naming no file, as one line; None when every file exists.

  config_flags defers a config file's load error to the first use of the config, where
  it surfaces as a traceback (or, with --config.* overrides, as a message without the
  file name), so the file is checked before parsing.
  """
  for name in _config_flags(flag_values):
    for i, arg in enumerate(argv[1:], 1):
      m = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg, re.DOTALL)
      if m is None:
        continue
      value = m.group(1) if m.group(1) is not None else " ".join(argv[i + 1 : i + 2])
      path = value.split(":", 1)[0]
      if path and not os.path.isfile(path):
        problem = "is not a file" if os.path.exists(path) else "not found"
        return f"--{name}={value}: config file {path!r} {problem}"
  return None


def _deferred_config_error(flag_values) -> str | None:
  """A config that failed to load for another I/O reason (any attribute access raises)."""
  for name in _config_flags(flag_values):
    try:
      getattr(flag_values[name].value, "_infdiff_probe", None)
    except OSError as e:
      lines = [line.strip() for line in str(e.__cause__ or e).splitlines() if line.strip()]
      return f"--{name}: cannot load the config: {lines[-1] if lines else type(e).__name__}"
  return None


def parse_flags_one_line(argv):
  """absl flag parsing where any error (unknown config field, bad preset, missing config
  file) is one line."""
  text = _missing_config_file(argv, flags.FLAGS)
  if text is None:
    try:
      rest = flags.FLAGS(argv)
      text = _deferred_config_error(flags.FLAGS)
      if text is None:
        return rest
    except Exception as e:  # flags.Error, config errors raised while loading the config
      cause = e.__cause__ or e.__context__
      text = _one_line(e)
      if cause is not None and not text:
        text = _one_line(cause)
      if text.endswith(_WRAPPED):  # get_config's own error is at the end of the chain
        text = text[: -len(_WRAPPED)] + _one_line(_innermost(e))
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
