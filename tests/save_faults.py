"""Test-only: runs `python -m infdiff.main` with a fault injected into checkpoint writes.

python tests/save_faults.py MODE N [infdiff.main flags ...]

The N-th write of the train state (1-based) fails:
  enospc  the state write fails with OSError(ENOSPC), as on a full disk;
  hang    touches `<checkpoints>/HANG` and sleeps, so a test can kill the process while
          the step is still an uncommitted Orbax temporary directory.
"""

import errno
import os
import runpy
import sys
import time

import orbax.checkpoint as ocp


class _Failed:
  """A write future that fails when waited on."""

  def __init__(self, error):
    self.error = error

  def result(self, timeout=None):
    del timeout
    raise self.error


def install(mode: str, n: int) -> None:
  original = ocp.StandardCheckpointHandler.async_save
  calls = [0]

  async def async_save(self, directory, *args, **kwargs):
    calls[0] += 1
    if calls[0] != n:
      return await original(self, directory, *args, **kwargs)
    if mode == "enospc":  # the write fails in the background, where Orbax writes arrays
      out = await original(self, directory, *args, **kwargs)
      return [
          *(out or ()),
          _Failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))),
      ]
    if mode == "hang":  # killed here, before the step is committed
      ckdir = os.path.dirname(os.path.dirname(str(directory)))
      open(os.path.join(ckdir, "HANG"), "w").close()
      time.sleep(600)
    raise ValueError(f"unknown fault {mode!r}")

  ocp.StandardCheckpointHandler.async_save = async_save


if __name__ == "__main__":
  install(sys.argv[1], int(sys.argv[2]))
  sys.argv = ["infdiff.main", *sys.argv[3:]]
  runpy.run_module("infdiff.main", run_name="__main__", alter_sys=True)
