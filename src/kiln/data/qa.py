"""Extractive QA rows for an encoder's span head, and answers read back from its logits.

A question and its context become one row per window of the context: ``[CLS] question [SEP]
context tokens [SEP]``, ``seq_len`` long at most. The question keeps at most half the row;
the context is cut into windows of the room left, consecutive windows overlapping by
``doc_stride`` tokens, so an answer that crosses one window's end lies whole in the next.
``targets`` are the row positions ``[start, end]`` of the first gold answer's tokens, or
``[0, 0]`` (the [CLS]) in a window that does not hold the whole answer; ``weights`` are
``[1, 1]``. Every context token carries its character span in the context
(:func:`encode_with_offsets`), so a predicted token span is a slice of the original text.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from kiln.data.tasks import Example
from kiln.errors import KilnError

KIND = "extractive_qa"
Row = dict[str, np.ndarray]
Offsets = list[tuple[int, int]]


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], Offsets]:
    """Ids of ``text`` (as ``tokenizer.encode`` gives them) and each token's (start, end)
    character span in it, leading whitespace excluded.

    A Hugging Face tokenizer.json and a SentencePiece model give offsets themselves; any other
    tokenizer gets them by decoding prefixes of the ids (`prefix_offsets`).
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        encoded = backend.encode(text, add_special_tokens=False)
        return list(encoded.ids), _strip(text, [(int(a), int(b)) for a, b in encoded.offsets])
    processor = getattr(tokenizer, "processor", None)
    if processor is not None:
        ids = tokenizer.encode(text)
        pieces = processor.encode(text, return_type="proto").pieces
        if [p.id for p in pieces] == ids:
            # SentencePiece's offsets count UTF-8 bytes: map them to characters.
            chars = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
            to_char = {int(byte): i for i, byte in enumerate(chars)}
            spans = [(to_char.get(p.begin), to_char.get(p.end)) for p in pieces]
            if all(a is not None and b is not None for a, b in spans):
                return ids, _strip(text, spans)
    return prefix_offsets(tokenizer, text)


def prefix_offsets(tokenizer, text: str) -> tuple[list[int], Offsets]:
    """`encode_with_offsets` for any tokenizer: token k ends where the decoding of the first
    k + 1 ids ends, counted in non-space characters (decoding may change whitespace). When the
    decoding does not reproduce the text's non-space characters (normalised or unknown
    characters), each token gets the span of the whitespace-separated word it starts in."""
    ids = tokenizer.encode(text)
    visible = [i for i, c in enumerate(text) if not c.isspace()]

    def count(ids_prefix: list[int]) -> int:
        return sum(not c.isspace() for c in tokenizer.decode(ids_prefix))

    if "".join(c for c in tokenizer.decode(ids) if not c.isspace()) != "".join(
        text[i] for i in visible
    ):
        return ids, _word_offsets(tokenizer, text, ids)
    ends = np.maximum.accumulate([count(ids[: k + 1]) for k in range(len(ids))] or [0])
    offsets: Offsets = []
    previous = 0
    for end in ends[: len(ids)]:
        end = int(end)
        if end > previous:
            offsets.append((visible[previous], visible[end - 1] + 1))
        else:  # A token with no visible character of its own (a space piece).
            at = visible[previous] if previous < len(visible) else len(text)
            offsets.append((at, at))
        previous = end
    return ids, offsets


def _word_offsets(tokenizer, text: str, ids: list[int]) -> Offsets:
    """Spreads ``ids`` over the words of ``text`` in proportion to their lengths: each token
    gets its word's span (a coarse map for tokenizers whose decoding is not the text)."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)] or [(0, len(text))]
    total = sum(b - a for a, b in words)
    bounds = np.cumsum([b - a for a, b in words]) / max(total, 1)
    return [words[int(np.searchsorted(bounds, (k + 0.5) / len(ids)))] for k in range(len(ids))]


def _strip(text: str, spans: list[tuple[int, int]]) -> Offsets:
    """Spans without their leading whitespace (SentencePiece's "▁" covers the space)."""
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        out.append((a, b))
    return out


def token_span(offsets: Offsets, start: int, end: int) -> tuple[int, int] | None:
    """The first and last token overlapping characters [start, end), or None."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (inside[0], inside[-1]) if inside else None


def window_starts(n_tokens: int, room: int, doc_stride: int) -> list[int]:
    """First context token of each window of ``room`` tokens, overlapping by ``doc_stride``."""
    starts = [0]
    while starts[-1] + room < n_tokens:
        starts.append(starts[-1] + room - doc_stride)
    return starts


@dataclasses.dataclass(frozen=True)
class Window:
    """Where a row's context tokens come from."""

    example: int  # index in the encoded examples
    start: int  # its first context token (index into the example's context tokens)
    offset: int  # the row position of that token
    length: int  # context tokens in the row


@dataclasses.dataclass
class Encoded:
    """Every window of a list of examples: unpadded rows, their windows, the context tokens'
    character offsets per example, and how many questions were cut."""

    rows: list[Row]
    windows: list[Window]
    offsets: list[Offsets]
    cut: int


def check_lengths(seq_len: int, doc_stride: int) -> None:
    """Raises unless a row holds a question token, the context room and the stride."""
    room = seq_len - 3 - (seq_len - 3) // 2
    if room < 1 or not 0 <= doc_stride < room:
        raise KilnError(
            f"task.doc_stride={doc_stride} with data.seq_len={seq_len}: a window holds at most"
            f" {room} context tokens (half the row goes to the question), and the overlap must"
            f" be in [0, {max(room - 1, 0)}]. Lower task.doc_stride or raise data.seq_len."
        )


def encode(tokenizer, examples: Sequence[Example], *, seq_len: int, doc_stride: int) -> Encoded:
    """The windows of ``examples`` (module docstring)."""
    check_lengths(seq_len, doc_stride)
    out = Encoded([], [], [], 0)
    questions = tokenizer.encode_batch([e.input for e in examples])
    for index, (example, question) in enumerate(zip(examples, questions)):
        keep = min(len(question), (seq_len - 3) // 2)
        out.cut += keep < len(question)
        ids, offsets = encode_with_offsets(tokenizer, example.context)
        out.offsets.append(offsets)
        text, char = example.answers[0] if example.answers else ("", 0)
        span = token_span(offsets, char, char + len(text)) if text else None
        room, offset = seq_len - 3 - keep, keep + 2
        for start in window_starts(len(ids), room, doc_stride):
            piece = ids[start : start + room]
            tokens = [
                tokenizer.cls_id,
                *question[:keep],
                tokenizer.sep_id,
                *piece,
                tokenizer.sep_id,
            ]
            inside = span is not None and start <= span[0] and span[1] < start + len(piece)
            target = (offset + span[0] - start, offset + span[1] - start) if inside else (0, 0)
            out.rows.append(
                {
                    "inputs": np.asarray(tokens, np.int32),
                    "targets": np.asarray(target, np.int32),
                }
            )
            out.windows.append(Window(index, start, offset, len(piece)))
    return out


def best_span(
    start_L: np.ndarray, end_L: np.ndarray, window: Window, max_answer_len: int
) -> tuple[float, int, int]:
    """(score, first, last) context token of the window's best span: start <= end, at most
    ``max_answer_len`` tokens, scored start logit + end logit."""
    lo, hi = window.offset, window.offset + window.length
    scores = start_L[lo:hi, None] + end_L[None, lo:hi]
    i, j = np.indices(scores.shape)
    scores = np.where((j >= i) & (j - i < max_answer_len), scores, -np.inf)
    first, last = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(scores[first, last]), window.start + int(first), window.start + int(last)


def answers(
    encoded: Encoded,
    logits: np.ndarray,
    examples: Sequence[Example],
    max_answer_len: int,
) -> list[str]:
    """Each example's answer: the best span (`best_span`) over all its windows, as the slice of
    its context between the span's first and last token. ``logits`` are the span head's
    [windows, 2, L] outputs, one per row of ``encoded``."""
    best: list[tuple[float, int, int] | None] = [None] * len(examples)
    for window, logits_2L in zip(encoded.windows, logits):
        if window.length == 0:
            continue
        found = best_span(logits_2L[0], logits_2L[1], window, max_answer_len)
        if best[window.example] is None or found[0] > best[window.example][0]:
            best[window.example] = found
    out = []
    for example, offsets, found in zip(examples, encoded.offsets, best):
        if found is None:
            out.append("")
            continue
        _, first, last = found
        out.append(example.context[offsets[first][0] : offsets[last][1]])
    return out
