"""Grain input pipelines: tokenize, pack into fixed-length rows, batch, apply an objective."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import grain
import numpy as np

from kiln.data.objectives import CausalLM, Objective
from kiln.data.tokenizer import Tokenizer
from kiln.errors import KilnError

Batch = dict[str, np.ndarray]
# Tokenize ahead in two threads: grain's default (16 threads, 500 elements) is slow to start.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)
EVAL_SEED = 0  # Eval batches are masked the same way in every run.


def _encode(text: str, *, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return {"tokens": np.asarray(ids, dtype=np.int32)}


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


class _PackedIterator(grain.DatasetIterator):
    """Renames the packer's outputs; makes its state restorable after a JSON round trip."""

    def __next__(self) -> Batch:
        packed = next(self._parent)
        return {
            "tokens": packed["tokens"],
            "segment_ids": packed["tokens_segment_ids"],
            "positions": packed["tokens_positions"],
        }

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        # grain 0.2.18 tests `slice != (-1, -1)`; JSON (grain.checkpoint) turns tuples into lists,
        # which would make an empty remainder look like a real one and skip a document.
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


class _PackedIterDataset(grain.IterDataset):
    """Concat-then-split packing of ``{"tokens": ids}`` into rows of ``seq_len`` tokens."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(
            grain.experimental.ConcatThenSplitIterDataset(parent, length_struct={"tokens": seq_len})
        )

    def __iter__(self) -> _PackedIterator:
        return _PackedIterator(self._parent.__iter__())


def _packed(
    documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, streams: int = 1
) -> grain.IterDataset:
    """Tokenized ``[bos] + ids + [eos]`` documents, concatenated and split into rows; one of
    ``streams`` read side by side (they share the reading threads)."""
    if seq_len < 2:
        raise KilnError(f"data.seq_len={seq_len} is too small: use at least 2 (e.g. 512).")
    ds = documents.map(functools.partial(_encode, tokenizer=tokenizer))
    threads = max(1, _READ_OPTIONS.num_threads // streams)
    buffer = max(16, _READ_OPTIONS.prefetch_buffer_size // streams)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    return _PackedIterDataset(ds, seq_len)


def _objective_for(objective: Objective | None, seq_len: int) -> Objective:
    """``objective``, or causal LM for None; checks it was built for ``seq_len``."""
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


class _StreamsIterator(grain.DatasetIterator):
    """This process's rows of each global batch, cut from the streams that hold them."""

    def __init__(self, streams: dict[int, grain.DatasetIterator], start: int, rows: int):
        super().__init__(list(streams.values()))
        self._streams, self._start, self._rows = streams, start, rows

    def __next__(self) -> Batch:
        parts = [next(it) for it in self._streams.values()]
        batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        return {k: v[self._start : self._start + self._rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"streams": {str(s): it.get_state() for s, it in self._streams.items()}}

    def set_state(self, state: dict) -> None:
        missing = [s for s in self._streams if str(s) not in state["streams"]]
        if missing:
            raise KeyError(f"the saved data position has no state for streams {missing}")
        for s, it in self._streams.items():
            it.set_state(state["streams"][str(s)])


class _StreamsDataset(grain.IterDataset):
    """Zips the packing streams a process reads into its rows of each global batch."""

    def __init__(self, streams: dict[int, grain.IterDataset], start: int, rows: int):
        super().__init__(list(streams.values()))
        self._streams, self._start, self._rows = streams, start, rows

    def __iter__(self) -> _StreamsIterator:
        iterators = {s: ds.__iter__() for s, ds in self._streams.items()}
        return _StreamsIterator(iterators, self._start, self._rows)


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

    Documents are shuffled with ``seed`` (reshuffled every epoch) and dealt round-robin to
    ``streams`` packing streams (:func:`resolve_streams`; stream s takes documents s, s + S, ...
    of the shuffled sequence). In each stream they are encoded as ``[bos] + ids + [eos]``,
    concatenated and split into rows of ``seq_len`` tokens (a document that does not fit
    continues in the stream's next row; ``segment_ids`` start at 1 in each row, ``positions``
    restart at each segment) and batched ``global_batch_size / streams`` rows at a time, then
    passed through ``objective`` (default :class:`~kiln.data.objectives.CausalLM`; rows hold
    ``objective.packed_length(seq_len)`` raw tokens). Global batch i is stream 0's batch i,
    then stream 1's, ...

    Each process reads, tokenizes and packs only the streams that hold its
    :func:`process_slice` of the global batch: with a process count that divides ``streams``
    no document is read twice, and the data order depends on ``streams`` but never on the
    process count.

    A random objective gets a generator that grain derives from ``seed``, the stream and the
    batch's index in the stream, which is part of the iterator state: masks are the same on any
    number of processes and after a restore. The iterator's state holds each of its streams'
    positions (``get_state()``/``set_state()``, ``grain.checkpoint.CheckpointSave``).

    Raises:
        KilnError: On no documents, a bad sequence length, a batch size that the processes
            cannot split evenly or streams that do not divide it.
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
    # grain shuffles epoch e with seed + e: mix the seed so that nearby seeds share no epochs.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    shuffled = grain.MapDataset.source(documents).shuffle(seed=shuffle_seed)
    objective_seed = int(np.random.SeedSequence(seed).generate_state(2)[1])
    stream_rows = global_batch_size // n_streams

    def stream(s: int) -> grain.IterDataset:
        ds = shuffled[s::n_streams] if n_streams > 1 else shuffled
        ds = _packed(ds.repeat(), tokenizer, objective.packed_length(seq_len), n_streams)
        ds = ds.batch(stream_rows, drop_remainder=True)
        if not objective.uses_rng:  # No rng: the iterator state keeps its layout.
            return ds.map(functools.partial(objective, rng=None))
        seed_s = objective_seed
        if n_streams > 1:
            seed_s = int(np.random.SeedSequence([objective_seed, s]).generate_state(1)[0])
        return ds.random_map(objective, seed=seed_s)

    rows = global_batch_size // process_count
    first, last = process_index * rows, (process_index + 1) * rows - 1
    mine = range(first // stream_rows, last // stream_rows + 1)
    return _StreamsDataset({s: stream(s) for s in mine}, first % stream_rows, rows)


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

    Packed like :func:`make_train_dataset` but without shuffling; batch ``i`` goes through
    ``objective`` with the generator ``np.random.default_rng([EVAL_SEED, i])``. The final batch
    is padded to ``batch_size`` rows (the last packed row may also end in padding): padding has
    token 0, segment 0 and weight 0, so every batch has the same shape and no tokens are
    dropped. Returns an empty list only if there are no documents.
    """
    if batch_size < 1 or max_batches < 1:
        raise KilnError(f"Eval batch_size={batch_size} and max_batches={max_batches} must be >= 1.")
    if not documents:
        return []
    objective = _objective_for(objective, seq_len)
    ds = _packed(grain.MapDataset.source(documents), tokenizer, objective.packed_length(seq_len))
    batches = []
    for batch in ds.batch(batch_size, drop_remainder=False):
        missing = batch_size - len(batch["tokens"])
        if missing:
            batch = {k: np.pad(v, [(0, missing), (0, 0)]) for k, v in batch.items()}
        batches.append(objective(batch, np.random.default_rng([EVAL_SEED, len(batches)])))
        if len(batches) == max_batches:
            break
    return batches
