"""Test setup: 8 fake CPU devices, so sharding is exercised without accelerators."""

import os

# Optimisation level 0 halves XLA:CPU compile times, which dominate these tiny tests.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
