"""Pre-training objectives: pure NumPy transforms of packed batches.

An objective takes a packed batch (``tokens``, ``segment_ids``, ``positions``: ``[B, L]`` int32,
``segment_ids`` from 1 in each row and 0 for padding, padding only at the end of a row) and a
``np.random.Generator``, and returns the model's keyword arguments plus ``targets`` and float32
loss ``weights`` (every other array int32, all ``[B, length]``):

- ``gpt`` (decoder), ``causal_lm``: ``inputs, segment_ids, positions, targets, weights``;
- ``gpt`` (decoder), ``prefix_lm``: the same plus ``prefix_mask``;
- ``bert`` (encoder), ``mlm``: ``inputs, segment_ids, positions, targets, weights`` (and
  ``predict_positions``); ``electra``: the same, every selected token masked (the loss is
  ELECTRA's replaced-token detection, `kiln.losses.replaced_token_detection`);
- ``t5`` (encoder-decoder), ``span_corruption``, ``denoise`` and ``prefix_lm``: ``encoder_inputs,
  encoder_segment_ids, encoder_positions`` (``[B, seq_len]``) and ``decoder_inputs,
  decoder_segment_ids, decoder_positions, targets, weights`` (``[B, targets length]``).

Build one with :func:`make_objective`; the pipeline packs rows of
``objective.packed_length(seq_len)`` raw tokens and calls ``objective(batch, rng)``. The
transforms never modify their input.
"""

from __future__ import annotations

from typing import Any

from kiln.data.lm_objectives import CausalLM, EncoderDecoderPrefixLM, PrefixLM
from kiln.data.masked_lm import (
    BYTE_LEVEL_SPACE,
    WORD_START,
    WORDPIECE_CONTINUES,
    ElectraInputs,
    MaskedLM,
    dense_predictions,
    masked_lm,
)
from kiln.data.objective_base import (
    MODULE_OBJECTIVES,
    OBJECTIVES,
    Batch,
    Layout,
    Objective,
    as_layout,
    causal_lm,
)
from kiln.data.span_corruption import Denoising, SpanCorruption, span_corruption
from kiln.errors import KilnError

__all__ = [
    "BYTE_LEVEL_SPACE",
    "MODULE_OBJECTIVES",
    "OBJECTIVES",
    "WORDPIECE_CONTINUES",
    "WORD_START",
    "Batch",
    "CausalLM",
    "Denoising",
    "ElectraInputs",
    "EncoderDecoderPrefixLM",
    "Layout",
    "MaskedLM",
    "Objective",
    "PrefixLM",
    "SpanCorruption",
    "as_layout",
    "causal_lm",
    "check_options",
    "dense_predictions",
    "make_objective",
]


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
    generator_fraction: float = 0.5,
    rtd_weight: float = 50.0,
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
        noise_density: span_corruption, denoise: fraction of tokens dropped.
        mean_noise_span_length: span_corruption, denoise: mean length of a dropped span.
        generator_fraction: electra: the generator's size relative to the body (checked here;
            the model reads it).
        rtd_weight: electra: the weight of the detection loss (checked here; the loss reads it).

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
        generator_fraction=generator_fraction,
        rtd_weight=rtd_weight,
    )
    if name == "causal_lm":
        return CausalLM()
    if name == "prefix_lm" and layout == Layout.DECODER:
        return PrefixLM()
    if name == "prefix_lm":
        return EncoderDecoderPrefixLM(seq_len=seq_len, bos_id=tokenizer.bos_id)
    if name == "mlm":
        return masked_lm(
            tokenizer, mask_rate, mask_token_fraction, random_token_fraction, whole_word
        )
    if name == "electra":  # The generator reads [MASK] at every selected token (the paper's).
        return masked_lm(tokenizer, mask_rate, 1.0, 0.0, whole_word, ElectraInputs)
    kind = Denoising if name == "denoise" else SpanCorruption
    return span_corruption(tokenizer, seq_len, noise_density, mean_noise_span_length, kind)


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
    generator_fraction: float = 0.5,
    rtd_weight: float = 50.0,
) -> Layout:
    """The rules of `make_objective`'s arguments that need no tokenizer (`validation.validate`
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
    if name in ("mlm", "electra"):
        _check_rate("objective.mask_rate", mask_rate, low_open=True)
        _check_rate("objective.mask_token_fraction", mask_token_fraction)
        _check_rate("objective.random_token_fraction", random_token_fraction)
        if mask_token_fraction + random_token_fraction > 1:
            raise KilnError(
                f"objective.mask_token_fraction={mask_token_fraction} plus objective."
                f"random_token_fraction={random_token_fraction} exceed 1: lower one of them."
            )
    if name == "electra":
        _check_rate("objective.generator_fraction", generator_fraction, low_open=True)
        if not rtd_weight > 0:
            raise KilnError(
                f"objective.rtd_weight={rtd_weight} must be > 0 (the weight of the replaced-token"
                " detection loss next to the generator's masked-LM loss; ELECTRA uses 50)."
            )
    if name in ("span_corruption", "denoise"):
        _check_rate("objective.noise_density", noise_density, low_open=True, high_open=True)
        if not mean_noise_span_length >= 1:
            raise KilnError(
                f"objective.mean_noise_span_length={mean_noise_span_length} must be >= 1 (T5"
                " uses 3)."
            )
    return layout


def _check_rate(key: str, value: float, *, low_open: bool = False, high_open: bool = False) -> None:
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise KilnError(f"{key}={value} must be in {interval}.")
