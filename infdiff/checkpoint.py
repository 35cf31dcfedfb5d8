"""Orbax checkpoints of the whole train state plus the data-iterator state.

One checkpoint holds params, optimiser state, EMA, mutable model state (BatchNorm
statistics and the like), step and RNG (item 'state') and the grain iterator state
(item 'data', JSON). Saves are atomic (Orbax writes to a temporary
directory and renames on commit) and keep the newest `keep` steps. Restoring takes an
abstract state whose leaves carry the target shardings, so a checkpoint written on one
mesh restores onto any other mesh or device count.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable; the message is one line."""


def manager(directory: str, keep: int = 3, save_every: int = 1) -> ocp.CheckpointManager:
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
  """Saves state and iterator state at `step` (asynchronously; see wait_until_finished)."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(_encode_data_state(data_state)),
  )
  return mngr.save(step, args=args, force=force)


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying the target shardings, the restore target."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )


def _saved_fields(mngr: ocp.CheckpointManager, step: int) -> set[str] | None:
  """Top-level names of the saved state at `step` (None if its metadata is unreadable)."""
  try:
    path = os.path.join(str(mngr.directory), str(step), "state")
    return set(ocp.StandardCheckpointer().metadata(path).item_metadata.keys())
  except Exception:  # restore reports a real problem
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
    if saved is not None:
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
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"cannot restore step {step} from {mngr.directory}: {msg}") from e
  state = out["state"]
  if missing:
    state = abstract_state.replace(**state, **{k: {} for k in missing})
  return state, _decode_data_state(out["data"])


def restore_params_only(directory: str, abstract_state=None, step: int | None = None):
  """Reads a finished run's state for inference (e.g. sampling or a later stage).

  Args:
    directory: the checkpoints directory of a stage.
    abstract_state: optional restore target; None restores as saved, on one device.
    step: the step to read; the latest when None.

  Returns:
    (state pytree, step).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  mngr = ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
  )
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no finished checkpoint in {directory}")
  try:
    if abstract_state is None:
      abstract_state = _single_device_target(mngr, step)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
  except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"cannot read checkpoint step {step} in {directory}: {msg}") from e
  return out["state"], step


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
