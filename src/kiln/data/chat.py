"""The ``chat`` task: instruction data as multi-turn conversations, for decoder (gpt) models.

A JSONL file with one conversation per line, ``{"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]}`` holding at least one assistant turn; optional ``id``
(default md5 of the messages) and ``split`` as in ``jsonl`` files. Read as ``task.name=chat``, or
``task.name=jsonl`` when the first line has ``messages`` (or ``task.kind=chat``).

The chat template (``task.template``, default :data:`DEFAULT_TEMPLATE`) has ``{role}`` and
``{content}``: a turn is the template's text before ``{content}`` (with the role filled in), the
content, then the text after it; an assistant's content is followed by the tokenizer's eos, its
end marker (generation stops there). Each piece is tokenized on its own, so a turn's tokens never
depend on its neighbours. A training row is bos then every turn, cut at ``seq_len``; its loss
(``weights`` 1) is exactly on the positions predicting an assistant turn's content tokens and
its eos, so packed rows (:mod:`kiln.data.packing`) keep every conversation's mask.

Evaluation: a held-out conversation is one :class:`ChatExample`; the model generates its last
assistant turn from bos, the turns before it and the assistant's cue (the template's text before
``{content}``), the prompt keeping its end when too long; ``target`` is that turn's content,
scored with the task's metrics (generation's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from kiln.data import tasks, user_lines
from kiln.data.tokenizer import AnyTokenizer
from kiln.errors import KilnError

NAME = "chat"  # task.name
KIND = "chat"  # Task.kind
ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
DEFAULT_TEMPLATE = "{role}: {content}\n"
_EXAMPLE = (
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)

Row = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ChatExample(tasks.Example):
    """A conversation: ``messages`` as (role, content) pairs; ``input`` is the conversation
    before its last assistant turn in the default template (ending at the assistant's cue),
    ``target`` that turn's content."""

    messages: tuple[tuple[str, str], ...] = ()


def is_chat_file(path: str | os.PathLike, kind: str) -> bool:
    """Whether a ``jsonl`` task file is read as chat: ``kind`` is chat, or (no kind given) its
    first non-blank line is a JSON object with ``messages``."""
    if kind:
        return kind == KIND
    file = pathlib.Path(path).expanduser()
    if not str(path) or not file.is_file():
        return False
    for _, record in user_lines.records(file, _EXAMPLE):
        return "messages" in record
    return False


def load_chat(path: str | os.PathLike, name: str = NAME) -> tasks.Task:
    """The chat task of a JSONL file (module docstring), cached per file version."""
    file = pathlib.Path(path).expanduser()
    if not str(path) or not file.is_file():
        where = f"no file at {file.resolve()}" if str(path) else "task.path is empty"
        raise KilnError(
            f"Task {name} needs a JSONL file of conversations ({where}): set task.path to a"
            f" file with one line per conversation, e.g. {_EXAMPLE}."
        )
    key = (KIND, name, *tasks._file_key(file))
    return tasks._cached(key, lambda: _build(file, name))


def _build(path: pathlib.Path, name: str) -> tasks.Task:
    rows = [
        _example(f"{path}, line {n}", record) for n, record in user_lines.records(path, _EXAMPLE)
    ]
    if not rows:
        raise KilnError(
            f"{path} holds no conversations: add one JSON object per line, e.g. {_EXAMPLE}."
        )
    task = tasks._task(name, KIND, rows, tasks.GENERATION_METRICS)
    for split, examples in task.splits.items():
        if not examples:
            raise KilnError(
                f"{path} has no {split} conversations ({len(rows)} in all). Give every line a"
                " 'split' field (train, validation or test) with some of each, or drop the"
                " field everywhere to split by md5 of the id (about 80/10/10)."
            )
    return dataclasses.replace(task, template=DEFAULT_TEMPLATE)


def _example(where: str, record: dict) -> tuple[str, ChatExample]:
    """(split, example) of one line; checks its messages."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        problem = "has no 'messages'" if "messages" not in record else "has an empty or non-list"
        raise KilnError(
            f"{where}: {problem} 'messages' list. Each line needs a non-empty list of"
            f" {{role, content}} turns, e.g. {_EXAMPLE}."
        )
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise KilnError(
                f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}"
                ' (each message is {"role": ..., "content": "..."}).'
            )
        if not isinstance(content, str) or (role == ASSISTANT and not content.strip()):
            what = "an empty" if isinstance(content, str) else "no string"
            raise KilnError(
                f"{where}: message {i} ({role}) has {what} 'content'. Give it its text"
                " (an assistant turn needs non-empty text: it is what the model learns)."
            )
        turns.append((role, content))
    last = _last_assistant(turns)
    if last < 0:
        raise KilnError(
            f"{where}: no assistant turn: the loss and the evaluation are on assistant turns."
            " Add the assistant's reply, or remove the line."
        )
    example_id = user_lines.id_of(where, record, json.dumps(turns, ensure_ascii=False))
    split = user_lines.split_of(where, record, example_id)
    history = render(turns[:last], DEFAULT_TEMPLATE) + cue(DEFAULT_TEMPLATE)
    return split, ChatExample(example_id, history, turns[last][1], messages=tuple(turns))


def _last_assistant(turns: Sequence[tuple[str, str]]) -> int:
    return max((i for i, (role, _) in enumerate(turns) if role == ASSISTANT), default=-1)


def check_template(template: str) -> None:
    """Raises unless `template` (``task.template``) has ``{role}`` and one ``{content}``."""
    if template.count("{content}") != 1 or "{role}" not in template or "{input}" in template:
        raise KilnError(
            f"task.template={template!r} is not a chat template: it needs one '{{content}}'"
            " (where a turn's text goes) and '{role}' (system, user or assistant, so that the"
            f" model tells the turns apart), and no '{{input}}'. Use e.g. {DEFAULT_TEMPLATE!r}"
            " (the default: set task.template='') or '<|{role}|>\\n{content}\\n'."
        )


def render(turns: Sequence[tuple[str, str]], template: str) -> str:
    """The turns as text in `template` (without the assistant's eos)."""
    return "".join(template.replace("{role}", r).replace("{content}", c) for r, c in turns)


def cue(template: str) -> str:
    """The assistant's cue: the template's text before ``{content}``."""
    return template.split("{content}")[0].replace("{role}", ASSISTANT)


def encode(
    tok: AnyTokenizer, turns: Sequence[tuple[str, str]], template: str
) -> tuple[list[int], list[bool]]:
    """(bos then every turn's ids, which of them are assistant content or its eos)."""
    before, after = template.split("{content}")
    pieces = {
        role: (
            tok.encode(before.replace("{role}", role)),
            tok.encode(after.replace("{role}", role)),
        )
        for role in ROLES
    }
    ids, loss = [tok.bos_id], [False]
    for (role, _), content in zip(turns, tok.encode_batch([c for _, c in turns])):
        first, last = pieces[role]
        turn = [*content, tok.eos_id] if role == ASSISTANT else content
        ids += [*first, *turn, *last]
        loss += [False] * len(first) + [role == ASSISTANT] * len(turn) + [False] * len(last)
    return ids, loss


def rows(
    tok: AnyTokenizer, examples: Sequence[tasks.Example], template: str, seq_len: int
) -> tuple[list[Row], int]:
    """Unpadded decoder rows (``inputs``, next-token ``targets``, ``weights`` 1 where the target
    is an assistant token) of the conversations, and how many were cut at `seq_len`."""
    check_template(template)
    out, cut = [], 0
    for example in examples:
        ids, loss = encode(tok, _messages(example), template)
        cut += len(ids) > seq_len
        ids, loss = ids[:seq_len], loss[:seq_len]
        out.append(
            {
                "inputs": np.asarray(ids, np.int32),
                "targets": np.asarray([*ids[1:], 0], np.int32),
                "weights": np.asarray([*loss[1:], False], np.float32),
            }
        )
    return out, cut


def prompt(
    tok: AnyTokenizer, example: tasks.Example, template: str, seq_len: int, max_new_tokens: int
) -> list[int]:
    """The ids to generate the last assistant turn from: bos, the turns before it and the
    assistant's cue, keeping the end within ``seq_len - max_new_tokens`` ids."""
    check_template(template)
    budget = seq_len - max_new_tokens
    if budget < 2:
        raise KilnError(
            f"seq_len={seq_len} leaves no room for a chat prompt with max_new_tokens="
            f"{max_new_tokens} (task.target_len): raise data.seq_len or lower task.target_len."
        )
    turns = _messages(example)
    ids, _ = encode(tok, turns[: _last_assistant(turns)], template)
    ids += tok.encode(cue(template))
    return ids if len(ids) <= budget else [tok.bos_id, *ids[len(ids) - budget + 1 :]]


def _messages(example: tasks.Example) -> tuple[tuple[str, str], ...]:
    if not isinstance(example, ChatExample):
        raise KilnError(
            f"Example {example.id!r} is not a conversation: chat rows need the examples of a"
            " chat task (kiln.data.chat.load_chat)."
        )
    return example.messages
