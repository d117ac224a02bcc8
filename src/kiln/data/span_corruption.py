"""T5's span corruption objective, and its BART-style variant that reconstructs the whole row."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from kiln.data.objective_base import (
    Batch,
    Layout,
    Objective,
    encoder_decoder_batch,
    tokenizer_error,
    valid_special,
)
from kiln.errors import KilnError


@dataclasses.dataclass(frozen=True)
class SpanCorruption(Objective):
    """T5 span corruption; each packed row of raw tokens is one example.

    The row's real tokens (documents keep their eos; segment boundaries are dropped, as in T5)
    get a noise mask of ``round(n * noise_density)`` tokens in ``round(noise / mean_span)``
    spans (both clipped to at least 1 and to what fits), placed by T5's random segmentation:
    noise and non-noise lengths are uniform random compositions, interleaved starting with
    non-noise. ``encoder_inputs`` are the non-noise tokens with each span replaced by the next
    sentinel (``<extra_id_0>``, ``<extra_id_1>``, ...) then eos; ``targets`` are each sentinel
    followed by its span, then eos. The decoder starts with ``bos_id`` (T5 uses pad id 0, which
    is kiln's padding token): ``decoder_inputs`` are the targets shifted right after ``bos_id``.

    Lengths follow T5: :meth:`packed_length` is the largest raw length whose inputs (with eos)
    fit in ``seq_len`` tokens (with T5's settings they fill it exactly); ``targets_length`` is
    the matching target length. Segment ids are 1 on real tokens and 0 on padding; positions
    count from 0 on real tokens and are 0 on padding; weights are 1 on real targets.
    """

    name: ClassVar[str] = "span_corruption"
    layout: ClassVar[Layout] = Layout.ENCODER_DECODER
    seq_len: int
    sentinel_ids: tuple[int, ...]
    bos_id: int
    eos_id: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    targets_length: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        length = self.packed_length(self.seq_len)
        object.__setattr__(self, "targets_length", self.corrupted_lengths(length)[1])

    def span_counts(self, n: int) -> tuple[int, int]:
        """(noise tokens, noise spans) for a row of ``n`` real tokens."""
        if n < 2:
            return 0, 0
        noise = min(max(round(n * self.noise_density), 1), n - 1)
        spans = min(max(round(noise / self.mean_noise_span_length), 1), noise, n - noise)
        return noise, spans

    def corrupted_lengths(self, n: int) -> tuple[int, int]:
        """(encoder inputs, targets) lengths, eos included, for ``n`` real raw tokens."""
        if n == 0:
            return 0, 0
        noise, spans = self.span_counts(n)
        return n - noise + spans + 1, noise + spans + 1

    def packed_length(self, seq_len: int) -> int:
        n = seq_len - 1  # Inputs of n tokens have at most n + 1 tokens: these always fit.
        while self.corrupted_lengths(n + 1)[0] <= seq_len:
            n += 1
        return n

    def __call__(self, batch: Batch, rng: np.random.Generator | None) -> Batch:
        tokens = np.asarray(batch["tokens"], dtype=np.int32)
        real_lengths = (np.asarray(batch["segment_ids"]) != 0).sum(axis=1)
        rows = len(tokens)
        inputs = np.zeros((rows, self.corrupted_lengths(tokens.shape[1])[0]), np.int32)
        targets = np.zeros((rows, self.corrupted_lengths(tokens.shape[1])[1]), np.int32)
        lengths = np.zeros((rows, 2), np.int64)
        for n in np.unique(real_lengths):  # Rows of equal length at once (training: all full).
            group = np.flatnonzero(real_lengths == n)
            x, y = self._corrupt(tokens[group, :n], rng)
            inputs[group, : x.shape[1]] = x
            targets[group, : y.shape[1]] = y
            lengths[group] = x.shape[1], y.shape[1]
        return encoder_decoder_batch(inputs, lengths[:, 0], targets, lengths[:, 1], self.bos_id)

    def _corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Corrupts ``[R, n]`` rows of real tokens into ``[R, *]`` inputs and targets."""
        rows, n = tokens.shape
        if n == 0:
            return tokens, tokens
        eos = np.full((rows, 1), self.eos_id, np.int32)
        noise, spans = self.span_counts(n)
        if spans == 0:
            return np.concatenate([tokens, eos], axis=1), eos
        kept_lengths = _random_compositions(rows, n - noise, spans, rng)
        noise_lengths = _random_compositions(rows, noise, spans, rng)
        # Non-noise span i, then noise span i: the noise state toggles at each span boundary.
        ends = np.cumsum(np.stack([kept_lengths, noise_lengths], axis=2).reshape(rows, -1), axis=1)
        toggles = np.zeros((rows, n), np.int32)
        np.put_along_axis(toggles, ends[:, :-1], 1, axis=1)
        is_noise = np.cumsum(toggles, axis=1) % 2 == 1
        after_noise = np.zeros_like(is_noise)
        after_noise[:, 1:] = is_noise[:, :-1]
        noise_start = is_noise & ~after_noise
        kept_start = ~is_noise & after_noise
        kept_start[:, 0] = True
        sentinels = np.asarray(self.sentinel_ids, np.int32)

        def replace_spans(starts: np.ndarray, keep: np.ndarray) -> np.ndarray:
            """Each span that ``starts`` marks -> the next sentinel; then the ``keep`` tokens."""
            values = np.where(starts, sentinels[np.cumsum(starts, axis=1) - 1], tokens)
            return values[keep].reshape(rows, -1)

        inputs = replace_spans(noise_start, ~is_noise | noise_start)
        targets = replace_spans(kept_start, is_noise | kept_start)
        return np.concatenate([inputs, eos], axis=1), np.concatenate([targets, eos], axis=1)


@dataclasses.dataclass(frozen=True)
class Denoising(SpanCorruption):
    """BART's text infilling on T5's spans: the encoder inputs are span corruption's (each noise
    span replaced by a sentinel, then eos); the targets are the whole row of real tokens, then
    eos. Span corruption's decoder only ever writes the dropped spans; this one also copies
    everything it was shown, which tasks whose output mostly repeats the input (kjv2web) need.
    """

    name: ClassVar[str] = "denoise"

    def corrupted_lengths(self, n: int) -> tuple[int, int]:
        """(encoder inputs, targets) lengths, eos included: the targets are the row + eos."""
        return super().corrupted_lengths(n)[0], n + 1 if n else 0

    def _corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        inputs, _ = super()._corrupt(tokens, rng)
        eos = np.full((tokens.shape[0], 1), self.eos_id, np.int32)
        return inputs, np.concatenate([tokens, eos], axis=1)


def _random_compositions(rows: int, total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, parts]`` positive lengths summing to ``total``, uniform over compositions.

    The ``parts - 1`` cut points are a uniform random subset of ``1 .. total-1``.
    """
    if parts == 1:
        return np.full((rows, 1), total)
    keys = rng.random((rows, total - 1))
    cuts = np.sort(np.argpartition(keys, parts - 2, axis=1)[:, : parts - 1], axis=1) + 1
    bounds = np.concatenate([np.zeros((rows, 1), int), cuts, np.full((rows, 1), total)], axis=1)
    return np.diff(bounds, axis=1)


def span_corruption(
    tokenizer: Any,
    seq_len: int,
    noise_density: float,
    mean_noise_span_length: float,
    kind: type[SpanCorruption] = SpanCorruption,
) -> SpanCorruption:
    """T5's span corruption (or `kind`, e.g. `Denoising`; rates checked by `check_options`),
    checked to fit one span per row and the tokenizer's sentinels."""
    sentinels = _sentinel_ids(tokenizer, kind.name)
    objective = kind(
        seq_len=seq_len,
        sentinel_ids=sentinels,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    if not _fits_a_span(objective, seq_len):
        minimum = next(s for s in range(seq_len + 1, 1 << 30) if _fits_a_span(objective, s))
        raise KilnError(
            f"data.seq_len={seq_len} is too short for span corruption with objective."
            f"noise_density={noise_density} and objective.mean_noise_span_length="
            f"{mean_noise_span_length}: a row must hold one noise span and its sentinel. Set"
            f" data.seq_len >= {minimum}."
        )
    spans = objective.span_counts(objective.packed_length(seq_len))[1]
    if spans > len(sentinels):
        low, high = 2, seq_len  # Binary search for the longest seq_len that fits the sentinels.
        while low < high:
            mid = (low + high + 1) // 2
            fits = objective.span_counts(objective.packed_length(mid))[1] <= len(sentinels)
            low, high = (mid, high) if fits else (low, mid - 1)
        raise KilnError(
            f"data.seq_len={seq_len} needs {spans} noise spans per row but the tokenizer has"
            f" {len(sentinels)} sentinels: set data.seq_len <= {low} or raise"
            f" objective.mean_noise_span_length={mean_noise_span_length}."
        )
    return objective


def _fits_a_span(objective: SpanCorruption, seq_len: int) -> bool:
    """Whether full rows have a noise span by T5's counts (unclipped: then lengths match T5's)."""
    n = objective.packed_length(seq_len)
    noise = round(n * objective.noise_density)
    return 1 <= noise < n and round(noise / objective.mean_noise_span_length) >= 1


def _sentinel_ids(tokenizer: Any, name: str) -> tuple[int, ...]:
    ids = tuple(getattr(tokenizer, "sentinel_ids", ()))
    if not ids or not all(
        valid_special(tokenizer, t, f"<extra_id_{i}>") for i, t in enumerate(ids)
    ):
        raise tokenizer_error(tokenizer, name, "sentinel tokens <extra_id_0>, <extra_id_1>, ...")
    return tuple(int(t) for t in ids)
