"""What the order of pre-training batches costs: gpt tiny trained with kiln's order, and with
the same packed rows in reading order.

  .venv/bin/python benchmarks/data_order.py --steps 1500

Both runs are `kiln.run.train_and_evaluate` on experiments/gpt/pretrain.py:size=tiny (the
default recipe; `train.steps` overridden, warmup following it as a fraction) and score the
whole validation split. "reading order" serves each packing stream's rows in the order they
were cut (a stream's next batch continues where its last one stopped: kiln's order before the
batch-order change); "kiln" is the default (rows shuffled within each stream's epoch). The
correlation statistic is the fraction of rows whose first token continues the last token of a
row of the previous step (`kiln.data.pipeline.continued_fraction`), over `--stat-batches`
batches. Prints a markdown table and appends it, with the machine, to benchmarks/RESULTS.md
(`--no-append` to skip).
"""

import argparse
import contextlib
import itertools
import shlex
import sys
import tempfile
from collections.abc import Iterator
from unittest import mock

import common
import data_throughput
import numpy as np

from kiln import run
from kiln.data import pipeline
from kiln.data import tokenizer as tokenizer_lib

ORDERS = ("kiln", "reading order")


@contextlib.contextmanager
def order(name: str) -> Iterator[None]:
    """Within the block, packing streams serve their rows in the named order."""
    if name == "kiln":
        yield
        return
    shuffled = pipeline._Stream._epoch  # cached per stream, inside the method

    def in_reading_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        documents, _, ends = shuffled(self, epoch)
        return documents, np.arange(self.rows_per_epoch), ends

    with mock.patch.object(pipeline._Stream, "_epoch", in_reading_order):
        yield


def continued(config, tok: tokenizer_lib.Tokenizer, batches: int) -> float:
    """The correlation statistic of the config's training stream in the current order."""
    documents = data_throughput.train_documents(config)
    places = pipeline.PlaceTokenizer(tok, documents)
    stream = data_throughput.train_stream(config, documents, places)
    return pipeline.continued_fraction(list(itertools.islice(stream, batches)))


def train(steps: int, workdir: str) -> tuple[dict, object]:
    """Trains gpt tiny for `steps` steps into `workdir`: (its summary, its config)."""
    config = common.load_spec("gpt:tiny")
    with config.unlocked():
        config.train.steps = steps
        config.eval.every = max(steps // 3, 1)
        config.eval.batches = 1_000_000  # the whole validation split
        config.eval.sample_prompt = ""
        config.checkpoint.every = steps
    summary = run.train_and_evaluate(config, workdir)
    return summary, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--stat-batches", type=int, default=300)
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--results", default=str(common.RESULTS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ORDERS:
            with order(name):
                workdir = f"{tmp}/{name.replace(' ', '_')}"
                summary, config = train(args.steps, workdir)
                tok = tokenizer_lib.load_tokenizer(f"{workdir}/tokenizer.model")
                stat = continued(config, tok, args.stat_batches)
            rows.append({"order": name, "loss": summary["validation/loss"], "stat": stat})
            print(rows[-1], flush=True)
    lines = [
        "| order | validation loss (whole split) | rows continuing a row of the previous step |",
        "|---|---|---|",
        *(f"| {r['order']} | {r['loss']:.3f} | {r['stat']:.1%} |" for r in rows),
    ]
    command = shlex.join([".venv/bin/python", "benchmarks/data_order.py", *sys.argv[1:]])
    common.record(
        "data_order",
        f"Command: `{command}`. gpt tiny (experiments/gpt/pretrain.py:size=tiny, batch 16 x"
        f" 128), {args.steps} steps at the default recipe, seed 0; the statistic over"
        f" {args.stat_batches} batches of the same stream.",
        "\n".join(lines),
        None if args.no_append else args.results,
    )


if __name__ == "__main__":
    main()
