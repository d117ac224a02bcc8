"""The lines of a user's JSONL task file (``jsonl``, ``chat``): records, ids and splits."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterator

from kiln.data import corpus
from kiln.errors import KilnError


def records(path: pathlib.Path, example: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line; `example` (a valid line) is shown in
    the error for a line that is not one JSON object."""
    for number, line in enumerate(corpus._read_text(path).split("\n"), start=1):
        if line.strip():
            yield number, corpus.json_object(path, number, line, example)


def id_of(where: str, record: dict, source: str) -> str:
    """The line's ``id`` (a string or an integer), else md5 of `source` (its input text)."""
    if "id" not in record:
        return hashlib.md5(source.encode("utf-8")).hexdigest()
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise KilnError(
            f"{where}: the 'id' field must be a string or an integer, found "
            f"{value!r}. Fix it or drop the field (the id then is md5 of the input)."
        )
    return str(value)


def split_of(where: str, record: dict, example_id: str) -> str:
    """The line's ``split`` field, else the md5 split of its id."""
    if "split" not in record:
        return corpus.split_of(example_id)
    value = record["split"]
    split = corpus._SPLIT_ALIASES.get(value) if isinstance(value, str) else None
    if split is None:
        raise KilnError(
            f"{where}: unknown split {value!r}; use one of "
            f"{', '.join(corpus.SPLITS)} (or 'val'), or drop the field to split by md5 of the id."
        )
    return split
