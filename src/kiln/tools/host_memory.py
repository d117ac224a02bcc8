"""Keep freed host memory mapped, so that XLA's CPU executables stop page-faulting it back in.

XLA's CPU runtime allocates an executable's scratch memory as one buffer per call, with
posix_memalign from its worker threads. glibc serves such a request (larger than a thread
arena's 64 MiB heap) with mmap and gives it back with munmap, so every train step touches its
whole scratch memory afresh: at the benchmark shape (benchmarks/peers.py, gpt) 235,000 page
faults and about 0.5 s of kernel time per step, a third of the step's CPU time.

`keep_freed_memory` makes every thread allocate from glibc's main heap, with mmap and trimming
off: a freed buffer stays mapped and the next call reuses it. The cost is resident memory: the
heap keeps its high-water mark, up to a few times the scratch memory of the largest executable
(measured in benchmarks/RESULTS.md). `KILN_KEEP_HOST_MEMORY=0` keeps glibc's defaults.

It must run before JAX starts its CPU backend (a thread keeps the arena of its first malloc).
Importing kiln changes nothing: the command-line entry points call it first thing in their
`main()` (`kiln.main`, `kiln.tools.fits`, `kiln.tools.sample`; the benchmarks through
benchmarks/common.py), and so does any program that embeds kiln and wants the setting.
Elsewhere than Linux with glibc it does nothing.
"""

import ctypes
import os
import sys

ENV = "KILN_KEEP_HOST_MEMORY"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap, no trimming; whether it did (not when
    $KILN_KEEP_HOST_MEMORY is 0, nor without glibc)."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl's mallopt is a stub)
    except (OSError, AttributeError):
        return False
    # One arena first: threads started from now on share the main heap, the only one that
    # can hold a buffer larger than 64 MiB without mmap. A trim threshold of -1 is SIZE_MAX.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
