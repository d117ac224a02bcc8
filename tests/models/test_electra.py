"""ELECTRA (kiln.models.electra, losses.replaced_token_detection): the corrupted rows, the
labels, the loss against NumPy, no gradient from the detection loss into the generator, a
body that fine-tuning loads as a BERT's, and the config checks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln import config_lib, losses, models, validation
from kiln.errors import KilnError
from kiln.models import bert, electra
from kiln.models.layers import TransformerConfig

CFG = TransformerConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=64,
    max_len=16,
    type_vocab_size=2,
)
MASK_RATE = 0.25


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    """A masked-LM batch: row 0 packs two documents and 4 pads, row 1 one document; 3 real
    prediction slots in row 0 and 4 in row 1 (row 0's fourth slot is padding at position 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 64, size=(2, 16)).astype(np.int32)
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16], np.int32)
    positions = np.array([list(range(5)) + list(range(7)) + [0] * 4, list(range(16))], np.int32)
    predict = np.array([[2, 6, 11, 0], [0, 3, 9, 15]], np.int32)
    weights = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    targets = np.take_along_axis(tokens, predict, axis=1) * (weights > 0)
    inputs = tokens.copy()
    for b in range(2):
        for slot in range(4):
            if weights[b, slot]:
                inputs[b, predict[b, slot]] = 4  # [MASK]
    return {
        "inputs": inputs,
        "segment_ids": segment_ids,
        "positions": positions,
        "predict_positions": predict,
        "targets": targets.astype(np.int32),
        "weights": weights,
    }


def _np_corrupt(inputs, predict, selected, sampled):
    out = np.array(inputs)
    for b in range(inputs.shape[0]):
        for slot in range(predict.shape[1]):
            if selected[b, slot] > 0:
                out[b, predict[b, slot]] = sampled[b, slot]
    return out


def test_corrupt_replaces_selected_slots_only_and_padding_slots_never_collide():
    batch = _batch()
    sampled = np.array([[7, 8, 9, 10], [11, 12, 13, 14]], np.int32)
    got = electra.corrupt(
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["predict_positions"]),
        jnp.asarray(batch["weights"]),
        jnp.asarray(sampled),
    )
    want = _np_corrupt(batch["inputs"], batch["predict_positions"], batch["weights"], sampled)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Row 1's slot 0 is a real prediction at position 0, where row 0's padding slot points too:
    # the sample lands in row 1, and row 0's position 0 keeps its token.
    assert got[1, 0] == 11 and got[0, 0] == batch["inputs"][0, 0]
    # Dense [B, L] selections (whole-word masking) replace where selected.
    dense = np.zeros((2, 16), np.float32)
    dense[0, 3] = 1
    full = np.full((2, 16), 9, np.int32)
    got = electra.corrupt(jnp.asarray(batch["inputs"]), None, jnp.asarray(dense), jnp.asarray(full))
    want = batch["inputs"].copy()
    want[0, 3] = 9
    np.testing.assert_array_equal(np.asarray(got), want)


def _model_and_params():
    model = electra.Electra(CFG, generator_fraction=0.5)
    batch = _batch()
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    return model, params, batch


def _apply(model, params, batch, key):
    """The model on the masked-LM batch, its targets and weights as `original` and `selected`."""
    args = {k: batch[k] for k in ("inputs", "segment_ids", "positions", "predict_positions")}
    return model.apply(
        {"params": params},
        **args,
        original=batch["targets"],
        selected=batch["weights"],
        sample_key=key,
    )


def test_the_discriminator_reads_the_generators_samples_and_labels_what_they_changed():
    model, params, batch = _model_and_params()
    key = jax.random.PRNGKey(3)
    out = _apply(model, params, batch, key)
    sampled = np.asarray(jax.random.categorical(key, out.generator_logits))
    corrupted = _np_corrupt(batch["inputs"], batch["predict_positions"], batch["weights"], sampled)
    # Labels: 1 where the corrupted row differs from the original tokens (a sample equal to
    # the original token is "original").
    original_rows = _np_corrupt(
        batch["inputs"], batch["predict_positions"], batch["weights"], batch["targets"]
    )
    np.testing.assert_array_equal(np.asarray(out.replaced), corrupted != original_rows)
    # The body is a BERT's, with a BERT's parameter names, fed the corrupted rows.
    body = {
        k: v for k, v in params.items() if k not in ("generator", "rtd_transform", "rtd_output")
    }
    plain = bert.BERT(CFG)
    hidden = plain.apply(
        {"params": body},
        corrupted,
        batch["segment_ids"],
        batch["positions"],
        method=bert.BERT.encode,
    )
    w, b = params["rtd_transform"]["kernel"], params["rtd_transform"]["bias"]
    h = jax.nn.gelu(np.asarray(hidden) @ np.asarray(w) + np.asarray(b), approximate=True)
    w2, b2 = params["rtd_output"]["kernel"], params["rtd_output"]["bias"]
    logits = (np.asarray(h) @ np.asarray(w2) + np.asarray(b2))[..., 0]
    np.testing.assert_allclose(np.asarray(out.detection_logits), logits, rtol=1e-4, atol=1e-5)
    # The generator: half the heads and d_ff of the body, the same head width and depth.
    gen = params["generator"]
    assert gen["token_embed"]["embedding"].shape == (64, 16)
    assert gen["block_0"]["mlp"]["wi"]["kernel"].shape == (16, 32)
    assert "block_1" in gen


def test_body_parameter_tree_equals_a_berts():
    model, params, batch = _model_and_params()
    plain = nn.unbox(bert.BERT(CFG).init(jax.random.PRNGKey(1), batch["inputs"])["params"])
    body = {
        k: v for k, v in params.items() if k not in ("generator", "rtd_transform", "rtd_output")
    }
    shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
    plain_body = {k: v for k, v in plain.items() if k != "mlm_head"}
    assert shapes(body) == shapes(plain_body)


def _np_loss(out, batch):
    logits = np.asarray(out.generator_logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mlm = float((nll * batch["weights"]).sum())
    z = np.asarray(out.detection_logits, np.float64)
    y = np.asarray(out.replaced, np.float64)
    bce = np.logaddexp(0, z) - y * z  # -y log s(z) - (1 - y) log(1 - s(z))
    real = batch["segment_ids"] > 0
    detection = float((bce * real).sum())
    accuracy = float((((z > 0) == (y > 0)) & real).sum() / real.sum())
    return mlm, detection, accuracy


def test_loss_sums_equal_numpy_and_the_detection_loss_never_reaches_the_generator():
    model, params, batch = _model_and_params()
    loss_fn = losses.replaced_token_detection(MASK_RATE, rtd_weight=50.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    sums = loss_fn(model, params, jbatch, None)  # evaluation: sample key 0
    out = _apply(model, params, batch, None)
    mlm, detection, accuracy = _np_loss(out, batch)
    assert float(sums["weight_sum"]) == 7
    np.testing.assert_allclose(float(sums["generator_loss_sum"]), mlm, rtol=1e-5)
    np.testing.assert_allclose(float(sums["detection_loss_sum"]), detection, rtol=1e-5)
    np.testing.assert_allclose(
        float(sums["loss_sum"]), mlm + 50.0 * MASK_RATE * detection, rtol=1e-5
    )
    assert float(sums["detection_loss_count"]) == 28
    np.testing.assert_allclose(float(sums["detection_accuracy_sum"]) / 28, accuracy, rtol=1e-6)

    # Training (a dropout key): the generator's gradient is its masked-LM loss's alone.
    rng = jax.random.PRNGKey(7)

    def total(p):
        return loss_fn(model, p, jbatch, rng)["loss_sum"]

    def generator_only(p):
        return loss_fn(model, p, jbatch, rng)["generator_loss_sum"]

    full, mlm_grads = jax.grad(total)(params), jax.grad(generator_only)(params)
    for a, b in zip(
        jax.tree.leaves(full["generator"]), jax.tree.leaves(mlm_grads["generator"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # ... and the body learns from the detection loss.
    assert float(jnp.abs(full["block_0"]["mlp"]["wi"]["kernel"]).sum()) > 0


def test_generator_config_scales_heads_and_d_ff():
    gen = electra.generator_config(CFG, 0.25)
    assert (gen.d_model, gen.n_heads, gen.n_kv_heads, gen.d_ff) == (8, 1, 1, 16)
    assert gen.n_layers == CFG.n_layers and gen.vocab_size == CFG.vocab_size
    assert electra.generator_config(CFG, 1.0) == dataclasses.replace(CFG, head_dim=8)


def _config(family: str, **objective):
    experiment = {
        "bert": "experiments/bert/pretrain.py:size=micro,objective=electra",
        "gpt": "experiments/gpt/pretrain.py:size=micro",
    }[family]
    config = config_lib.load_config(experiment)
    config.unlock()
    for key, value in objective.items():
        config.objective[key] = value
    return config


def test_config_rules_name_the_key():
    validation.validate(_config("bert"), 1, 1)
    with pytest.raises(KilnError, match="objective.name"):
        validation.validate(_config("gpt", name="electra"), 1, 1)
    with pytest.raises(KilnError, match="objective.generator_fraction"):
        validation.validate(_config("bert", generator_fraction=0.0), 1, 1)
    with pytest.raises(KilnError, match="objective.rtd_weight"):
        validation.validate(_config("bert", rtd_weight=-1.0), 1, 1)
    # Other objectives' configs carry no ELECTRA field (their identity is unchanged).
    mlm = config_lib.load_config("experiments/bert/pretrain.py:size=micro")
    assert "generator_fraction" not in mlm.objective
    assert models.family("bert").objectives == ("mlm", "electra")
    assert "electra" not in models.family("gpt").objectives
