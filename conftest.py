"""Test-session setup that must happen before JAX is imported anywhere."""

import os

# Eight virtual CPU devices, so sharding tests can build a 2x2x2 (data, fsdp, tensor) mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
