"""Pallas kernels, each beside the XLA reference it must equal.

A kernel is chosen by config (`attention_impl`, `sparse_conv_impl`: 'xla' | 'pallas').
Pallas lowers through Triton on NVIDIA GPUs and through Mosaic on TPUs; on any other
backend it runs only in interpret mode (slow, for tests): set the environment variable
`INFDIFF_PALLAS_INTERPRET=1` (or call `interpret(True)`). Selecting 'pallas' where it
can run neither natively nor interpreted is a one-line ValueError (`check_impl`).
"""

from __future__ import annotations

import contextlib
import os

import jax

NATIVE_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
_ENV = "INFDIFF_PALLAS_INTERPRET"
_interpret_override: bool | None = None


def interpret_mode() -> bool:
  """True when Pallas kernels run in interpret mode (tests on CPU)."""
  if _interpret_override is not None:
    return _interpret_override
  return os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def interpret(on: bool = True):
  """Runs Pallas kernels in interpret mode inside the block (for tests)."""
  global _interpret_override
  old, _interpret_override = _interpret_override, bool(on)
  try:
    yield
  finally:
    _interpret_override = old


def native() -> bool:
  """True when the default backend can run Pallas kernels compiled."""
  return jax.default_backend() in NATIVE_BACKENDS


def check_impl(option: str, impl: str, choices=("xla", "pallas")) -> str:
  """Validates an implementation switch; one line when 'pallas' cannot run here.

  Args:
    option: the config field's name, for the message (e.g. 'attention_impl').
    impl: its value.
    choices: the accepted values.

  Returns:
    impl, unchanged.
  """
  if impl not in choices:
    raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}, got {impl!r}")
  if impl == "pallas" and not (native() or interpret_mode()):
    raise ValueError(
        f"{option}='pallas' needs a GPU or TPU backend (this one is "
        f"{jax.default_backend()!r}); use {option}='xla', or {_ENV}=1 to interpret (slow)"
    )
  return impl
