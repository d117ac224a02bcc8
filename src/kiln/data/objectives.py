"""Pre-training objectives: pure NumPy transforms of packed batches.

An objective takes a packed batch (``tokens``, ``segment_ids``, ``positions``: ``[B, L]`` int32,
``segment_ids`` from 1 in each row and 0 for padding, padding only at the end of a row) and a
``np.random.Generator``, and returns the model's keyword arguments plus ``targets`` and float32
loss ``weights`` (every other array int32, all ``[B, length]``):

- ``gpt`` (decoder), ``causal_lm``: ``inputs, segment_ids, positions, targets, weights``;
- ``gpt`` (decoder), ``prefix_lm``: the same plus ``prefix_mask``;
- ``bert`` (encoder), ``mlm``: ``inputs, segment_ids, positions, targets, weights``;
- ``t5`` (encoder-decoder), ``span_corruption`` and ``prefix_lm``: ``encoder_inputs,
  encoder_segment_ids, encoder_positions`` (``[B, seq_len]``) and ``decoder_inputs,
  decoder_segment_ids, decoder_positions, targets, weights`` (``[B, targets length]``).

Build one with :func:`make_objective`; the pipeline packs rows of
``objective.packed_length(seq_len)`` raw tokens and calls ``objective(batch, rng)``. The
transforms never modify their input.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Any, ClassVar

import numpy as np

from kiln.data import tokenizer as tokenizer_lib
from kiln.data.tokenizer import NUM_SPECIAL_IDS
from kiln.errors import KilnError

Batch = dict[str, np.ndarray]


class Layout(enum.StrEnum):
    """How a model takes its inputs. Data code branches on the layout, never on a family's
    name: a new family with an existing layout needs no change here."""

    ENCODER = "encoder"  # bidirectional over `inputs`: classifies by pooling, cannot generate
    DECODER = "decoder"  # causal over `inputs`: generates, classifies by pooling
    ENCODER_DECODER = "encoder_decoder"  # `encoder_inputs` -> `decoder_inputs`: text to text


# layout -> its valid objective.name values (the first is the default).
OBJECTIVES = {
    Layout.DECODER: ("causal_lm", "prefix_lm"),
    Layout.ENCODER: ("mlm",),
    Layout.ENCODER_DECODER: ("span_corruption", "prefix_lm"),
}
WORD_START = "\u2581"  # SentencePiece's space marker: a piece starting with it begins a word.
BYTE_LEVEL_SPACE = "\u0120"  # Byte-level BPE's (GPT-2's) space marker, the same role.
WORDPIECE_CONTINUES = "##"  # WordPiece's mark of a piece that continues a word.


def as_layout(layout: str) -> Layout:
    """``layout`` as a :class:`Layout`; a KilnError listing the layouts if it is none."""
    if layout not in set(Layout):
        raise KilnError(f"Unknown model layout {layout!r}: use one of {[str(x) for x in Layout]}.")
    return Layout(layout)


def causal_lm(batch: Batch) -> Batch:
    """Next-token prediction over packed documents.

    ``targets[:, t] = tokens[:, t + 1]`` (last column 0). A position has weight 1 only if the
    next token exists and belongs to the same non-padding segment, so the loss never crosses a
    document boundary or predicts padding.
    """
    tokens = np.asarray(batch["tokens"], dtype=np.int32)
    segment_ids = np.asarray(batch["segment_ids"], dtype=np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.zeros(tokens.shape, dtype=np.float32)
    same = (segment_ids[:, :-1] != 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
    weights[:, :-1] = same
    return {
        "inputs": tokens,
        "targets": targets,
        "weights": weights,
        "segment_ids": segment_ids,
        "positions": np.asarray(batch["positions"], dtype=np.int32),
    }


class Objective(abc.ABC):
    """A pre-training objective: a random transform of packed batches.

    Attributes:
        name: The ``objective.name`` it implements.
        layout: the :class:`Layout` of the model the batches are for.
        uses_rng: False if the transform ignores its rng (the pipeline then maps it without one).
    """

    name: ClassVar[str]
    layout: ClassVar[Layout]
    uses_rng: ClassVar[bool] = True

    def packed_length(self, seq_len: int) -> int:
        """Raw tokens per packed row that the objective needs to produce rows of ``seq_len``."""
        return seq_len

    @abc.abstractmethod
    def __call__(self, batch: Batch, rng: np.random.Generator | None) -> Batch:
        """Transforms a packed batch (see the module docstring)."""


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


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedLM(Objective):
    """BERT masked LM.

    Only ordinary tokens (``ordinary``: ids without a special role; by default kiln's layout,
    ids ``>= NUM_SPECIAL_IDS``; never padding) can be selected. Per row,
    exactly ``round(mask_rate * candidates)`` of them are selected uniformly; with ``word_start``
    (whole-word masking) each word is instead selected with probability ``mask_rate``, so the
    expected fraction of selected tokens is still ``mask_rate``. A word starts at a piece that
    begins with ``▁`` or follows a non-candidate (segment start, special token); continuation
    pieces belong to the previous word. Each selected token independently becomes ``mask_id``
    (``mask_token_fraction``), a uniform ordinary token (``random_token_fraction``) or stays.
    Token masking (a known count per row) gives the selected positions as ``predict_positions``
    [B, C] (C = round(mask_rate * L), ascending, padded with 0), their original tokens as
    ``targets`` and ``weights`` 1 (0 on padding), so the model predicts at those C positions
    only; whole-word masking gives ``targets`` (the original tokens) and ``weights`` (1 exactly
    on the selected tokens) at every position [B, L].
    """

    name: ClassVar[str] = "mlm"
    layout: ClassVar[Layout] = Layout.ENCODER
    mask_id: int
    vocab_size: int
    mask_rate: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    word_start: np.ndarray | None = None  # [vocab_size] bool: piece begins a word; None: tokens.
    ordinary: np.ndarray | None = None  # [vocab_size] bool: maskable ids; None: kiln's layout.

    def _ordinary(self) -> np.ndarray:
        if self.ordinary is not None:
            return self.ordinary
        return np.arange(self.vocab_size) >= NUM_SPECIAL_IDS

    def __call__(self, batch: Batch, rng: np.random.Generator | None) -> Batch:
        tokens = np.asarray(batch["tokens"], dtype=np.int32)
        segment_ids = np.asarray(batch["segment_ids"], dtype=np.int32)
        ordinary = self._ordinary()
        candidate = ordinary[tokens] & (segment_ids != 0)
        if self.word_start is None:
            selected = _select_exactly(candidate, self.mask_rate, rng)
        else:
            selected = self._select_words(tokens, segment_ids, candidate, rng)
        u = rng.random(tokens.shape)
        to_mask = selected & (u < self.mask_token_fraction)
        to_random = (
            selected & ~to_mask & (u < self.mask_token_fraction + self.random_token_fraction)
        )
        ordinary_ids = np.flatnonzero(ordinary).astype(np.int32)
        random_tokens = ordinary_ids[rng.integers(0, len(ordinary_ids), tokens.shape, np.int32)]
        inputs = np.where(
            to_mask, np.int32(self.mask_id), np.where(to_random, random_tokens, tokens)
        )
        out = {
            "inputs": inputs.astype(np.int32),
            "segment_ids": segment_ids,
            "positions": np.asarray(batch["positions"], dtype=np.int32),
        }
        if self.word_start is None:  # At most round(mask_rate * L) per row: a static count.
            cap = max(1, int(np.rint(self.mask_rate * tokens.shape[1])))
            return {**out, **_predictions(tokens, selected, cap)}
        return {**out, "targets": tokens, "weights": selected.astype(np.float32)}

    def _select_words(
        self,
        tokens: np.ndarray,
        segment_ids: np.ndarray,
        candidate: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        continues = np.zeros_like(candidate)  # Candidate whose predecessor is one, same segment.
        continues[:, 1:] = candidate[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1])
        starts = candidate & (self.word_start[tokens] | ~continues)
        word = np.cumsum(starts.reshape(-1)).reshape(tokens.shape) - 1
        chosen = rng.random(int(starts.sum())) < self.mask_rate
        return candidate & chosen[np.maximum(word, 0)] if chosen.size else np.zeros_like(candidate)


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
        return _encoder_decoder_batch(inputs, lengths[:, 0], targets, lengths[:, 1], self.bos_id)

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
        return _encoder_decoder_batch(inputs, split, targets, n - split, self.bos_id)


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


def _predictions(tokens: np.ndarray, selected: np.ndarray, cap: int) -> Batch:
    """The selected positions of each row, ascending, padded to ``cap`` (``predict_positions``,
    0 for padding), their tokens (``targets``) and 1 / 0 for real / padding (``weights``)."""
    if int(selected.sum(axis=1).max(initial=0)) > cap:
        raise ValueError(f"More than {cap} selected tokens in a row.")
    order = np.argsort(~selected, axis=1, kind="stable")[:, :cap]
    real = np.take_along_axis(selected, order, axis=1)
    return {
        "predict_positions": np.where(real, order, 0).astype(np.int32),
        "targets": np.where(real, np.take_along_axis(tokens, order, axis=1), 0).astype(np.int32),
        "weights": real.astype(np.float32),
    }


def dense_predictions(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(targets, weights) [B, L] of a batch, scattering ``predict_positions`` predictions back
    to their positions (for code that scores every position, such as the peer benchmarks)."""
    if "predict_positions" not in batch:
        return batch["targets"], batch["weights"]
    targets = np.zeros(batch["inputs"].shape, np.int32)
    weights = np.zeros(batch["inputs"].shape, np.float32)
    rows, slots = np.nonzero(batch["weights"] > 0)
    positions = batch["predict_positions"][rows, slots]
    targets[rows, positions] = batch["targets"][rows, slots]
    weights[rows, positions] = 1.0
    return targets, weights


def _select_exactly(candidate: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Per row, ``round(rate * candidates)`` candidates chosen uniformly without replacement."""
    order = np.argsort(np.where(candidate, rng.random(candidate.shape), 2.0), axis=1)
    count = np.rint(rate * candidate.sum(axis=1))[:, None]
    selected = np.zeros_like(candidate)
    np.put_along_axis(selected, order, np.arange(candidate.shape[1]) < count, axis=1)
    return selected


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


def _encoder_decoder_batch(
    inputs: np.ndarray,
    input_lengths: np.ndarray,
    targets: np.ndarray,
    target_lengths: np.ndarray,
    bos_id: int,
) -> Batch:
    """Encoder/decoder keys from encoder inputs and targets, zero-padded after their lengths."""

    def segments_and_positions(width: int, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        real = np.arange(width) < np.asarray(lengths)[:, None]
        positions = np.where(real, np.arange(width), 0)
        return real.astype(np.int32), positions.astype(np.int32)

    encoder_segment_ids, encoder_positions = segments_and_positions(inputs.shape[1], input_lengths)
    decoder_segment_ids, decoder_positions = segments_and_positions(
        targets.shape[1], target_lengths
    )
    decoder_inputs = np.zeros_like(targets)
    decoder_inputs[:, 1:] = targets[:, :-1]
    decoder_inputs[:, 0] = bos_id
    decoder_inputs *= decoder_segment_ids
    return {
        "encoder_inputs": inputs.astype(np.int32),
        "encoder_segment_ids": encoder_segment_ids,
        "encoder_positions": encoder_positions,
        "decoder_inputs": decoder_inputs.astype(np.int32),
        "decoder_segment_ids": decoder_segment_ids,
        "decoder_positions": decoder_positions,
        "targets": targets.astype(np.int32),
        "weights": decoder_segment_ids.astype(np.float32),
    }


def make_objective(
    name: str,
    layout: Layout,
    tokenizer: Any,
    seq_len: int,
    *,
    mask_rate: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
    whole_word: bool = False,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> Objective:
    """The objective ``name`` for a model of input ``layout``.

    Args:
        name: ``objective.name``: see :data:`OBJECTIVES` for the valid names of each layout.
        layout: the model family's :class:`Layout`.
        tokenizer: The run's :class:`~kiln.data.tokenizer.Tokenizer` (mlm needs its mask id,
            span corruption its sentinels).
        seq_len: ``data.seq_len``: tokens per row (encoder inputs for t5).
        mask_rate: mlm: fraction of ordinary tokens selected for prediction.
        mask_token_fraction: mlm: fraction of the selected tokens replaced by the mask id.
        random_token_fraction: mlm: fraction of the selected tokens replaced by a random token.
        whole_word: mlm: select whole words.
        noise_density: span_corruption: fraction of tokens dropped.
        mean_noise_span_length: span_corruption: mean length of a dropped span.

    Raises:
        KilnError: On an objective the layout does not support, a tokenizer without the special
            ids the objective needs, bad rates, or a ``seq_len`` too short (or, for span
            corruption, too long for the 100 sentinels).
    """
    layout = check_options(
        name,
        layout,
        seq_len,
        mask_rate=mask_rate,
        mask_token_fraction=mask_token_fraction,
        random_token_fraction=random_token_fraction,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    if name == "causal_lm":
        return CausalLM()
    if name == "prefix_lm" and layout == Layout.DECODER:
        return PrefixLM()
    if name == "prefix_lm":
        return EncoderDecoderPrefixLM(seq_len=seq_len, bos_id=tokenizer.bos_id)
    if name == "mlm":
        return _masked_lm(
            tokenizer, mask_rate, mask_token_fraction, random_token_fraction, whole_word
        )
    return _span_corruption(tokenizer, seq_len, noise_density, mean_noise_span_length)


def check_options(
    name: str,
    layout: Layout,
    seq_len: int,
    *,
    mask_rate: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> Layout:
    """The rules of `make_objective`'s arguments that need no tokenizer (`config_lib.validate`
    runs them before any data is read); returns the layout as a :class:`Layout`."""
    layout = as_layout(layout)
    if name not in OBJECTIVES[layout]:
        raise KilnError(
            f"objective.name={name!r} does not apply to an {layout} model, which trains with one"
            f" of {OBJECTIVES[layout]}. Set objective.name to one of these (or change"
            " model.family)."
        )
    if seq_len < 2:
        raise KilnError(
            f"data.seq_len={seq_len} is too short for objective.name={name!r}: the minimum is 2."
        )
    if name == "mlm":
        _check_rate("objective.mask_rate", mask_rate, low_open=True)
        _check_rate("objective.mask_token_fraction", mask_token_fraction)
        _check_rate("objective.random_token_fraction", random_token_fraction)
        if mask_token_fraction + random_token_fraction > 1:
            raise KilnError(
                f"objective.mask_token_fraction={mask_token_fraction} plus objective."
                f"random_token_fraction={random_token_fraction} exceed 1: lower one of them."
            )
    if name == "span_corruption":
        _check_rate("objective.noise_density", noise_density, low_open=True, high_open=True)
        if not mean_noise_span_length >= 1:
            raise KilnError(
                f"objective.mean_noise_span_length={mean_noise_span_length} must be >= 1 (T5"
                " uses 3)."
            )
    return layout


def _masked_lm(
    tokenizer: Any,
    mask_rate: float,
    mask_token_fraction: float,
    random_token_fraction: float,
    whole_word: bool,
) -> MaskedLM:
    """BERT's masked LM (its rates checked by `check_options`); the tokenizer gives the mask id
    (and word starts)."""
    mask_id = _special_id(tokenizer, "mask_id", "[MASK]", "mlm")
    ordinary = np.ones(tokenizer.vocab_size, bool)
    ordinary[sorted(tokenizer_lib.special_ids(tokenizer))] = False
    return MaskedLM(
        mask_id=mask_id,
        vocab_size=tokenizer.vocab_size,
        mask_rate=mask_rate,
        mask_token_fraction=mask_token_fraction,
        random_token_fraction=random_token_fraction,
        word_start=_word_starts(tokenizer) if whole_word else None,
        ordinary=ordinary,
    )


def _word_starts(tokenizer: Any) -> np.ndarray:
    """[vocab_size] bool: whether each piece begins a word. WordPiece (BERT) marks the pieces
    that continue a word (``##``); SentencePiece (``▁``) and byte-level BPE (``Ġ``, GPT-2)
    mark the pieces that follow a space, whichever of the two the vocabulary uses more."""
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    backend_model = getattr(getattr(tokenizer, "backend", None), "model", None)
    if type(backend_model).__name__ == "WordPiece":
        return np.array([not p.startswith(WORDPIECE_CONTINUES) for p in pieces], bool)
    counts = {m: sum(p.startswith(m) for p in pieces) for m in (WORD_START, BYTE_LEVEL_SPACE)}
    marker = max(counts, key=counts.get)
    return np.array([p.startswith(marker) for p in pieces], bool)


def _span_corruption(
    tokenizer: Any, seq_len: int, noise_density: float, mean_noise_span_length: float
) -> SpanCorruption:
    """T5's span corruption (its rates checked by `check_options`), checked to fit one span per
    row and the tokenizer's sentinels."""
    sentinels = _sentinel_ids(tokenizer, "span_corruption")
    objective = SpanCorruption(
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


def _check_rate(key: str, value: float, *, low_open: bool = False, high_open: bool = False) -> None:
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise KilnError(f"{key}={value} must be in {interval}.")


def _tokenizer_error(tokenizer: Any, name: str, what: str) -> KilnError:
    where = getattr(tokenizer, "path", None) or repr(tokenizer)
    return KilnError(
        f"objective.name={name!r} needs {what}; the tokenizer at {where} has none. Use a"
        ' tokenizer that has them (tokenizer.path="" trains kiln\'s own, which has every special'
        " token), or an objective this tokenizer supports."
    )


def _valid_special(tokenizer: Any, token_id: Any, piece: str) -> bool:
    return (
        isinstance(token_id, int | np.integer)
        and 0 <= token_id < tokenizer.vocab_size
        and tokenizer.id_to_piece(token_id) == piece
    )


def _special_id(tokenizer: Any, attribute: str, piece: str, name: str) -> int:
    token_id = getattr(tokenizer, attribute, None)
    if not _valid_special(tokenizer, token_id, piece) or tokenizer.vocab_size <= NUM_SPECIAL_IDS:
        raise _tokenizer_error(tokenizer, name, f"a {piece} token and ordinary tokens")
    return int(token_id)


def _sentinel_ids(tokenizer: Any, name: str) -> tuple[int, ...]:
    ids = tuple(getattr(tokenizer, "sentinel_ids", ()))
    if not ids or not all(
        _valid_special(tokenizer, t, f"<extra_id_{i}>") for i, t in enumerate(ids)
    ):
        raise _tokenizer_error(tokenizer, name, "sentinel tokens <extra_id_0>, <extra_id_1>, ...")
    return tuple(int(t) for t in ids)
