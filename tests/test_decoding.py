"""Tests for kiln.decoding: cached greedy decoding equals recomputation, for GPT and T5."""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from kiln import decoding, models, search, sharding
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

    The modern GPT's and T5's are sharded as training shards them, over a (2, 2, 2) mesh of the
    8 CPU devices, so every test of them also runs with sharded params.
    """
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    if model in (GPT(MODERN), T5(T5_V11)):
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


def _generate(
    model: nn.Module, prompts, eos_id: int = NO_EOS, batch_size: int = 2, mesh=None, **options
):
    options = decoding.decode_options(**{"max_new_tokens": MAX_NEW, **options})
    return decoding.generate(
        model,
        _params(model),
        prompts,
        options,
        eos_id=eos_id,
        bos_id=BOS,
        batch_size=batch_size,
        mesh=mesh,
    )


_greedy = _generate


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
    # A stop id besides eos ends rows the same way, as does any of several.
    assert _greedy(model, prompts, stop_ids=(eos_id,)) == out
    assert _greedy(model, prompts, stop_ids=(NO_EOS + 1, eos_id)) == out


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
            logits_BLV[i, pads[i] :], full_BTV[i, : lengths[i]], atol=1e-5, rtol=1e-5
        )
    for start, tokens_BC in _chunks(continuation_BC, (1, 1, 1, 1)):
        positions_BC = lengths[:, None] + start + np.arange(tokens_BC.shape[1])
        logits_BCV, variables = step(
            {"params": params, **variables}, tokens_BC, np.ones_like(tokens_BC), positions_BC
        )
        want_BCV = np.take_along_axis(full_BTV, positions_BC[..., None], axis=1)
        np.testing.assert_allclose(logits_BCV, want_BCV, atol=1e-5, rtol=1e-5)
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
    variables["cache"] = decoding.init_cache(
        model, params, 2, 16, encoded_BSD, encoder_segment_ids_BS
    )
    # Segment ids and positions left out: one unpadded target per row, positions = slots.
    for start, tokens_BC in _chunks(decoder_inputs_BT, (1, 1, 2, 1, 2, 1)):
        logits_BCV, new = step(variables, encoded_BSD, encoder_segment_ids_BS, tokens_BC)
        variables = {"params": params, **new}
        want_BCV = full_BTV[:, start : start + tokens_BC.shape[1]]
        np.testing.assert_allclose(logits_BCV, want_BCV, atol=1e-5, rtol=1e-5)
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
        options = decoding.DecodeOptions(max_new_tokens=MAX_NEW)
        out = decoding.generate(model, wrapped, prompts, options, eos_id=NO_EOS, bos_id=BOS)
        assert out == want


def test_gpt_prompt_lengths_at_the_limit():
    model = GPT(GPT2)
    full, one_short = tuple(range(1, 17)), tuple(range(1, 16))  # max_len and max_len - 1.
    out = _greedy(model, [full, one_short])
    assert out == [[], _reference(model, one_short)] and len(out[1]) == 1
    assert _greedy(model, []) == []
    assert _generate(model, [full], max_new_tokens=0) == [[]]
    with pytest.raises(KilnError, match="max_len=16"):
        _greedy(model, [one_short, (*full, 1)])


# --- Beam search -------------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _next_logp(model: nn.Module, prompt: tuple[int, ...], prefixes: list[list[int]]) -> np.ndarray:
    """log p(next id | prompt, prefix) [len(prefixes), V] by full recomputation, no cache."""
    variables, apply = {"params": _params(model)}, _apply(model)
    rows = []
    for prefix in prefixes:
        if isinstance(model, T5):
            encoder_inputs, encoder_segment_ids = np.zeros((2, 1, 16), np.int32)
            encoder_inputs[0, : len(prompt)], encoder_segment_ids[0, : len(prompt)] = prompt, 1
            decoder_inputs = np.zeros((1, MAX_NEW), np.int32)
            decoder_inputs[0, : len(prefix) + 1] = [BOS, *prefix]
            logits = apply(variables, encoder_inputs, decoder_inputs, encoder_segment_ids)
            rows.append(np.asarray(logits[0, len(prefix)]))
        else:
            seq = [*prompt, *prefix]
            tokens = np.zeros((1, model.config.max_len), np.int32)
            tokens[0, : len(seq)] = seq
            rows.append(np.asarray(apply(variables, tokens)[0, len(seq) - 1]))
    return _log_softmax(np.stack(rows))


def _penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def _reference_beam(model, prompt, beams: int, alpha: float, eos_id: int) -> list[int]:
    """Beam search by full recomputation, run to the limit: of all candidates ranked by
    log-probability, those among the first `beams` that end (eos, or the length limit) are
    collected; the `beams` best that do not end stay live. Returns the best collected by score."""
    limit = MAX_NEW
    if isinstance(model, GPT):
        limit = min(MAX_NEW, model.config.max_len - len(prompt))
    alive, finished = [([], 0.0)], []
    for step in range(limit):
        logp = _next_logp(model, prompt, [prefix for prefix, _ in alive])
        candidates = [
            (prefix + [token], score + logp[i, token])
            for i, (prefix, score) in enumerate(alive)
            for token in range(logp.shape[1])
        ]
        candidates.sort(key=lambda c: -c[1])
        alive = []
        for rank, (prefix, score) in enumerate(candidates):
            ends = prefix[-1] == eos_id or step + 1 == limit
            if ends and rank < beams:  # Only the `beams` best candidates may end.
                length = len(prefix) - (prefix[-1] == eos_id)
                finished.append((prefix[:length], score / _penalty(length, alpha)))
            elif not ends and len(alive) < beams:
                alive.append((prefix, score))
    return max(finished, key=lambda f: f[1])[0]


@ALL
def test_beam_with_one_beam_is_greedy(model):
    prompts = _prompts(model)
    ref = _reference(model, prompts[0])
    step = next(t for t in range(2, MAX_NEW) if ref[t] not in ref[:t])
    eos_id = ref[step]  # Prompt 0 stops at this step; the other rows wherever they meet it.
    for eos in (NO_EOS, eos_id):
        greedy = _generate(model, prompts, eos_id=eos)
        beam = _generate(model, prompts, eos_id=eos, strategy="beam", num_beams=1, length_penalty=0)
        assert beam == greedy
    assert len(greedy[0]) == step


@ALL
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_matches_reference_beam_search(model, alpha):
    """Three beams; the cache rows follow their parents (a wrong reorder changes the result)."""
    prompts = _prompts(model)[:3]
    greedy = [_reference(model, p) for p in prompts]
    eos_id = greedy[0][4]
    want = [_reference_beam(model, p, 3, alpha, eos_id) for p in prompts]
    got = _generate(
        model, prompts, eos_id=eos_id, strategy="beam", num_beams=3, length_penalty=alpha
    )
    assert got == want
    assert got != [g[: g.index(eos_id)] if eos_id in g else g for g in greedy]


BIGRAM = TransformerConfig(
    vocab_size=8,
    d_model=8,
    n_layers=1,
    n_heads=2,
    n_kv_heads=1,
    d_ff=8,
    max_len=16,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=False,
)
EOS = 2
# Next-token probabilities of a bigram model over ids 0..7 (row = current id; BOS = 1, EOS = 2).
# From bos, 3 is the most likely id (greedy takes it) but its continuations are weak; 4 is
# followed by eos, and 5 -> 6 -> eos is a likely longer path, which a length penalty prefers.
BIGRAM_PROBS = np.full((8, 8), 0.01)
BIGRAM_PROBS[1, [3, 4, 5]] = [0.35, 0.3, 0.25]
BIGRAM_PROBS[3, 2:8] = [0.2, 0.16, 0.16, 0.16, 0.16, 0.16]
BIGRAM_PROBS[4, 2] = 0.9
BIGRAM_PROBS[5, 6] = 0.95
BIGRAM_PROBS[6, 2] = 0.95
BIGRAM_PROBS[7, 2] = 0.9
BIGRAM_PROBS /= BIGRAM_PROBS.sum(1, keepdims=True)


@functools.cache
def _bigram_params():
    """A GPT whose next-token logits depend only on the current id: one-hot embeddings, blocks
    that add nothing (zero attention output and MLP), and an lm head that reads log BIGRAM_PROBS
    off the normed one-hot (rmsnorm(e_t) = sqrt(d) e_t)."""
    model = GPT(BIGRAM)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **models.example_inputs(model, 8))
    )
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes["params"]))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones_like(x) if "scale" in jax.tree_util.keystr(path) else x, params
    )
    params["token_embed"]["embedding"] = np.eye(8, dtype=np.float32)
    params["lm_head"]["kernel"] = (np.log(BIGRAM_PROBS) / np.sqrt(8)).astype(np.float32)
    return model, params


def _best_by_enumeration(logp_VV: np.ndarray, limit: int, alpha: float) -> list[int]:
    """The best-scoring finished sequence after bos among all of them, by brute force."""
    best, best_score = None, -np.inf
    for length in range(limit + 1):
        for seq in itertools.product([t for t in range(8) if t != EOS], repeat=length):
            ids = [1, *seq]
            logp = sum(logp_VV[a, b] for a, b in itertools.pairwise(ids))
            if length < limit:  # Ends with eos (not counted in the length).
                score = (logp + logp_VV[ids[-1], EOS]) / _penalty(length, alpha)
            else:  # Reaches the limit.
                score = logp / _penalty(length, alpha)
            if score > best_score:
                best, best_score = list(seq), score
    return best


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_beam_finds_the_best_sequence_of_a_hand_built_model(alpha):
    model, params = _bigram_params()
    logits = _apply(model)({"params": params}, np.arange(8, dtype=np.int32)[None])[0]
    logp_VV = _log_softmax(np.asarray(logits))
    np.testing.assert_allclose(np.exp(logp_VV), BIGRAM_PROBS, rtol=1e-3)  # As built.
    best = _best_by_enumeration(logp_VV, limit=4, alpha=alpha)
    assert best == ([4] if alpha == 0 else [5, 6])  # The length penalty changes the winner.

    def run(**options):
        options = decoding.decode_options(max_new_tokens=4, length_penalty=alpha, **options)
        return decoding.generate(model, params, [[1]], options, eos_id=EOS, bos_id=1)[0]

    assert run(strategy="greedy") == [3]
    assert run(strategy="beam", num_beams=3) == best


# --- Sampling ----------------------------------------------------------------------------------


TWO_FAMILIES = pytest.mark.parametrize("model", [GPT(GPT2), T5(T5_V11)], ids=["gpt2", "t5"])


@TWO_FAMILIES
def test_sampling_limits_are_greedy(model):
    prompts = _prompts(model)
    greedy = _generate(model, prompts)
    assert _generate(model, prompts, strategy="sample", temperature=0.0) == greedy
    assert _generate(model, prompts, strategy="sample", temperature=1e-4, seed=3) == greedy
    assert _generate(model, prompts, strategy="sample", top_k=1, seed=3) == greedy


@TWO_FAMILIES
def test_same_seed_same_samples(model):
    prompts = _prompts(model)
    first = _generate(model, prompts, strategy="sample", seed=7)
    assert _generate(model, prompts, strategy="sample", seed=7) == first
    # Row i draws from fold_in(key(seed), i): the batch size does not matter.
    assert _generate(model, prompts, strategy="sample", seed=7, batch_size=4) == first
    assert _generate(model, prompts, strategy="sample", seed=8) != first
    assert first != _generate(model, prompts)  # Samples of random weights are not greedy.


def _filter_numpy(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The tokens kept: the top_k most likely, then the fewest most likely whose (renormalised)
    probability reaches top_p. Boolean [V]."""
    order = np.argsort(-logits, kind="stable")
    kept = order[: top_k or len(order)]
    probs = np.exp(logits[kept] - logits[kept].max())
    probs /= probs.sum()
    count = int(np.searchsorted(np.cumsum(probs), top_p - 1e-9) + 1)
    mask = np.zeros(len(logits), bool)
    mask[kept[: min(count, len(kept))]] = True
    return mask


def test_filter_logits_matches_numpy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
    for top_k, top_p in [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (10, 0.8), (0, 0.05), (50, 0.99)]:
        got = np.asarray(search.filter_logits(logits, np.int32(top_k), np.float32(top_p)))
        for row, kept in zip(logits, got, strict=True):
            want = _filter_numpy(row, top_k, top_p)
            np.testing.assert_array_equal(np.isfinite(kept), want)
            np.testing.assert_array_equal(kept[want], row[want])


def test_sample_frequencies_match_the_filtered_distribution():
    """4,000 first tokens from the bigram model at T=0.7, top_k=3, top_p=0.7."""
    model, params = _bigram_params()
    temperature, top_k, top_p = 0.7, 3, 0.7
    logits = np.log(BIGRAM_PROBS[1]) / temperature
    kept = _filter_numpy(logits, top_k, top_p)
    want = np.where(kept, np.exp(logits - logits.max()), 0.0)
    want /= want.sum()
    assert 2 <= kept.sum() < 3  # Both filters cut something.
    options = decoding.decode_options(
        strategy="sample", max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p
    )
    n = 4000
    out = decoding.generate(model, params, [[1]] * n, options, eos_id=EOS, bos_id=1, batch_size=500)
    counts = np.bincount([row[0] for row in out], minlength=8)
    sigma = np.sqrt(n * want * (1 - want))
    assert np.all(np.abs(counts - n * want) <= 4 * sigma + 1e-9), (counts, n * want)


# --- Sharding and bad input --------------------------------------------------------------------


@pytest.mark.parametrize("model", [GPT(MODERN), T5(T5_V11)], ids=["modern", "t5"])
def test_generation_on_a_mesh_equals_one_device(model):
    """Rows sharded over (data, fsdp) of a 2x2x2 mesh; batch_size 2 is rounded up to 4."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    prompts = _prompts(model)
    for options in ({}, {"strategy": "beam", "num_beams": 3}, {"strategy": "sample", "seed": 1}):
        assert _generate(model, prompts, mesh=mesh, **options) == _generate(
            model, prompts, **options
        )


@ALL
def test_bad_prompts_fail_clearly(model):
    with pytest.raises(KilnError, match="prompt 1 is empty"):
        _generate(model, [_prompts(model)[0], ()])
    with pytest.raises(
        KilnError, match=r"prompt 0 has 17 tokens, more than the model's max_len=16"
    ):
        _generate(model, [tuple(range(3, 20))])


def test_bad_options_fail_clearly():
    with pytest.raises(
        KilnError, match="Unknown decoding option 'temprature'. Did you mean 'temperature'"
    ):
        decoding.decode_options(temprature=0.5)
    with pytest.raises(KilnError, match="strategy='nucleus' is not one of greedy, sample, beam"):
        decoding.decode_options(strategy="nucleus")
    with pytest.raises(KilnError, match=r"top_p=0.0 must be in \(0, 1\].*num_beams=0 must be >= 1"):
        decoding.decode_options(top_p=0.0, num_beams=0)
    with pytest.raises(KilnError, match="temperature=-1.0 must be >= 0"):
        decoding.DecodeOptions(temperature=-1.0)


def test_cut_at_stops():
    from kiln.tools.sample import cut_at_stops

    text = "    return x\n\ndef g():\n    pass\nprint(1)"
    assert cut_at_stops(text, ["\nprint", "\ndef"]) == "    return x\n"  # the earliest one
    assert cut_at_stops(text, ["\nclass"]) == text  # absent: unchanged
    assert cut_at_stops(text, ["", "\nprint"]) == "    return x\n\ndef g():\n    pass"
