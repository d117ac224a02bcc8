"""Prompts for zero- and k-shot prompting (`kiln.prompting` scores them): templates, label
words, the choice of demonstrations and the token budget.

A prompt is k demonstrations from the task's train split and the query, joined by a blank line
(`SEPARATOR`). Each is the task's template (`TEMPLATES`, else `DEFAULT_TEMPLATE`; `{input}`,
and `{text_pair}` for sentence pairs) followed by `template.join` and the answer: the target
text, or a classification label's word (`label_words`, default the label itself). The query
ends at the template, where the answer would start.

Demonstrations are drawn without replacement from the train split (never the query's own id)
by a generator seeded with (`seed`, md5 of the query's id): the same prompt for an example
whatever the split order or batch. The budget (`seq_len` tokens: a gpt prompt plus bos plus the
answer room, a t5 encoder input plus eos) is kept by dropping demonstrations, the farthest from
the query first; a query too long on its own keeps the start of its input and the template's
cue after it (counted as cut).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from kiln.data import tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError

SCORINGS = ("generate", "rank")
SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Template:
    """A query's text (`{input}`, `{text_pair}` placeholders) and what joins it to its answer."""

    query: str
    join: str = " "


TEMPLATES = {
    "wn_lexname": Template("Definition: {input}\nCategory:"),
    "bible_genre": Template("Verse: {input}\nGenre:"),
    "wn_reverse_dictionary": Template("Definition: {input}\nWord:"),
    "kjv2web": Template("Old English: {input}\nModern English:"),
    "code_summary": Template("Code:\n{input}\nSummary:"),
    "code_generation": Template("{input}", join=""),
}
DEFAULT_TEMPLATE = Template("Input: {input}\nAnswer:")
PAIR_TEMPLATE = Template("Text: {input}\nSecond text: {text_pair}\nAnswer:")


@dataclasses.dataclass(frozen=True)
class Options:
    """How to prompt and score: `shots` demonstrations chosen by `seed`, `seq_len` tokens of
    budget, `scoring` one of `SCORINGS` (`normalize`: rank by mean log-probability per token),
    `max_new_tokens` generated, `template` ("" = the task's, `{input}` required),
    `label_words` ("label=word,..." overriding words for some labels), rows per batch."""

    shots: int = 0
    seed: int = 0
    seq_len: int = 128
    scoring: str = "generate"
    normalize: bool = False
    max_new_tokens: int = 32
    template: str = ""
    label_words: str = ""
    batch_size: int = 16

    def __post_init__(self) -> None:
        problems = []
        if self.scoring not in SCORINGS:
            problems.append(f"scoring={self.scoring!r} is not one of {', '.join(SCORINGS)}")
        if self.shots < 0:
            problems.append(f"shots={self.shots} must be >= 0")
        if self.seq_len < 4:
            problems.append(f"seq_len={self.seq_len} must be >= 4")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.template and "{input}" not in self.template:
            problems.append(f"template={self.template!r} has no {{input}} placeholder")
        if problems:
            raise KilnError(f"Bad prompting options: {'; '.join(problems)}. Fix them and re-run.")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A built prompt: its text, token ids (no bos/eos), demonstrations kept, and if the query
    itself had to be cut."""

    text: str
    ids: list[int]
    shots: int
    cut: bool


def template_for(task: tasks.Task, given: str = "") -> Template:
    """`given` (joined to the answer by a space), else the task's template."""
    if given:
        template = Template(given)
    elif task.name in TEMPLATES:
        template = TEMPLATES[task.name]
    else:
        template = PAIR_TEMPLATE if task.pairs else DEFAULT_TEMPLATE
    if task.pairs and "{text_pair}" not in template.query:
        raise KilnError(
            f"Prompt template {template.query!r} has no {{text_pair}} placeholder, so the"
            f" second text of task {task.name!r}'s sentence pairs would be lost: add it."
        )
    return template


def label_words(task: tasks.Task, spec: str = "") -> dict[str, str]:
    """Each label's answer word: the label itself, unless `spec` ("label=word,...") says."""
    words = {label: label for label in task.labels}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        label, sep, word = item.partition("=")
        if not sep or label.strip() not in words or not word.strip():
            raise KilnError(
                f"label_words item {item!r} is not 'label=word' with a label of task"
                f" {task.name!r} ({', '.join(map(repr, task.labels))}): fix it."
            )
        words[label.strip()] = word.strip()
    if len(set(words.values())) != len(words):
        raise KilnError(f"label_words={spec!r} gives two labels the same word: make them differ.")
    return words


def answer(task: tasks.Task, example: tasks.Example, words: dict[str, str]) -> str:
    """The text a demonstration answers with: the label's word, or the target."""
    return (
        words.get(example.target, example.target)
        if task.kind == "classification"
        else (example.target)
    )


def query_text(template: Template, example: tasks.Example) -> str:
    """The template filled with `example` (no answer)."""
    return template.query.replace("{input}", example.input).replace("{text_pair}", example.pair)


def choose_demonstrations(
    train: Sequence[tasks.Example], example: tasks.Example, shots: int, seed: int
) -> list[tasks.Example]:
    """`shots` train examples for `example`'s prompt, by (`seed`, md5 of its id), never itself."""
    pool = [e for e in train if e.id != example.id]
    if shots == 0:
        return []
    if len(pool) < shots:
        raise KilnError(
            f"shots={shots} but the train split has only {len(pool)} other examples: lower"
            " the shot count."
        )
    digest = int(hashlib.md5(example.id.encode("utf-8")).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, digest])
    return [pool[i] for i in rng.choice(len(pool), size=shots, replace=False)]


def build_prompt(
    task: tasks.Task,
    template: Template,
    words: dict[str, str],
    tok: tokenizer_lib.AnyTokenizer,
    example: tasks.Example,
    demonstrations: Sequence[tasks.Example],
    budget: int,
) -> Prompt:
    """The prompt for `example` with as many of `demonstrations` as fit in `budget` tokens
    (the first ones dropped first); the query is only cut when it alone exceeds the budget."""
    if budget < 2:
        raise KilnError(f"The prompt budget is {budget} tokens: raise seq_len.")
    shown = [
        query_text(template, d) + template.join + answer(task, d, words) for d in demonstrations
    ]
    query = query_text(template, example)
    for start in range(len(shown) + 1):
        text = SEPARATOR.join([*shown[start:], query])
        ids = tok.encode(text)
        if len(ids) <= budget:
            return Prompt(text, ids, len(shown) - start, False)
    cue = template.query.split("{input}", 1)[1]
    cue = cue.replace("{text_pair}", example.pair)
    cue_ids = tok.encode(cue) if cue.strip() else []
    head = template.query.split("{input}", 1)[0] + example.input
    ids = [*tok.encode(head)[: max(budget - len(cue_ids), 1)], *cue_ids][:budget]
    return Prompt(tok.decode(ids), ids, 0, True)


def prompts_for(
    task: tasks.Task,
    examples: Sequence[tasks.Example],
    tok: tokenizer_lib.AnyTokenizer,
    options: Options,
    budget: int,
) -> list[Prompt]:
    """Every example's prompt (demonstrations from the task's train split)."""
    template = template_for(task, options.template)
    words = label_words(task, options.label_words) if task.kind == "classification" else {}
    train = task.splits["train"]
    return [
        build_prompt(
            task,
            template,
            words,
            tok,
            e,
            choose_demonstrations(train, e, options.shots, options.seed),
            budget,
        )
        for e in examples
    ]
