"""Tests for kiln.data.cache_stream: rows cut from a token cache in cache order, against a
NumPy packing of the directly tokenized documents, and a stream's memory."""

import itertools
import tracemalloc

import numpy as np
import pytest
from test_pipeline import make_documents

from kiln.data import cache_stream, pipeline, token_cache, tokenizer
from kiln.data.lm_objectives import causal_lm
from kiln.errors import KilnError

ROW = 16


@pytest.fixture(scope="module")
def one_file_cache(tmp_path_factory, kiln_bpe):
    """A one-shard cache and its training documents, tokenized directly."""
    root = tmp_path_factory.mktemp("one_file")
    texts = make_documents(400, seed=9)
    (root / "a.txt").write_text("\n\n".join(texts))
    token_cache.prepare(root / "c", str(root / "a.txt"), str(kiln_bpe.path), 1000, log=str)
    first, last = tokenizer.document_ids(kiln_bpe)
    by_text = {t: [first, *kiln_bpe.encode(t.strip()), last] for t in texts}
    loaded = token_cache.load(root / "c", "train")
    tokens = loaded.tokens[np.arange(loaded.total)]
    docs = [tokens[a:b].tolist() for a, b in itertools.pairwise(loaded.starts)]
    # The cache holds the direct tokenization of the training texts, in file order.
    train = [ids for ids in by_text.values() if ids in docs]
    assert docs == train and len(docs) > 200
    return root / "c", docs


def reference_rows(docs: list[list[int]], shift: int, rows: int) -> list[tuple]:
    """Rows of ROW tokens cut from the documents' concatenation at ``shift``, with segment
    ids counting the documents that start in the row after its first token, and positions
    counted from the later of the row's start and the document's."""
    flat = np.concatenate(docs)
    starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
    out = []
    for r in range(rows):
        a = shift + r * ROW
        tokens, segments, positions = [], [], []
        for place in range(a, a + ROW):
            begun = starts[(starts > a) & (starts <= place)]
            segments.append(1 + len(begun))
            positions.append(place - (begun[-1] if len(begun) else a))
            tokens.append(flat[place])
        out.append((tuple(tokens), tuple(segments), tuple(positions)))
    return out


def as_rows(batch) -> list[tuple]:
    keys = ("tokens", "segment_ids", "positions")
    return [tuple(tuple(batch[k][i].tolist()) for k in keys) for i in range(len(batch["tokens"]))]


def test_an_epoch_serves_every_row_of_a_shifted_cut_once(one_file_cache):
    directory, docs = one_file_cache
    split = token_cache.CachedSplit(directory, "train")
    stream = split.packing_stream([1, 0], 1, 0, ROW, [1, 1, 0], "s")
    total = sum(len(d) for d in docs)
    assert stream.rows_per_epoch == total // ROW - 1
    served = []
    for epoch in range(2):
        per_epoch = stream.rows_per_epoch
        got = as_rows(stream.rows(epoch * per_epoch + np.arange(per_epoch)))
        fits = [
            shift
            for shift in range(total - per_epoch * ROW + 1)
            if set(reference_rows(docs, shift, per_epoch)) == set(got)
        ]
        assert fits == [stream.epoch_cut(epoch)[0]] and len(set(got)) == len(got)
        # Every row of the cut once, in a shuffled order.
        cut = reference_rows(docs, fits[0], per_epoch)
        order = [cut.index(row) for row in got]
        assert sorted(order) == list(range(per_epoch)) and order != sorted(order)
        served.append(got)
    assert served[0][:8] != served[1][:8]
    # Rows are a pure function of the index: any order, any rebuild.
    again = token_cache.CachedSplit(directory, "train").packing_stream(
        [1, 0], 1, 0, ROW, [1, 1, 0], "s"
    )
    pick = np.asarray([5, 900, 3, 77])
    assert as_rows(again.rows(pick)) == [as_rows(stream.rows(np.asarray([j])))[0] for j in pick]


def test_training_batches_from_the_cache_are_the_stream_rows(one_file_cache, kiln_bpe):
    directory, _ = one_file_cache
    split = token_cache.CachedSplit(directory, "train")
    common = dict(seq_len=ROW, global_batch_size=4, seed=3, streams=2)
    batches = list(itertools.islice(pipeline.make_train_dataset(split, kiln_bpe, **common), 3))
    # Deal seed (seed, 0), epoch seed (seed, 1, stream): each stream's next 2 rows per batch.
    streams = [split.packing_stream([3, 0], 2, s, ROW, [3, 1, s], "s") for s in range(2)]
    for i, batch in enumerate(batches):
        parts = [causal_lm(streams[s].rows(np.arange(2 * i, 2 * i + 2))) for s in range(2)]
        assert batch.keys() == parts[0].keys()
        for key, value in batch.items():
            assert np.array_equal(value, np.concatenate([p[key] for p in parts]))


def test_too_little_text_for_one_row_is_an_error(one_file_cache):
    directory, docs = one_file_cache
    split = token_cache.CachedSplit(directory, "train")
    with pytest.raises(KilnError, match="Stream 0 holds [0-9]+ tokens, less than one row of 10000"):
        split.packing_stream([0], len(docs), 0, 10_000, [0], "Stream 0")


def test_stream_memory_does_not_grow_with_the_documents(tmp_path, kiln_bpe):
    """60,000 documents: building a stream and drawing 20 batches allocates less than one
    int64 per document (the in-memory stream holds ~37 bytes per document)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    texts = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(60_000)]
    (tmp_path / "many.txt").write_text("\n\n".join(texts))
    token_cache.prepare(tmp_path / "c", str(tmp_path / "many.txt"), str(kiln_bpe.path), 1000)
    split = token_cache.CachedSplit(tmp_path / "c", "train")
    assert len(split) > 40_000
    tracemalloc.start()
    stream = split.packing_stream([0], 1, 0, 64, [0, 1], "s")
    for i in range(20):
        stream.rows(np.arange(16 * i, 16 * (i + 1)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stream.docs.index_start.nbytes <= 8 * (len(split) // cache_stream.SPARSE + 1)
    assert peak < 8 * len(split), peak


def test_a_mixture_with_a_cache_resumes_exactly(one_file_cache, kiln_bpe):
    directory, _ = one_file_cache
    texts = make_documents(300, seed=5)

    def dataset():
        split = token_cache.CachedSplit(directory, "train")
        kwargs = dict(seq_len=ROW, global_batch_size=4, seed=2, streams=2, weights=[2, 1])
        return pipeline.make_train_dataset([split, texts], kiln_bpe, **kwargs)

    want = list(itertools.islice(dataset(), 12))
    it = iter(dataset())
    for _ in range(5):
        next(it)
    resumed = iter(dataset())
    resumed.set_state(it.get_state())
    for batch in want[5:]:
        got = next(resumed)
        assert all(np.array_equal(batch[k], got[k]) for k in batch)
