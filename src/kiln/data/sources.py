"""Streaming document sources: plain text, JSONL and Parquet files, optionally gzip/xz/zstd
compressed, named by a path, a directory or a glob, read one document at a time.

Every document belongs to a split by :func:`split_of` of a key, as kiln always did: a text
file's blank-line-separated block by its text; a file in a directory of text files (one document
each) by its path relative to the directory; a JSONL/Parquet record by its ``split`` field if it
has one, else its ``id``, else its text.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import pathlib
import zlib
from collections.abc import Iterator

from kiln.errors import KilnError

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
SPLIT_RULE = (
    "md5(key) % 100: < 10 test, < 20 validation, else train; key = a text block's text, a"
    " directory file's relative path, a record's id (else its text); a record's split field wins"
)
COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_RECORD_BATCH = 1024  # Parquet rows per batch read


def split_of(key: str) -> str:
    """Return the split of a group key: md5 bucket < 10 test, < 20 validation, else train."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < 10:
        return "test"
    return "validation" if bucket < 20 else "train"


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file: ``kind`` txt | jsonl | parquet | document (a directory's text file, one
    document), ``compression`` "" | gzip | xz | zstd, ``key`` its split key as a document."""

    path: pathlib.Path
    kind: str
    compression: str = ""
    key: str = ""


def describe(path: pathlib.Path) -> tuple[str, str] | None:
    """(kind, compression) from a file name's suffixes, or None for an unsupported file."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = COMPRESSIONS.get(suffixes[-1], "") if suffixes else ""
    if compression:
        suffixes = suffixes[:-1]
    kind = KINDS.get(suffixes[-1]) if suffixes else None
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


SUPPORTED = (
    ".txt (documents separated by blank lines), .jsonl (a text field per line), .parquet, each"
    " of the first two also as .gz/.xz/.zst; a directory (its .txt files one document each) or"
    " a glob"
)


def expand(pattern: str) -> list[SourceFile]:
    """The files a path, directory or glob names, sorted; a KilnError if it names none."""
    path = pathlib.Path(pattern).expanduser()
    if glob.has_magic(pattern):
        names = sorted(glob.glob(str(path), recursive=True))
        files = [_file(pathlib.Path(n), None) for n in names if os.path.isfile(n)]
        files = [f for f in files if f is not None]
        if not files:
            raise KilnError(
                f"The glob {pattern!r} matches no supported file ({len(names)} paths matched):"
                f" fix the pattern; supported are {SUPPORTED}."
            )
        return files
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [f for p in found if (f := _file(p, path)) is not None]
        if not files:
            raise KilnError(
                f"Data source {path} is a directory with no supported file (it has"
                f" {len(found)} files): add files, or point at another folder; supported are"
                f" {SUPPORTED}."
            )
        return files
    if not path.is_file():
        raise KilnError(
            f"Data source {pattern!r} not found: no file or folder at {path.resolve()}. Fix"
            " the path (relative paths start from the working directory)."
        )
    file = _file(path, None)
    if file is None:
        raise KilnError(
            f"Data source {path} has an unsupported type {''.join(path.suffixes)!r}: use"
            f" {SUPPORTED}."
        )
    return [file]


def _file(path: pathlib.Path, directory: pathlib.Path | None) -> SourceFile | None:
    """A SourceFile for ``path`` (inside ``directory``, if any), None if unsupported."""
    found = describe(path)
    if found is None:
        return None
    kind, compression = found
    if directory is not None and kind == "txt":
        return SourceFile(path, "document", compression, path.relative_to(directory).as_posix())
    return SourceFile(path, kind, compression)


def open_binary(file: SourceFile) -> io.BufferedIOBase:
    """The decompressed bytes of a file, streaming."""
    if file.compression == "gzip":
        return gzip.open(file.path, "rb")
    if file.compression == "xz":
        return lzma.open(file.path, "rb")
    if file.compression == "zstd":
        zstandard = _optional("zstandard", file.path)
        raw = open(file.path, "rb")  # noqa: SIM115 (closed with the reader)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader)
    return open(file.path, "rb")


def _optional(package: str, path: pathlib.Path):
    """Imports an optional package, or a KilnError naming it and the file that needs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise KilnError(
            f"Reading {path} needs the Python package {package!r}, which is not installed:"
            f" `pip install {package}` (or convert the file to a supported format)."
        ) from None


def lines(file: SourceFile) -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) for each line, decoded as UTF-8, streaming.

    A KilnError names the file, the line and the byte offset (in the decompressed content for a
    compressed file) of the first byte that is not UTF-8, or of a corrupt compressed stream.
    """
    offset, number = 0, 0
    where = " of the decompressed content" if file.compression else ""
    try:
        with open_binary(file) as f:
            for number, raw in enumerate(f, start=1):  # noqa: B007 (number is reported)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise KilnError(
                        f"{file.path} is not UTF-8: line {number}, byte {e.start} of the line"
                        f" (byte offset {offset + e.start}{where}) is 0x{raw[e.start]:02x}."
                        " Convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8"
                        f" {file.path} > converted{''.join(file.path.suffixes)}`, and use that."
                    ) from e
                if number == 1:
                    text = text.removeprefix("\ufeff")
                offset += len(raw)
                yield number, text.rstrip("\n").removesuffix("\r")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise KilnError(f"Cannot read {file.path}: {e}. Check the path.") from e
        raise KilnError(
            f"{file.path} is not a valid {file.compression or 'readable'} file: {e}, after"
            f" {offset:,} bytes{where} (line {number + 1}). Copy it again or re-create it."
        ) from e
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__name__ != "ZstdError":
            raise
        raise KilnError(
            f"{file.path} is not a valid zstd file: {e}, after {offset:,} bytes{where} (line"
            f" {number + 1}). Copy it again or re-create it."
        ) from e


def json_object(path: str | os.PathLike, number: int, line: str, example: str) -> dict:
    """Line `number` of a JSONL file as a dict; a KilnError naming the file and line (and
    showing `example`, a valid line) if it is not valid JSON or not an object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise KilnError(
            f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}). Each line "
            f"must be one JSON object, e.g. {example}."
        ) from None
    if not isinstance(record, dict):
        raise KilnError(
            f"{path}, line {number}: expected a JSON object, found {type(record).__name__}. "
            f"Write each line as e.g. {example}."
        )
    return record


def documents(file: SourceFile, field: str = "text") -> Iterator[tuple[str, str]]:
    """(split, document) for each document of a file, in file order, streaming."""
    if file.kind == "txt":
        yield from _text_blocks(file)
    elif file.kind == "document":
        text = "\n".join(line for _, line in lines(file)).strip()
        if text:
            yield split_of(file.key), text
    elif file.kind == "jsonl":
        yield from _jsonl(file, field)
    else:
        yield from _parquet(file, field)


def _text_blocks(file: SourceFile) -> Iterator[tuple[str, str]]:
    block: list[str] = []
    for _, line in lines(file):
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield split_of("\n".join(block)), "\n".join(block)
            block = []
    if block:
        yield split_of("\n".join(block)), "\n".join(block)


def record_split(path: object, where: str, record: dict, text: str) -> str:
    """The split of a record: its ``split`` field, else md5 of its ``id``, else of its text."""
    value = record.get("split")
    if value is not None:
        split = SPLIT_ALIASES.get(value) if isinstance(value, str) else None
        if split is None:
            raise KilnError(
                f"{path}, {where}: unknown split {value!r}; use one of {', '.join(SPLITS)} (or"
                " 'val'), or drop the field to split by md5."
            )
        return split
    return split_of(str(record["id"]) if record.get("id") is not None else text)


def _jsonl(file: SourceFile, field: str) -> Iterator[tuple[str, str]]:
    example = json.dumps({field: "..."})
    for number, line in lines(file):
        if not line.strip():
            continue
        record = json_object(file.path, number, line, example)
        text = record.get(field)
        if not isinstance(text, str):
            raise KilnError(
                f"{file.path}, line {number}: expected a JSON object with a string {field!r}"
                " field. Add one, convert the file so that each line has it, or name the field"
                " that holds the text (field=... in data.sources)."
            )
        split = record_split(file.path, f"line {number}", record, text)
        if text.strip():
            yield split, text


def _parquet(file: SourceFile, field: str) -> Iterator[tuple[str, str]]:
    parquet = _optional("pyarrow.parquet", file.path)
    try:
        reader = parquet.ParquetFile(file.path)
    except Exception as e:
        raise KilnError(f"{file.path} is not a valid Parquet file ({e}); re-create it.") from e
    names = reader.schema_arrow.names
    if field not in names:
        raise KilnError(
            f"{file.path} has no column {field!r} (its columns: {', '.join(names)}): name the"
            " column that holds the text (field=... in data.sources)."
        )
    columns = [field] + [c for c in ("id", "split") if c in names and c != field]
    row = 0
    for batch in reader.iter_batches(batch_size=_RECORD_BATCH, columns=columns):
        for record in batch.to_pylist():
            row += 1
            text = record[field]
            if not isinstance(text, str):
                raise KilnError(
                    f"{file.path}, row {row}: column {field!r} is {type(text).__name__}, not a"
                    " string: name a text column (field=... in data.sources)."
                )
            split = record_split(file.path, f"row {row}", record, text)
            if text.strip():
                yield split, text


def fingerprint(path: pathlib.Path) -> dict:
    """A file's identity: size, modification time and the sha256 of its bytes."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
