"""`data.sources`: a weighted mixture of streaming sources, each with its own token cache.

``data.sources`` is ``"name=path [weight=W] [field=F]; name=path ..."``: a path, directory or
glob (`kiln.data.sources`) or the name of a shipped corpus (`bible`, `wordnet`, `sympy`, ...,
read in memory from `data.data_dir`), its sampling weight (default 1) and, for JSONL/Parquet,
the field holding the text (default ``text``). Each other source is tokenized once into
``<data.cache_dir or <workdir>/token_cache>/<name>`` (`kiln.data.token_cache`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import numpy as np

from kiln.data import corpus, sources, token_cache
from kiln.errors import KilnError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
EXAMPLE = "web=/data/web/*.jsonl.gz weight=3 field=content; books=/data/books weight=1"


@dataclasses.dataclass(frozen=True)
class Source:
    """One source of a mixture."""

    name: str
    path: str
    weight: float = 1.0
    field: str = "text"


def parse(spec: str) -> list[Source]:
    """The sources of a ``data.sources`` string; a KilnError naming the bad entry."""
    found: list[Source] = []
    for entry in (e.strip() for e in spec.replace("\n", ";").split(";")):
        if not entry:
            continue
        words = entry.split()
        name, eq, path = words[0].partition("=")
        options = dict(w.partition("=")[::2] for w in words[1:])
        bad = set(options) - {"weight", "field"}
        if not eq or not path or not _NAME.match(name) or bad:
            raise KilnError(
                f"data.sources entry {entry!r}: expected name=path [weight=W] [field=F] (a name"
                f" of letters, digits, _.-){f'; unknown option {sorted(bad)[0]!r}' if bad else ''}"
                f". Example: data.sources={EXAMPLE!r}."
            )
        try:
            weight = float(options.get("weight", 1))
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight <= 0:
            raise KilnError(
                f"data.sources entry {entry!r}: weight={options['weight']!r} must be a positive"
                " number."
            )
        if any(s.name == name for s in found):
            raise KilnError(f"data.sources names the source {name!r} twice: rename one.")
        found.append(Source(name, path, weight, options.get("field") or "text"))
    if not found:
        raise KilnError(f"data.sources={spec!r} names no source. Example: {EXAMPLE!r}.")
    return found


def check_config(data) -> None:
    """The `data` section's mixture keys (for `validation.validate`): `data.sources` parses
    (when `data.corpus` does not replace it) and `data.prepare_workers` is at least 1."""
    if data.get("sources") and not data.get("corpus"):
        parse(data.sources)
    workers = data.get("prepare_workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise KilnError(
            f"data.prepare_workers={workers!r} must be a positive number of tokenizing processes"
            " (e.g. 1, or the number of CPU cores to spare)."
        )


def shipped(source: Source) -> bool:
    """Whether a source is a corpus kiln ships (`bible`, `wordnet`, ...): read in memory from
    `data.data_dir`, tokenized by the run itself, never cached."""
    return source.path in corpus.SOURCES


def cache_root(config, workdir: str) -> pathlib.Path:
    """Where the sources' token caches live."""
    return pathlib.Path(config.data.cache_dir or os.path.join(workdir, "token_cache"))


def prepare_caches(
    config,
    workdir: str,
    tokenizer_path: str,
    vocab_size: int,
    *,
    force: bool = False,
    log: Callable[[str], None] = token_cache.log_stderr,
) -> dict[str, pathlib.Path]:
    """Builds, resumes or checks every source's cache; returns name -> cache directory."""
    root = cache_root(config, workdir)
    caches = {}
    for source in parse(config.data.sources):
        if shipped(source):
            continue
        caches[source.name] = root / source.name
        token_cache.prepare(
            caches[source.name],
            source.path,
            tokenizer_path,
            vocab_size,
            field=source.field,
            workers=config.data.prepare_workers,
            force=force,
            log=log,
        )
    return caches


def train_texts(source: Source, data_dir: str | None = None) -> Iterator[str]:
    """A source's training documents, streaming (a shipped corpus's from memory)."""
    if shipped(source):
        yield from corpus.read_documents(source.path, "train", data_dir)
        return
    for file in sources.expand(source.path):
        for split, text in sources.documents(file, source.field):
            if split == "train":
                yield text


def sample_documents(
    specs: list[Source], count: int, seed: int, data_dir: str | None = None
) -> list[str]:
    """About ``count`` training documents drawn across the sources, each source's share by its
    weight: a uniform sample of the source's train split (reservoir sampling, one streaming
    pass, seeded), so every part of every source can be drawn."""
    total = sum(s.weight for s in specs)
    sample: list[str] = []
    for k, spec in enumerate(specs):
        want = max(1, round(count * spec.weight / total))
        rng = np.random.default_rng([seed, k])
        kept: list[str] = []
        seen = 0
        for text in train_texts(spec, data_dir):
            seen += 1
            if len(kept) < want:
                kept.append(text)
            elif (j := int(rng.integers(seen))) < want:
                kept[j] = text
        sample += kept
    return sample
