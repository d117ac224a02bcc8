import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from kiln import sharding
from kiln.errors import KilnError


def mesh_config(data=-1, fsdp=1, tensor=1):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def test_mesh_shape_resolves_minus_one():
    assert sharding.mesh_shape(mesh_config(-1, 2, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(mesh_config(1, -1, 4), 8) == (1, 2, 4)
    assert sharding.mesh_shape(mesh_config(8, 1, 1), 8) == (8, 1, 1)


@pytest.mark.parametrize(
    "cfg", [mesh_config(16, 1, 1), mesh_config(-1, 3, 1), mesh_config(-1, -1, 1), mesh_config(0)]
)
def test_bad_mesh_shapes_fail_with_kiln_error(cfg):
    with pytest.raises(KilnError, match="mesh"):
        sharding.mesh_shape(cfg, 8)


def test_logical_to_mesh_spec_and_divisibility_fallback():
    mesh = sharding.make_mesh(mesh_config(2, 2, 2))
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), (101, 64), mesh) == P(None, "fsdp")
    # A dimension the mesh axis does not divide stays unsharded instead of failing.
    assert sharding.logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P(
        "fsdp", None, None
    )
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_mesh_axes_of_size_one_are_not_named():
    mesh = sharding.make_mesh(mesh_config(8, 1, 1))
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 256), mesh) == P(None, None)
    assert len(jax.devices()) == 8
