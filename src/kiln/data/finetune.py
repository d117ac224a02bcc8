"""The fine-tuning grain datasets and eval batches of a labeled task, and the checks of what
a model layout can fine-tune on.

Rows (one example each) are built by :mod:`kiln.data.task_rows`, whose docstring gives their
format; extractive QA rows (one per context window) by :mod:`kiln.data.qa`; packing by
:mod:`kiln.data.packing`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from kiln.data import chat, packing, qa
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout, as_layout
from kiln.data.pipeline import process_slice
from kiln.data.task_rows import (
    DEC,
    ENC,
    ENC_DEC,
    HEAD_KINDS,
    Row,
    check_lengths,
    check_template,
    decoder_row,
    encoder_decoder_row,
    head_rows,
    label_token_ids,
    longest_first,  # noqa: F401 (part of this module's API)
    pad_batch,
    prompt_text,
)
from kiln.data.tasks import Example, Task
from kiln.data.tokenizer import Tokenizer
from kiln.errors import KilnError

QA = qa.KIND
# Examples are encoded up front, so batching is cheap: one thread prefetching a few batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def encode(
    task: Task,
    layout: Layout,
    tokenizer: Tokenizer,
    example: Example,
    *,
    seq_len: int,
    target_len: int,
    template: str,
) -> tuple[Row, bool]:
    """One example as a padded row of a ``layout`` model's batch (module docstring), and if it
    was cut."""
    (compact,), truncated = _encode_all(
        task, layout, tokenizer, [example], seq_len, target_len, template
    )
    batch = pad_batch([compact], task.kind, layout, seq_len, target_len)
    return {k: v[0, ...] for k, v in batch.items()}, truncated > 0


def generation_prompt(
    task: Task,
    layout: Layout,
    tokenizer: Tokenizer,
    example: Example,
    *,
    seq_len: int,
    max_new_tokens: int,
    template: str,
) -> list[int]:
    """The ids to decode from: ``bos prompt [SEP]`` (gpt) or the encoder's ``prompt eos`` (t5).

    For gpt, ``seq_len`` bounds the prompt plus the ``max_new_tokens`` generated tokens: the
    prompt keeps its first ``seq_len - max_new_tokens - 2`` ids (with ``max_new_tokens =
    target_len`` that is the least a training row keeps). For t5, ``seq_len`` bounds the encoder
    input. gpt only generates for generation tasks (it classifies by pooling) and chat (the
    conversation before its last assistant turn, :func:`kiln.data.chat.prompt`).
    """
    if task.kind == chat.KIND:
        check_task(task.name, task.kind, layout)
        return chat.prompt(tokenizer, example, template, seq_len, max_new_tokens)
    check_template(template, task, layout)
    if layout == ENC_DEC:
        check_lengths(task, layout, seq_len, 2)
        ids = tokenizer.encode(prompt_text(template, example))
        return [*ids[: seq_len - 1], tokenizer.eos_id]
    if layout != DEC or task.kind != "generation":
        check_task(task.name, task.kind, layout)
        raise KilnError(
            f"An {layout} model classifies task {task.name!r} by pooling and generates nothing: "
            "generation prompts are for generation tasks (gpt, t5) or t5 classification."
        )
    budget = seq_len - max_new_tokens - 2
    if budget < 1:
        raise KilnError(
            f"seq_len={seq_len} leaves no room for a prompt with max_new_tokens={max_new_tokens} "
            "(plus bos and [SEP]): raise seq_len or lower max_new_tokens."
        )
    ids = tokenizer.encode(prompt_text(template, example))
    return [tokenizer.bos_id, *ids[:budget], tokenizer_lib.separator_id(tokenizer)]


def make_train_dataset(
    task: Task,
    layout: Layout,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    seq_len: int,
    target_len: int,
    template: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    pack: bool = False,
) -> tuple[grain.IterDataset, int]:
    """An endless shuffled stream of this process's rows of each global batch, and the cut count.

    Examples are encoded up front (the count of truncated ones is returned), shuffled with a seed
    mixed from ``seed`` and reshuffled every epoch, padded, batched into global batches of
    ``global_batch_size`` rows; each process keeps its
    :func:`~kiln.data.pipeline.process_slice`. With ``pack`` (gpt generation and chat only)
    each row holds as many whole examples as fit, greedily in stream order (segment ids 1, 2,
    ... in the row, positions restart per example, an example is never split; a conversation
    keeps its assistant-only weights). Its iterators support ``get_state()``/``set_state()``;
    the state survives a JSON round trip.

    Raises:
        KilnError: On no examples, a bad layout, length, template or batch size, or ``pack``
            with anything but gpt generation or chat.
    """
    check_task(task.name, task.kind, layout, pack)
    if not examples:
        raise KilnError(
            f"No training examples for task {task.name!r}: the train split (or its "
            "low-resource subset) is empty. Check the task data and the subset size."
        )
    process_slice({"rows": np.zeros(global_batch_size)}, process_index, process_count)  # Checks.
    compact, truncated = _encode_all(
        task, layout, tokenizer, examples, seq_len, target_len, template
    )
    # grain shuffles epoch e with seed + e: mix the seed so that nearby seeds share no epochs.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = grain.MapDataset.source(compact).shuffle(seed=shuffle_seed).repeat()
    keep = functools.partial(process_slice, index=process_index, count=process_count)
    if pack:
        packed = packing.PackIterDataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len)
        return packed.batch(global_batch_size, drop_remainder=True).map(keep), truncated
    pad = functools.partial(
        pad_batch, kind=task.kind, layout=layout, seq_len=seq_len, target_len=target_len
    )
    ds = ds.batch(global_batch_size, drop_remainder=True, batch_fn=pad).map(keep)
    return ds.to_iter_dataset(_READ_OPTIONS), truncated


def make_eval_batches(
    task: Task,
    layout: Layout,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    seq_len: int,
    target_len: int,
    template: str,
    batch_size: int,
) -> tuple[list[Row], int]:
    """Every example in order, in batches of ``batch_size`` rows, and the number truncated.

    The final batch is padded with all-zero rows (weight 0), so every batch has the same shape.
    No examples give no batches.
    """
    if batch_size < 1:
        raise KilnError(f"Eval batch_size={batch_size} must be >= 1.")
    compact, truncated = _encode_all(
        task, layout, tokenizer, examples, seq_len, target_len, template
    )
    batches = [
        pad_batch(compact[i : i + batch_size], task.kind, layout, seq_len, target_len, batch_size)
        for i in range(0, len(compact), batch_size)
    ]
    return batches, truncated


# ------------------------------------------------------------------------------------ encoding


def check_task(name: str, kind: str, layout: Layout, pack: bool = False) -> None:
    """Raises unless a ``layout`` model can fine-tune on task ``name`` of ``kind`` ("" = not
    known yet), packed if ``pack``; ``validation.validate`` runs it before the task is read."""
    layout = as_layout(layout)
    if layout == ENC_DEC and kind == "regression":
        raise KilnError(
            f"task.name={name!r} is a regression task, which needs a head with one output: an"
            " encoder-decoder (t5) answers in text. Fine-tune an encoder (bert) or decoder"
            " (gpt) model on it."
        )
    if layout == ENC and kind == "generation":
        raise KilnError(
            f"task.name={name!r} is a generation task, which an encoder (bert) cannot do:"
            " fine-tune a decoder (gpt) or encoder-decoder (t5) model on it, or pick a"
            " classification task."
        )
    if (kind == QA or name == "squad") and layout != ENC:
        raise KilnError(
            f"task.name={name!r} is an extractive QA task, which needs an encoder's span head:"
            f" a {layout} model has none. Fine-tune an encoder (bert), or give the task as"
            " generation (question and context as input, the answer as target) in a JSONL file."
        )
    if (kind == chat.KIND or name == chat.NAME) and layout != DEC:
        raise KilnError(
            f"task.name={name!r} is a chat task (conversations, the loss on assistant turns),"
            f" which needs a decoder: a {layout} model is not one. Fine-tune a decoder (gpt),"
            " or give the data as a generation task (the conversation so far as input, the"
            " last assistant turn as target) in a JSONL file."
        )
    if pack and (layout != DEC or kind in ("classification", "regression", QA)):
        raise KilnError(
            "task.pack=True: Packing is only for decoders (gpt) on generation and chat tasks, not"
            f" for {kind or 'the'} task {name!r} with model layout {layout} (one example per row is"
            " needed to pool or to align the decoder). Set task.pack=False."
        )


def _encode_all(
    task: Task,
    layout: Layout,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    seq_len: int,
    target_len: int,
    template: str,
) -> tuple[list[Row], int]:
    """Unpadded rows of ``examples`` (see :func:`pad_batch`) and the number truncated (for
    extractive QA: a row per context window, and the questions cut)."""
    check_task(task.name, task.kind, layout)
    if task.kind == QA:
        encoded = qa.encode(tokenizer, examples, seq_len=seq_len, doc_stride=task.doc_stride)
        return encoded.rows, encoded.cut
    if task.kind == chat.KIND:
        check_lengths(task, layout, seq_len, target_len)
        return chat.rows(tokenizer, examples, template, seq_len)
    check_template(template, task, layout)
    check_lengths(task, layout, seq_len, target_len)
    if task.kind in HEAD_KINDS and layout != ENC_DEC:
        return head_rows(task, layout, tokenizer, examples, seq_len, template)
    prompts = tokenizer.encode_batch([prompt_text(template, e) for e in examples])
    if task.kind == "classification":
        ids_of = {label: tokenizer.encode(label) for label in task.labels}
        targets = [label_token_ids(task, ids_of, e, target_len) for e in examples]
    else:
        targets = tokenizer.encode_batch([e.target for e in examples])
    make = encoder_decoder_row if layout == ENC_DEC else decoder_row
    rows = [make(tokenizer, p, t, seq_len, target_len) for p, t in zip(prompts, targets)]
    return [row for row, _ in rows], sum(cut for _, cut in rows)
