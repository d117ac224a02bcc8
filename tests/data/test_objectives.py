"""Tests for kiln.data.objectives."""

import itertools

import numpy as np
import pytest

from kiln.data.objectives import (
    OBJECTIVES,
    CausalLM,
    Denoising,
    ElectraInputs,
    EncoderDecoderPrefixLM,
    Layout,
    MaskedLM,
    PrefixLM,
    SpanCorruption,
    as_layout,
    causal_lm,
    check_options,
    dense_predictions,
    make_objective,
)
from kiln.data.tokenizer import CONTROL_SYMBOLS, NUM_SPECIAL_IDS
from kiln.errors import KilnError

VOCAB = 1000
MASK_ID, BOS_ID, EOS_ID = 4, 2, 3
SENTINELS = tuple(range(7, 107))
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>", *CONTROL_SYMBOLS)


class StubTokenizer:
    """Kiln's special ids; ordinary piece i begins a word ("▁wi") iff i % 3 == 0."""

    pad_id, unk_id, bos_id, eos_id, mask_id, cls_id, sep_id = range(7)
    sentinel_ids = SENTINELS

    def __init__(self, vocab_size: int = VOCAB, specials: bool = True):
        self.vocab_size = vocab_size
        self.specials = specials

    def id_to_piece(self, i: int) -> str:
        if self.specials and i < NUM_SPECIAL_IDS:
            return SPECIAL_PIECES[i]
        return ("\u2581" if i % 3 == 0 else "") + f"w{i}"


def random_packed_batch(
    rng: np.random.Generator,
    batch: int,
    length: int,
    min_used: int = 0,
    max_segment: int = 7,
    low: int = 4,
) -> dict:
    """Rows of consecutive segments (ids from 1) with random lengths, then padding (segment 0).

    Tokens are uniform in ``low .. VOCAB-1``: with ``low=4`` about 10% are special ids (mask,
    cls, sep, sentinels).
    """
    tokens = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = length if b == 0 else int(rng.integers(min_used, length + 1))  # row 0: no padding
        t, seg = 0, 1
        while t < used:
            n = min(int(rng.integers(1, max_segment + 1)), used - t)
            tokens[b, t : t + n] = rng.integers(low, VOCAB, n)
            segment_ids[b, t : t + n] = seg
            positions[b, t : t + n] = np.arange(n)
            t, seg = t + n, seg + 1
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def reference_causal_lm(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    tokens, seg = batch["tokens"], batch["segment_ids"]
    rows, length = tokens.shape
    targets = np.zeros((rows, length), np.int64)
    weights = np.zeros((rows, length), np.float64)
    for b in range(rows):
        for t in range(length):
            if t + 1 < length:
                targets[b, t] = tokens[b, t + 1]
                if seg[b, t] != 0 and seg[b, t + 1] == seg[b, t]:
                    weights[b, t] = 1.0
    return targets, weights


@pytest.mark.parametrize("seed", range(5))
def test_causal_lm_matches_reference(seed):
    rng = np.random.default_rng(seed)
    batch = random_packed_batch(rng, batch=6, length=int(rng.integers(2, 40)))
    out = causal_lm(batch)
    targets, weights = reference_causal_lm(batch)

    assert set(out) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert out["inputs"].dtype == out["targets"].dtype == np.int32
    assert out["weights"].dtype == np.float32
    np.testing.assert_array_equal(out["inputs"], batch["tokens"])
    np.testing.assert_array_equal(out["targets"], targets)
    np.testing.assert_array_equal(out["weights"], weights)
    np.testing.assert_array_equal(out["segment_ids"], batch["segment_ids"])
    np.testing.assert_array_equal(out["positions"], batch["positions"])


def test_causal_lm_small_example():
    batch = {
        "tokens": np.array([[2, 10, 11, 3, 2, 12, 0, 0]], np.int32),
        "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0, 0]], np.int32),
        "positions": np.array([[0, 1, 2, 3, 0, 1, 0, 0]], np.int32),
    }
    out = causal_lm(batch)
    np.testing.assert_array_equal(out["targets"], [[10, 11, 3, 2, 12, 0, 0, 0]])
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 0, 1, 0, 0, 0]])


def test_causal_lm_does_not_modify_input():
    batch = random_packed_batch(np.random.default_rng(0), batch=3, length=16)
    before = {k: v.copy() for k, v in batch.items()}
    causal_lm(batch)
    for k, v in batch.items():
        np.testing.assert_array_equal(v, before[k])


def assert_int32_batch(out: dict, keys: set, shape: tuple) -> None:
    assert set(out) == keys
    for k, v in out.items():
        assert v.shape == shape, k
        assert v.dtype == (np.float32 if k == "weights" else np.int32), k


# --- make_objective ---------------------------------------------------------------------------

ALL_NAMES = sorted(set(itertools.chain.from_iterable(OBJECTIVES.values())))
VALID = [(f, n) for f, names in OBJECTIVES.items() for n in names]
INVALID = [(f, n) for f in OBJECTIVES for n in ALL_NAMES if n not in OBJECTIVES[f]]


@pytest.mark.parametrize(
    "layout, name, cls",
    [
        ("decoder", "causal_lm", CausalLM),
        ("decoder", "prefix_lm", PrefixLM),
        ("encoder", "mlm", MaskedLM),
        ("encoder", "electra", ElectraInputs),
        ("encoder_decoder", "span_corruption", SpanCorruption),
        ("encoder_decoder", "denoise", Denoising),
        ("encoder_decoder", "prefix_lm", EncoderDecoderPrefixLM),
    ],
)
def test_make_objective_valid_pairs(layout, name, cls):
    objective = make_objective(name, layout, StubTokenizer(), 64)
    assert type(objective) is cls and objective.name == name
    assert objective.layout == layout
    assert len(VALID) == 7


@pytest.mark.parametrize("layout, name", INVALID)
def test_make_objective_invalid_pairs(layout, name):
    assert INVALID, "every layout lacks some objective"
    with pytest.raises(KilnError) as e:
        make_objective(name, layout, StubTokenizer(), 64)
    message = str(e.value)
    assert f"objective.name={name!r}" in message and f"an {layout} model" in message
    for valid in OBJECTIVES[layout]:
        assert valid in message


def test_check_options_needs_no_tokenizer():
    """`validation.validate` runs the tokenizer-free rules of `make_objective` on its own."""
    assert check_options("mlm", "encoder", 64) == Layout.ENCODER
    with pytest.raises(KilnError, match=r"objective\.name='mlm'"):
        check_options("mlm", "decoder", 64)
    with pytest.raises(KilnError, match=r"objective\.mask_rate"):
        check_options("mlm", "encoder", 64, mask_rate=0.0)
    with pytest.raises(KilnError, match=r"objective\.mean_noise_span_length"):
        check_options("span_corruption", "encoder_decoder", 64, mean_noise_span_length=0.5)
    with pytest.raises(KilnError, match="Unknown model layout 'llama'"):
        as_layout("llama")


def test_make_objective_unknown_layout():
    with pytest.raises(KilnError, match=r"layout 'llama'.*'encoder', 'decoder', 'encoder_decoder'"):
        make_objective("causal_lm", "llama", StubTokenizer(), 64)


class NoMaskAttribute:
    vocab_size = VOCAB
    bos_id, eos_id = 2, 3

    def id_to_piece(self, i: int) -> str:
        return f"w{i}"


@pytest.mark.parametrize(
    "name, layout, tokenizer",
    [
        ("mlm", "encoder", StubTokenizer(specials=False)),  # ids 4 and 7.. are ordinary pieces
        ("mlm", "encoder", NoMaskAttribute()),
        ("mlm", "encoder", StubTokenizer(vocab_size=NUM_SPECIAL_IDS)),  # no ordinary tokens
        ("span_corruption", "encoder_decoder", StubTokenizer(specials=False)),
        ("span_corruption", "encoder_decoder", NoMaskAttribute()),
        (
            "span_corruption",
            "encoder_decoder",
            StubTokenizer(vocab_size=50),
        ),  # sentinels past the vocab
    ],
)
def test_make_objective_tokenizer_without_special_ids(name, layout, tokenizer):
    with pytest.raises(KilnError, match=rf"objective\.name='{name}' needs .* tokenizer"):
        make_objective(name, layout, tokenizer, 64)


@pytest.mark.parametrize("layout, name", VALID)
def test_make_objective_seq_len_too_short(layout, name):
    with pytest.raises(KilnError, match=r"data\.seq_len=1 is too short.* 2"):
        make_objective(name, layout, StubTokenizer(), 1)
    make_objective("mlm", "encoder", StubTokenizer(), 2)


def test_span_corruption_seq_len_bounds():
    tok = StubTokenizer()
    with pytest.raises(KilnError, match=r"data\.seq_len=9 is too short.*data\.seq_len >= 10"):
        make_objective("span_corruption", "encoder_decoder", tok, 9)
    # Spans of mean 10 need 6 noise tokens (round(5 / 10) = 0): 37 raw tokens, 33 inputs.
    with pytest.raises(KilnError, match=r"data\.seq_len=32 .*data\.seq_len >= 33"):
        make_objective("span_corruption", "encoder_decoder", tok, 32, mean_noise_span_length=10)
    make_objective("span_corruption", "encoder_decoder", tok, 33, mean_noise_span_length=10)
    objective = make_objective("span_corruption", "encoder_decoder", tok, 10)
    assert objective.corrupted_lengths(objective.packed_length(10)) == (10, 4)
    # 100 sentinels: the longest seq_len whose rows have at most 100 noise spans.
    with pytest.raises(KilnError, match=r"data\.seq_len=2048 needs 114 .* <= 1809"):
        make_objective("span_corruption", "encoder_decoder", tok, 2048)
    objective = make_objective("span_corruption", "encoder_decoder", tok, 1809)
    assert objective.span_counts(objective.packed_length(1809))[1] == 100
    with pytest.raises(KilnError, match=r"data\.seq_len=1810 needs 101 "):
        make_objective("span_corruption", "encoder_decoder", tok, 1810)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(name="mlm", mask_rate=0.0), "objective.mask_rate"),
        (dict(name="mlm", mask_rate=1.5), "objective.mask_rate"),
        (dict(name="mlm", mask_token_fraction=0.95), "objective.random_token_fraction"),
        (dict(name="mlm", random_token_fraction=-0.1), "objective.random_token_fraction"),
        (dict(name="span_corruption", noise_density=1.0), "objective.noise_density"),
        (dict(name="span_corruption", mean_noise_span_length=0.5), "mean_noise_span_length"),
    ],
)
def test_make_objective_bad_rates(kwargs, key):
    layout = "encoder" if kwargs["name"] == "mlm" else "encoder_decoder"
    with pytest.raises(KilnError, match=key.replace(".", r"\.")):
        make_objective(layout=layout, tokenizer=StubTokenizer(), seq_len=64, **kwargs)


# --- causal and prefix LM ---------------------------------------------------------------------


def test_causal_lm_objective_ignores_rng():
    batch = random_packed_batch(np.random.default_rng(0), batch=3, length=16)
    objective = make_objective("causal_lm", "decoder", StubTokenizer(), 16)
    assert not objective.uses_rng and objective.packed_length(16) == 16
    assert_batches_equal(objective(batch, None), causal_lm(batch))


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_prefix_lm_decoder():
    rng = np.random.default_rng(0)
    batch = random_packed_batch(rng, batch=1000, length=48, max_segment=12)
    objective = make_objective("prefix_lm", "decoder", StubTokenizer(), 48)
    assert objective.packed_length(48) == 48
    out = objective(batch, rng)
    keys = {"inputs", "segment_ids", "positions", "targets", "weights", "prefix_mask"}
    assert_int32_batch(out, keys, (1000, 48))
    causal = causal_lm(batch)
    for k in ("inputs", "segment_ids", "positions", "targets"):
        np.testing.assert_array_equal(out[k], causal[k], err_msg=k)

    seg, prefix, weights = batch["segment_ids"], out["prefix_mask"], out["weights"]
    splits = {}  # segment length -> prefix lengths seen
    for b in range(len(seg)):
        for s in set(seg[b]) - {0}:
            where = np.flatnonzero(seg[b] == s)
            m, p = len(where), int(prefix[b, where].sum())
            # The prefix is a non-empty initial block; the rest is continuation.
            np.testing.assert_array_equal(prefix[b, where], np.arange(m) < p)
            assert 1 <= p <= max(m - 1, 1)
            # Loss only on predicting continuation tokens of the same segment.
            expected = np.zeros(m)
            expected[p - 1 : m - 1] = 1
            np.testing.assert_array_equal(weights[b, where], expected)
            if m >= 2:
                assert weights[b, where].sum() >= 1
            splits.setdefault(m, []).append(p)
        assert np.all(prefix[b, seg[b] == 0] == 0) and np.all(weights[b, seg[b] == 0] == 0)
    # The split is uniform over 1 .. m-1.
    counts = np.bincount(splits[4], minlength=4)[1:]
    assert counts.sum() > 300 and np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.06)
    assert set(splits[12]) == set(range(1, 12))


def test_prefix_lm_encoder_decoder():
    rng = np.random.default_rng(1)
    length = 40
    batch = random_packed_batch(rng, batch=200, length=length)
    objective = make_objective("prefix_lm", "encoder_decoder", StubTokenizer(), length)
    assert objective.packed_length(length) == length
    out = objective(batch, rng)
    keys = {
        "encoder_inputs",
        "encoder_segment_ids",
        "encoder_positions",
        "decoder_inputs",
        "decoder_segment_ids",
        "decoder_positions",
        "targets",
        "weights",
    }
    assert_int32_batch(out, keys, (200, length))
    for b in range(200):
        n = int((batch["segment_ids"][b] != 0).sum())
        s = int(out["encoder_segment_ids"][b].sum())
        t = int(out["decoder_segment_ids"][b].sum())
        assert s + t == n
        raw = batch["tokens"][b, :n]
        np.testing.assert_array_equal(
            np.concatenate([out["encoder_inputs"][b, :s], out["targets"][b, :t]]), raw
        )
        assert not out["encoder_inputs"][b, s:].any() and not out["targets"][b, t:].any()
        if n >= 2:
            assert s >= 1 and t >= 1
        if n >= 4:
            assert n / 4 <= s <= 3 * n / 4, "split in the middle half"
        check_decoder_side(out, b, t)
        np.testing.assert_array_equal(out["encoder_positions"][b, :s], np.arange(s))
        assert not out["encoder_positions"][b, s:].any()


def check_decoder_side(out: dict, b: int, t: int) -> None:
    """Decoder inputs are bos + targets[:-1]; segment 1, positions and weights on real targets."""
    real = np.arange(out["targets"].shape[1]) < t
    np.testing.assert_array_equal(out["decoder_segment_ids"][b], real)
    np.testing.assert_array_equal(out["weights"][b], real)
    np.testing.assert_array_equal(
        out["decoder_positions"][b], np.where(real, np.arange(len(real)), 0)
    )
    expected = np.zeros(len(real), np.int32)
    expected[:t] = np.concatenate([[BOS_ID], out["targets"][b, : t - 1]])[:t]
    np.testing.assert_array_equal(out["decoder_inputs"][b], expected)


# --- masked LM --------------------------------------------------------------------------------


def test_mlm_statistics():
    rng = np.random.default_rng(0)
    batch = random_packed_batch(rng, batch=64, length=4096, min_used=3000)
    objective = make_objective("mlm", "encoder", StubTokenizer(), 4096)
    assert objective.packed_length(4096) == 4096
    out = objective(batch, rng)
    cap = round(0.15 * 4096)  # The most a row can select: the predictions' static width.
    predictions = {k: out.pop(k) for k in ("predict_positions", "targets", "weights")}
    assert_int32_batch(predictions, {"predict_positions", "targets", "weights"}, (64, cap))
    assert_int32_batch(out, {"inputs", "segment_ids", "positions"}, (64, 4096))
    tokens, seg = batch["tokens"], batch["segment_ids"]
    np.testing.assert_array_equal(out["segment_ids"], seg)
    np.testing.assert_array_equal(out["positions"], batch["positions"])

    # Real predictions first, at ascending (so distinct) positions, with the original tokens;
    # padding after them, at position 0 with target 0.
    position, real = predictions["predict_positions"], predictions["weights"] == 1
    assert set(np.unique(predictions["weights"])) == {0.0, 1.0}
    assert np.all(real[:, :-1] >= real[:, 1:]) and np.all(np.diff(position)[real[:, 1:]] > 0)
    assert np.all(position[~real] == 0) and np.all(predictions["targets"][~real] == 0)
    gathered = np.take_along_axis(tokens, position, axis=1)
    np.testing.assert_array_equal(predictions["targets"][real], gathered[real])
    targets, weights = dense_predictions({**out, **predictions})
    np.testing.assert_array_equal(targets[weights == 1], tokens[weights == 1])

    candidate = (tokens >= NUM_SPECIAL_IDS) & (seg != 0)
    selected = weights == 1
    assert candidate.sum() >= 100_000 and (~candidate & (seg != 0)).sum() > 10_000
    assert not (selected & ~candidate).any(), "special tokens and padding are never selected"
    assert abs(selected.sum() / candidate.sum() - 0.15) < 0.005
    np.testing.assert_array_equal(selected.sum(1), np.round(0.15 * candidate.sum(1)))
    inputs = out["inputs"]
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])

    chosen, original = inputs[selected], tokens[selected]
    masked = chosen == MASK_ID
    random = ~masked & (chosen != original)
    kept = chosen == original
    assert np.all((chosen[random] >= NUM_SPECIAL_IDS) & (chosen[random] < VOCAB))
    chance = 1 / (VOCAB - NUM_SPECIAL_IDS)  # A random token equal to the original: "kept".
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(random.mean() - 0.1 * (1 - chance)) < 0.01
    assert abs(kept.mean() - (0.1 + 0.1 * chance)) < 0.01
    assert len(np.unique(chosen[random])) > 0.9 * (VOCAB - NUM_SPECIAL_IDS)


def test_electra_inputs_mask_every_selected_token():
    rng = np.random.default_rng(1)
    batch = random_packed_batch(rng, batch=8, length=256, min_used=200)
    out = make_objective("electra", "encoder", StubTokenizer(), 256, mask_rate=0.25)(batch, rng)
    targets, weights = dense_predictions(out)
    selected = weights == 1
    candidate = (batch["tokens"] >= NUM_SPECIAL_IDS) & (batch["segment_ids"] != 0)
    np.testing.assert_array_equal(selected.sum(1), np.round(0.25 * candidate.sum(1)))
    assert np.all(out["inputs"][selected] == MASK_ID)  # no random or kept tokens
    np.testing.assert_array_equal(out["inputs"][~selected], batch["tokens"][~selected])
    np.testing.assert_array_equal(targets[selected], batch["tokens"][selected])


def reference_words(tokens: np.ndarray, seg: np.ndarray) -> list[list[tuple[int, int]]]:
    """Whole words of a batch: runs of ordinary pieces; "▁" pieces (i % 3 == 0) start new ones."""
    tok = StubTokenizer()
    words = []
    for b, t in itertools.product(range(tokens.shape[0]), range(tokens.shape[1])):
        if tokens[b, t] < NUM_SPECIAL_IDS or seg[b, t] == 0:
            continue
        joins = (
            t > 0
            and seg[b, t - 1] == seg[b, t]
            and tokens[b, t - 1] >= NUM_SPECIAL_IDS
            and not tok.id_to_piece(tokens[b, t]).startswith("\u2581")
        )
        if joins:
            words[-1].append((b, t))
        else:
            words.append([(b, t)])
    return words


def test_mlm_whole_word():
    rng = np.random.default_rng(2)
    batch = random_packed_batch(rng, batch=32, length=512, min_used=400, max_segment=30)
    objective = make_objective("mlm", "encoder", StubTokenizer(), 512, whole_word=True)
    out = objective(batch, rng)
    selected = out["weights"] == 1
    words = reference_words(batch["tokens"], batch["segment_ids"])
    flags = [[selected[p] for p in w] for w in words]
    assert all(all(f) or not any(f) for f in flags), "a word is selected whole or not at all"
    assert sum(len(w) >= 3 and f[0] for w, f in zip(words, flags)) > 50, "long words selected"
    candidates = (batch["tokens"] >= NUM_SPECIAL_IDS) & (batch["segment_ids"] != 0)
    assert sum(len(w) for w in words) == candidates.sum()
    assert not (selected & ~candidates).any()
    assert abs(selected.sum() / candidates.sum() - 0.15) < 0.015
    assert abs(np.mean([f[0] for f in flags]) - 0.15) < 0.015
    np.testing.assert_array_equal(out["inputs"][~selected], batch["tokens"][~selected])


# --- span corruption --------------------------------------------------------------------------


def t5_lengths(seq_len: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """Brute force: the largest raw length whose corrupted inputs (+ eos) fit; its targets."""
    best = None
    for raw in range(1, 2 * seq_len):
        noise = int(round(raw * density))
        spans = int(round(noise / mean_span))
        if raw - noise + spans + 1 <= seq_len:
            best = (raw, noise + spans + 1)
    return best


@pytest.mark.parametrize("seq_len", [10, 32, 64, 100, 128, 512, 568, 1024])
def test_span_corruption_lengths_match_t5(seq_len):
    objective = make_objective("span_corruption", "encoder_decoder", StubTokenizer(), seq_len)
    raw, targets = t5_lengths(seq_len)
    assert (objective.packed_length(seq_len), objective.targets_length) == (raw, targets)
    assert objective.corrupted_lengths(raw)[0] == seq_len, "full rows fill the inputs exactly"
    if seq_len == 512:
        assert (raw, targets) == (568, 114)  # T5's classic configuration.


def raw_rows(rng: np.random.Generator, batch: int, length: int, min_used: int) -> dict:
    """Packed rows as the pipeline makes them: ordinary tokens, bos/eos around documents."""
    out = random_packed_batch(rng, batch, length, min_used, max_segment=20, low=NUM_SPECIAL_IDS)
    seg = out["segment_ids"]
    first = out["positions"] == 0
    last = np.ones_like(first)
    last[:, :-1] = seg[:, 1:] != seg[:, :-1]
    out["tokens"][first & (seg != 0)] = BOS_ID
    out["tokens"][last & ~first & (seg != 0)] = EOS_ID
    return out


def split_at_sentinels(row: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """The sentinel ids of a row in order, and the pieces between them (the first before any)."""
    is_sentinel = (row >= SENTINELS[0]) & (row <= SENTINELS[-1])
    where = np.flatnonzero(is_sentinel)
    pieces = np.split(row, where)
    return [int(row[i]) for i in where], [pieces[0]] + [p[1:] for p in pieces[1:]]


def reconstruct_span_corruption(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Puts each span of the targets back in place of its sentinel in the inputs (eos dropped)."""
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    sentinels, kept = split_at_sentinels(inputs[:-1])
    target_sentinels, spans = split_at_sentinels(targets[:-1])
    assert sentinels == target_sentinels == list(SENTINELS[: len(sentinels)]), "in order"
    assert len(spans[0]) == 0, "targets start with a sentinel"
    pieces = [kept[0]]
    for span, after in zip(spans[1:], kept[1:], strict=True):
        pieces += [span, after]
    return np.concatenate(pieces)


def test_span_corruption():
    rng = np.random.default_rng(0)
    seq_len = 128
    objective = make_objective("span_corruption", "encoder_decoder", StubTokenizer(), seq_len)
    raw, targets_length = objective.packed_length(seq_len), objective.targets_length
    # Full rows, and rows of every length 0 .. raw (a padded last eval row).
    full = raw_rows(rng, batch=600, length=raw, min_used=raw)
    partial = raw_rows(rng, batch=raw + 1, length=raw, min_used=raw)
    partial["segment_ids"] = (np.arange(raw) < np.arange(raw + 1)[:, None]).astype(np.int32)
    partial["tokens"] *= partial["segment_ids"]
    noise, spans, span_lengths, first_span_starts = 0, 0, [], set()
    for batch in (full, partial):
        out = objective(batch, rng)
        keys = {"encoder_inputs", "encoder_segment_ids", "encoder_positions"}
        assert_int32_batch({k: out[k] for k in keys}, keys, (len(batch["tokens"]), seq_len))
        keys = set(out) - keys
        assert_int32_batch({k: out[k] for k in keys}, keys, (len(batch["tokens"]), targets_length))
        for b in range(len(batch["tokens"])):
            n = int((batch["segment_ids"][b] != 0).sum())
            s, t = (
                int(out["encoder_segment_ids"][b].sum()),
                int(out["decoder_segment_ids"][b].sum()),
            )
            inputs, targets = out["encoder_inputs"][b], out["targets"][b]
            assert not inputs[s:].any() and not targets[t:].any()
            np.testing.assert_array_equal(out["encoder_segment_ids"][b], np.arange(seq_len) < s)
            np.testing.assert_array_equal(
                out["encoder_positions"][b], np.where(np.arange(seq_len) < s, np.arange(seq_len), 0)
            )
            check_decoder_side(out, b, t)
            if n == 0:
                assert s == t == 0
                continue
            restored = reconstruct_span_corruption(inputs[:s], targets[:t])
            np.testing.assert_array_equal(restored, batch["tokens"][b, :n])
            if batch is full:
                assert s == seq_len, "a full row fills the encoder inputs exactly"
                sentinels, pieces = split_at_sentinels(targets[: t - 1])
                noise += t - 1 - len(sentinels)
                spans += len(sentinels)
                span_lengths += [len(p) for p in pieces[1:]]
                first_span_starts.add(len(split_at_sentinels(inputs)[1][0]))
    assert abs(noise / (len(full["tokens"]) * raw) - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.2
    assert min(span_lengths) == 1 and max(span_lengths) >= 8, "span lengths are random"
    assert len(first_span_starts) > 20, "span positions are random"


def test_denoise_targets_the_whole_row_from_span_corruptions_inputs():
    seq_len = 64
    tok = StubTokenizer()
    denoise = make_objective("denoise", "encoder_decoder", tok, seq_len)
    spans = make_objective("span_corruption", "encoder_decoder", tok, seq_len)
    raw = denoise.packed_length(seq_len)
    assert raw == spans.packed_length(seq_len) and denoise.targets_length == raw + 1
    batch = raw_rows(np.random.default_rng(1), batch=50, length=raw, min_used=raw // 3)
    ours = denoise(batch, np.random.default_rng(7))
    theirs = spans(batch, np.random.default_rng(7))  # The same noise from the same rng.
    for key in ("encoder_inputs", "encoder_segment_ids", "encoder_positions"):
        np.testing.assert_array_equal(ours[key], theirs[key])
    for b in range(len(batch["tokens"])):
        n = int((batch["segment_ids"][b] != 0).sum())
        t = int(ours["decoder_segment_ids"][b].sum())
        assert t == n + 1
        np.testing.assert_array_equal(ours["targets"][b, :n], batch["tokens"][b, :n])
        assert ours["targets"][b, n] == EOS_ID and not ours["targets"][b, t:].any()
        # What span corruption drops and keeps puts the row back together: the same row.
        s = int(theirs["encoder_segment_ids"][b].sum())
        u = int(theirs["decoder_segment_ids"][b].sum())
        restored = reconstruct_span_corruption(
            theirs["encoder_inputs"][b, :s], theirs["targets"][b, :u]
        )
        np.testing.assert_array_equal(restored, ours["targets"][b, :n])
        check_decoder_side(ours, b, t)


def test_span_corruption_statistics_with_other_settings():
    rng = np.random.default_rng(3)
    objective = make_objective(
        "span_corruption",
        "encoder_decoder",
        StubTokenizer(),
        200,
        noise_density=0.3,
        mean_noise_span_length=5,
    )
    raw = objective.packed_length(200)
    batch = raw_rows(rng, batch=300, length=raw, min_used=raw // 2)
    out = objective(batch, rng)
    n = (batch["segment_ids"] != 0).sum(1)
    t = out["decoder_segment_ids"].sum(1)
    spans = ((out["targets"] >= SENTINELS[0]) & (out["targets"] <= SENTINELS[-1])).sum(1)
    noise = t - 1 - spans
    assert abs(noise.sum() / n.sum() - 0.3) < 0.01
    assert abs(noise.sum() / spans.sum() - 5.0) < 0.2


# --- all objectives ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout, name", VALID)
def test_deterministic_in_rng_and_pure(layout, name):
    objective = make_objective(name, layout, StubTokenizer(), 48)
    length = objective.packed_length(48)
    batch = random_packed_batch(np.random.default_rng(0), batch=8, length=length, min_used=10)
    before = {k: v.copy() for k, v in batch.items()}
    first = objective(batch, np.random.default_rng(5))
    assert_batches_equal(objective(batch, np.random.default_rng(5)), first)
    for k, v in batch.items():
        np.testing.assert_array_equal(v, before[k])
    if objective.uses_rng:
        other = objective(batch, np.random.default_rng(6))
        assert any(not np.array_equal(first[k], other[k]) for k in first)
