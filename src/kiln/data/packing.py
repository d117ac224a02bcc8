"""Greedy packing of unpadded decoder rows (whole examples) into rows of ``seq_len``, as a
grain dataset whose iterator state is its parent's (resumable)."""

from __future__ import annotations

import copy

import grain
import numpy as np

Row = dict[str, np.ndarray]


def pack(compacts: list[Row], seq_len: int) -> Row:
    """Unpadded decoder rows of whole examples, one after the other, as one padded row."""
    row = {key: np.zeros(seq_len, np.int32) for key in ("inputs", "targets", "segment_ids")}
    row["positions"] = np.zeros(seq_len, np.int32)
    row["weights"] = np.zeros(seq_len, np.float32)
    start = 0
    for segment, compact in enumerate(compacts, start=1):
        end = start + len(compact["inputs"])
        for key in ("inputs", "targets", "weights"):
            row[key][start:end] = compact[key]
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(end - start)
        start = end
    return row


class PackIterator(grain.DatasetIterator):
    """Greedy next-fit packing; holds back the one example that did not fit in the last row.

    Its state is the parent's state from before that example was read, so a restored iterator
    reads it again: the state is the parent's, nothing else.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pending: Row | None = None
        self._pending_state: dict | None = None

    def __next__(self) -> Row:
        row: list[Row] = []
        used = 0
        while True:
            if self._pending is None:
                state = self._parent.get_state()
                try:
                    self._pending = next(self._parent)
                except StopIteration:
                    if row:
                        return pack(row, self._seq_len)
                    raise
                self._pending_state = state
            length = len(self._pending["inputs"])
            if row and used + length > self._seq_len:
                return pack(row, self._seq_len)
            row.append(self._pending)
            used += length
            self._pending = None

    def get_state(self) -> dict:
        if self._pending is None:
            return self._parent.get_state()
        return copy.deepcopy(self._pending_state)

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)
        self._pending = self._pending_state = None


class PackIterDataset(grain.IterDataset):
    """Packs unpadded decoder rows (each at most ``seq_len`` long) into rows of ``seq_len``."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._seq_len)
