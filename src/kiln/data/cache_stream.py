"""Packing streams read from a token cache in memory that does not grow with the corpus.

A stream's documents are consecutive documents of a few cache shards (:class:`TokenRange`).
Why it is built this way: the in-memory stream (`kiln.data.pipeline`) re-orders its documents
every epoch, which needs each document's length and start in memory (~37 bytes per document,
0.35 GB for a 2 GB corpus). Here a stream keeps its documents in cache order and only the cut
moves: epoch ``e`` cuts rows of ``L`` tokens starting at a random shift, and serves them in a
random order computed per row (`grain.experimental.index_shuffle`, a keyed bijection, so no
permutation array is held). Tokens and document starts are read on use with ``os.pread``; the
only index held in memory is every ``SPARSE``-th document start. Packed rows attend within
their documents (segment ids), so which documents share a row matters little; what the
order must avoid, consecutive rows of a document in consecutive steps, the row shuffle does.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from grain.experimental import index_shuffle

from kiln.data.tokenized import rows_that_fit

Batch = dict[str, np.ndarray]
SPARSE = 1024  # documents per entry of a stream's in-memory index of document starts
_ROUNDS = 4  # rounds of index_shuffle's cipher


class Concat:
    """Token-file ranges read as one array, indexed by an int array: each run of consecutive
    places is one ``os.pread``, so only the bytes asked for are read and nothing stays mapped (a
    memory map's read-around would keep megabytes resident per batch, growing toward the
    corpus size). ``ranges`` are (path, first token, tokens); ``tokens`` None reads to the end."""

    def __init__(self, ranges: list[tuple[pathlib.Path, int, int | None]], dtype: str):
        self.dtype = np.dtype(dtype)
        size = self.dtype.itemsize
        kept = []
        for path, first, count in ranges:
            count = path.stat().st_size // size - first if count is None else count
            if count:
                kept.append((path, first, count))
        self.fds = [os.open(p, os.O_RDONLY) for p, _, _ in kept]
        self.firsts = [first for _, first, _ in kept]
        self.bounds = np.cumsum([0] + [count for _, _, count in kept])

    def __del__(self, close=os.close) -> None:  # `os` may be gone at interpreter exit
        for fd in getattr(self, "fds", []):
            close(fd)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, place: np.ndarray) -> np.ndarray:
        place = np.asarray(place, np.int64)
        flat = place.reshape(-1)
        out = np.zeros(flat.shape, self.dtype)
        if not flat.size:
            return out.reshape(place.shape)
        which = np.searchsorted(self.bounds, flat, side="right") - 1
        cuts = np.flatnonzero((np.diff(flat) != 1) | (np.diff(which) != 0)) + 1
        size = self.dtype.itemsize
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), flat.size], strict=True):
            f = int(which[a])
            at = (self.firsts[f] + int(flat[a] - self.bounds[f])) * size
            out[a:b] = np.frombuffer(os.pread(self.fds[f], (b - a) * size, at), self.dtype)
        return out.reshape(place.shape)


class TokenRange:
    """Documents ``first .. stop - 1`` of each of some shards' ``(stem, first, stop)``, one
    after another, as one token sequence (``<stem>.tokens`` and ``<stem>.offsets`` files).

    Holds every ``SPARSE``-th document start of each range; :meth:`starts_in` reads the rest
    on demand. Each range's first document starts at a range boundary of the sequence.
    """

    def __init__(self, ranges: list[tuple[pathlib.Path, int, int]], dtype: str):
        self.offset_fds, token_ranges, base = [], [], 0
        index_start, index_range, index_doc = [], [], []
        for k, (stem, first, stop) in enumerate(ranges):
            offsets = np.memmap(f"{stem}.offsets", np.int64, mode="r")
            begin, end = int(offsets[first]), int(offsets[stop])
            sampled = np.arange(first, stop, SPARSE)
            index_start.append(base + np.asarray(offsets[sampled]) - begin)
            index_range.append(np.full(len(sampled), k))
            index_doc.append(sampled)
            del offsets
            self.offset_fds.append(os.open(f"{stem}.offsets", os.O_RDONLY))
            token_ranges.append((pathlib.Path(f"{stem}.tokens"), begin, end - begin))
            base += end - begin
        self.ranges = [(first, stop) for _, first, stop in ranges]
        self.tokens = Concat(token_ranges, dtype)
        self.total = base
        self.index_start = np.concatenate(index_start or [np.zeros(0, np.int64)])
        self.index_range = np.concatenate(index_range or [np.zeros(0, np.int64)])
        self.index_doc = np.concatenate(index_doc or [np.zeros(0, np.int64)])

    def __del__(self, close=os.close) -> None:
        for fd in getattr(self, "offset_fds", []):
            close(fd)

    def __len__(self) -> int:
        return sum(stop - first for first, stop in self.ranges)

    def _block(self, i: int) -> np.ndarray:
        """The starts (in the sequence) of the documents of index entry ``i``'s block."""
        k, doc = int(self.index_range[i]), int(self.index_doc[i])
        count = min(SPARSE, self.ranges[k][1] - doc)
        offsets = np.frombuffer(os.pread(self.offset_fds[k], count * 8, doc * 8), np.int64)
        return self.index_start[i] + offsets - offsets[0]

    def starts_in(self, begin: int, end: int) -> np.ndarray:
        """The document starts ``s`` with ``begin < s < end``, increasing."""
        i = max(int(np.searchsorted(self.index_start, begin, side="right")) - 1, 0)
        blocks = []
        while i < len(self.index_start) and self.index_start[i] < end:
            blocks.append(self._block(i))
            i += 1
        starts = np.concatenate(blocks or [np.zeros(0, np.int64)])
        return starts[(starts > begin) & (starts < end)]

    def row(self, begin: int, length: int) -> Batch:
        """Tokens ``begin .. begin + length - 1`` with segment ids (from 1, one per document in
        the row) and positions (restarting at each document, and at the row's start)."""
        where = begin + np.arange(length)
        starts = np.concatenate([[begin], self.starts_in(begin, begin + length)])
        segment = np.searchsorted(starts, where, side="right")
        return {
            "tokens": self.tokens[where].astype(np.int32),
            "segment_ids": segment.astype(np.int32),
            "positions": (where - starts[segment - 1]).astype(np.int32),
        }


class CacheStream:
    """A packing stream over a :class:`TokenRange`, with the in-memory stream's interface.

    Epoch ``e`` cuts ``R`` rows of ``row_len`` tokens from the sequence, starting at a shift
    drawn from (``seed``, e) (R is one row fewer than fits, when two or more fit, so the shift
    has a row's room); stream row ``j`` is row ``index_shuffle(j % R)`` of epoch ``j // R``.
    """

    def __init__(self, docs: TokenRange, row_len: int, seed: list[int], name: str):
        self.docs, self.row_len, self.seed = docs, row_len, seed
        fit = rows_that_fit(docs.total, row_len, name)
        self.rows_per_epoch = fit if fit < 2 else fit - 1
        self.slack = docs.total - self.rows_per_epoch * row_len

    def epoch_cut(self, epoch: int) -> tuple[int, int]:
        """(shift, shuffle key) of an epoch."""
        rng = np.random.default_rng([*self.seed, epoch])
        return int(rng.integers(self.slack + 1)), int(rng.integers(2**31))

    def rows(self, index: np.ndarray) -> Batch:
        """The stream's rows ``index``, in that order."""
        rows, cuts = [], {}
        for j in np.asarray(index).tolist():
            epoch, k = divmod(j, self.rows_per_epoch)
            if epoch not in cuts:
                cuts[epoch] = self.epoch_cut(epoch)
            shift, key = cuts[epoch]
            r = index_shuffle(k, max_index=self.rows_per_epoch - 1, seed=key, rounds=_ROUNDS)
            rows.append(self.docs.row(shift + r * self.row_len, self.row_len))
        if not rows:
            empty = np.zeros((0, self.row_len), np.int32)
            return {"tokens": empty, "segment_ids": empty, "positions": empty}
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
