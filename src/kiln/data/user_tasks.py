"""The ``jsonl`` task: labeled examples from a user's JSONL file.

One JSON object per line, with one of these field sets (names as written here, or renamed by
``task.fields``, e.g. ``"text=sentence1,text_pair=sentence2,label=score"``):

- classification: string ``text`` and ``label``; sentence pairs add a string ``text_pair``;
- regression: ``text`` (and ``text_pair``) and a numeric ``label`` (a JSON number, or a string
  that parses as one with kind regression);
- generation: string ``input`` and ``target``.

Optional on every line: ``id`` (a string or an integer; default md5 of the text/input) and
``split`` (``train``, ``validation``/``val``, ``test``; default
:func:`~kiln.data.corpus.split_of` of the id). The kind is inferred from the first line (a
numeric label: regression) unless given; every line must use the same fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

from kiln.data import chat, squad, tasks, user_lines
from kiln.errors import KilnError

FIELDS = ("text", "text_pair", "label", "input", "target")
_LABELED = ("text", "label")
_GENERATION = ("input", "target")
_EXAMPLE = '{"text": "...", "label": "..."} or {"input": "...", "target": "..."}'
_METRICS = {
    "classification": tasks.CLASSIFICATION_METRICS,
    "regression": tasks.REGRESSION_METRICS,
    "generation": tasks.GENERATION_METRICS,
}


@dataclasses.dataclass(frozen=True)
class _Row:
    number: int  # line number in the file
    split: str
    kind: str
    fields: tuple[str, str]  # (source, target) field names
    example: tasks.Example


def load_any(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike = "",
    kind: str = "",
    labels: Sequence[str] = (),
    fields: Mapping[str, str] | None = None,
) -> tasks.Task:
    """Any task by name: a user file's, from ``path`` (``jsonl``: :func:`load_jsonl`, or
    :func:`kiln.data.chat.load_chat` when its first line has ``messages`` or ``kind`` is
    ``chat``, as for ``chat``; ``squad``: :func:`kiln.data.squad.load_squad`), or a shipped one
    (:func:`kiln.data.tasks.load_task`, from ``data_dir``)."""
    if name == chat.NAME or (name == "jsonl" and chat.is_chat_file(path, kind)):
        _no_options(name, chat.KIND, kind, labels, fields, "a JSONL file of 'messages' lists")
        return chat.load_chat(path, name)
    if name == "jsonl":
        return load_jsonl(path, kind, labels, fields or {})
    if name == "squad":
        _no_options(name, squad.KIND, kind, labels, fields, "SQuAD's")
        return squad.load_squad(str(path))
    return tasks.load_task(
        name, data_dir=data_dir, path=path, kind=kind, labels=labels, fields=fields
    )


def _no_options(
    name: str,
    own: str,
    kind: str,
    labels: Sequence[str],
    fields: Mapping[str, str] | None,
    format_: str,
) -> None:
    """Refuses the jsonl-only options for a task of fixed kind `own` and format."""
    given = [k for k, v in (("kind", kind), ("labels", labels), ("fields", fields)) if v]
    if given and (kind != own or labels or fields):
        raise KilnError(
            f"Task {name} takes no {', '.join(given)}: its kind is {own} and its format"
            f" {format_}. Remove them."
        )


def parse_fields(spec: str) -> dict[str, str]:
    """``task.fields`` ("text=sentence1,label=score") as {kiln's name: the file's name}."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        ours, _, theirs = (part.strip() for part in item.partition("="))
        if ours not in FIELDS or not theirs or ours in out:
            raise KilnError(
                f"task.fields={spec!r}: bad entry {item!r}. Use comma-separated NAME=FIELD with"
                f" NAME one of {', '.join(FIELDS)} (each once) and FIELD your file's key, e.g."
                " 'text=sentence1,text_pair=sentence2,label=score'."
            )
        out[ours] = theirs
    return out


def load_jsonl(
    path: str | os.PathLike, kind: str, labels: Sequence[str], fields: Mapping[str, str]
) -> tasks.Task:
    """The ``jsonl`` task from a user file (module docstring), cached per file version."""
    if not str(path):
        raise KilnError(
            "Task jsonl needs the path of a .jsonl file: set the task path option to a file "
            'with one JSON object per line, e.g. {"text": "...", "label": "..."}.'
        )
    if kind and kind not in _METRICS:
        raise KilnError(
            f"Unknown task kind {kind!r} for {path}: use {', '.join(_METRICS)}, or leave it"
            " empty to infer it from the fields of the first line."
        )
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise KilnError(
            f"Task data file {path} not found: no file at {file.resolve()}. Fix the task path "
            "(relative paths start from the working directory)."
        )
    if labels and kind in ("generation", "regression"):
        raise KilnError(
            f"A label set was given for the {kind} task in {file}: labels only apply to "
            "classification. Remove them, or set the kind to classification."
        )
    key = ("jsonl", *tasks._file_key(file), kind, tuple(labels), tuple(sorted(fields.items())))
    return tasks._cached(key, lambda: _build(file, kind, tuple(labels), dict(fields)))


def _build(
    path: pathlib.Path, kind: str, labels: tuple[str, ...], fields: dict[str, str]
) -> tasks.Task:
    rows = _rows(path, kind, fields)
    kind = rows[0].kind
    if labels and kind != "classification":
        raise KilnError(
            f"A label set was given for {path}, but its lines make a {kind} task: labels only"
            " apply to classification (text/label lines with string labels). Remove them."
        )
    allowed: tuple[str, ...] = ()
    if kind == "classification":
        allowed = tuple(sorted(set(labels))) if labels else _train_labels(rows)
        for row in rows:
            if row.example.target not in allowed:
                how = (
                    "the given label set"
                    if labels
                    else "the train split's labels (a label must occur in train)"
                )
                raise KilnError(
                    f"{path}, line {row.number}: label {row.example.target!r} is not in {how}: "
                    f"{', '.join(map(repr, allowed))}. Fix the label, or "
                    + ("add it to the label set." if labels else "add train examples with it.")
                )
    pairs = bool(rows[0].example.pair)
    task = tasks._task("jsonl", kind, [(r.split, r.example) for r in rows], _METRICS[kind], allowed)
    task = dataclasses.replace(
        task, pairs=pairs, template=tasks.PAIR_TEMPLATE if pairs else task.template
    )
    for split, examples in task.splits.items():
        if not examples:
            raise KilnError(
                f"{path} has no {split} examples ({len(rows)} in all). Give every line a "
                "'split' field (train, validation or test) with some of each, or drop the field "
                "everywhere to split by md5 of the id (about 80/10/10, needs a few dozen lines)."
            )
    return task


def _train_labels(rows: list[_Row]) -> tuple[str, ...]:
    return tuple(sorted({r.example.target for r in rows if r.split == "train"}))


def _rows(path: pathlib.Path, kind: str, fields: dict[str, str]) -> list[_Row]:
    """One `_Row` per non-blank line."""
    renamed = {theirs: ours for ours, theirs in fields.items()}
    rows: list[_Row] = []
    for number, record in user_lines.records(path, _EXAMPLE):
        record = {renamed.get(k, k): v for k, v in record.items() if k not in fields}
        rows.append(_row(path, number, record, kind, rows[0] if rows else None, fields))
    if not rows:
        raise KilnError(
            f"{path} holds no examples (it is empty or whitespace only): add one JSON object "
            "per line."
        )
    return rows


def _row(
    path: pathlib.Path,
    number: int,
    record: dict,
    kind: str,
    first: _Row | None,
    names: dict[str, str],
) -> _Row:
    """A line's `_Row`; checks its fields against `kind` and the first line."""
    where = f"{path}, line {number}"
    shown = {f: repr(names.get(f, f)) for f in FIELDS}
    styles = [pair for pair in (_LABELED, _GENERATION) if any(field in record for field in pair)]
    if len(styles) != 1:
        found = "both" if styles else "neither"
        raise KilnError(
            f"{where}: found {found} of {shown['text']}/{shown['label']} (classification,"
            f" regression) and {shown['input']}/{shown['target']} (generation). Use one pair of"
            " fields on every line."
        )
    fields = styles[0]
    if kind and fields != (_GENERATION if kind == "generation" else _LABELED):
        wanted = _GENERATION if kind == "generation" else _LABELED
        raise KilnError(
            f"{where}: a {kind} task needs {shown[wanted[0]]} and {shown[wanted[1]]} fields, "
            f"found {shown[fields[0]]} and {shown[fields[1]]}. Rename the fields (task.fields)"
            " or change the task kind."
        )
    if first is not None and fields != first.fields:
        raise KilnError(
            f"{where}: uses {shown[fields[0]]}/{shown[fields[1]]} but line {first.number} uses "
            f"{shown[first.fields[0]]}/{shown[first.fields[1]]}. Use the same fields on every"
            " line."
        )
    value = record.get(fields[1])
    if fields == _GENERATION:
        line_kind = "generation"
    elif kind or first is not None:
        line_kind = kind or first.kind
    else:
        line_kind = "regression" if _is_number(value) else "classification"
    source = _string(where, record, fields[0], shown)
    target = _target(where, value, line_kind, fields[1], shown)
    pair = _pair(where, record, fields, first, shown)
    example_id = user_lines.id_of(where, record, source)
    split = user_lines.split_of(where, record, example_id)
    return _Row(number, split, line_kind, fields, tasks.Example(example_id, source, target, pair))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(where: str, record: dict, field: str, shown: dict[str, str]) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        problem = "is missing" if field not in record else "is not a string"
        raise KilnError(
            f"{where}: the {shown[field]} field {problem}. Each line needs a string"
            f" {shown[field]} field."
        )
    return value


def _target(where: str, value: object, kind: str, field: str, shown: dict[str, str]) -> str:
    """The target text: a label or target string, or a regression value as ``repr(float)``."""
    if kind != "regression":
        if not isinstance(value, str):
            problem = "is missing" if value is None else "is not a string"
            raise KilnError(
                f"{where}: the {shown[field]} field {problem}. Each line of a {kind} task needs"
                f" a string {shown[field]} field."
            )
        if not value.strip():
            raise KilnError(
                f"{where}: the {shown[field]} field is empty. Every example needs a non-empty"
                " target or label: fix or remove the line."
            )
        return value
    number = None
    if _is_number(value):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise KilnError(
            f"{where}: the {shown[field]} field is {value!r}, not a finite number. A regression"
            " task needs a numeric label on every line: fix or remove the line."
        )
    return repr(number)


def _pair(
    where: str, record: dict, fields: tuple[str, str], first: _Row | None, shown: dict[str, str]
) -> str:
    """The line's ``text_pair`` ("" when absent); pairs are all or nothing."""
    has = "text_pair" in record
    if has and fields == _GENERATION:
        raise KilnError(
            f"{where}: {shown['text_pair']} is for text/label lines (sentence-pair"
            " classification or regression); a generation line has input/target. Put both"
            " texts in the input, or use text/text_pair/label."
        )
    if first is not None and has != bool(first.example.pair):
        state = "has" if has else "lacks"
        other = "lacks" if has else "has"
        raise KilnError(
            f"{where}: {state} a {shown['text_pair']} field but line {first.number} {other} one."
            " A task is all sentence pairs or all single texts."
        )
    if not has:
        return ""
    pair = _string(where, record, "text_pair", shown)
    if not pair.strip():
        raise KilnError(
            f"{where}: the {shown['text_pair']} field is empty. A sentence pair needs both"
            " texts: fix or remove the line."
        )
    return pair
