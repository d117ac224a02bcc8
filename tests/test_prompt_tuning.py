"""Prompt tuning (models.adapters.SoftPrompt, kiln.peft): the prompt against the same vectors as
tokens, pooling and padding, training only the prompt and head, and refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kiln import build, defaults, models, peft
from kiln.errors import KilnError
from kiln.models import adapters

SEQ, BATCH = 8, 8


def _model_section(family: str, **fields):
    sizes = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32)
    return defaults.model_section(family, max_len=16, **{**sizes, **fields})


def _params(model, seed: int = 0):
    inputs = models.example_inputs(model, SEQ)
    return nn.unbox(model.init(jax.random.PRNGKey(seed), **inputs)["params"])


def test_a_one_vector_prompt_equals_that_vector_as_a_first_token():
    # GPT without position embeddings: a prompt of one vector (which sees itself only, as a
    # causal first token does) gives the logits of the plain model reading [token; input].
    section = _model_section("gpt", position="none")
    plain = models.build_model(section)
    prompted = models.build_model(section, peft={"prompt_length": 1})
    params = jax.tree.map(np.asarray, _params(plain))
    token = 5
    with_prompt = {
        **params,
        adapters.PROMPT: {"embedding": params["token_embed"]["embedding"][[token]]},
    }
    x = np.random.default_rng(0).integers(1, 64, (2, SEQ)).astype(np.int32)
    ours = prompted.apply({"params": with_prompt}, x)
    theirs = plain.apply(
        {"params": params}, np.concatenate([np.full((2, 1), token, np.int32), x], 1)
    )
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs)[:, 1:], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_pooling_reads_the_input_whatever_the_padding(family):
    model = models.build_model(_model_section(family), 3, peft={"prompt_length": 3})
    params = _params(model)
    x = np.random.default_rng(1).integers(1, 64, (1, 5)).astype(np.int32)
    outs = []
    for length in (5, 8, 12):
        padded = np.zeros((1, length), np.int32)
        padded[:, :5] = x
        segment_ids = (padded != 0).astype(np.int32)
        outs.append(np.asarray(model.apply({"params": params}, padded, segment_ids)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    new_prompt = np.random.default_rng(2).normal(0, 3, params[adapters.PROMPT]["embedding"].shape)
    moved = {**params, adapters.PROMPT: {"embedding": jnp.asarray(new_prompt, jnp.float32)}}
    changed = np.asarray(model.apply({"params": moved}, x))
    assert np.abs(changed - outs[0]).max() > 1e-3 * np.abs(outs[0]).max()  # The prompt is read.


def _config(family: str = "bert", length: int = 4):
    c = defaults.run_sections(seq_len=SEQ, batch=BATCH, steps=4, lr=1e-2, objective="")
    c.model = _model_section(family)
    c.task.name = "wn_lexname"
    c.finetune.prompt_tuning.length = length
    return c


def test_training_moves_only_the_prompt_and_head():
    built = build.build(_config(), 3)
    state = built.fresh_state(0)
    state = state.replace(params=peft.init_prompt(built.finetune, state.params, 0))
    table = np.asarray(state.params["token_embed"]["embedding"])
    prompt = np.asarray(state.params[adapters.PROMPT]["embedding"])
    assert all((table == row).all(axis=1).any() for row in prompt)  # init "vocab": token rows
    before = {
        k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.params, sep="/").items()
    }
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(1, 64, (BATCH, SEQ)), jnp.int32),
        "segment_ids": jnp.ones((BATCH, SEQ), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32),
        "weights": jnp.ones(BATCH, jnp.float32),
    }
    for _ in range(2):
        state, _ = built.train_step(state, batch)
    after = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.params, sep="/").items()}
    for path, value in before.items():
        if peft.is_trainable(path):
            assert np.abs(after[path] - value).max() > 0, path
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_t5_reads_the_prompt_in_its_encoder():
    model = models.build_model(_model_section("t5", position="none"), peft={"prompt_length": 2})
    params = _params(model)
    x = np.ones((2, SEQ), np.int32)
    y = np.ones((2, 4), np.int32)
    logits = model.apply({"params": params}, x, y)
    moved = {**params, adapters.PROMPT: {"embedding": params[adapters.PROMPT]["embedding"] * 3}}
    assert logits.shape == (2, 4, 64)
    assert np.abs(np.asarray(model.apply({"params": moved}, x, y) - logits)).max() > 1e-5


def test_a_decoder_without_a_head_is_refused():
    with pytest.raises(KilnError, match="finetune.prompt_tuning.length"):
        build.build(_config("gpt"), 0)
