"""BERT's masked language model objective, and its tokenizer-derived tables."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objective_base import Batch, Layout, Objective, special_id
from kiln.data.tokenizer import NUM_SPECIAL_IDS

WORD_START = "\u2581"  # SentencePiece's space marker: a piece starting with it begins a word.
BYTE_LEVEL_SPACE = "\u0120"  # Byte-level BPE's (GPT-2's) space marker, the same role.
WORDPIECE_CONTINUES = "##"  # WordPiece's mark of a piece that continues a word.


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


@dataclasses.dataclass(frozen=True, eq=False)
class ElectraInputs(MaskedLM):
    """ELECTRA's batches: masked LM's, with every selected token replaced by the mask id (the
    generator's input in the paper); the loss is `kiln.losses.replaced_token_detection`."""

    name: ClassVar[str] = "electra"


def masked_lm(
    tokenizer: Any,
    mask_rate: float,
    mask_token_fraction: float,
    random_token_fraction: float,
    whole_word: bool,
    kind: type[MaskedLM] = MaskedLM,
) -> MaskedLM:
    """BERT's masked LM (its rates checked by `check_options`), or another `kind` of it; the
    tokenizer gives the mask id (and word starts)."""
    mask_id = special_id(tokenizer, "mask_id", "[MASK]", kind.name)
    ordinary = np.ones(tokenizer.vocab_size, bool)
    ordinary[sorted(tokenizer_lib.special_ids(tokenizer))] = False
    return kind(
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
