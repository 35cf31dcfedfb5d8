"""The Gaussian mollifier T of ∞-Diff and its Wiener inverse, in the DCT domain.

∞-Diff (METHODS.md) diffuses mollified states: T is a Gaussian blur of std `sigma`
pixels. On an N-pixel axis with symmetric (half-sample, reflecting) boundaries a blur is
diagonal in the orthonormal DCT-II, with gain

  g_k = exp(-k^2 / (2 s^2)),   s = N / (pi sigma),   k = 0, ..., N - 1,

the frequency response exp(-omega^2 sigma^2 / 2) of a Gaussian at omega = pi k / N.
Applied on both axes of an [B, H, W, C] image (each its own sigma), this is the
band-limited Gaussian: it equals a sampled-Gaussian blur with reflecting padding up to
the part of the Gaussian's spectrum beyond Nyquist (exp(-pi^2 sigma^2 / 2): 7e-3 of the
DC gain at sigma = 1, 1.5e-5 at sigma = 1.5; tests/test_infty_diff_ops.py measures it).

Resolution: at N' pixels for a model trained at N, ∞-Diff scales sigma by N'/N, so
s = N / (pi sigma) does not change: the same DCT indices are damped the same way and T is
one operator on functions, sampled at two resolutions.

The inverse of T is ill-conditioned; the Wiener filter g / (g^2 + eps^2) (eps = 0.05,
an inverse SNR) is the approximate inverse used to evaluate samples.

All of it runs in float32 (`jax.scipy.fft.dctn` / `idctn`, norm='ortho').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import fft as jfft

WIENER_EPS = 0.05  # the Wiener filter's inverse-SNR estimate (choice, ∞-Diff's value)


def gain(n: int, sigma: float) -> np.ndarray:
  """[n] float32 DCT-II gains of a Gaussian blur of std `sigma` pixels (1 if sigma <= 0)."""
  if sigma <= 0:
    return np.ones(n, np.float32)
  s = n / (np.pi * float(sigma))
  k = np.arange(n, dtype=np.float64)
  return np.exp(-(k**2) / (2.0 * s**2)).astype(np.float32)


def scaled_sigmas(sigma: float, height: int, width: int, train_side: int) -> tuple[float, float]:
  """The mollifier's (sigma_y, sigma_x) at an H x W grid of a model trained at train_side."""
  return float(sigma) * height / train_side, float(sigma) * width / train_side


def _filter(x: jax.Array, g: np.ndarray) -> jax.Array:
  """idct(g * dct(x)) over axes (1, 2) of [B, H, W, C] float32, g [H, W] per coefficient."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 4:
    raise ValueError(f"mollifier takes [B, H, W, C] images, got shape {x.shape}")
  c = jfft.dctn(x, type=2, axes=(1, 2), norm="ortho")
  g = jnp.asarray(np.asarray(g, np.float32)[None, :, :, None])
  return jfft.idctn(c * g, type=2, axes=(1, 2), norm="ortho")


def mollify(x: jax.Array, sigma_y: float, sigma_x: float | None = None) -> jax.Array:
  """T x: Gaussian blur of std (sigma_y, sigma_x) pixels, reflecting boundaries.

  Args:
    x: [B, H, W, C] (any real values).
    sigma_y: blur std in pixels along H (0 disables the blur on that axis).
    sigma_x: along W (default sigma_y).

  Returns:
    [B, H, W, C] float32.
  """
  sigma_x = sigma_y if sigma_x is None else sigma_x
  h, w = x.shape[1], x.shape[2]
  return _filter(x, np.outer(gain(h, sigma_y), gain(w, sigma_x)))


def wiener(
    x: jax.Array, sigma_y: float, sigma_x: float | None = None, eps: float = WIENER_EPS
) -> jax.Array:
  """Approximate inverse of `mollify`: gain g / (g^2 + eps^2) per 2-D DCT coefficient.

  g is the product of the two axes' gains (the 2-D response of the separable blur).
  """
  sigma_x = sigma_y if sigma_x is None else sigma_x
  h, w = x.shape[1], x.shape[2]
  g = np.outer(gain(h, sigma_y), gain(w, sigma_x)).astype(np.float64)
  return _filter(x, g / (g**2 + float(eps) ** 2))
