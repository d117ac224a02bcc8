"""Grain input pipelines: tokenize, pack into fixed-length rows, batch, apply an objective."""

from __future__ import annotations

import functools
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


def _packed(documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int) -> grain.IterDataset:
    """Tokenized ``[bos] + ids + [eos]`` documents, concatenated and split into rows."""
    if seq_len < 2:
        raise KilnError(f"data.seq_len={seq_len} is too small: use at least 2 (e.g. 512).")
    ds = documents.map(functools.partial(_encode, tokenizer=tokenizer))
    ds = ds.to_iter_dataset(_READ_OPTIONS)
    return _PackedIterDataset(ds, seq_len)


def _objective_for(objective: Objective | None, seq_len: int) -> Objective:
    """``objective``, or causal LM for None; checks it was built for ``seq_len``."""
    built_for = getattr(objective, "seq_len", seq_len)
    if built_for != seq_len:
        raise ValueError(f"The objective was built for seq_len={built_for}, not {seq_len}.")
    return objective or CausalLM()


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
    shard_by_process: bool = False,
) -> grain.IterDataset:
    """An endless, shuffled, packed training stream: this process's rows of each global batch.

    Documents are shuffled with ``seed`` (reshuffled every epoch), encoded as ``[bos] + ids +
    [eos]``, concatenated and split into rows of ``seq_len`` tokens (a document that does not fit
    continues in the next row; ``segment_ids`` start at 1 in each row, ``positions`` restart at
    each segment), batched into global batches and passed through ``objective`` (default
    :class:`~kiln.data.objectives.CausalLM`; rows hold ``objective.packed_length(seq_len)`` raw
    tokens). Each process keeps its :func:`process_slice` of every global batch.

    A random objective gets a generator that grain derives from ``seed`` and the batch's index
    in the stream, which is part of the iterator state: masks are the same on every process and
    after a restore.

    Every process tokenizes and packs the whole global batch, so the data order is independent
    of the number of processes (a run can resume on a different topology) at the cost of
    ``process_count`` times redundant CPU work, which is small next to a train step. With
    ``shard_by_process``, process i reads only documents i, i + n, ... of each shuffled epoch
    and packs its own ``global_batch_size / n`` rows (objective rng mixed with i): no redundant
    work, but the data order then depends on the process count.

    Its iterators support ``get_state()``/``set_state()`` (``grain.checkpoint.CheckpointSave``).

    Raises:
        KilnError: On no documents, a bad sequence length or a batch size that the processes
            cannot split evenly.
    """
    if not documents:
        raise KilnError("No training documents: check the data source of this run.")
    process_slice({"rows": np.zeros(global_batch_size)}, process_index, process_count)  # Checks.
    # grain shuffles epoch e with seed + e: mix the seed so that nearby seeds share no epochs.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = grain.MapDataset.source(documents).shuffle(seed=shuffle_seed)
    rows, shard = global_batch_size, shard_by_process and process_count > 1
    if shard:
        if len(documents) < process_count:
            raise KilnError(
                f"data.shard_by_process: {len(documents)} training documents cannot be shared by"
                f" {process_count} processes; turn it off."
            )
        ds, rows = ds[process_index::process_count], global_batch_size // process_count
    objective = _objective_for(objective, seq_len)
    ds = _packed(ds.repeat(), tokenizer, objective.packed_length(seq_len))
    ds = ds.batch(rows, drop_remainder=True)
    if objective.uses_rng:
        objective_seed = int(np.random.SeedSequence(seed).generate_state(2)[1])
        if shard:
            objective_seed = int(
                np.random.SeedSequence([objective_seed, process_index]).generate_state(1)[0]
            )
        ds = ds.random_map(objective, seed=objective_seed)
    else:  # No rng, and the iterator state keeps the layout it had before objectives.
        ds = ds.map(functools.partial(objective, rng=None))
    if shard:
        return ds
    keep = functools.partial(process_slice, index=process_index, count=process_count)
    return ds.map(keep)


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
