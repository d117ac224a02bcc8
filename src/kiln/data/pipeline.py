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
validation loss at equal tokens. A token cache's streams (corpora larger than memory) keep
their documents in cache order and move the cut each epoch instead (`kiln.data.cache_stream`).
Every row of step ``i`` is a pure function of (seed, i), so the iterator's whole state is the
next step's index: resuming, and changing the process count, are exact.
"""

from __future__ import annotations

import math
import sys
import typing
from collections.abc import Sequence

import grain
import numpy as np

from kiln.data.data_order import PlaceTokenizer, continued_fraction  # noqa: F401 (re-exported)
from kiln.data.objectives import CausalLM, Objective
from kiln.data.tokenized import Tokenized, rows_that_fit
from kiln.data.tokenizer import Tokenizer
from kiln.errors import KilnError

Batch = dict[str, np.ndarray]
# Two threads build batches ahead: grain's default (16 threads, 500 elements) is slow to start.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
EVAL_SEED = 0  # Eval batches are masked the same way in every run.
# Tags that keep the seeds of the run's random choices apart.
_DEAL, _EPOCH, _OBJECTIVE, _MIX = 0, 1, 2, 3


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


class _Stream:
    """One packing stream: its documents re-ordered and packed each epoch, rows shuffled.

    Row ``j`` of the stream is row ``row_order[j % R]`` of epoch ``j // R``'s packing (``R``
    rows per epoch, the last partial row dropped); both orders are drawn from ``seed`` (a
    list of ints) and the epoch.
    """

    def __init__(self, docs: Tokenized, row_len: int, seed: list[int], name: str):
        self.docs, self.row_len, self.seed = docs, row_len, seed
        self.rows_per_epoch = rows_that_fit(docs.total, row_len, name)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's document order, row order and document ends, kept for the current and
        the next epoch of this stream (drawing them costs time in the stream's documents: a
        cache shared by a process's streams would redraw them at every batch)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([*self.seed, epoch])
            # int32 orders (the same permutations as of int64 ranges) halve the per-document
            # memory, which is what a stream's memory grows with.
            order = rng.permutation(np.arange(len(self.docs), dtype=np.int32))
            rows = rng.permutation(np.arange(self.rows_per_epoch, dtype=np.int32))
            drawn = (order, rows, self.docs.ends(order))
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = drawn
        return self._epochs[epoch]

    def rows(self, index: np.ndarray) -> Batch:
        """The stream's rows ``index`` (increasing; they may span epochs), in that order."""
        parts = []
        for epoch in np.unique(index // self.rows_per_epoch):
            order, row_order, ends = self._epoch(int(epoch))
            mine = index[index // self.rows_per_epoch == epoch] % self.rows_per_epoch
            parts.append(self.docs.pack(order, row_order[mine], self.row_len, ends))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _Batches:
    """A grain source: item ``i`` is this process's rows of global batch ``i``.

    ``streams[(k, s)]`` is source k's packing stream s. With one source, stream s's share of
    batch i is its rows ``i * stream_rows + j``; in a mixture, each slot j of the share picks a
    source by ``weights`` (a generator drawn from (seed, stream, i)) and takes that source's
    stream row ``i * stream_rows + j``, so every row is a pure function of (seed, i) too.
    """

    def __init__(
        self,
        streams: dict[tuple[int, int], RowStream],
        weights: np.ndarray,
        stream_rows: int,
        start: int,
        rows: int,
        objective: Objective,
        seed: int,
    ):
        self.streams, self.weights, self.stream_rows = streams, weights, stream_rows
        self.start, self.rows = start, rows
        self.objective, self.seed = objective, seed
        self.stream_ids = sorted({s for _, s in streams})

    def __len__(self) -> int:
        return sys.maxsize  # endless

    def sources(self, stream: int, index: int) -> np.ndarray:
        """The source of each of a stream's slots in batch ``index``."""
        if len(self.weights) == 1:
            return np.zeros(self.stream_rows, np.int64)
        rng = np.random.default_rng([self.seed, _MIX, stream, index])
        return rng.choice(len(self.weights), size=self.stream_rows, p=self.weights)

    def _packed(self, stream: int, index: int) -> Batch:
        slots = index * self.stream_rows + np.arange(self.stream_rows)
        pick = self.sources(stream, index)
        parts = {int(k): self.streams[int(k), stream].rows(slots[pick == k]) for k in set(pick)}
        if len(parts) == 1:
            return next(iter(parts.values()))
        first = next(iter(parts.values()))
        packed = {k: np.zeros((self.stream_rows, *v.shape[1:]), v.dtype) for k, v in first.items()}
        for k, part in parts.items():
            for key, value in part.items():
                packed[key][pick == k] = value
        return packed

    def __getitem__(self, index: int) -> Batch:
        parts = []
        for s in self.stream_ids:
            packed = self._packed(s, index)
            # The objective's generator depends on the stream and the step only, never on the
            # process: masks are the same on any number of processes and after a restore.
            rng = None
            if self.objective.uses_rng:
                rng = np.random.default_rng([self.seed, _OBJECTIVE, s, index])
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


class RowStream(typing.Protocol):
    """A packing stream: its rows by index (:class:`_Stream`, `kiln.data.cache_stream`)."""

    def rows(self, index: np.ndarray) -> Batch: ...


@typing.runtime_checkable
class Sharded(typing.Protocol):
    """Documents stored in shards that deal themselves to packing streams, so that a stream
    opens only its own shards (`kiln.data.token_cache.CachedSplit`)."""

    def __len__(self) -> int: ...

    def packing_stream(
        self,
        seed: list[int],
        streams: int,
        stream: int,
        row_len: int,
        epoch_seed: list[int],
        name: str,
    ) -> RowStream: ...


Documents = Sequence[str] | Tokenized | Sharded


def make_train_dataset(
    documents: Documents | Sequence[Documents],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    objective: Objective | None = None,
    streams: int = 1,
    weights: Sequence[float] | None = None,
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

    ``documents`` are texts, a :class:`Tokenized`, used as is, or a :class:`Sharded` source (a
    token cache's split), which deals contiguous ranges of its shuffled shards instead, so a
    stream opens only the shards of its range, and packs them in cache order with a shift per
    epoch, in memory that does not grow with the corpus (`kiln.data.cache_stream`). With
    ``weights``, ``documents`` is a list of such sources, a mixture: every source is dealt to
    its own streams, and each row slot picks its source by weight (:class:`_Batches`). One
    source of any weight gives the same batches as that source alone.

    Each process tokenizes and packs only the streams that hold its :func:`process_slice` of
    the global batch: with a process count that divides ``streams`` no document is read twice,
    and the data order depends on ``streams`` but never on the process count. The iterator's
    state (``get_state()``/``set_state()``, ``grain.checkpoint.CheckpointSave``) is the index
    of the next batch, the same in every process.

    Raises:
        KilnError: On no documents, a bad sequence length, a batch size that the processes
            cannot split evenly, streams that do not divide it, too little text to fill them,
            or bad weights.
    """
    sources = [documents] if weights is None else list(documents)
    probs = _mixture_weights(weights, len(sources))
    process_slice({"rows": np.zeros(global_batch_size)}, process_index, process_count)  # Checks.
    n_streams = resolve_streams(streams, global_batch_size)
    objective = _objective_for(objective, seq_len)
    stream_rows = global_batch_size // n_streams
    rows = global_batch_size // process_count
    first, last = process_index * rows, (process_index + 1) * rows - 1
    mine = {}
    for k, docs in enumerate(sources):
        what = "training documents" if len(sources) == 1 else f"training documents of source {k}"
        if not len(docs):
            raise KilnError(f"No {what}: check the data source of this run.")
        if len(docs) < n_streams:
            raise KilnError(
                f"{len(docs)} {what} cannot fill data.streams={n_streams} packing streams:"
                " lower data.streams."
            )
        tag = [seed, _DEAL] if len(sources) == 1 else [seed, _DEAL, k]
        row_len = objective.packed_length(seq_len)
        for s in range(first // stream_rows, last // stream_rows + 1):
            epoch_seed = [seed, _EPOCH, s] if len(sources) == 1 else [seed, _EPOCH, s, k]
            name = f"Packing stream {s} of {n_streams}" + (f" of source {k}" if k else "")
            if isinstance(docs, Sharded):
                mine[k, s] = docs.packing_stream(tag, n_streams, s, row_len, epoch_seed, name)
            else:
                stream_docs = _deal(docs, tokenizer, tag, n_streams, s)
                mine[k, s] = _Stream(stream_docs, row_len, epoch_seed, name)
    source = _Batches(mine, probs, stream_rows, first % stream_rows, rows, objective, seed)
    return grain.MapDataset.source(source).to_iter_dataset(_READ_OPTIONS)


def _deal(
    docs: Sequence[str] | Tokenized, tokenizer: Tokenizer, seed: list[int], streams: int, s: int
) -> Tokenized:
    """Stream ``s``'s documents, dealt round-robin from a permutation drawn from ``seed`` (texts
    tokenized here, only this stream's)."""
    dealt = np.random.default_rng(seed).permutation(len(docs))[s::streams]
    if isinstance(docs, Tokenized):
        return docs.select(dealt)
    return Tokenized((docs[i] for i in dealt), tokenizer)


def _mixture_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    """Mixture weights normalised to sum to 1 (one source: [1.0])."""
    if weights is None:
        return np.ones(1)
    w = np.asarray(weights, np.float64)
    if len(w) != count or count < 1 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise KilnError(
            f"Mixture weights {list(weights)} for {count} sources: give one positive weight per"
            " source (data.sources)."
        )
    return w / w.sum()


def make_eval_batches(
    documents: Documents,
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
    ``documents`` may be a :class:`Tokenized` (only the rows needed are read).
    """
    if batch_size < 1 or max_batches < 1:
        raise KilnError(f"Eval batch_size={batch_size} and max_batches={max_batches} must be >= 1.")
    if not len(documents):
        return []
    objective = _objective_for(objective, seq_len)
    row_len = objective.packed_length(seq_len)
    if isinstance(documents, Tokenized):
        docs = documents
    else:
        docs = Tokenized(documents, tokenizer, max_tokens=max_batches * batch_size * row_len)
    order = np.arange(len(docs))
    ends = docs.ends(order)
    n_batches = min(max_batches, -(-docs.total // (row_len * batch_size)))
    batches = []
    for i in range(n_batches):
        rows = np.arange(i * batch_size, (i + 1) * batch_size)
        packed = docs.pack(order, rows, row_len, ends)
        batches.append(objective(packed, np.random.default_rng([EVAL_SEED, i])))
    return batches
