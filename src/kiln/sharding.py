"""Device mesh and the rules that map logical axis names onto it.

Models name their axes logically (`embed`, `heads`, `act_batch`, ...); this module alone knows
the mesh axes `data`, `fsdp` and `tensor`.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kiln.errors import KilnError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are sharded over `fsdp` along their model dimension
# and over `tensor` along heads / MLP / vocab; activations over the batch axes only.
RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_vocab", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("max_len", None),
    ("type_vocab", None),
    ("relpos_buckets", None),
    ("classes", None),
)
_RULES = dict(RULES)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves `mesh.{data,fsdp,tensor}` (one of them may be -1: the remaining devices)."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    given = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise KilnError(
            f"mesh: at most one of mesh.data/fsdp/tensor may be -1, got {given}."
            " Set the others to explicit sizes."
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise KilnError(f"mesh: sizes must be positive or -1, got {given}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise KilnError(
                f"mesh: the fixed axes multiply to {known}, which does not divide the {num_devices}"
                " available devices. Choose sizes whose product divides the device count."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise KilnError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices"
            f" ({jax.devices()[0].platform}). Set one of mesh.data/fsdp/tensor to -1 or make the"
            " product equal the device count."
        )
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh with automatic (GSPMD) sharding propagation."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(
        np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape)
    )


def _mesh_axes_for(logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in _RULES:
        raise ValueError(f"logical axis {logical!r} has no sharding rule in kiln.sharding.RULES")
    target = _RULES[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """Logical names -> PartitionSpec; a dimension its mesh axes do not divide stays whole."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in _mesh_axes_for(name) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def tree_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` (unboxed result)."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp), everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(_RULES["act_batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
    """Context in which the models' logical activation constraints bind to `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield
