"""Read the shipped corpora and user files (`kiln.data.sources`) as documents, split 80/10/10 by
md5 of a key."""

from __future__ import annotations

import glob
import json
import lzma
import os
import pathlib
from collections.abc import Callable

from kiln.data import sources
from kiln.errors import KilnError

SPLITS = sources.SPLITS
split_of = sources.split_of
json_object = sources.json_object
BIBLE_FILE = "bible_kjv_web.tsv.xz"
WORDNET_FILE = "wordnet30_synsets.tsv.xz"
SYMPY_FILE = "sympy114_functions.jsonl.xz"
SOURCES = ("bible", "bible_kjv", "bible_web", "wordnet", "sympy")
_SPLIT_ALIASES = sources.SPLIT_ALIASES

# (path, mtime_ns, size, parser name) -> parsed rows; each row is (split, document, ...).
_CACHE: dict[tuple[str, int, int, str], list[tuple[str, ...]]] = {}


def default_data_dir() -> pathlib.Path:
    """Return $KILN_DATA_DIR if set, else the repository's data/ folder."""
    env = os.environ.get("KILN_DATA_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path(__file__).resolve().parents[3] / "data"


def data_root(data_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, str]:
    """Return the data folder (``data_dir`` or :func:`default_data_dir`) and its origin."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser(), "data.data_dir"
    if os.environ.get("KILN_DATA_DIR"):
        return default_data_dir(), "the KILN_DATA_DIR environment variable"
    return default_data_dir(), "the default, the repository's data/ folder"


def read_documents(spec: str, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Return the documents of a comma-separated list of sources that fall in one split."""
    if split not in SPLITS:
        raise KilnError(
            f"Unknown split {split!r} for data spec {spec!r}: use one of {', '.join(SPLITS)}."
        )
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise KilnError(
            f"The data spec {spec!r} names no source. Give a comma-separated list of "
            f"{', '.join(SOURCES)} or paths to .txt/.jsonl files or folders of .txt files."
        )
    root, origin = data_root(data_dir)
    documents = []
    for name in names:
        documents.extend(_source_documents(name, split, root, origin))
    if not documents:
        raise KilnError(
            f"The data spec {spec!r} yields no documents for the {split!r} split; add more "
            "text or another source so that every split (about 80/10/10) gets some."
        )
    return documents


def _source_documents(name: str, split: str, root: pathlib.Path, origin: str) -> list[str]:
    """Return the documents of one source in one split."""
    if name in SOURCES:
        if name == "sympy":
            rows = _load(_builtin(root, SYMPY_FILE, name, origin), _parse_sympy)
            return [row[1] for row in rows if row[0] == split]
        if name == "wordnet":
            rows = _load(_builtin(root, WORDNET_FILE, name, origin), _parse_wordnet)
            return [row[1] for row in rows if row[0] == split]
        rows = _load(_builtin(root, BIBLE_FILE, name, origin), _parse_bible)
        kjv = [row[1] for row in rows if row[0] == split] if name != "bible_web" else []
        web = [row[2] for row in rows if row[0] == split] if name != "bible_kjv" else []
        return kjv + web
    path = pathlib.Path(name).expanduser()
    if not path.exists() and not glob.has_magic(name):
        if path.suffix in (".txt", ".jsonl") or "/" in name or os.sep in name:
            raise KilnError(
                f"Data source {name!r} not found: no file or folder at {path.resolve()}. "
                "Fix the path in the data spec (relative paths start from the working directory)."
            )
        raise KilnError(
            f"Unknown data source {name!r}: valid names are {', '.join(SOURCES)}; anything "
            f"else must be the path of an existing file, folder or glob: {sources.SUPPORTED}."
        )
    found = 0
    documents = []
    for file in sources.expand(name):
        for doc_split, document in sources.documents(file):
            found += 1
            if doc_split == split:
                documents.append(document)
    if not found:
        what = "has no non-empty documents" if path.is_dir() else "is empty or whitespace only"
        raise KilnError(
            f"Data source {path} contains no documents (it {what}); remove it from the data "
            "spec or add text to it."
        )
    return documents


def _builtin(root: pathlib.Path, file: str, name: str, origin: str) -> pathlib.Path:
    """Return the path of a shipped corpus file, or raise if it is missing."""
    path = root / file
    if not path.is_file():
        raise KilnError(
            f"Data source {name!r} needs {path}, which does not exist (data folder {root} comes "
            f"from {origin}). Set data.data_dir in the config or the KILN_DATA_DIR environment "
            f"variable to the folder holding {file} (a kiln checkout ships it in data/)."
        )
    return path


def _load(
    path: pathlib.Path, parse: Callable[[pathlib.Path, str], list[tuple[str, ...]]]
) -> list[tuple[str, ...]]:
    """Parse a file once per (path, mtime, size) and cache the rows."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, parse.__name__)
    if key not in _CACHE:
        _CACHE[key] = parse(path, _read_text(path))
    return _CACHE[key]


def _read_text(path: pathlib.Path) -> str:
    """Read a UTF-8 file (decompressing .xz), naming the first bad byte if it is not UTF-8."""
    try:
        data = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    except lzma.LZMAError as e:
        raise KilnError(
            f"{path} is not a valid .xz file ({e}); copy it again, or check the shipped data "
            "with `python data/build_data.py --check`."
        ) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        where = " of the decompressed content" if path.suffix == ".xz" else ""
        raise KilnError(
            f"{path} is not UTF-8: line {line}, byte {column} of the line (byte offset "
            f"{e.start}{where}) is 0x{data[e.start]:02x}. Convert the file to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > converted{path.suffix}`, and use that."
        ) from e
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _fields(path: pathlib.Path, text: str, header: str) -> list[tuple[int, list[str]]]:
    """Split a TSV with a known header into (line number, fields) rows."""
    lines = text.split("\n")
    if lines[0] != header:
        raise KilnError(
            f"{path}, line 1: expected the header {header!r}, found {lines[0][:80]!r}. "
            "Is this the right file? Check it with `python data/build_data.py --check`."
        )
    width = header.count("\t") + 1
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise KilnError(
                f"{path}, line {number}: expected {width} tab-separated fields, found "
                f"{len(fields)}. Restore the file from the repository or rebuild it."
            )
        rows.append((number, fields))
    return rows


def _parse_bible(path: pathlib.Path, text: str) -> list[tuple[str, ...]]:
    """Return one (split, kjv chapter, web chapter) row per chapter, in canonical order."""
    chapters: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    books: dict[str, int] = {}
    for number, (ref, _, kjv, web) in _fields(path, text, "ref\tgenre\tkjv\tweb"):
        book, _, chapter_verse = ref.rpartition(" ")
        chapter = chapter_verse.partition(":")[0]
        if not book or not chapter.isdigit():
            raise KilnError(
                f"{path}, line {number}: bad verse reference {ref!r}, expected 'Book C:V'. "
                "Restore the file from the repository or rebuild it."
            )
        books.setdefault(book, len(books) + 1)
        verses = chapters.setdefault((book, chapter), ([], []))
        verses[0].append(kjv)
        verses[1].append(web)
    return [
        (
            split_of(f"bible:{books[book]}:{chapter}"),
            f"{book} {chapter}\n" + " ".join(kjv),
            f"{book} {chapter}\n" + " ".join(web),
        )
        for (book, chapter), (kjv, web) in chapters.items()
    ]


def _parse_wordnet(path: pathlib.Path, text: str) -> list[tuple[str, ...]]:
    """Return one (split, "lemmas (pos): gloss") row per synset."""
    rows = _fields(path, text, "synset\tpos\tlexname\tlemmas\tgloss")
    return [
        (split_of(f"wn:{synset}"), f"{lemmas.replace('|', ', ')} ({pos}): {gloss}")
        for _, (synset, pos, _, lemmas, gloss) in rows
    ]


def _parse_sympy(path: pathlib.Path, text: str) -> list[tuple[str, ...]]:
    """Return one (split, function source without its docstring) row per SymPy function.

    The docstrings are code_summary's labels, so pre-training text never includes them.
    """
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                rows.append((_SPLIT_ALIASES[record["split"]], record["code"]))
            except (json.JSONDecodeError, KeyError) as e:
                raise KilnError(
                    f"{path}, line {number}: not a SymPy function record ({e}). Restore the"
                    " file from the repository."
                ) from e
    return rows
