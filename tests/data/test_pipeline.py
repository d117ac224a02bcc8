"""Tests for kiln.data.pipeline: packing, determinism, resumption, process slices, eval."""

import itertools
import json
import random

import grain
import numpy as np
import pytest

from kiln.data.objectives import CausalLM, causal_lm, dense_predictions, make_objective
from kiln.data.pipeline import (
    PlaceTokenizer,
    Tokenized,
    continued_fraction,
    make_eval_batches,
    make_train_dataset,
    process_slice,
    resolve_streams,
)
from kiln.data.tokenizer import Tokenizer, train_tokenizer
from kiln.errors import KilnError

SEQ_LEN = 32
BATCH = 4
_WORDS = (
    "the a river stone light moves over under quietly bright old new city train model data "
    "token north south sings runs café naïve 東京 🙂 and of with"
).split()


def make_documents(num: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths: some shorter, some much longer than SEQ_LEN."""
    rng = random.Random(seed)
    docs = []
    for i in range(num):
        n = rng.choice([0, 1, 3, 10, 25, 60])
        docs.append(f"doc{i} " + " ".join(rng.choices(_WORDS, k=n)))
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents(100)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(make_documents(3000, seed=1), path, vocab_size=600)


def take(ds, n: int) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def encoded(tok: Tokenizer, doc: str) -> list[int]:
    return [tok.bos_id, *tok.encode(doc), tok.eos_id]


def check_row_structure(seg: np.ndarray, pos: np.ndarray) -> None:
    """Segment ids start at 1 and grow by steps of 1; positions count from 0 in each segment."""
    assert seg[0] == 1
    real = seg[seg != 0]
    assert np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
    assert np.all(seg[len(real) :] == 0), "padding only at the end"
    for t in range(len(real)):
        expected = 0 if t == 0 or seg[t] != seg[t - 1] else pos[t - 1] + 1
        assert pos[t] == expected


def test_packing_covers_each_epoch_once_in_shuffled_rows(tok, docs):
    """One stream: an epoch's rows hold every token of every document once (but the dropped
    tail), documents cut at row ends and continued; rows come in a shuffled order, and the next
    epoch packs the documents in another order."""
    places = PlaceTokenizer(tok, docs)
    ds = make_train_dataset(docs, places, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=3)
    total = sum(len(encoded(places, d)) for d in docs)
    per_epoch = total // SEQ_LEN
    batches = take(ds, 2 * per_epoch // BATCH + 1)
    rows = np.concatenate([b["inputs"] for b in batches])
    segs = np.concatenate([b["segment_ids"] for b in batches])
    poss = np.concatenate([b["positions"] for b in batches])
    assert rows.dtype == np.int32 and rows.shape[1] == SEQ_LEN
    for seg, pos in zip(segs, poss, strict=True):
        assert np.all(seg != 0), "the endless training stream has no padding"
        check_row_structure(seg, pos)
    epochs = [rows[:per_epoch], rows[per_epoch : 2 * per_epoch]]
    for epoch in epochs:
        ids = epoch[epoch >= PlaceTokenizer.FIRST]
        assert len(np.unique(ids)) == len(ids), "no token twice in an epoch"
        all_ids = sum(places.places[d][1] for d in docs)
        assert all_ids - SEQ_LEN < len(ids) <= all_ids, "only the partial last row is dropped"
    # Within a segment, tokens are consecutive places of one document ([bos] first, [eos] last).
    for row, seg in zip(rows, segs, strict=True):
        for s in np.unique(seg):
            piece = row[seg == s]
            body = piece[piece >= PlaceTokenizer.FIRST]
            assert np.all(np.diff(body) == 1)
    # Shuffled: few rows continue the row before them (in reading order nearly all long
    # documents would), and the two epochs cut their rows differently.
    continues = np.mean(epochs[0][1:, 0] == epochs[0][:-1, -1] + 1)
    assert continues < 0.05
    assert {tuple(r) for r in epochs[0]} != {tuple(r) for r in epochs[1]}


def test_consecutive_batches_are_not_correlated(tok):
    """Few rows continue a row of the previous step, where reading order (the same rows
    batched as they were packed) has every batch's first row continue the previous batch's
    last row whenever a document spans them; the statistic counts exactly those."""
    many = make_documents(2000, seed=4)
    places = PlaceTokenizer(tok, many)
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=0, streams=2)
    batches = take(make_train_dataset(many, places, **kwargs), 200)
    assert continued_fraction(batches) < 0.02

    docs = Tokenized(many, places)
    rows = docs.pack(np.arange(len(docs)), np.arange(1000), SEQ_LEN)["tokens"]
    in_reading_order = [{"inputs": rows[i : i + 8]} for i in range(0, len(rows), 8)]
    # A row that ends inside a document (on a place id, not its eos) is continued by the next
    # (the statistic does not count a continuation that is the eos alone).
    spanning = sum(
        rows[i - 1, -1] >= PlaceTokenizer.FIRST and rows[i, 0] != tok.eos_id
        for i in range(8, len(rows), 8)
    )
    assert spanning > 50
    assert continued_fraction(in_reading_order) == spanning / (len(rows) - 8)


def test_objective_is_applied(tok, docs):
    (batch,) = take(
        make_train_dataset(docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0), 1
    )
    packed = {
        "tokens": batch["inputs"],
        "segment_ids": batch["segment_ids"],
        "positions": batch["positions"],
    }
    assert_batches_equal([batch], [causal_lm(packed)])
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}


def test_seed_determinism(tok, docs):
    make = lambda seed: make_train_dataset(
        docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=seed
    )
    first = take(make(7), 5)
    assert_batches_equal(take(make(7), 5), first)
    assert not np.array_equal(take(make(8), 5)[0]["inputs"], first[0]["inputs"])


def _resume_matches(ds, k: int, reference: list[dict], via_json: bool) -> dict:
    it = iter(ds)
    for _ in range(k):
        next(it)
    state = it.get_state()
    if via_json:
        state = json.loads(json.dumps(state))
    fresh = iter(ds)
    fresh.set_state(state)
    assert_batches_equal([next(fresh) for _ in range(5)], reference[k : k + 5])
    return state


@pytest.mark.parametrize("via_json", [False, True])
def test_resume_from_state(tok, docs, via_json):
    ds = make_train_dataset(docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    reference = take(ds, 20)
    for k in (0, 1, 3, 8, 15):
        _resume_matches(ds, k, reference, via_json)


@pytest.mark.parametrize("via_json", [False, True])
def test_resume_when_rows_end_on_document_boundaries(tok, via_json):
    # Every document is [bos, piece, eos]; rows of 6 tokens hold exactly two documents.
    pieces = [tok.id_to_piece(i).replace("\u2581", " ") for i in range(400, tok.vocab_size)]
    one_token = [p for p in pieces if len(tok.encode(p)) == 1]
    assert len(one_token) > 100
    ds = make_train_dataset(one_token, tok, seq_len=6, global_batch_size=2, seed=0)
    reference = take(ds, 20)
    for k in (1, 2, 5, 13):
        state = _resume_matches(ds, k, reference, via_json)
    assert state == {"next_index": 13}, "the whole state is the next step's index"


def test_resume_through_orbax_checkpoint(tok, docs, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    ds = make_train_dataset(docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    reference = take(ds, 10)
    it = iter(ds)
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        fresh = iter(ds)
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal([next(fresh) for _ in range(5)], reference[4:9])


@pytest.mark.parametrize("process_count, streams", [(2, 1), (4, 1), (2, 4), (4, 4), (4, 2)])
def test_process_slices_make_up_the_global_batch(tok, docs, process_count, streams):
    """Whatever the process count (dividing the streams, equal to them, or more), the
    processes' rows put together are the one-process global batch."""
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=5, streams=streams)
    full = take(make_train_dataset(docs, tok, **kwargs), 3)
    slices = [
        take(
            make_train_dataset(docs, tok, process_index=i, process_count=process_count, **kwargs), 3
        )
        for i in range(process_count)
    ]
    for step, batch in enumerate(full):
        for k, v in batch.items():
            assert slices[0][step][k].shape[0] == 8 // process_count
            joined = np.concatenate([s[step][k] for s in slices])
            np.testing.assert_array_equal(joined, v, err_msg=k)


def _documents_read(places: PlaceTokenizer, docs, batches) -> set[str]:
    """The documents that have a token in `batches` (drawn with `places`)."""
    ids = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    firsts = np.array([places.places[d][0] for d in docs])
    ids = ids[ids >= PlaceTokenizer.FIRST]
    return {docs[i] for i in np.searchsorted(firsts, ids, side="right") - 1}


class _SpyTokenizer(PlaceTokenizer):
    """Records every text it encodes."""

    def __init__(self, tok: Tokenizer, docs: list[str]):
        super().__init__(tok, docs)
        self.read = set()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        self.read.add(text)
        return super().encode(text)


def test_each_process_reads_only_its_streams(tok):
    """2 processes, 2 streams: process i tokenizes only documents i, i + 2, ... of the dealt
    corpus (no document is read by both, together they read each once) and packs them into its
    own rows."""
    docs = make_documents(2000, seed=2)
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=5, streams=2, process_count=2)
    spies = [_SpyTokenizer(tok, docs) for _ in range(2)]
    shares = [
        take(make_train_dataset(docs, spies[i], process_index=i, **kwargs), 6) for i in (0, 1)
    ]
    assert all(b["inputs"].shape == (4, SEQ_LEN) for share in shares for b in share)
    packed = [_documents_read(spies[0], docs, share) for share in shares]
    assert len(packed[0]) > 10 and len(packed[1]) > 10 and not packed[0] & packed[1]
    assert not spies[0].read & spies[1].read
    assert len(spies[0].read) + len(spies[1].read) == len(docs)
    assert packed[0] <= spies[0].read and packed[1] <= spies[1].read
    # Process 0's rows are the first half of the one-process global batch.
    places = PlaceTokenizer(tok, docs)
    one = take(
        make_train_dataset(docs, places, seq_len=SEQ_LEN, global_batch_size=8, seed=5, streams=2), 6
    )
    assert_batches_equal([process_slice(b, 0, 2) for b in one], shares[0])


def test_streams_change_the_order_but_not_the_rows_shape(tok, docs):
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=5)
    one, four = (
        take(make_train_dataset(docs, tok, **kwargs), 2),
        take(make_train_dataset(docs, tok, streams=4, **kwargs), 2),
    )
    assert one[0]["inputs"].shape == four[0]["inputs"].shape == (8, SEQ_LEN)
    assert not np.array_equal(one[0]["inputs"], four[0]["inputs"])
    assert_batches_equal(take(make_train_dataset(docs, tok, streams=4, **kwargs), 2), four)


@pytest.mark.parametrize("objective_name, layout", [("causal_lm", "decoder"), ("mlm", "encoder")])
def test_resume_across_process_counts(tok, docs, objective_name, layout):
    """A position saved by one of 2 processes (4 streams) restores a 1-process iterator, and
    the other way round, to the same continuation as an uninterrupted run (masks included)."""
    objective = make_objective(objective_name, layout, tok, SEQ_LEN)
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=5, streams=4, objective=objective)
    reference = take(make_train_dataset(docs, tok, **kwargs), 7)
    parts = [
        iter(make_train_dataset(docs, tok, process_index=i, process_count=2, **kwargs))
        for i in (0, 1)
    ]
    for it in parts:
        for _ in range(4):
            next(it)
    saved = [json.loads(json.dumps(it.get_state())) for it in parts]
    assert saved[0] == saved[1], "every process holds the same position"
    one = iter(make_train_dataset(docs, tok, **kwargs))
    one.set_state(saved[1])
    assert_batches_equal([next(one) for _ in range(3)], reference[4:7])

    it = iter(make_train_dataset(docs, tok, **kwargs))
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    second = iter(make_train_dataset(docs, tok, process_index=1, process_count=2, **kwargs))
    second.set_state(state)
    want = [process_slice(b, 1, 2) for b in reference[4:7]]
    assert_batches_equal([next(second) for _ in range(3)], want)


def test_streams_must_divide_the_global_batch(tok, docs):
    assert (
        resolve_streams(0, 256) == 8 and resolve_streams(0, 12) == 4 and resolve_streams(0, 6) == 2
    )
    assert resolve_streams(3, 6) == 3
    with pytest.raises(
        KilnError, match=r"data\.streams=3 does not divide data\.global_batch_size=8"
    ):
        make_train_dataset(docs, tok, seq_len=SEQ_LEN, global_batch_size=8, seed=0, streams=3)
    with pytest.raises(KilnError, match="cannot fill data.streams=8"):
        make_train_dataset(docs[:5], tok, seq_len=SEQ_LEN, global_batch_size=8, seed=0, streams=8)


def test_process_slice():
    batch = {"a": np.arange(12).reshape(6, 2), "b": np.arange(6)}
    np.testing.assert_array_equal(process_slice(batch, 1, 3)["a"], [[4, 5], [6, 7]])
    np.testing.assert_array_equal(process_slice(batch, 2, 3)["b"], [4, 5])
    with pytest.raises(KilnError, match="6 rows .* 4 processes"):
        process_slice(batch, 0, 4)
    with pytest.raises(KilnError, match="process 3"):
        process_slice(batch, 3, 3)


def test_train_dataset_errors(tok, docs):
    with pytest.raises(KilnError, match=r"6 rows .* 4 processes .* data\.global_batch_size"):
        make_train_dataset(docs, tok, seq_len=SEQ_LEN, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(KilnError, match="No training documents"):
        make_train_dataset([], tok, seq_len=SEQ_LEN, global_batch_size=4, seed=0)
    with pytest.raises(KilnError, match="seq_len=1"):
        make_train_dataset(docs, tok, seq_len=1, global_batch_size=4, seed=0)


def test_eval_batches(tok, docs):
    make = lambda n: make_eval_batches(docs, tok, seq_len=SEQ_LEN, batch_size=BATCH, max_batches=n)
    batches = make(1000)
    assert_batches_equal(make(1000), batches)
    assert_batches_equal(make(2), batches[:2])
    for b in batches:
        assert b["inputs"].shape == (BATCH, SEQ_LEN)
        for seg, pos in zip(b["segment_ids"], b["positions"], strict=True):
            if seg[0]:
                check_row_structure(seg, pos)
            else:
                assert not seg.any()
        assert np.all(b["weights"][b["segment_ids"] == 0] == 0)
    # All documents, in order, then padding.
    rows = np.concatenate([b["inputs"] for b in batches])
    segs = np.concatenate([b["segment_ids"] for b in batches])
    stream = list(itertools.chain.from_iterable(encoded(tok, d) for d in docs))
    np.testing.assert_array_equal(rows[segs != 0], stream)
    assert len(stream) % (SEQ_LEN * BATCH) != 0, "the test should cover a padded last batch"
    assert len(batches) == -(-len(stream) // (SEQ_LEN * BATCH))


def test_eval_batches_small_and_empty(tok):
    (batch,) = make_eval_batches(["hi"], tok, seq_len=SEQ_LEN, batch_size=BATCH, max_batches=3)
    assert batch["inputs"].shape == (BATCH, SEQ_LEN)
    assert batch["weights"].sum() == len(encoded(tok, "hi")) - 1
    assert make_eval_batches([], tok, seq_len=SEQ_LEN, batch_size=BATCH, max_batches=3) == []


# --- objectives -------------------------------------------------------------------------------

RANDOM_OBJECTIVES = [
    ("decoder", "prefix_lm", {}),
    ("encoder", "mlm", {}),
    ("encoder", "mlm", {"whole_word": True}),
    ("encoder_decoder", "span_corruption", {}),
    ("encoder_decoder", "prefix_lm", {}),
]
DECODER_KEYS = {"inputs", "segment_ids", "positions", "targets", "weights"}
ENCODER_DECODER_KEYS = {
    "encoder_inputs",
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_inputs",
    "decoder_segment_ids",
    "decoder_positions",
    "targets",
    "weights",
}


@pytest.fixture(params=RANDOM_OBJECTIVES, ids=lambda p: "-".join([p[0], p[1], *p[2]]))
def objective(request, tok):
    layout, name, kwargs = request.param
    return make_objective(name, layout, tok, SEQ_LEN, **kwargs)


def check_shapes(batch: dict, objective) -> None:
    if objective.layout == "encoder_decoder":
        assert set(batch) == ENCODER_DECODER_KEYS
        decoder_length = objective.targets_length
        for k, v in batch.items():
            assert v.shape == (BATCH, SEQ_LEN if k.startswith("encoder") else decoder_length), k
    else:
        extra = {"prefix_mask"} if objective.name == "prefix_lm" else set()
        predictions = {"predict_positions", "targets", "weights"} & set(batch)
        if "predict_positions" in batch:  # mlm: C = round(mask_rate * L) predictions per row.
            extra, width = {"predict_positions"}, round(0.15 * SEQ_LEN)
        else:
            predictions, width = set(), SEQ_LEN
        assert set(batch) == DECODER_KEYS | extra
        for k, v in batch.items():
            assert v.shape == (BATCH, width if k in predictions else SEQ_LEN), k
    for k, v in batch.items():
        assert v.dtype == (np.float32 if k == "weights" else np.int32), k


def raw_rows(batch: dict, objective, tok: Tokenizer) -> list[np.ndarray]:
    """The packed rows of raw tokens that the objective transformed (padding dropped)."""
    if objective.layout != "encoder_decoder":
        if objective.name == "mlm":
            targets, weights = dense_predictions(batch)
            rows = np.where(weights == 1, targets, batch["inputs"])  # Unselected: unchanged.
        else:
            rows = batch["inputs"]
        return [row[seg != 0] for row, seg in zip(rows, batch["segment_ids"])]
    rows = []
    for b in range(len(batch["targets"])):
        inputs = batch["encoder_inputs"][b][batch["encoder_segment_ids"][b] != 0]
        targets = batch["targets"][b][batch["decoder_segment_ids"][b] != 0]
        if objective.name == "prefix_lm":
            rows.append(np.concatenate([inputs, targets]))
            continue
        spans = {}  # sentinel -> the span after it in the targets
        for t in targets[:-1]:
            if t in tok.sentinel_ids:
                current = spans.setdefault(int(t), [])
            else:
                current.append(t)
        rows.append(np.array([x for t in inputs[:-1] for x in spans.get(int(t), [t])], np.int32))
    return rows


def test_objective_train_stream(tok, docs, objective):
    make = lambda seed: make_train_dataset(
        docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=seed, objective=objective
    )
    batches = take(make(7), 3)
    for batch in batches:
        check_shapes(batch, objective)
        assert batch["weights"].sum() > 0
        for row in raw_rows(batch, objective, tok):
            assert len(row) == objective.packed_length(SEQ_LEN), "no padding in training rows"
    assert_batches_equal(take(make(7), 3), batches)
    other = take(make(8), 3)
    assert not np.array_equal(other[0]["targets"], batches[0]["targets"])

    # The same packed rows, with or without the objective.
    plain = take(
        make_train_dataset(
            docs, tok, seq_len=objective.packed_length(SEQ_LEN), global_batch_size=BATCH, seed=7
        ),
        3,
    )
    for batch, reference in zip(batches, plain, strict=True):
        rows = raw_rows(batch, objective, tok)
        np.testing.assert_array_equal(np.stack(rows), reference["inputs"])


def test_objective_masks_resume_through_json_state(tok, docs, objective):
    ds = make_train_dataset(
        docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0, objective=objective
    )
    reference = take(ds, 12)
    for k in (1, 6):
        state = _resume_matches(ds, k, reference, via_json=True)
    assert state == {"next_index": 6}


def test_causal_lm_is_the_default(tok, docs):
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    default = make_train_dataset(docs, tok, **kwargs)
    explicit = make_train_dataset(docs, tok, objective=CausalLM(), **kwargs)
    assert_batches_equal(take(explicit, 3), take(default, 3))


def test_objective_process_slices(tok, docs):
    objective = make_objective("mlm", "encoder", tok, SEQ_LEN)
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=5, objective=objective)
    full = take(make_train_dataset(docs, tok, **kwargs), 2)
    slices = [
        take(make_train_dataset(docs, tok, process_index=i, process_count=2, **kwargs), 2)
        for i in range(2)
    ]
    for step, batch in enumerate(full):
        for k, v in batch.items():
            joined = np.concatenate([s[step][k] for s in slices])
            np.testing.assert_array_equal(joined, v, err_msg=k)


def test_objective_eval_batches(tok, docs, objective):
    make = lambda n: make_eval_batches(
        docs, tok, seq_len=SEQ_LEN, batch_size=BATCH, max_batches=n, objective=objective
    )
    batches = make(1000)
    assert_batches_equal(make(1000), batches)
    assert_batches_equal(make(2), batches[:2])
    for batch in batches:
        check_shapes(batch, objective)
    # All documents, in order, then padding rows (all zero, no weight).
    rows = [row for batch in batches for row in raw_rows(batch, objective, tok)]
    stream = list(itertools.chain.from_iterable(encoded(tok, d) for d in docs))
    np.testing.assert_array_equal(np.concatenate(rows), stream)
    assert len(rows[-1]) == 0, "the test should cover padding rows"
    last = {k: v[-1] for k, v in batches[-1].items()}
    assert all(not v.any() for v in last.values())


def test_objective_built_for_another_seq_len(tok, docs):
    objective = make_objective("span_corruption", "encoder_decoder", tok, 2 * SEQ_LEN)
    with pytest.raises(ValueError, match=f"seq_len={2 * SEQ_LEN}, not {SEQ_LEN}"):
        make_train_dataset(
            docs, tok, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0, objective=objective
        )
