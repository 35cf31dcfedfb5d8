"""Test set-up: 8 simulated CPU devices, parsed absl flags for grain workers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain spawns workers that read absl flags; mark them parsed so they do not fail.
flags.FLAGS.mark_as_parsed()
