"""Input pipeline throughput alone, against what the train step consumes, for pre-training configs.

  .venv/bin/python benchmarks/data_throughput.py --configs gpt:small bert:small t5:small

For each `family:size[:style]` of experiments/<family>/pretrain.py: the real training stream
(`kiln.data.pipeline.make_train_dataset` over the shipped corpus's train split: shuffle,
tokenize, pack, batch and the config's objective) is drawn on ONE CPU core (the process is
pinned with sched_setaffinity while it runs), after a few warm-up batches. The train step's
consumption is measured in the same run by benchmarks/train_throughput.py's `measure` (the real
jitted step on all cores). Tokens are counted the same way for both (`kiln.flops.step_cost`:
encoder plus decoder tokens for t5). The tokenizer is trained once per vocabulary size into
benchmarks/.cache/. Prints a markdown table and appends it, with the machine, to
benchmarks/RESULTS.md (`--no-append` to skip).

  .venv/bin/python benchmarks/data_throughput.py --scale 2 --workers 1 2

measures the token cache instead (`benchmarks/data_scale.py`): a generated corpus of that many
GB prepared with each worker count, then gpt:tiny and gpt:small trained 50 steps on it.
"""

import argparse
import contextlib
import itertools
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import common
import data_scale
import train_throughput

from kiln import flops, inputs
from kiln.data import corpus, pipeline
from kiln.data import tokenizer as tokenizer_lib

CACHE = common.ROOT / "benchmarks" / ".cache"


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """Pins this process to one CPU while the block runs (no-op where unsupported)."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def train_documents(config) -> list[str]:
    """The config's `data.corpus`, else the shipped corpus (the default mixture), train split."""
    d = config.data
    return corpus.read_documents(d.corpus or "bible,wordnet,sympy", "train", d.data_dir or None)


def tokenizer_for(config, documents: list[str]) -> tokenizer_lib.Tokenizer:
    path = CACHE / f"tokenizer_{config.tokenizer.model_type}_{config.model.vocab_size}.model"
    if path.exists():
        return tokenizer_lib.load_tokenizer(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    return tokenizer_lib.train_tokenizer(
        documents[:100_000],
        path,
        vocab_size=config.model.vocab_size,
        model_type=config.tokenizer.model_type,
    )


def train_stream(config, documents: list[str], tok, objective=None):
    """The config's training stream (this process's rows: all of them)."""
    d = config.data
    return pipeline.make_train_dataset(
        documents,
        tok,
        seq_len=d.seq_len,
        global_batch_size=d.global_batch_size,
        seed=config.seed,
        objective=objective,
        streams=d.streams,
    )


def continued_rows(config, batches: int) -> float:
    """Batch correlation: the fraction of rows continuing a row of the previous step
    (`pipeline.continued_fraction`, tokens standing for their places in the corpus)."""
    documents = train_documents(config)
    places = pipeline.PlaceTokenizer(tokenizer_for(config, documents), documents)
    stream = train_stream(config, documents, places)
    return pipeline.continued_fraction(list(itertools.islice(stream, batches)))


def measure_data(config, batches: int, warmup: int) -> tuple[float, float]:
    """(tokens/s on one core, seconds) of the training stream."""
    d = config.data
    documents = train_documents(config)
    tok = tokenizer_for(config, documents)
    objective = inputs.make_objective(config, tok)
    with one_core():
        stream = iter(train_stream(config, documents, tok, objective))
        first = next(stream)
        for _ in range(warmup - 1):
            next(stream)
        start = time.perf_counter()
        for _ in itertools.islice(stream, batches):
            pass
        seconds = time.perf_counter() - start
    shapes = {k: v.shape for k, v in first.items()}
    tokens, _ = flops.step_cost(config.model.to_dict(), shapes, d.global_batch_size)
    return tokens * batches / seconds, seconds


def table(rows: list[dict]) -> str:
    lines = [
        "| config | batch | data tok/s (1 core) | train step tok/s | data / step |"
        " rows continuing the previous step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['data']:,.0f} | {r['step']:,.0f} |"
            f" {r['data'] / r['step']:.1f}x | {r['continued']:.2%} |"
        )
    return "\n".join(lines)


def scale(args: argparse.Namespace) -> None:
    """Prepare throughput, then training's peak RSS and feed rate, on a generated corpus."""
    tmp = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="kiln_data_scale_"))
    small = common.load_spec("gpt:small")
    tok = tokenizer_for(small, train_documents(small))
    sources, tok_path = f"gen={tmp / 'corpus'}/*.txt", str(tok.path)
    prepared, trained = [], []
    try:
        if (tmp / "corpus").is_dir():  # --keep of an earlier run: its corpus and caches
            size = sum(p.stat().st_size for p in (tmp / "corpus").iterdir()) / 1e9
        else:
            size = data_scale.generate(tmp / "corpus", args.scale) / 1e9
        for workers in args.workers:
            cache = tmp / f"cache_w{workers}"
            if (cache / "gen" / "manifest.json").is_file():
                result = data_scale.logged_prepare(tmp / f"{cache.name}.log")
            else:
                result = data_scale.prepare("gpt:small", sources, cache, tok_path, workers, tmp)
            prepared.append({"size": size, "workers": workers, **result})
            print(prepared[-1], flush=True)
        for spec in args.train_configs:
            result = data_scale.train(spec, sources, cache, tok_path, args.steps, tmp)
            released = data_scale.train(spec, sources, cache, tok_path, args.steps, tmp, True)
            result["released"] = released["rss"]
            feed, stream = data_scale.feed_rate(spec, cache / "gen", tok_path)
            trained.append({"config": spec, "size": size, "feed": feed, "stream": stream, **result})
            print(trained[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "| corpus GB | workers | tokens | seconds | tokens/s | peak RSS GB |",
        "|---" * 6 + "|",
    ]
    for r in prepared:
        lines.append(
            f"| {r['size']:.2f} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.0f} |"
            f" {r['rate']:,.0f} | {r['rss']:.2f} |"
        )
    lines += [
        "",
        "| config | corpus GB | peak RSS GB | peak RSS GB, released | stream RSS GB | step tok/s"
        " | feed tok/s (1 core) | feed / step |",
    ]
    lines.append("|---" * 8 + "|")
    for r in trained:
        lines.append(
            f"| {r['config']} | {r['size']:.2f} | {r['rss']:.2f} | {r['released']:.2f} |"
            f" {r['stream']:.3f} |"
            f" {r['step_rate']:,.0f} |"
            f" {r['feed']:,.0f} | {r['feed'] / r['step_rate']:.1f}x |"
        )
    command = shlex.join([".venv/bin/python", "benchmarks/data_throughput.py", *sys.argv[1:]])
    common.record(
        "data_scale",
        f"Command: `{command}`. A generated {size:.2f} GB text corpus (shipped training documents"
        " drawn with replacement, 128 MB files) prepared by `kiln.tools.prepare` (tokens/s over"
        " the whole command: file hashing, tokenizing, writing; peak RSS of the largest"
        f" process), then `kiln.main` for {args.steps} steps on the cache (peak RSS of the run;"
        " step tok/s: the median logged train/tokens_per_sec) and the training stream from the"
        " cache on one pinned core (feed tok/s; stream RSS: the resident memory it added, in a"
        " fresh process). The run's RSS is mostly XLA's scratch memory, which kiln.main keeps"
        ' mapped (kiln.tools.host_memory); "released": the same run with'
        " KILN_KEEP_HOST_MEMORY=0, whose peak is what the run needs. One 8192-piece BPE"
        " tokenizer for all rows (gpt:tiny with model.vocab_size=8192).",
        "\n".join(lines),
        None if args.no_append else args.results,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["gpt:small", "bert:small", "t5:small"])
    parser.add_argument("--batches", type=int, default=50, help="timed batches of the stream")
    parser.add_argument("--warmup", type=int, default=5, help="batches drawn before timing")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--results", default=str(common.RESULTS))
    parser.add_argument("--scale", type=float, help="GB of generated corpus: measure the cache")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="with --scale")
    parser.add_argument("--train-configs", nargs="+", default=["gpt:tiny", "gpt:small"])
    parser.add_argument("--keep", help="with --scale: work in (and keep) this folder")
    args = parser.parse_args()
    if args.scale:
        return scale(args)
    rows = []
    for spec in args.configs:
        config = common.load_spec(spec)
        data, _ = measure_data(config, args.batches, args.warmup)
        step = train_throughput.measure(spec, args.steps, args.repeats)
        rows.append(
            {
                "config": spec,
                "batch": step["batch"],
                "data": data,
                "step": step["tokens_per_sec"],
                "continued": continued_rows(config, args.batches),
            }
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = shlex.join([".venv/bin/python", "benchmarks/data_throughput.py", *sys.argv[1:]])
    common.record(
        "data_throughput",
        f"Command: `{command}`. The training stream on one pinned core ({args.batches} batches"
        f" after {args.warmup} warm-up) against the jitted train step on all cores (median of"
        f" {args.repeats} x {args.steps} steps); target: data >= 10x the step. Rows continuing"
        " the previous step: the fraction of rows whose first token continues a row of the"
        f" previous batch, over {args.batches} batches (kiln's order before the batch-order"
        " change: 40-50%).",
        table(rows),
        None if args.no_append else args.results,
    )


if __name__ == "__main__":
    main()
