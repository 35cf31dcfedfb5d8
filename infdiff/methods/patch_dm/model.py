"""Patch-DM's main stage: a patch UNet trained with feature collage (METHODS.md: Patch-DM).

Per batch of training images x_0 [B, H, W, 3] in [-1, 1] (H, W multiples of the patch p):

  x_0 is padded by p / 2 with zeros (the padding is masked out of the loss) and noised,
  x_t = q_sample(pad(x_0), t, eps), linear betas 1e-4 -> 0.02, T = 1000;
  one random 2 x 2 block of the padded grid's patches, the same for the whole batch
  (`lax.dynamic_slice`: static shapes), gives 4 patches per image;
  the UNet encoder runs on the 4B patches (conditioned on t, each patch's position and
  the image's semantic code); the decoder predicts
    - the noise of the 4 patches from their own features (positions i, j), and
    - the noise of the shifted patch, the block's centre (image patch (i, j)), from the
      collaged features (`collage.collage`) at position (i + 0.5, j + 0.5);
  loss = MSE(shifted) + masked MSE(originals), eps-prediction.

Semantic code: one learned vector per training image (`codes` [N, K], looked up by the
example's source index; initialised from CLIP image embeddings by `clip_init`, else
N(0, 0.02^2)), or (`code.source='encoder'`) a jointly trained encoder: the UNet's down
path on the whole image resized to the patch, pooled to K. Both train in the one group
with the UNet. Classifier-free guidance (`cfg.enabled`): the code is dropped (zeroed) for
10% of the images and the position for 50%; sampling then mixes conditional and
unconditional predictions (`sampler.PatchDDIM`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging

from infdiff.data import pipeline, transforms
from infdiff.diffusion import gaussian
from infdiff.methods import base
from infdiff.methods.patch_dm import collage
from infdiff.models.unet import UNet


def build_unet(cfg, encoder: bool = False) -> UNet:
  """The patch UNet, or (`encoder`) the semantic encoder of `code.source='encoder'`: the
  same architecture unconditioned, of which only the down path is used."""
  u = cfg.unet
  cond = (
      {}
      if encoder
      else dict(dropout=u.dropout, cond_dim=int(cfg.pos_dim), code_dim=int(cfg.code.dim))
  )
  return UNet(
      image_size=int(cfg.patch),
      ch=u.ch,
      channel_mult=tuple(u.channel_mult),
      num_res_blocks=u.num_res_blocks,
      attention_resolutions=tuple(u.attention_resolutions),
      num_heads=u.num_heads,
      resblock_updown=u.resblock_updown,
      norm_groups=u.norm_groups,
      dtype=jnp.dtype(cfg.dtype),
      name="encoder" if encoder else None,
      **cond,
  )


def num_training_images(config) -> int:
  """Records in the training source (one semantic code each)."""
  return len(pipeline.source_from_config(config.data, split="train"))


class Method(base.Method):
  """Patch-DM: patch UNet + per-image semantic codes, feature-collage training."""

  provides = (base.GENERATOR,)

  def __init__(self, config, stage, workdir, *, training=True):
    super().__init__(config, stage, workdir, training=training)
    c = self.cfg
    self.patch = int(c.patch)
    self.height, self.width = int(c.image_height), int(c.image_width)
    levels = len(c.unet.channel_mult)
    collage.check_patch(self.height, self.width, self.patch, levels)
    self.grid = (self.height // self.patch, self.width // self.patch)
    if c.pos_dim % 4:
      raise ValueError(f"patch_dm.pos_dim must be a multiple of 4, got {c.pos_dim}")
    if c.code.source not in ("table", "encoder"):
      raise ValueError(f"patch_dm.code.source must be 'table' or 'encoder', got {c.code.source!r}")
    d = c.diffusion
    self.schedule = gaussian.make_schedule(
        "linear", int(d.num_steps), beta_start=float(d.beta_start), beta_end=float(d.beta_end)
    )
    self.parameterization = str(d.get("parameterization", "eps"))
    if self.parameterization not in gaussian.PARAMETERIZATIONS:
      raise ValueError(
          f"patch_dm.diffusion.parameterization must be one of {gaussian.PARAMETERIZATIONS}, "
          f"got {self.parameterization!r}"
      )
    self.unet = build_unet(c)
    self.encoder = build_unet(c, encoder=True) if c.code.source == "encoder" else None
    self.code_dim = int(c.code.dim)
    self.num_codes = int(c.code.num) or (
        num_training_images(config) if c.code.source == "table" else 0
    )
    # CLIP embeddings of the training images, computed on the host before the (traced)
    # init; only when training a table from scratch asks for them.
    self._clip_codes = None
    if training and c.code.source == "table" and c.code.clip_init:
      from infdiff.methods.patch_dm import clip_codes

      self._clip_codes = clip_codes.embed_training_images(config, c.code.clip_init, self.code_dim)
      if len(self._clip_codes) != self.num_codes:
        raise ValueError(
            f"patch_dm.code.num={self.num_codes} but the training source has "
            f"{len(self._clip_codes)} images to embed"
        )

  def data_transform(self, split):
    del split
    return transforms.ResizeTo(self.height, self.width)

  # --- parameters -------------------------------------------------------------------
  def init(self, rng, batch):
    k_unet, k_code, k_enc = jax.random.split(rng, 3)
    p = self.patch
    x = jnp.zeros((1, p, p, 3), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    pos = jnp.zeros((1, int(self.cfg.pos_dim)), jnp.float32)
    code = jnp.zeros((1, self.code_dim), jnp.float32)
    params = {"unet": self.unet.init(k_unet, x, t, pos, code)["params"]}
    if self.encoder is not None:
      params["encoder"] = self.encoder.init(
          k_enc, x, t, method=lambda m, x, t: self._encoder_features(m, x, t)
      )["params"]
      params["code_proj"] = {
          "kernel": jax.random.normal(k_code, (self._encoder_width(), self.code_dim)) * 0.02,
          "bias": jnp.zeros((self.code_dim,)),
      }
    else:
      params["codes"] = self.initial_codes(k_code)
    return {"model": params}

  def _encoder_width(self) -> int:
    u = self.cfg.unet
    return int(u.ch * u.channel_mult[-1])

  @staticmethod
  def _encoder_features(m, x, t):
    c = m.embed(t)
    _, h = m.encode(x, c)
    return jnp.mean(h, axis=(1, 2))

  def initial_codes(self, rng) -> jax.Array:
    """[N, K]: CLIP image embeddings of the training images (`code.clip_init`), or small
    random vectors."""
    c = self.cfg.code
    if self._clip_codes is not None:
      return jnp.asarray(self._clip_codes)
    return jax.random.normal(rng, (self.num_codes, self.code_dim), jnp.float32) * float(c.init_std)

  # --- conditioning -----------------------------------------------------------------
  def codes_for(self, p, batch) -> jax.Array:
    """[B, K] semantic codes of the batch's images."""
    if self.encoder is None:
      index = batch[pipeline.INDEX].astype(jnp.int32)
      return jnp.take(p["codes"], index, axis=0)
    img = batch["image"].astype(jnp.float32) * 2.0 - 1.0
    small = jax.image.resize(img, (img.shape[0], self.patch, self.patch, 3), "linear")
    t = jnp.zeros((img.shape[0],), jnp.int32)
    feats = self.encoder.apply(
        {"params": p["encoder"]}, small, t, method=lambda m, x, t: self._encoder_features(m, x, t)
    )
    return feats @ p["code_proj"]["kernel"] + p["code_proj"]["bias"]

  def embed(self, p, t, pos, code):
    """Conditioning of patches: t [N], pos [N, 2] (or None: no position), code [N, K]."""
    feats = collage.position_features(pos, int(self.cfg.pos_dim))
    return self.unet.apply({"params": p}, t, feats, code, method="embed")

  # --- training ---------------------------------------------------------------------
  def loss(self, group, params, aux, batch, rng, step):
    del group, aux, step
    p = params["model"]
    ps, (nh, nw) = self.patch, self.grid
    k_t, k_eps, k_blk, k_drop, k_cd, k_pd = jax.random.split(rng, 6)
    x0 = batch["image"].astype(jnp.float32) * 2.0 - 1.0
    b = x0.shape[0]
    x0p = collage.pad_half(x0, ps)  # [B, H + p, W + p, 3]
    mask = jnp.asarray(collage.padded_mask(self.height, self.width, ps))[None, ..., None]
    t = gaussian.sample_timesteps(k_t, b, self.schedule.num_steps)
    eps = jax.random.normal(k_eps, x0p.shape, jnp.float32)
    x_t = gaussian.q_sample(self.schedule, x0p, t, eps)

    # One random 2 x 2 block of padded-grid patches for the whole batch.
    bi = jax.random.randint(k_blk, (), 0, nh)
    bj = jax.random.randint(jax.random.fold_in(k_blk, 1), (), 0, nw)

    def block(a):
      return jax.lax.dynamic_slice(
          a, (0, bi * ps, bj * ps, 0), (a.shape[0], 2 * ps, 2 * ps, a.shape[3])
      )

    # The target of every padded pixel (eps, or v / x0 for those parameterisations).
    target = gaussian.model_target(self.schedule, x0p, eps, t, self.parameterization)
    xb = collage.split(block(x_t), ps).reshape(4 * b, ps, ps, 3)  # [4B, p, p, 3]
    eb = collage.split(block(target), ps).reshape(4 * b, ps, ps, 3)
    mb = collage.split(block(jnp.broadcast_to(mask, (b, *mask.shape[1:]))), ps).reshape(
        4 * b, ps, ps, 1
    )
    corners = jnp.asarray(collage.padded_positions(1, 1)).reshape(4, 2)  # (0,0) (0,1) (1,0) (1,1)
    origin = jnp.stack([bi, bj]).astype(jnp.float32)
    pos_orig = jnp.tile((origin + corners)[None], (b, 1, 1)).reshape(4 * b, 2)
    pos_shift = jnp.broadcast_to(origin + 0.5, (b, 2))

    code = self.codes_for(p, batch)  # [B, K]
    pos_keep = jnp.ones((b, 1), jnp.float32)
    if self.cfg.cfg.enabled:  # classifier-free guidance: drop code / position per image
      code = code * jax.random.bernoulli(k_cd, 1.0 - self.cfg.cfg.drop_code, (b, 1))
      pos_keep = jax.random.bernoulli(k_pd, 1.0 - self.cfg.cfg.drop_pos, (b, 1)).astype(jnp.float32)
    feats_orig = collage.position_features(pos_orig, int(self.cfg.pos_dim)) * jnp.repeat(
        pos_keep, 4, 0
    )
    feats_shift = collage.position_features(pos_shift, int(self.cfg.pos_dim)) * pos_keep
    rep = lambda a: jnp.repeat(a, 4, axis=0)
    up = {"params": p["unet"]}
    rngs = {"dropout": k_drop}
    c_orig = self.unet.apply(up, rep(t), feats_orig, rep(code), method="embed")
    c_shift = self.unet.apply(up, t, feats_shift, code, method="embed")
    skips, h = self.unet.apply(up, xb, c_orig, True, method="encode", rngs=rngs)
    out_orig = self.unet.apply(up, skips, h, c_orig, True, method="decode", rngs=rngs)

    def collaged(f):  # [4B, r, r, C] -> [B, r, r, C]
      tiles = f.reshape(b, 2, 2, *f.shape[1:])
      return collage.collage(tiles)[:, 0, 0]

    out_shift = self.unet.apply(
        up,
        [collaged(s) for s in skips],
        collaged(h),
        c_shift,
        True,
        method="decode",
        rngs={"dropout": jax.random.fold_in(k_drop, 1)},
    )
    half = ps // 2
    target_shift = jax.lax.dynamic_slice(
        target, (0, bi * ps + half, bj * ps + half, 0), (b, ps, ps, 3)
    )
    l_shift = gaussian.regression_loss(out_shift, target_shift, "mse")
    l_orig = gaussian.regression_loss(out_orig, eb, "mse", mb)
    return l_shift + l_orig, {"mse_shift": l_shift, "mse_orig": l_orig}

  # --- inference --------------------------------------------------------------------
  # Options of `sampler.PatchDDIM` (the `patch_dm_codes` stage adds code_steps).
  SAMPLER_OPTIONS = (
      "num_steps",
      "batch_size",
      "patch_batch",
      "collage",
      "positions",
      "guidance_scale",
      "code_steps",
  )

  def make_inference(self, params, aux, **options):
    """`PatchDDIM` whose codes are those of random training images (table source) or the
    null code (encoder source); the `patch_dm_codes` stage samples new codes."""
    from infdiff.methods.patch_dm.sampler import PatchDDIM

    del aux
    unknown = sorted(set(options) - set(self.SAMPLER_OPTIONS[:-1]))
    if unknown:
      raise ValueError(f"{self.stage} sampling has no option(s) {', '.join(unknown)}")
    return PatchDDIM(self, params, code_sampler=self.table_code_sampler(params), **options)

  def table_code_sampler(self, params):
    """`keys -> codes`: the codes of random training images (None for the encoder)."""
    if self.encoder is not None:
      return None
    table = params["model"]["codes"]

    def sample(keys):
      idx = jnp.stack([jax.random.randint(k, (), 0, table.shape[0]) for k in keys])
      return jnp.take(table, idx, axis=0)

    return sample

  def finalize(self, ctx):
    """Sample grids with training-image codes (the `patch_dm_codes` stage samples new ones)."""
    if "patch_dm_codes" in tuple(self.config.stages):
      return
    from infdiff import sampling

    gen = self.inference(ctx.state.ema or ctx.state.params, ctx.aux)
    out = os.path.join(os.path.dirname(os.path.normpath(self.workdir)), "samples")
    s = self.cfg.sample
    for (w, h), images in gen.iter_sample([""], int(s.num), self.config.seed, gen.default_sizes()):
      sampling.save_grid(os.path.join(out, f"grid_{w}x{h}.png"), images)
    logging.info("[%s] sample grids written to %s", self.stage, out)
