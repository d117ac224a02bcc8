"""A pre-tokenized, sharded token cache of one data source, read without loading it.

Layout of a cache directory::

    plan.json                    what is being built: source files (size, mtime, sha256),
                                 tokenizer hash, dtype, split rule, the shards
    shards/<i>.<split>.tokens    the split's documents as [first] + ids + [last], flat uint16/32
    shards/<i>.<split>.offsets   int64 document starts in that file, one more than documents
    shards/<i>.done.json         written after a shard's files: its counts and checksums
    manifest.json                plan.json plus the shards' counts, written last: complete

Shard i is part ``p`` of ``P`` of one source file: the file's documents in blocks of
``BLOCK``, block b belonging to part ``b % P`` (P grows with the file's size, so a large file
is tokenized by several workers). A shard's bytes depend only on its file, the tokenizer and
its part: an interrupted prepare resumes at the first shard without a done file and ends with
the same bytes, with any number of workers.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from kiln.data import sources
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.cache_stream import CacheStream, Concat, TokenRange
from kiln.data.tokenized import Tokenized
from kiln.errors import KilnError

VERSION = 1
BLOCK = 256  # documents per block of a file dealt to its parts
PART_BYTES = 64 << 20  # input bytes per part of a large file
_CHUNK = 1024  # documents per tokenizer call
MANIFEST, PLAN, SHARDS = "manifest.json", "plan.json", "shards"


def tokenizer_hash(path: str | os.PathLike) -> str:
    """The sha256 of a tokenizer's file, or of a tokenizer directory's files (name and bytes)."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Shard:
    """Part ``part`` of ``parts`` of source file ``file`` (an index into the plan's files)."""

    file: int
    part: int
    parts: int

    @property
    def name(self) -> str:
        return f"{self.file:05d}-{self.part:03d}"


def make_plan(
    pattern: str, field: str, tokenizer_path: str, vocab_size: int, known: dict | None = None
) -> dict:
    """What a cache of source ``pattern`` holds: its files, the tokenizer and the shards. A
    file of ``known`` (an earlier plan) with the same size and mtime keeps its sha256."""
    files = sources.expand(pattern)
    seen = {f["path"]: f for f in (known or {}).get("files", [])}
    listed = []
    shards = []
    for i, file in enumerate(files):
        info = {"path": str(file.path.resolve()), "kind": file.kind}
        info |= {"compression": file.compression, "key": file.key}
        stat, was = file.path.stat(), seen.get(info["path"], {})
        if (was.get("size"), was.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            info |= {k: was[k] for k in ("size", "mtime_ns", "sha256")}
        else:
            info |= sources.fingerprint(file.path)
        listed.append(info)
        parts = max(1, -(-info["size"] // PART_BYTES)) if file.kind != "document" else 1
        shards += [dataclasses.asdict(Shard(i, p, parts)) for p in range(parts)]
    return {
        "version": VERSION,
        "source": pattern,
        "field": field,
        "files": listed,
        "tokenizer": {"sha256": tokenizer_hash(tokenizer_path), "vocab_size": vocab_size},
        "dtype": "uint16" if vocab_size <= 1 << 16 else "uint32",
        "split_rule": sources.SPLIT_RULE,
        "block": BLOCK,
        "shards": shards,
    }


def mismatch(old: dict, new: dict) -> str:
    """Why a cache planned as ``old`` does not hold ``new``'s tokens ("" if it does)."""
    if old.get("version") != VERSION:
        return f"it has format version {old.get('version')}, not {VERSION}"
    if old["tokenizer"] != new["tokenizer"]:
        return "it was built with another tokenizer (its sha256 differs)"
    old_files = {f["path"]: f for f in old["files"]}
    for f in new["files"]:
        was = old_files.pop(f["path"], None)
        if was is None:
            return f"{f['path']} is new"
        if (was["size"], was["sha256"]) != (f["size"], f["sha256"]):
            return f"{f['path']} changed (size {was['size']:,} -> {f['size']:,} or its sha256)"
    if old_files:
        return f"{next(iter(old_files))} is gone"
    for key in ("field", "split_rule", "block", "shards", "dtype"):
        if old.get(key) != new[key]:
            return f"its {key} differs"
    return ""


def _write(path: pathlib.Path, write: Callable[[object], None]) -> None:
    """Writes a file through a temporary name, so a partial file never has the real name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = " The disk is full: free space, then" if e.errno == errno.ENOSPC else ""
        raise KilnError(
            f"Writing {path} failed ({e}).{full} rerun `python -m kiln.tools.prepare` with the"
            " same config: finished shards are kept, and the cache is not complete until"
            f" {MANIFEST} is written."
        ) from e


def _write_json(path: pathlib.Path, value: dict) -> None:
    _write(path, lambda f: f.write(json.dumps(value, indent=1, sort_keys=True).encode()))


_TOKENIZERS: dict[str, tokenizer_lib.AnyTokenizer] = {}


def _documents(plan: dict, shard: Shard) -> Iterator[tuple[str, str]]:
    """(split, text) of the documents of a shard, in file order."""
    info = plan["files"][shard.file]
    file = sources.SourceFile(
        pathlib.Path(info["path"]), info["kind"], info["compression"], info["key"]
    )
    for i, doc in enumerate(sources.documents(file, plan["field"])):
        if (i // plan["block"]) % shard.parts == shard.part:
            yield doc


def build_shard(directory: str, plan: dict, tokenizer_path: str, shard: Shard) -> dict:
    """Tokenizes one shard into its files and writes its done file; returns that file's
    contents (documents and tokens per split)."""
    tok = _TOKENIZERS.get(tokenizer_path)
    if tok is None:
        tok = _TOKENIZERS[tokenizer_path] = tokenizer_lib.load_tokenizer(tokenizer_path)
    first, last = tokenizer_lib.document_ids(tok)
    dtype = np.dtype(plan["dtype"])
    root = pathlib.Path(directory) / SHARDS
    arrays: dict[str, list[np.ndarray]] = {s: [] for s in sources.SPLITS}
    docs = _documents(plan, shard)
    while chunk := list(itertools.islice(docs, _CHUNK)):
        texts = [text for _, text in chunk]
        for (split, _), ids in zip(chunk, tok.encode_batch(texts), strict=True):
            arrays[split].append(np.asarray([first, *ids, last], dtype))
    done = {"shard": dataclasses.asdict(shard), "splits": {}}
    for split, parts in arrays.items():
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in parts], dtype=np.int64)])
        arrays[split] = []
        for suffix, array in (("tokens", tokens), ("offsets", offsets.astype(np.int64))):
            _write(root / f"{shard.name}.{split}.{suffix}", lambda f, a=array: f.write(a.data))
        done["splits"][split] = {
            "documents": len(offsets) - 1,
            "tokens": len(tokens),
            "sha256": hashlib.sha256(tokens.data).hexdigest(),
        }
    _write_json(root / f"{shard.name}.done.json", done)
    return done


def _build_star(args: tuple) -> dict:
    return build_shard(*args)


def prepare(
    directory: str | os.PathLike,
    pattern: str,
    tokenizer_path: str,
    vocab_size: int,
    *,
    field: str = "text",
    workers: int = 1,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Builds (or resumes, or checks) the cache of source ``pattern`` in ``directory`` and
    returns its manifest. A cache planned for other files or another tokenizer is refused
    (``force`` rebuilds it)."""
    directory = pathlib.Path(directory)
    existing = [directory / n for n in (MANIFEST, PLAN) if (directory / n).is_file()]
    known = json.loads(existing[0].read_text()) if existing else None
    plan = make_plan(pattern, field, tokenizer_path, vocab_size, known)
    why = mismatch(known, plan) if known else ""
    if why and not force:
        raise KilnError(stale_message(directory, pattern, why))
    if why:
        for stale in (directory / SHARDS).glob("*"):
            stale.unlink()
        (directory / MANIFEST).unlink(missing_ok=True)
    elif known and existing[0].name == MANIFEST:
        return known
    (directory / SHARDS).mkdir(parents=True, exist_ok=True)
    _write_json(directory / PLAN, plan)
    shards = [Shard(**s) for s in plan["shards"]]
    itemsize = np.dtype(plan["dtype"]).itemsize
    done = {s.name: _done(directory, s, itemsize) for s in shards}
    todo = [s for s in shards if done[s.name] is None]
    if len(todo) < len(shards):
        log(f"Resuming the token cache {directory}: {len(shards) - len(todo)} shards done")
    _run(directory, plan, tokenizer_path, todo, workers, done, log)
    manifest = plan | {"complete": True, "done": [done[s.name] for s in shards]}
    _write_json(directory / MANIFEST, manifest)
    return manifest


def stale_message(directory: pathlib.Path, pattern: str, why: str) -> str:
    return (
        f"The token cache {directory} does not match data source {pattern!r}: {why}. Delete"
        " the cache directory (or run `python -m kiln.tools.prepare --config ... --force`) to"
        " rebuild it, or point data.cache_dir elsewhere."
    )


def _done(directory: pathlib.Path, shard: Shard, itemsize: int) -> dict | None:
    """A shard's done file if it and its files are complete, else None."""
    path = directory / SHARDS / f"{shard.name}.done.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    for split, info in done["splits"].items():
        stem = directory / SHARDS / f"{shard.name}.{split}"
        want = {"tokens": info["tokens"] * itemsize, "offsets": (info["documents"] + 1) * 8}
        for suffix, size in want.items():
            file = pathlib.Path(f"{stem}.{suffix}")
            if not file.is_file() or file.stat().st_size != size:
                return None
    return done


def _run(
    directory: pathlib.Path,
    plan: dict,
    tokenizer_path: str,
    todo: list[Shard],
    workers: int,
    done: dict,
    log: Callable[[str], None],
) -> None:
    """Builds the shards ``todo``, with ``workers`` processes, logging tokens/s and ETA."""
    sizes = {s.name: plan["files"][s.file]["size"] / s.parts for s in todo}
    total, seen, tokens, start = sum(sizes.values()), 0.0, 0, time.perf_counter()
    jobs = [(str(directory), plan, tokenizer_path, s) for s in todo]
    if workers > 1 and len(todo) > 1:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(todo)))
        results = pool.imap_unordered(_build_star, jobs)
    else:
        pool, results = None, map(_build_star, jobs)
    try:
        for count, result in enumerate(results, start=1):
            shard = Shard(**result["shard"])
            done[shard.name] = result
            seen += sizes[shard.name]
            tokens += sum(s["tokens"] for s in result["splits"].values())
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            eta = (time.perf_counter() - start) * (total - seen) / max(seen, 1e-9)
            log(
                f"token cache {directory}: {count}/{len(todo)} shards,"
                f" {seen / max(total, 1):.0%} of the input, {tokens:,} tokens,"
                f" {rate:,.0f} tokens/s, ETA {eta:.0f} s"
            )
    finally:
        if pool is not None:
            pool.terminate()


class CachedSplit:
    """One split of a complete cache, its shards opened only when used.

    ``stream_range`` deals the split to packing streams by shard: the shards in a seeded
    order, their documents concatenated and cut into ``streams`` contiguous ranges, so stream
    ``s`` opens only the one or few shards its range covers and a process only those of its
    streams. ``opened`` records the shards opened so far.
    """

    def __init__(self, directory: str | os.PathLike, split: str):
        self.directory, self.split = pathlib.Path(directory), split
        manifest = read_manifest(self.directory)
        self.dtype = manifest["dtype"]
        self.names = [Shard(**info).name for info in manifest["shards"]]
        self.done = manifest["done"]
        self.counts = np.asarray([d["splits"][split]["documents"] for d in self.done])
        self.opened: set[int] = set()

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _stem(self, shard: int) -> pathlib.Path:
        self.opened.add(int(shard))
        return self.directory / SHARDS / f"{self.names[shard]}.{self.split}"

    def shards(self, ids: np.ndarray | list[int]) -> Tokenized:
        """The documents of shards ``ids``, in that order, in memory but for their tokens (read
        on use); for evaluation, whose documents are re-ordered."""
        ranges, starts, base = [], [np.zeros(1, np.int64)], 0
        for i in ids:
            stem = self._stem(i)
            ranges.append((pathlib.Path(f"{stem}.tokens"), 0, None))
            offsets = np.fromfile(f"{stem}.offsets", np.int64)
            starts.append(offsets[1:] + base)
            base += int(offsets[-1])
        return Tokenized.from_arrays(Concat(ranges, self.dtype), np.concatenate(starts))

    def first_documents(self, max_tokens: int) -> Tokenized:
        """The documents of the fewest shards, in a fixed order, that hold ``max_tokens``
        tokens (all of them if fewer): evaluation data whose memory does not grow with the
        corpus."""
        tokens = np.asarray([d["splits"][self.split]["tokens"] for d in self.done])
        order = np.random.default_rng(0).permutation(len(self.names))
        enough = int(np.searchsorted(np.cumsum(tokens[order]), max_tokens)) + 1
        return self.shards(order[:enough])

    def stream_range(self, seed: list[int], streams: int, stream: int) -> TokenRange:
        """Stream ``stream`` of ``streams``'s documents: its contiguous range of the split's
        documents, the shards ordered by a permutation drawn from ``seed``."""
        order = np.random.default_rng(seed).permutation(len(self.names))
        ends = np.cumsum(self.counts[order])
        total = int(ends[-1]) if len(ends) else 0
        low, high = stream * total // streams, (stream + 1) * total // streams
        ranges = []
        for shard, end, count in zip(order, ends, self.counts[order], strict=True):
            first, stop = max(low - (end - count), 0), min(high - (end - count), count)
            if first < stop:
                ranges.append((self._stem(shard), int(first), int(stop)))
        return TokenRange(ranges, self.dtype)

    def packing_stream(
        self,
        seed: list[int],
        streams: int,
        stream: int,
        row_len: int,
        epoch_seed: list[int],
        name: str,
    ) -> CacheStream:
        """The packing stream of :meth:`stream_range` (`kiln.data.cache_stream`)."""
        return CacheStream(self.stream_range(seed, streams, stream), row_len, epoch_seed, name)


def load(directory: str | os.PathLike, split: str) -> Tokenized:
    """A complete cache's documents of one split (tokens are read on use)."""
    cached = CachedSplit(directory, split)
    return cached.shards(range(len(cached.names)))


def read_manifest(directory: pathlib.Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise KilnError(
            f"{directory} is not a complete token cache (no {MANIFEST}): run `python -m"
            " kiln.tools.prepare --config ...` to build or finish it."
        )
    return json.loads(path.read_text())


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
