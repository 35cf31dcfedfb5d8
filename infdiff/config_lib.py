"""Shared pieces of the run configs in configs/ (top-level fields, preset parsing)."""

from __future__ import annotations

import os

import ml_collections


def parse_arg(arg: str | None, known: dict) -> ml_collections.ConfigDict:
  """'demo,renderer=liif,distill=False' -> ConfigDict, checked against `known` defaults.

  A bare word sets a boolean preset to True. Unknown words are a one-line ValueError,
  so `configs/rapd.py:dmeo` fails instead of silently training the full model.
  """
  out = ml_collections.ConfigDict(dict(known))
  for token in filter(None, (arg or "").split(",")):
    key, sep, value = token.partition("=")
    key = key.strip()
    if key not in known:
      raise ValueError(f"unknown preset {key!r}; known: {', '.join(sorted(known))}")
    default = known[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"preset {key!r} needs a value, e.g. {key}={default}")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"preset {key}={value!r}: expected True or False")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Top-level fields every run config has."""
  c = ml_collections.ConfigDict()
  c.stages = ()  # stage modules under infdiff.methods, trained in order into workdir/<stage>
  c.seed = 0  # seeds params, data order and every per-step key
  c.total_steps = 1000  # steps of each stage (a stage may set its own <stage>.total_steps)
  c.log_every = 50  # steps between scalar logs and the progress line
  c.checkpoint_every = 1000  # steps between checkpoints (also at the end and on SIGTERM)
  c.keep_checkpoints = 3  # newest checkpoints kept
  c.max_nonfinite_steps = 20  # consecutive NaN/inf steps (each skipped) before the run stops
  c.ema_decay = 0.9999  # EMA of trainable params (used for sampling/eval)
  # Mesh over ('data', 'fsdp', 'tensor'); -1 means "all remaining devices".
  c.mesh = (-1, 1, 1)
  # Logical axis -> mesh axes. Parameters: 'embed' and 'conv_out' over fsdp, heads/mlp/vocab
  # over tensor. Activations carry their own `act_*` names (maxtext style), so their layout
  # is chosen apart from the parameters': batch over the data-parallel axes, heads and the
  # MLP hidden over tensor (matching the tensor-sharded kernels that produce them).
  c.logical_axis_rules = (
      ("act_batch", ("data", "fsdp")),
      ("act_len", None),
      ("act_height", None),
      ("act_width", None),
      ("act_embed", None),
      ("act_mlp", "tensor"),
      ("act_heads", "tensor"),
      ("act_kv", None),
      ("act_latent", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("conv_in", None),
      ("conv_out", "fsdp"),
      ("latent", None),
      ("norm", None),
      ("rel_pos", None),
  )
  # Persistent XLA compilation cache shared by runs ('' disables): a restarted or resumed
  # run, and the sample/evaluate CLIs, skip recompiling identical programs.
  c.compilation_cache_dir = "~/.cache/infdiff/xla"
  c.evals = ml_collections.ConfigDict()  # name -> {metric, every, stage, ...}
  return c


def optim_config(lr: float, total_steps: int, warmup: int = 0, schedule: str = "constant"):
  """AdamW settings; every field can be overridden with --config.<stage>.optim.<field>."""
  o = ml_collections.ConfigDict()
  o.lr = lr  # peak learning rate
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.grad_clip = 1.0  # global-norm clip; 0 disables
  o.grad_clip_per = ()  # top-level param sub-trees clipped each on its own (∞-Diff)
  o.schedule = schedule  # 'constant' or 'cosine' (after warmup)
  o.warmup_steps = warmup
  o.decay_steps = total_steps  # cosine horizon
  o.end_factor = 0.0  # cosine floor as a fraction of lr
  o.frozen = ()  # regexes over '/'-joined param paths that are not updated
  return o


def required_path(
    path: str, *, when: str, stage: str, what: str, give: str, off: str = ""
) -> ml_collections.ConfigDict:
  """One entry of `config.required_paths` (see `check_required_paths`).

  Args:
    path: dotted config field holding the directory, e.g. 'rapd_stage1.lpips_path'.
    when: dotted field that makes the directory necessary: a number > 0 or a true value
      (e.g. a loss weight), or 'field=value' for an equality, e.g.
      'rapd_stage2.text.encoder=qwen3'; several joined by '&' must all hold.
    stage: the stage that needs it; the entry is skipped unless it is in config.stages.
    what: what the directory holds, for the message (e.g. 'VGG16-LPIPS').
    give: how to give it with a preset, e.g. 'lpips=DIR'.
    off: how to do without it, e.g. 'lpips=none'; '' when there is no such switch.

  Returns:
    A ConfigDict with these fields.
  """
  return ml_collections.ConfigDict(
      dict(path=path, when=when, stage=stage, what=what, give=give, off=off)
  )


def _field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _switched_on(config, when: str) -> bool:
  if "&" in when:
    return all(_switched_on(config, part) for part in when.split("&"))
  field, sep, value = when.partition("=")
  got = _field(config, field)
  if sep:
    return str(got) == value
  if isinstance(got, (int, float)) and not isinstance(got, bool):
    return got > 0
  return bool(got)


def check_required_paths(config, source: str = "the config") -> None:
  """Fails on one line naming every checkpoint directory the run needs and lacks.

  Runs before any stage (infdiff/main.py), on the config with its command-line overrides
  applied, so `--config.rapd_stage1.lpips_path=DIR` satisfies it as well as a preset.
  A directory is needed when its entry's stage is in `config.stages` and its `when`
  field is on; it is missing when its field is empty or not a directory. Configs without
  `required_paths` pass.

  Args:
    config: the run config; `config.required_paths` maps a name to `required_path(...)`.
    source: how the message names the config, e.g. 'configs/rapd.py'.

  Raises:
    ValueError: one line naming every missing directory, how to give each and how to
      switch off the losses that need them.
  """
  stages = tuple(config.stages)
  entries = [(n, e) for n, e in (config.get("required_paths") or {}).items() if e.stage in stages]
  entries.sort(key=lambda item: stages.index(item[1].stage))  # in the order the stages run
  missing, gives, offs = [], [], []
  for name, e in entries:
    if not _switched_on(config, e.when):
      continue
    path = _field(config, e.path)
    if path and os.path.isdir(path):
      continue
    problem = f"{e.path} not given" if not path else f"{e.path}={path} is not a directory"
    missing.append(f"{name} ({e.what}: {problem})")
    for seen, hint in ((gives, e.give), (offs, e.off)):
      if hint and hint not in seen:
        seen.append(hint)
  if missing:
    msg = f"{source} needs checkpoint directories: {', '.join(missing)}; give them"
    msg += f" (presets {', '.join(gives)}, or --config.<field>=DIR)" if gives else ""
    msg += f" or switch the losses off with {', '.join(offs)}" if offs else ""
    raise ValueError(msg)
