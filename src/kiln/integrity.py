"""What kiln knows about a checkpoint's files, with the standard library only (no JAX).

Each checkpoint folder `<workdir>/checkpoints/<step>/` holds, next to orbax's files, a record
`kiln_checkpoint.json`: the size and SHA-256 of every file orbax wrote (arrays, metadata, the
data-iterator position) and kiln's loop state at that step (`loop`: learning-rate scale,
rollbacks, the running loss mean). The record is written into orbax's temporary folder before
orbax commits it, so a committed checkpoint always has one; a checkpoint without one was written
by a kiln before records existed and is checked structurally only. `check` re-reads the files
and says what differs; `describe_io_error` turns an OSError deep inside a save into words, and
`quiet_orbax_errors` silences orbax's own tracebacks of the failures kiln reports itself.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Any

RECORD = "kiln_checkpoint.json"
FORMAT = 1
# Suffixes of checkpoint folders kiln moved aside: integrity damage, or a state written after
# training had already diverged. orbax ignores them; `kiln.tools.checkpoints` lists them.
DAMAGED = "damaged"
DIVERGED = "diverged"
TMP = ".orbax-checkpoint-tmp"  # orbax's suffix of a folder being written
_SHOWN = 3  # problems named per checkpoint; the rest are counted
# Written by orbax after the record (its step metadata's timestamps, the top-level commit
# marker) and never read to restore: not checksummed.
_UNCHECKED = (RECORD, "_CHECKPOINT_METADATA", "commit_success.txt")


def _files(folder: str) -> list[str]:
    """Every file under `folder` (relative paths, sorted) but the record and `_UNCHECKED`."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in _UNCHECKED:
                found.append(rel)
    return sorted(found)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_record(folder: str, step: int, loop: dict[str, Any]) -> None:
    """Writes `folder`'s record: every file's size and checksum, and `loop` (kiln's state)."""
    files = {
        rel: [os.path.getsize(os.path.join(folder, rel)), _digest(os.path.join(folder, rel))]
        for rel in _files(folder)
    }
    body = json.dumps({"format": FORMAT, "step": step, "files": files, "loop": loop}, indent=1)
    tmp = os.path.join(folder, RECORD + ".tmp")
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, RECORD))


def staging_folder(directory: str, step: int) -> str:
    """The folder orbax is writing step `step` into (its temporary folder, or the final one
    where orbax commits with a marker file instead of a rename)."""
    staged = sorted(name for name in os.listdir(directory) if name.startswith(f"{step}{TMP}"))
    if staged:
        return os.path.join(directory, staged[-1])
    final = os.path.join(directory, str(step))
    if os.path.isdir(final):
        return final
    raise FileNotFoundError(f"no folder for step {step} in {directory}")


def read_record(folder: str) -> dict[str, Any] | None:
    """`folder`'s record, or None if it has none. Raises ValueError if it is unreadable."""
    path = os.path.join(folder, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record.get("files"), dict):
            raise ValueError("no file list")
        return record
    except (OSError, ValueError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"its record {RECORD} is unreadable ({e})") from None


def loop_state(folder: str) -> dict[str, Any]:
    """The loop state saved with the checkpoint in `folder` ({} without a readable record)."""
    try:
        record = read_record(folder)
    except ValueError:
        return {}
    loop = record.get("loop") if record else None
    return loop if isinstance(loop, dict) else {}


def signature(folder: str) -> tuple:
    """(path, size, mtime) of every file: unchanged means an earlier check still holds."""
    out = []
    for rel in [*_files(folder), RECORD]:
        try:
            stat = os.stat(os.path.join(folder, rel))
        except OSError:
            continue
        out.append((rel, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def check(folder: str) -> str | None:
    """Why the checkpoint in `folder` cannot be trusted, or None when it is intact: every file
    its record lists is present with the recorded size and checksum; without a record, the
    JSON files orbax and grain wrote parse."""
    try:
        record = read_record(folder)
    except ValueError as e:
        return str(e)
    if record is None:
        return _check_structure(folder)
    problems = []
    for rel, (size, digest) in sorted(record["files"].items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != size:
            got = os.path.getsize(path)
            how = "truncated or rewritten" if got < size else "rewritten or appended to"
            problems.append(f"{rel} has {got} bytes, {size} when saved ({how})")
        elif _digest(path) != digest:
            problems.append(f"{rel} has changed since it was saved (checksum mismatch)")
    return _summarise(problems)


def _check_structure(folder: str) -> str | None:
    """A record-less checkpoint: the metadata and iterator files must at least parse."""
    problems = []
    for rel in _files(folder):
        name = os.path.basename(rel)
        if name == "_METADATA" or rel.endswith(".json"):
            try:
                with open(os.path.join(folder, rel), encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError, UnicodeDecodeError):
                problems.append(f"{rel} is not valid JSON")
    return _summarise(problems)


def _summarise(problems: list[str]) -> str | None:
    if not problems:
        return None
    text = "; ".join(problems[:_SHOWN])
    more = len(problems) - _SHOWN
    return text + (f"; and {more} more file{'s' * (more > 1)}" if more > 0 else "")


def set_aside(directory: str, step: int, why: str) -> str:
    """Renames `<directory>/<step>` to `<step>.<why>` (`.<why>-2`, ... if taken) so orbax no
    longer sees it; returns the new path."""
    target = os.path.join(directory, f"{step}.{why}")
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(directory, f"{step}.{why}-{n}")
    os.rename(os.path.join(directory, str(step)), target)
    return target


def free_space(path: str) -> str:
    """Free space on the disk holding `path` (or its nearest existing parent), in words."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        free = shutil.disk_usage(path or ".").free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"


_ADVICE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "a file grew past the file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted (permissions or an immutable folder)",
    errno.EIO: "the disk reported an input/output error",
}


def io_errno(error: BaseException) -> int | None:
    """The OS error number behind `error` (an OSError in its chain, or the code tensorstore
    prints in its message), if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        match = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(seen))
        if match:
            return int(match.group(1) or match.group(2))
        seen = seen.__cause__ or seen.__context__
    return None


def describe_io_error(error: BaseException) -> str:
    """`error` in a few words: the OS reason when there is one, else its first line."""
    code = io_errno(error)
    if code is not None:
        return f"{_ADVICE.get(code, os.strerror(code))} ({errno.errorcode.get(code, code)})"
    return first_line(error)


def first_line(error: BaseException, limit: int = 240) -> str:
    """The first line of `error`'s message, shortened, with its type if the message is empty."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# orbax's own reports of a failed save or restore: tracebacks from its threads, several per
# failure. kiln checks every save and restore itself and says what failed in one paragraph.
_QUIET = f"{os.sep}orbax{os.sep}"


class _QuietOrbax(logging.Filter):
    """Drops error records logged by orbax's code, or about it (asyncio's "Task exception was
    never retrieved" for an orbax write task, logged whenever that task is collected)."""

    def filter(self, record: logging.LogRecord) -> bool:
        about_orbax = _QUIET in record.pathname or _QUIET in record.getMessage()
        return not (record.levelno >= logging.ERROR and about_orbax)


_CLOSED = "Event loop is closed"


def quiet_orbax_errors() -> None:
    """Installs, once, by the first Checkpointer (never on import): the filter of
    orbax's error logs, and an unraisable-exception hook that drops the "Event loop is closed"
    tracebacks tensorstore prints after a failed write (completing orbax's futures on loops
    orbax has closed); every other unraisable exception goes to the previous hook."""
    absl_logger = logging.getLogger("absl")
    if any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
        return
    absl_logger.addFilter(_QuietOrbax())
    logging.getLogger("asyncio").addFilter(_QuietOrbax())
    previous = sys.unraisablehook

    def hook(info: Any) -> None:
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == _CLOSED):
            previous(info)

    sys.unraisablehook = hook
