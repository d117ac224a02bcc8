"""The sandbox runner of `kiln.tools.code_eval`: run one program in `sandbox_child.py`.

Starts the child in a new session, enforces the wall-clock timeout, kills whatever the program
left (its session and process group), classifies the exit, and detects which protections this
machine allows (docs/reliability.md, "Code evaluation sandbox").
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

from kiln.errors import KilnError
from kiln.tools import sandbox_child

STATUSES = ("passed", "failed", "timeout")

PROGRAM_FILE = sandbox_child.PROGRAM_FILE  # what the child runs from its working directory
STDERR_FILE = "stderr.txt"
DETAIL_CHARS = 400
FILE_SIZE_MB = 16  # RLIMIT_FSIZE: the largest file (stderr included) a program may write
GRACE_S = 30.0  # after a timeout, how long the supervisor may take to kill what the program left
LOG = logging.getLogger(__name__)

# Run by file path: ``python -I`` with a minimal environment need not be able to import kiln.
CHILD = sandbox_child.__file__


@dataclass(frozen=True)
class Outcome:
    """The result of running one program: its status and a short explanation."""

    passed: bool
    status: str  # one of STATUSES
    detail: str  # the tail of stderr, or why the run failed


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run ``source`` in a sandboxed child process; passed iff it exits 0 within ``timeout_s``."""
    return _run(source, timeout_s=timeout_s, memory_mb=memory_mb, mode="run")


@functools.cache
def sandbox_protections() -> dict[str, str]:
    """Return the protections a program gets on this machine, detected by a trial run.

    Keys: "processes" ("pid namespace" or "subreaper"), "filesystem" ("read-only except the
    working directory", the places uid 65534 may write, or "unprotected"), "user" ("uid 65534",
    "user namespace without capabilities" or "same user"), "network" ("namespace" or
    "socket guard").
    """
    return _probe("report")


def _probe(mode: str) -> dict[str, str]:
    """Run the sandbox child in a report mode ("report", or "report-guard" for the fallbacks)
    and return the protections it printed."""
    with tempfile.TemporaryDirectory(prefix="kiln-code-", ignore_cleanup_errors=True) as tmp:
        result = subprocess.run(
            _command(mode, memory_mb=0, cpu_s=60),
            cwd=tmp,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            start_new_session=True,
        )
    try:
        found = json.loads(result.stdout)
    except json.JSONDecodeError:
        found = None
    if result.returncode != 0 or not isinstance(found, dict):
        raise KilnError(
            f"Could not start a sandboxed Python child ({sys.executable} -I {CHILD}): exit "
            f"code {result.returncode}, stderr: {result.stderr.strip()[-DETAIL_CHARS:]!r}. "
            "Check that this interpreter runs and that the temporary directory is writable."
        )
    return found


def network_isolation() -> str:
    """Return how children are cut off from the network here: "namespace" or "socket guard"."""
    return sandbox_protections()["network"]


def describe_protections() -> str:
    """One line naming the protections in force, for logs and the CLI."""
    found = sandbox_protections()
    return "; ".join(f"{key}: {found[key]}" for key in sorted(found))


def _run(source: str, *, timeout_s: float, memory_mb: int, mode: str) -> Outcome:
    """Run ``source`` with the sandbox child in ``mode`` ("run" or "guard"); classify the exit."""
    _check_limits(timeout_s, memory_mb)
    cpu_s = math.ceil(timeout_s) + 1
    with tempfile.TemporaryDirectory(prefix="kiln-code-", ignore_cleanup_errors=True) as tmp:
        folder = pathlib.Path(tmp)
        (folder / PROGRAM_FILE).write_text(source, encoding="utf-8")
        with open(folder / STDERR_FILE, "w+b") as stderr:
            # stdout goes to /dev/null: nothing reads it, so a flood can neither block the child
            # on a full pipe nor fill the disk (RLIMIT_FSIZE does not apply to devices).
            process = subprocess.Popen(
                _command(mode, memory_mb=memory_mb, cpu_s=cpu_s),
                cwd=tmp,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
            timed_out = False
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop(process)
            finally:
                # Also after a normal exit: whatever is left of its session must not outlive it.
                _kill_group(process.pid)
                _kill_session(process.pid)
                process.wait()
            tail = _tail(stderr)
            if stderr.tell() >= FILE_SIZE_MB << 20:
                tail = _join(f"stderr reached the {FILE_SIZE_MB} MiB file-size limit", tail)
    return _outcome(process.returncode, timed_out, tail, timeout_s)


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    """Raise KilnError unless the timeout and memory limit are positive."""
    if not isinstance(timeout_s, int | float) or not 0 < timeout_s < math.inf:
        raise KilnError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if not isinstance(memory_mb, int) or memory_mb < 32:
        raise KilnError(
            f"memory_mb must be an integer of at least 32 (MiB of address space for the child "
            f"Python process), got {memory_mb!r}."
        )


def _command(mode: str, *, memory_mb: int, cpu_s: int) -> list[str]:
    """Return the argv that starts the sandbox child in an isolated-mode interpreter."""
    limits = [str(memory_mb), str(cpu_s), str(FILE_SIZE_MB)]
    return [sys.executable, "-I", CHILD, mode, *limits]


def _child_env() -> dict[str, str]:
    """Return the child's minimal environment: PATH and LANG, nothing else."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}


def _stop(process: subprocess.Popen) -> None:
    """Ask the supervisor to kill the program and all it started (SIGTERM); SIGKILL its
    process group if it has not ended after GRACE_S."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        LOG.warning("sandbox supervisor %d ignored SIGTERM; killing its group", process.pid)
    except OSError:
        pass


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group ``pgid``, if any is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_session(sid: int) -> None:
    """SIGKILL every process still in the session ``sid`` (it may have left the group)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def _tail(file: BinaryIO) -> str:
    """Return the last few hundred characters of an open binary file, decoded leniently."""
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - 4 * DETAIL_CHARS))
    text = file.read().decode("utf-8", errors="replace").strip()
    return text[-DETAIL_CHARS:]


def _outcome(returncode: int, timed_out: bool, tail: str, timeout_s: float) -> Outcome:
    """Classify a finished child by how it ended."""
    if timed_out:
        return Outcome(False, "timeout", _join(f"timed out after {timeout_s:g} s", tail))
    if returncode == 0:
        return Outcome(True, "passed", tail)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Outcome(False, "failed", _join(f"killed by {name}", tail))
    return Outcome(False, "failed", tail or f"exit code {returncode}")


def _join(reason: str, tail: str) -> str:
    """Return ``reason``, followed by the stderr tail when there is one."""
    return f"{reason}; stderr: {tail}" if tail else reason
