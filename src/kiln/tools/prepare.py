"""Tokenize a config's `data.sources` once into their token caches.

  python -m kiln.tools.prepare --config experiments/gpt/pretrain.py:tiny \\
      --config.data.sources="web=/data/web/*.jsonl.gz weight=3; books=/data/books" \\
      --workdir runs/web --workers 4

Shipped corpora in the mixture (`bible`, `wordnet`, `sympy`) need no cache. The tokenizer is
the run's (`<workdir>`'s, else `tokenizer.path`'s, else one trained into the
workdir on `tokenizer.max_sentences` documents sampled across the sources), so the run started
later with the same config and workdir finds the caches ready. Rerunning resumes an interrupted
prepare; a cache built for other files or another tokenizer is refused unless `--force`.
"""

import os
import sys

from absl import app, flags

from kiln.tools import cli

PROG = "kiln.tools.prepare"
USAGE = (
    "Usage: python -m kiln.tools.prepare --config experiments/<file>.py[:args]"
    " --config.data.sources=... --workdir DIR [--workers N] [--force]"
)


def prepare(config, workdir: str, workers: int = 0, force: bool = False) -> dict:
    """Trains or loads the tokenizer, then builds every source's cache; name -> directory."""
    from kiln import inputs
    from kiln.data import mixture
    from kiln.errors import KilnError

    if not config.data.get("sources") or config.data.corpus:
        raise KilnError(
            f"The config trains on data.corpus={config.data.corpus!r}, which is read as text and"
            " needs no cache: set --config.data.corpus= (empty) and --config.data.sources="
            f"{mixture.EXAMPLE!r}."
        )
    specs = mixture.parse(config.data.sources)
    if workers:
        config.data.prepare_workers = workers
    os.makedirs(workdir, exist_ok=True)
    n, seed = config.tokenizer.max_sentences, config.seed
    data_dir = config.data.data_dir or None
    tok = inputs.prepare_tokenizer(
        config, workdir, lambda: mixture.sample_documents(specs, n, seed, data_dir)
    )
    return mixture.prepare_caches(config, workdir, str(tok.path), tok.vocab_size, force=force)


def main() -> None:
    """The command line (flags defined here, so that importing this module defines none)."""
    config = cli.define_config_flag()
    workdir = flags.DEFINE_string("workdir", None, "The run's workdir (its tokenizer).")
    workers = flags.DEFINE_integer("workers", 0, "Tokenizing processes; 0 = data.prepare_workers.")
    force = flags.DEFINE_bool("force", False, "Rebuild caches that do not match their source.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            print(f"{PROG}: error: unexpected arguments {argv[1:]}.\n{USAGE}", file=sys.stderr)
            sys.exit(2)

        def body() -> None:
            caches = prepare(config.value, workdir.value, workers.value, force.value)
            for name, path in caches.items():
                print(f"{name}: {path}")

        sys.exit(cli.run(PROG, body, workdir.value))

    app.run(run, flags_parser=lambda argv: cli.parse_flags(argv, PROG, USAGE))


if __name__ == "__main__":
    main()
