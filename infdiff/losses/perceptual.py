"""LPIPS as an optional training term, loaded from the stage config's local checkpoint."""

from __future__ import annotations

import jax.numpy as jnp


class LPIPSTerm:
  """`<stage>.lpips_weight` x LPIPS(pred, target) when the weight is positive.

  Training-only: built with training=False (inference) it loads nothing. A positive
  weight without `<stage>.lpips_path` is a one-line ValueError naming both fields.
  """

  def __init__(self, cfg, stage: str, training: bool, fallback: str = "L1 only"):
    self.weight = float(cfg.get("lpips_weight", 0.0))
    self.model = self.params = None
    if self.weight <= 0 or not training:
      return
    if not cfg.get("lpips_path", ""):
      raise ValueError(
          f"{stage}.lpips_weight > 0 needs {stage}.lpips_path (a VGG16-LPIPS checkpoint "
          f"directory); set {stage}.lpips_weight=0 to train with {fallback}"
      )
    from infdiff import pretrained

    self.model, self.params = pretrained.load("lpips_vgg16", cfg.lpips_path)

  @property
  def active(self) -> bool:
    return self.model is not None

  def __call__(self, params, pred, target):
    """Mean LPIPS of [B, H, W, 3] images in [0, 1]; `params` is this term's aux entry."""
    return jnp.mean(self.model.apply(params, pred.astype(jnp.float32), target))

  def with_l1(self, aux, pred, target):
    """(L1 on the [-1, 1] scale + weight x LPIPS, metrics) of [0, 1] images: the
    reconstruction term of LDM-style autoencoders. `aux` holds this term's 'lpips' entry."""
    return self.reconstruction(aux, pred, target, "l1")

  def reconstruction(self, aux, pred, target, kind: str = "l1", valid=None):
    """(`kind` on the [-1, 1] scale + weight x LPIPS, metrics): kind 'l1' (mean absolute
    error) or 'l2' (mean squared error). `valid` [B, H, W] bool: the mean runs over the
    marked pixels only, and LPIPS sees the target in place of the others."""
    if kind not in ("l1", "l2"):
      raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    err = jnp.square(pred - target) * 4.0 if kind == "l2" else jnp.abs(pred - target) * 2.0
    if valid is None:
      rec = jnp.mean(err)
    else:
      m = valid[..., None].astype(jnp.float32)
      rec = jnp.sum(err * m) / jnp.maximum(jnp.sum(m) * err.shape[-1], 1.0)
      pred = jnp.where(valid[..., None], pred, target)
    metrics = {kind: rec}
    loss = rec
    if self.active:
      lp = self(aux["lpips"], pred, target)
      metrics["lpips"] = lp
      loss = loss + self.weight * lp
    return loss, metrics
