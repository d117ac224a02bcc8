"""Labeled fine-tuning tasks: the shipped ones (see data/README.md) and user JSONL files.

Every task has ``train``, ``validation`` and ``test`` splits of :class:`Example` (an id, an input
text and a target text; the target is the label name for classification). Splits follow the
project's rule (:func:`kiln.data.corpus.split_of`) on a group key, so near duplicates never
straddle splits:

=========================  ==============  ==============================  =====================
task                       kind            input -> target                 split key
=========================  ==============  ==============================  =====================
``wn_lexname``             classification  WordNet definition -> lexname   ``wn:{synset}``
``wn_reverse_dictionary``  generation      WordNet definition -> lemma     ``wn:{synset}``
``bible_genre``            classification  WEB verse -> genre of its book  ``bible:{book}:{ch}``
``kjv2web``                generation      KJV verse -> WEB verse          ``bible:{book}:{ch}``
``code_summary``           generation      SymPy function -> docstring     the row's ``split``
``code_generation``        generation      signature + docstring -> body   the row's ``split``
``jsonl``                  any             user data (``user_tasks``)      ``split`` or id md5
``squad``                  extractive_qa   SQuAD v1.1 JSON file(s)         the file, or title md5
=========================  ==============  ==============================  =====================

The user-file tasks (``jsonl``, ``squad``, ``chat``) are read by
:func:`kiln.data.user_tasks.load_any`, which also loads these shipped ones by name.

A WordNet definition is the gloss up to its first example quote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

from kiln.data import corpus
from kiln.errors import KilnError

KINDS = ("classification", "generation", "regression", "extractive_qa")
TASK_NAMES = (
    "wn_lexname",
    "bible_genre",
    "kjv2web",
    "code_summary",
    "code_generation",
    "wn_reverse_dictionary",
)
# Train-split sizes of the shipped tasks in data/ (a pipeline's `labels=all`; tests check them).
TRAIN_SIZES = {
    "wn_lexname": 94_045,
    "bible_genre": 24_526,
    "kjv2web": 24_526,
    "code_summary": 6_009,
    "code_generation": 6_009,
    "wn_reverse_dictionary": 94_045,
}
# Tasks read from the user's files (`kiln.data.user_tasks.load_any`), not shipped data.
USER_TASKS = ("jsonl", "squad", "chat")
SYMPY_FILE = "sympy114_functions.jsonl.xz"
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
# Metrics of a user's generation task; the first is the primary one.
GENERATION_METRICS = ("chrf", "bleu", "exact_match")
REGRESSION_METRICS = ("pearson", "spearman", "mse")
DEFAULT_TEMPLATE = "{input}"
# A sentence-pair task's default template: text to text (t5) reads both texts in one prompt;
# head models (bert, gpt) read the pair as two segments (`kiln.data.finetune`).
PAIR_TEMPLATE = "sentence1: {input} sentence2: {text_pair}"

# (task name, resolved path, mtime_ns, size, kind, labels) -> parsed task.
_CACHE: dict[tuple, Task] = {}
# (parser name, resolved path, mtime_ns, size) -> rows of a shipped file, shared by its tasks.
_ROWS: dict[tuple, list] = {}


@dataclasses.dataclass(frozen=True)
class Example:
    """One labeled example; ``target`` is the label name for classification tasks and the
    value as text (``repr`` of a float) for regression; ``pair`` is a sentence pair's second
    text (``""``: a single text). Extractive QA: ``input`` is the question, ``context`` the
    passage and ``answers`` the gold (text, character offset in ``context``) pairs; ``target``
    is the first answer's text."""

    id: str
    input: str
    target: str
    pair: str = ""
    context: str = ""
    answers: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Task:
    """A labeled task and its splits.

    Attributes:
        name: One of :data:`TASK_NAMES`.
        kind: One of :data:`KINDS`.
        labels: The sorted label set of a classification task (label index = position here);
            ``()`` for generation.
        metrics: Metric names, the primary one first.
        template: The default prompt template; ``"{input}"`` in it stands for the example input.
        splits: ``"train"``, ``"validation"`` and ``"test"`` examples, in file order.
        pairs: Whether its examples are sentence pairs (``Example.pair``).
        positive: The positive label of ``binary_f1`` (``""``: the second of ``labels``).
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    template: str
    splits: dict[str, list[Example]]
    pairs: bool = False
    positive: str = ""
    doc_stride: int = 0  # extractive QA: overlap of a context's windows (task.doc_stride)
    max_answer_len: int = 0  # extractive QA: longest answer in tokens (task.max_answer_len)


def definition(gloss: str) -> str:
    """A WordNet gloss without its examples: the text up to the first ``; "`` quote."""
    return re.split(r';\s*"', gloss.strip())[0].strip().rstrip(";").strip()


def load_task(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike = "",
    kind: str = "",
    labels: Sequence[str] = (),
    fields: Mapping[str, str] | None = None,
) -> Task:
    """Load a shipped task by name from ``data_dir`` (default
    :func:`kiln.data.corpus.default_data_dir`); parsed files are cached per (path, mtime,
    size). The other arguments belong to the user-file tasks (:data:`USER_TASKS`), which
    :func:`kiln.data.user_tasks.load_any` reads: here they are refused.

    Each call returns fresh split lists; the examples are shared with the cache (they are frozen).

    Raises:
        KilnError: On an unknown or user-file task name, or a missing or malformed file.
    """
    if name in USER_TASKS:
        raise KilnError(
            f"Task {name!r} reads your own file: load it with kiln.data.user_tasks.load_any"
            " (a run does, from task.name and task.path)."
        )
    if name not in TASK_NAMES:
        raise KilnError(
            f"Unknown task {name!r}: use one of {', '.join(TASK_NAMES + USER_TASKS)} (jsonl,"
            " squad and chat read your own data from task.path)."
        )
    given = [f"{key}={value!r}" for key, value in [("path", path), ("kind", kind)] if value]
    if labels:
        given.append(f"labels={list(labels)!r}")
    if fields:
        given.append(f"fields={dict(fields)!r}")
    if given:
        raise KilnError(
            f"Task {name!r} is a shipped task and takes no {', '.join(given)}: these options are "
            "only for the user-file tasks. Remove them, or use task jsonl for your own data."
        )
    root, origin = corpus.data_root(data_dir)
    if name in ("wn_lexname", "wn_reverse_dictionary"):
        file = corpus.WORDNET_FILE
    elif name in ("bible_genre", "kjv2web"):
        file = corpus.BIBLE_FILE
    else:
        file = SYMPY_FILE
    file_path = corpus._builtin(root, file, name, origin)
    return _cached((name, *_file_key(file_path)), lambda: _SHIPPED[name](file_path))


def low_resource_subset(examples: Sequence[Example], n: int) -> list[Example]:
    """The first ``n`` examples ordered by md5 of their id (UTF-8); all of them if ``n <= 0``.

    Subsets are nested (the first 1k lie inside the first 5k) and do not depend on the input
    order (ties between equal ids keep it). If ``n`` exceeds the number of examples, all are
    returned: check ``len()`` of the result if you need exactly ``n``.
    """
    ordered = sorted(examples, key=lambda e: hashlib.md5(e.id.encode("utf-8")).hexdigest())
    return ordered if n <= 0 else ordered[:n]


def _file_key(path: pathlib.Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _cached(key: tuple, build: Callable[[], Task]) -> Task:
    """The cached task for ``key`` (built on a miss), with fresh split lists."""
    if key not in _CACHE:
        _CACHE[key] = build()
    task = _CACHE[key]
    return dataclasses.replace(task, splits={s: list(v) for s, v in task.splits.items()})


def _task(
    name: str,
    kind: str,
    rows: list[tuple[str, Example]],
    metrics: tuple[str, ...],
    labels: tuple[str, ...] | None = None,
) -> Task:
    """A task from (split, example) rows; classification labels default to the sorted targets."""
    splits: dict[str, list[Example]] = {split: [] for split in corpus.SPLITS}
    for split, example in rows:
        splits[split].append(example)
    if labels is None:
        labels = tuple(sorted({e.target for _, e in rows})) if kind == "classification" else ()
    return Task(name, kind, labels, metrics, DEFAULT_TEMPLATE, splits)


def _rows(parse: Callable[[pathlib.Path], list], path: pathlib.Path) -> list:
    """``parse(path)``, cached per file version (two tasks read each TSV)."""
    key = (parse.__name__, *_file_key(path))
    if key not in _ROWS:
        _ROWS[key] = parse(path)
    return _ROWS[key]


def _wordnet_rows(path: pathlib.Path) -> list[tuple[str, str, str, str, str]]:
    """(split, synset, definition, lexname, first lemma) per synset."""
    rows = corpus._fields(path, corpus._read_text(path), "synset\tpos\tlexname\tlemmas\tgloss")
    return [
        (corpus.split_of(f"wn:{synset}"), synset, definition(gloss), lexname, lemmas.split("|")[0])
        for _, (synset, _, lexname, lemmas, gloss) in rows
    ]


def _bible_rows(path: pathlib.Path) -> list[tuple[str, str, str, str, str]]:
    """(split, ref, genre, kjv, web) per verse with a non-empty WEB text, split by chapter."""
    books: dict[str, int] = {}
    out = []
    for number, (ref, genre, kjv, web) in corpus._fields(
        path, corpus._read_text(path), "ref\tgenre\tkjv\tweb"
    ):
        book, _, chapter_verse = ref.rpartition(" ")
        chapter = chapter_verse.partition(":")[0]
        if not book or not chapter.isdigit():
            raise KilnError(
                f"{path}, line {number}: bad verse reference {ref!r}, expected 'Book C:V'. "
                "Restore the file from the repository or rebuild it."
            )
        books.setdefault(book, len(books) + 1)
        if web.strip():
            out.append((corpus.split_of(f"bible:{books[book]}:{chapter}"), ref, genre, kjv, web))
    return out


def _load_wn_lexname(path: pathlib.Path) -> Task:
    rows = [(s, Example(i, d, lex)) for s, i, d, lex, _ in _rows(_wordnet_rows, path)]
    return _task("wn_lexname", "classification", rows, CLASSIFICATION_METRICS)


def _load_wn_reverse_dictionary(path: pathlib.Path) -> Task:
    rows = [(s, Example(i, d, lemma)) for s, i, d, _, lemma in _rows(_wordnet_rows, path)]
    return _task("wn_reverse_dictionary", "generation", rows, ("exact_match",))


def _load_bible_genre(path: pathlib.Path) -> Task:
    rows = [(s, Example(ref, web, genre)) for s, ref, genre, _, web in _rows(_bible_rows, path)]
    return _task("bible_genre", "classification", rows, CLASSIFICATION_METRICS)


def _load_kjv2web(path: pathlib.Path) -> Task:
    rows = [(s, Example(ref, kjv, web)) for s, ref, _, kjv, web in _rows(_bible_rows, path)]
    return _task("kjv2web", "generation", rows, ("chrf", "bleu"))


def _sympy_rows(path: pathlib.Path) -> list[tuple[str, dict]]:
    """(split, record) per SymPy function."""
    rows = []
    for number, line in enumerate(corpus._read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            split = corpus._SPLIT_ALIASES[record["split"]]
            record = {key: str(record[key]) for key in ("id", "prompt", "body", "code", "summary")}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KilnError(
                f"{path}, line {number}: not a JSON object with id, split, prompt, body, code and"
                f" summary fields ({type(e).__name__}: {e}). Restore the file from the repository."
            ) from e
        rows.append((split, record))
    return rows


def _load_code_summary(path: pathlib.Path) -> Task:
    rows = [(s, Example(r["id"], r["code"], r["summary"])) for s, r in _rows(_sympy_rows, path)]
    return _task("code_summary", "generation", rows, ("rouge_l", "bleu"))


def _load_code_generation(path: pathlib.Path) -> Task:
    """Signature and docstring (ending in a newline, as HumanEval prompts do) -> body."""
    rows = [
        (s, Example(r["id"], r["prompt"] + "\n", r["body"])) for s, r in _rows(_sympy_rows, path)
    ]
    return _task("code_generation", "generation", rows, ("bleu", "exact_match"))


_SHIPPED: dict[str, Callable[[pathlib.Path], Task]] = {
    "wn_lexname": _load_wn_lexname,
    "wn_reverse_dictionary": _load_wn_reverse_dictionary,
    "bible_genre": _load_bible_genre,
    "kjv2web": _load_kjv2web,
    "code_summary": _load_code_summary,
    "code_generation": _load_code_generation,
}
