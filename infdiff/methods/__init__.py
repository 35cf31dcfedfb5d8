"""Training methods: one package per method, one module per stage, each exposing `Method`.

A run names its stages in `config.stages` (flat config keys such as `rapd_stage1`);
`STAGES` maps a stage name to the module that implements it, so adding a method adds
its package and one line here and never touches the trainer, the sampler or the
evaluators (big_vision-style registry by module name).
"""

from __future__ import annotations

import importlib

# Stage name (the config key and the stage's directory under a run) -> module.
STAGES = {
    "rapd_stage1": "infdiff.methods.rapd.stage1",
    "rapd_stage2": "infdiff.methods.rapd.stage2",
    "infd_ae": "infdiff.methods.infd.autoencoder",
    "infd_ldm": "infdiff.methods.latent_ddpm",
    "infty_diff": "infdiff.methods.infty_diff.model",
    "infty_diff_latent": "infdiff.methods.infty_diff.latent",
    "patch_dm": "infdiff.methods.patch_dm.model",
    "patch_dm_codes": "infdiff.methods.patch_dm.codes",
    "vae": "infdiff.methods.infgen.vae",
    "infgen": "infdiff.methods.infgen.decoder",
    "latent_ddpm": "infdiff.methods.latent_ddpm",
}


def stage_module(name: str):
  """The module implementing stage `name`; a one-line ValueError if unknown."""
  if name not in STAGES:
    raise ValueError(f"unknown method/stage {name!r}; known: {', '.join(sorted(STAGES))}")
  return importlib.import_module(STAGES[name])


def get_method_class(name: str):
  """The `Method` class of stage `name`."""
  return stage_module(name).Method
