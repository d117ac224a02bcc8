"""Test setup: 8 fake CPU devices, so sharding is exercised without accelerators."""

import os
import tempfile

# Optimisation level 0 halves XLA:CPU compile times, which dominate these tiny tests.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the xdist workers and the runs they start as
# subprocesses (resume tests compile the same train step in several processes): ~25% less
# time on those tests. Executables are keyed by their HLO, flags and versions, so a cached one
# is the one a compile would produce.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kiln_tests_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
