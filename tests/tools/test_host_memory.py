"""kiln.tools.host_memory: the entry points keep XLA's freed scratch buffers mapped, so a jitted
function's repeated calls stop page-faulting their temporaries in; KILN_KEEP_HOST_MEMORY=0
keeps glibc's defaults; importing kiln changes nothing. Each case runs in a fresh process (the
setting must precede JAX's CPU backend)."""

import os
import platform
import statistics
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's"
)

# A function whose compiled form has 64 MiB of temporaries (two [4096, 4096] float32
# intermediates), larger than any glibc thread arena serves without mmap. Prints the temporary
# size, then the process's minor page faults in each of 15 calls after 3 warm-up calls.
PROGRAM = """
import resource
from kiln.tools import host_memory
host_memory.keep_freed_memory()
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

# Prints 1 if glibc serves a 64 MiB malloc with mmap (its default), 0 if from the heap (the
# setting), after the code in {setup}. mallinfo2's hblks counts the mmapped chunks.
PROBE = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

def mmapped():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    pointer = libc.malloc(64 << 20)
    after = libc.mallinfo2().hblks
    libc.free(pointer)
    return after - before

{setup}
print("mmapped", mmapped())
"""

# kiln.main's main() up to the run, which the probe replaces: what a training process has.
MAIN = """
import sys
from absl import app
from kiln import main, run

def probe(config, workdir):
    print("mmapped", mmapped())

run.train_and_evaluate = probe
sys.argv = ["kiln.main", "--config", "experiments/gpt/pretrain.py:size=tiny", "--workdir", "w"]
app.run(main.main, flags_parser=main.parse_flags)
"""


def _run(program: str, keep: str = "1", cwd: str | None = None) -> str:
    env = {**os.environ, "KILN_KEEP_HOST_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _mmapped(setup: str, keep: str = "1", cwd: str | None = None) -> int:
    lines = _run(PROBE.format(setup=setup), keep, cwd).splitlines()
    return int(next(line for line in lines if line.startswith("mmapped")).split()[1])


def _temp_bytes_and_faults(keep: str) -> tuple[int, list[int]]:
    temp, *faults = map(int, _run(PROGRAM, keep).split())
    return temp, faults


@glibc_only
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


@glibc_only
def test_importing_kiln_leaves_malloc_alone():
    assert _mmapped("") == 1  # glibc's default: a 64 MiB block is mmapped.
    imports = "import kiln, kiln.main, kiln.run, kiln.tools.fits, kiln.tools.sample"
    assert _mmapped(imports) == 1
    assert _mmapped("from kiln.tools import host_memory\nhost_memory.keep_freed_memory()") == 0


@glibc_only
def test_kiln_main_applies_it_unless_opted_out():
    root = __file__.rsplit("/tests/", 1)[0]
    assert _mmapped(MAIN, cwd=root) == 0
    assert _mmapped(MAIN, keep="0", cwd=root) == 1
