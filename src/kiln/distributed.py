"""Joining JAX's multi-controller runtime: every process runs the same program."""

import os
import socket
import time
from typing import Any

import jax

from kiln.errors import KilnError


def maybe_initialize(distributed_config: Any) -> None:
    """Calls `jax.distributed.initialize` when the config or KILN_DISTRIBUTED=1 asks for it.

    Empty fields are left to JAX's auto-detection (TPU pods, SLURM, Kubernetes). Must run before
    anything else touches the JAX backend.
    """
    if not (distributed_config.initialize or os.environ.get("KILN_DISTRIBUTED") == "1"):
        return
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
