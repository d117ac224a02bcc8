"""Train step: sharded equals single-device, microbatches equal one batch, it learns."""

import jax
import ml_collections
import numpy as np
import pytest

from kiln import build, models, optim, sharding, train
from kiln.data import objectives
from kiln.models import blocks

MODEL = {
    "family": "gpt",
    "vocab_size": 128,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 64,
    "max_len": 16,
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "use_bias": False,
    "tie_embeddings": False,
    "dropout": 0.0,
}
OPTIM = {
    "name": "adamw",
    "lr": 1e-2,
    "schedule": "cosine",
    "warmup_fraction": 0.1,
    "end_lr_fraction": 0.1,
    "weight_decay": 0.1,
    "b1": 0.9,
    "b2": 0.95,
    "eps": 1e-8,
    "momentum": 0.9,
    "nesterov": False,
    "clip_norm": 1.0,
    "grad_accum_steps": 1,
}


def synthetic_batch(seed: int, rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Random tokens packed as two or three documents per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 128, size=(rows, length)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    for r in range(rows):
        for cut in sorted(rng.choice(np.arange(2, length - 2), size=2, replace=False)):
            segment_ids[r, cut:] += 1
            positions[r, cut:] = np.arange(length - cut)
    segment_ids[0, -3:] = 0  # some padding
    return objectives.causal_lm(
        {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    )


BERT = {
    **MODEL,
    "family": "bert",
    "norm_position": "post",
    "type_vocab_size": 2,
    "position": "learned",
    "norm": "layernorm",
    "mlp": "gelu",
    "use_bias": True,
    "n_kv_heads": 4,
    "tie_embeddings": True,
}
T5 = {
    **MODEL,
    "family": "t5",
    "position": "none",
    "mlp": "geglu",
    "scale_attention": False,
    "relative_buckets": 8,
    "relative_max_distance": 16,
    "n_decoder_layers": 1,
}


def encoder_batch(seed: int, rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Packed rows with masked-LM style labels on a random 30% of positions."""
    batch = synthetic_batch(seed, rows, length)
    rng = np.random.default_rng(seed + 100)
    weights = (rng.random((rows, length)) < 0.3) & (batch["segment_ids"] > 0)
    return {**batch, "targets": batch["inputs"], "weights": weights.astype(np.float32)}


def encoder_decoder_batch(seed: int, rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Two packed examples per row on each side, some padding."""
    enc, dec = synthetic_batch(seed, rows, length), synthetic_batch(seed + 1, rows, length // 2)
    return {
        "encoder_inputs": enc["inputs"],
        "encoder_segment_ids": np.minimum(enc["segment_ids"], 2),
        "encoder_positions": enc["positions"],
        "decoder_inputs": dec["inputs"],
        "decoder_segment_ids": np.minimum(dec["segment_ids"], 2),
        "decoder_positions": dec["positions"],
        "targets": dec["targets"],
        "weights": dec["weights"] * (dec["segment_ids"] > 0),
    }


FAMILY_SETUPS = {
    "gpt": (MODEL, synthetic_batch),
    "bert": (BERT, encoder_batch),
    "t5": (T5, encoder_decoder_batch),
}


def run_steps(
    mesh_shape, steps=3, accum=1, dropout=0.0, batches=None, family="gpt", loss_chunks=0, **model
):
    model_fields, make_batch = FAMILY_SETUPS[family]
    config = ml_collections.ConfigDict(
        {
            "model": {**model_fields, "dropout": dropout, **model},
            "optim": {**OPTIM, "grad_accum_steps": accum},
            "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)),
            "data": {"seq_len": 16},
            "train": {"steps": max(steps, 10), "loss_chunks": loss_chunks},
        }
    )
    built = build.build(config, devices=jax.devices()[: int(np.prod(mesh_shape))])
    step_fn, mesh, state = built.train_step, built.mesh, built.fresh_state(0)
    losses = []
    for i in range(steps):
        batch = batches[i] if batches else make_batch(i)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses, state


@pytest.fixture(scope="module")
def single_device():
    """Reference: the same three steps on one device, outside any mesh context."""
    config = ml_collections.ConfigDict({"model": MODEL, "optim": OPTIM})
    model = models.build_model(config.model)
    schedule = optim.make_schedule(config.optim, 10)
    optimizer = optim.make_optimizer(config.optim, 10)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    _, shardings = train.state_shardings(model, optimizer, mesh, 16)
    step_fn, _ = train.jit_steps(model, optimizer, schedule, 1, shardings, mesh)
    state = jax.jit(lambda: train.init_state(model, optimizer, 0, 16), out_shardings=shardings)()
    losses = []
    for i in range(3):
        state, metrics = step_fn(state, synthetic_batch(i))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_step_equals_single_device(single_device, mesh_shape):
    params, losses, state = run_steps(mesh_shape)
    ref_params, ref_losses = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam's early updates are about lr * sign(g) = 1e-2 per element: a reduction-order change
    # in a near-zero gradient moves one by ~1e-5, a sharding bug by ~1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)
    # The parameters really are distributed over the mesh (not silently replicated).
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    for axis, size in zip(sharding.MESH_AXES[1:], mesh_shape[1:]):
        assert (size > 1) == any(axis in s for s in specs), (axis, specs)


def test_microbatches_equal_one_big_batch():
    batch = synthetic_batch(0)
    params_1, losses_1, _ = run_steps((8, 1, 1), steps=1, accum=1, batches=[batch])
    params_4, losses_4, _ = run_steps((2, 1, 1), steps=1, accum=4, batches=[batch])
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_4, params_1)


def test_overfits_one_batch():
    batch = synthetic_batch(0)
    _, losses, _ = run_steps((8, 1, 1), steps=40, batches=[batch] * 40)
    assert losses[-1] < 0.3 * losses[0], losses


def test_dropout_is_deterministic_in_seed_and_step(single_device):
    _, losses_a, _ = run_steps((8, 1, 1), steps=2, dropout=0.2)
    _, losses_b, _ = run_steps((2, 2, 2), steps=2, dropout=0.2)
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)  # masks independent of the mesh
    _, no_dropout = single_device
    assert not np.allclose(losses_a, no_dropout[:2])  # and dropout is really on


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoder_families_sharded_equals_single_device(family):
    params, losses, _ = run_steps((1, 1, 1), family=family)
    for mesh_shape in [(2, 2, 2), (1, 2, 4)]:
        sharded_params, sharded_losses, _ = run_steps(mesh_shape, family=family)
        np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), sharded_params, params
        )


@pytest.fixture(scope="module")
def plain_runs():
    """family -> (params, losses) of three steps on a (2, 2, 2) mesh with dropout, computed
    once for the performance options to be compared with."""
    cache = {}

    def get(family):
        if family not in cache:
            params, losses, _ = run_steps((2, 2, 2), family=family, dropout=0.1)
            cache[family] = params, losses
        return cache[family]

    return get


def _assert_same_run(got, want):
    (params, losses), (want_params, want_losses) = got, want
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert jax.tree.structure(params) == jax.tree.structure(want_params)
    for leaf, want_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(leaf, want_leaf, atol=2e-5)


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_fused_loss_chunks_train_like_plain_logits(plain_runs, family):
    """train.loss_chunks (the loss fused with the output projection, 3 chunks of a length that
    does not divide, on a data x fsdp x tensor mesh, with dropout) follows the plain path."""
    params, losses, _ = run_steps((2, 2, 2), family=family, dropout=0.1, loss_chunks=3)
    _assert_same_run((params, losses), plain_runs(family))


@pytest.mark.parametrize(
    "family, remat", [("gpt", "dots"), ("gpt", "full"), ("bert", "full"), ("t5", "dots")]
)
def test_remat_trains_like_no_remat(plain_runs, family, remat):
    """Rematerialized blocks (with dropout, whose masks must be drawn again identically) give
    the same losses and parameters as keeping every activation."""
    params, losses, _ = run_steps((2, 2, 2), family=family, dropout=0.1, remat=remat)
    _assert_same_run((params, losses), plain_runs(family))


@pytest.mark.parametrize("family, remat", [("gpt", "dots"), ("bert", "none"), ("t5", "full")])
def test_scanned_layers_train_like_unrolled(plain_runs, family, remat):
    """model.scan_layers (one lax.scan over the blocks, with dropout and a remat policy; the
    train state holds each stack's parameters stacked) gives the same losses, and once
    unstacked the same parameter tree and values, as the unrolled blocks."""
    params, losses, state = run_steps(
        (2, 2, 2), family=family, dropout=0.1, remat=remat, scan_layers=True
    )
    stack = params["encoder"] if family == "t5" else params
    assert blocks.STACKED in stack and "block_0" not in stack
    # The optimizer's moments are stacked alike; the layer axis is never sharded.
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert any(f"'{blocks.STACKED}'" in p and "opt_state" in p for p in opt_paths)
    for leaf in jax.tree.leaves(state.params):
        if leaf.ndim and leaf.shape[0] == 2 and leaf.sharding.spec:
            assert leaf.sharding.spec[0] is None
    _assert_same_run((blocks.unstack_blocks(params), losses), plain_runs(family))


def sparse_encoder_batch(seed: int) -> dict[str, np.ndarray]:
    """`encoder_batch` with its labels given at the weighted positions only (padded with
    position 0 and weight 0), as the masked-LM objective gives them."""
    batch = encoder_batch(seed)
    rows = len(batch["inputs"])
    width = int(batch["weights"].sum(1).max()) + 2
    positions, targets, weights = (np.zeros((rows, width), dtype) for dtype in ("i4", "i4", "f4"))
    for r in range(rows):
        chosen = np.flatnonzero(batch["weights"][r])
        positions[r, : len(chosen)] = chosen
        targets[r, : len(chosen)] = batch["targets"][r, chosen]
        weights[r, : len(chosen)] = 1.0
    return {**batch, "predict_positions": positions, "targets": targets, "weights": weights}


@pytest.mark.parametrize("loss_chunks", [0, 3])
def test_predicting_at_masked_positions_trains_like_every_position(plain_runs, loss_chunks):
    """BERT's head at the masked positions only (plain or fused loss) gives the losses and
    parameters of scoring every position with weights."""
    batches = [sparse_encoder_batch(i) for i in range(3)]
    params, losses, _ = run_steps(
        (2, 2, 2), family="bert", dropout=0.1, batches=batches, loss_chunks=loss_chunks
    )
    _assert_same_run((params, losses), plain_runs("bert"))
