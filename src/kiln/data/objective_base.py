"""The objectives' common ground: the input `Layout`s, the `Objective` interface, causal
LM, and helpers shared by the objective modules (see `kiln.data.objectives`)."""

from __future__ import annotations

import abc
import enum
from typing import Any, ClassVar

import numpy as np

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
    Layout.ENCODER: ("mlm", "electra"),
    Layout.ENCODER_DECODER: ("span_corruption", "denoise", "prefix_lm"),
}
# Objectives whose loss trains a module of their own besides the family's (ELECTRA's
# generator and detection head): only a family that names one (`Family.objective_modules`)
# offers them.
MODULE_OBJECTIVES = ("electra",)


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


def encoder_decoder_batch(
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


def tokenizer_error(tokenizer: Any, name: str, what: str) -> KilnError:
    where = getattr(tokenizer, "path", None) or repr(tokenizer)
    return KilnError(
        f"objective.name={name!r} needs {what}; the tokenizer at {where} has none. Use a"
        ' tokenizer that has them (tokenizer.path="" trains kiln\'s own, which has every special'
        " token), or an objective this tokenizer supports."
    )


def valid_special(tokenizer: Any, token_id: Any, piece: str) -> bool:
    return (
        isinstance(token_id, int | np.integer)
        and 0 <= token_id < tokenizer.vocab_size
        and tokenizer.id_to_piece(token_id) == piece
    )


def special_id(tokenizer: Any, attribute: str, piece: str, name: str) -> int:
    token_id = getattr(tokenizer, attribute, None)
    if not valid_special(tokenizer, token_id, piece) or tokenizer.vocab_size <= NUM_SPECIAL_IDS:
        raise tokenizer_error(tokenizer, name, f"a {piece} token and ordinary tokens")
    return int(token_id)
