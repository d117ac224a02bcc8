"""Command line: `python -m kiln.main --config experiments/<file>.py:<args> --workdir runs/<name>`.

Override any config field with `--config.section.key=value`; the config is locked, so a
misspelt key fails and names the nearest valid one. Re-running the same command resumes. With
`distributed.initialize` (or KILN_DISTRIBUTED=1) each process first joins JAX's
multi-controller runtime (`join_processes`). The workdir is locked for the whole command
(`workdir.lock`): a second command on it is refused. Any failure ends as `kiln.tools.cli`
says: a KilnError is one paragraph and exit code 2; anything else points at a crash log
(in the workdir) and exits 1.
"""

import os
import socket
import sys
import time
from typing import Any

from absl import app, flags, logging

from kiln.errors import KilnError
from kiln.tools import cli, host_memory

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
flags.mark_flags_as_required(["config", "workdir"])

PROG = "kiln"
USAGE = (
    "Usage: python -m kiln.main --config experiments/<file>.py[:args] --workdir DIR"
    " [--config.section.key=value ...]"
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported in one paragraph instead of a traceback."""
    try:
        return cli.parse_flags(argv, PROG, USAGE)
    except SystemExit:
        raise
    except Exception as e:  # Not a mistake kiln knows: a crash log, not a traceback.
        sys.exit(cli.crash(PROG, e))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"{PROG}: error: unexpected arguments {argv[1:]}.\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    host_memory.keep_freed_memory()  # Process-wide, so here and not on import: before JAX starts.
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO.
    workdir = _WORKDIR.value  # Also where a crash log goes, if it exists by then.
    sys.exit(cli.run(PROG, lambda: _run(_CONFIG.value, workdir), workdir or None))


def _run(config: Any, workdir: str) -> None:
    """Joins the other processes, then runs the pipeline or the single run with the workdir
    locked."""
    from kiln import pipelines
    from kiln import workdir as workdir_lib

    first = config[config.stages[0]] if pipelines.is_pipeline(config) else config
    join_processes(first.distributed)  # Before anything touches the JAX backend.
    from kiln import run

    with workdir_lib.lock(workdir):
        if pipelines.is_pipeline(config):
            pipelines.run_pipeline(config, workdir)
        else:
            run.train_and_evaluate(config, workdir)


def join_processes(distributed_config: Any) -> None:
    """Joins JAX's multi-controller runtime (every process runs the same program): calls
    `jax.distributed.initialize` when the config or KILN_DISTRIBUTED=1 asks for it.

    Empty fields are left to JAX's auto-detection (TPU pods, SLURM, Kubernetes). Must run before
    anything else touches the JAX backend.
    """
    if not (distributed_config.initialize or os.environ.get("KILN_DISTRIBUTED") == "1"):
        return
    import jax  # Here: importing kiln.main must not load JAX before the host-memory setting.

    kwargs: dict[str, Any] = {"initialization_timeout": int(distributed_config.timeout_s)}
    if distributed_config.coordinator_address:
        kwargs["coordinator_address"] = distributed_config.coordinator_address
    if distributed_config.num_processes > 0:
        kwargs["num_processes"] = distributed_config.num_processes
    if distributed_config.process_id >= 0:
        kwargs["process_id"] = distributed_config.process_id
    if distributed_config.coordinator_address and distributed_config.process_id > 0:
        # An unreachable coordinator makes the runtime abort the process from C++ after the
        # timeout, with no Python error: check reachability here first.
        _wait_for_coordinator(distributed_config.coordinator_address, distributed_config.timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise KilnError(
            f"jax.distributed.initialize({kwargs}) failed: {_first_line(e)}. Check that every"
            " process was started and can reach the coordinator, and"
            " distributed.coordinator_address/num_processes/process_id (distributed.timeout_s"
            " is how long to wait), or unset distributed.initialize and KILN_DISTRIBUTED for a"
            " single-process run."
        ) from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once a TCP connection to `address` (host:port) succeeds; KilnError after
    `timeout_s` seconds of failures."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise KilnError(
            f"distributed.coordinator_address={address!r} is not host:port, e.g. 10.0.0.2:1234."
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise KilnError(
                    f"The coordinator {address} (process 0) could not be reached for"
                    f" {timeout_s:g} s ({e}). Start process 0 with the same"
                    " distributed.coordinator_address, check the host and port are reachable"
                    " from here, or raise distributed.timeout_s."
                ) from None
            time.sleep(0.5)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
