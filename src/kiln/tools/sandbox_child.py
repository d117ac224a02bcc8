"""The sandbox child of `kiln.tools.code_eval`: isolate, limit, then run ``program.py``.

  python -I <this file> MODE MEMORY_MB CPU_S FILE_MB     (from the program's working directory)

MODE is "run" (isolate, limit, then execute program.py from the working directory), "guard" (the
same but skip the namespace attempt, to exercise the fallback) or "report" (print the
mechanism). code_eval starts it by file path in isolated mode with a minimal environment, so it
imports only the standard library: nothing from kiln, which the child's sys.path may not hold.

Limits are set here rather than in ``preexec_fn``, which is unsafe with threads (``evaluate``
launches children from a thread pool), and after ``unshare`` so that RLIMIT_NPROC counts only
the sandbox's processes (Linux >= 5.14 counts processes per user namespace).
"""

import ctypes
import os
import re
import resource
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
MIB = 1 << 20
EXTRA_PROCESSES = 32
PROGRAM_FILE = "program.py"


def enter_namespaces() -> bool:
    """Whether new user and network namespaces could be entered (no network but loopback)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def guard_sockets() -> None:
    """Best effort without namespaces: every way to open a socket raises OSError."""
    import _socket
    import socket

    def disabled(*args, **kwargs):
        raise OSError("network disabled")

    class DisabledSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError("network disabled")

    for module in (socket, _socket):
        for name in (
            "socketpair",
            "getaddrinfo",
            "gethostbyname",
            "gethostbyname_ex",
            "create_connection",
            "create_server",
            "fromfd",
        ):
            if hasattr(module, name):
                setattr(module, name, disabled)
        module.socket = DisabledSocket


def isolate(mode: str) -> str:
    """Cuts the process off the network; returns how: "namespace" or "socket guard"."""
    if mode != "guard" and enter_namespaces():
        return "namespace"
    guard_sockets()
    return "socket guard"


def own_processes() -> int:
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            pass
    return count


def process_limit(namespaced: bool) -> int:
    # Outside a fresh user namespace (or before Linux 5.14) RLIMIT_NPROC counts all processes
    # of the user, so allow a few more than exist now. The kernel exempts root from it anyway.
    release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    if namespaced and release >= (5, 14):
        return EXTRA_PROCESSES
    return own_processes() + EXTRA_PROCESSES


def set_limit(kind: int, soft: int, hard: int) -> None:
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))


def apply_limits(memory_mb: int, cpu_s: int, file_mb: int, namespaced: bool) -> None:
    set_limit(resource.RLIMIT_CORE, 0, 0)
    set_limit(resource.RLIMIT_FSIZE, file_mb * MIB, file_mb * MIB)
    set_limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    nproc = process_limit(namespaced)
    set_limit(resource.RLIMIT_NPROC, nproc, nproc)
    set_limit(resource.RLIMIT_AS, memory_mb * MIB, memory_mb * MIB)


def main(mode: str, memory_mb: str, cpu_s: str, file_mb: str) -> None:
    mechanism = isolate(mode)
    if mode == "report":
        print(mechanism)
        return
    with open(PROGRAM_FILE, encoding="utf-8") as file:
        source = file.read()
    apply_limits(int(memory_mb), int(cpu_s), int(file_mb), mechanism == "namespace")
    del sys.argv[1:]
    sys.argv[0] = PROGRAM_FILE
    code = compile(source, PROGRAM_FILE, "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main(*sys.argv[1:5])
