"""Labeled task examples as model rows (one example each), and batches of them.

The prompt is ``template`` with ``"{input}"`` replaced by the example input. Every array is int32
except float32 ``weights``; padding is 0 (segment id 0) at the end of a row; ``segment_ids`` are 1
on real tokens and ``positions`` count from 0. One example per row (unless packed), by the
model's :class:`~kiln.data.objectives.Layout`:

- classification, encoder (bert): ``inputs`` = ``[CLS] prompt [SEP]``, ``segment_ids``,
  ``positions`` ``[seq_len]``; ``targets`` = label index (shape ``[]``), ``weights`` = 1.0
  (shape ``[]``). The model pools position 0.
- classification, decoder (gpt): the same with ``inputs`` = ``bos prompt eos``; the model pools
  the last real position (the eos).
- sentence pairs (``Task.pairs``), head models: ``[CLS] a [SEP] b [SEP]`` with
  ``token_type_ids`` 0 up to the first [SEP], 1 after (bert), ``bos a [SEP] b eos`` (gpt; eos
  when the tokenizer has no [SEP]); a is the template on the first text (the raw text if the
  template has ``{text_pair}``, a text-to-text template), b the second text; the longer text is
  cut first. t5 reads the template with ``{input}`` and ``{text_pair}`` as one prompt.
- regression: as classification, with a float32 ``targets`` value (a one-output head).
- encoder-decoder (t5; both kinds, a classification target is the label name as text):
  ``encoder_inputs`` = ``prompt eos``, ``encoder_segment_ids``, ``encoder_positions``
  ``[seq_len]``; ``decoder_inputs`` = ``bos target``, ``targets`` = ``target eos``,
  ``decoder_segment_ids``, ``decoder_positions``, ``weights`` (1 on real targets)
  ``[target_len]``.
- generation, decoder (gpt): tokens = ``bos prompt [SEP] target eos``; ``inputs`` = tokens,
  ``targets[t]`` = tokens[t + 1], ``weights[t]`` = 1 iff tokens[t + 1] is a target token or the
  final eos (the first weighted position is the [SEP]), ``segment_ids``, ``positions``
  ``[seq_len]``. Decoding prompts (:func:`generation_prompt`) end with the [SEP].

Truncation keeps the start of each text: a target is cut to ``target_len`` tokens including its
eos, then the prompt is cut so that everything fits in ``seq_len``. Every cut is counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout
from kiln.data.tasks import Example, Task
from kiln.data.tokenizer import Tokenizer
from kiln.errors import KilnError

Row = dict[str, np.ndarray]
# Task kinds a head answers (encoder, decoder): one row per example, one target per row.
HEAD_KINDS = ("classification", "regression")
ENC, DEC, ENC_DEC = Layout.ENCODER, Layout.DECODER, Layout.ENCODER_DECODER


def check_template(template: str, task: Task, layout: Layout) -> None:
    """Raises unless `template` has {input}, and {text_pair} exactly where a pair needs it
    (t5 on a sentence-pair task; head models read a pair as two segments)."""
    if "{input}" not in template:
        raise KilnError(
            f"The prompt template {template!r} has no '{{input}}' placeholder, so every prompt "
            "would be the same: put {input} where the example text goes, e.g. 'Text: {input}'."
        )
    has_pair = "{text_pair}" in template
    if has_pair and not task.pairs:
        raise KilnError(
            f"The prompt template {template!r} has a '{{text_pair}}' placeholder, but task"
            f" {task.name!r} has single texts (no text_pair field): remove it."
        )
    if task.pairs and layout == ENC_DEC and not has_pair:
        raise KilnError(
            f"The prompt template {template!r} has no '{{text_pair}}' placeholder, so a"
            f" text-to-text model would never see the second text of task {task.name!r}'s"
            " sentence pairs: use e.g. 'sentence1: {input} sentence2: {text_pair}'."
        )


def check_lengths(task: Task, layout: Layout, seq_len: int, target_len: int) -> None:
    """Raise unless each row has room for its special tokens plus one prompt and target token."""
    if layout == ENC_DEC:
        need_seq, need_target = 2, 2  # prompt eos; target eos
    elif task.kind in ("generation", "chat"):  # chat: a prompt before target_len new tokens
        need_seq, need_target = target_len + 3, 2  # bos prompt [SEP] target eos
    elif task.pairs:
        need_seq, need_target = 5, None  # [CLS] a [SEP] b [SEP]
    else:
        need_seq, need_target = 3, None  # bos/[CLS] prompt eos/[SEP]; no decoder
    if seq_len < need_seq or (need_target is not None and target_len < need_target):
        what = f"seq_len >= {need_seq}" + (
            f" and target_len >= {need_target}" if need_target is not None else ""
        )
        raise KilnError(
            f"seq_len={seq_len}, target_len={target_len} are too small for an {layout} model on"
            f" the {task.kind} task {task.name!r}: a row needs its special tokens, one prompt"
            " token and one target token (decoder generation: room for a full target of"
            f" target_len tokens including eos). Use {what}."
        )


def prompt_text(template: str, example: Example) -> str:
    return template.replace("{input}", example.input).replace("{text_pair}", example.pair)


def _first_segment(template: str, example: Example) -> str:
    """A head model's first segment of a pair: the template on `input`, or the raw input when
    the template is a text-to-text one (it has {text_pair})."""
    return example.input if "{text_pair}" in template else prompt_text(template, example)


def longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """How many tokens of two texts to keep within `budget`: the longer one is cut first, one
    token at a time (a tie cuts the second)."""
    excess = first + second - budget
    if excess <= 0:
        return first, second
    gap = abs(first - second)
    if excess <= gap:
        return (first - excess, second) if first > second else (first, second - excess)
    even = min(first, second) - (excess - gap) // 2
    return (even, even - (excess - gap) % 2)


def label_index(task: Task, example: Example) -> int:
    if example.target not in task.labels:
        raise KilnError(
            f"Example {example.id!r} of task {task.name!r} has label {example.target!r}, which "
            f"is not among the task's labels {', '.join(map(repr, task.labels))}. Fix the "
            "example or the task's label set."
        )
    return task.labels.index(example.target)


def label_token_ids(
    task: Task, label_ids: dict[str, list[int]], example: Example, target_len: int
) -> list[int]:
    """The label name's ids for t5; raises if the name does not fit in ``target_len``."""
    label_index(task, example)
    ids = label_ids[example.target]
    if len(ids) + 1 > target_len:
        raise KilnError(
            f"The label {example.target!r} of task {task.name!r} takes {len(ids)} tokens plus "
            f"eos, more than target_len={target_len}; cutting it could merge labels. Raise "
            f"target_len to at least {len(ids) + 1}."
        )
    return ids


def head_rows(
    task: Task,
    layout: Layout,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    seq_len: int,
    template: str,
) -> tuple[list[Row], int]:
    """Unpadded classifier/regression rows (one text, or a pair) with their targets."""
    if task.pairs:
        firsts = tokenizer.encode_batch([_first_segment(template, e) for e in examples])
        seconds = tokenizer.encode_batch([e.pair for e in examples])
        rows = [_pair_row(tokenizer, layout, a, b, seq_len) for a, b in zip(firsts, seconds)]
    else:
        prompts = tokenizer.encode_batch([prompt_text(template, e) for e in examples])
        rows = [_classifier_row(tokenizer, layout, ids, seq_len) for ids in prompts]
    for (row, _), example in zip(rows, examples):
        if task.kind == "regression":
            row["targets"] = np.asarray(_value(task, example), dtype=np.float32)
        else:
            row["targets"] = np.asarray(label_index(task, example), dtype=np.int32)
    return [row for row, _ in rows], sum(cut for _, cut in rows)


def _value(task: Task, example: Example) -> float:
    try:
        return float(example.target)
    except ValueError:
        raise KilnError(
            f"Example {example.id!r} of the regression task {task.name!r} has target"
            f" {example.target!r}, not a number. Fix the example."
        ) from None


def _pair_row(
    tokenizer: Tokenizer, layout: Layout, first: list[int], second: list[int], seq_len: int
) -> tuple[Row, bool]:
    """``[CLS] a [SEP] b [SEP]`` with token types 0 then 1 (bert) or ``bos a [SEP] b eos``
    (gpt, [SEP] or eos between), the longer text cut first; without the label."""
    keep_a, keep_b = longest_first(len(first), len(second), seq_len - 3)
    if layout == ENC:
        start, middle, end = tokenizer.cls_id, tokenizer.sep_id, tokenizer.sep_id
    else:
        start, end = tokenizer.bos_id, tokenizer.eos_id
        middle = tokenizer_lib.separator_id(tokenizer)
    tokens = [start, *first[:keep_a], middle, *second[:keep_b], end]
    row = {"inputs": np.asarray(tokens, dtype=np.int32)}
    if layout == ENC:
        types = np.zeros(len(tokens), np.int32)
        types[keep_a + 2 :] = 1
        row["token_type_ids"] = types
    return row, keep_a < len(first) or keep_b < len(second)


def _classifier_row(
    tokenizer: Tokenizer, layout: Layout, ids: list[int], seq_len: int
) -> tuple[Row, bool]:
    """``[CLS] prompt [SEP]`` (bert) or ``bos prompt eos`` (gpt), without the label."""
    first, last = (
        (tokenizer.cls_id, tokenizer.sep_id)
        if layout == ENC
        else (tokenizer.bos_id, tokenizer.eos_id)
    )
    inputs = np.asarray([first, *ids[: seq_len - 2], last], dtype=np.int32)
    return {"inputs": inputs}, len(ids) > seq_len - 2


def encoder_decoder_row(
    tokenizer: Tokenizer, prompt: list[int], target: list[int], seq_len: int, target_len: int
) -> tuple[Row, bool]:
    eos = tokenizer.eos_id
    cut_target = target[: target_len - 1]
    row = {
        "encoder_inputs": np.asarray([*prompt[: seq_len - 1], eos], dtype=np.int32),
        "decoder_inputs": np.asarray([tokenizer.bos_id, *cut_target], dtype=np.int32),
        "targets": np.asarray([*cut_target, eos], dtype=np.int32),
    }
    return row, len(prompt) > seq_len - 1 or len(target) > target_len - 1


def decoder_row(
    tokenizer: Tokenizer, prompt: list[int], target: list[int], seq_len: int, target_len: int
) -> tuple[Row, bool]:
    """``bos prompt [SEP] target eos`` with next-token targets, weighted on the completion."""
    cut_target = target[: target_len - 1]
    budget = seq_len - 3 - len(cut_target)
    cut_prompt = prompt[:budget]
    sep_id = tokenizer_lib.separator_id(tokenizer)
    tokens = [tokenizer.bos_id, *cut_prompt, sep_id, *cut_target, tokenizer.eos_id]
    sep = len(cut_prompt) + 1
    weights = np.zeros(len(tokens), dtype=np.float32)
    weights[sep : len(tokens) - 1] = 1.0  # Predicting each target token and the eos.
    row = {
        "inputs": np.asarray(tokens, dtype=np.int32),
        "targets": np.asarray([*tokens[1:], 0], dtype=np.int32),
        "weights": weights,
    }
    return row, len(prompt) > budget or len(target) > target_len - 1


def _filled(arrays: Sequence[np.ndarray], rows: int, width: int, dtype: type) -> np.ndarray:
    """``arrays`` left-aligned in the rows of a zero ``[rows, width]`` array."""
    out = np.zeros((rows, width), dtype)
    for i, values in enumerate(arrays):
        out[i, : len(values)] = values
    return out


def _segments(lengths: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1 on the first ``lengths[i]`` tokens of row i) and positions."""
    positions = np.arange(width, dtype=np.int32)[None, :]
    real = positions < np.asarray(lengths)[:, None]
    return real.astype(np.int32), np.where(real, positions, 0).astype(np.int32)


def pad_batch(
    compacts: Sequence[Row],
    kind: str,
    layout: Layout,
    seq_len: int,
    target_len: int,
    rows: int | None = None,
) -> Row:
    """A batch of the unpadded rows from :func:`_encode_all`, plus all-zero rows up to ``rows``."""
    rows = len(compacts) if rows is None else rows

    def column(key: str, width: int, dtype: type = np.int32) -> np.ndarray:
        return _filled([c[key] for c in compacts], rows, width, dtype)

    def lengths(key: str) -> list[int]:
        return [len(c[key]) for c in compacts] + [0] * (rows - len(compacts))

    if layout == ENC_DEC:
        encoder_segment_ids, encoder_positions = _segments(lengths("encoder_inputs"), seq_len)
        decoder_segment_ids, decoder_positions = _segments(lengths("targets"), target_len)
        return {
            "encoder_inputs": column("encoder_inputs", seq_len),
            "encoder_segment_ids": encoder_segment_ids,
            "encoder_positions": encoder_positions,
            "decoder_inputs": column("decoder_inputs", target_len),
            "targets": column("targets", target_len),
            "decoder_segment_ids": decoder_segment_ids,
            "decoder_positions": decoder_positions,
            "weights": decoder_segment_ids.astype(np.float32),
        }
    segment_ids, positions = _segments(lengths("inputs"), seq_len)
    batch = {
        "inputs": column("inputs", seq_len),
        "segment_ids": segment_ids,
        "positions": positions,
    }
    if compacts and "token_type_ids" in compacts[0]:
        batch["token_type_ids"] = column("token_type_ids", seq_len)
    if kind == "extractive_qa":  # [start, end] row positions, both weighted.
        batch["targets"] = np.zeros((rows, 2), np.int32)
        batch["targets"][: len(compacts)] = [c["targets"] for c in compacts]
        real = (np.arange(rows) < len(compacts)).astype(np.float32)
        batch["weights"] = np.repeat(real[:, None], 2, axis=1)
    elif kind in HEAD_KINDS:
        dtype = np.float32 if kind == "regression" else np.int32
        batch["targets"] = np.zeros(rows, dtype)
        batch["targets"][: len(compacts)] = [c["targets"] for c in compacts]
        batch["weights"] = (np.arange(rows) < len(compacts)).astype(np.float32)
    else:
        batch["targets"] = column("targets", seq_len)
        batch["weights"] = column("weights", seq_len, np.float32)
    return batch
