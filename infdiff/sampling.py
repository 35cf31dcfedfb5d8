"""Text -> one denoised NIF latent -> images at any list of sizes.

The denoiser runs on the fixed latent grid, so its cost does not depend on the output
size: `Generator.latents` is compiled once per (batch, latent shape) and calls the DiT
`num_steps` times (x2 batch with CFG) whatever sizes are rendered afterwards.
Rendering goes through `infdiff.render.render_image` in static-shape tiles, so large
outputs neither recompile nor run out of memory.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from infdiff import checkpoint as ckpt_lib
from infdiff import render as render_lib
from infdiff.diffusion.sampler import euler_sample
from infdiff.models.renderers import make_renderer


def renderer_of(s1_cfg, dtype=jnp.float32):
  kw = s1_cfg.renderer.to_dict()
  return make_renderer(kw.pop("name"), **kw, dtype=dtype)


class Generator:
  """Samples latents from a stage-2 model and renders them with the stage-1 renderer."""

  def __init__(self, method, params, aux, *, num_steps=None, cfg_scale=None, batch_size=None):
    s = method.cfg.sample
    self.method = method
    self.params = params
    self.aux = aux
    self.num_steps = int(num_steps or s.num_steps)
    self.cfg_scale = float(s.cfg_scale if cfg_scale is None else cfg_scale)
    self.shift = float(method.cfg.flow.shift)
    self.batch_size = int(batch_size or s.batch_size)
    self.tile = int(s.tile)
    self.renderer = render_lib.RendererFn(renderer_of(method.s1_cfg))
    self.trace_count = 0  # times the denoising function was traced (compiled)
    self.instrument = False  # when True, count denoiser calls at run time
    self.denoiser_calls = 0
    self._denoise = jax.jit(self._denoise_impl)

  @classmethod
  def from_method(cls, method, params, aux, **kw):
    return cls(method, params, aux, **kw)

  @classmethod
  def from_workdir(cls, workdir: str, **kw):
    """Loads the stage-2 run under `workdir` (a run directory or its 'rapd_stage2')."""
    stage_dir = workdir
    if os.path.isdir(os.path.join(workdir, "rapd_stage2")):
      stage_dir = os.path.join(workdir, "rapd_stage2")
    cfg_path = os.path.join(stage_dir, "config.json")
    if not os.path.exists(cfg_path):
      raise ckpt_lib.CheckpointError(
          f"no stage-2 run in {workdir} (missing rapd_stage2/config.json)"
      )
    with open(cfg_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    from infdiff import utils

    utils.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    from infdiff.methods.rapd.stage2 import Method

    config.rapd_stage2.repa.weight = 0.0  # the teacher is training-only
    method = Method(config, "rapd_stage2", stage_dir)
    state, _ = ckpt_lib.restore_params_only(os.path.join(stage_dir, "checkpoints"))
    params = state.get("ema") or state["params"]
    aux = method.prepare(None)
    return cls(method, params, aux, **kw)

  # --- denoising ----------------------------------------------------------------------
  def _denoise_impl(self, params, aux, ids, mask, noise, cfg_scale):
    self.trace_count += 1
    m = self.method
    p = params["model"]
    cond = m.encode_text(p, aux, ids, mask)
    uncond = m.encode_text(p, aux, ids, jnp.zeros_like(mask))

    def velocity(x, t, c):
      if self.instrument:
        jax.debug.callback(self._count_call)
      return m.dit.apply({"params": p["dit"]}, x, t, c[0], c[1])

    x1 = euler_sample(
        velocity,
        noise,
        num_steps=self.num_steps,
        shift=self.shift,
        cfg_scale=cfg_scale,
        cond=(cond.hidden, mask),
        uncond=(uncond.hidden, jnp.zeros_like(mask)),
    )
    return x1 * aux["std"] + aux["mean"]  # denormalised latent [B, r, r, C]

  def _count_call(self):
    self.denoiser_calls += 1

  def latents(self, prompts, seed: int = 0, num_per_prompt: int = 1) -> np.ndarray:
    """Denoised latents [len(prompts) * num_per_prompt, r, r, C], prompt-major.

    Sample i uses noise from fold_in(PRNGKey(seed), i), so it does not depend on how
    samples are batched. An empty prompt is unconditional (all-padding text).
    """
    texts = [p for p in prompts for _ in range(num_per_prompt)]
    ids, mask = self.method.text.tokenize_batch(texts)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    r = self.method.latent_size
    c = len(self.aux["mean"])
    key = jax.random.PRNGKey(seed)
    noise = np.stack(
        [
            np.asarray(jax.random.normal(jax.random.fold_in(key, i), (r, r, c), jnp.float32))
            for i in range(len(texts))
        ]
    )
    out = []
    b = self.batch_size
    for start in range(0, len(texts), b):
      sl = slice(start, start + b)
      n = len(texts[sl])
      pad = b - n  # fixed batch: one compile whatever the number of prompts
      chunk = [np.concatenate([a[sl], np.repeat(a[sl][-1:], pad, 0)]) for a in (ids, mask, noise)]
      z = self._denoise(self.params, self.aux, *chunk, jnp.float32(self.cfg_scale))
      out.append(np.asarray(jax.device_get(z))[:n])
    return np.concatenate(out)

  # --- rendering ----------------------------------------------------------------------
  def render(self, latents, height: int, width: int) -> np.ndarray:
    """[N, h, w, C] latents -> [N, height, width, 3] images in [0, 1] (clipped)."""
    variables = {"params": self.aux["ae"]["dec"]}
    img = render_lib.render_image(
        self.renderer, variables, jnp.asarray(latents), height, width, tile=self.tile
    )
    return np.clip(img, 0.0, 1.0, out=img)  # in place: no second full-size copy


def to_uint8(img: np.ndarray) -> np.ndarray:
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str, img: np.ndarray) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(to_uint8(img)).save(path)


def save_grid(path: str, images: np.ndarray) -> None:
  from infdiff.utils import image_grid

  save_png(path, image_grid(np.asarray(images)))
