"""Resolution scaling of sampling: infdiff (latent denoise + tiled render) vs pixel-space DiT.

At output sides 1x, 2x, 4x and 8x the demo latent side (32 -> 32, 64, 128, 256), with
freshly initialised demo models (timing does not depend on trained values):

  (a) denoise time of the `Generator` contract's `latents` per output size. The latent grid is
      fixed, so it should not change: target ratio 8x / 1x <= 1.05.
  (b) render time per output pixel of `Generator.render` (tiled CQAR): target
      8x / 1x <= 1.2.
  (c) a fixed-grid baseline: the same DiT (patch, width, depth, heads) denoising
      [B, S, S, 3] pixels directly with the same Euler steps, CFG and text encoder. Its
      token count grows like S^2 and its attention cost like S^4. Printed as
      baseline / infdiff total time (denoise + render): target >= 25x at 8x.
Where the baseline would run too long, it is timed over fewer Euler steps and scaled
linearly to the full count (the loop body is the same compiled step); the table says so.

Usage: python -m benchmarks.resolution_scaling [--quick] [--batch 1]
"""

from __future__ import annotations

import argparse
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

TARGETS = {"denoise": 1.05, "render_px": 1.2, "speedup": 25.0}
PROMPT = "a red square to the left of a blue circle"


class PixelBaseline:
  """The demo DiT run directly on [B, S, S, 3] pixels with the Generator's sampler."""

  def __init__(self, method, params, aux, num_steps, shift, cfg_scale, seed=0):
    from infdiff.models.dit import DiT

    c = method.cfg
    self.method, self.aux = method, aux
    self.text_params = params["model"]
    self.dit = DiT(
        **c.dit.to_dict(),
        in_channels=3,
        text_dim=method.text.encoder.width,
        dtype=jnp.dtype(c.dtype),
    )
    self.num_steps, self.shift, self.cfg_scale = num_steps, shift, cfg_scale
    p = c.dit.patch
    hidden = jnp.zeros((1, method.text.max_length, method.text.encoder.width), jnp.float32)
    mask = jnp.ones((1, method.text.max_length), jnp.int32)
    x = jnp.zeros((1, 2 * p, 2 * p, 3), jnp.float32)
    init = jax.jit(self.dit.init)
    # The DiT's parameters do not depend on the grid (2D RoPE is computed per call).
    self.params = nn.unbox(init(jax.random.PRNGKey(seed), x, jnp.zeros((1,)), hidden, mask))

    self._sample = jax.jit(self._sample_impl, static_argnames="steps")

  def _sample_impl(self, dit_params, text_params, ids, mask, noise, steps):
    from infdiff.diffusion.sampler import euler_sample

    m = self.method
    cond = m.encode_text(text_params, self.aux, ids, mask)
    uncond = m.encode_text(text_params, self.aux, ids, jnp.zeros_like(mask))
    velocity = lambda x, t, c: self.dit.apply(dit_params, x, t, c[0], c[1])
    return euler_sample(
        velocity,
        noise,
        num_steps=steps,
        shift=self.shift,
        cfg_scale=self.cfg_scale,
        cond=(cond.hidden, mask),
        uncond=(uncond.hidden, jnp.zeros_like(mask)),
    )

  def timed(self, batch: int, size: int, steps: int, repeats: int) -> float:
    """Median seconds of `steps` Euler steps at size x size (compiled beforehand)."""
    ids, mask = self.method.text.tokenize_batch([PROMPT] * batch)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3), jnp.float32)
    args = (self.params, self.text_params, ids, mask, noise)
    compiled = self._sample.lower(*args, steps=steps).compile()
    return common.median_time(
        lambda: jax.block_until_ready(compiled(*args)), repeats=repeats, warmup=0
    )


def main(argv=None, config=None) -> dict:
  """Runs the benchmark and prints one table; returns the headline ratios."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="few repeats, reduced sizes (smoke test)")
  ap.add_argument("--batch", type=int, default=1, help="images per sampling call (both sides)")
  ap.add_argument("--factors", default="1,2,4,8", help="output side / latent side, comma-separated")
  ap.add_argument(
      "--full_baseline_upto",
      type=int,
      default=4,
      help="largest factor whose baseline runs all Euler steps; larger ones are timed over "
      "--reduced_steps and scaled",
  )
  ap.add_argument("--reduced_steps", type=int, default=2)
  args = ap.parse_args(argv)
  repeats = 2 if args.quick else 5
  factors = [int(f) for f in args.factors.split(",")]
  common.header("resolution scaling (infdiff latent denoise + tiled render vs pixel-space DiT)")

  with tempfile.TemporaryDirectory() as tmp:
    config, _, m2 = common.demo_runs(tmp, config, stage1_step=False)
    params = common.stage2_params(m2)
    aux = m2.prepare(None, training=False)
    gen = m2.make_inference(params, aux, batch_size=args.batch)  # the Generator contract
    base = PixelBaseline(m2, params, aux, gen.num_steps, gen.shift, gen.cfg_scale)
    r = m2.latent_size
    prompts = [PROMPT] * args.batch
    z = gen.latents(prompts)  # compile once
    rows = []
    for f in factors:
      s = f * r
      t_den = common.median_time(lambda: gen.latents(prompts), repeats=repeats, warmup=0)
      gen.render(z, s, s)  # compile (per tile shape) and warm up
      t_ren = common.median_time(lambda s=s: gen.render(z, s, s), repeats=repeats, warmup=0)
      steps = gen.num_steps if f <= args.full_baseline_upto else args.reduced_steps
      t_base = base.timed(args.batch, s, steps, repeats=repeats if f <= 4 else 1)
      t_base *= gen.num_steps / steps
      rows.append((f, s, t_den, t_ren, t_base, steps))
      print(f"  measured {s}x{s}", flush=True)

  print(
      f"batch {args.batch}, {gen.num_steps} Euler steps with CFG, latent {r}x{r}, render tile "
      f"{gen.autoencoder.tile}; baseline = pixel-space DiT p{config.rapd_stage2.dit.patch} "
      f"w{config.rapd_stage2.dit.width} d{config.rapd_stage2.dit.depth}"
  )
  print(
      f"{'size':>9} {'denoise s':>10} {'render s':>9} {'render ns/px':>13} {'infdiff s':>10} "
      f"{'baseline s':>11} {'base/infdiff':>13}"
  )
  for _, s, t_den, t_ren, t_base, steps in rows:
    note = (
        ""
        if steps == gen.num_steps
        else f"  (baseline: {steps} steps timed, scaled x{gen.num_steps / steps:.1f})"
    )
    total = t_den + t_ren
    print(
        f"{s:>4}x{s:<4} {t_den:10.3f} {t_ren:9.3f} {t_ren / (args.batch * s * s) * 1e9:13.1f} "
        f"{total:10.3f} {t_base:11.2f} {t_base / total:13.1f}{note}"
    )
  f0, s0, d0, r0, _, _ = rows[0]
  f1, s1, d1, r1, b1, _ = rows[-1]
  out = {
      "denoise": d1 / d0,
      "render_px": (r1 / s1**2) / (r0 / s0**2),
      "speedup": b1 / (d1 + r1),
  }
  k = f"{f1}x/{f0}x"
  print(f"denoise time {k}: {out['denoise']:.3f} (target <= {TARGETS['denoise']})")
  print(f"render time per pixel {k}: {out['render_px']:.3f} (target <= {TARGETS['render_px']})")
  print(f"baseline / infdiff at {f1}x: {out['speedup']:.1f}x (target >= {TARGETS['speedup']}x)")
  return out


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
