"""Tests for kiln.data.token_cache and kiln.data.mixture: cache round trips for every source
kind, resume, stale caches, a full disk, training from the cache, weighted mixtures."""

import errno
import gzip
import itertools
import json
import lzma
import os

import numpy as np
import pytest
from test_pipeline import make_documents

from kiln import inputs, validation
from kiln.data import corpus, mixture, pipeline, sources, token_cache
from kiln.data.tokenizer import train_tokenizer
from kiln.errors import KilnError

DOCS = make_documents(300, seed=4)


def write_sources(root) -> dict[str, tuple[str, str]]:
    """One source of every kind holding DOCS: name -> (pattern, field)."""
    text = ("\n\n".join(DOCS) + "\n").encode()
    rows = "".join(json.dumps({"body": d}) + "\n" for d in DOCS).encode()
    (root / "a.txt").write_bytes(text)
    (root / "a.txt.gz").write_bytes(gzip.compress(text))
    (root / "a.txt.xz").write_bytes(lzma.compress(text))
    (root / "a.jsonl.xz").write_bytes(lzma.compress(rows))
    folder = root / "folder"
    folder.mkdir()
    for i, d in enumerate(DOCS[:40]):
        (folder / f"d{i}.txt").write_text(d)
    for i in range(3):
        (root / f"g{i}.jsonl.gz").write_bytes(gzip.compress(rows))
    return {
        "txt": (str(root / "a.txt"), "text"),
        "gz": (str(root / "a.txt.gz"), "text"),
        "xz": (str(root / "a.txt.xz"), "text"),
        "jsonl": (str(root / "a.jsonl.xz"), "body"),
        "folder": (str(folder), "text"),
        "glob": (str(root / "g*.jsonl.gz"), "body"),
    }


def direct(tok, pattern: str, field: str, split: str) -> list[list[int]]:
    texts = [
        t for f in sources.expand(pattern) for s, t in sources.documents(f, field) if s == split
    ]
    return [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(texts)]


def cached(directory, split: str) -> list[list[int]]:
    docs = token_cache.load(directory, split)
    tokens = np.asarray(docs.tokens[np.arange(docs.total)])
    return [tokens[a:b].tolist() for a, b in itertools.pairwise(docs.starts)]


def all_bytes(directory) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "plan.json"
    }


def test_round_trip_every_source_kind(tmp_path, kiln_bpe):
    for name, (pattern, field) in write_sources(tmp_path).items():
        cache = tmp_path / "cache" / name
        token_cache.prepare(
            cache, pattern, str(kiln_bpe.path), kiln_bpe.vocab_size, field=field, log=str
        )
        for split in sources.SPLITS:
            want = direct(kiln_bpe, pattern, field, split)
            assert want and cached(cache, split) == want, (name, split)
    manifest = json.loads((tmp_path / "cache" / "glob" / "manifest.json").read_text())
    assert len(manifest["files"]) == 3 and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == token_cache.tokenizer_hash(kiln_bpe.path)


def test_large_file_parts_and_workers_give_the_same_bytes(tmp_path, kiln_bpe, monkeypatch):
    pattern, _ = write_sources(tmp_path)["gz"]
    monkeypatch.setattr(token_cache, "PART_BYTES", 1000)  # several parts of one file
    monkeypatch.setattr(token_cache, "BLOCK", 7)
    args = (pattern, str(kiln_bpe.path), kiln_bpe.vocab_size)
    one = token_cache.prepare(tmp_path / "one", *args, log=str)
    assert len(one["shards"]) > 2
    train = sorted(map(tuple, cached(tmp_path / "one", "train")))
    assert train == sorted(map(tuple, direct(kiln_bpe, pattern, "text", "train")))
    # Spawned workers do not see the monkeypatch, so give them the plan's own numbers: the
    # plan travels with each job.
    token_cache.prepare(tmp_path / "two", *args, workers=2, log=str)
    assert all_bytes(tmp_path / "one") == all_bytes(tmp_path / "two")


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, kiln_bpe, monkeypatch):
    pattern, field = write_sources(tmp_path)["glob"]
    args = (pattern, str(kiln_bpe.path), kiln_bpe.vocab_size)
    token_cache.prepare(tmp_path / "whole", *args, field=field, log=str)
    real, calls = token_cache.build_shard, []

    def dies_on_the_second(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(token_cache, "build_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        token_cache.prepare(tmp_path / "cut", *args, field=field, log=str)
    with pytest.raises(KilnError, match="not a complete token cache"):
        token_cache.load(tmp_path / "cut", "train")
    monkeypatch.setattr(token_cache, "build_shard", real)
    logged = []
    token_cache.prepare(tmp_path / "cut", *args, field=field, log=logged.append)
    assert "1 shards done" in logged[0]
    assert all_bytes(tmp_path / "cut") == all_bytes(tmp_path / "whole")


def test_full_disk_leaves_no_complete_cache(tmp_path, kiln_bpe, monkeypatch):
    pattern, _ = write_sources(tmp_path)["txt"]
    args = (tmp_path / "c", pattern, str(kiln_bpe.path), kiln_bpe.vocab_size)
    real, writes = os.fsync, []

    def full(fd):
        writes.append(fd)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(token_cache.os, "fsync", full)
    with pytest.raises(KilnError, match="disk is full") as info:
        token_cache.prepare(*args, log=str)
    assert "rerun" in str(info.value)
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c").rglob("*.tmp"))
    monkeypatch.setattr(token_cache.os, "fsync", real)
    token_cache.prepare(*args, log=str)
    assert cached(tmp_path / "c", "test") == direct(kiln_bpe, pattern, "text", "test")


def test_stale_cache_is_refused(tmp_path, kiln_bpe):
    pattern, _ = write_sources(tmp_path)["txt"]
    cache = tmp_path / "c"
    token_cache.prepare(cache, pattern, str(kiln_bpe.path), kiln_bpe.vocab_size, log=str)
    with open(pattern, "a") as f:
        f.write("\nA new document.\n")
    with pytest.raises(KilnError, match="a.txt changed") as info:
        token_cache.prepare(cache, pattern, str(kiln_bpe.path), kiln_bpe.vocab_size, log=str)
    assert str(cache) in str(info.value) and "--force" in str(info.value)
    other = train_tokenizer(DOCS, tmp_path / "other.model", vocab_size=500)
    with pytest.raises(KilnError, match="another tokenizer"):
        token_cache.prepare(cache, pattern, str(other.path), other.vocab_size, log=str)
    token_cache.prepare(cache, pattern, str(other.path), other.vocab_size, force=True, log=str)
    assert cached(cache, "train") == direct(other, pattern, "text", "train")


def test_training_from_the_cache_equals_training_from_text(tmp_path, kiln_bpe):
    pattern, _ = write_sources(tmp_path)["xz"]
    token_cache.prepare(tmp_path / "c", pattern, str(kiln_bpe.path), kiln_bpe.vocab_size, log=str)
    common = dict(seq_len=32, global_batch_size=8, seed=3, streams=2)
    texts = corpus.read_documents(pattern, "train")
    want = list(itertools.islice(pipeline.make_train_dataset(texts, kiln_bpe, **common), 6))
    docs = token_cache.load(tmp_path / "c", "train")
    got = list(itertools.islice(pipeline.make_train_dataset(docs, kiln_bpe, **common), 6))
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    weighted = pipeline.make_train_dataset([docs], kiln_bpe, weights=[5.0], **common)
    for a, b in zip(want, itertools.islice(weighted, 6), strict=False):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def fake_source(first: int, docs: int = 200) -> pipeline.Tokenized:
    """Documents whose tokens are all `first` .. `first + 9`: a row's source is readable."""
    rng = np.random.default_rng(first)
    lengths = rng.integers(3, 40, docs)
    tokens = first + rng.integers(0, 10, int(lengths.sum()))
    return pipeline.Tokenized.from_arrays(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def test_mixture_frequencies_and_resume(kiln_bpe):
    srcs = [fake_source(100), fake_source(200, 50)]
    kwargs = dict(seq_len=16, global_batch_size=8, seed=1, streams=2, weights=[3, 1])
    ds = pipeline.make_train_dataset(srcs, kiln_bpe, **kwargs)
    batches = list(itertools.islice(ds, 150))
    firsts = np.concatenate([b["inputs"][:, 1] for b in batches])
    assert np.all((firsts >= 100) & (firsts < 210))
    share = np.mean(firsts < 200)
    assert abs(share - 0.75) < 0.05, share
    it = iter(pipeline.make_train_dataset(srcs, kiln_bpe, **kwargs))
    for _ in range(7):
        next(it)
    state = it.get_state()
    resumed = iter(pipeline.make_train_dataset(srcs, kiln_bpe, **kwargs))
    resumed.set_state(state)
    for want in batches[7:12]:
        got = next(resumed)
        assert all(np.array_equal(want[k], got[k]) for k in want)
    half = pipeline.make_train_dataset(srcs, kiln_bpe, process_index=1, process_count=2, **kwargs)
    for want, got in zip(batches[:4], itertools.islice(half, 4), strict=False):
        assert np.array_equal(want["inputs"][4:], got["inputs"])


def test_parse_sources_and_errors():
    got = mixture.parse("web=/d/*.jsonl.gz weight=3 field=content; books=/b")
    assert got == [
        mixture.Source("web", "/d/*.jsonl.gz", 3.0, "content"),
        mixture.Source("books", "/b", 1.0, "text"),
    ]
    for bad, match in [
        ("web", "name=path"),
        ("web=/d weight=-1", "positive"),
        ("web=/d colour=red", "unknown option 'colour'"),
        ("a=/x; a=/y", "twice"),
        (" ; ", "names no source"),
    ]:
        with pytest.raises(KilnError, match=match):
            mixture.parse(bad)


def test_tokenizer_sample_spans_all_sources(tmp_path):
    docs = [f"doc {i}" for i in range(1000)]
    sample = inputs.sample_documents(docs, 100, seed=0)
    assert len(sample) == 100 and max(int(d.split()[1]) for d in sample) > 900
    assert inputs.sample_documents(docs[:50], 100, seed=0) == docs[:50]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "b.txt").write_text("\n\n".join(f"other {i}" for i in range(1000)))
    specs = mixture.parse(f"a={tmp_path}/a.jsonl weight=1; b={tmp_path}/b.txt weight=3")
    sample = mixture.sample_documents(specs, 80, seed=0)
    assert sum(d.startswith("doc") for d in sample) == 20
    assert sum(d.startswith("other") for d in sample) == 60
    assert max(int(d.split()[1]) for d in sample if d.startswith("other")) > 800
    assert sample == mixture.sample_documents(specs, 80, seed=0)


def test_a_run_prepares_its_caches_and_reads_them(tmp_path):
    from kiln import config_lib
    from kiln.tools import prepare

    paths = write_sources(tmp_path)
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    config.model.vocab_size = 512
    config.data.global_batch_size, config.data.seq_len, config.eval.batches = 4, 32, 4
    config.data.sources = f"web={paths['glob'][0]} weight=3 field=body; txt={paths['gz'][0]}"
    mixture.check_config(config.data)
    workdir = tmp_path / "run"
    workdir.mkdir()
    data = inputs.prepare(config, str(workdir))
    for name in ("web", "txt"):
        assert (workdir / "token_cache" / name / "manifest.json").is_file()
    assert list(data.by_source["validation"]) == ["web", "txt"]
    assert [len(b) for b in data.by_source["validation"].values()] == [3, 1]
    assert len(data.validation) == 4 and next(data.train_iter)["inputs"].shape == (4, 32)
    before = all_bytes(workdir / "token_cache")
    caches = prepare.prepare(config, str(workdir))  # the tool finds them done
    assert caches["web"] == workdir / "token_cache" / "web"
    assert all_bytes(workdir / "token_cache") == before


def sharded_cache(tmp_path, kiln_bpe, files: int = 6):
    """A cache of `files` text files (one shard each) of DOCS' thirds; its train CachedSplit."""
    for i in range(files):
        (tmp_path / f"s{i}.txt").write_text("\n\n".join(DOCS[i::files]))
    args = (str(tmp_path / "s*.txt"), str(kiln_bpe.path), kiln_bpe.vocab_size)
    token_cache.prepare(tmp_path / "c", *args, log=str)
    return token_cache.CachedSplit(tmp_path / "c", "train")


def range_documents(docs) -> list[tuple[int, ...]]:
    """A TokenRange's documents, cut at the starts it reports."""
    tokens = docs.tokens[np.arange(docs.total)]
    cuts = [0, *docs.starts_in(0, docs.total).tolist(), docs.total]
    return [tuple(tokens[a:b].tolist()) for a, b in itertools.pairwise(cuts)]


def test_streams_open_only_their_shards(tmp_path, kiln_bpe):
    split = sharded_cache(tmp_path, kiln_bpe)
    everything = cached(tmp_path / "c", "train")
    seen, opened = [], []
    for s in range(4):
        part = token_cache.CachedSplit(tmp_path / "c", "train")
        docs = part.stream_range([7, 0], 4, s)
        seen += range_documents(docs)
        assert len(docs) == len(range_documents(docs)) > 0
        opened.append(part.opened)
        assert len(part.opened) <= 3  # 6 shards over 4 streams: 2 or 3 each
    # Every training document lands in exactly one stream.
    assert sorted(seen) == sorted(tuple(d) for d in everything)
    assert set().union(*opened) == set(range(6)) and len(split) == len(everything)


def test_evaluation_reads_the_fewest_shards_that_hold_its_tokens(tmp_path, kiln_bpe):
    split = sharded_cache(tmp_path, kiln_bpe)
    everything = sorted(tuple(d) for d in cached(tmp_path / "c", "validation"))
    few = token_cache.CachedSplit(tmp_path / "c", "validation").first_documents(1)
    assert len(few) and len(split.opened) == 0
    tokens = np.asarray(few.tokens[np.arange(few.total)])
    docs = [tuple(tokens[a:b].tolist()) for a, b in itertools.pairwise(few.starts)]
    assert set(docs) <= set(everything) and len(docs) < len(everything)
    every = token_cache.CachedSplit(tmp_path / "c", "validation")
    all_docs = every.first_documents(10**9)
    assert every.opened == set(range(6)) and len(all_docs) == len(everything)


def test_processes_open_only_their_shards_and_agree(tmp_path, kiln_bpe):
    sharded_cache(tmp_path, kiln_bpe)
    common = dict(seq_len=16, global_batch_size=8, seed=2, streams=4)
    whole = token_cache.CachedSplit(tmp_path / "c", "train")
    want = list(itertools.islice(pipeline.make_train_dataset(whole, kiln_bpe, **common), 5))
    halves, opened = [], []
    for index in range(2):
        part = token_cache.CachedSplit(tmp_path / "c", "train")
        ds = pipeline.make_train_dataset(
            part, kiln_bpe, process_index=index, process_count=2, **common
        )
        halves.append(list(itertools.islice(ds, 5)))
        opened.append(part.opened)
    # Each process opens half of the shards, sharing at most the one its ranges both cut.
    assert whole.opened == set(range(6)) == opened[0] | opened[1]
    assert len(opened[0] & opened[1]) <= 1 and max(len(o) for o in opened) <= 4
    for a, b, full in zip(*halves, want, strict=True):
        for key in full:
            assert np.array_equal(np.concatenate([a[key], b[key]]), full[key])


def test_shipped_corpora_in_a_mixture(tmp_path):
    specs = mixture.parse("b=bible weight=2; w=wordnet; y=sympy")
    assert [mixture.shipped(s) for s in specs] == [True, True, True]
    sample = mixture.sample_documents(specs, 40, seed=0, data_dir="data/tiny")
    bible = set(corpus.read_documents("bible", "train", "data/tiny"))
    code = set(corpus.read_documents("sympy", "train", "data/tiny"))
    assert sum(d in bible for d in sample) == 20 and sum(d in code for d in sample) == 10


def test_mixture_config_checks():
    from kiln import config_lib, defaults

    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    assert config.data.sources == defaults.SHIPPED_MIXTURE and not config.data.corpus
    config.data.prepare_workers = 0
    with pytest.raises(KilnError, match="data.prepare_workers=0"):
        validation.validate(config, 1)
    config.data.prepare_workers, config.data.sources = 2, "web"
    with pytest.raises(KilnError, match="name=path"):
        validation.validate(config, 1)
    config.data.corpus = "bible"  # data.corpus replaces the mixture: its spec is not read
    validation.validate(config, 1)


def test_evaluation_reports_each_source(tmp_path):
    from kiln import run

    # A stand-in eval step: the loss sum and token count are the batch's own numbers.
    def eval_step(params, batch):
        return {k: float(np.asarray(v).sum()) for k, v in batch.items()}

    def batch(loss, correct, weight, extra=0.0):
        return {
            "loss_sum": np.array([loss]),
            "correct_sum": np.array([correct]),
            "weight_sum": np.array([weight]),
            # A loss's own metric (ELECTRA's detection loss): its sum over its own count.
            "detection_loss_sum": np.array([extra]),
            "detection_loss_count": np.array([2 * weight]),
        }

    by_source = {
        "a": [batch(6.0, 1.0, 3.0, 1.5), batch(2.0, 1.0, 1.0, 0.5)],
        "b": [batch(10.0, 4.0, 5.0, 7.0)],
    }
    original = run.to_global
    run.to_global = lambda local, mesh, rows: local
    try:
        got = run.evaluate_sources(eval_step, None, by_source, None, 1)
    finally:
        run.to_global = original
    assert got["source/a/loss"] == pytest.approx(8.0 / 4.0)
    assert got["source/b/loss"] == pytest.approx(10.0 / 5.0)
    assert got["loss"] == pytest.approx(18.0 / 9.0) and got["tokens"] == 9.0
    assert got["accuracy"] == pytest.approx(6.0 / 9.0)
    assert got["detection_loss"] == pytest.approx(9.0 / 18.0)
