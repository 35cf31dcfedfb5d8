"""RaPD stage 2: text-conditioned flow matching in the normalised NIF latent.

x_1 = (E(I) - mu) / sigma from the frozen stage-1 encoder, x_t = t x_1 + (1 - t) eps with
shifted logit-normal t, loss |v(x_t, t, text) - (x_1 - eps)|^2 (+ REPA). Captions are
dropped with probability p so one model serves classifier-free guidance.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from infdiff import runs
from infdiff.data import pipeline as data_pipeline
from infdiff.data import shapes, transforms
from infdiff.diffusion import flow
from infdiff.methods import base
from infdiff.methods.rapd.stage1 import inference_params
from infdiff.models.dit import DiT
from infdiff.models.projectors import RepaProjector
from infdiff.models.text import WordVocab, build_text_encoder

VOCAB_FILE = "vocab.json"


def source_captions(data_cfg, limit: int) -> list[str]:
  """Captions of up to `limit` training records, without decoding images when possible."""
  source = data_pipeline.source_from_config(data_cfg, split="train")
  n = min(len(source), limit)
  if hasattr(source, "scene"):  # built-in shapes: captions come from scene parameters
    return [shapes.caption(source.scene(i)) for i in range(n)]
  if hasattr(source, "caption"):
    return [source.caption(i) for i in range(n)]
  return [source[i].get("caption", "") for i in range(n)]


def stage1_dir(config, workdir: str) -> str:
  """Stage-1 run directory: the configured one, else the sibling 'rapd_stage1'."""
  path = config.rapd_stage2.stage1_workdir
  if path:
    return (
        os.path.join(path, "rapd_stage1")
        if os.path.isdir(os.path.join(path, "rapd_stage1"))
        else path
    )
  return os.path.join(os.path.dirname(os.path.normpath(workdir)), "rapd_stage1")


class TextSide:
  """The tokenizer and text encoder of a stage-2 run, rebuilt the same way for sampling."""

  def __init__(self, cfg, workdir: str, captions_fn=None):
    t = cfg.text
    self.max_length = t.max_length
    if t.encoder == "small":
      path = os.path.join(workdir, VOCAB_FILE)
      if os.path.exists(path):
        self.vocab = WordVocab.load(path)
      elif captions_fn is not None:
        self.vocab = WordVocab.build(captions_fn(), t.vocab_size)
        os.makedirs(workdir, exist_ok=True)
        self.vocab.save(path)
      else:
        raise FileNotFoundError(f"no {VOCAB_FILE} in {workdir}: is this a stage-2 run directory?")
      self.encoder = build_text_encoder(
          "small",
          vocab_size=len(self.vocab),
          width=t.width,
          depth=t.depth,
          heads=t.heads,
          max_length=t.max_length,
      )
      self.tokenize_batch = lambda texts: self.vocab.encode(list(texts), self.max_length)
    elif t.encoder == "qwen3":
      from infdiff import pretrained

      self.encoder = build_text_encoder("qwen3", path=t.path)
      self.tokenize_batch = lambda texts: pretrained.tokenize(t.path, list(texts), self.max_length)
    else:
      raise ValueError(f"unknown text encoder {t.encoder!r}; use 'small' or 'qwen3'")

  def tokenize_one(self, caption: str):
    ids, mask = self.tokenize_batch([caption])
    return ids[0], mask[0]


def build_dit(cfg, text_width: int, latent_channels: int) -> DiT:
  return DiT(
      **cfg.dit.to_dict(),
      in_channels=latent_channels,
      text_dim=text_width,
      dtype=jnp.dtype(cfg.dtype),
  )


class Method(base.Method):
  """RaPD stage 2 on a finished stage-1 run."""

  provides = (base.GENERATOR,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.s1_dir = stage1_dir(config, workdir)
    # The frozen stage 1, read like any run (EMA parameters where it keeps them).
    s1 = runs.load_run(self.s1_dir)
    self.ae = s1.method.model  # built without the training-only distillation branch
    self.s1_cfg = s1.method.cfg
    self._ae_params = inference_params(s1.params)  # {'enc', 'dec'}
    stats = s1.method.latent_stats()
    if stats is None:
      raise FileNotFoundError(f"stage-1 run {self.s1_dir} has no latent_stats.json")
    self.latent_mean = np.asarray(stats["mean"], np.float32)  # [C]
    self.latent_std = np.asarray(stats["std"], np.float32)  # [C]
    # Stage 2 trains on images of stage 1's encoder size; the latent grid is that size over
    # the encoder's latent stride (1 in RaPD: the latent keeps the image resolution).
    self.image_size = int(self.s1_cfg.enc_size)
    self.latent_size = self.image_size // int(self.s1_cfg.encoder.get("downsample", 1))
    if self.latent_size % c.dit.patch:
      raise ValueError(
          f"stage-1 latent side {self.latent_size} is not a multiple of rapd_stage2.dit.patch="
          f"{c.dit.patch}"
      )
    if c.flow.get("predict", "v") not in flow.PREDICTIONS:
      raise ValueError(
          f"rapd_stage2.flow.predict={c.flow.predict!r}; use one of {flow.PREDICTIONS}"
      )
    self.text = TextSide(c, workdir, lambda: source_captions(config.data, c.text.vocab_captions))
    self.dit = build_dit(c, self.text.encoder.width, len(self.latent_mean))
    self.teacher = None
    self.repa_target = None  # 'dinov2' | 'shapes' while training with REPA
    self.repa_grid = self.latent_size // c.dit.patch  # one target vector per DiT token
    if c.repa.weight > 0 and training:  # the REPA teacher is training-only
      self.repa_target = c.repa.get("target", "dinov2")
    if c.repa.get("foreground", False) and c.repa.get("target", "dinov2") != "shapes":
      raise ValueError("rapd_stage2.repa.foreground=True needs rapd_stage2.repa.target='shapes'")
    if self.repa_target == "shapes":
      # Weight-free stand-in for DINOv2 on the built-in scenes: analytic per-token class,
      # colour and part features (shapes.semantic_map), built by the data pipeline.
      if config.data.source != "shapes":
        raise ValueError(
            f"rapd_stage2.repa.target='shapes' needs data.source=shapes, not "
            f"{config.data.source!r}"
        )
      self.repa_proj = RepaProjector(c.repa.hidden, shapes.SEMANTIC_DIM)
    elif self.repa_target == "dinov2":
      if not c.repa.teacher_path:
        raise ValueError("rapd_stage2.repa.weight > 0 needs rapd_stage2.repa.teacher_path (DINOv2)")
      from infdiff import pretrained

      teacher, self._teacher_params = pretrained.load("dinov2", c.repa.teacher_path)
      # One teacher patch per DiT token: resize the teacher's input to grid * its patch.
      side = self.repa_grid * teacher.patch_size
      self.teacher = teacher.clone(image_size=(side, side))
      self.repa_proj = RepaProjector(c.repa.hidden, int(teacher.hidden_size))
    elif self.repa_target is not None:
      raise ValueError(f"rapd_stage2.repa.target={self.repa_target!r}; use 'dinov2' or 'shapes'")

  def data_transform(self, split):
    del split
    steps = [
        transforms.RandomResizedSquare(size=self.image_size),
        transforms.Tokenize(self.text.tokenize_one),
    ]
    if self.repa_target == "shapes":
      steps.append(transforms.ShapesSemantics(grid=self.repa_grid))
    return transforms.Compose(tuple(steps))

  def prepare(self, mesh, training=True):
    del mesh, training  # the teacher is loaded only when training (see __init__)
    aux = {"ae": self._ae_params, "mean": self.latent_mean, "std": self.latent_std}
    if not self.text.encoder.trainable:
      aux["text"] = self.text.encoder.init(None, None, None)
    if self.teacher is not None:
      aux["teacher"] = self._teacher_params
    return aux

  def init(self, rng, batch):
    r_dit, r_text, r_proj = jax.random.split(rng, 3)
    ids, mask = batch["text_ids"], batch["text_mask"]
    params = {}
    if self.text.encoder.trainable:
      params["text"] = self.text.encoder.init(r_text, ids, mask)["params"]
    hidden = jnp.zeros((*ids.shape, self.text.encoder.width), jnp.float32)
    b, r = batch["image"].shape[0], self.latent_size
    x = jnp.zeros((b, r, r, len(self.latent_mean)), jnp.float32)
    params["dit"] = self.dit.init(r_dit, x, jnp.zeros((b,)), hidden, mask)["params"]
    if self.repa_target is not None:
      n = self.repa_grid**2
      params["repa"] = self.repa_proj.init(r_proj, jnp.zeros((b, n, self.cfg.dit.width)))["params"]
    return {"model": params}

  # --- pieces shared with sampling --------------------------------------------------
  def encode_text(self, params, aux, ids, mask):
    p = {"params": params["text"]} if self.text.encoder.trainable else aux["text"]
    return self.text.encoder.encode(p, ids, mask)

  @staticmethod
  def normalise(aux, z):
    """Stage-1 latent -> the normalised latent stage 2 models: (z - mu) / sigma."""
    return (z.astype(jnp.float32) - aux["mean"]) / aux["std"]

  @staticmethod
  def denormalise(aux, x):
    """The exact inverse of `normalise`: x * sigma + mu."""
    return x * aux["std"] + aux["mean"]

  def normalised_latent(self, aux, image):
    z = self.ae.apply({"params": aux["ae"]}, image, method="encode")
    return jax.lax.stop_gradient(self.normalise(aux, z))

  def loss(self, group, params, aux, batch, rng, step):
    del group, step
    c = self.cfg
    p = params["model"]
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    x1 = self.normalised_latent(aux, batch["image"])  # [B, r, r, C]
    b = x1.shape[0]
    t = flow.sample_train_t(r_t, (b,), c.flow.mu, c.flow.sigma, c.flow.shift)
    eps = jax.random.normal(r_eps, x1.shape, jnp.float32)
    xt = flow.interpolate(x1, eps, t)
    keep = flow.drop_text(r_drop, batch["text_mask"], c.text.drop_prob)
    mask = batch["text_mask"] * keep[:, None].astype(batch["text_mask"].dtype)
    text = self.encode_text(p, aux, batch["text_ids"], mask)
    want_repa = self.repa_target is not None
    out = self.dit.apply(
        {"params": p["dit"]}, xt, t, text.hidden, mask, train=True, return_repa=want_repa
    )
    v = flow.velocity_from_output(out[0] if want_repa else out, xt, t, c.flow.get("predict", "v"))
    fm = flow.flow_matching_loss(v, x1, eps)
    metrics = {"flow": fm}
    loss = fm
    if want_repa:
      feats = out[1]  # [B, N, width]
      proj = self.repa_proj.apply({"params": p["repa"]}, feats)
      weights = None
      if self.repa_target == "shapes":
        sem = batch["semantic"]  # [B, g, g, D]
        tgt = sem.reshape(b, -1, sem.shape[-1]).astype(jnp.float32)
        # 'foreground': each token weighted by the share of it that objects cover, so the
        # (easily matched) background tokens do not dominate the alignment.
        if c.repa.get("foreground", False):
          weights = 1.0 - tgt[..., shapes.SEMANTIC_FEATURES.index("background")]
      else:
        tgt = self._teacher_targets(aux, batch["image"], self.repa_grid)
      rl = flow.repa_loss(proj, tgt, weights)
      metrics["repa"] = rl
      loss = loss + c.repa.weight * rl
    return loss, metrics

  def _teacher_targets(self, aux, image, grid: int):
    tokens = self.teacher.apply(aux["teacher"], image)["patch_tokens"]  # [B, g, g, D]
    b, _, _, d = tokens.shape
    return jax.lax.stop_gradient(tokens.astype(jnp.float32).reshape(b, grid * grid, d))

  # --- sampling ---------------------------------------------------------------------
  def make_inference(self, params, aux, **options):
    """The text-to-image `Generator` (options: num_steps, cfg_scale, batch_size, cfg_interval,
    shift, eta; each defaults to rapd_stage2.sample)."""
    from infdiff.methods.rapd import pipeline

    allowed = {"num_steps", "cfg_scale", "batch_size", "cfg_interval", "shift", "eta"}
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise ValueError(f"{self.stage} sampling has no option(s) {', '.join(unknown)}")
    return pipeline.TextToImage(self, params, aux, **options)

  def summaries(self, params, aux, batch, rng):
    del batch, rng
    gen = self.inference(params, aux)
    z = gen.latents(list(self.cfg.sample.prompts), seed=self.config.seed)
    return {f"samples/{s}x{s}": gen.render(z, s, s) for s in self.cfg.sample.sizes}

  def finalize(self, ctx):
    """Sample grids at the configured sizes into workdir/../samples (the run's root)."""
    from infdiff import sampling

    gen = self.inference(ctx.state.ema or ctx.state.params, ctx.aux)
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    z = gen.latents(list(self.cfg.sample.prompts), seed=self.config.seed)
    for s in self.cfg.sample.sizes:
      sampling.save_grid(os.path.join(out, f"grid_{s}x{s}.png"), gen.render(z, s, s))
    logging.info(
        "[%s] sample grids at %s written to %s", self.stage, list(self.cfg.sample.sizes), out
    )
