"""glibc malloc settings that stop XLA's CPU backend from re-faulting its buffers each step.

On Linux, XLA's CPU runtime allocates a step's temporary buffers with malloc and frees them
when the step ends. glibc serves large blocks with fresh mmaps (and returns freed memory
to the kernel), so every step touches its temporaries as new pages: the RaPD `long`
stage-2 step took ~93,000 minor page faults (~380 MB of zeroed pages) and a quarter of
its CPU time in the kernel. `configure` keeps freed memory in the process instead: one
malloc arena, no mmapped blocks, no trimming (mallopt M_ARENA_MAX=1, M_MMAP_MAX=0,
M_TRIM_THRESHOLD=2^31-1). It must run before the JAX backend starts (its threads take
their arenas when they first allocate); `infdiff.main`, `infdiff.sample` and
`infdiff.evaluate` call it first thing. `benchmarks/host_malloc.py` measures the effect.

The cost is a resident set that stays at its peak. With one arena, host threads share
malloc's lock, which is why `auto` applies the settings only where JAX will compute on
the CPU; an accelerator host keeps glibc's defaults.

The environment variable INFDIFF_HOST_MALLOC selects the mode: `auto` (the default),
`on` or `off`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

ENV = "INFDIFF_HOST_MALLOC"
MODES = ("auto", "on", "off")
# mallopt parameters (malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

_applied: bool | None = None  # the outcome of the first call in this process


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS names cpu first, or it is unset
  and no accelerator plugin (a `jax_plugins` entry point or module, or libtpu) is
  installed. Decided without starting a backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return False
  try:
    import jax_plugins  # noqa: PLC0415  (namespace package of PJRT plugins, if any)
  except ImportError:
    return True
  import pkgutil  # noqa: PLC0415

  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def _mode(mode: str | None) -> str:
  mode = (mode if mode is not None else os.environ.get(ENV, "auto")).strip().lower()
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
  return mode


def configure(mode: str | None = None) -> bool:
  """Applies the settings (module docstring) if `mode` (default: $INFDIFF_HOST_MALLOC or
  'auto') asks for them and the C library is glibc. Returns whether they are in effect.
  Only the first call in a process acts; later calls return its outcome."""
  global _applied
  mode = _mode(mode)
  if _applied is not None:
    return _applied
  _applied = False
  if mode == "off" or (mode == "auto" and not cpu_only()):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others have no mallopt
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return _applied
