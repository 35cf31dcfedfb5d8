"""Test set-up: 8 simulated CPU devices, parsed absl flags for grain workers, and the CPU
malloc settings of the entry points (infdiff/host_malloc.py) before any test starts JAX."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from infdiff import host_malloc  # noqa: E402

host_malloc.configure()

# grain spawns workers that read absl flags; mark them parsed so they do not fail.
flags.FLAGS.mark_as_parsed()
