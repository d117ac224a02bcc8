"""A run's workdir: the names of its files, the check that a resumed run is the same run, and
the summary. Every module that reads or writes a workdir takes the names from here.

    <workdir>/config.json      the resolved config (read back on resume and by fine-tunes)
    <workdir>/tokenizer.model  the sentencepiece model every later stage uses (kiln-trained)
    <workdir>/tokenizer/       or: an imported Hugging Face tokenizer's files (tokenizer.json
                               or spiece.model, tokenizer_config.json, ...)
    <workdir>/checkpoints/N    orbax: train state and data iterator position at step N
    <workdir>/metrics.jsonl    one line per logged step; tensorboard/ holds the same
    <workdir>/summary.json     final metrics, written when the run ends
    <workdir>/kiln.lock        while a run is going: its process id and host (`lock`)
"""

import contextlib
import datetime
import functools
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ml_collections

from kiln import config_lib
from kiln.errors import KilnError

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_DIR = "tokenizer"
# The files that make a directory a Hugging Face tokenizer (kiln.data.hf_tokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SUMMARY = "summary.json"
PREDICTIONS = "predictions_test.jsonl"
LOCK = "kiln.lock"
T = TypeVar("T")

# Sections that define what a run computes: a resumed run may change anything else (steps,
# learning rate, evaluation, checkpointing, mesh) but not these.
RUN_IDENTITY = ("seed", "model", "tokenizer", "data", "objective", "task", "finetune")
# Model fields that change how, not what, the run computes: a resumed run may change them.
HOW_NOT_WHAT = ("remat", "scan_layers")


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Creates the workdir and writes config.json; a resumed run must keep its identity
    (`RUN_IDENTITY`, but for `HOW_NOT_WHAT`)."""
    import jax  # Here: tools that only read workdirs need not import jax.

    make(workdir)
    path = os.path.join(workdir, CONFIG)
    if os.path.exists(path):
        old, new = config_lib.load_json(path).to_dict(), config_lib.to_dict(config)
        for run_config in (old, new):
            for key in HOW_NOT_WHAT:
                run_config.get("model", {}).pop(key, None)
        changed = config_lib.diff(
            {k: old.get(k) for k in RUN_IDENTITY}, {k: new.get(k) for k in RUN_IDENTITY}
        )
        if changed:
            raise KilnError(
                f"{workdir} holds a different run; differing keys: {changed}. Use a new"
                " --workdir, or restore those values to resume the existing run."
            )
    if jax.process_index() == 0:
        config_lib.save_json(config, path)


def find_tokenizer(workdir: str | os.PathLike) -> str | None:
    """The tokenizer of `workdir`: its tokenizer.model (kiln-trained), else its tokenizer/
    directory (imported), else the workdir itself if it is a Hugging Face tokenizer directory
    (a save_pretrained checkpoint); None if it has none. A directory with a tokenizer.json is
    an HF one even beside a tokenizer.model (Llama checkpoints ship both)."""
    if os.path.isfile(os.path.join(workdir, HF_TOKENIZER_FILES[0])):
        return str(workdir)
    candidates = [os.path.join(workdir, TOKENIZER), os.path.join(workdir, TOKENIZER_DIR)]
    for path in candidates:
        if os.path.isfile(path) or _is_hf_tokenizer(path):
            return path
    return str(workdir) if _is_hf_tokenizer(workdir) else None


def tokenizer_path(workdir: str | os.PathLike) -> str:
    """`find_tokenizer(workdir)`, or a KilnError naming what was expected there."""
    path = find_tokenizer(workdir)
    if path is None:
        raise KilnError(
            f"No tokenizer in {workdir}: expected {TOKENIZER} (a tokenizer kiln trained) or a"
            f" {TOKENIZER_DIR}/ directory with {' or '.join(HF_TOKENIZER_FILES)} (an imported"
            " one). Point at a run that finished setting up, or copy the tokenizer there."
        )
    return path


def _is_hf_tokenizer(path: str | os.PathLike) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    """summary.json, written by process 0 only, atomically."""
    import jax

    if jax.process_index() == 0:
        config_lib.write_atomically(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=2))


def read_summary(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's summary.json, or None if it has none (yet) or it cannot be read."""
    try:
        with open(os.path.join(workdir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_finished(workdir: str | os.PathLike, steps: int) -> bool:
    """Whether the run in `workdir` finished: its summary.json is at step `steps` or says it
    stopped early (train.early_stop_patience); one that stopped with train.stop_after, or
    never ended, has none or an earlier step."""
    summary = read_summary(workdir)
    return summary is not None and (
        summary.get("step") == steps or bool(summary.get("early_stopped"))
    )


def first_perplexity(workdir: str) -> float | None:
    """Validation perplexity at step 0 from metrics.jsonl (kept across resumes)."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["step"] == 0 and "validation/perplexity" in row:
                return row["validation/perplexity"]
    return None


def make(workdir: str | os.PathLike) -> bool:
    """Creates `workdir` if it is missing; returns whether it did. A KilnError, in one
    paragraph, if the name is empty, names a file, or cannot be created."""
    if not str(workdir).strip():
        raise KilnError(
            "--workdir is empty: give the directory the run writes its checkpoints, metrics and"
            " summary to, e.g. --workdir runs/my_run (it is created if missing)."
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise KilnError(
            f"--workdir={str(workdir)!r} is a file, not a directory. Give a directory (it is"
            " created if missing), or move the file out of the way."
        )
    if os.path.isdir(workdir):
        return False
    try:
        os.makedirs(workdir)
    except FileExistsError:
        return False  # Made by another process meanwhile.
    except OSError as e:
        raise KilnError(
            f"--workdir={str(workdir)!r} cannot be created: {e.strerror or e}. Choose a"
            " directory you can write to, or create it (with write permission) first."
        ) from None
    return True


def locked(run: Callable[..., T]) -> Callable[..., T]:
    """Decorates `run(config, workdir, ...)` to hold `lock(workdir)` for the whole run."""

    @functools.wraps(run)
    def locked_run(config: Any, workdir: str, *args: Any, **kwargs: Any) -> T:
        with lock(workdir):
            return run(config, workdir, *args, **kwargs)

    return locked_run


# Workdirs whose lock this process holds, with how many nested `lock` calls hold each.
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `<workdir>/kiln.lock` while the block runs, so that a second run on the same
    workdir is refused instead of writing the same checkpoints and metrics.

    Process 0 takes it (the other processes of a multi-process run share its workdir); nested
    calls in one process share one lock. The file holds the holder's process id and host, and
    is `flock`ed while held, so a run that died (kill -9, a crash) leaves a stale lock that the
    next run on the same host takes over, saying so. A lock of a live process, or of another
    host (whose processes cannot be checked from here), is a KilnError naming its holder and
    the file to delete if no run uses the workdir. A workdir this created and that is still
    empty at the end (the run failed before writing anything) is removed again.
    """
    import jax  # Here: tools that only read workdirs need not import jax.

    created = make(workdir)
    key = os.path.realpath(workdir)
    if jax.process_index() != 0 or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    path = os.path.join(workdir, LOCK)
    fd, token = _acquire(path)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        _release(path, fd, token)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)  # Only if empty.


def _acquire(path: str) -> tuple[int, str]:
    """Takes the lock file `path`: (its open descriptor, the token written into it)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    me["proc_start"] = _proc_stat(os.getpid())[1]
    me["started"] = datetime.datetime.now().isoformat(timespec="seconds")
    me["command"] = " ".join(sys.argv)
    for _ in range(5):  # A lock released and re-created between our open and flock: again.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            workdir = os.path.dirname(path)
            raise KilnError(
                f"--workdir={workdir!r} is not writable: creating its lock file {path} failed"
                f" ({e.strerror or e}). Choose a directory you can write to, or fix its"
                " permissions."
            ) from None
        try:
            if _take(fd, path, me):
                return fd, me["token"]
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise KilnError(f"Could not take the lock {path}: it kept changing. Re-run the command.")


def _take(fd: int, path: str, me: dict[str, Any]) -> bool:
    """Tries to make the open lock file `fd` ours; False if `path` now names another file."""
    flocked = _flock(fd)
    if flocked is None:  # Held open by a live process of this host (the kernel says so).
        holder = _read_holder(fd)
        pid, proc_start = holder.get("pid"), holder.get("proc_start")
        gone = holder.get("host") == me["host"] and not _alive(pid, proc_start)
        raise _refusal(path, holder, alive=True, orphaned=gone)
    try:
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return False  # Released (unlinked) by its holder between our open and flock.
    except FileNotFoundError:
        return False
    holder = _read_holder(fd)
    if holder:
        _check_holder(path, holder, me, flocked)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return True


def _check_holder(path: str, holder: dict[str, Any], me: dict[str, Any], flocked: bool) -> None:
    """Raises unless the lock's previous holder is gone; says when a stale lock is taken over."""
    pid, host = holder.get("pid"), holder.get("host")
    if host != me["host"]:
        if "pid" not in holder and flocked:  # Not a lock kiln wrote, and nobody holds it.
            print(f"Taking over the unreadable lock file {path}.", flush=True)
            return
        raise _refusal(path, holder, alive=False)
    alive = _alive(pid, holder.get("proc_start"))
    if alive and not flocked and pid != os.getpid():  # No flock here: trust the pid check.
        raise _refusal(path, holder, alive=True)
    print(
        f"Taking over the stale lock {path} of process {pid} on {host} (started"
        f" {holder.get('started', '?')}), which is no longer running: it was killed or crashed.",
        flush=True,
    )


def _refusal(path: str, holder: dict[str, Any], alive: bool, orphaned: bool = False) -> KilnError:
    """The one-paragraph error for a workdir another run holds."""
    workdir = os.path.dirname(path)
    if "pid" in holder:
        who = (
            f"process {holder.get('pid')} on host {holder.get('host')} (started"
            f" {holder.get('started', '?')}, command {holder.get('command', '?')!r})"
        )
    else:
        who = "a process that is starting" if not holder else "an unknown process"
    if orphaned:
        state = (
            "has exited, but a process it started still holds the file open (find it with"
            f" `fuser {path}`)"
        )
    elif alive:
        state = "is running there now"
    elif "pid" in holder:
        state = "may be running there: kiln cannot check another host's processes from here"
    else:
        state = "holds it: the lock file is not one kiln wrote"
    return KilnError(
        f"The workdir {workdir} is in use: its lock {path} names {who}, which {state}. Two runs"
        " on one workdir would write the same checkpoints and metrics. Wait for that run to"
        " end (or stop it), or use another --workdir; if you are sure no run is using this"
        f" workdir (e.g. its machine was preempted), delete {path} and re-run."
    )


def _flock(fd: int) -> bool | None:
    """flock(LOCK_EX | LOCK_NB): True if taken, None if a live process holds it, False where
    the filesystem or platform has no flock (the pid check alone decides then)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except OSError:
        return False
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    """The lock file's record ({} if empty; {"unreadable": text} if it is not kiln's JSON)."""
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return {}
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"unreadable": data[:200].decode("utf-8", "replace")}
    return record


def _release(path: str, fd: int, token: str) -> None:
    """Deletes the lock file if it is still ours, then lets go of it."""
    try:
        holder = _read_holder(fd)
        if holder.get("token") == token and os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except OSError:
        pass  # Already gone, or the workdir went read-only: the next run takes it over.
    finally:
        os.close(fd)


def _alive(pid: Any, proc_start: Any) -> bool:
    """Whether process `pid` of this host is running and is the one that took the lock (not a
    zombie, not a later process that reused the id)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's process.
    except (OverflowError, ValueError):
        return False  # Not a process id.
    state, start = _proc_stat(pid)
    if state is None:
        return True  # No /proc: existence is all we know.
    return state != "Z" and (proc_start is None or proc_start == start)


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """Process `pid`'s state letter and start time (clock ticks since boot) from
    /proc/<pid>/stat; (None, None) without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None
