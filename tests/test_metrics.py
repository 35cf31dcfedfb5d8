"""Tests for the network-free image metrics."""

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.metrics import structural_similarity

from infdiff.evaluators import metrics


def _images(n, h=32, w=32, seed=0):
  """Smooth random images with structure at several scales, [n, h, w, 3] in [0, 1]."""
  rng = np.random.default_rng(seed)
  x = rng.random((n, h, w, 3)).astype(np.float32)
  x = ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0, 0)) * 0.7 + 0.3 * x
  return np.clip(x, 0.0, 1.0)


def test_psnr_known_values():
  a = np.zeros((2, 8, 8, 3), np.float32)
  b = a + 0.1  # MSE = 0.01 -> 20 dB
  np.testing.assert_allclose(metrics.psnr(a, b), [20.0, 20.0], atol=1e-4)
  np.testing.assert_allclose(metrics.psnr(a * 255, b * 255, data_range=255.0), 20.0, atol=1e-3)
  assert np.isinf(metrics.psnr(a[0], a[0]))


def test_ssim_matches_skimage_and_batches():
  x = _images(3, 40, 36, seed=1)
  y = np.clip(x + 0.08 * np.random.default_rng(2).standard_normal(x.shape), 0, 1)
  y = y.astype(np.float32)
  ours = np.asarray(metrics.ssim(x, y))
  assert ours.shape == (3,)
  for i in range(3):
    ref = structural_similarity(
        x[i],
        y[i],
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
    )
    assert abs(ours[i] - ref) < 1e-3, (ours[i], ref)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  assert float(metrics.ssim(x[0], 1.0 - x[0])) < 0.5


def test_bicubic_upsample():
  # A linear ramp is reproduced exactly by a cubic kernel away from the borders.
  ramp = np.linspace(0.1, 0.9, 16, dtype=np.float32)[None, :, None] * np.ones((16, 1, 1))
  up = np.asarray(metrics.bicubic_upsample(ramp, 64, 64))
  assert up.shape == (64, 64, 1)
  cols = -1.0 + (2.0 * np.arange(64) + 1.0) / 64  # pixel centres; ramp value is linear in col
  expect = 0.5 + 0.4 * (16 / 15) * cols
  np.testing.assert_allclose(up[5, 8:-8, 0], expect[8:-8], atol=1e-4)
  # Same kernel family as PIL BICUBIC: close on a smooth image.
  img = _images(1, 16, 16, seed=3)[0]
  pil = np.stack(
      [np.asarray(Image.fromarray(img[..., c]).resize((48, 48), Image.BICUBIC)) for c in range(3)],
      -1,
  )
  ours = np.asarray(metrics.bicubic_upsample(img, 48, 48, clip=False))
  assert np.abs(ours - pil)[4:-4, 4:-4].max() < 1e-3
  batch = np.asarray(metrics.bicubic_upsample(np.stack([img, img]), 32, 24))
  assert batch.shape == (2, 32, 24, 3)


def test_scale_consistency_psnr():
  small = _images(2, 16, 16)
  big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # box upsample: exact inverse
  assert np.all(np.asarray(metrics.scale_consistency_psnr(big, small)) > 90.0)
  noisy = small + 0.01 * np.random.default_rng(0).standard_normal(small.shape)
  np.testing.assert_allclose(metrics.scale_consistency_psnr(big, noisy), 40.0, atol=0.5)


def test_laplacian_pyramid_reconstructs():
  x = _images(2, 32, 32)
  pyr = metrics.laplacian_pyramid(x, 3)
  assert [p.shape[1] for p in pyr] == [32, 16, 8]
  rec = pyr[-1]
  for lap in pyr[-2::-1]:
    rec = lap + metrics._pyr_up(rec)
  np.testing.assert_allclose(rec, x, atol=1e-5)
  # A constant image has no band-pass content and a constant low-pass.
  const = np.full((1, 32, 32, 3), 0.4, np.float32)
  pyr = metrics.laplacian_pyramid(const, 3)
  assert np.abs(pyr[0]).max() < 1e-6 and np.abs(pyr[1]).max() < 1e-6
  np.testing.assert_allclose(pyr[2], 0.4, atol=1e-6)


def test_sliced_wasserstein():
  x = _images(64, 32, 32, seed=4)
  same = metrics.sliced_wasserstein(x, x, rng=0)
  assert set(same) == {"swd_32", "swd_16", "swd_mean"}
  assert same["swd_mean"] < 1e-6  # identical sets share neighbourhood positions: exactly 0
  halves = metrics.sliced_wasserstein(x[:32], x[32:], rng=0)
  blurred = ndimage.gaussian_filter(x[32:], sigma=(0, 1.5, 1.5, 0))
  shifted = metrics.sliced_wasserstein(x[:32], blurred, rng=0)
  # Blur removes the finest band, so the finest level separates the sets most.
  assert shifted["swd_32"] > 2.0 * halves["swd_32"], (shifted, halves)
  assert shifted["swd_mean"] > 1.4 * halves["swd_mean"], (shifted, halves)
  # Different set sizes are allowed.
  assert np.isfinite(metrics.sliced_wasserstein(x[:10], x[10:40], rng=1)["swd_mean"])


def test_feature_stats_and_frechet_distance():
  rng = np.random.default_rng(0)
  f = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
  mu, sigma = metrics.feature_stats(f)
  np.testing.assert_allclose(mu, f.mean(0))
  np.testing.assert_allclose(sigma, np.cov(f.T))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  # Diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2.
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
  s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert math.isclose(got, expect, rel_tol=1e-9), (got, expect)
  # Rank-deficient covariances (fewer samples than dimensions) still give a finite value.
  g = rng.standard_normal((4, 10))
  m1, c1 = metrics.feature_stats(g)
  m2, c2 = metrics.feature_stats(g + 1.0)
  assert math.isclose(metrics.frechet_distance(m1, c1, m2, c2), 10.0, rel_tol=1e-3, abs_tol=1e-3)
  with pytest.raises(ValueError):
    metrics.frechet_distance(mu1, np.diag(s1), mu2[:2], np.diag(s2[:2]))


def test_random_patches():
  x = np.arange(2 * 10 * 12 * 1, dtype=np.float32).reshape(2, 10, 12, 1)
  p = metrics.random_patches(x, 4, 5, rng=0)
  assert p.shape == (10, 4, 4, 1)
  # Every crop is a contiguous window of its own image.
  for k, crop in enumerate(p):
    img = x[k // 5, ..., 0]
    top, left = np.argwhere(img == crop[0, 0, 0])[0]
    np.testing.assert_array_equal(crop[..., 0], img[top : top + 4, left : left + 4])
  np.testing.assert_array_equal(p, metrics.random_patches(x, 4, 5, rng=0))
  with pytest.raises(ValueError):
    metrics.random_patches(x, 11, 1, rng=0)
