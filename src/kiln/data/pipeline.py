"""Pre-training input pipelines: tokenize, pack into fixed-length rows, shuffle rows, batch,
apply an objective.

The training order, and why it is built this way. Documents are dealt to ``data.streams``
packing streams once per run (a seeded permutation, then round-robin), so that a process reads
and tokenizes only the streams that hold its rows of the global batch. In each epoch a stream
orders its documents anew, concatenates them as ``[bos] + ids + [eos]`` and cuts the result
into rows; it then hands out those rows in a second, independent random order. Consecutive
rows of a document therefore land in unrelated steps: packing rows in reading order instead
(a stream's next batch continuing where its last one stopped) puts one long document in the
same batch slots for several steps, and such correlated gradients cost a GPT 0.2 nats of
validation loss at equal tokens. Every row of step ``i`` is a pure function of (seed, i), so
the iterator's whole state is the next step's index: resuming, and changing the process count,
are exact.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import CausalLM, Objective
from kiln.data.tokenizer import NUM_SPECIAL_IDS, Tokenizer
from kiln.errors import KilnError

Batch = dict[str, np.ndarray]
# Two threads build batches ahead: grain's default (16 threads, 500 elements) is slow to start.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
EVAL_SEED = 0  # Eval batches are masked the same way in every run.
_ENCODE_CHUNK = 1024  # documents per tokenizer call: bounds the Python lists alive at once
# Tags that keep the seeds of the run's random choices apart.
_DEAL, _EPOCH, _OBJECTIVE = 0, 1, 2


def process_slice(batch: Batch, index: int, count: int) -> Batch:
    """The contiguous block of a global batch's rows that process ``index`` of ``count`` feeds."""
    rows = len(next(iter(batch.values())))
    if rows < 1 or rows % count or not 0 <= index < count:
        raise KilnError(
            f"A global batch of {rows} rows cannot be split evenly over {count} processes "
            f"(this is process {index}): make data.global_batch_size a multiple of {count}."
        )
    n = rows // count
    return {k: v[index * n : (index + 1) * n] for k, v in batch.items()}


class Tokenized:
    """Documents tokenized as ``[bos] + ids + [eos]`` (``[CLS]``/``[SEP]`` for a tokenizer without
    bos/eos, `tokenizer.document_ids`), one flat int32 array.

    Document ``d`` is ``tokens[starts[d] : starts[d + 1]]``.
    """

    def __init__(self, documents: Iterable[str], tokenizer: Tokenizer, max_tokens: int = 0):
        """Tokenizes ``documents`` in order; with ``max_tokens > 0``, stops once at least that
        many tokens are held."""
        arrays: list[np.ndarray] = []
        total, it = 0, iter(documents)
        first, last = tokenizer_lib.document_ids(tokenizer)
        while chunk := list(itertools.islice(it, _ENCODE_CHUNK)):
            for ids in tokenizer.encode_batch(chunk):
                arrays.append(np.asarray([first, *ids, last], np.int32))
                total += len(arrays[-1])
            if max_tokens and total >= max_tokens:
                break
        lengths = np.asarray([len(a) for a in arrays], np.int64)
        self.tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def pack(self, order: np.ndarray, rows: np.ndarray, row_len: int) -> Batch:
        """Rows ``rows`` of documents ``order`` concatenated and cut into ``row_len`` tokens.

        Segment ids count the documents in a row from 1; positions restart at 0 at each
        segment (also where a document continues from the previous row). Tokens past the end
        of the concatenation are padding: token 0, segment 0, position 0.
        """
        lengths = np.diff(self.starts)[order]
        ends = np.cumsum(lengths)
        begins = ends - lengths
        where = rows[:, None] * row_len + np.arange(row_len)  # [R, L] places in the concatenation
        doc = np.searchsorted(ends, where, side="right")
        real = doc < len(order)
        doc = np.minimum(doc, len(order) - 1)
        start = np.maximum(begins[doc], rows[:, None] * row_len)  # segment start within the row
        place = np.minimum(self.starts[order[doc]] + where - begins[doc], len(self.tokens) - 1)
        tokens = self.tokens[place]
        return {
            "tokens": np.where(real, tokens, 0).astype(np.int32),
            "segment_ids": np.where(real, doc - doc[:, :1] + 1, 0).astype(np.int32),
            "positions": np.where(real, where - start, 0).astype(np.int32),
        }


class _Stream:
    """One packing stream: its documents re-ordered and packed each epoch, rows shuffled.

    Row ``j`` of the stream is row ``row_order[j % R]`` of epoch ``j // R``'s packing (``R``
    rows per epoch, the last partial row dropped); both orders are drawn from ``seed`` (a
    list of ints) and the epoch.
    """

    def __init__(self, docs: Tokenized, row_len: int, seed: list[int], name: str):
        self.docs, self.row_len, self.seed = docs, row_len, seed
        self.rows_per_epoch = len(docs.tokens) // row_len
        if self.rows_per_epoch < 1:
            raise KilnError(
                f"{name} holds {len(docs.tokens)} tokens, less than one row of {row_len}: add"
                " training text, lower data.seq_len, or lower data.streams."
            )

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one stream per run; the current epoch + next)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([*self.seed, epoch])
        return rng.permutation(len(self.docs)), rng.permutation(self.rows_per_epoch)

    def rows(self, first: int, count: int) -> Batch:
        """The stream's rows ``first .. first + count - 1`` (they may span two epochs)."""
        parts = []
        index = np.arange(first, first + count)
        for epoch in np.unique(index // self.rows_per_epoch):
            order, row_order = self._epoch(int(epoch))
            mine = index[index // self.rows_per_epoch == epoch] % self.rows_per_epoch
            parts.append(self.docs.pack(order, row_order[mine], self.row_len))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _Batches:
    """A grain source: item ``i`` is this process's rows of global batch ``i``."""

    def __init__(
        self,
        streams: dict[int, _Stream],
        stream_rows: int,
        start: int,
        rows: int,
        objective: Objective,
        objective_seed: int,
    ):
        self.streams, self.stream_rows = streams, stream_rows
        self.start, self.rows = start, rows
        self.objective, self.objective_seed = objective, objective_seed

    def __len__(self) -> int:
        return sys.maxsize  # endless

    def __getitem__(self, index: int) -> Batch:
        parts = []
        for s, stream in self.streams.items():
            packed = stream.rows(index * self.stream_rows, self.stream_rows)
            # The objective's generator depends on the stream and the step only, never on the
            # process: masks are the same on any number of processes and after a restore.
            rng = None
            if self.objective.uses_rng:
                rng = np.random.default_rng([self.objective_seed, _OBJECTIVE, s, index])
            parts.append(self.objective(packed, rng))
        batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        return {k: v[self.start : self.start + self.rows] for k, v in batch.items()}


def _objective_for(objective: Objective | None, seq_len: int) -> Objective:
    """``objective``, or causal LM for None; checks it was built for ``seq_len``."""
    if seq_len < 2:
        raise KilnError(f"data.seq_len={seq_len} is too small: use at least 2 (e.g. 512).")
    built_for = getattr(objective, "seq_len", seq_len)
    if built_for != seq_len:
        raise ValueError(f"The objective was built for seq_len={built_for}, not {seq_len}.")
    return objective or CausalLM()


DEFAULT_STREAMS = 8  # data.streams = 0 means gcd(global_batch_size, DEFAULT_STREAMS).


def resolve_streams(streams: int, global_batch_size: int) -> int:
    """The number of packing streams: `streams`, or for 0 gcd(global batch, DEFAULT_STREAMS)."""
    resolved = streams or math.gcd(global_batch_size, DEFAULT_STREAMS)
    if streams < 0 or global_batch_size % resolved:
        raise KilnError(
            f"data.streams={streams} does not divide data.global_batch_size={global_batch_size}:"
            " use a divisor of the global batch (each stream fills an equal share of its rows),"
            " or 0 for the default."
        )
    return resolved


def make_train_dataset(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    objective: Objective | None = None,
    streams: int = 1,
) -> grain.IterDataset:
    """An endless, shuffled, packed training stream: this process's rows of each global batch.

    Documents are dealt to ``streams`` packing streams (:func:`resolve_streams`): a permutation
    drawn from ``seed``, stream s taking its documents s, s + S, ... Each stream tokenizes its
    documents once (``[bos] + ids + [eos]``); in every epoch it orders them anew, concatenates
    them and cuts rows of ``objective.packed_length(seq_len)`` tokens (a document that does not
    fit continues in the next row; ``segment_ids`` start at 1 in each row, ``positions``
    restart at each segment; the last partial row is dropped), and serves those rows in a
    second random order. Global batch i is stream 0's next ``global_batch_size / streams``
    rows, then stream 1's, ..., each stream's part passed through ``objective`` (default
    :class:`~kiln.data.objectives.CausalLM`) with a generator drawn from (seed, stream, i).

    Each process tokenizes and packs only the streams that hold its :func:`process_slice` of
    the global batch: with a process count that divides ``streams`` no document is read twice,
    and the data order depends on ``streams`` but never on the process count. The iterator's
    state (``get_state()``/``set_state()``, ``grain.checkpoint.CheckpointSave``) is the index
    of the next batch, the same in every process.

    Raises:
        KilnError: On no documents, a bad sequence length, a batch size that the processes
            cannot split evenly, streams that do not divide it or too little text to fill them.
    """
    if not documents:
        raise KilnError("No training documents: check the data source of this run.")
    process_slice({"rows": np.zeros(global_batch_size)}, process_index, process_count)  # Checks.
    n_streams = resolve_streams(streams, global_batch_size)
    if len(documents) < n_streams:
        raise KilnError(
            f"{len(documents)} training documents cannot fill data.streams={n_streams} packing"
            " streams: lower data.streams."
        )
    objective = _objective_for(objective, seq_len)
    dealt = np.random.default_rng([seed, _DEAL]).permutation(len(documents))
    stream_rows = global_batch_size // n_streams
    rows = global_batch_size // process_count
    first, last = process_index * rows, (process_index + 1) * rows - 1
    mine = {}
    for s in range(first // stream_rows, last // stream_rows + 1):
        docs = Tokenized((documents[i] for i in dealt[s::n_streams]), tokenizer)
        name = f"Packing stream {s} of {n_streams}"
        mine[s] = _Stream(docs, objective.packed_length(seq_len), [seed, _EPOCH, s], name)
    source = _Batches(mine, stream_rows, first % stream_rows, rows, objective, seed)
    return grain.MapDataset.source(source).to_iter_dataset(_READ_OPTIONS)


def make_eval_batches(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    objective: Objective | None = None,
) -> list[Batch]:
    """The first ``max_batches`` packed batches of ``documents``, in order, deterministic.

    Packed like :func:`make_train_dataset` but in document order, without shuffling; batch
    ``i`` goes through ``objective`` with the generator ``np.random.default_rng([EVAL_SEED,
    i])``. The final batch is padded to ``batch_size`` rows (the last packed row may also end
    in padding): padding has token 0, segment 0 and weight 0, so every batch has the same shape
    and no tokens are dropped. Returns an empty list only if there are no documents.
    """
    if batch_size < 1 or max_batches < 1:
        raise KilnError(f"Eval batch_size={batch_size} and max_batches={max_batches} must be >= 1.")
    if not documents:
        return []
    objective = _objective_for(objective, seq_len)
    row_len = objective.packed_length(seq_len)
    docs = Tokenized(documents, tokenizer, max_tokens=max_batches * batch_size * row_len)
    order = np.arange(len(docs))
    n_batches = min(max_batches, -(-len(docs.tokens) // (row_len * batch_size)))
    batches = []
    for i in range(n_batches):
        rows = np.arange(i * batch_size, (i + 1) * batch_size)
        packed = docs.pack(order, rows, row_len)
        batches.append(objective(packed, np.random.default_rng([EVAL_SEED, i])))
    return batches


class PlaceTokenizer:
    """A stand-in tokenizer for measuring data order: each document's ids name its tokens'
    places, consecutive within a document and unique across ``documents`` (with a gap
    between documents), all from ``FIRST`` up; lengths are ``tokenizer``'s."""

    FIRST = 1000

    def __init__(self, tokenizer: Tokenizer, documents: Sequence[str]):
        self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id
        self.places: dict[str, tuple[int, int]] = {}
        place = self.FIRST
        for doc, ids in zip(documents, tokenizer.encode_batch(documents), strict=True):
            self.places[doc] = (place, len(ids))
            place += len(ids) + 1

    def encode(self, text: str) -> list[int]:
        first, n = self.places[text]
        return list(range(first, first + n))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def continued_fraction(batches: Sequence[Batch], key: str = "inputs") -> float:
    """The fraction of rows (from the second batch on) whose first token continues the last
    token of a row of the previous batch.

    For batches drawn with a :class:`PlaceTokenizer`: a row continues another exactly when its
    first id is the other's last id plus one (a continuation that is a document's eos alone is
    not counted). A random order gives about (rows starting mid-document) x (batch rows / rows
    per epoch).
    """
    hits = total = 0
    for prev, cur in itertools.pairwise(batches):
        ends = set(prev[key][:, -1].tolist())
        hits += sum(t > NUM_SPECIAL_IDS and t - 1 in ends for t in cur[key][:, 0].tolist())
        total += len(cur[key])
    return hits / max(total, 1)
