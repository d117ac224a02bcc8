"""Tests for kiln.decoding: cached greedy decoding equals recomputation, for GPT and T5."""

import dataclasses
import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from kiln import decoding, models, sharding
from kiln.errors import KilnError
from kiln.models.gpt import GPT
from kiln.models.layers import TransformerConfig
from kiln.models.t5 import T5

GPT2 = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=16
)
MODERN = dataclasses.replace(
    GPT2,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    n_kv_heads=2,
    tie_embeddings=False,
)
T5_V11 = TransformerConfig(
    vocab_size=64,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    max_len=16,
    position="none",
    norm="rmsnorm",
    mlp="geglu",
    use_bias=False,
    tie_embeddings=False,
    scale_attention=False,
    n_decoder_layers=2,
    relative_buckets=8,  # Small tables, so a few steps reach the log-spaced buckets.
    relative_max_distance=16,
)
GPTS = pytest.mark.parametrize("model", [GPT(GPT2), GPT(MODERN)], ids=["gpt2", "modern"])
ALL = pytest.mark.parametrize(
    "model", [GPT(GPT2), GPT(MODERN), T5(T5_V11)], ids=["gpt2", "modern", "t5"]
)

BOS, NO_EOS = 1, 64  # No id is 64 (the vocab size), so rows run to their budget.
MAX_NEW = 8
_rng = np.random.default_rng(0)
# Lengths within one bucket of 16 (one compiled shape per batch size).
# GPT: bos + tokens; 12 + MAX_NEW > max_len = 16, so that prompt gets only 4 tokens.
GPT_PROMPTS = tuple((BOS, *_rng.integers(2, 64, n - 1).tolist()) for n in (5, 1, 12, 7))
# T5: encoder inputs ending in an (arbitrary) eos id 2.
T5_PROMPTS = tuple((*_rng.integers(3, 64, n - 1).tolist(), 2) for n in (3, 12, 6))


def _prompts(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    return T5_PROMPTS if isinstance(model, T5) else GPT_PROMPTS


@functools.cache
def _params(model: nn.Module):
    """Random normal params of std 0.1 (not the init's 0.02), so greedy ids vary.

    The modern GPT's are sharded as training shards them, over a (2, 2, 2) mesh of the 8 CPU
    devices, so every test of it also runs with sharded params.
    """
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    if model == GPT(MODERN):
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
        shardings = sharding.tree_shardings(boxed, mesh)
    else:
        shardings = jax.tree.map(lambda _: jax.devices()[0], nn.unbox(boxed))
    rng = np.random.default_rng(2)  # Not jax.random: XLA:CPU compiles it slowly, per shape.
    return jax.tree.map(
        lambda x, where: jax.device_put((0.1 * rng.normal(size=x.shape)).astype(x.dtype), where),
        nn.unbox(boxed),
        shardings,
    )


@functools.cache
def _apply(model: nn.Module, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))


def _greedy(model: nn.Module, prompts, eos_id: int = NO_EOS, batch_size: int = 2):
    return decoding.greedy_generate(
        model,
        _params(model),
        prompts,
        max_new_tokens=MAX_NEW,
        eos_id=eos_id,
        bos_id=BOS,
        batch_size=batch_size,
    )


@functools.cache
def _reference(model: nn.Module, prompt: tuple[int, ...]) -> list[int]:
    """Greedy ids by full recomputation, no cache, no eos: one prompt at a time.

    Inputs are right-padded to a fixed length, so the reference compiles once: T5 masks the
    encoder padding by segment ids, and causality hides the decoder's (and GPT's) later slots.
    """
    variables, apply = {"params": _params(model)}, _apply(model)
    out = []
    if isinstance(model, T5):
        encoder_inputs, encoder_segment_ids = np.zeros((2, 1, 16), np.int32)
        encoder_inputs[0, : len(prompt)], encoder_segment_ids[0, : len(prompt)] = prompt, 1
        decoder_inputs = np.zeros((1, MAX_NEW), np.int32)
        decoder_inputs[0, 0] = BOS
        for t in range(MAX_NEW):
            logits = apply(variables, encoder_inputs, decoder_inputs, encoder_segment_ids)
            out.append(int(np.argmax(logits[0, t])))
            decoder_inputs[0, (t + 1) % MAX_NEW] = out[-1]
        return out
    max_len = model.config.max_len
    while len(out) < MAX_NEW and len(prompt) + len(out) < max_len:
        seq = [*prompt, *out]
        tokens = np.zeros((1, max_len), np.int32)
        tokens[0, : len(seq)] = seq
        out.append(int(np.argmax(apply(variables, tokens)[0, len(seq) - 1])))
    return out


@ALL
def test_greedy_matches_recomputation(model):
    prompts = _prompts(model)
    want = [_reference(model, p) for p in prompts]
    assert len({t for row in want for t in row}) >= 5  # The argmax is not constant.
    # Batches of 2 rows (T5: the last one with a filler row); mixed prompt lengths.
    assert _greedy(model, prompts) == want
    if isinstance(model, GPT):  # Only what fits the position table: 12 + 4 = max_len.
        assert [len(row) for row in want] == [MAX_NEW, MAX_NEW, 4, MAX_NEW]


@ALL
def test_eos_stops_a_row(model):
    prompts = _prompts(model)
    ref = _reference(model, prompts[0])
    # The first step >= 2 whose id is new: generation of prompt 0 must stop right there.
    step = next(t for t in range(2, MAX_NEW) if ref[t] not in ref[:t])
    eos_id = ref[step]
    out = _greedy(model, prompts, eos_id=eos_id)
    assert out[0] == ref[:step]
    for row, prompt in zip(out, prompts, strict=True):  # Other rows stop at their own eos.
        full = _reference(model, prompt)
        assert row == (full[: full.index(eos_id)] if eos_id in full else full)


@ALL
def test_output_does_not_depend_on_batch_mates(model):
    prompts = _prompts(model)
    short = prompts[0]
    alone = _greedy(model, [short])[0]  # With a filler row.
    assert alone == _reference(model, short)
    assert _greedy(model, [prompts[2], short])[1] == alone
    assert _greedy(model, [short, prompts[1]])[0] == alone
    assert _greedy(model, prompts[::-1]) == _greedy(model, prompts)[::-1]


def _chunks(tokens_BL: np.ndarray, sizes: tuple[int, ...]):
    """(start, tokens[:, start:start + size]) for consecutive chunk sizes."""
    start = 0
    for size in sizes:
        yield start, tokens_BL[:, start : start + size]
        start += size


@GPTS
def test_gpt_cached_logits_match_full_forward(model):
    params, rng = _params(model), np.random.default_rng(1)
    prompts = [GPT_PROMPTS[0], GPT_PROMPTS[2]]  # 5 and 12 tokens: row 0 is left-padded.
    continuation_BC = rng.integers(2, 64, (2, 4))
    full_BTV = np.zeros((2, 16, 64), np.float32)  # Each sequence alone (right padding).
    for i, prompt in enumerate(prompts):
        tokens = np.zeros((1, 16), np.int32)
        tokens[0, : len(prompt) + 4] = [*prompt, *continuation_BC[i]]
        full_BTV[i] = _apply(model)({"params": params}, tokens)[0]

    lengths = np.array([len(p) for p in prompts])
    pads = 12 - lengths
    tokens_BL, segment_ids_BL, positions_BL = np.zeros((3, 2, 12), np.int32)
    for i, prompt in enumerate(prompts):
        tokens_BL[i, pads[i] :] = prompt
        segment_ids_BL[i, pads[i] :] = 1
        positions_BL[i, pads[i] :] = np.arange(lengths[i])
    step = _apply(model, decode=True, mutable=("cache",))
    cache = decoding.init_cache(model, params, 2, 16)
    logits_BLV, variables = step(
        {"params": params, "cache": cache}, tokens_BL, segment_ids_BL, positions_BL
    )
    for i in range(2):
        np.testing.assert_allclose(
            logits_BLV[i, pads[i] :], full_BTV[i, : lengths[i]], atol=1e-4, rtol=1e-4
        )
    for start, tokens_BC in _chunks(continuation_BC, (1, 1, 1, 1)):
        positions_BC = lengths[:, None] + start + np.arange(tokens_BC.shape[1])
        logits_BCV, variables = step(
            {"params": params, **variables}, tokens_BC, np.ones_like(tokens_BC), positions_BC
        )
        want_BCV = np.take_along_axis(full_BTV, positions_BC[..., None], axis=1)
        np.testing.assert_allclose(logits_BCV, want_BCV, atol=1e-4, rtol=1e-4)
    assert variables["cache"]["cache_slots"]["index"] == 12 + 4


def test_t5_cached_logits_match_full_forward():
    model = T5(T5_V11)
    params, rng = _params(model), np.random.default_rng(1)
    encoder_inputs_BS, encoder_segment_ids_BS = np.zeros((2, 2, 16), np.int32)
    for i, prompt in enumerate(T5_PROMPTS[:2]):  # 3 and 12 tokens, padded.
        encoder_inputs_BS[i, : len(prompt)] = prompt
        encoder_segment_ids_BS[i, : len(prompt)] = 1
    decoder_inputs_BT = np.concatenate([np.full((2, 1), BOS), rng.integers(2, 64, (2, 7))], 1)
    decoder_inputs_BT = decoder_inputs_BT.astype(np.int32)  # As `_reference` compiled it.
    variables = {"params": params}
    full_BTV = np.concatenate(  # Row by row, the shapes `_reference` compiled.
        [
            _apply(model)(
                variables,
                encoder_inputs_BS[i : i + 1],
                decoder_inputs_BT[i : i + 1],
                encoder_segment_ids_BS[i : i + 1],
            )
            for i in range(2)
        ]
    )
    encoded_BSD = _apply(model, method=T5.encode)(
        variables, encoder_inputs_BS, encoder_segment_ids_BS
    )
    step = _apply(model, method=T5.decode, decode=True, mutable=("cache",))
    # Committed like the caches `step` returns, so its first call does not compile again.
    variables["cache"] = jax.device_put(decoding.init_cache(model, params, 2, 16), jax.devices()[0])
    # Segment ids and positions left out: one unpadded target per row, positions = slots.
    for start, tokens_BC in _chunks(decoder_inputs_BT, (1, 1, 2, 1, 2, 1)):
        logits_BCV, new = step(variables, encoded_BSD, encoder_segment_ids_BS, tokens_BC)
        variables = {"params": params, **new}
        want_BCV = full_BTV[:, start : start + tokens_BC.shape[1]]
        np.testing.assert_allclose(logits_BCV, want_BCV, atol=1e-4, rtol=1e-4)
    assert variables["cache"]["decoder"]["cache_slots"]["index"] == 8


def test_params_as_training_holds_them():
    """Sharded (see `_params`), boxed or not, with or without the {"params": ...} level."""
    model = GPT(MODERN)
    params = _params(model)
    assert not params["token_embed"]["embedding"].sharding.is_fully_replicated
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **models.example_inputs(model, 8))["params"]
    )
    boxed = jax.tree.map(
        lambda box, x: box.replace_boxed(x),
        boxed,
        params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    prompts = GPT_PROMPTS[:2]
    want = [_reference(model, p) for p in prompts]
    for wrapped in ({"params": params}, boxed, {"params": boxed}):
        out = decoding.greedy_generate(
            model, wrapped, prompts, max_new_tokens=MAX_NEW, eos_id=NO_EOS, bos_id=BOS, batch_size=2
        )
        assert out == want


def test_gpt_prompt_lengths_at_the_limit():
    model = GPT(GPT2)
    full, one_short = tuple(range(1, 17)), tuple(range(1, 16))  # max_len and max_len - 1.
    out = _greedy(model, [full, one_short])
    assert out == [[], _reference(model, one_short)] and len(out[1]) == 1
    assert _greedy(model, []) == []
    assert decoding.greedy_generate(
        model, _params(model), [full], max_new_tokens=0, eos_id=0, bos_id=BOS
    ) == [[]]
    with pytest.raises(KilnError, match="max_len=16"):
        _greedy(model, [one_short, (*full, 1)])
