"""kiln.host_memory: importing kiln keeps XLA's freed scratch buffers mapped, so a jitted
function's repeated calls stop page-faulting their temporaries in; KILN_KEEP_HOST_MEMORY=0
keeps glibc's defaults. Each case runs in a fresh process (the setting must precede JAX's
CPU backend)."""

import os
import platform
import statistics
import subprocess
import sys

import pytest

# A function whose compiled form has 64 MiB of temporaries (two [4096, 4096] float32
# intermediates), larger than any glibc thread arena serves without mmap. Prints the temporary
# size, then the process's minor page faults in each of 15 calls after 3 warm-up calls.
PROGRAM = """
import resource
import kiln
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) @ jnp.tanh(x @ x.T))
x = jnp.full((4096, 512), 0.01)
print(f.lower(x).compile().memory_analysis().temp_size_in_bytes)
for i in range(18):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    if i >= 3:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _temp_bytes_and_faults(keep: str) -> tuple[int, list[int]]:
    env = {**os.environ, "KILN_KEEP_HOST_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    temp, *faults = map(int, out.stdout.split())
    return temp, faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_freed_scratch_memory_stays_mapped_unless_opted_out():
    temp, kept_faults = _temp_bytes_and_faults("1")
    _, default_faults = _temp_bytes_and_faults("0")
    pages = temp // 4096
    assert temp >= 64 * 2**20
    # glibc's defaults munmap the scratch buffer after each call: every call touches it afresh.
    assert min(default_faults) >= pages // 2, (default_faults, pages)
    # Kept: calls reuse the mapped buffer; the heap still grows now and then (two calls' buffers
    # alive at once, fragments too small to reuse), so most calls, not all, fault nothing.
    assert statistics.median(kept_faults) < pages // 50, (kept_faults, pages)
