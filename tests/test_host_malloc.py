"""infdiff.host_malloc: when the glibc settings apply, and that they stop the re-faulting."""

import json
import os
import subprocess
import sys

import pytest

from infdiff import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted step with a 16 MiB intermediate, timed by its minor page faults per call.
_CHILD = """
import json, resource, sys
from infdiff import host_malloc
applied = host_malloc.configure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(jnp.tanh(x @ x) @ x).sum())
x = jnp.ones((2048, 2048))
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _child(mode: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(host_malloc.ENV, None)
  res = subprocess.run(
      [sys.executable, "-c", _CHILD, mode], env=env, cwd=ROOT, capture_output=True, text=True
  )
  assert res.returncode == 0, res.stderr[-2000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "platforms, want", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu,cpu", False)]
)
def test_cpu_only_follows_jax_platforms(monkeypatch, platforms, want):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_malloc.cpu_only() is want


def test_bad_mode_is_a_one_line_error(monkeypatch):
  monkeypatch.setenv(host_malloc.ENV, "always")
  with pytest.raises(ValueError, match=r"INFDIFF_HOST_MALLOC='always': use one of auto, on, off"):
    host_malloc.configure()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_settings_stop_the_per_call_page_faults():
  off, on = _child("off"), _child("on")
  assert off["applied"] is False
  if not on["applied"]:
    pytest.skip("the C library has no mallopt (not glibc)")
  if off["faults"] < 100:
    pytest.skip(f"this machine's malloc does not re-fault ({off['faults']:.0f} faults per call)")
  # Measured here: ~2500 faults per call with glibc's defaults, under 1 with the settings.
  assert on["faults"] * 10 < off["faults"], (off, on)
