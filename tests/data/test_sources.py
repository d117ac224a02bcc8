"""Tests for kiln.data.sources: every file kind streamed, compressed, by glob and directory,
and the errors on bad input."""

import gzip
import importlib.util
import json
import lzma

import pytest

from kiln.data import corpus, sources
from kiln.errors import KilnError

DOCS = [f"Document {i} says hello.\nIts second line {i * 7}." for i in range(120)]


def read(pattern: str, field: str = "text") -> list[tuple[str, str]]:
    return [d for f in sources.expand(pattern) for d in sources.documents(f, field)]


def text_bytes() -> bytes:
    return ("\n\n".join(DOCS) + "\n").encode()


def jsonl_bytes(field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(DOCS)).encode()


BY_TEXT = [(sources.split_of(d), d) for d in DOCS]
BY_ID = [(sources.split_of(str(i)), d) for i, d in enumerate(DOCS)]


@pytest.mark.parametrize(
    "name, opener",
    [("a.txt", open), ("a.txt.gz", gzip.open), ("a.txt.xz", lzma.open)],
)
def test_text_files_plain_and_compressed(tmp_path, name, opener):
    with opener(tmp_path / name, "wb") as f:
        f.write(text_bytes())
    assert read(str(tmp_path / name)) == BY_TEXT


@pytest.mark.parametrize("name, opener", [("a.jsonl", open), ("a.jsonl.gz", gzip.open)])
def test_jsonl_files_with_a_named_field(tmp_path, name, opener):
    with opener(tmp_path / name, "wb") as f:
        f.write(jsonl_bytes("content"))
    assert read(str(tmp_path / name), "content") == BY_ID
    with pytest.raises(KilnError, match="'text'"):
        read(str(tmp_path / name))


def test_glob_and_directory(tmp_path):
    for i in range(3):
        with gzip.open(tmp_path / f"part{i}.jsonl.gz", "wb") as f:
            f.write(jsonl_bytes())
    (tmp_path / "notes.md").write_text("skipped")
    assert read(str(tmp_path / "part*.jsonl.gz")) == BY_ID * 3
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.txt").write_text("One file, one document.\n\nStill the same one.\n")
    got = read(str(tmp_path))
    assert got == BY_ID * 3 + [
        (sources.split_of("sub/x.txt"), "One file, one document.\n\nStill the same one.")
    ]


def test_corpus_reads_compressed_sources(tmp_path):
    with lzma.open(tmp_path / "a.txt.xz", "wb") as f:
        f.write(text_bytes())
    want = [d for s, d in BY_TEXT if s == "validation"]
    assert want and corpus.read_documents(str(tmp_path / "a.txt.xz"), "validation") == want


def test_optional_packages(tmp_path):
    (tmp_path / "a.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd not really")
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really")
    if importlib.util.find_spec("zstandard") is None:
        with pytest.raises(KilnError, match="zstandard") as info:
            read(str(tmp_path / "a.txt.zst"))
        assert "a.txt.zst" in str(info.value)
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(KilnError, match="pyarrow"):
            read(str(tmp_path / "a.parquet"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(DOCS))), "body": DOCS})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=17)
    assert read(str(tmp_path / "a.parquet"), "body") == BY_ID
    with pytest.raises(KilnError, match="no column 'text'"):
        read(str(tmp_path / "a.parquet"))


def test_zstd(tmp_path):
    import zstandard

    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text_bytes()))
    assert read(str(tmp_path / "a.txt.zst")) == BY_TEXT


def test_bad_input(tmp_path):
    with pytest.raises(KilnError, match="matches no supported file"):
        read(str(tmp_path / "*.jsonl"))
    data = gzip.compress(text_bytes() * 50)
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(KilnError, match="cut.txt.gz is not a valid gzip file") as info:
        read(str(tmp_path / "cut.txt.gz"))
    assert "bytes of the decompressed content" in str(info.value)
    (tmp_path / "bad.txt.xz").write_bytes(b"\xfd7zXZ\x00garbage" * 10)
    with pytest.raises(KilnError, match="bad.txt.xz is not a valid xz file"):
        read(str(tmp_path / "bad.txt.xz"))
    (tmp_path / "latin.txt.gz").write_bytes(gzip.compress("ok\n\ncaf\u00e9\n".encode("latin-1")))
    with pytest.raises(KilnError, match="line 3.*byte offset 7 of the decompressed"):
        read(str(tmp_path / "latin.txt.gz"))
    (tmp_path / "split.jsonl").write_text('{"text": "x", "split": "dev"}\n')
    with pytest.raises(KilnError, match="line 1: unknown split 'dev'"):
        read(str(tmp_path / "split.jsonl"))
    (tmp_path / "table.csv.gz").write_bytes(b"")
    with pytest.raises(KilnError, match="unsupported type"):
        sources.expand(str(tmp_path / "table.csv.gz"))
