"""The locality prior of CQAR's relative-position bias table at init."""

import jax
import numpy as np

from infdiff.models import swin


def test_relative_bias_prior_follows_the_table_index():
  w, heads, slope = 4, 3, 1.5
  table = np.asarray(
      swin.relative_bias_init(w, heads, slope)(jax.random.PRNGKey(0), ((2 * w - 1) ** 2, heads))
  )
  base = np.asarray(
      swin.relative_bias_init(w, heads, 0.0)(jax.random.PRNGKey(0), ((2 * w - 1) ** 2, heads))
  )
  assert np.abs(base).max() < 0.05  # Swin's trunc-normal(0.02) when the slope is 0
  for dy in range(-(w - 1), w):
    for dx in range(-(w - 1), w):
      idx = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
      for h in range(heads):
        want = base[idx, h] - slope * 2.0**-h * np.hypot(dy, dx)
        np.testing.assert_allclose(table[idx, h], want, rtol=1e-6, atol=1e-6)
  # Through the module's own index: the bias of a token pair falls with their distance.
  index = swin.relative_position_index(w)  # [N, N]
  bias = table[index, 0]  # [N, N]
  assert bias[0, 1] > bias[0, 2] > bias[0, w - 1]
