"""RaPD inference: the stage-1 `FieldAutoencoder` and the stage-2 text-to-image `Generator`.

Stage 2 denoises one latent per image on the fixed latent grid (Euler + CFG on the
shifted time grid), so its cost does not depend on the output size; the stage-1 renderer
then draws each latent at any size in static-shape tiles. `latents` is compiled once per
(batch, latent shape) and calls the DiT `num_steps` times (x2 batch with CFG).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infdiff import render as render_lib
from infdiff.diffusion import flow
from infdiff.diffusion.sampler import euler_sample
from infdiff.methods import base
from infdiff.models.renderers import renderer_from_config

DEFAULT_TILE = 128  # render tile side when the caller gives none
DEFAULT_BATCH = 8  # latents per compiled encode/render call


class Autoencoder(base.FieldAutoencoder):
  """RaPD stage 1 (any of its renderers): EDSR encoder, tiled field renderer.

  Jitted functions are built once per instance; the parameters are call arguments, so a
  training-time evaluator reuses the compiled code as the parameters change.
  """

  def __init__(self, model, s1_cfg, params, *, tile=None, batch=None, select=lambda params: params):
    self.model = model  # NIFAutoencoder without the distillation branch
    self.cfg = s1_cfg
    self.select = select  # the method's parameters -> {'enc': ..., 'dec': ...}
    self.params = select(params)
    r = int(s1_cfg.enc_size)
    self.input_size = (r, r)
    self.tile = int(tile or DEFAULT_TILE)
    self.batch = int(batch or DEFAULT_BATCH)
    self.renderer = render_lib.RendererFn(renderer_from_config(s1_cfg.renderer))
    self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))

  def set_params(self, params, aux=None) -> None:
    del aux
    self.params = self.select(params)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """[N, r, r, 3] in [0, 1] -> latents [N, r, r, C], `batch` images per call."""
    return self.encode_in_chunks(self._encode, self.params, images, self.batch)

  def render(self, latents, height: int, width: int, *, tile: int | None = None, out=None):
    """[N, r, r, C] -> [N, height, width, 3] float32 (not clipped), bounded memory."""
    with render_lib.memory_hint(
        f"rendering {len(latents)} latents at {width}x{height}", "--tile or the render batch"
    ):
      return render_lib.render_latents(
          self.renderer,
          {"params": self.params["dec"]},
          latents,
          height,
          width,
          batch=self.batch,
          tile=int(tile or self.tile),
          out=out,
      )


class TextToImage(base.LatentGenerator):
  """RaPD stage 2: prompts -> normalised latents (Euler + CFG) -> stage-1 renders."""

  conditional = True

  def __init__(
      self,
      method,
      params,
      aux,
      *,
      num_steps=None,
      cfg_scale=None,
      batch_size=None,
      cfg_interval=None,
      shift=None,
      eta=None,
  ):
    s = method.cfg.sample
    self.method = method
    self.params = params
    self.aux = aux
    self.num_steps = int(num_steps or s.num_steps)
    self.cfg_scale = float(s.cfg_scale if cfg_scale is None else cfg_scale)
    lo, hi = s.get("cfg_interval", (0.0, 1.0)) if cfg_interval is None else cfg_interval
    self.cfg_interval = (float(lo), float(hi))
    # The Euler grid's shift: the training shift unless sample.shift (or shift=) is set.
    self.shift = float(shift or s.get("shift", 0.0) or method.cfg.flow.shift)
    self.batch_size = int(batch_size or s.batch_size)
    self.eta = float(s.get("eta", 0.0) if eta is None else eta)  # 0: Euler ODE
    self.max_size = int(s.max_size)
    self.autoencoder = Autoencoder(
        method.ae, method.s1_cfg, aux["ae"], tile=int(s.tile), batch=self.batch_size
    )
    self.trace_count = 0  # times the denoising function was traced (compiled)
    self.instrument = False  # when True, count denoiser calls at run time
    self.denoiser_calls = 0
    self._denoise = jax.jit(self._denoise_impl)

  @property
  def native_size(self) -> tuple[int, int]:
    return (self.method.image_size,) * 2

  def set_params(self, params, aux) -> None:
    self.params, self.aux = params, aux
    self.autoencoder.set_params(aux["ae"])

  # --- denoising ----------------------------------------------------------------------
  def _denoise_impl(self, params, aux, ids, mask, noise, key_data, cfg_scale):
    self.trace_count += 1
    m = self.method
    p = params["model"]
    cond = m.encode_text(p, aux, ids, mask)
    uncond = m.encode_text(p, aux, ids, jnp.zeros_like(mask))
    predict = m.cfg.flow.get("predict", "v")

    def velocity(x, t, c):
      if self.instrument:
        jax.debug.callback(self._count_call)
      out = m.dit.apply({"params": p["dit"]}, x, t, c[0], c[1])
      return flow.velocity_from_output(out, x, t, predict)

    x1 = euler_sample(
        velocity,
        noise,
        num_steps=self.num_steps,
        shift=self.shift,
        cfg_scale=cfg_scale,
        cond=(cond.hidden, mask),
        uncond=(uncond.hidden, jnp.zeros_like(mask)),
        cfg_interval=self.cfg_interval,
        eta=self.eta,
        keys=jax.random.wrap_key_data(key_data),
    )
    return m.denormalise(aux, x1)  # [B, r, r, C]

  def _count_call(self):
    self.denoiser_calls += 1

  def latents(self, conditions, num: int = 1, seed: int = 0) -> np.ndarray:
    """Denoised latents [len(conditions) * num, r, r, C], condition-major.

    Sample i uses noise from fold_in(PRNGKey(seed), i), so it does not depend on how
    samples are batched. An empty prompt is unconditional (all-padding text).
    """
    if num <= 0:
      raise ValueError(f"--num must be positive, got {num}")
    texts = [p for p in conditions for _ in range(num)]
    ids, mask = self.method.text.tokenize_batch(texts)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    r = self.method.latent_size
    c = len(self.method.latent_mean)
    key = jax.random.PRNGKey(seed)
    out = []
    b = self.batch_size
    with render_lib.memory_hint(f"denoising {len(texts)} latents", "the sample batch_size"):
      for start in range(0, len(texts), b):
        sl = slice(start, start + b)
        n = len(texts[sl])
        noise = np.stack(
            [
                np.asarray(jax.random.normal(jax.random.fold_in(key, i), (r, r, c), jnp.float32))
                for i in range(start, start + n)
            ]
        )
        # Sample i's noise for stochastic steps (eta > 0): its own stream, fold_in 1 of its key.
        key_data = np.stack(
            [
                np.asarray(jax.random.fold_in(jax.random.fold_in(key, i), 1))  # raw uint32 [2]
                for i in range(start, start + n)
            ]
        )
        pad = b - n  # fixed batch: one compile whatever the number of prompts
        chunk = [
            np.concatenate([a, np.repeat(a[-1:], pad, 0)])
            for a in (ids[sl], mask[sl], noise, key_data)
        ]
        z = self._denoise(self.params, self.aux, *chunk, jnp.float32(self.cfg_scale))
        out.append(np.asarray(jax.device_get(z))[:n])
    return np.concatenate(out)

  # --- rendering ----------------------------------------------------------------------
  def render(self, latents, height: int, width: int) -> np.ndarray:
    """[N, r, r, C] latents -> [N, height, width, 3] images in [0, 1] (clipped)."""
    img = self.autoencoder.render(latents, height, width)
    return np.clip(img, 0.0, 1.0, out=img)  # in place: no second full-size copy
