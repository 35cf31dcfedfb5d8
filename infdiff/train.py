"""The one training loop. Every method and stage runs through `train_and_evaluate`.

Per stage (config.stages, in order; each writes to `workdir/<stage>`):
  mesh from config -> data pipeline -> abstract state (eval_shape) -> shardings from
  logical axis rules -> jit(init, out_shardings) -> restore the latest checkpoint if
  any -> one jitted, donated step with fold_in RNG -> periodic logging, image
  summaries, evaluators and checkpoints -> method.finalize.
SIGTERM/SIGINT end the loop at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview

from infdiff import checkpoint as ckpt_lib
from infdiff import optim as optim_lib
from infdiff import sharding as shard_lib
from infdiff import utils
from infdiff.methods import get_method_class


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: dict  # group -> params tree
  opt_state: dict  # group -> optax state
  ema: dict  # group -> EMA params tree (ema_groups only; {} when the stage keeps no EMA)
  rng: jax.Array  # [2] uint32 base key; per-step keys are fold_in(rng, step)
  nonfinite: jax.Array  # [] int32 consecutive steps skipped for a non-finite loss
  # group -> {collection: tree} of non-trained model variables (BatchNorm statistics, EMA
  # codebooks), updated by the losses; {} for methods without any (see methods/base.py).
  model_state: dict = dataclasses.field(default_factory=dict)


class Preempted(Exception):
  """Raised after a signal-triggered checkpoint; the run exits 0 and resumes later."""


@dataclasses.dataclass
class StageContext:
  """What a method's `finalize` and evaluators can use."""

  config: Any
  method: Any
  mesh: Any
  state: TrainState
  aux: Any
  workdir: str
  writer: Any
  make_loader: Any  # (split, transform, batch_size, num_epochs) -> iterator


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag checked between steps (no work in the handler)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def train_and_evaluate(config, workdir: str) -> None:
  """Runs every stage in `config.stages`; each resumes from its own checkpoints."""
  from infdiff import config_lib

  config_lib.check_required_paths(config, "the config")  # every missing directory at once
  os.makedirs(workdir, exist_ok=True)
  utils.add_log_file(os.path.join(workdir, "train.log"))
  utils.enable_compilation_cache(config.get("compilation_cache_dir", ""))
  for stage in config.stages:
    train_stage(config, stage, os.path.join(workdir, stage))


def _make_loader(
    config,
    stage_cfg,
    transform,
    split,
    seed,
    num_epochs=None,
    batch_size=None,
    source_fn=None,
):
  """The data loader of a stage; `source_fn(source, split)` may wrap the config's source
  (`Method.data_source`, e.g. resolution balancing)."""
  from infdiff.data import pipeline

  source = None
  if source_fn is not None:
    source = source_fn(pipeline.source_from_config(config.data, split=split), split)
  return pipeline.make_loader(
      config.data,
      transform,
      global_batch_size=batch_size or stage_cfg.batch_size,
      seed=seed,
      split=split,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_epochs=num_epochs,
      source=source,
  )


def _numeric(batch: dict) -> dict:
  """The entries of a host batch that enter the jitted step (strings are dropped)."""
  return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "OUS"}


def example_batch(method, batch_size: int = 1) -> dict:
  """`batch_size` rows of a stage's training data from its run config's data source,
  through the method's own transform and source wrapper: the batch the trainer takes its
  shapes from (numeric entries only, as numpy arrays)."""
  config = method.config.copy_and_resolve_references()
  config.data.update(num_threads=1, num_workers=0, prefetch_buffer_size=1)  # no read-ahead
  loader = _make_loader(
      config,
      method.cfg,
      method.data_transform("train"),
      "train",
      config.seed,
      batch_size=batch_size,
      source_fn=method.data_source,
  )
  try:
    return _numeric(next(loader))
  finally:
    loader.close()


def abstract_params(method) -> dict:
  """{group: params} as the stage's trainer initialises them, as jax.ShapeDtypeStruct leaves
  (unboxed, nothing allocated), from `Method.init` on the shapes of `example_batch`.

  What `runs.abstract` gives a later stage in place of a finished run's checkpoint.
  """
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example_batch(method).items()}
  init = lambda r: method.init(r, {k: jnp.zeros(v.shape, v.dtype) for k, v in spec.items()})
  variables = jax.eval_shape(init, jax.random.PRNGKey(method.config.seed))
  return split_variables(nn.unbox(variables), method.groups)[0]


def stage_ema_decay(config, stage: str) -> float:
  """EMA decay of one stage: `config.<stage>.ema_decay` if the stage sets it, else ema_decay.

  0 means the stage keeps no EMA copy (TrainState.ema is empty; inference uses params).
  """
  decay = config[stage].get("ema_decay", None)
  return float(config.get("ema_decay", 0.0) if decay is None else decay)


def ema_groups(method, config) -> tuple[str, ...]:
  """The groups with an EMA copy: the method's ema_groups unless the stage's decay is 0."""
  return tuple(method.ema_groups) if stage_ema_decay(config, method.stage) > 0 else ()


def split_variables(variables, groups) -> tuple[dict, dict]:
  """(params, model_state) from `Method.init`'s output, either form (see methods/base.py)."""
  if "params" in variables and "params" not in groups:
    params, state = variables["params"], dict(variables.get("state", {}))
    extra = set(variables) - {"params", "state"}
    if extra:
      raise ValueError(f"Method.init returned unknown keys {sorted(extra)}; use params/state")
  else:
    params, state = variables, {}
  if set(params) != set(groups):
    raise ValueError(f"Method.init returned groups {sorted(params)}, expected {sorted(groups)}")
  if not set(state) <= set(groups):
    raise ValueError(f"Method.init state names unknown groups {sorted(set(state) - set(groups))}")
  return params, state


def build_state(method, config, mesh, rules, first_batch, materialize=True):
  """eval_shape -> shardings -> jit(init). Returns (state, state_shardings, txs).

  With materialize=False nothing is initialised: `state` is the abstract state whose
  leaves carry their target shardings, the restore target of a resumed run.
  """
  groups = method.groups
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in first_batch.items()}

  def dummy_batch():  # zeros of the batch's shapes, built inside the traced init
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}

  abstract_params, _ = split_variables(
      jax.eval_shape(lambda r: method.init(r, dummy_batch()), init_rng), groups
  )
  txs = {
      g: optim_lib.make_optimizer(method.optimizer_config(g), abstract_params[g]) for g in groups
  }
  with_ema = ema_groups(method, config)

  def init_fn(r):
    params, model_state = split_variables(method.init(r, dummy_batch()), groups)  # boxed
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={g: params[g] for g in groups},
        opt_state={g: txs[g].init(params[g]) for g in groups},
        ema={g: jax.tree.map(lambda x: x, params[g]) for g in with_ema},
        rng=train_rng,
        nonfinite=jnp.zeros((), jnp.int32),
        model_state=model_state,
    )

  with mesh, nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_fn, init_rng)
    shardings = shard_lib.logical_shardings(abstract_state, mesh, rules)  # unboxed tree
    if not materialize:
      abstract = ckpt_lib.abstract_with_shardings(nn.unbox(abstract_state), shardings)
      return abstract, shardings, txs
    state = jax.jit(init_fn, out_shardings=shardings)(init_rng)
  return nn.unbox(state), shardings, txs


def _merge_state(model_state, updates, group):
  """model_state with the {group: {collection: tree}} `updates` of `group`'s loss written in."""
  if not isinstance(updates, dict):
    raise TypeError(f"the {group!r} loss returned state updates of type {type(updates)}")
  out = dict(model_state)
  for g, cols in updates.items():
    for name, tree in cols.items():
      if name not in out.get(g, {}):
        raise ValueError(
            f"the {group!r} loss updated {g}/{name}, which Method.init did not return as state"
        )
      old = out[g][name]
      if jax.tree.structure(tree) != jax.tree.structure(old) or any(
          a.shape != b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(old))
      ):
        raise ValueError(f"the {group!r} loss changed the structure or shapes of {g}/{name}")
      out[g] = {**out[g], name: jax.tree.map(lambda n, o: n.astype(o.dtype), tree, old)}
  return out


def make_train_step(method, txs, config):
  """The step: per group value_and_grad -> optax update; state updates; EMA; skip non-finite."""
  ema_decay = stage_ema_decay(config, method.stage)
  ema_every = int(config[method.stage].get("ema_every", 1))  # update cadence (∞-Diff: 10)
  with_ema = ema_groups(method, config)

  def train_step(state: TrainState, batch, aux):
    rng = jax.random.fold_in(state.rng, state.step)
    params = dict(state.params)
    opt_state = dict(state.opt_state)
    model_state = dict(state.model_state)
    metrics = {}
    finite = jnp.array(True)
    for i, g in enumerate(method.groups):
      g_rng = jax.random.fold_in(rng, i)
      # Methods with mutable state get it as a keyword; the others keep the old signature.
      kw = {"state": model_state} if model_state else {}

      def loss_fn(p, g=g, g_rng=g_rng, kw=kw):
        out = method.loss(g, {**params, g: p}, aux, batch, g_rng, state.step, **kw)
        loss, m, *updates = out  # (loss, metrics) or (loss, metrics, state updates)
        return loss, (m, updates[0] if updates else {})

      (loss, (m, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params[g])
      updates_tx, new_opt = txs[g].update(grads, opt_state[g], params[g])
      new_params = optax.apply_updates(params[g], updates_tx)
      grad_norm = optax.tree.norm(grads)
      g_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      finite = finite & g_finite
      params[g], opt_state[g] = new_params, new_opt
      model_state = _merge_state(model_state, updates, g)
      metrics[f"{g}/loss"] = loss
      metrics[f"{g}/grad_norm"] = grad_norm
      metrics.update({f"{g}/{k}": v for k, v in m.items()})

    ema = {
        g: optim_lib.ema_update(state.ema[g], params[g], ema_decay, state.step, ema_every)
        for g in with_ema
    }
    new = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema=ema,
        nonfinite=jnp.int32(0),
        model_state=model_state,
    )
    # A non-finite loss or gradient leaves the state unchanged (params, optimiser, EMA and
    # model state) except step and counter.
    skipped = state.replace(step=state.step + 1, nonfinite=state.nonfinite + 1)
    out = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
    metrics["nonfinite_skipped"] = 1.0 - finite.astype(jnp.float32)
    return out, metrics

  return train_step


def _average(history):
  """clu Average of each fetched per-step metric over one logging interval."""
  out = {}
  for name in sorted(history[0]):
    acc = clu_metrics.Average.from_model_output(np.stack([m[name] for m in history]))
    out[name] = float(acc.compute())
  return out


def stage_steps(config, stage: str) -> int:
  """Steps of one stage: `config.<stage>.total_steps` if the stage sets it, else total_steps."""
  return int(config[stage].get("total_steps", None) or config.total_steps)


def train_stage(config, stage: str, workdir: str) -> TrainState | None:
  """Trains one stage to its `stage_steps`, resuming from workdir if possible."""
  os.makedirs(workdir, exist_ok=True)
  method = get_method_class(stage)(config, stage, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  # Data first: a bad source fails here, before anything compiles and before the
  # checkpoint manager starts its background threads.
  transform = method.data_transform("train")
  data_iter = _make_loader(
      config, config[stage], transform, "train", config.seed, source_fn=method.data_source
  )
  mngr = ckpt_lib.manager(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, save_every=1
  )
  try:
    return _train_stage(config, stage, workdir, method, mngr, data_iter)
  finally:
    # Also on errors: an open manager's background threads would fail at interpreter exit.
    ckpt_lib.close(mngr)


def _train_stage(config, stage, workdir, method, mngr, data_iter):
  """The body of `train_stage` once the data iterator and checkpoint manager exist."""
  latest = mngr.latest_step()
  total = stage_steps(config, stage)
  if latest is not None and latest >= total:
    logging.info("[%s] already trained to step %d; skipping.", stage, latest)
    return None

  cfg = config[stage]
  start_data_state = data_iter.get_state()
  first = next(data_iter)  # only for shapes; the stream is rewound below
  host_first = _numeric(first)

  mesh = shard_lib.make_mesh(config.mesh)
  logging.info(
      "[%s] mesh %s over %d devices in %d processes",
      stage,
      dict(mesh.shape),
      jax.device_count(),
      jax.process_count(),
  )
  rules = shard_lib.rules_from_config(config.logical_axis_rules)
  dp = shard_lib.data_parallel_size(mesh)
  if cfg.batch_size % dp:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {dp} data-parallel devices")

  aux = method.prepare(mesh, training=True)
  # A resumed run restores straight into the target shardings, without initialising.
  state, shardings, txs = build_state(
      method, config, mesh, rules, host_first, materialize=latest is None
  )
  start_step = 0
  if latest is not None:
    # The newest readable step; unreadable newer ones are moved aside with a warning.
    # Parameters and data-iterator state come from the same step.
    state, data_state, _ = ckpt_lib.restore_newest_readable(mngr, state, stage)
    data_iter.set_state(data_state if data_state is not None else start_data_state)
    start_step = int(jax.device_get(state.step))
    logging.info("[%s] resumed from step %d", stage, start_step)
  else:
    data_iter.set_state(start_data_state)
  if jax.process_index() == 0:
    logging.info(
        "[%s] parameters:\n%s", stage, parameter_overview.get_parameter_overview(state.params)
    )

  batch_shardings = {
      k: shard_lib.batch_sharding(mesh, np.asarray(v).ndim) for k, v in host_first.items()
  }
  # Frozen inputs are placed like parameters: boxed leaves by their logical names.
  aux, aux_shardings = shard_lib.put_logical(aux, mesh, rules)
  step_fn = jax.jit(
      make_train_step(method, txs, config),
      in_shardings=(shardings, batch_shardings, aux_shardings),
      out_shardings=(shardings, None),
      donate_argnums=(0,),
  )
  writer = utils.MetricWriter(workdir) if jax.process_index() == 0 else utils.NullWriter()
  ctx = StageContext(
      config,
      method,
      mesh,
      state,
      aux,
      workdir,
      writer,
      functools.partial(_make_loader, config, cfg, seed=config.seed + 1),
  )
  evaluators = utils.make_evaluators(config, stage)

  history = []
  progress = utils.Progress(total, start_step)
  step = start_step
  with _SignalFlag() as sig, mesh, nn.logical_axis_rules(rules):
    while step < total:
      try:
        host_batch = next(data_iter)
      except StopIteration:
        raise ValueError(f"[{stage}] the data source ran out at step {step}") from None
      batch = shard_lib.host_batch_to_global(host_batch, mesh)
      state, metrics = step_fn(state, batch, aux)
      step += 1
      history.append(metrics)

      if step % config.log_every == 0 or step == total:
        fetched = jax.device_get(history)
        history = []
        scalars = _average(fetched)
        skipped = int(jax.device_get(state.nonfinite))
        if skipped >= config.max_nonfinite_steps:
          ckpt_lib.wait(mngr)
          raise FloatingPointError(
              f"[{stage}] loss was NaN/inf for {skipped} consecutive steps at step {step}; "
              "lower the learning rate or check the data"
          )
        scalars.update(progress.update(step))
        skip_counts = data_iter.skip_counts()
        writer.write_scalars(step, scalars)
        logging.info("[%s] %s", stage, utils.format_progress(step, total, scalars, skip_counts))

      if step % config.checkpoint_every == 0 or step == total:
        ckpt_lib.save(mngr, step, state, _iter_state(data_iter))
        ctx.state = state
        _write_summaries(method, ctx, host_batch, step)

      if evaluators:
        ctx.state = state
        for ev in evaluators:
          if step % ev.every == 0 or step == total:
            writer.write_scalars(step, ev.run(ctx, step))

      if sig.signum is not None:
        ckpt_lib.save(mngr, step, state, _iter_state(data_iter), force=True)
        ckpt_lib.wait(mngr)
        writer.flush()
        logging.info(
            "[%s] signal %d: checkpoint at step %d written; exiting", stage, sig.signum, step
        )
        raise Preempted(f"stopped by signal {sig.signum} at step {step}")

  ckpt_lib.wait(mngr)
  ctx.state = state
  method.finalize(ctx)
  writer.flush()
  return state


def _iter_state(it):
  return it.get_state()


def _write_summaries(method, ctx, host_batch, step):
  batch = {k: v for k, v in host_batch.items() if np.asarray(v).dtype.kind not in "OUS"}
  rng = jax.random.fold_in(jax.random.PRNGKey(ctx.config.seed), 10_000_000 + step)
  images = method.summaries(ctx.state.ema or ctx.state.params, ctx.aux, batch, rng)
  for name, img in images.items():
    ctx.writer.write_images(step, name, np.asarray(jax.device_get(img)))
