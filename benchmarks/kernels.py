"""Pallas kernels against their XLA references at paper shapes (GPU only).

For each kernel of `infdiff.kernels` this prints the median time per call of the forward
and of the forward + backward (value and gradients of a scalar of the output), for the
Pallas kernel and for the XLA reference, measured in the same run, and the ratio
reference / kernel (above 1: the kernel is faster). Shapes:

  window_attention   CQAR at paper scale (RaPD Table 5: width 256, 4 heads, window 8) on
                     a 128 x 128 query grid, batch 8: 256 windows of 64 tokens, head dim
                     64; unshifted with a padding mask, and shifted (region labels)
  sparse_conv        ∞-Diff at paper scale: 256^2 images at rate 4 (16384 points), 7 x 7
                     depthwise kernel, 128 channels, batch 8
  dense attention    DiT self-attention at RaPD's paper scale (1024 tokens, 16 heads of
                     64), attention_impl 'pallas' (JAX's flash attention) and 'cudnn'
                     against 'xla'

Usage: python -m benchmarks.kernels [--repeats 20]

On a machine without a GPU it says so in one line and exits 0 (the kernels run on CPU
only in interpret mode, which says nothing about speed). `--tiny` shrinks every shape;
with INFDIFF_PALLAS_INTERPRET=1 it then runs on CPU as a smoke test of this script.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, args, repeats: int) -> float:
  """Median seconds per call of a jitted fn after one compile-and-run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _fwd_bwd(f, argnums):
  """jit of (value, grads) of sum(f(...) * cotangent) w.r.t. argnums."""

  def loss(*args):
    out = f(*args)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def window_attention_cases(tiny: bool):
  from infdiff.kernels import window_attention as wa
  from infdiff.models import swin

  b, grid, w, heads, dim = (1, 16, 8, 2, 16) if tiny else (8, 128, 8, 4, 256)
  nw, n, hd = (grid // w) ** 2, w * w, dim // heads
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(ks[i], (b, nw, heads, n, hd), jnp.float32) for i in range(3))
  bias = 0.1 * jax.random.normal(ks[3], (heads, n, n), jnp.float32)
  valid = jnp.ones((b, grid, grid), bool).at[:, -3:, :].set(False)  # a padded border
  key_mask = swin.key_padding_mask(valid, w, 0)[:, :, 0, :]  # [B, nW, N]
  shift = w // 2
  region = jnp.asarray(swin.shifted_window_labels(grid, grid, w, shift))  # [nW, N]
  for name, reg in (("unshifted", None), ("shifted", region)):
    for impl in ("xla", "pallas"):
      f = functools.partial(wa.window_attention, impl=impl)
      args = (q, k, v, bias, key_mask, reg)
      yield (
          f"window_attention {name}",
          impl,
          jax.jit(f),
          _fwd_bwd(f, (0, 1, 2, 3)),
          args,
      )


def sparse_conv_cases(tiny: bool):
  from infdiff.kernels import sparse_conv as sc
  from infdiff.models import sparse

  b, side, rate, c, ksz = (1, 12, 4, 8, 3) if tiny else (8, 256, 4, 128, 7)
  p = side * side // rate
  flat = sparse.random_subset(jax.random.key(1), b, side, side, p)
  points = sparse.point_set(flat, side, side)
  x = jax.random.normal(jax.random.key(2), (b, p, c), jnp.float32)
  kernel = 0.1 * jax.random.normal(jax.random.key(3), (ksz, ksz, c), jnp.float32)
  for impl in ("xla", "pallas"):
    f = functools.partial(sc.sparse_depthwise_conv, height=side, width=side, impl=impl)
    yield (
        f"sparse_conv {ksz}x{ksz} rate {rate}",
        impl,
        jax.jit(f),
        _fwd_bwd(f, (0, 1)),
        (x, kernel, points),
    )


def dense_attention_cases(tiny: bool):
  from infdiff.models import layers

  b, length, heads, hd = (1, 32, 2, 16) if tiny else (8, 1024, 16, 64)
  ks = jax.random.split(jax.random.key(4), 3)
  q, k, v = (jax.random.normal(ks[i], (b, length, heads, hd), jnp.bfloat16) for i in range(3))
  impls = ("xla", "pallas", "cudnn") if _gpu() else ("xla", "pallas")
  for impl in impls:
    f = functools.partial(layers.dot_product_attention, impl=impl)
    yield (
        "DiT self-attention bf16",
        impl,
        jax.jit(f),
        _fwd_bwd(f, (0, 1, 2)),
        (q, k, v),
    )


def _gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
  args = ap.parse_args(argv)
  from infdiff import kernels

  if not _gpu() and not (args.tiny and kernels.interpret_mode()):
    print(f"benchmarks.kernels: no GPU here (backend {jax.default_backend()!r}); nothing to time.")
    return 0
  print(f"device: {jax.devices()[0].device_kind}; median of {args.repeats} calls")
  print(f"{'case':<28} {'impl':<7} {'fwd ms':>8} {'fwd+bwd ms':>11} {'fwd x':>6} {'f+b x':>6}")
  for cases in (window_attention_cases, sparse_conv_cases, dense_attention_cases):
    ref = None
    for name, impl, fwd, fb, inputs in cases(args.tiny):
      try:
        t_f = _time(fwd, inputs, args.repeats)
        t_fb = _time(fb, inputs, args.repeats)
      except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        print(f"{name:<28} {impl:<7} failed: {str(e).strip().splitlines()[0][:80]}")
        continue
      if impl == "xla":
        ref = (t_f, t_fb)
      sx = "" if ref is None else f"{ref[0] / t_f:6.2f} {ref[1] / t_fb:6.2f}"
      print(f"{name:<28} {impl:<7} {t_f * 1e3:8.3f} {t_fb * 1e3:11.3f} {sx}")
  return 0


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  raise SystemExit(main())
