"""Tokenized documents (one flat token array cut at document starts), packed into fixed-length
rows with segment ids and positions."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np

from kiln.data import tokenizer as tokenizer_lib
from kiln.data.tokenizer import Tokenizer
from kiln.errors import KilnError

Batch = dict[str, np.ndarray]
_ENCODE_CHUNK = 1024  # documents per tokenizer call: bounds the Python lists alive at once


def rows_that_fit(total: int, row_len: int, name: str) -> int:
    """How many rows of ``row_len`` tokens ``total`` tokens fill; an error naming the packing
    stream ``name`` if not even one."""
    if total < row_len:
        raise KilnError(
            f"{name} holds {total} tokens, less than one row of {row_len}: add training text,"
            " lower data.seq_len, or lower data.streams."
        )
    return total // row_len


class Tokenized:
    """Documents tokenized as ``[bos] + ids + [eos]`` (``[CLS]``/``[SEP]`` for a tokenizer without
    bos/eos, `tokenizer.document_ids`), one flat int32 array.

    Document ``d`` is ``tokens[offsets[d] : offsets[d] + starts[d + 1] - starts[d]]``:
    ``starts`` places the documents in their concatenation, ``offsets`` in ``tokens`` (the same
    but for a :meth:`select` view, which shares its parent's ``tokens``).
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
        self.tokens: Any = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.offsets = self.starts[:-1]

    @classmethod
    def from_arrays(cls, tokens: Any, starts: np.ndarray) -> Tokenized:
        """Documents already tokenized: ``tokens`` (an array, or anything indexable by an int
        array with a length, e.g. a memory-mapped token cache) cut at ``starts``."""
        docs = cls.__new__(cls)
        docs.tokens, docs.starts = tokens, np.asarray(starts, np.int64)
        docs.offsets = docs.starts[:-1]
        return docs

    def select(self, ids: np.ndarray) -> Tokenized:
        """Documents ``ids``, in that order, as a view: no token is copied or read."""
        ids = np.asarray(ids, np.int64)
        view = Tokenized.from_arrays(self.tokens, np.zeros(1, np.int64))
        view.starts = np.concatenate([[0], np.cumsum(np.diff(self.starts)[ids])])
        view.offsets = self.offsets[ids]
        return view

    @property
    def total(self) -> int:
        """Tokens in all the documents."""
        return int(self.starts[-1])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def ends(self, order: np.ndarray) -> np.ndarray:
        """Where each document of ``order`` ends in their concatenation (for :meth:`pack`)."""
        return np.cumsum(np.diff(self.starts)[order])

    def pack(
        self, order: np.ndarray, rows: np.ndarray, row_len: int, ends: np.ndarray | None = None
    ) -> Batch:
        """Rows ``rows`` of documents ``order`` concatenated and cut into ``row_len`` tokens.

        Segment ids count the documents in a row from 1; positions restart at 0 at each
        segment (also where a document continues from the previous row). Tokens past the end
        of the concatenation are padding: token 0, segment 0, position 0. ``ends`` is
        ``self.ends(order)``, computed once per order by callers that pack it repeatedly: the
        rest of the work grows with the rows packed, not with the documents.
        """
        ends = self.ends(order) if ends is None else ends
        where = rows[:, None] * row_len + np.arange(row_len)  # [R, L] places in the concatenation
        doc = np.searchsorted(ends, where, side="right")
        real = doc < len(order)
        doc = np.minimum(doc, len(order) - 1)
        ids = order[doc]
        begins = ends[doc] - (self.starts[ids + 1] - self.starts[ids])
        start = np.maximum(begins, rows[:, None] * row_len)  # segment start within the row
        place = np.minimum(self.offsets[ids] + where - begins, len(self.tokens) - 1)
        tokens = np.asarray(self.tokens[place])
        return {
            "tokens": np.where(real, tokens, 0).astype(np.int32),
            "segment_ids": np.where(real, doc - doc[:, :1] + 1, 0).astype(np.int32),
            "positions": np.where(real, where - start, 0).astype(np.int32),
        }
