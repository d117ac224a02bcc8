"""Measuring the data order: a stand-in tokenizer naming each token's place in the corpus, and
the fraction of rows that continue a row of the previous batch (`benchmarks/data_order.py`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from kiln.data.tokenizer import NUM_SPECIAL_IDS, Tokenizer

Batch = dict[str, np.ndarray]


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
