"""LoRA (kiln.peft, layers.Dense): the first step against full fine-tuning of the targets, the
frozen base, merging, and bad settings."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from kiln import build, defaults, losses, optim, peft, validation
from kiln.errors import KilnError
from kiln.models import adapters

D, SEQ, BATCH, CLASSES = 16, 8, 8, 3
QUERY = r"block_\d/attn/query/kernel"


def _config(family: str = "bert", **finetune):
    c = defaults.run_sections(seq_len=SEQ, batch=BATCH, steps=4, lr=1e-2, objective="")
    c.model = defaults.model_section(
        family, vocab_size=64, d_model=D, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_len=16
    )
    c.objective.name = "mlm" if family == "bert" else "causal_lm"
    c.task.name = "wn_lexname"
    c.optim.weight_decay = 0.0
    c.optim.warmup_fraction = 0.0
    for key, value in finetune.items():
        section, field = key.split("__")
        c.finetune[section][field] = value
    return c


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    segment_ids = (np.arange(SEQ)[None] < rng.integers(3, SEQ + 1, (BATCH, 1))).astype(np.int32)
    return {
        "inputs": jnp.asarray(rng.integers(1, 64, (BATCH, SEQ)) * segment_ids, jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "targets": jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32),
        "weights": jnp.ones(BATCH, jnp.float32),
    }


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _head_or(pattern: str):
    return lambda path: (
        bool(re.fullmatch(pattern, path)) or path.startswith(("pooler/", "classifier/"))
    )


def test_full_rank_identity_adapters_step_like_full_finetuning_of_the_targets():
    config = _config(lora__rank=D, lora__alpha=float(D), lora__targets=QUERY)
    built = build.build(config, CLASSES)
    state = built.fresh_state(0)
    flat = traverse_util.flatten_dict(state.params, sep="/")
    # lora_a = identity (reshaped to [D, r]) and lora_b = 0: the adapted kernel is
    # W + A.B and d/dB = d/dW, so one step moves A.B exactly as full fine-tuning moves W.
    a_path = "block_0/attn/query/lora_a"
    flat[a_path] = jax.device_put(jnp.eye(D).reshape(flat[a_path].shape), flat[a_path].sharding)
    state = state.replace(params=traverse_util.unflatten_dict(flat, sep="/"))
    before = _flat(state.params)
    batch = _batch()
    new_state, _ = built.train_step(state, batch)
    after = _flat(new_state.params)

    # Reference: the plain model (no adapters), AdamW on the target kernel and the head only.
    plain = {k: v for k, v in before.items() if not k.endswith(adapters.LORA_PARAMS)}
    trains = _head_or(QUERY)
    sub = {k: v for k, v in plain.items() if trains(k)}
    ref_built = build.build(_config(), CLASSES)

    def loss(sub_params):
        params = traverse_util.unflatten_dict({**plain, **sub_params}, sep="/")
        sums = losses.classifier(ref_built.model, params, batch, None)
        return sums["loss_sum"] / sums["weight_sum"]

    tx = optim.make_optimizer(config.optim, config.train.steps)
    updates, _ = tx.update(jax.grad(loss)(sub), tx.init(sub), sub)
    expected = optax.apply_updates(sub, updates)
    a, b = after[a_path], after["block_0/attn/query/lora_b"]
    adapted = before["block_0/attn/query/kernel"] + (a.reshape(D, D) @ b.reshape(D, D)).reshape(
        a.shape[:1] + b.shape[1:]
    )
    np.testing.assert_allclose(adapted, expected["block_0/attn/query/kernel"], atol=1e-6)
    for path in sub:
        if path.startswith(("pooler/", "classifier/")):
            np.testing.assert_allclose(after[path], expected[path], atol=1e-6, err_msg=path)
    for path, value in plain.items():  # The base, targets included, never moves.
        if not path.startswith(("pooler/", "classifier/")):
            np.testing.assert_array_equal(after[path], value, err_msg=path)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_training_keeps_the_base_and_merged_logits_match(family):
    config = _config(family, lora__rank=4, lora__dropout=0.1)
    built = build.build(config, CLASSES)
    state = built.fresh_state(0)
    before = _flat(state.params)
    # Only adapters and the head are in the optimizer state.
    mu = _flat(state.opt_state[1][0].mu)
    assert mu and all(peft.is_trainable(p) for p in mu)
    for step in range(3):
        state, metrics = built.train_step(state, _batch(step))
        assert np.isfinite(float(metrics["loss"]))
    after = _flat(state.params)
    for path, value in before.items():
        if not peft.is_trainable(path):
            np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert any(np.abs(v).max() > 0 for k, v in after.items() if k.endswith("lora_b"))

    merged = adapters.merge_lora(traverse_util.unflatten_dict(after, sep="/"), 4, 16.0)
    assert not any(k.endswith(adapters.LORA_PARAMS) for k in _flat(merged))
    plain = build.build(_config(family), CLASSES).model
    batch = {k: v for k, v in _batch(7).items() if k not in ("targets", "weights")}
    ours = built.model.apply({"params": state.params}, **batch)
    theirs = plain.apply({"params": merged}, **batch)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


@pytest.mark.parametrize(
    "finetune, key",
    [
        ({"lora__rank": -1}, "finetune.lora.rank"),
        ({"lora__rank": 4, "lora__alpha": 0.0}, "finetune.lora.alpha"),
        ({"lora__rank": 4, "lora__dropout": 1.0}, "finetune.lora.dropout"),
        ({"lora__rank": 4, "lora__targets": "(unclosed"}, "finetune.lora.targets"),
        ({"prompt_tuning__length": 12}, "finetune.prompt_tuning.length"),
        ({"prompt_tuning__length": 2, "prompt_tuning__init": "zeros"}, "init"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(finetune, key):
    with pytest.raises(KilnError, match=key):
        validation.validate(_config(**finetune), 8)


def test_targets_matching_nothing_and_too_large_ranks_fail_at_build():
    with pytest.raises(KilnError, match="finetune.lora.targets") as e:
        build.build(_config(lora__rank=2, lora__targets="nothing/kernel"), CLASSES)
    assert "block_0/attn/query/kernel" in str(e.value)  # Lists some real paths.
    with pytest.raises(KilnError, match="finetune.lora.rank") as e:
        build.build(_config(lora__rank=D + 1, lora__targets=QUERY), CLASSES)
    assert "block_0/attn/query/kernel" in str(e.value)
    config = _config(lora__rank=2)
    config.init_from.workdir, config.init_from.load = "somewhere", "state"
    with pytest.raises(KilnError, match="init_from.load"):
        validation.validate(config, 8)
