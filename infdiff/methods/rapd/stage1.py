"""RaPD stage 1: the generation-aware neural-image-field autoencoder (RaPD Sec. 3).

Loss (Eq. 3, 5-6, 9): L = |I_hat - I|_1 + lambda_lpips LPIPS + w_hyper * w_ada * L_distill,
with w_ada the gradient-norm ratio at the encoder's last conv (stop-gradient), both norms
from the loss's one encoder + renderer forward (infdiff.losses.adaptive).
Training examples come from the multi-resolution crop: the encoder sees an r x r
area-downsampled crop, the renderer is supervised on (a window of) the crop's full-
resolution coordinate grid.

The distillation target is DINOv2's patch tokens (`distill.target='dinov2'`, the paper)
or, on the built-in scenes and without weights, `shapes.semantic_map` of the encoder's
crop (`'shapes'`, not in RaPD): per-cell background, class and colour fractions and the
offset from the object's centre, the semantics a DINOv2 teacher would lend the latent.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from infdiff import fields
from infdiff.data import shapes, transforms
from infdiff.losses import adaptive
from infdiff.losses.distill import distill_loss
from infdiff.methods import base, latents
from infdiff.models.nif import NIFAutoencoder


def _dtype(name):
  return jnp.dtype(name)


def build_model(cfg, teacher_dim: int = 0) -> NIFAutoencoder:
  return NIFAutoencoder(
      encoder=cfg.encoder.to_dict(),
      renderer=cfg.renderer.to_dict(),
      teacher_dim=teacher_dim,
      dtype=_dtype(cfg.dtype),
  )


def _last_layer_path(params) -> tuple[str, ...]:
  """Path of the encoder's last conv kernel ('enc/last_conv/kernel'), theta_L of w_ada."""
  enc = params["enc"]
  if "last_conv" not in enc:
    raise ValueError("the encoder has no 'last_conv' layer for the adaptive weight")
  return ("enc", "last_conv", "kernel")


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)
  if len(path) == 1:
    tree[path[0]] = value
    return tree
  tree[path[0]] = _set(tree[path[0]], path[1:], value)
  return tree


def roughness(z: jax.Array) -> jax.Array:
  """Scale-free high-frequency share of a latent [B, h, w, C]: 1 for white noise, 0 if flat.

  Per channel, the mean squared difference of horizontal and vertical neighbours over 4x
  the channel's variance in the batch (stop-gradient, so the encoder cannot lower it by
  shrinking the latent), then the mean over channels.
  """
  z = z.astype(jnp.float32)
  dh = jnp.mean(jnp.square(z[:, 1:] - z[:, :-1]), axis=(0, 1, 2))  # [C]
  dw = jnp.mean(jnp.square(z[:, :, 1:] - z[:, :, :-1]), axis=(0, 1, 2))
  var = jax.lax.stop_gradient(jnp.var(z, axis=(0, 1, 2)))
  return jnp.mean((dh + dw) / (4.0 * var + 1e-8))


def noisy_latent(z: jax.Array, key: jax.Array, max_sigma: float) -> jax.Array:
  """z + sigma * std * eps: the latent a renderer trained for off-manifold samples sees.

  Per sample sigma ~ U[0, max_sigma]; std is the per-channel standard deviation of z in the
  batch (stop-gradient, so the encoder cannot shrink the noise by growing the latent: the
  scale stage 2 normalises by); eps ~ N(0, 1). The gradient with respect to z is the
  identity.
  """
  k_sigma, k_eps = jax.random.split(key)
  zf = z.astype(jnp.float32)
  sigma = jax.random.uniform(k_sigma, (z.shape[0],) + (1,) * (z.ndim - 1), maxval=max_sigma)
  std = jax.lax.stop_gradient(jnp.std(zf, axis=tuple(range(z.ndim - 1))))  # [C]
  eps = jax.random.normal(k_eps, z.shape, jnp.float32)
  return (zf + sigma * std * eps).astype(z.dtype)


class Method(base.Method):
  """RaPD stage 1 (also the renderer ablations liif / clif / cqar)."""

  provides = (base.AUTOENCODER,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    self.teacher = None
    self.lpips = None
    self.teacher_dim = 0
    self.distill_target = None  # 'dinov2' | 'shapes' while training with distillation
    d = self.cfg.distill
    # The teacher and LPIPS are training-only: inference builds the model without them.
    target = d.get("target", "dinov2")
    if not 0.0 <= float(self.cfg.get("render_noise", 0.0)) <= 10.0:
      raise ValueError(f"{stage}.render_noise={self.cfg.render_noise}; use a value in [0, 10]")
    if target not in ("dinov2", "shapes"):
      raise ValueError(f"{stage}.distill.target={target!r}; use 'dinov2' or 'shapes'")
    if d.weight > 0 and training and target == "shapes":
      if config.data.source != "shapes":
        raise ValueError(
            f"{stage}.distill.target='shapes' needs data.source=shapes, not "
            f"{config.data.source!r}; set {stage}.distill.weight=0 (or target='dinov2' with "
            "a teacher) for other data"
        )
      gh, gw = (int(x) for x in d.teacher_grid)
      if gh != gw:
        raise ValueError(f"{stage}.distill.teacher_grid {d.teacher_grid} must be square")
      self.distill_target = "shapes"
      self.semantic_idx = shapes.semantic_indices(tuple(d.get("shapes_features", ())))
      self.teacher_dim = len(self.semantic_idx)
    elif d.weight > 0 and training:
      self.distill_target = "dinov2"
      if not d.teacher_path:
        raise ValueError(
            f"{stage}.distill.weight > 0 needs {stage}.distill.teacher_path (a DINOv2 checkpoint "
            f"directory); set {stage}.distill.weight=0 to train without distillation"
        )
      from infdiff import pretrained

      teacher, self._teacher_params = pretrained.load("dinov2", d.teacher_path)
      # Resize the teacher's input so its patch grid is exactly teacher_grid.
      gh, gw = (int(x) for x in d.teacher_grid)
      self.teacher = teacher.clone(image_size=(gh * teacher.patch_size, gw * teacher.patch_size))
      self.teacher_dim = int(teacher.hidden_size)
    if self.cfg.lpips_weight > 0 and training:
      if not self.cfg.lpips_path:
        raise ValueError(
            f"{stage}.lpips_weight > 0 needs {stage}.lpips_path (a VGG16-LPIPS checkpoint "
            f"directory); set {stage}.lpips_weight=0 to train with L1 only"
        )
      from infdiff import pretrained

      self.lpips, self._lpips_params = pretrained.load("lpips_vgg16", self.cfg.lpips_path)
    self.model = build_model(self.cfg, self.teacher_dim)

  # --- data -----------------------------------------------------------------------
  def data_transform(self, split):
    c = self.cfg
    crop = transforms.MultiResCrop(
        enc_size=c.enc_size,
        s_max=c.s_max,
        target_window=c.target_window or None,
        with_box=self.distill_target == "shapes",
    )
    if self.distill_target != "shapes":
      return crop
    # The scene semantics of exactly the crop the encoder sees, on the teacher grid.
    grid = int(c.distill.teacher_grid[0])
    return transforms.Compose((crop, transforms.ShapesSemantics(grid=grid)))

  # --- state ----------------------------------------------------------------------
  def prepare(self, mesh, training=True):
    del mesh
    aux = {}
    if not training:  # the teacher and LPIPS only enter the training loss
      return aux
    if self.teacher is not None:
      aux["teacher"] = self._teacher_params
    if self.lpips is not None:
      aux["lpips"] = self._lpips_params
    return aux

  def _teacher_hw(self):
    return tuple(self.cfg.distill.teacher_grid)

  def init(self, rng, batch):
    hw = self._teacher_hw() if self.distill_target is not None else None
    variables = self.model.init(rng, batch["image"], batch["coord"], batch["cell"], hw)
    return {"model": variables["params"]}

  # --- loss -----------------------------------------------------------------------
  def _rec_loss(self, rgb, target, aux, z):
    l1 = jnp.mean(jnp.abs(rgb.astype(jnp.float32) - target))
    rough = roughness(z)
    metrics = {"l1": l1, "roughness": rough}
    loss = l1
    if self.cfg.smooth_weight > 0:
      loss = loss + self.cfg.smooth_weight * rough
    if self.lpips is not None:
      lp = jnp.mean(self.lpips.apply(aux["lpips"], rgb.astype(jnp.float32), target))
      metrics["lpips"] = lp
      loss = loss + self.cfg.lpips_weight * lp
    return loss, metrics

  def _teacher_tokens(self, aux, image):
    out = self.teacher.apply(aux["teacher"], image)
    tokens = out["patch_tokens"]  # [B, h, w, D]
    h, w = self._teacher_hw()
    if tokens.shape[1:3] != (h, w):
      raise ValueError(
          f"teacher gives a {tokens.shape[1]}x{tokens.shape[2]} patch grid but "
          f"distill.teacher_grid is {h}x{w}"
      )
    return jax.lax.stop_gradient(tokens.reshape(tokens.shape[0], h * w, -1))

  def _render_train(self, p, z, batch, rng):
    """The training render; from a noised latent when render_noise > 0 (not in RaPD)."""
    zr = z
    if self.cfg.get("render_noise", 0.0) > 0:
      zr = noisy_latent(z, jax.random.fold_in(rng, 1), float(self.cfg.render_noise))
    return self.model.apply({"params": p}, zr, batch["coord"], batch["cell"], method="render")

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    p = params["model"]
    image, target = batch["image"], batch["target"]
    if self.distill_target is None:
      z = self.model.apply({"params": p}, image, method="encode")
      rgb = self._render_train(p, z, batch, rng)
      return self._rec_loss(rgb, target, aux, z)

    d = self.cfg.distill
    if self.distill_target == "shapes":
      sem = batch["semantic"]  # [B, h, w, SEMANTIC_DIM] from the data pipeline
      sem = jnp.take(jnp.asarray(sem), np.asarray(self.semantic_idx), axis=-1)  # the groups
      teacher = sem.reshape(sem.shape[0], -1, sem.shape[-1]).astype(jnp.float32)
    else:
      teacher = self._teacher_tokens(aux, image)  # [B, h*w, D], constant
    hw = self._teacher_hw()
    path = _last_layer_path(p)

    # One forward: the latent with theta_L in place, then each loss from that latent.
    def latent_at(theta):
      z = self.model.apply({"params": _set(p, path, theta)}, image, method="encode")
      return z, None  # [B, r, r, C]

    def rec_of(z):
      return self._rec_loss(self._render_train(p, z, batch, rng), target, aux, z)

    def distill_of(z):
      student = self.model.apply({"params": p}, z, *hw, method="project")  # [B, h*w, D]
      return distill_loss(student.astype(jnp.float32), teacher, d.m1, d.m2)

    # Eq. 9: w_ada = ||grad L_rec|| / (||grad L_distill|| + 1e-6) at theta_L, stop-gradient.
    # The clip at 1e4 (the helper's default, VQGAN's) is not in the paper; it only bounds
    # the weight when the distillation gradient vanishes.
    ada = adaptive.adaptive_weight(latent_at, rec_of, distill_of, _get(p, path), eps=1e-6)
    metrics = {**ada.aux_a, **ada.aux_b, "w_ada": ada.weight, "distill": ada.loss_b}
    return ada.loss_a + d.weight * ada.weight * ada.loss_b, metrics

  # --- summaries and after training ---------------------------------------------
  def summaries(self, params, aux, batch, rng):
    del aux, rng
    p = params["model"]
    n = min(4, batch["image"].shape[0])
    image = jnp.asarray(batch["image"][:n])
    r = image.shape[1]
    z = self.model.apply({"params": p}, image, method="encode")
    out = {"stage1/input": image}
    for k in (1, 2):
      coords = jnp.broadcast_to(fields.coord_grid(k * r, k * r), (n, k * r, k * r, 2))
      cells = jnp.broadcast_to(fields.cell_size(k * r, k * r), (n, 2))
      out[f"stage1/render_{k}x"] = self.model.apply(
          {"params": p}, z, coords, cells, method="render"
      )
    return out

  def make_inference(self, params, aux, *, tile=None, batch=None):
    """The `FieldAutoencoder` of these parameters (the distillation branch dropped)."""
    del aux
    from infdiff.methods.rapd import pipeline

    model = build_model(self.cfg, teacher_dim=0)
    return pipeline.Autoencoder(
        model, self.cfg, params, tile=tile, batch=batch, select=inference_params
    )

  def latent_stats(self) -> dict | None:
    """{'mean', 'std', 'count'} written by `finalize`, or None before it ran."""
    return latents.read_stats(self.workdir)

  def finalize(self, ctx):
    """Per-channel latent mean/std over the training set, stored beside the checkpoints."""
    latents.write_stats(self.workdir, latents.latent_statistics(self, ctx), self.stage)


def inference_params(params) -> dict:
  """{'enc', 'dec'} of a stage-1 parameter set: the training-only 'proj' branch dropped."""
  return {k: v for k, v in params["model"].items() if k != "proj"}
