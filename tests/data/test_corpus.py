"""Tests for kiln.data.corpus and data/build_data.py on the shipped tiny slices."""

import collections
import hashlib
import json
import lzma
import pathlib
import shutil
import subprocess
import sys

import pytest

from kiln.data import corpus
from kiln.errors import KilnError

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "data"
TINY = DATA / "tiny"
SPLITS = ("train", "validation", "test")


def independent_split(key: str) -> str:
    """The split rule, written differently from the code under test."""
    bucket = int.from_bytes(hashlib.md5(key.encode()).digest(), "big") % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


def tsv_rows(path: pathlib.Path) -> list[list[str]]:
    """Read an .xz TSV without its header."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


def expected_bible(path: pathlib.Path, column: int) -> dict[str, list[str]]:
    """Chapter documents per split, built straight from the TSV."""
    chapters, books = collections.OrderedDict(), []
    for row in tsv_rows(path):
        book, chapter = row[0].rsplit(" ", 1)[0], row[0].rsplit(" ", 1)[1].split(":")[0]
        if book not in books:
            books.append(book)
        chapters.setdefault((book, len(books), chapter), []).append(row[column])
    out = {split: [] for split in SPLITS}
    for (book, number, chapter), verses in chapters.items():
        out[independent_split(f"bible:{number}:{chapter}")].append(
            f"{book} {chapter}\n" + " ".join(verses)
        )
    return out


def test_split_of_matches_md5_and_is_80_10_10():
    keys = [f"key-{i}" for i in range(20000)]
    assert all(corpus.split_of(k) == independent_split(k) for k in keys[:2000])
    counts = collections.Counter(corpus.split_of(k) for k in keys)
    assert abs(counts["train"] / len(keys) - 0.8) < 0.02
    assert abs(counts["validation"] / len(keys) - 0.1) < 0.015
    assert abs(counts["test"] / len(keys) - 0.1) < 0.015
    assert corpus.split_of("bible:1:1") == independent_split("bible:1:1")


def test_default_data_dir(monkeypatch):
    monkeypatch.delenv("KILN_DATA_DIR", raising=False)
    assert corpus.default_data_dir() == DATA
    monkeypatch.setenv("KILN_DATA_DIR", str(TINY))
    assert corpus.default_data_dir() == TINY
    assert len(corpus.read_documents("bible_kjv", "train")) == len(
        corpus.read_documents("bible_kjv", "train", data_dir=TINY)
    )


@pytest.mark.parametrize("source", ["bible", "bible_kjv", "bible_web", "wordnet"])
@pytest.mark.parametrize("split", SPLITS)
def test_tiny_sources_nonempty(source, split):
    documents = corpus.read_documents(source, split, data_dir=TINY)
    assert documents and all(d.strip() for d in documents)


@pytest.mark.parametrize("source,column", [("bible_kjv", 2), ("bible_web", 3)])
def test_bible_whole_chapters_per_split(source, column):
    expected = expected_bible(TINY / corpus.BIBLE_FILE, column)
    for split in SPLITS:
        assert corpus.read_documents(source, split, data_dir=TINY) == expected[split]


def test_bible_splits_disjoint_and_complete():
    headings = {
        s: [d.split("\n")[0] for d in corpus.read_documents("bible", s, TINY)] for s in SPLITS
    }
    chapters = {r[0].rsplit(":", 1)[0] for r in tsv_rows(TINY / corpus.BIBLE_FILE)}
    for split, names in headings.items():
        assert len(names) == 2 * len(set(names))  # each chapter once per translation
        for other in SPLITS:
            assert other == split or not set(names) & set(headings[other])
    assert set().union(*map(set, headings.values())) == chapters
    assert sum(map(len, headings.values())) == 2 * len(chapters) == 2 * 66
    kjv_web = corpus.read_documents("bible_kjv,bible_web", "test", TINY)
    assert corpus.read_documents("bible", "test", TINY) == kjv_web


def test_wordnet_splits_disjoint_and_complete():
    rows = tsv_rows(TINY / corpus.WORDNET_FILE)
    by_split = {s: corpus.read_documents("wordnet", s, TINY) for s in SPLITS}
    assert sum(map(len, by_split.values())) == len(rows)
    expected = {s: [] for s in SPLITS}
    for synset, pos, _, lemmas, gloss in rows:
        doc = f"{lemmas.replace('|', ', ')} ({pos}): {gloss}"
        expected[independent_split(f"wn:{synset}")].append(doc)
    assert by_split == expected
    assert len(set().union(*map(set, by_split.values()))) == len(set(sum(by_split.values(), [])))


def test_same_order_every_time():
    first = corpus.read_documents("wordnet,bible", "validation", TINY)
    corpus._CACHE.clear()
    assert corpus.read_documents("wordnet,bible", "validation", TINY) == first
    assert corpus.read_documents("wordnet,bible", "validation", TINY) == first


@pytest.mark.slow
def test_full_corpora_counts():
    bible = sum(len(corpus.read_documents("bible", s, DATA)) for s in SPLITS)
    wordnet = [len(corpus.read_documents("wordnet", s, DATA)) for s in SPLITS]
    assert bible == 2 * 1189
    assert wordnet == [94045, 11788, 11826]


def test_txt_source(tmp_path):
    docs = [f"Document {i} first line.\nDocument {i} second line." for i in range(200)]
    text = "\n\n".join(docs[:100]) + "\n\n  \n\n\n" + "\n\n".join(docs[100:]) + "\n"
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    got = {s: corpus.read_documents(str(path), s) for s in SPLITS}
    assert sorted(sum(got.values(), [])) == sorted(docs)
    assert all(corpus.split_of(d) == s for s, ds in got.items() for d in ds)


def test_jsonl_source(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "fixed train", "split": "train"}, {"text": "fixed val", "split": "val"}]
    rows += [{"text": "fixed test", "split": "test"}]
    free = tmp_path / "free.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    free_rows = [{"id": i, "text": f"row {i}"} for i in range(150)] + [{"text": "no id here"}]
    free.write_text("\n".join(json.dumps(r) for r in free_rows), encoding="utf-8")
    assert corpus.read_documents(str(path), "train") == ["fixed train"]
    assert corpus.read_documents(str(path), "validation") == ["fixed val"]
    assert corpus.read_documents(str(path), "test") == ["fixed test"]
    for split in SPLITS:
        want = [
            r["text"] for r in free_rows if corpus.split_of(str(r.get("id", r["text"]))) == split
        ]
        assert corpus.read_documents(str(free), split) == want


def test_directory_source(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(f"\nText of file {i}.\n\nMore.\n", encoding="utf-8")
    (folder / "skip.md").write_text("not a .txt file", encoding="utf-8")
    for split in SPLITS:
        want = [
            f"Text of file {i}.\n\nMore."
            for i in range(60)
            if corpus.split_of(f"doc{i:02d}.txt") == split
        ]
        assert corpus.read_documents(str(folder), split) == want
    both = corpus.read_documents(f"{folder}, bible_kjv", "train", data_dir=TINY)
    assert len(both) == len(corpus.read_documents(str(folder), "train")) + 50


def raises(spec: str, split: str = "train", data_dir=None) -> str:
    """Return the KilnError message of a read_documents call."""
    with pytest.raises(KilnError) as info:
        corpus.read_documents(spec, split, data_dir)
    return str(info.value)


def test_unknown_source_and_split():
    message = raises("bibel")
    assert "'bibel'" in message and "bible_kjv" in message and "wordnet" in message
    assert "dev" in raises("bible", "dev", TINY)
    assert "no source" in raises(" , ")


def test_missing_files(tmp_path, monkeypatch):
    assert str(tmp_path / "nope.txt") in raises(str(tmp_path / "nope.txt"))
    message = raises("bible", data_dir=tmp_path)
    assert str(tmp_path / corpus.BIBLE_FILE) in message and "KILN_DATA_DIR" in message
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path))
    assert str(tmp_path / corpus.WORDNET_FILE) in raises("wordnet")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first doc\n\ncaf\u00e9 au lait\n".encode("latin-1"))
    message = raises(str(path))
    assert str(path) in message and "line 3" in message and "14" in message
    assert "iconv" in message


def test_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert str(empty) in raises(str(empty))
    assert "not found" in raises(str(tmp_path / "empty_dir"))
    (tmp_path / "empty_dir").mkdir()
    assert str(tmp_path / "empty_dir") in raises(str(tmp_path / "empty_dir"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n', encoding="utf-8")
    message = raises(str(bad))
    assert str(bad) in message and "line 2" in message
    odd = tmp_path / "table.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    assert str(odd) in raises(str(odd))


def test_zero_documents_for_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("A single document.\n", encoding="utf-8")
    empty_split = next(s for s in SPLITS if s != corpus.split_of("A single document."))
    message = raises(str(path), empty_split)
    assert str(path) in message and repr(empty_split) in message


def build_data(*args: str) -> subprocess.CompletedProcess:
    """Run data/build_data.py with this interpreter."""
    cmd = [sys.executable, str(DATA / "build_data.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_build_data_check_passes_on_shipped_data():
    result = build_data("--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == 5  # bible, wordnet; their tiny slices and sympy's


@pytest.mark.slow
def test_build_data_check_fails_on_corrupted_copy(tmp_path):
    for name in (corpus.BIBLE_FILE, corpus.WORDNET_FILE):
        shutil.copy(DATA / name, tmp_path / name)
    assert build_data("--check", "--data-dir", str(tmp_path)).returncode == 0
    with lzma.open(DATA / corpus.BIBLE_FILE) as f:
        content = f.read()
    with lzma.open(tmp_path / corpus.BIBLE_FILE, "wb", preset=0) as f:
        f.write(content.replace(b"In the beginning", b"In the Beginning", 1))
    result = build_data("--check", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert corpus.BIBLE_FILE in result.stderr and corpus.WORDNET_FILE not in result.stderr


def test_sympy_source_is_code_without_docstrings():
    records = [
        json.loads(line)
        for line in lzma.open(corpus.default_data_dir() / corpus.SYMPY_FILE, "rt")
        if line.strip()
    ]
    train = corpus.read_documents("sympy", "train")
    assert len(train) == 6009 and len(corpus.read_documents("sympy", "test")) == 869
    assert train == [r["code"] for r in records if r["split"] == "train"]
    # The summaries are code_summary's labels: the docstrings never reach pre-training.
    docstrings = [r["prompt"].split('"""')[1] for r in records[:200] if '"""' in r["prompt"]]
    assert docstrings and not any(d in doc for d in docstrings for doc in train[:200])
