"""Orbax checkpoints of the whole train state plus the data-iterator state.

One checkpoint holds params, optimiser state, EMA, mutable model state (BatchNorm
statistics and the like), step and RNG (item 'state') and the grain iterator state
(item 'data', JSON). Saves are atomic (Orbax writes to a temporary
directory and renames on commit) and keep the newest `keep` steps. Restoring takes an
abstract state whose leaves carry the target shardings, so a checkpoint written on one
mesh restores onto any other mesh or device count.

A step that cannot be read (corrupt, truncated or missing files) is skipped with a
warning: training moves it aside to `<step>.unreadable` (`set_aside`, nothing is deleted)
and resumes from the newest readable step; inference (`restore_params_only`) only skips it.
An interrupted save leaves an Orbax temporary directory, which is never read as a step.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable; the message is one line.

  `why` is the cause alone (without the step and directory), for warnings and lists.
  """

  def __init__(self, message: str, why: str | None = None):
    super().__init__(message)
    self.why = why or message


class _NoOrbaxTracebacks(py_logging.Filter):
  """Orbax logs a failed background save with its traceback before the error reaches the
  trainer, which reports it in one line; the log keeps Orbax's message, without traceback."""

  def filter(self, record):
    if "orbax" in (record.pathname or "") and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


def manager(directory: str, keep: int = 3, save_every: int = 1) -> ocp.CheckpointManager:
  absl_logger = py_logging.getLogger("absl")
  if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOrbaxTracebacks())
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_every, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _encode_data_state(data_state):
  if data_state is None:
    return {}
  if isinstance(data_state, bytes):
    return {"bytes": data_state.decode()}
  return {"state": data_state}


def _decode_data_state(blob):
  if not blob:
    return None
  if "bytes" in blob:
    return blob["bytes"].encode()
  return blob["state"]


def save(mngr: ocp.CheckpointManager, step: int, state, data_state=None, force=False) -> bool:
  """Saves state and iterator state at `step` (asynchronously; see wait_until_finished).

  With `force` (off the save schedule: a preemption signal) a step that is already written,
  e.g. by the periodic save of the same step, is left as it is and False is returned.
  """
  if force:
    wait(mngr)  # a pending write of this step shows in all_steps only once it is finished
    if step in mngr.all_steps():
      return False
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(_encode_data_state(data_state)),
  )
  try:
    return mngr.save(step, args=args, force=force)
  except Exception as e:  # e.g. OSError(ENOSPC); the previous steps stay as they were
    raise _save_error(mngr, e) from e


def _save_error(mngr, e: BaseException) -> CheckpointError:
  # Saves are asynchronous: a failed write surfaces at the next save or wait, so the
  # message names the directory (the cause usually names the step's temporary directory).
  why = reason(e)
  return CheckpointError(f"cannot save checkpoint in {mngr.directory}: {why}", why)


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the pending save; a failed write is a one-line CheckpointError."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise _save_error(mngr, e) from e


def close(mngr: ocp.CheckpointManager) -> None:
  """Closes the manager (also after a failed save, so no thread outlives the process).

  A failed pending write is raised afterwards as a one-line CheckpointError.
  """
  error = None
  try:
    mngr.wait_until_finished()
  except Exception as e:
    error = e
  try:
    mngr.close()
  except Exception as e:
    error = error or e
  if error is not None:
    raise _save_error(mngr, error) from error


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying the target shardings, the restore target."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )


def _saved_fields(mngr: ocp.CheckpointManager, step: int) -> set[str]:
  """Top-level names of the saved state at `step`; CheckpointError if its metadata is unreadable."""
  path = os.path.join(str(mngr.directory), str(step), "state")
  try:
    return set(ocp.StandardCheckpointer().metadata(path).item_metadata.keys())
  except Exception as e:
    why = f"unreadable metadata: {reason(e)}"
    raise CheckpointError(f"cannot restore step {step} from {mngr.directory}: {why}", why) from e


_QUIET = []  # set once the abandoned-read noise filters are installed


class _AbandonedReadFilter(py_logging.Filter):

  def filter(self, record):
    return "exception was never retrieved" not in str(record.msg)


def _quiet_abandoned_reads() -> None:
  """Silences the noise of the other reads of a failed restore (installed on first failure).

  When one array read fails, Orbax's event loop closes while the other reads are in flight;
  they end later with 'Event loop is closed' errors, unretrieved-exception log records and
  never-awaited coroutines, printed as tracebacks after the one-line error. The failure
  itself is already reported, so these are dropped; anything else passes through.
  """
  if _QUIET:
    return
  _QUIET.append(True)
  previous = sys.unraisablehook

  def hook(u):
    e, obj = u.exc_value, u.object
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    code = getattr(obj, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
      return
    previous(u)

  sys.unraisablehook = hook
  py_logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


def reason(e: BaseException) -> str:
  """The first line of an error, without TensorStore's multi-line spec dump."""
  if isinstance(e, CheckpointError):
    return e.why
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else type(e).__name__
  return text.split(" See full TensorStore details")[0].rstrip(". ") or type(e).__name__


def set_aside(directory: str, step: int) -> str:
  """Renames the step directory `directory/<step>` to `<step>.unreadable` (never deletes).

  A name already taken gets a suffix (`<step>.unreadable.1`, ...). Returns the new path.
  """
  src = os.path.join(str(directory), str(step))
  dst = f"{src}.unreadable"
  n = 0
  while os.path.exists(dst):
    n += 1
    dst = f"{src}.unreadable.{n}"
  os.rename(src, dst)
  return dst


def restore_newest_readable(mngr: ocp.CheckpointManager, abstract_state, stage: str = ""):
  """Restores the newest readable step: (state, data_state, step), or None if none is saved.

  Unreadable newer steps are logged (one warning each) and, once a readable step is found,
  moved aside with `set_aside` so that later saves can reuse their numbers. When no step is
  readable nothing is moved (a target that no longer matches the saved state, after a config
  change, fails every step alike) and a one-line CheckpointError lists what was tried.
  """
  prefix = f"[{stage}] " if stage else ""
  tried = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, data_state = restore(mngr, step, abstract_state)
    except CheckpointError as e:
      tried.append((step, reason(e)))
      continue
    for bad, why in tried:  # one warning per unreadable step
      moved = set_aside(mngr.directory, bad) if jax.process_index() == 0 else "<step>.unreadable"
      logging.warning(
          "%scheckpoint step %d is unreadable (%s); moved it to %s and resumed from step %d",
          prefix,
          bad,
          why,
          moved,
          step,
      )
    if tried:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("infdiff_checkpoint_set_aside")
      mngr.reload()  # the manager caches its step list
    return state, data_state, step
  if tried:
    listed = "; ".join(f"step {s}: {w}" for s, w in tried)
    raise CheckpointError(f"no readable checkpoint in {mngr.directory} (tried {listed})")
  return None


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores (state, data_state) at `step` onto the shardings in `abstract_state`.

  A checkpoint written before a state field existed (e.g. `model_state`, empty for
  methods without mutable state) restores too when that field is empty in the target.
  """
  target, missing = abstract_state, []
  if dataclasses.is_dataclass(abstract_state):
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    saved = _saved_fields(mngr, step)
    missing = [k for k, v in fields.items() if k not in saved and isinstance(v, dict) and not v]
    if missing:  # the same tree without those fields, as a dict of the dataclass's fields
      target = {k: v for k, v in fields.items() if k not in missing}
  try:
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
  except Exception as e:  # Orbax raises many types; report one line.
    _quiet_abandoned_reads()
    why = reason(e)
    raise CheckpointError(f"cannot restore step {step} from {mngr.directory}: {why}", why) from e
  state = out["state"]
  if missing:
    state = abstract_state.replace(**state, **{k: {} for k in missing})
  return state, _decode_data_state(out["data"])


def restore_params_only(directory: str, abstract_state=None, step: int | None = None):
  """Reads a finished run's state for inference (e.g. sampling or a later stage).

  Args:
    directory: the checkpoints directory of a stage.
    abstract_state: optional restore target; None restores as saved, on one device.
    step: the step to read; None: the newest readable one (newer unreadable steps are
      skipped with a warning, and left where they are).

  Returns:
    (state pytree, step).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  mngr = ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
  )
  try:  # closed on every path: an open manager's threads fail noisily at interpreter exit
    saved = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
      if step not in saved:
        have = ", ".join(map(str, sorted(saved))) or "none"
        raise CheckpointError(f"no checkpoint step {step} in {directory} (saved steps: {have})")
      return _read_params(mngr, directory, step, abstract_state), step
    if not saved:
      raise CheckpointError(f"no finished checkpoint in {directory}")
    tried = []
    for s in saved:
      try:
        state = _read_params(mngr, directory, s, abstract_state)
      except CheckpointError as e:
        tried.append((s, reason(e)))
        continue
      for bad, why in tried:  # one warning per skipped step; inference moves nothing
        logging.warning(
            "checkpoint step %d in %s is unreadable (%s); read step %d instead",
            bad,
            directory,
            why,
            s,
        )
      return state, s
    listed = "; ".join(f"step {s}: {w}" for s, w in tried)
    raise CheckpointError(f"no readable checkpoint in {directory} (tried {listed})")
  finally:
    mngr.close()


def _read_params(mngr: ocp.CheckpointManager, directory: str, step: int, abstract_state):
  try:
    if abstract_state is None:
      abstract_state = _single_device_target(mngr, step)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
  except Exception as e:
    _quiet_abandoned_reads()
    why = reason(e)
    raise CheckpointError(f"cannot read checkpoint step {step} in {directory}: {why}", why) from e
  return out["state"]


def _single_device_target(mngr: ocp.CheckpointManager, step: int):
  """Restore target with the saved shapes/dtypes on this process's first device.

  The saved shardings may name devices of another topology (a pod, or several
  processes) that do not exist here; inference reads everything onto one device.
  """
  meta = mngr.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta, is_leaf=is_leaf
  )


def write_json(path: str, obj) -> None:
  """Atomic JSON write (temporary file + rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
