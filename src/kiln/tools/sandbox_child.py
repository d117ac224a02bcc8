"""The sandbox child of `kiln.tools.code_eval`: isolate, limit, then run ``program.py``.

  python -I <this file> MODE MEMORY_MB CPU_S FILE_MB     (from the program's working directory)

MODE is "run" (isolate, limit, execute program.py), "guard" (the same without namespaces, to
exercise the fallbacks), "report" or "report-guard" (set up, then print the protections in
force as JSON instead of running a program). It imports only the standard library.

Process layout. This process (the supervisor) becomes a child subreaper and unshares what the
machine allows: PID, mount and network namespaces (as root directly, otherwise inside a new
user namespace). With a PID namespace it forks the namespace's init, which forks the program;
when init exits or is killed, the kernel kills every process of the namespace, daemons
included, and the program cannot signal anything outside it. Without one the supervisor forks
the program itself and afterwards kills every process whose parent chain leads back to it
(orphans are re-parented to a subreaper, so a double-forked daemon is still found).

The program then gets a read-only view of the whole filesystem but its working directory (mount
namespace), runs as uid/gid 65534 when the supervisor is root (so RLIMIT_NPROC applies and it
cannot signal or write what belongs to root), and gets its resource limits. Limits are set here
rather than in ``preexec_fn``, which is unsafe with threads.
"""

import ctypes
import json
import os
import re
import resource
import signal
import stat
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
MOUNT_FLAGS = dict(nosuid=MS_NOSUID, nodev=MS_NODEV, noexec=MS_NOEXEC, noatime=MS_NOATIME)
MOUNT_FLAGS.update(nodiratime=MS_NODIRATIME, relatime=MS_RELATIME)  # kept when remounting
MIB = 1 << 20
EXTRA_PROCESSES = 32
SANDBOX_UID = SANDBOX_GID = 65534  # "nobody" on most distributions
PROGRAM_FILE = "program.py"
GUARD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py")
LIBC = ctypes.CDLL(None, use_errno=True)


class Stop(Exception):
    """Raised in the supervisor by SIGTERM: the evaluator's timeout."""


def _check(result: int, what: str) -> None:
    """Raise OSError with errno if a libc call returned -1."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2); raises OSError on failure."""
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    result = LIBC.mount(encode(source), encode(target), encode(fstype), flags, encode(data))
    _check(result, f"mount {target}")


def prctl(option: int, value: int) -> bool:
    """prctl(2) with one argument; whether it succeeded."""
    return LIBC.prctl(option, value, 0, 0, 0) == 0


def enter_namespaces(mode: str) -> set[str]:
    """Unshare the strongest set of namespaces allowed here; return their names."""
    if mode.endswith("guard"):
        return set()
    full = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET
    tries = [full] if os.geteuid() == 0 else []
    tries += [full | CLONE_NEWUSER, CLONE_NEWUSER | CLONE_NEWNET]
    uid, gid = os.geteuid(), os.getegid()
    for flags in tries:
        if LIBC.unshare(flags) == 0:
            if flags & CLONE_NEWUSER:
                with open("/proc/self/setgroups", "w") as file:
                    file.write("deny")
                with open("/proc/self/uid_map", "w") as file:
                    file.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as file:
                    file.write(f"0 {gid} 1")
            names = (CLONE_NEWPID, "pid"), (CLONE_NEWNS, "mount"), (CLONE_NEWNET, "network")
            found = {name for bit, name in names if flags & bit}
            return found | ({"user"} if flags & CLONE_NEWUSER else set())
    return set()


def traversable(path: str) -> bool:
    """Whether every directory on ``path`` may be searched by any user ("other" x bit)."""
    parts = os.path.realpath(path).split("/")
    for end in range(2, len(parts) + 1):
        try:
            if not os.stat("/".join(parts[:end]) or "/").st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def interpreter_dirs() -> list[str]:
    """The folders the running interpreter needs: its prefixes and its executable's folder."""
    dirs = {sys.prefix, sys.base_prefix, os.path.dirname(GUARD_FILE)}
    dirs |= {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(d) for d in dirs if d})


def blocked_ancestor(path: str) -> str | None:
    """The highest folder above ``path`` that other users cannot search, if any."""
    parts = path.split("/")
    for end in range(2, len(parts)):
        folder = "/".join(parts[:end])
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


def reveal(paths: list[str]) -> None:
    """Make ``paths`` reachable for other users: cover each private folder above them (a home
    directory) with an empty tmpfs and bind the needed folders back into it."""
    for path in paths:
        blocked = blocked_ancestor(path)
        if blocked is None:
            continue
        inside = [p for p in paths if p.startswith(blocked + "/")]
        handles = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inside]
        mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        for folder, handle in zip(inside, handles):
            os.makedirs(folder, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{handle}", folder, None, MS_BIND | MS_REC)
            os.close(handle)


def mount_points() -> list[tuple[str, int]]:
    """Every mount point of this mount namespace, with the flags to keep when remounting."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = sum(MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))
            points.append((target, flags))
    return points


def read_only_view(workdir: str, reveal_interpreter: bool) -> None:
    """Remount everything read-only except ``workdir``, within this mount namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if reveal_interpreter:
        reveal([workdir, *interpreter_dirs()])
    mount(workdir, workdir, None, MS_BIND | MS_REC)
    for target, flags in mount_points():
        if target == workdir:
            continue
        try:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            if target == "/":
                raise
    os.chdir(workdir)  # onto the writable bind mount, not the folder beneath it


def descendants() -> list[int]:
    """The process ids whose parent chain leads to this process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    parents[int(entry)] = int(file.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def kill_descendants() -> None:
    """SIGKILL and reap every descendant (orphans come back to a subreaper) until none is left."""
    while True:
        for pid in descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.01)
        except ChildProcessError:
            return


def own_processes(uid: int) -> int:
    """How many processes run as ``uid`` now."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            pass
    return count


def process_limit(uid: int, namespaces: set[str]) -> int:
    """RLIMIT_NPROC for the program: a few processes more than ``uid`` runs now.

    Inside a fresh user namespace on Linux >= 5.14 the count starts from zero; otherwise it
    covers every process of the uid, which is why root (exempt from the limit) drops to 65534.
    """
    release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    if "user" in namespaces and release >= (5, 14):
        return EXTRA_PROCESSES
    return own_processes(uid) + EXTRA_PROCESSES


def set_limit(kind: int, soft: int, hard: int) -> None:
    """Lower a resource limit, never above the hard limit inherited."""
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))


def apply_limits(memory_mb: int, cpu_s: int, file_mb: int, nproc: int) -> None:
    """Core files off; file size, CPU time, processes and address space capped."""
    set_limit(resource.RLIMIT_CORE, 0, 0)
    set_limit(resource.RLIMIT_FSIZE, file_mb * MIB, file_mb * MIB)
    set_limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    set_limit(resource.RLIMIT_NPROC, nproc, nproc)
    if memory_mb > 0:
        set_limit(resource.RLIMIT_AS, memory_mb * MIB, memory_mb * MIB)


def describe(namespaces: set[str], drop: bool, view: str) -> dict[str, str]:
    """The protections in force, as report mode prints them and code_eval logs them."""
    if drop:
        user = f"uid {SANDBOX_UID}"
    else:
        user = "user namespace without capabilities" if "user" in namespaces else "same user"
    if view == "read-only":
        filesystem = "read-only except the working directory"
    elif drop:
        filesystem = f"only what uid {SANDBOX_UID} may write (world-writable folders such as /tmp)"
    else:
        filesystem = "unprotected" + (f" ({view})" if view else "")
    return {
        "processes": "pid namespace" if "pid" in namespaces else "subreaper",
        "filesystem": filesystem,
        "user": user,
        "network": "namespace" if "network" in namespaces else "socket guard",
    }


def become_program(setup: dict) -> None:
    """In the forked program process: drop privileges, limit, then exec the program (or, in
    report mode, print the protections). Never returns."""
    try:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        if setup["drop"]:
            if not setup["report"]:
                os.chmod(PROGRAM_FILE, 0o644)
            os.chown(".", SANDBOX_UID, SANDBOX_GID)
        apply_limits(*setup["limits"], setup["nproc"])
        if setup["drop"]:
            os.setgroups([])
            os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        elif "user" in setup["namespaces"]:
            # A nested user namespace holds no capability over the mounts set up above.
            _check(LIBC.unshare(CLONE_NEWUSER), "unshare user namespace")
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if setup["report"]:
            print(json.dumps(setup["protections"]), flush=True)
            os._exit(0)
        guard = [] if "network" in setup["namespaces"] else ["-c", GUARDED_RUN]
        argv = [sys.executable, "-I", *(guard or [PROGRAM_FILE])]
        os.execv(sys.executable, argv)
    except BaseException as error:  # noqa: BLE001 - report anything, then leave the fork
        sys.stderr.write(f"kiln sandbox: could not start the program: {error!r}\n")
        sys.stderr.flush()
    os._exit(70)


# Without a network namespace the program runs behind the socket guard of sandbox_guard.py.
GUARDED_RUN = (
    "import runpy, sys\n"
    f"runpy.run_path({GUARD_FILE!r}, run_name='__main__')\n"
    f"sys.argv[0] = {PROGRAM_FILE!r}\n"
    f"runpy.run_path({PROGRAM_FILE!r}, run_name='__main__')\n"
)


def reap_until(pid: int) -> int:
    """As a namespace's init: reap every child until ``pid`` ends; return its wait status."""
    while True:
        child, status = os.waitpid(-1, 0)
        if child == pid:
            return status


def run_init(setup: dict, status_fd: int) -> None:
    """PID 1 of the new PID namespace: fork the program, report its status, exit (which kills
    whatever is left in the namespace). Never returns."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the supervisor killed: the namespace dies
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)  # init ignores signals it has no handler for
        # A /proc of this namespace, in a mount namespace of its own: the supervisor keeps its
        # /proc to find what is left. If that fails, the outer /proc stays (read-only).
        if "mount" in setup["namespaces"] and LIBC.unshare(CLONE_NEWNS) == 0:
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                pass
        pid = os.fork()
        if pid == 0:
            os.close(status_fd)
            become_program(setup)
        os.write(status_fd, str(reap_until(pid)).encode())
    except BaseException as error:  # noqa: BLE001
        sys.stderr.write(f"kiln sandbox: init failed: {error!r}\n")
        sys.stderr.flush()
    os._exit(0)


def launch(setup: dict) -> int:
    """Start the program (under an init when there is a PID namespace); return its wait status."""
    if "pid" not in setup["namespaces"]:
        pid = os.fork()
        if pid == 0:
            become_program(setup)
        return os.waitpid(pid, 0)[1]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        run_init(setup, write_fd)
    os.close(write_fd)
    init_status = os.waitpid(pid, 0)[1]
    with os.fdopen(read_fd, "rb") as pipe:
        reported = pipe.read()
    return int(reported) if reported else init_status


def prepare(mode: str, limits: tuple[int, int, int]) -> dict:
    """Enter the namespaces, set up the filesystem view; return what the program needs."""
    namespaces = enter_namespaces(mode)
    workdir = os.path.realpath(".")
    drop = os.geteuid() == 0 and "user" not in namespaces
    view = ""
    if "mount" in namespaces:
        try:
            read_only_view(workdir, reveal_interpreter=drop)
            view = "read-only"
        except OSError as error:
            view = f"read-only view failed: {error}"
    needed = [os.path.dirname(workdir), *interpreter_dirs()]
    drop = drop and all(traversable(folder) for folder in needed)
    uid = SANDBOX_UID if drop else os.getuid()
    return {
        "namespaces": namespaces,
        "drop": drop,
        "limits": limits,
        "nproc": process_limit(uid, namespaces),
        "report": mode.startswith("report"),
        "protections": describe(namespaces, drop, view),
    }


def exit_like(status: int | None) -> None:
    """End this process the way the program ended (the same exit code or signal)."""
    sys.stdout.flush()
    if status is None:
        os._exit(124)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _stop(number: int, frame: object) -> None:
    raise Stop


def main(mode: str, memory_mb: str, cpu_s: str, file_mb: str) -> None:
    """Supervise one program: prepare, launch, then kill everything it left behind."""
    signal.signal(signal.SIGTERM, _stop)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    status = None
    try:
        setup = prepare(mode, (int(memory_mb), int(cpu_s), int(file_mb)))
        status = launch(setup)
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_descendants()
    exit_like(status)


if __name__ == "__main__":
    main(*sys.argv[1:5])
