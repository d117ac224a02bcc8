"""The token cache at scale: prepare throughput, and training's peak memory and feed rate on a
generated corpus of a given size (`benchmarks/data_throughput.py --scale`).

Each measured command runs in its own process (`run_measured`: wall time and the peak RSS that
`os.wait4` reports, the largest of the process and its waited-for children). The corpus is
generated under a temporary folder from the shipped corpora's training documents (drawn with
replacement into 128 MB `.txt` files) and deleted afterwards.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from kiln.data import corpus, pipeline, token_cache
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import CausalLM
from kiln.tools import host_memory

FILE_BYTES = 128 << 20  # bytes of text per generated file
ROOT = pathlib.Path(__file__).resolve().parents[1]


def generate(directory: pathlib.Path, gigabytes: float, seed: int = 0) -> int:
    """Writes about ``gigabytes`` of blank-line-separated documents; returns the bytes written."""
    docs = corpus.read_documents("bible,wordnet,sympy", "train")
    encoded = [d.encode() + b"\n\n" for d in docs]
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    want, written = int(gigabytes * 1e9), 0
    for i in itertools.count():
        if written >= want:
            return written
        size = min(FILE_BYTES, want - written)
        with open(directory / f"part{i:04d}.txt", "wb") as f:
            done = 0
            while done < size:
                chunk = b"".join(encoded[j] for j in rng.integers(len(encoded), size=4096))
                f.write(chunk)
                done += len(chunk)
        written += done


def run_measured(
    command: list[str], log: pathlib.Path, env: dict | None = None
) -> tuple[float, float]:
    """Runs ``command`` (with ``env`` added to the environment); returns (wall seconds, peak RSS
    in GB). Output goes to ``log``."""
    start = time.perf_counter()
    env = {**os.environ, **(env or {})}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{command} failed ({process.returncode}); see {log}")
    return seconds, usage.ru_maxrss * 1024 / 1e9


def _config_args(spec: str, sources: str, cache: pathlib.Path, tok: str) -> list[str]:
    family, size = spec.split(":")
    return [
        "--config",
        f"experiments/{family}/pretrain.py:size={size}",
        "--config.data.corpus=",
        f"--config.data.sources={sources}",
        f"--config.data.cache_dir={cache}",
        f"--config.tokenizer.path={tok}",
        f"--config.model.vocab_size={tokenizer_lib.load_tokenizer(tok).vocab_size}",
    ]


def prepare(spec: str, sources: str, cache: pathlib.Path, tok: str, workers: int, tmp) -> dict:
    """`python -m kiln.tools.prepare` into ``cache``: tokens, seconds, tokens/s, peak RSS."""
    workdir = tmp / f"prepare_{cache.name}"
    command = [sys.executable, "-m", "kiln.tools.prepare", *_config_args(spec, sources, cache, tok)]
    command += ["--workdir", str(workdir), "--workers", str(workers)]
    seconds, rss = run_measured(command, tmp / f"{cache.name}.log")
    tokens = cache_tokens(cache)
    return {"tokens": tokens, "seconds": seconds, "rate": tokens / seconds, "rss": rss}


def logged_prepare(log: pathlib.Path) -> dict:
    """A finished prepare's figures from its log's last progress line (tokens/s while
    tokenizing, without start-up and hashing; peak RSS not known)."""
    last = [line for line in open(log) if "tokens/s" in line][-1]
    tokens = int(last.split(" tokens,")[0].rsplit(" ", 1)[1].replace(",", ""))
    rate = float(last.split(" tokens/s")[0].rsplit(" ", 1)[1].replace(",", ""))
    return {"tokens": tokens, "seconds": tokens / rate, "rate": rate, "rss": float("nan")}


def cache_tokens(cache: pathlib.Path) -> int:
    """Tokens in every split of every source cache under ``cache``."""
    total = 0
    for manifest in cache.glob(f"*/{token_cache.MANIFEST}"):
        done = json.loads(manifest.read_text())["done"]
        total += sum(s["tokens"] for d in done for s in d["splits"].values())
    return total


def train(
    spec: str, sources: str, cache: pathlib.Path, tok: str, steps: int, tmp, release: bool = False
) -> dict:
    """`python -m kiln.main` for ``steps`` steps on the prepared cache: peak RSS, step tok/s.
    ``release``: with glibc's defaults (`KILN_KEEP_HOST_MEMORY=0`), so that freed memory is
    returned and the peak is the run's need, not the heap's high-water mark."""
    workdir = tmp / f"train_{spec.replace(':', '_')}_{cache.name}"
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "kiln.main", *_config_args(spec, sources, cache, tok)]
    command += [
        "--workdir",
        str(workdir),
        f"--config.train.steps={steps}",
        "--config.train.log_every=5",
        "--config.eval.batches=2",
        f"--config.eval.every={steps}",
        f"--config.checkpoint.every={steps}",
        "--config.eval.sample_prompt=",
    ]
    env = {host_memory.ENV: "0"} if release else None
    seconds, rss = run_measured(command, tmp / f"{workdir.name}.log", env)
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rates = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r]
    shutil.rmtree(workdir, ignore_errors=True)
    return {"seconds": seconds, "rss": rss, "step_rate": float(np.median(rates))}


def resident_gb() -> float:
    """This process's resident memory now (Linux), in GB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def feed_rate(spec: str, cache_dir: pathlib.Path, tok_path: str) -> tuple[float, float]:
    """:func:`measure_feed` in a fresh process, so that no earlier stream's freed heap hides
    the memory this one adds."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_feed, (spec, cache_dir, tok_path))


def measure_feed(
    spec: str, cache_dir: pathlib.Path, tok_path: str, batches: int = 50
) -> tuple[float, float]:
    """Tokens/s of the training stream read from the cache (one pinned core, after 5 warm-up
    batches), with the causal LM objective, and the resident memory it added (GB)."""
    import common
    from data_throughput import one_core

    config = common.load_spec(spec)
    before = resident_gb()
    tok = tokenizer_lib.load_tokenizer(tok_path)
    docs = token_cache.CachedSplit(cache_dir, "train")
    d = config.data
    with one_core():
        stream = iter(
            pipeline.make_train_dataset(
                docs,
                tok,
                seq_len=d.seq_len,
                global_batch_size=d.global_batch_size,
                seed=0,
                objective=CausalLM(),
                streams=d.streams,
            )
        )
        for _ in range(5):
            next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        seconds = time.perf_counter() - start
    return batches * d.global_batch_size * d.seq_len / seconds, resident_gb() - before
