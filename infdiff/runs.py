"""Reading finished runs: the one place that opens a run directory for inference.

A run directory W holds one directory per trained stage (`W/<stage>/`, the stage names of
`config.stages`), each with `config.json`, `checkpoints/` and whatever the stage writes
beside them (e.g. `latent_stats.json`). `load_run` reads one stage: its config, its
`Method` (built with training=False, so training-only inputs such as a distillation
teacher are neither loaded nor required), its EMA parameters (plain parameters when the
stage keeps no EMA) restored onto one local device whatever topology wrote them, and the
frozen inputs from `Method.prepare(None, training=False)`. Chained stages (RaPD stage 2 on
stage 1) load the earlier stage through `load_run` too.

Inside `with runs.abstract():` `load_run` reads no checkpoint: the stage's parameters are
the jax.ShapeDtypeStruct tree its trainer would initialise (`train.abstract_params`, from
one example batch of the stage's configured data), so a later stage can be built, lowered
and compiled on a run directory that holds only `config.json` (and what the stage reads
beside it, such as `latent_stats.json`). benchmarks/paper_scale.py uses it.

`load_autoencoder` / `load_generator` pick the stage of a run directory that provides the
`FieldAutoencoder` / `Generator` contract, or fail with one line naming what is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import ml_collections

from infdiff import checkpoint as ckpt_lib
from infdiff import methods
from infdiff.methods import base


@dataclasses.dataclass
class Run:
  """One trained stage, ready for inference."""

  config: ml_collections.ConfigDict  # the full run config (config.json)
  stage: str  # stage name, e.g. 'rapd_stage1'
  directory: str  # the stage directory W/<stage>
  method: Any  # the stage's Method, built with training=False
  params: dict  # {group: params}: EMA where the stage keeps one, else the trained params
  aux: Any  # frozen inference inputs (prepare(None, training=False))
  step: int  # checkpoint step read

  def inference(self, **options):
    """The stage's `FieldAutoencoder` or `Generator`."""
    return self.method.inference(self.params, self.aux, **options)


_abstract_depth = 0  # > 0 inside `abstract()`


@contextlib.contextmanager
def abstract() -> Iterator[None]:
  """Within it `load_run` gives parameter shapes instead of reading checkpoints."""
  global _abstract_depth
  _abstract_depth += 1
  try:
    yield
  finally:
    _abstract_depth -= 1


def read_config(stage_dir: str) -> ml_collections.ConfigDict:
  """The config.json of a stage directory; CheckpointError if there is none."""
  path = os.path.join(stage_dir, "config.json")
  if not os.path.isfile(path):
    raise ckpt_lib.CheckpointError(f"no run at {stage_dir} (config.json missing)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _is_stage_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def stage_dirs(path: str) -> dict[str, str]:
  """{stage: directory} of the stages present at `path` (a run or a stage directory).

  Stages come in the order of the run's `config.stages`, then any others by name.
  """
  path = os.path.normpath(path)
  if _is_stage_dir(path):
    return {os.path.basename(path): path}
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no run directory {path}")
  found = {s: os.path.join(path, s) for s in methods.STAGES if _is_stage_dir(os.path.join(path, s))}
  order: list[str] = []
  for d in found.values():
    order += [s for s in read_config(d).get("stages", ()) if s in found and s not in order]
  order += sorted(s for s in found if s not in order)
  return {s: found[s] for s in order}


def run_root(path: str) -> str:
  """The run directory (where eval/ and samples/ go), given it or one of its stages."""
  path = os.path.normpath(path)
  return os.path.dirname(path) if _is_stage_dir(path) else path


def run_config(path: str) -> ml_collections.ConfigDict:
  """The config of a run (its last stage's config.json), given the run or a stage."""
  dirs = stage_dirs(path)
  if not dirs:
    raise ckpt_lib.CheckpointError(
        f"no trained stage in {path} (no <stage>/config.json for any of "
        f"{', '.join(methods.STAGES)})"
    )
  return read_config(list(dirs.values())[-1])


def load_run(path: str, stage: str | None = None, step: int | None = None) -> Run:
  """Reads one stage of a run for inference.

  Args:
    path: a run directory or a stage directory.
    stage: the stage to read; None: the stage directory given, or the run's last stage.
    step: checkpoint step; None: the newest.

  Returns:
    A `Run`.
  """
  dirs = stage_dirs(path)
  if stage is None:
    if not dirs:
      raise ckpt_lib.CheckpointError(f"no trained stage in {path}")
    stage = list(dirs)[-1]
  if stage not in dirs:
    raise ckpt_lib.CheckpointError(
        f"no {stage} run in {path} (missing {stage}/config.json); train that stage first"
    )
  directory = dirs[stage]
  config = read_config(directory)
  from infdiff import utils

  utils.enable_compilation_cache(config.get("compilation_cache_dir", ""))
  method = methods.get_method_class(stage)(config, stage, directory, training=False)
  if _abstract_depth:
    from infdiff import train

    params, read_step = train.abstract_params(method), 0  # shapes only, no checkpoint read
  else:
    ckpts = os.path.join(directory, "checkpoints")
    state, read_step = ckpt_lib.restore_params_only(ckpts, step=step)
    # EMA where the stage keeps one; groups without an EMA copy keep their trained params.
    params = {**state["params"], **(state.get("ema") or {})}
  aux = method.prepare(None, training=False)
  return Run(config, stage, directory, method, params, aux, int(read_step))


def previous_stage_dir(configured: str, workdir: str, stage: str) -> str:
  """The run a later stage reads: `configured` if set, else the sibling `<run>/<stage>`."""
  if configured:
    return configured
  return os.path.join(os.path.dirname(os.path.normpath(workdir)), stage)


def load_previous_stage(path: str, stage: str, needed_by: str, field: str) -> Run:
  """The finished `stage` run at `path` (a run or its stage directory), or a one-line error.

  Args:
    path: where the later stage looks (`previous_stage_dir`).
    stage: the stage it needs (e.g. 'infd_ae').
    needed_by: the stage that needs it, for the message.
    field: the config field that names the path, for the message.
  """
  stages = stage_dirs(path) if os.path.isdir(path) else {}
  if stage not in stages:
    have = ", ".join(stages) or "no trained stage"
    raise FileNotFoundError(
        f"{needed_by} needs a finished {stage} run ({field}); {path} has {have}"
    )
  return load_run(path, stage)


def _providers(path: str, kind: str) -> tuple[list[str], dict[str, tuple[str, ...]]]:
  dirs = stage_dirs(path)
  provides = {s: tuple(methods.get_method_class(s).provides) for s in dirs}
  return [s for s in dirs if kind in provides[s]], provides


def has_contract(path: str, kind: str) -> bool:
  """Whether a stage of the run provides `kind` (`base.AUTOENCODER` or `base.GENERATOR`)."""
  return bool(_providers(path, kind)[0])


def load_contract(path: str, kind: str, purpose: str, step: int | None = None, **options):
  """The `FieldAutoencoder` or `Generator` of a run, from the last stage providing it.

  Args:
    path: a run directory or a stage directory.
    kind: `base.AUTOENCODER` or `base.GENERATOR`.
    purpose: what needs it (for the error message), e.g. 'metric recon'.
    step: checkpoint step; None: the newest.
    **options: sampling options passed to the method (num_steps, cfg_scale, ...).
  """
  stages, provides = _providers(path, kind)
  if not stages:
    have = ", ".join(f"{s} ({'/'.join(p) or 'nothing'})" for s, p in provides.items())
    can = sorted(s for s in methods.STAGES if kind in methods.get_method_class(s).provides)
    raise ValueError(
        f"{purpose} needs a run with a {kind} stage ({', '.join(can)}); "
        f"{path} has {have or 'no trained stage'}"
    )
  return load_run(path, stages[-1], step=step).inference(**options)


def load_autoencoder(path: str, purpose: str = "this", **kw) -> base.FieldAutoencoder:
  """The run's `FieldAutoencoder` (one-line ValueError if it has none)."""
  return load_contract(path, base.AUTOENCODER, purpose, **kw)


def load_generator(path: str, purpose: str = "sampling", **kw) -> base.Generator:
  """The run's `Generator` (one-line ValueError if it has none)."""
  return load_contract(path, base.GENERATOR, purpose, **kw)
