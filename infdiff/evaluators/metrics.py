"""Image metrics that need no pretrained network: PSNR, SSIM, bicubic baseline, SWD, FID maths.

Images are [..., H, W, C] floats in [0, data_range] unless said otherwise; functions
reduce over (H, W, C) and keep leading batch dimensions. The Frechet distance and the
sliced Wasserstein distance run in numpy (float64 and sorting); PSNR and SSIM run in jax
so they batch and jit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from infdiff.fields import area_downsample


def psnr(a, b, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB over the last three axes. Returns [...]."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  mse = jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "radius", "k1", "k2"))
def ssim(
    a,
    b,
    data_range: float = 1.0,
    sigma: float = 1.5,
    radius: int = 5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
  """Structural similarity (Wang et al. 2004) with an 11 x 11 Gaussian window.

  Local statistics use a normalised Gaussian (sigma 1.5, radius 5) and population
  (co)variances; the SSIM map is averaged over the valid region (no padding) and the
  channels. This is skimage's `structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=...)`.

  Args:
    a, b: [..., H, W, C] images, H and W at least 2 * radius + 1.
    data_range: value range of the images (1.0 for [0, 1]).
    sigma, radius: Gaussian window.
    k1, k2: the standard stabilising constants.

  Returns:
    [...] mean SSIM per image.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  lead, (h, w, c) = a.shape[:-3], a.shape[-3:]

  # [N*C, 1, H, W]: every channel of every image filtered independently.
  def planes(x):
    x = x.reshape(-1, h, w, c)
    return jnp.moveaxis(x, -1, 1).reshape(-1, 1, h, w)

  k = jnp.asarray(_gaussian_kernel(sigma, radius))
  kh = k.reshape(1, 1, -1, 1)
  kw = k.reshape(1, 1, 1, -1)

  def filt(x):
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", precision="highest")
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", precision="highest")

  x, y = planes(a), planes(b)
  mx, my = filt(x), filt(y)
  sxx = filt(x * x) - mx * mx
  syy = filt(y * y) - my * my
  sxy = filt(x * y) - mx * my
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  per_plane = jnp.mean(s, axis=(1, 2, 3))  # [N*C]
  return jnp.mean(per_plane.reshape(-1, c), axis=-1).reshape(lead)


def bicubic_upsample(img, h: int, w: int, clip: bool = True) -> jax.Array:
  """Bicubic resize of [..., H, W, C] to [..., h, w, C]: the reconstruction baseline.

  Uses `jax.image.resize(..., method='cubic')`: Keys' cubic convolution with a = -0.5
  (the kernel of PIL's BICUBIC), pixel centres at half-integers (the same grid
  convention as METHODS.md), kernel weights renormalised at the image borders.

  Args:
    img: [..., H, W, C] image.
    h, w: output size.
    clip: clip the overshoot of the cubic kernel to [0, 1].
  """
  img = jnp.asarray(img, jnp.float32)
  out = jax.image.resize(img, (*img.shape[:-3], h, w, img.shape[-1]), method="cubic")
  return jnp.clip(out, 0.0, 1.0) if clip else out


def scale_consistency_psnr(img_k, img_1, data_range: float = 1.0) -> jax.Array:
  """PSNR between a large render box-filtered to the small size and the small render.

  Args:
    img_k: [..., kH, kW, C] render at the large size (any ratio).
    img_1: [..., H, W, C] render at the small size.

  Returns:
    [...] PSNR in dB; an ideal any-resolution renderer is consistent across scales.
  """
  img_k = np.asarray(img_k, np.float32)
  h, w, c = np.shape(img_1)[-3:]
  kh, kw = img_k.shape[-3:-1]
  lead = img_k.shape[:-3]
  # area_downsample takes [H, W, C]: fold the batch into the channel axis.
  x = np.moveaxis(img_k.reshape(-1, kh, kw, c), 0, 2).reshape(kh, kw, -1)
  y = area_downsample(x, h, w).reshape(h, w, -1, c)
  y = np.moveaxis(y, 2, 0).reshape(*lead, h, w, c)
  return psnr(y, img_1, data_range)


# ---------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian pyramids (Karras et al. 2018, ProGAN).

_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
  """Separable 5-tap binomial filter over axes (1, 2) of [N, H, W, C], mirror borders."""
  k = _BINOMIAL5 * gain
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    xp = np.pad(x, pad, mode="reflect")  # d c b | a b c d | c b a (scipy 'mirror')
    n = x.shape[axis]
    x = sum(k[t] * np.take(xp, np.arange(t, t + n), axis=axis) for t in range(5))
  return x


def _pyr_down(x: np.ndarray) -> np.ndarray:
  return _blur(x)[:, ::2, ::2]


def _pyr_up(x: np.ndarray) -> np.ndarray:
  n, h, w, c = x.shape
  up = np.zeros((n, 2 * h, 2 * w, c), x.dtype)
  up[:, ::2, ::2] = x
  return _blur(up, gain=2.0)  # 2 per axis: zero insertion dropped 3/4 of the mass


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
  """Laplacian pyramid of [N, H, W, C]: num_levels band-pass levels, finest first.

  Each level but the last is `level - up(down(level))`; the last is the low-pass
  residual. H and W must be divisible by 2^(num_levels - 1).
  """
  pyr = [np.asarray(images, np.float32)]
  for _ in range(num_levels - 1):
    pyr.append(_pyr_down(pyr[-1]))
    pyr[-2] = pyr[-2] - _pyr_up(pyr[-1])
  return pyr


def _positions(n: int, h: int, w: int, nhood: int, per_image: int, rng):
  ys = rng.integers(0, h - nhood + 1, size=(n, per_image))
  xs = rng.integers(0, w - nhood + 1, size=(n, per_image))
  return ys, xs


def _gather_patches(images, ys, xs, p) -> np.ndarray:
  n = images.shape[0]
  off = np.arange(p)
  rows = (ys[..., None] + off)[..., :, None]  # [N, K, P, 1]
  cols = (xs[..., None] + off)[..., None, :]  # [N, K, 1, P]
  idx = np.arange(n)[:, None, None, None]
  out = images[idx, rows, cols]  # [N, K, P, P, C]
  return out.reshape(-1, *out.shape[2:])


def _normalise(desc: np.ndarray) -> np.ndarray:
  """Per-channel standardisation of [M, P, P, C] descriptors, flattened to [M, P*P*C]."""
  desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
  desc = desc / (desc.std(axis=(0, 1, 2), keepdims=True) + 1e-8)
  return desc.reshape(desc.shape[0], -1)


def _swd(a: np.ndarray, b: np.ndarray, rng, repeats: int, dirs: int) -> float:
  results = []
  for _ in range(repeats):
    d = rng.standard_normal((dirs, a.shape[1])).astype(np.float32)  # [dirs, D]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    # [dirs, M]: each projection's samples contiguous, so the sorts run along rows.
    pa = np.sort(d @ a.T, axis=1)
    pb = np.sort(d @ b.T, axis=1)
    # In one dimension the optimal transport pairs sorted samples.
    results.append(float(np.mean(np.abs(pa - pb))))
  return float(np.mean(results))


def sliced_wasserstein(
    images_a,
    images_b,
    rng: np.random.Generator | int = 0,
    nhood_size: int = 7,
    nhoods_per_image: int = 128,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 512,
    min_res: int = 16,
) -> dict[str, float]:
  """Multi-scale sliced Wasserstein distance between two image sets (ProGAN's SWD).

  Each set is decomposed into Laplacian pyramids down to `min_res`; at every level
  `nhoods_per_image` random 7 x 7 neighbourhoods per image are descriptors (image k of
  both sets at the same positions), each set's
  descriptors are standardised per channel by that level's own mean and std, and the
  SWD is the mean 1D Wasserstein distance over random unit projections. ProGAN's code
  uses 128 projections per repeat; 512 here (a choice) lowers the estimator's variance.

  Args:
    images_a, images_b: [N, H, W, C] image sets of equal H, W (any value scale; the
      standardisation removes it). Set sizes may differ: the larger descriptor set is
      subsampled to the smaller.
    rng: numpy generator or seed, for patch positions and projections.
    nhood_size, nhoods_per_image: descriptor patch side and count per image.
    dir_repeats, dirs_per_repeat: projections.
    min_res: coarsest pyramid level.

  Returns:
    {'swd_<res>': distance x 1e3 per level (as ProGAN reports), 'swd_mean': their mean}.
  """
  rng = np.random.default_rng(rng)
  a = np.asarray(images_a, np.float32)
  b = np.asarray(images_b, np.float32)
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f"image shapes differ: {a.shape[1:]} vs {b.shape[1:]}")
  res, resolutions = min(a.shape[1:3]), []
  while res >= min_res:
    resolutions.append(res)
    res //= 2
  pyr_a = laplacian_pyramid(a, len(resolutions))
  pyr_b = laplacian_pyramid(b, len(resolutions))
  out = {}
  for res, la, lb in zip(resolutions, pyr_a, pyr_b):
    # Image k of both sets shares its neighbourhood positions (common random numbers):
    # identical sets then give exactly 0 and comparisons carry less sampling noise.
    ys, xs = _positions(max(len(la), len(lb)), *la.shape[1:3], nhood_size, nhoods_per_image, rng)
    da = _normalise(_gather_patches(la, ys[: len(la)], xs[: len(la)], nhood_size))
    db = _normalise(_gather_patches(lb, ys[: len(lb)], xs[: len(lb)], nhood_size))
    m = min(len(da), len(db))
    if len(da) > m:
      da = da[rng.permutation(len(da))[:m]]
    if len(db) > m:
      db = db[rng.permutation(len(db))[:m]]
    out[f"swd_{res}"] = 1e3 * _swd(da, db, rng, dir_repeats, dirs_per_repeat)
  out["swd_mean"] = float(np.mean(list(out.values())))
  return out


# ---------------------------------------------------------------------------------------
# Frechet distance (FID, pFID) on features from any network.


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
  f = np.asarray(features, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).
  A singular product gets eps on both diagonals before the square root; an imaginary
  part from round-off is dropped, but one on the diagonal above 1e-3 is an error.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError("the two Gaussians have different dimensions")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if not math.isclose(imag, 0.0, abs_tol=1e-3):
      raise ValueError(f"imaginary component {imag} in the matrix square root")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def random_patches(images, patch: int, num_per_image: int, rng) -> np.ndarray:
  """Random patch x patch crops for patch FID (INFD's pFID).

  Args:
    images: [N, H, W, C] with H, W >= patch.
    patch: crop side.
    num_per_image: crops per image.
    rng: numpy generator or seed.

  Returns:
    [N * num_per_image, patch, patch, C], the crops of image 0 first.
  """
  rng = np.random.default_rng(rng)
  images = np.asarray(images)
  n, h, w, _ = images.shape
  if patch > min(h, w):
    raise ValueError(f"patch {patch} larger than the {h}x{w} images")
  ys = rng.integers(0, h - patch + 1, size=(n, num_per_image))
  xs = rng.integers(0, w - patch + 1, size=(n, num_per_image))
  return _gather_patches(images, ys, xs, patch)
