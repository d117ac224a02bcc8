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
``jsonl``                  either          user data (:func:`load_task`)   ``split`` or id md5
=========================  ==============  ==============================  =====================

A WordNet definition is the gloss up to its first example quote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Sequence

from kiln.data import corpus
from kiln.errors import KilnError

KINDS = ("classification", "generation")
TASK_NAMES = (
    "wn_lexname",
    "bible_genre",
    "kjv2web",
    "code_summary",
    "code_generation",
    "wn_reverse_dictionary",
    "jsonl",
)
SYMPY_FILE = "sympy114_functions.jsonl.xz"
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
# Metrics of a user's generation task; the first is the primary one.
GENERATION_METRICS = ("chrf", "bleu", "exact_match")
DEFAULT_TEMPLATE = "{input}"
_CLASSIFICATION_FIELDS = ("text", "label")
_GENERATION_FIELDS = ("input", "target")
_JSONL_EXAMPLE = '{"text": "...", "label": "..."} or {"input": "...", "target": "..."}'

# (task name, resolved path, mtime_ns, size, kind, labels) -> parsed task.
_CACHE: dict[tuple, Task] = {}
# (parser name, resolved path, mtime_ns, size) -> rows of a shipped file, shared by its tasks.
_ROWS: dict[tuple, list] = {}


@dataclasses.dataclass(frozen=True)
class Example:
    """One labeled example; ``target`` is the label name for classification tasks."""

    id: str
    input: str
    target: str


@dataclasses.dataclass(frozen=True)
class Task:
    """A labeled task and its splits.

    Attributes:
        name: One of :data:`TASK_NAMES`.
        kind: ``"classification"`` or ``"generation"``.
        labels: The sorted label set of a classification task (label index = position here);
            ``()`` for generation.
        metrics: Metric names, the primary one first.
        template: The default prompt template; ``"{input}"`` in it stands for the example input.
        splits: ``"train"``, ``"validation"`` and ``"test"`` examples, in file order.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    template: str
    splits: dict[str, list[Example]]


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
) -> Task:
    """Load a task by name; parsed files are cached per (path, mtime, size).

    Shipped tasks read ``data_dir`` (default :func:`kiln.data.corpus.default_data_dir`). The
    ``jsonl`` task reads the user file ``path``: one JSON object per line with string fields
    ``text`` + ``label`` (classification) or ``input`` + ``target`` (generation), an optional
    ``id`` (default: md5 of the text/input) and an optional ``split`` (``train``,
    ``validation``/``val``, ``test``; default: :func:`~kiln.data.corpus.split_of` of the id).
    ``kind`` is inferred from the first line's fields unless given. ``labels`` fixes the label
    set (default: the labels seen in train).

    Each call returns fresh split lists; the examples are shared with the cache (they are frozen).

    Raises:
        KilnError: On an unknown task, a missing or malformed file, a bad label, or an empty split.
    """
    if name not in TASK_NAMES:
        raise KilnError(
            f"Unknown task {name!r}: use one of {', '.join(TASK_NAMES)} (jsonl reads your own "
            "data from a path)."
        )
    if name == "jsonl":
        return _load_jsonl_task(path, kind, labels)
    given = [f"{key}={value!r}" for key, value in [("path", path), ("kind", kind)] if value]
    if labels:
        given.append(f"labels={list(labels)!r}")
    if given:
        raise KilnError(
            f"Task {name!r} is a shipped task and takes no {', '.join(given)}: these options are "
            "only for the jsonl task. Remove them, or use task jsonl for your own data."
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


# ---------------------------------------------------------------------------- user JSONL files


def _load_jsonl_task(path: str | os.PathLike, kind: str, labels: Sequence[str]) -> Task:
    """The ``jsonl`` task from a user file (see :func:`load_task`)."""
    if not str(path):
        raise KilnError(
            "Task jsonl needs the path of a .jsonl file: set the task path option to a file "
            'with one JSON object per line, e.g. {"text": "...", "label": "..."}.'
        )
    if kind and kind not in KINDS:
        raise KilnError(
            f"Unknown task kind {kind!r} for {path}: use classification, generation, or leave "
            "it empty to infer it from the fields of the first line."
        )
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise KilnError(
            f"Task data file {path} not found: no file at {file.resolve()}. Fix the task path "
            "(relative paths start from the working directory)."
        )
    if labels and kind == "generation":
        raise KilnError(
            f"A label set was given for the generation task in {file}: labels only apply to "
            "classification. Remove them, or set the kind to classification."
        )
    key = ("jsonl", *_file_key(file), kind, tuple(labels))
    return _cached(key, lambda: _build_jsonl_task(file, kind, tuple(labels)))


def _build_jsonl_task(path: pathlib.Path, kind: str, labels: tuple[str, ...]) -> Task:
    rows = _jsonl_rows(path, kind)
    kind = "classification" if rows[0][2] == _CLASSIFICATION_FIELDS else "generation"
    if labels and kind == "generation":
        raise KilnError(
            f"A label set was given for {path}, but its lines have input/target fields "
            "(a generation task): labels only apply to text/label lines. Remove the labels."
        )
    if kind == "classification":
        allowed = tuple(sorted(set(labels))) if labels else _train_labels(rows)
        for number, _, _, example in rows:
            if example.target not in allowed:
                how = (
                    "the given label set"
                    if labels
                    else "the train split's labels (a label must occur in train)"
                )
                raise KilnError(
                    f"{path}, line {number}: label {example.target!r} is not in {how}: "
                    f"{', '.join(map(repr, allowed))}. Fix the label, or "
                    + ("add it to the label set." if labels else "add train examples with it.")
                )
    else:
        allowed = ()
    pairs = [(split, example) for _, split, _, example in rows]
    metrics = CLASSIFICATION_METRICS if kind == "classification" else GENERATION_METRICS
    task = _task("jsonl", kind, pairs, metrics, allowed)
    for split, examples in task.splits.items():
        if not examples:
            raise KilnError(
                f"{path} has no {split} examples ({len(rows)} in all). Give every line a "
                "'split' field (train, validation or test) with some of each, or drop the field "
                "everywhere to split by md5 of the id (about 80/10/10, needs a few dozen lines)."
            )
    return task


def _train_labels(rows: list[tuple[int, str, tuple[str, str], Example]]) -> tuple[str, ...]:
    return tuple(sorted({e.target for _, split, _, e in rows if split == "train"}))


def _jsonl_rows(path: pathlib.Path, kind: str) -> list[tuple[int, str, tuple[str, str], Example]]:
    """(line number, split, field names, example) per non-blank line."""
    rows = []
    for number, line in enumerate(corpus._read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        record = corpus.json_object(path, number, line, _JSONL_EXAMPLE)
        fields = _fields_of(path, number, record, kind, rows[0] if rows else None)
        source, target = (record[field] for field in fields)
        if not target.strip():
            raise KilnError(
                f"{path}, line {number}: the {fields[1]!r} field is empty. Every example needs "
                "a non-empty target or label: fix or remove the line."
            )
        example_id = _id_of(path, number, record, source)
        split = _split_of(path, number, record, example_id)
        rows.append((number, split, fields, Example(example_id, source, target)))
    if not rows:
        raise KilnError(
            f"{path} holds no examples (it is empty or whitespace only): add one JSON object "
            "per line."
        )
    return rows


def _fields_of(
    path: pathlib.Path,
    number: int,
    record: dict,
    kind: str,
    first: tuple[int, str, tuple[str, str], Example] | None,
) -> tuple[str, str]:
    """The (input, target) field names of a line; checks they are strings and consistent."""
    pairs = (_CLASSIFICATION_FIELDS, _GENERATION_FIELDS)
    styles = [pair for pair in pairs if any(field in record for field in pair)]
    if len(styles) != 1:
        found = "both" if styles else "neither"
        raise KilnError(
            f"{path}, line {number}: found {found} of text/label (classification) and "
            "input/target (generation). Use one pair of fields on every line."
        )
    fields = styles[0]
    for field in fields:
        if not isinstance(record.get(field), str):
            problem = "is missing" if field not in record else "is not a string"
            raise KilnError(
                f"{path}, line {number}: the {field!r} field {problem}. Each line needs string "
                f"fields {fields[0]!r} and {fields[1]!r}."
            )
    wanted = _CLASSIFICATION_FIELDS if kind == "classification" else _GENERATION_FIELDS
    if kind and fields != wanted:
        raise KilnError(
            f"{path}, line {number}: a {kind} task needs {wanted[0]!r} and {wanted[1]!r} fields, "
            f"found {fields[0]!r} and {fields[1]!r}. Rename the fields or change the task kind."
        )
    if first is not None and fields != first[2]:
        raise KilnError(
            f"{path}, line {number}: uses {fields[0]!r}/{fields[1]!r} but line {first[0]} uses "
            f"{first[2][0]!r}/{first[2][1]!r}. Use the same fields on every line."
        )
    return fields


def _id_of(path: pathlib.Path, number: int, record: dict, source: str) -> str:
    """The line's ``id`` (a string or an integer), else md5 of its input text."""
    if "id" not in record:
        return hashlib.md5(source.encode("utf-8")).hexdigest()
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise KilnError(
            f"{path}, line {number}: the 'id' field must be a string or an integer, found "
            f"{value!r}. Fix it or drop the field (the id then is md5 of the input)."
        )
    return str(value)


def _split_of(path: pathlib.Path, number: int, record: dict, example_id: str) -> str:
    """The line's ``split`` field, else the md5 split of its id."""
    if "split" not in record:
        return corpus.split_of(example_id)
    value = record["split"]
    split = corpus._SPLIT_ALIASES.get(value) if isinstance(value, str) else None
    if split is None:
        raise KilnError(
            f"{path}, line {number}: unknown split {value!r}; use one of "
            f"{', '.join(corpus.SPLITS)} (or 'val'), or drop the field to split by md5 of the id."
        )
    return split
