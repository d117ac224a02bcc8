"""Language-model objectives: causal LM, and prefix LM for decoders and encoder-decoders."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from kiln.data.objective_base import Batch, Layout, Objective, causal_lm, encoder_decoder_batch


@dataclasses.dataclass(frozen=True)
class CausalLM(Objective):
    """GPT next-token prediction: :func:`causal_lm`; ignores the rng."""

    name: ClassVar[str] = "causal_lm"
    layout: ClassVar[Layout] = Layout.DECODER
    uses_rng: ClassVar[bool] = False

    def __call__(self, batch: Batch, rng: np.random.Generator | None = None) -> Batch:
        return causal_lm(batch)


@dataclasses.dataclass(frozen=True)
class PrefixLM(Objective):
    """Decoder prefix LM, per document segment of each packed row.

    A segment of ``m >= 2`` tokens is split after ``p`` tokens, ``p`` uniform in ``1 .. m-1``; a
    1-token segment is all prefix. ``prefix_mask`` is 1 on the prefix (attended bidirectionally
    by the model), and the loss is only on predicting continuation tokens: ``targets[t]`` is the
    next token and ``weights[t] = 1`` iff token ``t + 1`` is a continuation token of ``t``'s
    segment (so the last prefix token predicts the first continuation token).
    """

    name: ClassVar[str] = "prefix_lm"
    layout: ClassVar[Layout] = Layout.DECODER

    def __call__(self, batch: Batch, rng: np.random.Generator | None) -> Batch:
        out = causal_lm(batch)
        segment_ids = out["segment_ids"]
        run, offset, lengths = _segment_runs(segment_ids)
        split = rng.integers(1, np.maximum(lengths, 2))  # Prefix length of each segment.
        prefix = (segment_ids != 0) & (offset < split[run])
        out["weights"][:, :-1] *= ~prefix[:, 1:]
        out["prefix_mask"] = prefix.astype(np.int32)
        return out


@dataclasses.dataclass(frozen=True)
class EncoderDecoderPrefixLM(Objective):
    """T5 prefix LM: each packed row of ``seq_len`` raw tokens is one example.

    The row's ``n`` real tokens are split after ``s`` tokens, ``s`` uniform in the middle half
    ``ceil(n/4) .. floor(3n/4)`` (clipped to ``1 .. n-1``): the prefix is the encoder input, the
    continuation the targets, both padded to ``seq_len`` (so ``targets_length == seq_len``); no
    eos is added (the row is cut mid-text), so non-padding encoder inputs followed by
    non-padding targets are the raw row. Decoder inputs, segment ids, positions and weights are
    as in :class:`SpanCorruption`.
    """

    name: ClassVar[str] = "prefix_lm"
    layout: ClassVar[Layout] = Layout.ENCODER_DECODER
    seq_len: int
    bos_id: int

    @property
    def targets_length(self) -> int:
        return self.seq_len

    def __call__(self, batch: Batch, rng: np.random.Generator | None) -> Batch:
        tokens = np.asarray(batch["tokens"], dtype=np.int32)
        n = (np.asarray(batch["segment_ids"]) != 0).sum(axis=1)
        low = np.maximum((n + 3) // 4, 1)
        high = np.maximum(np.minimum(3 * n // 4, n - 1), low)
        split = np.minimum(rng.integers(low, high + 1), n)  # n = 0: an empty example.
        column = np.arange(tokens.shape[1])
        inputs = np.where(column < split[:, None], tokens, 0)
        source = column + split[:, None]
        taken = np.take_along_axis(tokens, np.minimum(source, tokens.shape[1] - 1), axis=1)
        targets = np.where(source < n[:, None], taken, 0)
        return encoder_decoder_batch(inputs, split, targets, n - split, self.bos_id)


def _segment_runs(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal segment ids within rows (padding is one run).

    Returns:
        ``[B, L]`` run index of each token (over the flattened batch), ``[B, L]`` offset of each
        token in its run, and the ``[runs]`` run lengths.
    """
    starts = np.ones(segment_ids.shape, bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat = starts.reshape(-1)
    run = np.cumsum(flat) - 1
    first = np.flatnonzero(flat)
    lengths = np.diff(np.append(first, flat.size))
    offset = np.arange(flat.size) - first[run]
    return run.reshape(segment_ids.shape), offset.reshape(segment_ids.shape), lengths
