"""Evaluation metrics: one module per metric family, one registry.

Each module has
  `NEEDS`                     the contract it evaluates: base.AUTOENCODER or base.GENERATOR;
  `validate(args)`            checks its own arguments before anything loads (optional);
  `cli(args) -> Result`       what `python -m infdiff.evaluate` runs on a run directory;
  `class Evaluator(ecfg)`     `.run(ctx, step) -> {name: float}` during training.
"""

from __future__ import annotations

import importlib

# Metric name -> module under infdiff.evaluators (the only list of metrics).
METRICS = {
    "recon": "recon",
    "scale_consistency": "scale_consistency",
    "shapes_eval": "shapes_eval",
    "swd": "swd",
    "seams": "seams",
    "fid": "fid",
    "pfid": "fid",
    "fid_clip": "fid",
}


def metric_module(metric: str):
  """The evaluator module of a metric name (one-line ValueError for an unknown one)."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
  return importlib.import_module(f"infdiff.evaluators.{METRICS[metric]}")
