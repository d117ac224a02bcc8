"""Joining JAX's multi-controller runtime: every process runs the same program."""

import os
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
    kwargs: dict[str, Any] = {}
    if distributed_config.coordinator_address:
        kwargs["coordinator_address"] = distributed_config.coordinator_address
    if distributed_config.num_processes > 0:
        kwargs["num_processes"] = distributed_config.num_processes
    if distributed_config.process_id >= 0:
        kwargs["process_id"] = distributed_config.process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise KilnError(
            f"jax.distributed.initialize({kwargs}) failed: {e}. Check"
            " distributed.coordinator_address/num_processes/process_id, or unset"
            " distributed.initialize and KILN_DISTRIBUTED for a single-process run."
        ) from e
